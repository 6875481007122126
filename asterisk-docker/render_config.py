#!/usr/bin/env python3
"""Render the sandbox's Asterisk configuration from the environment.

Usage: render_config.py OUT_DIR [SOURCE_DIR ...]

Every ``*.conf`` in the source directories (default: ``asterisk-docker/conf`` and ``dialplan``,
the latter rendered into ``OUT_DIR/dialplan``) is copied to OUT_DIR with ``${NAME}`` replaced
for the NAMES listed in ``settings()`` only. Any other ``${...}`` is Asterisk's own dialplan
syntax and is left alone. Files are written mode 600 because they carry the ARI and AMI secrets.

Used by ``asterisk-docker/sandbox`` (chroot) and by the Dockerfile's entrypoint, so the two
run the same configuration.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCES = (HERE / "conf", HERE.parent / "dialplan")
PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


class ConfigError(Exception):
    """A variable is missing or malformed; the message names it."""


def _secret(name: str, required: bool) -> str | None:
    """Read NAME from the environment, or from the file named by NAME_FILE."""
    value = os.environ.get(name)
    path = os.environ.get(f"{name}_FILE")
    if not value and path:
        try:
            value = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{name}_FILE={path!r} cannot be read: {exc}") from exc
    if not value and required:
        raise ConfigError(f"{name} is not set (set {name} or {name}_FILE); there is no default")
    if value and any(c in value for c in "\r\n;"):
        raise ConfigError(f"{name} must not contain a newline or ';' (Asterisk config syntax)")
    return value or None


def _port(name: str, default: str) -> str:
    value = os.environ.get(name) or default
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ConfigError(f"{name}={value!r} is not a TCP/UDP port number")
    return value


def settings() -> dict[str, str]:
    """The placeholder values, from the same variable names the agent and tests read."""
    ari_url = os.environ.get("ARI_URL") or "http://127.0.0.1:8088"
    parts = urlsplit(ari_url)
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError(f"ARI_URL={ari_url!r} must look like http://127.0.0.1:8088")
    ami_secret = _secret("AMI_SECRET", required=False)
    rtp_start = _port("SANDBOX_RTP_START", "20000")
    rtp_end = _port("SANDBOX_RTP_END", "20999")
    if int(rtp_start) >= int(rtp_end):
        raise ConfigError(f"SANDBOX_RTP_START={rtp_start} must be below SANDBOX_RTP_END={rtp_end}")
    return {
        "ARI_HTTP_BINDADDR": parts.hostname,
        "ARI_HTTP_BINDPORT": str(parts.port or 80),
        "ARI_USERNAME": os.environ.get("ARI_USERNAME") or "optout",
        "ARI_PASSWORD": _secret("ARI_PASSWORD", required=True) or "",
        "ARI_APP": os.environ.get("ARI_APP") or "optout-agent",
        "AMI_ENABLED": "yes" if ami_secret else "no",
        "AMI_HOST": os.environ.get("AMI_HOST") or "127.0.0.1",
        "AMI_PORT": _port("AMI_PORT", "5038"),
        "AMI_USERNAME": os.environ.get("AMI_USERNAME") or "optout",
        # AMI stays disabled without a secret; the random one only keeps the file well-formed.
        "AMI_SECRET": ami_secret or secrets.token_urlsafe(24),
        "AGI_HOST": os.environ.get("AGI_HOST") or "127.0.0.1",
        "AGI_PORT": _port("AGI_PORT", "4573"),
        "SANDBOX_SIP_PORT": _port("SANDBOX_SIP_PORT", "5160"),
        "SANDBOX_RTP_START": rtp_start,
        "SANDBOX_RTP_END": rtp_end,
    }


def render_text(text: str, values: dict[str, str]) -> str:
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def render(out_dir: Path, sources: list[Path]) -> None:
    values = settings()
    out_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(out_dir, 0o700)
    for source in sources:
        # The dialplan files go to OUT_DIR/dialplan: extensions.conf includes them from there.
        target = out_dir / "dialplan" if source.name == "dialplan" else out_dir
        target.mkdir(exist_ok=True)
        os.chmod(target, 0o700)
        for path in sorted(source.glob("*.conf")):
            dest = target / path.name
            tmp = dest.with_suffix(".conf.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(render_text(path.read_text(), values))
            os.replace(tmp, dest)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    sources = [Path(p) for p in argv[2:]] or list(DEFAULT_SOURCES)
    try:
        render(Path(argv[1]), sources)
    except ConfigError as exc:
        print(f"render_config: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
