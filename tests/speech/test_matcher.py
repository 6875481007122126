"""The matcher: opt-outs found through recognition errors and new wordings; negations and look-alikes not."""

from __future__ import annotations

import pytest

from agent.speech.matcher import Matcher, normalise, phrase_similarity, sound_key

MATCHER = Matcher()


@pytest.mark.parametrize("transcript", [
    "Stop calling me.",
    "Please take me off your loose.",  # "list" misheard
    "Uh, could you please remove me from your list?",  # the phrase inside a longer utterance
    "I don't want any more calls from you.",  # no listed phrase: the intent
    "Put this number on the do not call registry.",
    "Unsubscribe.",
])
def test_opt_out_wordings_and_misrecognitions_are_opt_outs(transcript: str) -> None:
    match = MATCHER.score(transcript)
    assert MATCHER.is_optout(match), match


@pytest.mark.parametrize("transcript", [
    "You can call me any time.",
    "Stop by the store tomorrow.",
    "Don't stop calling me.",  # negated
    "Please call me back tomorrow.",
    "Take the dog off the couch.",
    "I'll put it on my list.",
    "",
    "You",
])
def test_look_alikes_and_negations_are_not(transcript: str) -> None:
    match = MATCHER.score(transcript)
    assert not MATCHER.is_optout(match), match


def test_the_decoders_own_phrase_score_decides_when_the_transcript_is_garbled() -> None:
    phrases = ("stop calling me", "take me off your list")
    matcher = Matcher(phrases=phrases, decoder_floor=-1.2)
    garbled = "Hop, go in me."
    assert not matcher.is_optout(matcher.score(garbled, (-3.0, -4.0)))
    match = matcher.score(garbled, (-0.6, -4.0))
    assert matcher.is_optout(match) and match.how == "decoder" and match.phrase == "stop calling me"


def test_phrases_and_threshold_are_configuration() -> None:
    strict = Matcher(phrases=("lose my number",), threshold=0.95, intents=False)
    assert strict.is_optout(strict.score("Lose my number."))
    assert not strict.is_optout(strict.score("Loose my numbers."))
    assert Matcher(phrases=("lose my number",), threshold=0.7, intents=False).is_optout(
        strict.score("Loose my numbers."))


def test_words_are_compared_by_sound() -> None:
    assert sound_key("list") == "lst" and sound_key("called") == sound_key("cold")
    assert phrase_similarity(["take", "me", "off", "your", "list"], normalise("Take me off your lest")) > 0.9
    assert normalise("Don't call me") == ["do", "not", "call", "me"]
