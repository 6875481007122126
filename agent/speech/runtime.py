"""Settings glue: builds the speech listener from Settings for the composition root (agent/app.py)."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

from agent.ari import AriAgent
from agent.intake import Intake
from agent.settings import Settings
from agent.speech.errors import SpeechNotInstalled
from agent.store import Store

log = logging.getLogger("agent.speech")

REQUIRED_MODULES = ("numpy", "onnxruntime", "onnx", "tokenizers", "webrtcvad")


def wanted(settings: Settings) -> bool:
    return settings.speech_enabled or settings.speech_per_call


def check_installed() -> None:
    """Raise SpeechNotInstalled naming what is missing of the `speech` extra."""
    missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise SpeechNotInstalled(f"spoken opt-out is on (SPEECH_ENABLED / SPEECH_PER_CALL) but {', '.join(missing)} "
                                 "is not installed: pip install 'optout-agent[speech]'")


def phrases(settings: Settings) -> tuple[str, ...]:
    from agent.speech.matcher import DEFAULT_PHRASES

    given = tuple(p.strip() for p in settings.speech_phrases.split(";") if p.strip())
    return given or DEFAULT_PHRASES


async def open_listener(
    settings: Settings, stack: AsyncExitStack, *, intake: Intake, ari: AriAgent, store: Store,
    publish: Callable[[dict[str, Any], str], Awaitable[bool]] | None,
) -> Any:
    """The listener (entered into `stack`), attached to `ari` as its watcher; its `run()` loads the model in
    worker processes, so nothing here waits for that.

    Raises SpeechUnavailable when the extra is missing (a model file that is not the pinned one is found and
    logged by `run()`)."""
    check_installed()
    from agent.speech.candidates import CandidateRecorder
    from agent.speech.clips import ClipKeeper
    from agent.speech.listener import SpeechListener
    from agent.speech.matcher import Matcher
    from agent.speech.pool import RecogniserPool

    listed = phrases(settings)
    pool = RecogniserPool(workers=settings.speech_workers, phrases=listed,
                          max_pending=settings.speech_max_pending or None)
    stack.push_async_callback(pool.close)
    assert settings.ari_password is not None
    listener = SpeechListener(
        url=settings.ari_url, username=settings.ari_username, password=settings.ari_password.get_secret_value(),
        app=settings.ari_app, intake=intake, pool=pool, matcher=Matcher(phrases=listed,
                                                                         threshold=settings.speech_threshold),
        hang_up=ari.hang_up_channel, mode=settings.speech_mode, default_on=settings.speech_enabled,
        candidates=CandidateRecorder(store=store, region=settings.optout_default_region, publish=publish),
        rtp_host=settings.speech_rtp_host, rtp_port=settings.speech_rtp_port,
        clips=ClipKeeper(settings.speech_clip_dir, retention_days=settings.speech_clip_retention_days)
        if settings.speech_clip_dir else None,
    )
    await stack.enter_async_context(listener)
    ari.watcher = listener
    if settings.speech_mode == "act":
        log.warning("speech mode is `act`: utterances taken as opt-outs hang calls up and list numbers; the "
                    "measured accuracy (README, Spoken opt-out) did not meet its targets on held-apart audio")
    return listener
