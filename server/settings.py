"""Server settings: one pydantic-settings object, read from ``CREDSCOPE_*`` environment variables.

Nested groups use ``__`` in variable names, e.g. ``CREDSCOPE_SERVER__PORT=50051`` or
``CREDSCOPE_RATE_LIMIT__PRO_PER_HOUR=2000``. Built once in ``server.main`` and passed to constructors;
nothing else reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.workers import default_workers


class ServerSettings(BaseModel):
    """Transport and process settings."""

    host: str = Field("127.0.0.1", description="Address to listen on ('0.0.0.0' or '[::]' for all interfaces).")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    workers: int = Field(default_factory=default_workers, ge=1, le=64,
                         description="Worker processes sharing the port (SO_REUSEPORT); default: the host's cores.")
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024,
                                   description="Largest request or response message accepted, in bytes.")
    max_batch_size: int = Field(1000, ge=1, le=100_000, description="Most applicants in one BatchScore call.")
    max_concurrent_streams: int = Field(256, ge=1, description="Concurrent calls per HTTP/2 connection.")
    drain_seconds: float = Field(1.0, ge=0, description="On SIGTERM, how long the server reports NOT_SERVING and "
                                 "answers new calls UNAVAILABLE (so clients and balancers move on) before it stops.")
    grace_seconds: float = Field(10.0, ge=0, description="On SIGTERM, time given to calls in flight.")
    health_check_seconds: float = Field(0.5, gt=0, description="How often the health status is re-evaluated: "
                                        "NOT_SERVING while no model is loaded or nothing can record audits.")


class TlsSettings(BaseModel):
    """Transport security. With cert_file and key_file the server speaks TLS only; with client_ca_file too,
    mutual TLS: every client must present a certificate that chains to that CA."""

    cert_file: Path | None = Field(None, description="Server certificate chain (PEM); TLS when set with key_file.")
    key_file: Path | None = Field(None, description="Private key of cert_file (PEM).")
    client_ca_file: Path | None = Field(None, description="CA certificates (PEM) client certificates must chain to; "
                                        "when set, clients without a valid certificate are refused (mutual TLS).")

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together: set both or neither")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("tls.client_ca_file (mutual TLS) needs tls.cert_file and tls.key_file")
        return self


class ModelSettings(BaseModel):
    """Which model serves."""

    model_dir: Path = Field(Path("models"), description="Model store: <dir>/<version>/model.onnx + ACTIVE file.")
    version: str | None = Field(None, description="Version to serve; the store's ACTIVE one when unset.")
    intra_op_threads: int = Field(1, ge=0, description="onnxruntime intra-op threads (0 = onnxruntime's choice).")
    batch_intra_op_threads: int = Field(2, ge=0, description="onnxruntime intra-op threads for matrices of 128+ "
                                        "rows (BatchScore): a second session; equal to intra_op_threads = none.")
    explain_threads: int = Field(2, ge=1, le=64, description="Threads per worker computing SHAP explanations, "
                                 "off the event loop (the TreeSHAP kernel releases the GIL); a batch of "
                                 "32+ rows is split over all of them.")
    inline_explain_rows: int = Field(1, ge=0, le=64, description="Explanation work of up to this many rows "
                                     "(one applicant: ~0.06 ms with the default model) runs on the event loop: "
                                     "handing it to a thread cost more CPU than the work itself (0 = always a "
                                     "thread).")
    inline_reason_rows: int = Field(128, ge=0, le=1024, description="Reason-code work (the adverse decisions of "
                                    "a call that asked for no explanation) of up to this many rows runs on the "
                                    "event loop (~6 us a row with the default model; a BatchScore of 1,000 has "
                                    "~100): a hand-off to the explain threads took longer than the work.")
    watch_seconds: float = Field(2.0, ge=0, description="How often workers check the store's ACTIVE file and "
                                 "switch to the version it names (0 = never).")
    challenger_version: str | None = Field(None, description="Champion/challenger: a model-store version that "
                                           "scores a share of traffic in shadow (audited, never returned).")
    challenger_share: float = Field(0.1, ge=0, le=1, description="Share of applicants (by a hash of the request "
                                    "id) the challenger scores, 0 to 1.")
    challenger_queue_size: int = Field(10_000, ge=1, description="Most applicants waiting for the challenger in "
                                       "a worker; past it they are dropped (and counted).")


class AuthSettings(BaseModel):
    """API-key authentication."""

    allow_anonymous: bool = Field(False, description="Dev mode: accept calls without a key as the free tier.")
    key_store_url: str = Field("sqlite:///credscope.db",
                               description="Key store: sqlite:///path or postgresql://user@host/db.")
    key_cache_seconds: float = Field(5.0, ge=0, description="How long a worker trusts a looked-up key.")
    key_stale_seconds: float = Field(60.0, ge=0, description="While the key store is down, how long a worker "
                                     "keeps accepting keys it looked up before; past it, UNAVAILABLE.")
    usage_flush_seconds: float = Field(10.0, gt=0, description="How often a worker adds its per-key call counts "
                                       "to the key store (for AdminService.GetApiKeyStats).")
    failed_auth_limit: int = Field(20, ge=0, description="Brute-force slowing: after this many failed "
                                   "authentications from one client address within failed_auth_window_seconds, "
                                   "its calls are refused (RESOURCE_EXHAUSTED, AUTH_THROTTLED) until the oldest "
                                   "failure leaves the window. Per worker process; 0 = off.")
    failed_auth_window_seconds: float = Field(60.0, gt=0, description="The window of failed_auth_limit.")
    failed_auth_max_peers: int = Field(10_000, ge=1, description="Client addresses whose failures a worker "
                                       "remembers (least recently failed dropped first).")


class RateLimitSettings(BaseModel):
    """Token-bucket rate limits per API key."""

    enabled: bool = Field(True, description="Apply rate limits.")
    free_per_hour: int = Field(100, ge=1, description="Calls an hour for the free tier.")
    pro_per_hour: int = Field(1000, ge=1, description="Calls an hour for the pro tier.")
    enterprise_per_hour: int = Field(10000, ge=1, description="Calls an hour for the enterprise tier.")
    redis_url: str | None = Field(None, description="Redis for buckets shared by replicas; host-local when unset.")
    batch_cost_per_applicant: int = Field(1, ge=0, description="Tokens a BatchScore call costs per applicant "
                                          "(at least 1 a call); every other call costs 1.")
    key_prefix: str = Field("credscope:ratelimit:", description="Prefix of the Redis bucket keys.")
    redis_timeout_seconds: float = Field(0.1, gt=0, description="Redis call timeout; past it the call is "
                                         "limited with the host-local buckets.")
    redis_retry_seconds: float = Field(1.0, gt=0, description="While Redis is down, how often to try it again.")
    local_path: Path = Field(Path("credscope-ratelimit.buckets"), description="Host-local bucket table, "
                             "shared by the worker processes of one host (memory-mapped file).")
    local_slots: int = Field(65536, ge=64, description="Buckets the host-local table holds (40 bytes each).")


class CacheSettings(BaseModel):
    """Prediction and explanation caches (see ``server/backends/cache.py`` and ``server/cached_scoring.py``)."""

    enabled: bool = Field(True, description="Use the caches.")
    redis_url: str | None = Field(None, description="Redis URL (redis://, rediss://, unix://; memory:// = "
                                  "embedded); the embedded LRU when unset. CREDSCOPE_REDIS_URL also sets it.")
    key_prefix: str = Field("credscope:", description="Prefix of every Redis key.")
    prediction_max_items: int = Field(10_000, ge=1, description="Prediction cache size (embedded).")
    prediction_ttl_seconds: float = Field(1800, gt=0, description="Prediction cache TTL.")
    explanation_max_items: int = Field(5_000, ge=1, description="Explanation cache size (embedded).")
    explanation_ttl_seconds: float = Field(7200, gt=0, description="Explanation cache TTL.")
    timeout_seconds: float = Field(0.05, gt=0, description="Redis call timeout; past it the call goes uncached.")
    retry_seconds: float = Field(1.0, gt=0, description="After a Redis failure, calls skip Redis (uncached) "
                                 "this long before one call tries it again.")


class AuditSettings(BaseModel):
    """Audit trail."""

    enabled: bool = Field(True, description="Record every call.")
    url: str = Field("sqlite:///credscope.db", description="sqlite:///path or postgresql://user@host/db.")
    durability: Literal["async", "sync"] = Field("async",
                                                 description="sync answers only after the record is committed.")
    batch_size: int = Field(500, ge=1, description="Records per write.")
    flush_seconds: float = Field(0.2, gt=0, description="Longest a record waits before it is written.")
    spool_dir: Path = Field(Path("spool"), description="Where batches wait while the database is down.")
    queue_size: int = Field(100_000, ge=1, description="Most records waiting in a worker's audit queue; past it "
                            "calls wait for room (backpressure), records are never dropped.")
    pool_size: int = Field(4, ge=1, description="PostgreSQL connections per worker.")
    store_process: bool = Field(True, description="Run each worker's audit store (shaping and inserting the rows, "
                                "SQLite or PostgreSQL) in a child process of the worker, off the worker's GIL; "
                                "false: in a thread of the worker.")
    store_process_nice: int = Field(10, ge=0, le=19, description="The audit store process's niceness (CPU "
                                    "priority below the serving workers'; 0 = the same).")
    timeout_seconds: float = Field(5.0, gt=0, description="Longest wait for the database (connect, one write, "
                                   "SQLite's lock) before a batch goes to the spool.")
    retry_seconds: float = Field(1.0, gt=0, description="While the database is down, how often the writer tries "
                                 "it again (and then replays the spool).")
    sync_timeout_seconds: float = Field(10.0, gt=0, description="sync durability: longest a call waits for its "
                                        "record to be committed before it answers UNAVAILABLE.")


class PortfolioSettings(BaseModel):
    """Default loan parameters of BatchScore's portfolio metrics (a request may override each; formulas in
    ``server/portfolio.py``)."""

    average_loan_amount: float = Field(500_000.0, gt=0, allow_inf_nan=False, description="Average loan amount.")
    interest_rate: float = Field(0.12, ge=0, le=1, description="Yearly interest rate, 0 to 1 (0.12 = 12%).")
    term_months: int = Field(60, ge=1, le=600, description="Loan term in months.")
    loss_given_default: float = Field(0.70, ge=0, le=1, description="Share of the loan lost on a default, 0 to 1.")
    processing_cost: float = Field(500.0, ge=0, allow_inf_nan=False, description="One-off processing cost per loan.")
    operating_cost_per_year: float = Field(1_000.0, ge=0, allow_inf_nan=False,
                                           description="Operating cost per loan per year.")


class TelemetrySettings(BaseModel):
    """Metrics and traces."""

    metrics_dir: Path | None = Field(None, description="prometheus-client multiprocess directory; off when unset.")
    otlp_endpoint: str | None = Field(None, description="OTLP/gRPC endpoint for traces (e.g. http://127.0.0.1:4317); "
                                      "when unset, the standard OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set.")
    service_name: str = Field("credscope", description="OpenTelemetry service.name.")
    process_sample_seconds: float = Field(5.0, gt=0, description="How often a worker records its memory and CPU.")
    http_host: str = Field("127.0.0.1", description="Sidecar (credscope-telemetry): address of /metrics and /healthz.")
    http_port: int = Field(9464, ge=0, le=65535, description="Sidecar: HTTP port; 0 picks a free one.")
    drift_interval_seconds: float = Field(300.0, gt=0, description="Sidecar: how often drift is computed.")
    drift_window_rows: int = Field(5000, ge=1, description="Sidecar: drift compares at most this many of the most "
                                   "recent audited inputs with the model's reference profile.")
    drift_window_hours: float = Field(24.0, gt=0, description="Sidecar: ... and only inputs from this many hours back.")
    drift_min_rows: int = Field(200, ge=1, description="Sidecar: fewer recent inputs than this give no drift figures.")
    performance_interval_seconds: float = Field(600.0, gt=0,
                                                description="Sidecar: how often model performance is computed.")
    performance_bucket_hours: float = Field(24.0, gt=0, description="Sidecar: width of a performance time bucket.")
    performance_window_days: float = Field(30.0, gt=0, description="Sidecar: how far back performance goes; the "
                                           "gauges show the whole window, model_performance gets one row per bucket.")
    performance_min_outcomes: int = Field(50, ge=1, description="Sidecar: fewer outcomes than this in a bucket or "
                                          "window give no performance figures for it.")
    report_dir: Path = Field(Path("reports"), description="Sidecar: where drift and performance reports are written.")


class Settings(BaseSettings):
    """All CredScope server settings."""

    model_config = SettingsConfigDict(env_prefix="CREDSCOPE_", env_nested_delimiter="__", extra="ignore")

    server: ServerSettings = ServerSettings()
    tls: TlsSettings = TlsSettings()
    model: ModelSettings = ModelSettings()
    auth: AuthSettings = AuthSettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
    cache: CacheSettings = CacheSettings()
    audit: AuditSettings = AuditSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    portfolio: PortfolioSettings = PortfolioSettings()
    log_level: str = Field("INFO", description="Logging level.")
    otel_exporter_otlp_endpoint: str | None = Field(
        None, validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"),
        description="The standard OpenTelemetry variable (no CREDSCOPE_ prefix): traces go over OTLP/gRPC to it "
                    "when telemetry.otlp_endpoint is unset.")
    redis_url: str | None = Field(None, validation_alias=AliasChoices("CREDSCOPE_REDIS_URL"),
                                  description="CREDSCOPE_REDIS_URL: the cache's Redis when "
                                  "CREDSCOPE_CACHE__REDIS_URL is unset (that one wins).")

    @model_validator(mode="after")
    def _redis_url_alias(self) -> Settings:
        if self.redis_url and not self.cache.redis_url:
            self.cache.redis_url = self.redis_url
        return self
