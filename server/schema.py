"""Parse and validate OpenAI request bodies into frozen dataclasses (no pydantic).

Every problem raises `RequestError` with the offending parameter, which the app turns into a 400 in the vLLM
error shape. Unknown fields are ignored, as the OpenAI API and vLLM do. Identity (tenant, application, SLO
class) comes from headers first, then from the body (DESIGN §3 step 2).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from engine.protocol import APP_TYPES, SamplingParams
from engine.slo import DEFAULT_SLO_TARGETS

ROLES = frozenset({"system", "user", "assistant", "developer", "tool"})
MAX_STOP_STRINGS = 16  # OpenAI allows 4; vLLM any number. 16 keeps the server-side matcher cheap.
MAX_METADATA_PAIRS = 16
MAX_SEED = 2**63 - 1
MAX_INT = 2**63 - 1  # every integer field fits a signed 64-bit int (the codec and torch take nothing wider)
MAX_TOKEN_ID = 2**31 - 1  # token ids travel as int32 (engine/codec.py)
MAX_CACHE_SALT_CHARS = 1024
PREFIX_CACHE_ISOLATION = ("tenant", "none")  # --prefix-cache-isolation
MAX_APP_REQUESTS = 100_000  # metadata.app_num_requests: an app's declared size, a sanity cap

# OpenAI's service_tier values mapped onto our SLO classes. "flex" is OpenAI's cheap, slow tier; "batch" is ours.
SERVICE_TIER_TO_SLO_CLASS = {
    "auto": "interactive",
    "default": "interactive",
    "priority": "interactive",
    "scale": "interactive",
    "flex": "batch",
    "batch": "batch",
}
DEFAULT_SLO_CLASSES = tuple(DEFAULT_SLO_TARGETS)  # engine/slo.py; `--slo` adds classes (server/cli.py)


ERROR_TYPES = {  # status -> the error `type` (vLLM names its exception classes; 503 as /health reports it)
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    503: "unavailable_error",
}


class RequestError(Exception):
    """A request the server will not serve; rendered as {"error": {message, type, param, code}}.

    `type` defaults to the status's entry in ERROR_TYPES ("BadRequestError" for 400).
    """

    def __init__(self, message: str, param: str | None = None, status: int = 400, type: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type or ERROR_TYPES.get(status, "BadRequestError")


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    name: str | None = None
    tool_call_id: str | None = None

    def to_template_dict(self) -> dict[str, str]:
        out = {"role": self.role, "content": self.content}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass(frozen=True)
class Identity:
    tenant: str = "default"
    app_id: str = ""  # empty = an application of its own
    slo_class: str = "interactive"
    priority: int = 0
    app_type: str = ""  # metadata.app_type: one of APP_TYPES, "" = undeclared
    app_num_requests: int = 0  # metadata.app_num_requests: the app's declared size, 0 = undeclared


@dataclass(frozen=True)
class GenerationParams:
    """The fields both endpoints share."""

    model: str | None = None  # None = the served model
    max_tokens: int | None = None  # None = whatever fits in max_model_len
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False
    continuous_usage_stats: bool = False
    cache_salt: str | None = None  # vLLM's field: only requests with the same salt share prefix-cache blocks
    identity: Identity = Identity()

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
        )


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Message, ...]
    params: GenerationParams


@dataclass(frozen=True)
class CompletionRequest:
    """Exactly one of prompt / prompt_token_ids is set."""

    prompt: str | None
    prompt_token_ids: tuple[int, ...] | None
    params: GenerationParams


# ---- entry points ----------------------------------------------------------------------------------------


def parse_chat_request(
    body: Any, headers: Mapping[str, str], slo_classes: tuple[str, ...] = DEFAULT_SLO_CLASSES
) -> ChatRequest:
    body = _require_object(body)
    if body.get("logprobs") or body.get("top_logprobs"):
        raise RequestError("logprobs are not supported", "logprobs")
    messages = _parse_messages(body.get("messages"))
    return ChatRequest(messages=messages, params=_parse_params(body, headers, slo_classes))


def parse_completion_request(
    body: Any, headers: Mapping[str, str], slo_classes: tuple[str, ...] = DEFAULT_SLO_CLASSES
) -> CompletionRequest:
    body = _require_object(body)
    if body.get("logprobs"):  # an int in this API; 0 and null mean none
        raise RequestError("logprobs are not supported", "logprobs")
    if body.get("echo"):
        raise RequestError("echo is not supported", "echo")
    prompt, prompt_token_ids = _parse_prompt(body.get("prompt"))
    return CompletionRequest(prompt, prompt_token_ids, _parse_params(body, headers, slo_classes))


def parse_identity(
    body: Mapping[str, Any], headers: Mapping[str, str], slo_classes: tuple[str, ...] = DEFAULT_SLO_CLASSES
) -> Identity:
    """tenant: X-Tenant-Id › metadata.tenant › user › "default"; app: X-App-Id › metadata.app_id › "", with its
    declared shape metadata.app_type and metadata.app_num_requests (Justitia; both optional);
    SLO class: X-SLO-Class › `priority` given as a class name › service_tier (mapped) › "interactive";
    priority: the body's int (lower = sooner; vLLM's meaning), or a string naming the SLO class."""
    metadata = _parse_metadata(body.get("metadata"))
    user = _optional_str(body, "user")
    tenant = headers.get("x-tenant-id") or metadata.get("tenant") or user or "default"
    app_id = headers.get("x-app-id") or metadata.get("app_id") or ""
    priority_class = body.get("priority") if isinstance(body.get("priority"), str) else None
    priority = None if priority_class is not None else _optional_int(body, "priority")
    tier = _optional_str(body, "service_tier")
    if tier is not None and tier not in SERVICE_TIER_TO_SLO_CLASS:
        raise RequestError(
            f"unknown service_tier {tier!r}; expected one of {sorted(SERVICE_TIER_TO_SLO_CLASS)}",
            "service_tier",
        )
    if named := headers.get("x-slo-class") or priority_class:
        slo_class = named.strip().lower()
        if slo_class not in slo_classes:
            where = "X-SLO-Class" if headers.get("x-slo-class") else "priority"
            raise RequestError(f"unknown SLO class {named!r}; expected one of {list(slo_classes)}", where)
    else:
        slo_class = SERVICE_TIER_TO_SLO_CLASS[tier] if tier is not None else "interactive"
    return Identity(
        tenant=tenant,
        app_id=app_id,
        slo_class=slo_class,
        priority=priority or 0,
        app_type=_parse_app_type(metadata.get("app_type")),
        app_num_requests=_parse_app_num_requests(metadata.get("app_num_requests")),
    )


def _parse_app_type(value: str | None) -> str:
    if value is None or value == "":
        return ""
    app_type = value.strip().lower()
    if app_type not in APP_TYPES:
        raise RequestError(
            f"unknown metadata.app_type {value!r}; expected one of {list(APP_TYPES)}", "metadata.app_type"
        )
    return app_type


def _parse_app_num_requests(value: str | None) -> int:
    """OpenAI metadata values are strings: "16" is 16."""
    if value is None or value == "":
        return 0
    text = value.strip()
    if not text.isdecimal() or not 1 <= int(text) <= MAX_APP_REQUESTS:
        raise RequestError(
            f"metadata.app_num_requests must be an integer from 1 to {MAX_APP_REQUESTS}, got {value!r}",
            "metadata.app_num_requests",
        )
    return int(text)


def prefix_cache_salt(isolation: str, tenant: str, cache_salt: str | None) -> str:
    """AddRequest.cache_salt, which engine/block_manager.py mixes into the first block's hash (and so the whole
    chain): only requests with the same salt share cached blocks. isolation "tenant" (the default) salts with
    the tenant, so one tenant cannot learn another's prompts from how fast a guess is served; a request's own
    cache_salt narrows sharing further. The JSON array keeps ("a", "b|c") and ("a|b", "c") apart."""
    parts = [tenant] if isolation == "tenant" else []
    if cache_salt is not None:
        parts.append(cache_salt)
    return orjson.dumps(parts).decode() if parts else ""


# ---- pieces ----------------------------------------------------------------------------------------------


def _require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def _parse_params(
    body: dict[str, Any], headers: Mapping[str, str], slo_classes: tuple[str, ...]
) -> GenerationParams:
    n = _optional_int(body, "n")
    if n is not None and n != 1:
        raise RequestError("only n=1 is supported", "n")
    model = _optional_str(body, "model")
    # vLLM: max_completion_tokens (the newer name) wins over max_tokens.
    max_tokens = _optional_int(body, "max_completion_tokens")
    max_tokens_param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, max_tokens_param = _optional_int(body, "max_tokens"), "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise RequestError(f"{max_tokens_param} must be at least 1, got {max_tokens}", max_tokens_param)
    temperature = _optional_float(body, "temperature", 1.0)
    if not 0.0 <= temperature <= 2.0:
        raise RequestError(f"temperature must be in [0, 2], got {temperature}", "temperature")
    top_p = _optional_float(body, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise RequestError(f"top_p must be in (0, 1], got {top_p}", "top_p")
    top_k = _optional_int(body, "top_k")
    if top_k is not None and top_k < -1:
        raise RequestError(f"top_k must be -1 or 0 (off) or a positive integer, got {top_k}", "top_k")
    min_p = _optional_float(body, "min_p", 0.0)
    if not 0.0 <= min_p <= 1.0:
        raise RequestError(f"min_p must be in [0, 1], got {min_p}", "min_p")
    seed = _optional_int(body, "seed")
    if seed is not None and not -MAX_SEED - 1 <= seed <= MAX_SEED:
        raise RequestError("seed must fit in a signed 64-bit integer", "seed")
    stream = _optional_bool(body, "stream")
    include_usage, continuous = _parse_stream_options(body.get("stream_options"), stream)
    cache_salt = _optional_str(body, "cache_salt")
    if cache_salt is not None and not 0 < len(cache_salt) <= MAX_CACHE_SALT_CHARS:
        raise RequestError(f"cache_salt must be 1 to {MAX_CACHE_SALT_CHARS} characters", "cache_salt")
    return GenerationParams(
        model=model,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=max(top_k or 0, 0),
        min_p=min_p,
        seed=seed,
        stop=_parse_stop(body.get("stop")),
        stop_token_ids=_parse_stop_token_ids(body.get("stop_token_ids")),
        ignore_eos=_optional_bool(body, "ignore_eos"),
        stream=stream,
        include_usage=include_usage,
        continuous_usage_stats=continuous,
        cache_salt=cache_salt,
        identity=parse_identity(body, headers, slo_classes),
    )


def _parse_messages(value: Any) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise RequestError("messages must be a non-empty list", "messages")
    return tuple(_parse_message(i, m) for i, m in enumerate(value))


def _parse_message(index: int, value: Any) -> Message:
    where = f"messages[{index}]"
    if not isinstance(value, dict):
        raise RequestError(f"{where} must be an object", "messages")
    role = value.get("role")
    if role not in ROLES:
        raise RequestError(f"{where}.role must be one of {sorted(ROLES)}, got {role!r}", "messages")
    content = value.get("content")
    if content is None and role in ("assistant", "tool"):  # an assistant turn that only called tools
        content = ""
    name, tool_call_id = value.get("name"), value.get("tool_call_id")
    if name is not None and not isinstance(name, str):
        raise RequestError(f"{where}.name must be a string", "messages")
    if tool_call_id is not None and not isinstance(tool_call_id, str):
        raise RequestError(f"{where}.tool_call_id must be a string", "messages")
    return Message(role=role, content=_parse_content(where, content), name=name, tool_call_id=tool_call_id)


def _parse_content(where: str, content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or a list of text parts", "messages")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise RequestError(
                f"{where}.content[{j}]: only text parts are supported, got {kind!r}", "messages"
            )
        if not isinstance(text := part.get("text"), str):
            raise RequestError(f"{where}.content[{j}].text must be a string", "messages")
        texts.append(text)
    return "\n".join(texts)  # vLLM's "string" content format joins text parts with newlines


def _parse_prompt(value: Any) -> tuple[str | None, tuple[int, ...] | None]:
    """A string, [string], [int, ...] or [[int, ...]]: one prompt only."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise RequestError("prompt must not be empty", "prompt")
        return value, None
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        if any(t < 0 for t in value):
            raise RequestError("prompt token ids must be non-negative", "prompt")
        return None, tuple(value)
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise RequestError("only one prompt per request is supported", "prompt")
    raise RequestError("prompt must be a non-empty string or a non-empty list of token ids", "prompt")


def _parse_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"at most {MAX_STOP_STRINGS} stop strings are supported, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise RequestError("stop strings must not be empty", "stop")
    return tuple(dict.fromkeys(stops))


def _parse_stop_token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(_is_int(t) and 0 <= t <= MAX_TOKEN_ID for t in value):
        raise RequestError(
            f"stop_token_ids must be a list of token ids (integers from 0 to {MAX_TOKEN_ID})",
            "stop_token_ids",
        )
    return tuple(value)


def _parse_stream_options(value: Any, stream: bool) -> tuple[bool, bool]:
    if value is None:
        return False, False
    if not isinstance(value, dict):
        raise RequestError("stream_options must be an object", "stream_options")
    if not stream:
        raise RequestError("stream_options can only be given when stream is true", "stream_options")
    include_usage = _optional_bool(value, "include_usage", param="stream_options.include_usage")
    continuous = _optional_bool(
        value, "continuous_usage_stats", param="stream_options.continuous_usage_stats"
    )
    return include_usage, continuous


def _parse_metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise RequestError("metadata must be an object of string values", "metadata")
    if len(value) > MAX_METADATA_PAIRS:
        raise RequestError(f"metadata may hold at most {MAX_METADATA_PAIRS} pairs", "metadata")
    return value


# ---- scalar helpers: JSON booleans are not numbers here ----------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_int(body: Mapping[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise RequestError(f"{key} must be an integer, got {value!r}", key)
    if not -MAX_INT - 1 <= value <= MAX_INT:
        raise RequestError(f"{key} must fit in a signed 64-bit integer", key)
    return value


def _optional_float(body: Mapping[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{key} must be a number, got {value!r}", key)
    if value != value:  # NaN
        raise RequestError(f"{key} must be a number, got NaN", key)
    return float(value)


def _optional_bool(body: Mapping[str, Any], key: str, param: str | None = None) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"{param or key} must be a boolean, got {value!r}", param or key)
    return value


def _optional_str(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise RequestError(f"{key} must be a string, got {value!r}", key)
    return value
