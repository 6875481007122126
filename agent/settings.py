"""The agent's configuration: one `Settings`, read from the environment (and `*_FILE` files for secrets).

Every variable, its default and whether it is required is listed in the README's configuration reference.
Library classes never read the environment; they take what they need from here as keyword arguments.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agent.constants import DEFAULT_OPTOUT_DIGIT

_SECRET_FIELDS = ("ari_password", "ami_secret", "agent_api_token", "bridge_worker_token")
MIN_TOKEN_LENGTH = 16


def default_data_dir() -> Path:
    """Where the embedded store and the journal live unless told otherwise: the same place for the agent and
    every `optout` command, whatever the working directory (`$XDG_STATE_HOME/optout-agent`)."""
    if os.environ.get("OPTOUT_DATA_DIR"):
        return Path(os.environ["OPTOUT_DATA_DIR"])
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "optout-agent"


SETTINGS_FILE = "optout.env"
"""`NAME=value` lines in the data directory that the agent and every command read under the environment
(which wins): `make run` writes the credentials it generated there, so a second shell's `optout call` finds
them. Keep it mode 600."""


class Settings(BaseSettings):
    """Everything the agent, the CLI and the SNS bridge can be told."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    # --- stores ----------------------------------------------------------------------------------
    database_url: SecretStr | None = Field(default=None, description="postgresql://... ; unset: SQLite")
    optout_data_dir: Path = Field(default_factory=default_data_dir)
    optout_db_path: Path | None = None
    """Default: OPTOUT_DATA_DIR/optout.db."""
    optout_journal_path: Path | None = None
    """Default: OPTOUT_DATA_DIR/journal.db."""
    optout_journal_sync: Literal["relaxed", "strict"] = "relaxed"
    optout_journal_retention_days: float = Field(default=7.0, gt=0)
    optout_default_region: str = "US"
    db_pool_size: int = Field(default=8, ge=1, le=100)

    redis_url: SecretStr | None = None
    redis_host: str | None = None
    redis_port: int = 6379
    redis_sentinels: str = ""
    """`host:port,host:port`: find the Redis primary through these Sentinels (instead of REDIS_URL)."""
    redis_sentinel_service: str = "optout"

    # --- behaviour ---------------------------------------------------------------------------------
    optout_digit: str = DEFAULT_OPTOUT_DIGIT
    log_level: str = "INFO"
    log_full_numbers: bool = False
    replay_interval_seconds: float = Field(default=1.0, gt=0)
    cache_sync_interval_seconds: float = Field(default=0.25, gt=0)
    cache_lease_seconds: float = Field(default=2.0, gt=0)
    health_interval_seconds: float = Field(default=2.0, gt=0)

    # --- Asterisk ----------------------------------------------------------------------------------
    ari_url: str = "http://127.0.0.1:8088"
    ari_username: str = "optout"
    ari_password: SecretStr | None = None
    ari_app: str = "optout-agent"
    ari_enabled: bool = True
    ari_hangup_connections: int = Field(default=4, ge=1, le=64)

    agi_host: str = "127.0.0.1"
    agi_port: int = 4573
    agi_enabled: bool = True

    ami_host: str | None = None
    ami_port: int = 5038
    ami_username: str | None = None
    ami_secret: SecretStr | None = None
    ami_dtmf_contexts: str = ""

    agent_http_host: str = "127.0.0.1"
    agent_http_port: int = 8080
    agent_api_token: SecretStr | None = None
    optout_dial_endpoint: str | None = None
    """The endpoint `POST /calls` dials the checked number through, e.g. `PJSIP/{number}@trunk`."""

    # --- spoken opt-out (agent/speech; the `speech` extra) ---------------------------------------------
    speech_enabled: bool = False
    """Listen to callees on ARI calls; a call's OPTOUT_SPEECH variable (1/0) overrides it either way."""
    speech_per_call: bool = False
    """Run the listener even with SPEECH_ENABLED false, for calls that set OPTOUT_SPEECH=1."""
    speech_mode: Literal["flag", "act"] = "flag"
    """`flag`: record and publish a candidate, hang nothing up; `act`: honour it like a press."""
    speech_phrases: str = ""
    """Phrases separated by `;` (empty: agent/speech/matcher.py DEFAULT_PHRASES)."""
    speech_threshold: float = Field(default=0.8, gt=0, le=1)
    speech_workers: int = Field(default=1, ge=1, le=64)
    speech_max_pending: int = Field(default=0, ge=0, le=1024)
    """Utterances waiting or running at once before new ones are shed (0: twice the workers)."""
    speech_rtp_host: str = "127.0.0.1"
    speech_rtp_port: int = Field(default=0, ge=0, le=65535)
    """The UDP port Asterisk sends callee audio to (0: any free port)."""
    speech_clip_dir: Path | None = None
    """Keep each utterance's audio here (personal data: off by default)."""
    speech_clip_retention_days: float = Field(default=7.0, gt=0)

    # --- SNS ----------------------------------------------------------------------------------------
    optout_events_topic_arn: str | None = None
    aws_endpoint_url: str | None = None
    aws_region: str = "us-east-1"

    bridge_http_host: str = "127.0.0.1"
    bridge_http_port: int = 8090
    bridge_sqs_queue_url: str | None = None
    bridge_topic_arns: str = ""
    bridge_max_message_age_seconds: int = 3600
    bridge_max_body_bytes: int = 256 * 1024
    asterisk_worker_url: str | None = None
    bridge_worker_token: SecretStr | None = None

    @classmethod
    def load(cls) -> Settings:
        """The settings of this machine: the environment, over the data directory's `optout.env` if any."""
        return cls(_env_file=default_data_dir() / SETTINGS_FILE)

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_files(cls, data: Any) -> Any:
        """`NAME_FILE=/path` supplies the secret NAME from a file (Docker/systemd credentials)."""
        if not isinstance(data, dict):
            return data
        for name in _SECRET_FIELDS:
            path = os.environ.get(f"{name.upper()}_FILE")
            if path and not data.get(name) and not os.environ.get(name.upper()):
                data[name] = Path(path).read_text(encoding="utf-8").strip()
        return data

    @model_validator(mode="after")
    def _paths(self) -> Settings:
        if self.optout_db_path is None:
            self.optout_db_path = self.optout_data_dir / "optout.db"
        if self.optout_journal_path is None:
            self.optout_journal_path = self.optout_data_dir / "journal.db"
        if self.cache_lease_seconds <= self.cache_sync_interval_seconds:
            raise ValueError("CACHE_LEASE_SECONDS must be longer than CACHE_SYNC_INTERVAL_SECONDS")
        return self

    @field_validator("agent_api_token", "bridge_worker_token")
    @classmethod
    def _long_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_TOKEN_LENGTH:
            raise ValueError(f"must be at least {MIN_TOKEN_LENGTH} characters (a bearer token anyone could guess "
                             "is no protection)")
        return value

    @property
    def db_path(self) -> Path:
        assert self.optout_db_path is not None
        return self.optout_db_path

    @property
    def journal_path(self) -> Path:
        assert self.optout_journal_path is not None
        return self.optout_journal_path

    @field_validator("optout_digit")
    @classmethod
    def _one_digit(cls, value: str) -> str:
        if len(value) != 1 or value not in "0123456789*#":
            raise ValueError(f"OPTOUT_DIGIT must be one DTMF digit (0-9, * or #), got {value!r}")
        return value

    @field_validator("optout_default_region")
    @classmethod
    def _region_upper(cls, value: str) -> str:
        return value.upper()

    @property
    def redis_dsn(self) -> str | None:
        """The Redis URL, from REDIS_URL or REDIS_HOST/REDIS_PORT; None when Redis is not configured."""
        if self.redis_url is not None:
            return self.redis_url.get_secret_value()
        if self.redis_host:
            return f"redis://{self.redis_host}:{self.redis_port}/0"
        return None

    @field_validator("redis_sentinels")
    @classmethod
    def _host_ports(cls, value: str) -> str:
        for item in filter(None, (i.strip() for i in value.split(","))):
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{item!r} is not host:port")
        return value

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        """REDIS_SENTINELS as (host, port) pairs."""
        pairs = (i.strip().rpartition(":") for i in self.redis_sentinels.split(",") if i.strip())
        return [(host, int(port)) for host, _, port in pairs]

    @property
    def ami_contexts(self) -> frozenset[str]:
        return frozenset(c.strip() for c in self.ami_dtmf_contexts.split(",") if c.strip())

    @property
    def topic_allow_list(self) -> frozenset[str]:
        return frozenset(a.strip() for a in self.bridge_topic_arns.split(",") if a.strip())
