"""Frozen HTTP-server configuration, built once by the CLI (the engine's own config is engine/config.py)."""

from __future__ import annotations

from dataclasses import dataclass

from server.schema import DEFAULT_SLO_CLASSES, PREFIX_CACHE_ISOLATION


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # Names clients may send as `model` (vLLM --served-model-name); the first is echoed in responses.
    # A request without `model` gets the model too.
    served_model_names: tuple[str, ...] = ("default",)
    tokenizer_path: str = ""  # the model directory (its tokenizer files)
    # More models on the engine's replica (`--model` repeated; QLM model swapping, engine/model_swap.py), by the
    # name a request's `model` gives; they share the first model's tokenizer (checked at start-up).
    extra_model_names: tuple[str, ...] = ()
    api_key: str | None = None  # when set, requests need `Authorization: Bearer <key>`
    # Security and limits (README "Security"): /status and /metrics need the key too; a body over this many bytes
    # is a 413 (0 = no limit); prefix-cache blocks are shared within a tenant only ("tenant") or by all ("none").
    protect_observability: bool = False
    max_request_body_bytes: int = 8 * 1024 * 1024
    prefix_cache_isolation: str = "tenant"
    slo_classes: tuple[str, ...] = DEFAULT_SLO_CLASSES
    ready_timeout_s: float = 600.0  # model load + KV pool allocation + warm-up
    # SIGTERM / SIGINT (server/supervisor.py): in-flight requests get this long to finish; then they end with an
    # error event and the server exits.
    drain_timeout_s: float = 30.0
    # Quick engine deaths in a row after which the server exits 1 (server/supervisor.py); 0 = restart forever.
    max_engine_restarts: int = 5
    log_level: str = "info"
    # Response-length predictor (predictor/online.py): "default" = the shipped SmolLM2 model, "none" = the
    # documented constants, or a model file. predictor_log: append finished requests' features + lengths there.
    predictor: str = "default"
    predictor_log: str = ""
    # Where rl_mean / rl_q come from (predictor/length_source.py): "predictor", or the true length of ignore_eos
    # requests ("oracle"), optionally with lognormal noise ("oracle-noise", sigma length_noise) for ablations.
    length_source: str = "predictor"
    length_noise: float = 0.0
    length_seed: int = 0
    # Justitia: per-tenant fair-share weights (`--tenant-weights a=2,b=1`; unnamed tenants weigh 1), and the
    # app-cost model (predictor/app_cost.py): "default" = the shipped one, "none" = the engine's sum fallback.
    tenant_weights: tuple[tuple[str, float], ...] = ()
    app_cost_model: str = "default"
    # Admission limits (server/admission.py): requests / prompt tokens admitted and not yet finished, over the
    # whole server and per tenant; over one → 429 with Retry-After. 0 = unlimited (the default).
    max_queued_requests: int = 0
    max_queued_tokens: int = 0
    max_queued_requests_per_tenant: int = 0
    max_queued_tokens_per_tenant: int = 0

    def __post_init__(self) -> None:
        if self.prefix_cache_isolation not in PREFIX_CACHE_ISOLATION:
            raise ValueError(
                f"prefix_cache_isolation must be one of {PREFIX_CACHE_ISOLATION}, got {self.prefix_cache_isolation!r}"
            )
        if self.max_request_body_bytes < 0:
            raise ValueError(f"max_request_body_bytes must be >= 0, got {self.max_request_body_bytes}")

    def tenant_weight(self, tenant: str) -> float:
        return dict(self.tenant_weights).get(tenant, 1.0)

    @property
    def served_model_name(self) -> str:
        return self.served_model_names[0]
