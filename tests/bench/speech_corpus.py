"""Generate the spoken opt-out corpus: synthetic telephone audio from Debian's espeak-ng and flite.

    python tests/bench/speech_corpus.py [--out DIR] [--jobs 2]

Every clip: TTS -> 8 kHz, 300-3400 Hz (sox) -> speaker level (normal, or 12 dB quieter) -> the channel
(G.711 mu-law round trip, or GSM 06.10 then mu-law: the agent always receives mu-law) -> noise at the
condition's SNR over the whole stream, including 0.6 s before and 1.2 s after the speech. Written as 8 kHz
16-bit mono WAV plus `manifest.json` (text, label, voice, condition, split, hardness).

Splits: `tune` (TUNE_VOICES x TUNE_* texts) is what phrases, patterns and thresholds may be fitted on;
`held` (HELD_VOICES x HELD_* texts: other voices and other phrasings) is what the benchmark reports. Held
negatives number over 1,000 (a third hard: they share words with opt-outs), plus non-speech (silence,
noise, tones, DTMF, music). Deterministic (seeded); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import wave
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from agent.speech.audio import ulaw_decode, ulaw_encode
from agent.speech.matcher import DEFAULT_PHRASES

RATE = 8000
DEFAULT_OUT = Path(os.environ.get("SPEECH_CORPUS_DIR", "/var/tmp/optout-speech-corpus"))

TUNE_OPTOUT = list(DEFAULT_PHRASES)
"""The tuning phrasings are the matcher's default phrases (what it is fitted on)."""
HELD_OPTOUT = [
    "I don't want any more calls from you", "stop phoning me", "please don't ever call this number again",
    "take me off your calling list right now", "delete my number from your database", "lose my number",
    "I'm asking you to stop contacting me", "do not contact me again", "cease calling me immediately",
    "get me off your list", "I want my number removed", "stop ringing me", "no more calls please",
    "remove this number from your system", "quit ringing this phone", "put this number on the do not call registry",
    "don't call here anymore", "I revoke my consent to these calls", "stop bothering me with these calls",
    "erase my phone number from your records", "never contact me again", "opt me out of these calls",
    "I'd like to be removed from your list", "please stop these calls",
]
TUNE_HARD = [
    "you can call me any time", "stop by the store tomorrow", "call me back later", "please call me back tomorrow",
    "don't stop calling me", "I'll put it on my list", "take the dog off the couch", "remove the old battery first",
    "I never call anyone back", "my number is on the list", "the list is on the table", "stop it I'm laughing",
    "call my office instead", "keep calling me with updates",
]
TUNE_PLAIN = [
    "hello who is this", "yes speaking", "I'm busy right now", "what is this about", "sounds good",
    "can you repeat that", "I'm not sure", "tell me more", "how much does it cost", "what company are you with",
    "I'll think about it", "sorry I didn't catch that", "my wife handles that", "is this a recording",
    "okay go ahead", "I already have one", "what time is it", "thanks for letting me know",
    "I need to check my calendar", "send me an email", "can I get a call back number", "what's your name again",
    "I'm driving right now", "yes that's correct", "no thank you", "one moment please",
]
HELD_HARD = [
    "I'll call you right back", "stop at the gas station", "take me to the store", "put me through to a manager",
    "please call again next week", "remove the stain with vinegar", "don't forget to call your mother",
    "I'm on a call right now", "you can take it off my bill", "put my name on the waiting list",
    "stop talking and listen", "never mind, call me tomorrow", "I want to opt in", "sign me up for the list",
    "give me a call on my cell", "I'll stop by later", "take your time", "call me whenever you like",
    "my list of questions is long", "the number you called is correct", "please continue calling me about this",
    "do call me again next month", "don't hang up", "remove the lid and stir", "I want more calls like this",
    "keep me on your list", "add my wife to the list", "stop, I want to hear more",
    "I can't take calls at work, call me at home", "calling me is fine", "the do not enter sign is broken",
    "please don't stop", "can you take a message", "never say never",
]
HELD_PLAIN = [
    "good morning", "who's calling please", "yes this is she", "I'm in a meeting", "what do you want",
    "that sounds interesting", "could you speak up", "I didn't hear you", "how long will this take",
    "is there a fee", "which bank is this", "let me grab a pen", "my husband is not home", "is this about my order",
    "alright", "I have a question", "what day is good for you", "thank you very much", "let me think",
    "can you mail me the details", "what's the website", "spell that for me", "I'm cooking dinner",
    "that's right", "no, not today", "hold on a second", "where are you calling from", "are you a real person",
    "my account number is four five six", "I paid that bill last week", "the weather is lovely today",
    "I just got home", "the kids are asleep", "can you hear me now", "the line is bad", "I'm at the doctor",
    "yes I got your letter", "I'd like to know the price", "how did you get this number", "it's a bad time",
    "I'm on my lunch break", "what's the offer", "do you have a discount", "I'm retired", "my phone is dying",
    "I'll ask my son", "is it free", "what is your address", "I have no idea", "sure why not",
    "I'm listening", "go on", "that's too expensive", "maybe next year", "I need more information",
    "can I pay by card", "what are your hours", "I live alone", "my dog is barking", "I moved last month",
    "the package never arrived", "I'll be home after six", "you have the wrong person",
    "nobody by that name lives here",
    "I don't understand", "please speak slowly", "I can't talk long", "that's fine with me", "let's do it",
]
TEST_OPTOUT = [
    "quit phoning this number", "please take my name off your call list", "I do not want you to call me anymore",
    "remove me from your database", "stop calling my phone", "you need to stop calling me",
    "do not call this number again", "I want you to stop calling", "please put me on your no call list",
    "take this number off your list", "I'm not interested, stop calling me", "never call this number again",
    "please quit calling", "stop contacting this number", "I don't want to be called again",
    "delete me from your list", "I want off your calling list", "can you stop calling me please",
    "please do not call again", "no more phone calls", "remove my phone number", "unsubscribe this number",
    "don't ever contact me again", "I want to be taken off your list",
]
TEST_HARD = [
    "call me after lunch", "stop the music please", "take me off hold", "put me on the list for the party",
    "don't call the police", "remove my jacket from the car", "I never got your last call",
    "I'm not taking calls after nine", "stop by anytime", "please call my number tomorrow",
    "you can put me down for two", "take the list with you", "can you call me on my other number",
    "I want you to call me back", "don't stop the payments", "my name is on the list already",
    "please keep calling", "no more questions, thank you", "delete the old photos", "I'm calling about my bill",
    "the contact form is broken", "never forget to call", "remove the battery and try again",
    "put my number on file", "I can't stop laughing", "can you take the call", "stop, let me get a pen",
    "quit your job", "do not forget to write", "I'll be off the phone soon", "take care, call again",
    "call me when you can", "I don't want to miss your call", "put it on my account", "off the record, I like it",
]
TEST_PLAIN = [
    "hi there", "speaking", "who am I talking to", "I'm at work", "what's this regarding", "okay", "pardon",
    "say that again", "what's the catch", "how long is the contract", "I'll have to ask my wife", "not right now",
    "is this a sales call", "where did you get my details", "my son uses this phone", "I'm on the train",
    "the signal is weak", "can you call me back in an hour", "I'm about to board a plane", "is this urgent",
    "I'm watching the game", "yes, go ahead", "that's interesting", "what's your company called",
    "I have a few minutes", "how did you find me", "I'm not the account holder", "do you have a website",
    "I prefer email", "sorry, I'm eating", "I'll pass", "maybe later", "I'm already a customer",
    "my bill is too high", "what's the interest rate", "tell me about the warranty", "when does it start",
    "can I think it over", "I need to talk to my lawyer", "is there a contract", "the dog needs a walk",
    "I'm in the shower", "the baby is crying", "I didn't order anything", "who gave you this number",
    "which department is this", "I'll check my mail", "it's raining here", "hello, hello", "are you still there",
    "I can barely hear you", "this is a bad connection", "I just sat down", "good afternoon", "thank you, bye",
    "I'm in the car", "fine, thanks", "what was that", "one second", "sure", "I see", "right", "uh huh",
    "really", "how interesting", "where are you located", "what's the price", "I'm on vacation", "no idea",
    "send it by post",
]
TEST_VOICES = ["flite:kal16", "espeak:en-gb-x-rp+m2", "espeak:en-us+f5", "espeak:en-029+m4",
               "espeak:en-gb-scotland+f3", "espeak:en-us-nyc+f1", "espeak:en-us+david", "espeak:en-gb+linda",
               "espeak:en-us+max", "espeak:en-gb-x-gbcwmd+edward"]
TUNE_VOICES = ["flite:slt", "flite:kal", "espeak:en-us+m3", "espeak:en-gb+f2"]
HELD_VOICES = ["flite:awb", "flite:rms", "espeak:en-gb-scotland+m1", "espeak:en-029+f4", "espeak:en-us-nyc+m7",
               "espeak:en-gb-x-rp+f1", "espeak:en-us+klatt3", "espeak:en-gb-x-gbclan+m5", "espeak:en-us+Alicia",
               "espeak:en-gb-x-gbcwmd+f5"]
CONDITIONS = {
    "g711-clean": ("g711", None, 0.0),
    "gsm-clean": ("gsm", None, 0.0),
    "g711-white20": ("g711", ("white", 20.0), 0.0),
    "gsm-pink15": ("gsm", ("pink", 15.0), 0.0),
    "g711-quiet12": ("g711", ("pink", 20.0), -12.0),
}
"""name -> (channel, (noise colour, SNR dB) or None, speaker level change dB)."""


@dataclass(frozen=True)
class Clip:
    name: str
    text: str
    label: str  # optout | negative | nonspeech
    hard: bool
    voice: str
    condition: str
    split: str  # tune | held


def plan() -> list[Clip]:
    """Every clip of the corpus (deterministic)."""
    rng = random.Random(22)
    conds = list(CONDITIONS)
    clips: list[Clip] = []

    def add(text: str, label: str, hard: bool, voice: str, cond: str, split: str) -> None:
        key = hashlib.sha256(f"{text}|{voice}|{cond}|{split}".encode()).hexdigest()[:12]
        clips.append(Clip(f"{split}-{label}-{key}", text, label, hard, voice, cond, split))

    for split, voices, optouts, hard, plain in (("tune", TUNE_VOICES, TUNE_OPTOUT, TUNE_HARD, TUNE_PLAIN),
                                                ("held", HELD_VOICES, HELD_OPTOUT, HELD_HARD, HELD_PLAIN),
                                                ("test", TEST_VOICES, TEST_OPTOUT, TEST_HARD, TEST_PLAIN)):
        for i, text in enumerate(optouts):
            for j, voice in enumerate(voices):
                for k in range(3):  # each (phrase, voice) in 3 of the 5 conditions, rotating
                    add(text, "optout", False, voice, conds[(i + j + k * 2) % len(conds)], split)
        negatives = [(t, True) for t in hard] + [(t, False) for t in plain]
        for i, (text, is_hard) in enumerate(negatives):
            for j, voice in enumerate(voices):
                add(text, "negative", is_hard, voice, conds[(i + j) % len(conds)], split)
        for n in range(20 if split == "tune" else 100):
            add(f"nonspeech:{n}", "nonspeech", False, "none", conds[n % len(conds)], split)
    rng.shuffle(clips)
    return clips


# --- audio ---------------------------------------------------------------------------------------------
def _read(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64)


def _write(path: Path, pcm: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(np.clip(pcm, -32768, 32767).astype("<i2").tobytes())


def _sox(*args: str) -> None:
    subprocess.run(["sox", *args], check=True, capture_output=True)


def tts(text: str, voice: str, seed: int, workdir: Path) -> np.ndarray:
    """The text spoken by `voice`, band-limited to 300-3400 Hz at 8 kHz, peak-normalised to -3 dBFS."""
    rng = random.Random(seed)
    raw = workdir / "tts.wav"
    engine, name = voice.split(":", 1)
    if engine == "espeak":
        subprocess.run(["espeak-ng", "-v", name, "-s", str(rng.randint(135, 185)), "-p", str(rng.randint(30, 70)),
                        "-w", str(raw), text], check=True, capture_output=True)
    else:
        stretch = f"{rng.uniform(0.9, 1.2):.2f}"
        subprocess.run(["flite", "-voice", name, "--setf", f"duration_stretch={stretch}", "-t", text, "-o", str(raw)],
                       check=True, capture_output=True)
    out = workdir / "band.wav"
    _sox(str(raw), "-r", str(RATE), "-b", "16", "-c", "1", str(out), "sinc", "300-3400", "gain", "-n", "-3")
    return _read(out)


def nonspeech(n: int, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Silence, noise, tones, DTMF, ringback and music-like clips (the kind of thing a line carries)."""
    t = np.arange(int(seconds * RATE)) / RATE
    kind = n % 8
    if kind == 0:
        return rng.normal(0, 30, t.size)  # near silence
    if kind == 1:
        return rng.normal(0, 3000, t.size) * (0.5 + 0.5 * np.sin(2 * np.pi * 0.7 * t))  # breathing noise
    if kind == 2:
        f = [350, 400, 425, 440, 480, 1000, 1100, 2100][n % 8]
        return 8000 * np.sin(2 * np.pi * f * t)
    if kind == 3:  # DTMF digits
        freqs = {"1": (697, 1209), "5": (770, 1336), "9": (852, 1477), "0": (941, 1336), "#": (941, 1477)}
        out = np.zeros(t.size)
        for i, d in enumerate(rng.choice(list(freqs), size=6)):
            lo, hi = freqs[str(d)]
            start, end = int(i * 0.25 * RATE), int((i * 0.25 + 0.12) * RATE)
            seg = t[start:end]
            out[start:end] = 6000 * (np.sin(2 * np.pi * lo * seg) + np.sin(2 * np.pi * hi * seg))
        return out
    if kind == 4:  # ringback / busy cadence
        on = (t % 1.0) < 0.5
        return 6000 * on * (np.sin(2 * np.pi * 480 * t) + np.sin(2 * np.pi * 620 * t))
    # music: melodies of harmonic notes, some with a beat
    notes = 220 * 2 ** (rng.integers(0, 24, size=int(seconds * 4)) / 12)
    out = np.zeros(t.size)
    per = t.size // len(notes)
    for i, f in enumerate(notes):
        seg = t[i * per:(i + 1) * per] - t[i * per]
        env = np.exp(-3 * seg)
        out[i * per:(i + 1) * per] = sum(3000 / h * np.sin(2 * np.pi * f * h * seg) for h in (1, 2, 3, 4)) * env
    if kind == 7:
        out += rng.normal(0, 1500, t.size) * ((t * 2) % 1 < 0.05)  # a drum-like click track
    return out


def _noise(colour: str, size: int, rng: np.random.Generator) -> np.ndarray:
    white = rng.normal(0, 1, size)
    if colour == "white":
        return white
    spectrum = np.fft.rfft(white)
    freqs = np.fft.rfftfreq(size, 1 / RATE)
    spectrum[1:] /= np.sqrt(freqs[1:])
    spectrum[0] = 0
    pink = np.fft.irfft(spectrum, size)
    return pink / pink.std()


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x**2))) if x.size else 0.0


def _speech_rms(x: np.ndarray) -> float:
    """RMS over the loud 20 ms frames (speech level, as SNR is usually stated)."""
    frames = x[: x.size // 160 * 160].reshape(-1, 160)
    energy = np.sqrt(np.mean(frames**2, axis=1))
    active = energy[energy > energy.max() * 0.1]
    return float(np.sqrt(np.mean(active**2))) if active.size else _rms(x)


def channel(pcm: np.ndarray, kind: str, workdir: Path) -> np.ndarray:
    """Through the phone channel: GSM 06.10 (sox) when asked, then always G.711 mu-law as the agent gets it."""
    if kind == "gsm":
        src, gsm, back = workdir / "c.wav", workdir / "c.gsm", workdir / "c2.wav"
        _write(src, pcm)
        _sox(str(src), "-r", str(RATE), "-t", "gsm", str(gsm))
        _sox("-t", "gsm", "-r", str(RATE), str(gsm), "-b", "16", str(back))
        pcm = _read(back)
    return ulaw_decode(ulaw_encode(np.clip(pcm, -32768, 32767).astype(np.int16))).astype(np.float64)


def render(clip: Clip, out_dir: Path) -> str:
    path = out_dir / f"{clip.name}.wav"
    if path.exists():
        return clip.name
    seed = int(hashlib.sha256(clip.name.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    chan, noise, level = CONDITIONS[clip.condition]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if clip.label == "nonspeech":
            body = nonspeech(int(clip.text.split(":")[1]), float(rng.uniform(1.5, 4.0)), rng)
            speech_level = 3000.0
        else:
            body = tts(clip.text, clip.voice, seed, work) * 10 ** (-6 / 20)  # a talker at about -9 dBFS peak
            speech_level = _speech_rms(body)
        body = body * 10 ** (level / 20)
        speech_level *= 10 ** (level / 20)
        stream = np.concatenate([np.zeros(int(0.6 * RATE)), body, np.zeros(int(1.2 * RATE))])
        if noise is not None:
            colour, snr = noise
            stream = stream + _noise(colour, stream.size, rng) * speech_level / 10 ** (snr / 20)
        else:
            stream = stream + rng.normal(0, 8, stream.size)  # line hiss, about -72 dBFS
        pcm = channel(stream, chan, work)
    tmp_path = path.with_suffix(".tmp")
    _write(tmp_path, pcm)
    tmp_path.rename(path)
    return clip.name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--split", choices=["tune", "held", "test", "all"], default="all")
    args = parser.parse_args()
    for tool in ("espeak-ng", "flite", "sox"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: apt-get install espeak-ng flite sox", file=sys.stderr)
            return 2
    clips = [c for c in plan() if args.split in ("all", c.split)]
    args.out.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        done = list(pool.map(render, clips, [args.out] * len(clips), chunksize=8))
    (args.out / "manifest.json").write_text(json.dumps([asdict(c) for c in plan()], indent=0))
    counts: dict[str, int] = {}
    for c in clips:
        key = f"{c.split}/{c.label}{'/hard' if c.hard else ''}"
        counts[key] = counts.get(key, 0) + 1
    print(f"{len(done)} clips in {args.out}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
