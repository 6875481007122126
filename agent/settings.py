"""The agent's configuration: one `Settings`, read from the environment (and `*_FILE` files for secrets).

Every variable, its default and whether it is required is listed in the README's configuration reference.
Library classes never read the environment; they take what they need from here as keyword arguments.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agent.constants import DEFAULT_OPTOUT_DIGIT

_SECRET_FIELDS = ("ari_password", "ami_secret", "agent_api_token", "bridge_worker_token")


class Settings(BaseSettings):
    """Everything the agent, the CLI and the SNS bridge can be told."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    # --- stores ----------------------------------------------------------------------------------
    database_url: SecretStr | None = Field(default=None, description="postgresql://... ; unset: SQLite")
    optout_db_path: Path = Path("optout.db")
    optout_journal_path: Path = Path("optout-journal.db")
    optout_default_region: str = "US"
    db_pool_size: int = Field(default=8, ge=1, le=100)

    redis_url: SecretStr | None = None
    redis_host: str | None = None
    redis_port: int = 6379

    # --- behaviour ---------------------------------------------------------------------------------
    optout_digit: str = DEFAULT_OPTOUT_DIGIT
    log_level: str = "INFO"
    log_full_numbers: bool = False
    replay_interval_seconds: float = Field(default=1.0, gt=0)
    reconcile_interval_seconds: float = Field(default=2.0, gt=0)

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

    @property
    def ami_contexts(self) -> frozenset[str]:
        return frozenset(c.strip() for c in self.ami_dtmf_contexts.split(",") if c.strip())

    @property
    def topic_allow_list(self) -> frozenset[str]:
        return frozenset(a.strip() for a in self.bridge_topic_arns.split(",") if a.strip())
