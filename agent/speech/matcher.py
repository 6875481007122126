"""Deciding whether an utterance is an opt-out, from what the recogniser made of it. No I/O.

Three kinds of evidence, the strongest wins (each scored 0..1, compared with one threshold):
- phrase: a configured phrase found in the transcript, tolerating recognition errors. Words are compared
  by a rough sound key (so "loose" is close to "list", "cold" to "called"), and the phrase may sit anywhere
  in the transcript, with a word missing, extra or wrong (a semi-global alignment, costed per word);
- intent: a few patterns that say "stop calling" / "remove me" / "do not call" in words no phrase list
  holds ("I don't want any more calls from you"), refused when negated ("don't stop calling");
- decoder: a configured phrase the recogniser itself found likely given the audio (its mean log-probability
  per token, agent/speech/model.py), whatever the transcript says: at `decoder_floor` it scores the default
  threshold (0.8), at 0 it scores 1. On the tuning split no negative utterance scored above -2.5.
An utterance that negates ("don't stop calling", "do not remove me") scores at most 0.5 whatever else.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

DEFAULT_PHRASES = (
    "stop calling me", "please stop calling me", "take me off your list", "remove me from your list",
    "do not call me again", "don't call me again", "put me on your do not call list", "I want to opt out",
    "unsubscribe me", "stop calling this number", "remove my number", "never call me again",
    "take my number off your list", "please remove me from your calling list", "quit calling me",
    "add me to your do not call list",
)
"""The tuning set's phrasings (the benchmark reports on phrasings held apart from these)."""

_CONTRACTIONS = {
    "don't": "do not", "dont": "do not", "doesn't": "does not", "won't": "will not", "can't": "can not",
    "cannot": "can not", "i'm": "i am", "i'd": "i would", "you're": "you are", "it's": "it is", "let's": "let us",
    "didn't": "did not", "wouldn't": "would not", "shouldn't": "should not", "y'all": "you all",
    "i've": "i have", "we're": "we are", "that's": "that is", "there's": "there is",
}
_WORD = re.compile(r"[a-z']+|[0-9]+")


def normalise(text: str) -> list[str]:
    """Lower-case words, contractions spelled out, punctuation gone."""
    words: list[str] = []
    for word in _WORD.findall(text.lower().replace("\u2019", "'")):
        words.extend(_CONTRACTIONS.get(word, word.strip("'")).split())
    return [w for w in words if w]


_TAIL = str.maketrans("cqgzvbdyhw", "kkksfpt___")
_HEAD = str.maketrans("cqzyhw", "kks___")


@lru_cache(maxsize=4096)
def sound_key(word: str) -> str:
    """A rough sound-alike key: consonant classes, vowels only at the start, doubled letters once."""
    w = word.lower()
    for a, b in (("ph", "f"), ("ck", "k"), ("gh", ""), ("wh", "w"), ("th", "0"), ("sh", "x"), ("ch", "x"),
                 ("qu", "k"), ("x", "ks")):
        w = w.replace(a, b)
    head, tail = w[:1], w[1:].translate(_TAIL)
    head = head.translate(_HEAD) or w[:1]
    head, tail = head.replace("_", ""), re.sub(r"[aeiou_]", "", tail)
    key = head + tail
    return re.sub(r"(.)\1+", r"\1", key)


def _edit(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


@lru_cache(maxsize=65536)
def word_distance(a: str, b: str) -> float:
    """0 for the same word, 1 for unrelated words; sound-alikes in between."""
    if a == b:
        return 0.0
    ka, kb = sound_key(a), sound_key(b)
    if ka == kb:
        return 0.2
    spelled = _edit(a, b) / max(len(a), len(b))
    sounded = _edit(ka, kb) / max(len(ka), len(kb), 1)
    return min(1.0, 0.3 + 0.7 * min(spelled, sounded))


_KEY = frozenset({"not", "never", "no", "stop", "off", "remove", "quit", "unsubscribe", "opt", "out"})
"""Words that carry the intent: a phrase found without one ("do call me again") is another sentence."""
_FILLER = frozenset({"please", "uh", "um", "oh", "just", "and", "so", "ok", "okay", "well", "the", "a", "now"})


def phrase_similarity(phrase: Sequence[str], words: Sequence[str]) -> float:
    """How well `phrase` occurs somewhere in `words`, 0..1 (1: word for word)."""
    n, m = len(phrase), len(words)
    if n == 0 or m == 0:
        return 0.0
    inf = float("inf")
    prev = [0.0] * (m + 1)  # free start anywhere in the transcript
    for i in range(1, n + 1):
        cur = [inf] * (m + 1)
        missing = 2.0 if phrase[i - 1] in _KEY else 1.0
        cur[0] = prev[0] + missing
        for j in range(1, m + 1):
            extra = 0.3 if words[j - 1] in _FILLER else 0.7
            cur[j] = min(prev[j] + missing,  # a phrase word missing
                         cur[j - 1] + extra,  # an extra word inside the phrase
                         prev[j - 1] + word_distance(phrase[i - 1], words[j - 1]))
        prev = cur
    return max(0.0, 1.0 - min(prev) / n)  # free end


_NEG = r"(?<!not )(?<!never )(?<!no )"
_CALLS = r"(calling|call|calls|ringing|phoning|contacting|bothering|harassing|texting|messaging|phone calls)"
_ME = r"(me|us|this number|this phone|the number|my number|my phone|my cell|here|this line)"
_LIST = r"(list|lists|database|system|records|registry|directory|file|files|contacts|books)"
_INTENTS: tuple[tuple[str, re.Pattern[str]], ...] = tuple((name, re.compile(rx)) for name, rx in (
    ("intent:stop-calling", _NEG + r"\b(stop|quit|cease|end)\b (\w+ ){0,2}" + _CALLS + r"\b"
                                   r"(?! (me )?(at|on|in|after|before|later|tomorrow|back|when|if))"),
    ("intent:do-not-call", r"\b(do not|never) (ever )?(call|contact|phone|ring|dial|text) " + _ME +
                           r"\b(?! (at|on|before|after|until|till|back|if|unless) )"),
    ("intent:remove", r"\b(remove|removing|take|taking|delete|erase|scratch|drop|cross|get|strike)\b (\w+ ){0,3}"
                      r"(me|my|us|this|our)\b (\w+ ){0,3}(off|from|out of)\b (\w+ ){0,4}" + _LIST + r"\b"),
    ("intent:removed", r"\b(my|this) (phone )?(number|name|info\w*|details) (\w+ ){0,1}(removed|deleted|erased|"
                       r"taken off)\b"),
    ("intent:lose-number", r"\b(lose|forget|delete|erase|remove) (my|this) (phone )?number\b"),
    ("intent:consent", r"\b(revoke|revoking|withdraw|withdrawing|cancel|take back|remove|removed) (my|our|all) "
                       r"(consent|permission)\b"),
    ("intent:do-not-call-list", r"\b(do not call|no call|dnc) (list|registry)\b"),
    ("intent:opt-out", r"\b(opt (me |us |this number )?out|unsubscribe|unsubscribed)\b"),
    ("intent:no-more-calls", r"\b(no more|not want (any )?more|not want (your|these|any|the) ?)\b (\w+ ){0,2}"
                             r"(calls|calling|phone calls)\b"),
    ("intent:not-want-calls", r"\b(do not|never) want (\w+ ){0,3}(calls|to be called|you to call|to be contacted)\b"),
))
_NEGATED = re.compile(r"\b(do not|never|no need to) (ever |please )?(stop|remove|take me off|unsubscribe|opt out)\b")


@dataclass(frozen=True)
class Match:
    """The matcher's verdict on one utterance."""

    score: float
    """0..1; an opt-out when at least the threshold."""
    phrase: str | None
    """The phrase or intent that scored best."""
    how: str
    """phrase | intent | decoder | none"""


class Matcher:
    """Phrases and threshold are configuration (SPEECH_PHRASES, SPEECH_THRESHOLD)."""

    def __init__(self, *, phrases: Sequence[str] = DEFAULT_PHRASES, threshold: float = 0.8,
                 decoder_floor: float = -1.2, intents: bool = True) -> None:
        self.phrases = tuple(p.strip().lower() for p in phrases if normalise(p))
        """As spoken (what the recogniser scores); the text comparison normalises them."""
        self._phrase_words = [normalise(p) for p in self.phrases]
        self.threshold = threshold
        self._floor = decoder_floor
        self._intents = intents

    def score(self, text: str, phrase_scores: Sequence[float] = ()) -> Match:
        """The best evidence in `text` (and the decoder's own per-phrase scores, in `phrases` order)."""
        words = normalise(text)
        joined = " ".join(words)
        best = Match(0.0, None, "none")
        for phrase, pw in zip(self.phrases, self._phrase_words, strict=True):
            sim = phrase_similarity(pw, words)
            if sim > best.score:
                best = Match(round(sim, 3), phrase, "phrase")
        if self._intents and joined:
            for name, pattern in _INTENTS:
                if pattern.search(joined):
                    best = Match(1.0, name, "intent")
                    break
        if self._floor < 0 and best.score < 1.0:
            for phrase, logprob in zip(self.phrases, phrase_scores, strict=False):
                mapped = min(1.0, max(0.0, 0.8 + 0.2 * (logprob - self._floor) / -self._floor))
                if mapped > best.score:
                    best = Match(round(mapped, 3), phrase, "decoder")
        if best.score > 0.5 and _NEGATED.search(joined):
            best = Match(0.5, best.phrase, f"{best.how}, negated")
        return best

    def is_optout(self, match: Match) -> bool:
        return match.score >= self.threshold
