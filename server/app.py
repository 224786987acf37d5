"""The OpenAI-compatible HTTP front end: routes, startup, checks, errors.

`build_app(config, client)` returns a Starlette app; all state is on `app.state` (config, client, tokenizer,
metrics, status window). The lifespan starts the engine client and waits for readiness in the background, so
/health answers 503 while the model loads. A request: validate (schema.py) → identity → tokenize → length checks
→ AddRequest, then generation.py streams it. Every error is {"error": {message, type, param, code}} as vLLM
writes it. Observability: GET /metrics (Prometheus, server/metrics.py), GET /status (JSON, server/status.py) and
the status page at / (static/), none of which waits on the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from engine.protocol import AddRequest, Ready
from predictor.app_cost import AppCostTagger, load_app_cost_tagger
from predictor.length_source import LengthSource
from predictor.online import LengthLogObserver, LengthTagger, load_tagger, request_text
from server import sse
from server.admission import Admission, AdmissionLimits, Overloaded
from server.config import ServerConfig
from server.generation import EngineClientLike, Generation, complete, run_unless_disconnected, sse_response
from server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from server.metrics import Metrics
from server.schema import (
    GenerationParams,
    RequestError,
    parse_chat_request,
    parse_completion_request,
    prefix_cache_salt,
)
from server.status import RollingWindow, status_body
from server.supervisor import EngineSupervisor, RestartPolicy
from server.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
# Longer texts are tokenized in a worker thread (HF tokenizers release the GIL): at ~3 µs a character on CPU, a
# long prompt tokenized on the event loop would stall every open stream.
TOKENIZE_INLINE_CHARS = 16_384
STATUS_SAMPLE_S = 1.0  # how often the engine's totals are booked into the status window (its bucket width)


def build_app(
    config: ServerConfig, client: EngineClientLike, tokenizer: Tokenizer | None = None
) -> Starlette:
    """tokenizer: given by tests; otherwise loaded from config.tokenizer_path during startup."""
    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/engine/stats", engine_stats, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/status", status, methods=["GET"]),
        Route("/", status_page, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=_lifespan,
        exception_handlers={
            RequestError: _request_error_handler,
            HTTPException: _http_error_handler,
            Exception: _internal_error_handler,
        },
    )
    app.state.config = config
    app.state.client = client
    app.state.tokenizer = tokenizer
    app.state.startup_error = None  # str once startup failed; /health then says why
    app.state.created = int(time.time())
    app.state.started_at = time.time()
    app.state.window = RollingWindow(bucket_s=STATUS_SAMPLE_S)
    app.state.metrics = None  # built with the engine's Ready (its max_model_len sets token buckets)
    # predictor/online.py: rl_mean / rl_q for every request; a missing model file falls back to constants.
    app.state.predictor = load_tagger(
        config.predictor, config.served_model_name, config.predictor_log or None
    )
    # predictor/app_cost.py: Ĉ_a at an app's first request, repeated on its later ones (AddRequest.app_cost).
    app.state.app_cost = load_app_cost_tagger(config.app_cost_model)
    # predictor/length_source.py: the predictor's tags, or the true length for oracle ablations.
    app.state.length_source = LengthSource(config.length_source, config.length_noise, config.length_seed)
    # server/admission.py: queued requests / prompt tokens, globally and per tenant (429 over a limit).
    app.state.admission = Admission(
        AdmissionLimits(
            config.max_queued_requests,
            config.max_queued_tokens,
            config.max_queued_requests_per_tenant,
            config.max_queued_tokens_per_tenant,
        )
    )
    # server/supervisor.py: restarts a dead engine (kairos:engine_restarts_total) and drains on SIGTERM.
    app.state.supervisor = EngineSupervisor(
        client,
        config.ready_timeout_s,
        config.drain_timeout_s,
        RestartPolicy(max_quick_failures=config.max_engine_restarts),
        on_restart=lambda: app.state.metrics.on_engine_restart(),
    )
    if client.ready is not None:  # a client that is ready at once (tests)
        _build_metrics(app, client.ready)
    return app


def _build_metrics(app: Starlette, ready: Ready) -> None:
    client: EngineClientLike = app.state.client
    app.state.metrics = Metrics(
        app.state.config.served_model_name,
        ready.max_model_len,
        lambda: client.latest_stats,
        app.state.window,
    )


# ---- lifespan --------------------------------------------------------------------------------------------


@asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    supervisor: EngineSupervisor = app.state.supervisor
    supervisor.bind(asyncio.get_running_loop())
    startup = asyncio.create_task(_start(app))
    supervise = asyncio.create_task(_supervise(app, startup))
    sampler = asyncio.create_task(_sample_engine_stats(app))
    try:
        yield
    finally:
        startup.cancel()
        supervise.cancel()
        sampler.cancel()
        await supervisor.close()
        await app.state.client.shutdown()
        app.state.predictor.close()


async def _sample_engine_stats(app: Starlette) -> None:
    """Book the engine's new totals into the status window every second: its rates need regular samples."""
    while True:
        if (stats := app.state.client.latest_stats) is not None:
            app.state.window.add_engine_stats(stats, time.time())
        await asyncio.sleep(STATUS_SAMPLE_S)


async def _start(app: Starlette) -> None:
    """Spawn the engine, then wait for its Ready while the tokenizer loads in a thread."""
    config: ServerConfig = app.state.config
    client: EngineClientLike = app.state.client
    try:
        client.start()
        ready, tokenizer = await asyncio.gather(
            client.wait_ready(config.ready_timeout_s), _load_tokenizer(app)
        )
        if app.state.metrics is None:
            _build_metrics(app, ready)
        app.state.tokenizer = tokenizer  # the last step: requests are served from here on
        logger.info(
            "ready: model %s on %s, max_model_len %d, %d KV blocks of %d, policy %s",
            ready.model_name,
            ready.device,
            ready.max_model_len,
            ready.num_kv_blocks,
            ready.block_size,
            ready.policy,
        )
    except Exception as exc:  # logged, reported by /health and every request until the server exits 1
        app.state.startup_error = f"{type(exc).__name__}: {exc}"
        logger.exception("startup failed")
        app.state.supervisor.startup_failed(app.state.startup_error)


async def _supervise(app: Starlette, startup: asyncio.Task) -> None:
    """Restart the engine whenever it dies, from the first successful startup on."""
    await startup
    if app.state.startup_error is None:
        await app.state.supervisor.run()


async def _load_tokenizer(app: Starlette) -> Tokenizer:
    if app.state.tokenizer is not None:
        return app.state.tokenizer
    return await asyncio.to_thread(Tokenizer.load, app.state.config.tokenizer_path)


# ---- routes ----------------------------------------------------------------------------------------------


async def health(request: Request) -> Response:
    if problem := _unavailable_reason(request.app):
        return _error_response(RequestError(problem, status=503))
    return _json({"status": "ok"})


async def list_models(request: Request) -> Response:
    _check_auth(request)
    ready = _require_ready(request.app)
    config: ServerConfig = request.app.state.config
    created = request.app.state.created
    data = [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "kairos",
            "root": config.tokenizer_path or None,
            "parent": None,
            "max_model_len": ready.max_model_len,
        }
        for name in config.served_model_names + config.extra_model_names
    ]
    return _json({"object": "list", "data": data})


async def engine_stats(request: Request) -> Response:
    """The engine's latest EngineStats as JSON (free blocks, queue lengths, totals); Prometheus comes later."""
    _check_auth(request)
    _require_ready(request.app)
    stats = request.app.state.client.latest_stats
    if stats is None:
        raise RequestError("the engine has not published stats yet", status=503)
    return _json(dataclasses.asdict(stats))


async def metrics(request: Request) -> Response:
    """Prometheus text format; empty until the engine is ready. No auth, as vLLM's /metrics, unless
    --protect-observability."""
    _check_observability_auth(request)
    body = request.app.state.metrics.render() if request.app.state.metrics is not None else b""
    return Response(body, media_type=METRICS_CONTENT_TYPE)


async def status(request: Request) -> Response:
    """The status page's data: the engine's last pushed stats and the server's rolling aggregates."""
    _check_observability_auth(request)
    app = request.app
    client: EngineClientLike = app.state.client
    body = status_body(
        model_name=app.state.config.served_model_name,
        state=_unavailable_reason(app) or "ok",
        ready=client.ready,
        stats=client.latest_stats,
        window=app.state.window,
        now=time.time(),
        started_at=app.state.started_at,
    )
    body["engine_restarts"] = app.state.supervisor.num_restarts
    body["last_engine_exit"] = app.state.supervisor.last_exit
    return _json(body, headers={"Cache-Control": "no-store"})


async def status_page(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def chat_completions(request: Request) -> Response:
    arrival_time = time.time()
    _check_auth(request)
    _require_ready(request.app)
    parsed = parse_chat_request(
        await _read_json(request), request.headers, request.app.state.config.slo_classes
    )
    _check_model(request.app, parsed.params)
    num_chars = sum(len(m.content) for m in parsed.messages)
    encode = functools.partial(request.app.state.tokenizer.encode_chat, parsed.messages)
    try:
        prompt_ids = await _encode(request.app, num_chars, "messages", encode)
    except RequestError:
        raise
    except Exception as exc:  # jinja2 TemplateError and friends: the conversation, not the server
        raise RequestError(f"the chat template rejected the messages: {exc}", "messages") from exc
    return await _generate(
        request,
        "chatcmpl",
        prompt_ids,
        parsed.params,
        is_chat=True,
        arrival_time=arrival_time,
        text=request_text(parsed.messages),
        num_messages=len(parsed.messages),
    )


async def completions(request: Request) -> Response:
    arrival_time = time.time()
    _check_auth(request)
    _require_ready(request.app)
    parsed = parse_completion_request(
        await _read_json(request), request.headers, request.app.state.config.slo_classes
    )
    _check_model(request.app, parsed.params)
    tokenizer: Tokenizer = request.app.state.tokenizer
    if parsed.prompt_token_ids is None:
        prompt = parsed.prompt or ""
        prompt_ids = await _encode(
            request.app, len(prompt), "prompt", functools.partial(tokenizer.encode, prompt)
        )
    else:
        prompt_ids = list(parsed.prompt_token_ids)
        if (bad := max(prompt_ids)) >= tokenizer.vocab_size:
            raise RequestError(f"token id {bad} is out of vocabulary (size {tokenizer.vocab_size})", "prompt")
    return await _generate(
        request,
        "cmpl",
        prompt_ids,
        parsed.params,
        is_chat=False,
        arrival_time=arrival_time,
        text=parsed.prompt or "",
    )


async def _encode(app: Starlette, num_chars: int, where: str, encode: Callable[[], list[int]]) -> list[int]:
    """Tokenize, first refusing a text that is surely over the context (no token covers more than the tokenizer's
    max_chars_per_token characters), then off the event loop when the text is long."""
    max_model_len = app.state.client.ready.max_model_len
    if (per_token := app.state.tokenizer.max_chars_per_token) and num_chars > max_model_len * per_token:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, your {where} has "
            f"{num_chars} characters, more than {max_model_len} tokens can hold. Please reduce the length of "
            "the input.",
            where,
        )
    if num_chars <= TOKENIZE_INLINE_CHARS:
        return encode()
    return await asyncio.to_thread(encode)


# ---- one generation ----------------------------------------------------------------------------------


async def _generate(
    request: Request,
    prefix: str,
    prompt_ids: list[int],
    params: GenerationParams,
    is_chat: bool,
    arrival_time: float,
    text: str = "",
    num_messages: int = 1,
) -> Response:
    app = request.app
    ready = _require_ready(app)
    max_tokens = _max_tokens(len(prompt_ids), params.max_tokens, ready, is_chat)
    tagger: LengthTagger = app.state.predictor
    tagged = tagger.tag(text, len(prompt_ids), num_messages, max_tokens)
    sampling = params.sampling(max_tokens)
    rl_mean, rl_q = app.state.length_source.lengths(
        tagged.prediction.median, tagged.prediction.upper, max_tokens, sampling.ignore_eos, prompt_ids
    )
    identity = params.identity
    app_cost: AppCostTagger = app.state.app_cost
    predicted_app_cost = app_cost.tag(
        identity.app_id,
        identity.app_type,
        identity.app_num_requests,
        len(prompt_ids),
        tagged.prediction.median,
        tagged.prediction.upper,
    )
    msg = AddRequest(
        request_id=f"{prefix}-{uuid.uuid4().hex}",
        prompt_token_ids=prompt_ids,
        sampling=sampling,
        arrival_time=arrival_time,
        tenant=identity.tenant,
        app_id=identity.app_id,
        slo_class=identity.slo_class,
        priority=identity.priority,
        cache_salt=prefix_cache_salt(
            app.state.config.prefix_cache_isolation, identity.tenant, params.cache_salt
        ),
        rl_mean=rl_mean,
        rl_q=rl_q,
        app_type=identity.app_type,
        app_num_requests=identity.app_num_requests,
        app_cost=predicted_app_cost,
        tenant_weight=app.state.config.tenant_weight(identity.tenant),
        model=params.model if params.model in app.state.config.extra_model_names else "",  # "": the first
    )
    output = app.state.tokenizer.output_text(prompt_ids, params.stop)
    observer = app.state.metrics
    if tagger.is_logging:
        observer = LengthLogObserver(observer, tagger, tagged)
    model_name = msg.model or app.state.config.served_model_name
    gen = Generation(msg, params, output, model_name, is_chat, observer=observer)
    client: EngineClientLike = app.state.client
    try:
        ticket = app.state.admission.admit(identity.tenant, len(prompt_ids))
    except Overloaded as exc:
        if app.state.metrics is not None:
            app.state.metrics.on_rejected(exc.reason)
        raise
    handed_over = False
    try:
        if params.stream:
            response = sse_response(client, gen, on_close=ticket.release)
            handed_over = True  # the response releases the ticket when it ends, however it ends
            return response
        body = await run_unless_disconnected(request, complete(client, gen))
        return _json(body) if body is not None else Response(status_code=499)  # 499: nobody is listening
    finally:
        if not handed_over:
            ticket.release()


def _max_tokens(num_prompt_tokens: int, requested: int | None, ready: Ready, is_chat: bool) -> int:
    """The max_tokens the engine gets. prompt + max_tokens must fit the context and the KV blocks one request can
    ever hold, or it is a 400 now: the engine would refuse it (without that check, a request larger than the
    pool preempts itself forever, vllm#39734). Not given: whatever fits both (vLLM's default is the context)."""
    where = "messages" if is_chat else "prompt"
    max_model_len = ready.max_model_len
    max_kv_tokens = _max_kv_tokens(ready)
    if num_prompt_tokens == 0:
        raise RequestError("the prompt is empty after tokenization", where)
    if num_prompt_tokens >= max_model_len:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{num_prompt_tokens} input tokens. Please reduce the length of the input.",
            where,
        )
    if num_prompt_tokens >= max_kv_tokens:
        raise RequestError(
            f"The KV cache holds at most {max_kv_tokens} tokens of one request, and your request has "
            f"{num_prompt_tokens} input tokens. Please reduce the length of the input.",
            where,
        )
    if requested is None:
        return min(max_model_len, max_kv_tokens) - num_prompt_tokens  # vLLM: whatever fits
    if num_prompt_tokens + requested > max_model_len:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the {where}, {requested} in the "
            f"completion). Please reduce the length of the {where} or completion.",
            "max_tokens",
        )
    if num_prompt_tokens + requested > max_kv_tokens:
        raise RequestError(
            f"The KV cache holds at most {max_kv_tokens} tokens of one request ({ready.block_size}-token "
            f"blocks). However, you requested {num_prompt_tokens + requested} tokens ({num_prompt_tokens} in "
            f"the {where}, {requested} in the completion). Please reduce the length of the {where} or "
            "completion.",
            "max_tokens",
        )
    return requested


def _max_kv_tokens(ready: Ready) -> int:
    """Tokens of KV one request can ever hold (whole blocks); unbounded when the engine reports no pool."""
    num_blocks = ready.max_blocks_per_request or ready.num_kv_blocks
    return num_blocks * ready.block_size if num_blocks > 0 and ready.block_size > 0 else 2**63 - 1


# ---- checks and errors --------------------------------------------------------------------------------


def _unavailable_reason(app: Starlette) -> str | None:
    client: EngineClientLike = app.state.client
    if app.state.startup_error:
        return f"the server failed to start: {app.state.startup_error}"
    if problem := app.state.supervisor.unavailable_reason():  # restarting the engine, or draining
        return problem
    if client.ready is None or app.state.tokenizer is None:
        return "the model is loading"
    if not client.is_alive:
        return "the engine is not running"
    return None


def _require_ready(app: Starlette) -> Ready:
    if problem := _unavailable_reason(app):
        raise RequestError(problem, status=503)
    return app.state.client.ready


def _check_auth(request: Request) -> None:
    """`Authorization: Bearer <key>` when --api-key is set. Both sides are hashed, then compared in constant time,
    so neither the key's characters nor its length leak through response timing."""
    if not (key := request.app.state.config.api_key):
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    digest = hashlib.sha256(given.strip().encode()).digest()
    if scheme.lower() != "bearer" or not hmac.compare_digest(digest, hashlib.sha256(key.encode()).digest()):
        raise RequestError("invalid or missing API key", status=401)


def _check_observability_auth(request: Request) -> None:
    """/status and /metrics need the key too with --protect-observability (the page at / and static/ hold no
    data and stay open; the page sends the key it was opened with, /?key=...)."""
    if request.app.state.config.protect_observability:
        _check_auth(request)


def _check_model(app: Starlette, params: GenerationParams) -> None:
    config = app.state.config
    if params.model is not None and params.model not in config.served_model_names + config.extra_model_names:
        raise RequestError(f"The model `{params.model}` does not exist.", "model", status=404)


async def _read_json(request: Request) -> Any:
    body = await _read_body(request, request.app.state.config.max_request_body_bytes)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from exc


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 as soon as it is known to pass `limit` bytes (0 = no limit): from Content-Length before
    reading a byte, then by counting while reading, since a chunked body has no length and a client may lie."""
    too_large = RequestError(f"the request body is larger than {limit} bytes", status=413)
    declared = request.headers.get("content-length")
    if declared is not None and not (declared.isascii() and declared.isdigit()):
        raise RequestError(f"invalid Content-Length header {declared[:40]!r}")
    if limit and declared is not None and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    num_bytes = 0
    try:
        async for chunk in request.stream():
            num_bytes += len(chunk)
            if limit and num_bytes > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise RequestError("the client disconnected while sending the body", status=499) from None
    return b"".join(chunks)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, headers=headers, media_type="application/json")


def _error_response(exc: RequestError, headers: dict[str, str] | None = None) -> Response:
    if exc.status in (429, 503):
        headers = {**(headers or {}), "Retry-After": "1"}
    if exc.status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return _json(sse.error_body(exc.message, exc.type, exc.param, exc.status), exc.status, headers)


async def _request_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    return _error_response(exc)


async def _http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed"}
    error = RequestError(message.get(exc.status_code, exc.detail), status=exc.status_code)
    return _error_response(error, dict(exc.headers or {}))


async def _internal_error_handler(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error_response(RequestError(f"internal error: {type(exc).__name__}", status=500))
