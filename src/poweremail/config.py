"""One validated settings object: command-line flags > ``POWEREMAIL_*`` environment > defaults.

Built by :func:`load_settings` (never at import time) so that tests and every CLI command get their
own. SPEC §6 lists the main flags. Every field here is both a flag (``--api-port``) and an
environment variable (``POWEREMAIL_API_PORT``): the CLI builds its flags from these fields.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Role = Literal["api", "smtp", "delivery"]
ALL_ROLES: tuple[Role, ...] = ("api", "smtp", "delivery")
MiB = 1024 * 1024

# The fields every command takes; the others belong to `serve`.
COMMON_FIELDS = ("data_dir", "database_url", "secret_key_file", "log_level")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="POWEREMAIL_", extra="forbid", frozen=True)

    # --- every command ---
    data_dir: Path = Field(Path("./data"), description="SQLite store, generated key and certificate")
    # A SecretStr because a PostgreSQL URL can carry a password.
    database_url: SecretStr | None = Field(
        None, description="sqlite:///PATH or postgresql://USER@HOST:PORT/DB"
    )
    secret_key_file: Path | None = Field(
        None, description="keyring encrypting SMTP passwords (DATA_DIR/secret.key)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="DEBUG|INFO|WARNING|ERROR"
    )

    # --- serve: roles and listeners ---
    roles: Annotated[tuple[Role, ...], NoDecode] = Field(
        ALL_ROLES, description="comma-separated subset of api,smtp,delivery"
    )
    api_host: str = "127.0.0.1"
    api_port: int = Field(8080, ge=0, le=65535)
    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(2525, ge=0, le=65535, description="submission port, STARTTLS")
    smtps_port: int = Field(2465, ge=0, le=65535, description="implicit-TLS submission port")

    # --- serve: SMTP submission ---
    hostname: str = Field(default_factory=socket.getfqdn, description="name in the SMTP banner and headers")
    tls_cert: Path | None = Field(None, description="PEM certificate (chain); self-signed if unset")
    tls_key: Path | None = Field(None, description="PEM private key for --tls-cert")
    max_message_size: int = Field(25 * MiB, ge=1024, description="bytes; advertised as SIZE")
    # Issue 5: one large upload must not stall the other sessions (smtp/bulk_data.py).
    large_message_rate: int = Field(
        32 * MiB, ge=0, description="bytes/s read of messages past their first MiB, all together; 0: no limit"
    )
    # SPEC §4: AUTH only after TLS, except to loopback clients (configurable).
    plaintext_auth_on_loopback: bool = Field(True, description="offer AUTH before TLS to loopback clients")
    smtp_idle_timeout: float = Field(300, gt=0, description="seconds a session may sit idle")
    smtp_session_timeout: float = Field(3600, gt=0, description="seconds a session may last in all")
    max_connections_per_address: int = Field(
        50, ge=1, description="concurrent SMTP sessions per client address"
    )
    failed_logins_per_address: int = Field(
        10, ge=1, description="failures in the window before an address waits"
    )
    failed_login_window: float = Field(600, gt=0, description="seconds")
    failed_login_block: float = Field(
        600, gt=0, description="seconds an address waits after too many failures"
    )
    failed_login_delay: float = Field(
        1.0, ge=0, description="seconds added per recent failure before answering 535"
    )
    # Issue 6: guessing one user's password from many addresses. Per node, like the above.
    failed_logins_per_user: int = Field(
        30, ge=1, description="failed logins per SMTP user name in the window; then new addresses get 454"
    )
    failed_login_user_window: float = Field(
        600, gt=0, description="seconds over which --failed-logins-per-user come back"
    )

    # Pre-forked processes sharing the node's listening sockets (poweremail.supervisor): one
    # Python process uses about one core (the GIL), so this is how a node uses more.
    workers: int = Field(
        1, ge=1, le=64, description="processes serving this node, sharing its ports (one per core)"
    )
    # Issue 5: delivery in processes of its own, as Postal splits smtp and worker; measured (paired
    # runs, 1 KB, 2 cores), 32% more mail accepted on SQLite and 49% on PostgreSQL than in one process.
    delivery_workers: int = Field(
        0, ge=0, le=64, description="extra processes that only deliver; the --workers ones then do not"
    )

    shutdown_grace: float = Field(
        30, ge=0, description="seconds open SMTP transactions and deliveries get to finish on SIGTERM"
    )

    # --- serve: delivery (SPEC §5) ---
    relay: str | None = Field(None, description="HOST:PORT to deliver everything through (else by MX)")
    relay_user: str | None = Field(None, description="login name at the relay")
    relay_password: SecretStr | None = Field(None, description="password at the relay")
    relay_tls: Literal["none", "starttls", "tls"] = Field(
        "starttls", description="none|starttls|tls toward the relay (certificate verified)"
    )
    relay_ca_file: Path | None = Field(
        None, description="PEM CA bundle to verify the relay's certificate (system CAs if unset)"
    )
    dns_server: str | None = Field(None, description="HOST:PORT of the DNS server for MX lookups")
    smtp_out_port: int = Field(25, ge=1, le=65535, description="port of the destination MX hosts")
    smtp_out_timeout: float = Field(60, gt=0, description="seconds to wait for each remote reply")
    retry_delays: Annotated[tuple[float, ...], NoDecode] = Field(
        (60, 300, 900, 1800, 3600),
        min_length=1,
        description="seconds between attempts, comma-separated; the last repeats",
    )
    max_message_age: float = Field(
        2 * 24 * 3600, gt=0, description="seconds a recipient is retried before it bounces"
    )
    delivery_concurrency: int = Field(50, ge=1, description="SMTP transactions in flight per node")
    max_connections_per_destination: int = Field(
        10, ge=1, description="open connections per relay or recipient domain"
    )
    delivery_lease: float = Field(
        60, gt=0, description="seconds a claimed recipient stays claimed without a renewal"
    )
    delivery_poll_interval: float = Field(
        1.0, gt=0, description="seconds between looks for due mail queued by other nodes"
    )
    node_name: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=100,
        description="unique per node: whose delivery leases are whose",
    )

    @field_validator("roles", mode="before")
    @classmethod
    def _split_roles(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("retry_delays", mode="before")
    @classmethod
    def _split_delays(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("retry_delays")
    @classmethod
    def _positive_delays(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(delay <= 0 for delay in value):
            raise ValueError("every retry delay must be more than 0 seconds")
        return value

    @field_validator("workers", "delivery_workers", mode="before")
    @classmethod
    def _whole_workers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic would take "2.0" (or True) for 2; a count of processes is written as digits.
        if isinstance(value, bool) or (isinstance(value, str) and not value.strip().isdigit()):
            lowest = 1 if info.field_name == "workers" else 0
            raise ValueError(f"must be a whole number from {lowest} to 64")
        return value

    @field_validator("relay", "dns_server")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        if value is not None:
            parse_host_port(value)
        return value

    @model_validator(mode="after")
    def _relay_login_is_safe(self) -> Settings:
        if (self.relay_user is None) != (self.relay_password is None):
            raise ValueError("--relay-user and --relay-password go together")
        if self.relay_user is not None and self.relay_tls == "none" and self.relay is not None:
            host, _port = parse_host_port(self.relay)
            if not _is_loopback(host):
                raise ValueError(
                    "--relay-tls none would send the relay password in clear; use starttls or tls"
                )
        return self

    @model_validator(mode="after")
    def _delivery_workers_have_work(self) -> Settings:
        if self.delivery_workers and "delivery" not in self.roles:
            raise ValueError("--delivery-workers needs the delivery role in --roles")
        if self.delivery_workers and set(self.roles) == {"delivery"}:
            raise ValueError("--delivery-workers leaves --workers nothing to do; use --workers alone")
        return self

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


def parse_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` → ``(host, port)``; ValueError with a readable reason."""
    host, sep, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (a port from 1 to 65535)")
    return host, int(port_text)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
