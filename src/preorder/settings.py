"""Every setting the service reads, from environment variables prefixed PREORDER_."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_SECRET_LENGTH = 32


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PREORDER_", extra="ignore")

    env: Literal["dev", "test", "prod"] = "prod"
    # Where `preorder serve` listens unless --port says otherwise; the image's HEALTHCHECK reads it too.
    port: int = Field(default=8000, ge=1, le=65_535)
    database_url: str = ""
    redis_url: str = ""
    db_pool_min: int = Field(default=2, ge=1)
    db_pool_max: int = Field(default=20, ge=1)
    # Group-commit batches of order rows in flight at once (each holds a pool connection while it runs).
    order_write_batches: int = Field(default=2, ge=1)
    # A statement that runs longer than this is cancelled by PostgreSQL itself, so a request
    # never hangs on a stuck database and an order write can never commit late (see write_deadline).
    db_statement_timeout_ms: int = Field(default=3_000, ge=100)
    db_connect_timeout_s: float = Field(default=2.0, gt=0)
    # Every pool acquire waits at most this long (then 503): with PostgreSQL hung, requests must not queue.
    db_acquire_timeout_s: float = Field(default=10.0, gt=0)
    redis_timeout_s: float = Field(default=1.0, gt=0)
    redis_pool_max: int = Field(default=64, ge=1)

    jwt_algorithm: Literal["HS256", "RS256"] = "HS256"
    jwt_secret: str = ""
    jwt_public_key: str = ""
    jwt_audience: str = "preorder"
    # An identity provider's JWKS document (RS256 and ES256 keys by kid); when set, it replaces the static key.
    jwt_jwks_url: str = ""
    jwt_jwks_min_interval_s: float = Field(default=30.0, gt=0)  # at most one fetch per interval (unknown kids)
    jwt_jwks_max_age_s: float = Field(default=600.0, gt=0)  # refetch keys older than this (drops removed keys)
    jwt_issuer: str = ""  # the `iss` every token must carry (checked when set; set it with a JWKS URL)
    jwt_subject_claim: str = "sub"  # the claim that names the customer (its value is the order's user_id)
    jwt_role_claim: str = "role"  # a claim name or a dotted path; a string (space-separated) or a list
    jwt_admin_role: str = "admin"  # the value of the role claim that makes an admin
    jwt_customer_role: str = "customer"  # the value that makes a customer ("" : any other verified token)

    max_quantity: int = Field(default=10, ge=1)
    max_body_bytes: int = Field(default=16_384, ge=1024)
    rate_limit_per_user: int = Field(default=20, ge=1, description="order creates per window per user")
    rate_limit_per_client: int = Field(default=200, ge=1, description="order creates per window per address")
    rate_limit_window_s: int = Field(default=1, ge=1)
    # Across all products (the two above count per product), in the same window.
    customer_rate_limit: int = Field(default=60, ge=1, description="order creates per window per customer")
    address_rate_limit: int = Field(default=600, ge=1, description="order creates per window per address")
    # Units one customer may hold in pending (unpaid) orders at once, across products.
    max_unpaid_per_customer: int = Field(default=20, ge=1)
    # How often each process recounts every customer's unpaid units from PostgreSQL (the safety net for a
    # count left behind by a killed process).
    unpaid_recount_interval_s: float = Field(default=60.0, gt=0)
    # How long an unknown product id is refused from memory / a Redis marker without asking PostgreSQL again.
    unknown_product_ttl_s: float = Field(default=5.0, gt=0, le=3600)
    # How long this process answers "sold out" without asking Redis after seeing a product sold out.
    sold_out_ttl_ms: int = Field(default=200, ge=0, le=5_000)

    idempotency_ttl_s: int = Field(default=86_400, ge=60)
    # An order row may only be written this soon after its reservation; the reconciler only frees holds
    # older than orphan_hold_s. The gap is what makes freeing an orphan hold safe: its write can't land later.
    write_deadline_s: float = Field(default=20.0, gt=0)
    orphan_hold_s: float = Field(default=60.0, gt=0)
    sweep_interval_s: float = Field(default=5.0, gt=0)
    # How often the regular reconcile pass runs (it costs in proportion to the orders since the last pass).
    reconcile_interval_s: float = Field(default=30.0, gt=0)
    # The regular pass reads only what changed since the last; the full pass (every hold of every product, so
    # its cost grows with the live orders) runs at start and then this often, as a safety net.
    reconcile_full_interval_s: float = Field(default=900.0, gt=0)
    workers_enabled: bool = True

    # Events out (events/): NATS JetStream is a sink when its URL is set. `preorder serve` runs the relay in a
    # process of its own beside the web workers, at a lower CPU priority, so deliveries take only the CPU orders
    # leave (a webhook delivery costs a third of the CPU of the create that caused it); relay_process=false runs
    # it inside each web worker instead (what `preorder dev` and an app served by another command do).
    relay_enabled: bool = True
    relay_process: bool = Field(default=True, description="`preorder serve` relays in a process of its own")
    nats_url: str = ""
    events_source: str = Field(default="/preorder", min_length=1, description="CloudEvents `source` of every event")
    relay_interval_s: float = Field(default=0.2, gt=0, description="pause between relay rounds when idle")
    relay_batch: int = Field(default=500, ge=1, le=10_000)
    # A claimed delivery is not taken again for this long: more than one send can take, so a process killed
    # mid-send is the only way it is sent twice.
    relay_lease_s: float = Field(default=60.0, gt=0)
    events_retention_s: float = Field(default=7 * 86_400, gt=0, description="finished deliveries kept this long")
    events_lag_degraded_s: float = Field(default=60.0, gt=0, description="/readyz says degraded past this lag")
    # A burst gives the machine to orders: while events are written faster than relay_burst_events_per_s, the relay
    # holds its deliveries back until the oldest undelivered event has waited relay_burst_max_wait_s, then sends
    # what keeps the wait at that bound. 0 for either: the relay never holds back.
    relay_burst_events_per_s: float = Field(default=200.0, ge=0)
    relay_burst_max_wait_s: float = Field(default=30.0, ge=0, description="events wait at most this long in a burst")
    webhook_timeout_s: float = Field(default=5.0, gt=0, le=30)
    webhook_retry_for_s: float = Field(default=86_400.0, gt=0, description="a delivery is retried this long")
    relay_backoff_base_s: float = Field(default=2.0, gt=0, description="first retry after about this long")
    webhook_backoff_max_s: float = Field(default=3_600.0, gt=0)
    webhook_disable_after_s: float = Field(default=3 * 86_400.0, gt=0, description="failing this long: disabled")
    # Refuse endpoints on loopback, private, link-local and metadata addresses (SSRF) unless this is set.
    webhook_allow_private: bool = False
    log_format: Literal["json", "console"] = "json"
    access_log: bool = True
    metrics: bool = Field(default=True, description="record Prometheus metrics (off only to measure their cost)")
    # SIGTERM: in-flight requests get up to half of this to finish, the order writes, workers and pools the rest.
    shutdown_timeout_s: float = Field(default=20.0, gt=0)

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        if self.orphan_hold_s <= self.write_deadline_s:
            raise ValueError("orphan_hold_s must be larger than write_deadline_s")
        if self.write_deadline_s * 1000 <= self.db_statement_timeout_ms:
            raise ValueError("write_deadline_s must be larger than db_statement_timeout_ms")
        if self.relay_lease_s <= self.webhook_timeout_s + 1:
            raise ValueError("relay_lease_s must be larger than webhook_timeout_s + 1")
        if self.relay_burst_events_per_s and self.relay_burst_max_wait_s >= self.events_lag_degraded_s:
            raise ValueError("relay_burst_max_wait_s must be smaller than events_lag_degraded_s")
        if self.env == "prod":
            self._require_production_values()
        return self

    def _require_production_values(self) -> None:
        if not self.database_url or not self.redis_url:
            raise ValueError("PREORDER_DATABASE_URL and PREORDER_REDIS_URL are required")
        if self.jwt_jwks_url:
            if not self.jwt_issuer:
                raise ValueError("PREORDER_JWT_ISSUER is required with PREORDER_JWT_JWKS_URL")
            return
        if self.jwt_algorithm == "HS256" and len(self.jwt_secret) < MIN_SECRET_LENGTH:
            raise ValueError(f"PREORDER_JWT_SECRET must be at least {MIN_SECRET_LENGTH} characters")
        if self.jwt_algorithm == "RS256" and not self.jwt_public_key:
            raise ValueError("PREORDER_JWT_PUBLIC_KEY is required with RS256")


@lru_cache
def get_settings() -> Settings:
    return Settings()
