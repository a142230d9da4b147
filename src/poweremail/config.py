"""One validated settings object: command-line flags > ``POWEREMAIL_*`` environment > defaults.

Built by :func:`load_settings` (never at import time) so that tests and every CLI command get their
own. SPEC §6 lists the flags; each one is also an environment variable of the same name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Role = Literal["api", "smtp", "delivery"]
ALL_ROLES: tuple[Role, ...] = ("api", "smtp", "delivery")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="POWEREMAIL_", extra="forbid", frozen=True)

    data_dir: Path = Path("./data")
    # A SecretStr because a PostgreSQL URL can carry a password; see database_url_for_display().
    database_url: SecretStr | None = None
    secret_key_file: Path | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=0, le=65535)
    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(default=2525, ge=0, le=65535)
    smtps_port: int = Field(default=2465, ge=0, le=65535)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    relay: str | None = None

    # NoDecode: the environment gives "api,smtp", not JSON; _split_roles reads it.
    roles: Annotated[tuple[Role, ...], NoDecode] = ALL_ROLES

    @field_validator("roles", mode="before")
    @classmethod
    def _split_roles(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @property
    def effective_database_url(self) -> str:
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{(self.data_dir / 'poweremail.sqlite3').resolve()}"

    @property
    def effective_secret_key_file(self) -> Path:
        return self.secret_key_file if self.secret_key_file is not None else self.data_dir / "secret.key"


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with ``overrides`` (the flags actually given) on top.

    ``None`` values are dropped so that an absent flag never hides an environment variable.
    """
    given = {name: value for name, value in overrides.items() if value is not None}
    return Settings(**given)
