"""Errors of the speech package.

    OptOutError (agent/errors.py)
     +-- SpeechUnavailable        spoken opt-out was asked for but cannot run
          +-- SpeechNotInstalled  the `speech` extra (onnxruntime, tokenizers, the model packages) is missing
          +-- ModelFileMismatch   a model file is missing or its SHA-256 is not the pinned one (names the file)

A speech error never stops the agent's key-press path: the composition root logs it and runs without speech.
"""

from __future__ import annotations

from agent.errors import OptOutError


class SpeechUnavailable(OptOutError):
    """Spoken opt-out cannot run (see the subclasses); the DTMF path is not affected."""


class SpeechNotInstalled(SpeechUnavailable):
    """A package of the `speech` extra is missing: `pip install 'optout-agent[speech]'`."""


class ModelFileMismatch(SpeechUnavailable):
    """A model file is missing or is not the pinned file (its SHA-256 differs)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"speech model file {path}: {problem}")
        self.path = path
        self.problem = problem

    def __reduce__(self) -> tuple[type[ModelFileMismatch], tuple[str, str]]:
        return type(self), (self.path, self.problem)  # so it crosses back from a worker process
