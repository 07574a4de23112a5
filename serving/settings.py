"""Settings: embedded defaults, then configs/tokenport.yaml (or --config), then TOKENPORT_* env.

The model catalogue lives in its own file (configs/models.yaml) and is validated here too.
Outside local mode the default secrets are refused.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

DEFAULT_SECRET = "local-dev-secret-change-me"
DEFAULT_ADMIN_TOKEN = "local-admin-token"
DEFAULT_PRICE_BOOK = Path("billing/price_books.yaml")
PACKAGE_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(Exception):
    """A configuration file or value is invalid; the message says which and why."""


class PypiGguf(BaseModel):
    package: str
    file: str


class ModelSource(BaseModel):
    pypi_gguf: PypiGguf | None = None
    hf: str | None = None
    path: str | None = None

    @model_validator(mode="after")
    def exactly_one(self) -> ModelSource:
        given = [k for k in ("pypi_gguf", "hf", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a model source needs exactly one of pypi_gguf, hf, path")
        return self


class WorkerSpec(BaseModel):
    id: str
    port: int | None = Field(default=None, ge=1, le=65535)
    base_url: str | None = None
    region: str = "local"
    # A router in front of the engines (vLLM production-stack router, an InferencePool behind Envoy):
    # health from `health_path`, no /metrics scrape, never ejected, not reconciled (README: Running a fleet).
    router: bool = False
    health_path: str = Field(default="/health", pattern=r"^/[A-Za-z0-9._~/-]*$")

    @model_validator(mode="after")
    def port_or_url(self) -> WorkerSpec:
        if (self.port is None) == (self.base_url is None):
            raise ValueError(f"worker {self.id!r} needs exactly one of port (launched here) or base_url")
        return self

    @property
    def launched(self) -> bool:
        return self.port is not None

    def url(self) -> str:
        if self.base_url is not None:
            return self.base_url.rstrip("/")
        return f"http://127.0.0.1:{self.port}"


class ModelSpec(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
    source: ModelSource | None = None
    dtype: str = "bfloat16"
    max_model_len: int = 2048
    worker_args: list[str] = []
    workers: list[WorkerSpec] = []
    # `generate` (chat, completions, responses) or `embedding` (vLLM's pooling runner: /v1/embeddings)
    kind: Literal["generate", "embedding"] = "generate"
    # Serve the weights prepared for another catalogue model (e.g. an embedding variant of a chat model).
    weights_from: str | None = None
    enabled: bool = True  # false: listed here but not served (an opt-in worker, see configs/models.yaml)
    # vLLM's tool-call parser for this model's chat template (e.g. `hermes`): tool calls, named and `auto`
    # (`--enable-auto-tool-choice --tool-call-parser X`); without one vLLM answers 400 to `tool_choice`.
    tool_call_parser: str | None = Field(default=None, pattern=r"^[a-z0-9_]+$")

    # The languages this model serves well, each with a rank (1 = the first choice for that language):
    # a routed model name (`routes`) sends a request in one of them here (serving/proxy/language_routing.py);
    # GET /v1/models lists them.
    languages: dict[str, int] = {}

    @field_validator("languages", mode="before")
    @classmethod
    def _as_ranks(cls, value: object) -> object:
        """A plain list of codes (`languages: [ru, kk]`) ranks each of them 1."""
        return dict.fromkeys(value, 1) if isinstance(value, list) else value

    @field_validator("languages")
    @classmethod
    def _ranks(cls, value: dict[str, int]) -> dict[str, int]:
        bad = [
            k
            for k, v in value.items()
            if not (len(k) == 2 and k.isascii() and k.isalpha() and k.islower())
            or isinstance(v, bool)
            or v < 1
        ]
        if bad:
            raise ValueError(f"languages maps ISO 639-1 codes to a rank >= 1 (1 = first choice), got {bad}")
        return value


class RouteSpec(BaseModel):
    """A routed model name (e.g. `auto`): each request goes to the best-ranked served model for its
    language."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
    models: list[str] | None = None  # the candidates (default: every model that states its languages)
    fallback: str | None = None  # when no candidate serves the language (default: default_model)


class Catalogue(BaseModel):
    default_model: str | None = None
    models: list[ModelSpec] = []
    routes: list[RouteSpec] = []

    @model_validator(mode="after")
    def unique(self) -> Catalogue:
        names = [m.name for m in self.models]
        if len(names) != len(set(names)):
            raise ValueError("model names must be unique")
        ids = [w.id for m in self.models for w in m.workers]
        if len(ids) != len(set(ids)):
            raise ValueError("worker ids must be unique across models")
        if self.default_model is not None and self.default_model not in names:
            raise ValueError(f"default_model {self.default_model!r} is not in models")
        routes = [r.name for r in self.routes]
        if len(routes) != len(set(routes)) or set(routes) & set(names):
            raise ValueError("route names must be unique and differ from every model name")
        for r in self.routes:
            unknown = [
                m for m in [*(r.models or []), *([r.fallback] if r.fallback else [])] if m not in names
            ]
            if unknown:
                raise ValueError(f"route {r.name!r} names models not in models: {unknown}")
        for m in self.models:
            if m.weights_from is not None:
                base = self.get(m.weights_from)
                if base is None or base.weights_from is not None or base is m:
                    raise ValueError(
                        f"model {m.name!r}: weights_from {m.weights_from!r} must name another "
                        "catalogue model that has weights of its own"
                    )
                if m.source is None:
                    m.source = base.source
        return self

    def get(self, name: str) -> ModelSpec | None:
        for m in self.models:
            if m.name == name:
                return m
        return None


class GatewaySettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    origin_country_header: str = "X-Client-Country"
    # Which worker of a model takes a request (serving/proxy/routing.py): least_loaded, or
    # prefix_affinity (a conversation's requests to the worker whose prefix cache holds it).
    routing: Literal["least_loaded", "prefix_affinity"] = "least_loaded"
    # This request header (else the body's `user`) is the session under prefix_affinity, and it is
    # passed on to the worker (a production-stack router's session routing); null: none.
    session_header: str | None = Field(default="x-session-id", pattern=r"^[A-Za-z0-9-]{1,64}$")

    @field_validator("session_header")
    @classmethod
    def _own_header(cls, value: str | None) -> str | None:
        reserved = {"authorization", "connection", "content-length", "content-type", "cookie", "host", "te"}
        reserved |= {"transfer-encoding", "upgrade", "keep-alive", "x-request-id", "idempotency-key"}
        if value is not None and (value.lower() in reserved or value.lower().startswith("proxy-")):
            raise ValueError(f"{value!r} is a header the gateway or HTTP uses itself; name one of its own")
        return value

    request_timeout_s: float = Field(default=600.0, gt=0)
    key_cache_refresh_s: float = Field(default=0.25, gt=0)
    max_tenant_labels: int = Field(default=200, ge=1)
    # Prometheus metrics carry tenant ids, volumes and spend: never on the public port without a credential.
    # A separate listener (loopback by default; None = off, 0 = any free port) serves GET /metrics, and/or
    # the public port serves it to `Authorization: Bearer <metrics_token>` only (404 when no token is set).
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(default=9464, ge=0, le=65535)
    metrics_token: str | None = Field(default=None, min_length=16)
    # Origin country (metering/geo.py): the header counts only from these peers; then GeoIP, then the tenant.
    # Empty by default: no client sets its own origin country unless a proxy is trusted explicitly.
    trusted_proxies: list[str] = []
    geoip_db: Path | None = None  # a MaxMind-format .mmdb (GeoLite2/GeoIP2 Country or City)
    # Hostile clients (serving/limits/http_timeouts.py, serving/limits/guard.py)
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=30.0, gt=0)
    max_header_bytes: int = Field(default=65_536, ge=1024)
    keep_alive_s: float = Field(default=15.0, gt=0)
    max_connections: int | None = Field(default=None, ge=1)
    max_json_depth: int = Field(default=32, ge=2)
    max_json_values: int = Field(default=100_000, ge=10)
    max_json_keys: int = Field(default=1024, ge=8)


class BillingSettings(BaseModel):
    """The month close (README: Billing)."""

    # The one price book (billing, budgets, the spend metric), relative to the config folder.
    price_book: Path | None = None  # default billing/price_books.yaml
    # Days after a period's end before it may be finalized without --force (late usage still arrives).
    finalize_grace_days: int = Field(default=0, ge=0, le=31)


class LimitsSettings(BaseModel):
    """Rate limits, budgets and per-tenant caps (serving/limits). Per-tenant values override these."""

    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout_s: float = Field(default=0.5, gt=0)
    on_backend_error_budget: Literal["closed", "open"] = "closed"
    on_backend_error_rate: Literal["closed", "open"] = "open"
    # A ceiling for tenants without limits of their own, so every response carries OpenAI's
    # x-ratelimit-* headers; set real limits per tenant (tenants set-limits) or lower these.
    default_rpm: int | None = Field(default=1_000_000, ge=1)
    default_tpm: int | None = Field(default=1_000_000_000, ge=1)
    default_max_tokens: int | None = Field(default=None, ge=1)
    default_max_prompt_tokens: int | None = Field(default=None, ge=1)
    unknown_model_context: int = Field(default=32_768, ge=1)
    price_book: Path | None = None  # deprecated alias of billing.price_book
    content_retention_days: int = Field(default=30, ge=1)


class MeteringSettings(BaseModel):
    """The usage ledger's failure policy, idempotency keys and reconciliation (README: Metering)."""

    fail_closed: bool = False  # database down: 503 to clients instead of spooling events to data/spool
    # The longest a commit waits for the ledger database's write lock before its events go to the
    # spool (or, failing closed, before 503): a locked SQLite file or a stuck PostgreSQL lock.
    spool_after_s: float = Field(default=1.0, gt=0, le=60)
    idempotency_ttl_s: float = Field(default=86_400.0, gt=0)
    reconcile_interval_s: float = Field(default=60.0, ge=0)  # 0: the gateway exports no drift gauges
    # SQLite ledger: FULL fsyncs every group commit (an answered request's usage survives a power
    # loss); NORMAL fsyncs at checkpoints only (survives a crash of the gateway or a SIGKILL, not of
    # the machine) and takes the fsync (~0.2-0.7 ms here) off every response. PostgreSQL: ignored.
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    # Languages a request's prompt is attributed to (ISO 639-1 codes py3langid knows); null: the
    # markets' default set in metering/language.py. Fewer languages: faster detection, less memory.
    languages: list[str] | None = None

    @field_validator("languages")
    @classmethod
    def _languages(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            bad = [v for v in value if not (len(v) == 2 and v.isascii() and v.isalpha() and v.islower())]
            if bad or not value:
                raise ValueError(
                    f"metering.languages must be ISO 639-1 codes such as 'en', 'kk', got {bad or value}"
                )
        return value


class BatchSettings(BaseModel):
    """The Batch API (serving/batches/): uploads, and how batch lines yield to live traffic."""

    max_file_bytes: int = Field(default=100 * 1024 * 1024, ge=1024)  # one uploaded file
    max_lines: int = Field(default=50_000, ge=1)  # lines per batch input file (OpenAI's limit)
    concurrency: int = Field(default=1, ge=1, le=64)  # batch lines in flight per gateway process
    live_inflight_max: int = Field(default=0, ge=0)  # a line waits while more live requests run on its model
    poll_s: float = Field(default=1.0, gt=0)  # how often the runner looks for work
    retry_s: float = Field(default=2.0, gt=0)  # a line put back (rate limited, no worker) waits this long


class WorkerSettings(BaseModel):
    command: list[str] = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    env: dict[str, str] = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    health_interval_s: float = Field(default=2.0, gt=0)
    # Workers beside the catalogue's, re-read when the file changes; `resolve: true` entries are
    # looked up in DNS every refresh_s (serving/proxy/discovery.py). Relative to the config folder.
    file: Path | None = None
    refresh_s: float = Field(default=5.0, gt=0)
    # Outlier ejection (serving/proxy/pool.py): this many failed requests in a row eject a worker for
    # eject_base_s, doubled at each ejection in a row up to eject_max_s.
    eject_after_failures: int = Field(default=3, ge=1, le=1000)
    eject_base_s: float = Field(default=5.0, gt=0)
    eject_max_s: float = Field(default=300.0, gt=0)
    start_timeout_s: float = Field(default=900.0, gt=0)
    restart_backoff_max_s: float = Field(default=60.0, gt=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOKENPORT_", env_nested_delimiter="__", extra="forbid")
    _yaml_file: ClassVar[Path | None] = None

    mode: Literal["local", "production"] = "local"
    data_dir: Path = Path("data")
    database_url: str | None = None
    models_file: Path = Path("models.yaml")
    secret_key: str = DEFAULT_SECRET
    admin_token: str = DEFAULT_ADMIN_TOKEN
    gateway: GatewaySettings = GatewaySettings()
    workers: WorkerSettings = WorkerSettings()
    limits: LimitsSettings = LimitsSettings()
    billing: BillingSettings = BillingSettings()
    metering: MeteringSettings = MeteringSettings()
    batches: BatchSettings = BatchSettings()
    # Filled in by load(): the validated model catalogue and extra workers given on the command line.
    catalogue: Catalogue = Catalogue()
    config_dir: Path = PACKAGE_CONFIG_DIR

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=cls._yaml_file))
        return tuple(sources)

    @field_validator("data_dir")
    @classmethod
    def absolute_data_dir(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @model_validator(mode="after")
    def refuse_default_secrets(self) -> Settings:
        if self.mode != "local":
            if self.secret_key == DEFAULT_SECRET or len(self.secret_key) < 32:
                raise ValueError(
                    "production mode needs TOKENPORT_SECRET_KEY (32+ characters, not the default)"
                )
            if self.admin_token == DEFAULT_ADMIN_TOKEN or len(self.admin_token) < 24:
                raise ValueError(
                    "production mode needs TOKENPORT_ADMIN_TOKEN (24+ characters, not the default)"
                )
        return self

    @property
    def price_book_path(self) -> Path:
        """The one price book: billing.price_book, else the deprecated limits.price_book, else
        billing/price_books.yaml; relative paths from the config folder."""
        path = self.billing.price_book or self.limits.price_book or DEFAULT_PRICE_BOOK
        return path if path.is_absolute() else self.config_dir / path

    @property
    def production_ready(self) -> bool:
        """The secrets production mode requires are set (not the defaults, long enough)."""
        return (
            self.secret_key != DEFAULT_SECRET
            and len(self.secret_key) >= 32
            and self.admin_token != DEFAULT_ADMIN_TOKEN
            and len(self.admin_token) >= 24
        )

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'tokenport.db'}"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"


def default_config_file() -> Path | None:
    env = os.environ.get("TOKENPORT_CONFIG")
    if env:
        return Path(env)
    for candidate in (Path.cwd() / "configs" / "tokenport.yaml", PACKAGE_CONFIG_DIR / "tokenport.yaml"):
        if candidate.is_file():
            return candidate
    return None


def _load_catalogue(path: Path) -> Catalogue:
    if not path.is_file():
        return Catalogue()
    try:
        data: Any = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return Catalogue.model_validate(data)
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build validated settings; raises ConfigError naming the file and field that is wrong."""
    path = config_file if config_file is not None else default_config_file()
    if path is not None and not path.is_file():
        raise ConfigError(f"configuration file not found: {path}")
    Settings._yaml_file = path
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(f"{path or 'settings'}: {exc}") from exc
    finally:
        Settings._yaml_file = None
    config_dir = path.parent.resolve() if path is not None else PACKAGE_CONFIG_DIR
    models_path = (
        settings.models_file if settings.models_file.is_absolute() else config_dir / settings.models_file
    )
    if "catalogue" not in overrides:
        catalogue = _load_catalogue(models_path)
        catalogue.models = [m for m in catalogue.models if m.enabled]  # disabled models are not served
        settings.catalogue = catalogue
    settings.config_dir = config_dir
    return settings


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address (0.0.0.0 and :: are every interface, not loopback)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(settings: Settings, host: str) -> list[str]:
    """Whether the gateway may listen on `host` (and its metrics listener on gateway.metrics_host).

    Local mode with the default secrets binds loopback only: a non-loopback address is refused
    (ConfigError) unless the production secrets are set, so the default admin token never faces a
    network. On loopback the default admin token works, with a warning (returned)."""
    hosts = [host] + ([settings.gateway.metrics_host] if settings.gateway.metrics_port is not None else [])
    exposed = [h for h in hosts if not is_loopback(h)]
    if exposed and not settings.production_ready:
        raise ConfigError(
            f"refusing to listen on {', '.join(exposed)}: local mode with the default secrets binds "
            "loopback only "
            "(127.0.0.1, ::1). To listen on a network, set TOKENPORT_SECRET_KEY (32+ characters) and "
            "TOKENPORT_ADMIN_TOKEN (24+ characters), or run mode: production."
        )
    if settings.admin_token == DEFAULT_ADMIN_TOKEN:
        warning = (
            f"the admin API accepts the default token {DEFAULT_ADMIN_TOKEN!r}: anyone on this "
            "machine can administer the gateway (set TOKENPORT_ADMIN_TOKEN)"
        )
        return [warning]
    return []
