"""Every environment variable the runner reads: its name, default and check, in one place."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

import httpx
from pydantic import Field, PrivateAttr, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

from runner.agent.policy import ToolPolicy, parse_patterns
from runner.cost import DEFAULT_PRICES_FILE, Price, PriceFileError, PriceTable, load_prices
from runner.persona import DEV_SEED_SECRET
from runner.spaces import (
    DEFAULT_SPACE_MODULES_FILE,
    DEFAULT_SPACES_FILE,
    SpaceModules,
    SpacesFileError,
    load_space_modules,
)


class SettingsError(Exception):
    """A setting is wrong; the message is one line that names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    mana_api_url: str = "http://localhost:3060"
    mana_auth_url: str = "http://localhost:3001"
    # The Origin sent with every request that carries a persona's Better Auth cookie (its origin
    # check refuses such a request without a trusted one); unset: MANA_AUTH_URL's own origin.
    mana_auth_origin: str | None = None
    mana_mcp_url: str = "http://localhost:3069"
    mana_service_key: SecretStr = SecretStr("")
    # Older deployments served the same routes from mana-auth at /api/v1/internal/personas.
    mana_personas_path: str = "/api/v1/personas/internal"
    mana_retry_attempts: int = Field(default=5, ge=1, le=20)
    mana_retry_base_s: float = Field(default=0.5, ge=0)
    # Sign-ins per window for the whole process (both login endpoints count), as "N/Ws".
    # Mana's limit is 3 per 10 s per client IP; with several replicas behind one IP, divide it.
    mana_login_rate: str = "3/10s"
    # A personal space id never changes; looking it up again is only a safety net (at most daily).
    mana_space_recheck_h: float = Field(default=168, ge=24)

    anthropic_api_key: SecretStr = SecretStr("")
    anthropic_base_url: str | None = None
    anthropic_model: str = "claude-haiku-4-5"
    anthropic_max_retries: int = Field(default=4, ge=0, le=10)
    # USD per million tokens per model, dated (config/model-prices.json); read and checked at start.
    model_prices_file: Path = DEFAULT_PRICES_FILE
    llm_provider: Literal["anthropic", "scripted"] = "anthropic"
    llm_max_tokens: int = Field(default=1024, ge=64, le=8192)
    scripted_seed: str = "mana"
    # Median think time per turn of the scripted player (heavy-tailed), for benchmarks and tests.
    scripted_latency_ms: float = Field(default=0, ge=0, le=60_000)
    # Comma-separated globs on dotted tool names (`todo.*,comic.generate*`); see runner/agent/policy.py.
    persona_tools_allow: str = ""
    persona_tools_deny: str = ""
    persona_language: Literal["de", "en"] = "de"
    # Create a persona's encryption vault at first contact, as Mana's web app does at a first login.
    persona_vault_init: bool = True
    # Shared spaces (issue 15): the declared ones (`python -m runner spaces`), Mana's allowlist of modules
    # per space type (read and checked at start), the share of windows played in a shared space (0..1,
    # the same for a given window every time), and a model-free scope probe once per window.
    persona_spaces_file: Path = DEFAULT_SPACES_FILE
    persona_space_modules_file: Path = DEFAULT_SPACE_MODULES_FILE
    persona_shared_space_share: float = Field(default=0.0, ge=0, le=1)
    persona_scope_probe: bool = False

    # Spending ceilings per UTC day, in USD, summed over every replica on the journal; unset: none.
    budget_usd_per_day: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    persona_budget_usd_per_day: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    # When the fleet's budget is spent: new ticks wait for the next day, or play scripted at no cost.
    budget_exhausted: Literal["pause", "scripted"] = "pause"
    # What a tick is expected to cost when its persona has no recent tick to go by (reserved at claim).
    budget_tick_default_usd: float = Field(default=0.02, gt=0, allow_inf_nan=False)

    persona_seed_secret: SecretStr = SecretStr(DEV_SEED_SECRET)
    # At most a day: the scheduler's clock arithmetic overflows on absurd values (1e20).
    tick_interval_ms: int = Field(default=60_000, ge=100, le=86_400_000)
    persona_concurrency: int = Field(default=2, ge=1, le=256)
    persona_max_turns: int = Field(default=15, ge=1, le=100)
    persona_tick_timeout_s: float = Field(default=600, gt=0)
    persona_max_attempts: int = Field(default=3, ge=1, le=20)
    persona_retry_base_s: float = Field(default=60, ge=0)
    drain_timeout_s: float = Field(default=30, ge=0)
    # Longer than any cadence window (a day), so pruning never forgets a claim still in force.
    runner_retention_days: float = Field(default=7, ge=2)
    # Delivery: each failing batch backs off on its own, then is parked on the slow schedule.
    outbox_retry_base_s: float = Field(default=5, ge=0, le=3600)
    outbox_retry_max_s: float = Field(default=300, ge=0, le=86_400)
    outbox_park_after: int = Field(default=12, ge=1, le=1000)
    outbox_parked_retry_s: float = Field(default=1800, ge=0, le=86_400)
    # What is read from GET /due and sent to the model, bounded.
    due_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    due_max_rows: int = Field(default=5000, ge=1, le=1_000_000)
    persona_prompt_max_chars: int = Field(default=20_000, ge=100, le=1_000_000)

    runner_paused: bool = False
    runner_env: Literal["development", "production"] = "development"
    node_env: str | None = None
    port: int = Field(default=3070, ge=0, le=65535)
    # Loopback unless the operator says otherwise; the container sets 0.0.0.0 so probes and
    # Prometheus can reach it through the container network.
    http_host: str = "127.0.0.1"
    # /diag/login and /diag/tick act on Mana; off unless asked for, never in production.
    runner_diag: bool = False
    runner_state_path: Path = Path("state/runner.db")
    # A PostgreSQL journal shared by every replica (postgresql+asyncpg://user:pass@host:5432/db);
    # unset: the SQLite file above, for one process. It may hold a password: a secret.
    runner_state_url: SecretStr | None = None
    # How long a replica's claim on a running tick (and on a batch it sends) holds without renewal.
    runner_lease_s: float = Field(default=60, ge=1, le=3600)
    # OpenTelemetry's own variable: when set, each tick is one trace, exported over OTLP/HTTP.
    otel_exporter_otlp_endpoint: str | None = None
    otel_service_name: str = "persona-runner"
    # `python -m runner report`: a module regresses when its mean rating over the last
    # REPORT_RECENT_DAYS is REPORT_REGRESSION_DROP below the REPORT_PRIOR_DAYS before, with at least
    # REPORT_MIN_RATINGS ratings on each side; a finding is gone after REPORT_GONE_AFTER successes.
    report_recent_days: int = Field(default=7, ge=1, le=366)
    report_prior_days: int = Field(default=21, ge=1, le=366)
    report_regression_drop: float = Field(default=0.5, gt=0, le=4)
    report_min_ratings: int = Field(default=5, ge=1)
    report_gone_after: int = Field(default=5, ge=1)
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    _prices: PriceTable | None = PrivateAttr(default=None)
    _space_modules: SpaceModules | None = PrivateAttr(default=None)

    @field_validator(
        "mana_api_url", "mana_auth_url", "mana_mcp_url", "anthropic_base_url", "otel_exporter_otlp_endpoint"
    )
    @classmethod
    def _http_origin(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        try:
            url = httpx.URL(value)
        except (httpx.InvalidURL, ValueError) as exc:
            raise ValueError(f"not a valid URL ({str(exc)[:80]})") from None
        if not url.host:
            raise ValueError("has no host")
        if not _is_host(url.raw_host.decode("ascii", "replace")):
            # httpx takes `exa mple.com` and fails only at connect time, on every request.
            raise ValueError("its host is not a host name or an IP address")
        if url.port is not None and not 0 < url.port <= 65535:
            raise ValueError("port must be between 1 and 65535")
        return value.rstrip("/")

    @field_validator("mana_auth_origin")
    @classmethod
    def _origin(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        origin = cls._http_origin(value)
        assert origin is not None
        if httpx.URL(origin).raw_path not in (b"", b"/") or "?" in origin or "#" in origin:
            raise ValueError("must be an origin (scheme://host[:port]) without a path")
        return origin

    @field_validator("http_host")
    @classmethod
    def _bind_address(cls, value: str) -> str:
        # An IP literal or a host name; anything else would only fail later, at bind time.
        if not _is_host(value):
            raise ValueError("must be an IP address or a host name")
        return value

    @field_validator("runner_state_url")
    @classmethod
    def _state_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        try:
            url = make_url(value.get_secret_value())
        except Exception:  # noqa: BLE001 - SQLAlchemy raises several types; never echo the value
            raise ValueError("not a database URL, expected postgresql+asyncpg://user:password@host:5432/db") from None
        if url.drivername in ("postgresql", "postgres"):
            # The libpq-style URL most deployments already have: same server, through asyncpg.
            url = url.set(drivername="postgresql+asyncpg")
        if url.drivername != "postgresql+asyncpg":
            raise ValueError(
                f"driver {url.drivername!r} is not supported: use postgresql+asyncpg:// "
                "(or unset it and use RUNNER_STATE_PATH for SQLite)"
            )
        if not url.host or not url.database:
            raise ValueError("needs a host and a database name, e.g. postgresql+asyncpg://runner@db:5432/runner")
        return SecretStr(url.render_as_string(hide_password=False))

    @field_validator("mana_service_key", "anthropic_api_key")
    @classmethod
    def _header_safe(cls, value: SecretStr) -> SecretStr:
        # Both travel in HTTP headers, which carry ASCII only; never echo the value itself.
        if any(not 0x21 <= ord(ch) <= 0x7E for ch in value.get_secret_value()):
            raise ValueError("must be printable ASCII without spaces (it is sent in an HTTP header)")
        return value

    @field_validator("persona_seed_secret")
    @classmethod
    def _seed_secret_set(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("must not be empty (unset it to use the development fallback outside production)")
        return value

    @field_validator("persona_tools_allow", "persona_tools_deny")
    @classmethod
    def _tool_patterns(cls, value: str) -> str:
        parse_patterns(value)
        return value

    @field_validator("mana_login_rate")
    @classmethod
    def _login_rate(cls, value: str) -> str:
        parse_rate(value)
        return value.strip()

    @property
    def login_rate(self) -> tuple[int, float]:
        return parse_rate(self.mana_login_rate)

    @model_validator(mode="after")
    def _production_rules(self) -> Settings:
        if self.node_env == "production":
            self.runner_env = "production"
        if self.production:
            if self.persona_seed_secret.get_secret_value() == DEV_SEED_SECRET:
                raise ValueError("PERSONA_SEED_SECRET: the development fallback secret is refused in production")
            if not self.mana_service_key.get_secret_value():
                raise ValueError("MANA_SERVICE_KEY: required in production")
            if self.llm_provider == "anthropic" and not self.anthropic_api_key.get_secret_value():
                raise ValueError("ANTHROPIC_API_KEY: required in production with LLM_PROVIDER=anthropic")
            if self.runner_diag:
                raise ValueError("RUNNER_DIAG: the diagnostics endpoints are not served in production")
        return self

    @model_validator(mode="after")
    def _priced_model(self) -> Settings:
        # A model without a price would cost money the runner reports as zero: refused at start.
        try:
            self._prices = load_prices(self.model_prices_file)
        except PriceFileError as exc:
            raise ValueError(f"MODEL_PRICES_FILE: {exc}") from None
        if self.llm_provider == "anthropic" and self._prices.price(self.anthropic_model) is None:
            raise ValueError(
                f"ANTHROPIC_MODEL: no price for {self.anthropic_model!r} in {self.model_prices_file} "
                f"(as of {self._prices.as_of}); add its row there or point MODEL_PRICES_FILE at a table that has it"
            )
        return self

    @model_validator(mode="after")
    def _allowlist(self) -> Settings:
        try:
            self._space_modules = load_space_modules(self.persona_space_modules_file)
        except SpacesFileError as exc:
            raise ValueError(f"PERSONA_SPACE_MODULES_FILE: {exc}") from None
        return self

    @property
    def space_modules(self) -> SpaceModules:
        assert self._space_modules is not None, "checked at start"
        return self._space_modules

    @property
    def model_price(self) -> Price:
        """ANTHROPIC_MODEL's row of the price table (checked at start for the anthropic provider)."""
        price = self._prices.price(self.anthropic_model) if self._prices is not None else None
        if price is None:
            raise SettingsError(f"ANTHROPIC_MODEL: no price for {self.anthropic_model!r}")
        return price

    @property
    def production(self) -> bool:
        return self.runner_env == "production"

    @property
    def tool_policy(self) -> ToolPolicy:
        return ToolPolicy.from_settings(self.persona_tools_allow, self.persona_tools_deny)

    @property
    def journal_location(self) -> Path | str:
        """Where the journal lives: the PostgreSQL URL when set, else the SQLite file."""
        return self.runner_state_url.get_secret_value() if self.runner_state_url else self.runner_state_path

    def secrets(self) -> list[str]:
        """Values that must never reach a log line, an error or a metric."""
        values = [self.mana_service_key, self.anthropic_api_key, self.persona_seed_secret]
        found = [v.get_secret_value() for v in values if v.get_secret_value()]
        if self.runner_state_url is not None:
            password = make_url(self.runner_state_url.get_secret_value()).password
            if password:
                found.append(str(password))
        return found


_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?")


def _is_host(value: str) -> bool:
    """An IP literal or a DNS name (labels of letters, digits, `-` and `_` as container names use)."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return len(value) <= 253 and _HOST_NAME.fullmatch(value) is not None
    return True


_RATE = re.compile(r"\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0}


def parse_rate(text: str) -> tuple[int, float]:
    """ "3/10s" -> (3, 10.0): at most 3 per 10 seconds (units ms, s, m; seconds when none)."""
    match = _RATE.fullmatch(text)
    if match is None:
        raise ValueError("expected N/W with W in s, ms or m, e.g. 3/10s")
    count, window = int(match[1]), float(match[2]) * _UNIT_S[match[3] or "s"]
    if count < 1 or window <= 0:
        raise ValueError("needs at least 1 sign-in per window and a window above zero, e.g. 3/10s")
    return count, window


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment, turning pydantic's report into one line."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except UnicodeDecodeError as exc:
        raise SettingsError(f".env: not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from None
    except OSError as exc:
        raise SettingsError(f".env: cannot be read: {exc.strerror or exc}") from None
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]).upper()
        message = str(error["msg"]).removeprefix("Value error, ")
        if not where:
            raise SettingsError(message) from None
        # Never echo the offending value: it may be a secret.
        raise SettingsError(f"{where}: {message}") from None
