"""Frozen HTTP-server configuration, built once by the CLI (the engine's own config is engine/config.py)."""

from __future__ import annotations

from dataclasses import dataclass

from server.schema import DEFAULT_SLO_CLASSES


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # Names clients may send as `model` (vLLM --served-model-name); the first is echoed in responses.
    # A request without `model` gets the model too.
    served_model_names: tuple[str, ...] = ("default",)
    tokenizer_path: str = ""  # the model directory (its tokenizer files)
    api_key: str | None = None  # when set, requests need `Authorization: Bearer <key>`
    slo_classes: tuple[str, ...] = DEFAULT_SLO_CLASSES
    ready_timeout_s: float = 600.0  # model load + KV pool allocation + warm-up
    log_level: str = "info"
    # Response-length predictor (predictor/online.py): "default" = the shipped SmolLM2 model, "none" = the
    # documented constants, or a model file. predictor_log: append finished requests' features + lengths there.
    predictor: str = "default"
    predictor_log: str = ""

    @property
    def served_model_name(self) -> str:
        return self.served_model_names[0]
