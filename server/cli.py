"""`kairos` command line: `kairos serve ...` starts the OpenAI-compatible server with its engine process.

Configs are built here, once, from the flags (frozen EngineConfig + ServerConfig). Other subcommands
(`bench`, `simulate`) plug into `COMMANDS` when they exist.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from engine.config import DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig, parse_size
from engine.policy import POLICIES
from engine.slo import build_slo_table
from predictor.length_source import LENGTH_SOURCES
from server.config import ServerConfig
from server.schema import PREFIX_CACHE_ISOLATION

logger = logging.getLogger(__name__)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    http = parser.add_argument_group("HTTP")
    http.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)"
    )
    http.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    http.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="name(s) clients send as `model`; the first is echoed in responses "
        "(default: the model directory's name, then the --model value)",
    )
    http.add_argument(
        "--api-key", default=None, help="if set, require `Authorization: Bearer <key>` on /v1 routes"
    )
    http.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM/SIGINT, stop admitting (503) and give in-flight requests this many seconds to finish; "
        "then they end with an error event and the server exits",
    )
    http.add_argument(
        "--max-engine-restarts",
        type=int,
        default=5,
        metavar="N",
        help="a dead engine is restarted (back-off 1 s doubling to 30 s); after N deaths in a row, each within a "
        "minute of its start, the server exits with status 1 instead (0 = restart forever)",
    )
    http.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level of the server and the engine process",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        action="append",
        default=None,
        help="'default' (SmolLM2-135M-Instruct, prepared on first use), 'tiny-random', or a local "
        "Hugging Face directory of the Llama family. Repeat it to serve several models of one shape and one "
        "tokenizer on one replica (QLM model swapping: one model's weights resident, the others in host memory; "
        "a request's `model` picks one, by its directory's name)",
    )
    model.add_argument(
        "--max-model-len",
        type=int,
        default=0,
        help="context length in tokens (prompt + output); 0 = the model's own, capped at 8192",
    )
    model.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weight and KV dtype (on CPU float32 is fastest: reference/cpu-feasibility.md §2)",
    )

    sched = parser.add_argument_group("scheduler")
    sched.add_argument(
        "--policy",
        default="vllm",
        choices=sorted(POLICIES),
        help="scheduling policy (DESIGN §4)",
    )
    sched.add_argument("--max-num-seqs", type=int, default=256, help="most requests running in one step")
    sched.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="token budget of one step: prefill chunks plus one token per decoding request",
    )
    sched.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    sched.add_argument("--no-prefix-caching", action="store_true", help="turn off prefix-cache block sharing")
    sched.add_argument(
        "--kv-reserve",
        type=float,
        default=0.05,
        metavar="F",
        help="KV ledger: fraction of the pool held back for under-predicted requests (ecoserve)",
    )
    sched.add_argument(
        "--rl-bucket-width", type=int, default=64, help="KV ledger: response-length bucket in tokens"
    )
    sched.add_argument("--no-kv-lending", action="store_true", help="ecoserve ablation: no KVC pipelining")
    sched.add_argument("--no-gt-grouping", action="store_true", help="ecoserve ablation: no GT groups")
    sched.add_argument("--no-kv-ordering", action="store_true", help="ecoserve ablation: FCFS order")
    sched.add_argument(
        "--slo",
        action="append",
        default=[],
        metavar="NAME:ttft=S,tpot=S,e2e=S",
        help="SLO class targets in seconds, repeatable; overrides the defaults interactive:ttft=2,tpot=0.2 and "
        "batch:e2e=600, or adds a class (engine/slo.py)",
    )
    sched.add_argument(
        "--swap-space",
        type=parse_size,
        default=0,
        metavar="BYTES",
        help="host memory for KV swapped out by QLM eviction (e.g. 4GiB); 0 = evict by recompute only",
    )

    device = parser.add_argument_group("device and memory")
    device.add_argument(
        "--devices",
        default="auto",
        help="'auto' (cuda if present, else cpu), 'cpu', 'cuda', 'cuda:N', or a list 'cuda:0,cuda:1' (one replica "
        "each; untested: no GPU on the development machine)",
    )
    device.add_argument(
        "--kv-cache-memory",
        type=parse_size,
        default=0,
        metavar="SIZE",
        help="bytes for the KV pool, e.g. 512MiB; 0 = derive from the device budget",
    )
    budget = device.add_mutually_exclusive_group()
    budget.add_argument(
        "--device-memory",
        type=parse_size,
        default=0,
        metavar="SIZE",
        help="memory budget per replica (weights + KV), e.g. 2GiB; the CPU budget",
    )
    budget.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        metavar="F",
        help="fraction of the GPU's memory for weights + KV (0..1]",
    )
    device.add_argument(
        "--num-threads", type=int, default=0, help="torch threads in the engine process; 0 = torch's default"
    )
    kun = parser.add_argument_group("replicas and KunServe parameter drop (DESIGN §5)")
    kun.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="model replicas in the engine process (CPU: each with its own --device-memory budget); with "
        "--devices cuda:0,cuda:1 one per listed device",
    )
    kun.add_argument(
        "--param-drop",
        choices=("auto", "on", "off"),
        default="auto",
        help="drop replicated layers into pipeline groups under a KV spike; auto = on with >= 2 replicas",
    )
    kun.add_argument(
        "--drop-usage", type=float, default=0.95, help="KV usage that (with pending >= free) drops"
    )
    kun.add_argument(
        "--restore-usage", type=float, default=0.5, help="KV usage under which (falling) restores"
    )
    kun.add_argument(
        "--min-pipeline-s",
        type=float,
        default=5.0,
        help="restore hysteresis: seconds in pipeline mode before a restore",
    )
    kun.add_argument(
        "--restore-fit-usage",
        type=float,
        default=0.8,
        help="restore only if the data-parallel pools would hold the blocks in use at or under this fraction",
    )

    predictor = parser.add_argument_group("response-length predictor")
    predictor.add_argument(
        "--predictor",
        default="default",
        metavar="PATH",
        help="'default' (the shipped SmolLM2 model, predictor/models/smollm2.json.gz), a model file from "
        "`kairos predictor train/refit`, or 'none' (constants: median 256, upper 1024 tokens)",
    )
    predictor.add_argument(
        "--predictor-log",
        default="",
        metavar="PATH",
        help="append each finished request's features and actual length here (no prompt text), "
        "for `kairos predictor refit`",
    )
    predictor.add_argument(
        "--length-source",
        default="predictor",
        choices=LENGTH_SOURCES,
        help="rl_mean/rl_q from the predictor, or the true length of ignore_eos requests (max_tokens): "
        "'oracle', or 'oracle-noise' with --length-noise (ablations; other requests keep the predictor's)",
    )
    predictor.add_argument(
        "--length-noise", type=float, default=0.0, metavar="SIGMA", help="oracle-noise: lognormal sigma"
    )
    predictor.add_argument("--length-seed", type=int, default=0, help="oracle-noise: seed of the noise")

    fairness = parser.add_argument_group("applications and tenants (Justitia, VTC)")
    fairness.add_argument(
        "--tenant-weights",
        type=_tenant_weights,
        default=(),
        metavar="T=W,...",
        help="fair-share weight per tenant, e.g. tenantA=2,tenantB=1 (unnamed tenants weigh 1)",
    )
    fairness.add_argument(
        "--app-idle-timeout", type=float, default=5.0, help="s an app stays active after its last request"
    )
    fairness.add_argument(
        "--fair-iteration-s",
        type=float,
        default=0.05,
        help="justitia: seconds per engine step in the fluid reference's rate M / t_iter (a loaded decode step)",
    )
    fairness.add_argument(
        "--app-cost-model",
        default="default",
        metavar="PATH",
        help="'default' (predictor/models/app_cost.json), a model from `python -m predictor.app_cost train`, "
        "or 'none' (apps are costed as the sum of their requests' predictions)",
    )

    overload = parser.add_argument_group(
        "admission limits (0 = unlimited; over one → HTTP 429 + Retry-After)"
    )
    for flag, what in (
        ("--max-queued-requests", "requests admitted and not yet finished, over the whole server"),
        ("--max-queued-tokens", "prompt tokens of requests admitted and not yet finished, over the server"),
        ("--max-queued-requests-per-tenant", "requests admitted and not yet finished, per tenant"),
        (
            "--max-queued-tokens-per-tenant",
            "prompt tokens of requests admitted and not yet finished, per tenant",
        ),
    ):
        overload.add_argument(flag, type=_non_negative_int, default=0, metavar="N", help=what)

    security = parser.add_argument_group("security and limits (README: Security)")
    security.add_argument(
        "--protect-observability",
        action="store_true",
        help="require the --api-key on /status and /metrics too (open by default, as vLLM's /metrics); "
        "the status page then needs /?key=<key>",
    )
    security.add_argument(
        "--max-request-body-bytes",
        type=_non_negative_int,
        default=8 * 1024 * 1024,
        metavar="N",
        help="larger request bodies get HTTP 413, refused while reading (0 = no limit; default 8 MiB)",
    )
    security.add_argument(
        "--prefix-cache-isolation",
        choices=PREFIX_CACHE_ISOLATION,
        default="tenant",
        help="tenant: cached prefix blocks are shared only within a tenant (the default); none: by everyone. "
        "A request's `cache_salt` narrows sharing further either way",
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt")


def _extra_model_names(specs: list[str], first_dir: Path, names: tuple[str, ...]) -> tuple[str, ...]:
    """The names requests use for the models after the first (`--model` repeated): the directory's name, or the
    spec for the built-in ones. Each must share the first model's tokenizer files (the server has one tokenizer)
    and have a name of its own; SystemExit otherwise. The engine checks that the shapes match."""
    from engine.model_store import resolve_model

    def tokenizer_files(path: Path) -> dict[str, bytes]:
        return {f: (path / f).read_bytes() for f in TOKENIZER_FILES if (path / f).is_file()}

    extra: list[str] = []
    for spec in specs:
        path = resolve_model(spec)
        name = spec if spec in ("default", "tiny-random") or spec.startswith("synthetic:") else path.name
        if name in names or name in extra:
            raise SystemExit(
                f"--model {spec}: the name {name!r} is taken (copy it to a directory of another name)"
            )
        if tokenizer_files(path) != tokenizer_files(first_dir):
            raise SystemExit(
                f"--model {spec}: its tokenizer differs from {first_dir}'s; models served together must share one"
            )
        extra.append(name)
    return tuple(extra)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _tenant_weights(text: str) -> tuple[tuple[str, float], ...]:
    from engine.fairness import parse_tenant_weights

    try:
        return tuple(parse_tenant_weights(text).items())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from engine.model_store import resolve_model
    from server.app import build_app
    from server.draining_server import DrainingServer
    from server.engine_client import EngineClient

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s kairos %(levelname)s %(name)s: %(message)s"
    )
    if not 0.0 < args.gpu_memory_utilization <= 1.0:
        raise SystemExit("--gpu-memory-utilization must be in (0, 1]")
    if args.drain_timeout < 0:
        raise SystemExit("--drain-timeout must be >= 0")
    if args.max_engine_restarts < 0:
        raise SystemExit("--max-engine-restarts must be >= 0")
    specs = args.model or ["default"]
    model_dir = resolve_model(specs[0])  # the default model is downloaded and converted on first use
    # Default names: the model directory's name (README: "smollm2-135m-instruct"), then --model as given.
    names = tuple(args.served_model_name or dict.fromkeys([model_dir.name, specs[0]]))
    extra_names = _extra_model_names(specs[1:], model_dir, names)
    if extra_names and (args.replicas > 1 or "," in args.devices):
        raise SystemExit("several --model are served on one replica only (no --replicas or device list)")
    try:
        slo_classes = tuple(build_slo_table(tuple(args.slo)))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    engine_config = EngineConfig(
        model=ModelConfig(
            model=specs[0],
            served_model_name=names[0],
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            extra_models=tuple(specs[1:]),
            extra_served_model_names=extra_names,
        ),
        scheduler=SchedulerConfig(
            policy=args.policy,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            block_size=args.block_size,
            enable_prefix_caching=not args.no_prefix_caching,
            kv_reserve_fraction=args.kv_reserve,
            rl_bucket_width=args.rl_bucket_width,
            ecoserve_lending=not args.no_kv_lending,
            ecoserve_grouping=not args.no_gt_grouping,
            ecoserve_ordering=not args.no_kv_ordering,
            app_idle_timeout=args.app_idle_timeout,
            fair_iteration_s=args.fair_iteration_s,
            slo=tuple(args.slo),
        ),
        device=DeviceConfig(
            device=args.devices,
            kv_cache_memory=args.kv_cache_memory,
            device_memory=args.device_memory,
            gpu_memory_utilization=args.gpu_memory_utilization,
            num_threads=args.num_threads,
            swap_space=args.swap_space,
            replicas=args.replicas,
            param_drop=args.param_drop,
            drop_usage=args.drop_usage,
            restore_usage=args.restore_usage,
            min_pipeline_s=args.min_pipeline_s,
            restore_fit_usage=args.restore_fit_usage,
        ),
    )
    server_config = ServerConfig(
        host=args.host,
        port=args.port,
        served_model_names=names,
        extra_model_names=extra_names,
        tokenizer_path=str(model_dir),
        api_key=args.api_key,
        protect_observability=args.protect_observability,
        max_request_body_bytes=args.max_request_body_bytes,
        prefix_cache_isolation=args.prefix_cache_isolation,
        slo_classes=slo_classes,
        log_level=args.log_level,
        predictor=args.predictor,
        predictor_log=args.predictor_log,
        length_source=args.length_source,
        length_noise=args.length_noise,
        length_seed=args.length_seed,
        tenant_weights=args.tenant_weights,
        app_cost_model=args.app_cost_model,
        max_queued_requests=args.max_queued_requests,
        max_queued_tokens=args.max_queued_tokens,
        max_queued_requests_per_tenant=args.max_queued_requests_per_tenant,
        max_queued_tokens_per_tenant=args.max_queued_tokens_per_tenant,
        drain_timeout_s=args.drain_timeout,
        max_engine_restarts=args.max_engine_restarts,
    )
    app = build_app(server_config, EngineClient(engine_config))
    # On SIGINT/SIGTERM uvicorn stops accepting and waits for open responses; the supervisor (told first) answers
    # 503 meanwhile and ends what still streams at the drain timeout; then the lifespan shuts the engine down.
    uvicorn_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=args.drain_timeout + 5,  # a backstop: the supervisor ends streams before
    )
    logger.info("serving %s (%s) on http://%s:%d", names[0], model_dir, args.host, args.port)
    supervisor = app.state.supervisor
    server = DrainingServer(uvicorn_config, supervisor.request_drain)
    # A crash loop: stop serving 503s and exit 1 for systemd / Kubernetes to see.
    supervisor.on_give_up = lambda: setattr(server, "should_exit", True)
    server.run()
    return 1 if supervisor.gave_up else 0


def bench(args: argparse.Namespace) -> int:
    from loadgen.cli import main as loadgen_main  # HTTP-only load generator; its own parser and errors

    return loadgen_main(args.argv)


def predictor(args: argparse.Namespace) -> int:
    from predictor.cli import main as predictor_main  # lightgbm and numpy stay out of `kairos serve --help`

    return predictor_main(args.argv)


def add_passthrough_arguments(parser: argparse.ArgumentParser) -> None:
    """Everything after the subcommand goes to its own parser, flags first included (`kairos simulate --workload
    ...`): with no prefix characters this parser sees no options, so REMAINDER takes the lot."""
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="`--workload ...` or `calibrate ...`")
    parser.prefix_chars = "\0"


def simulate(args: argparse.Namespace) -> int:
    from engine.simulate_cli import main as simulate_main  # numpy, loadgen; torch only for `calibrate`

    return simulate_main(args.argv)


COMMANDS: dict[
    str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
] = {
    "serve": ("run the OpenAI-compatible server", add_serve_arguments, serve),
    "bench": (
        "load generator: `kairos bench run --help` (same as `python -m loadgen`)",
        lambda p: p.add_argument("argv", nargs=argparse.REMAINDER, help="`run ...` or `plan ...`"),
        bench,
    ),
    "predictor": (
        "response-length predictor: `kairos predictor {train,evaluate,refit,bench} --help`",
        lambda p: p.add_argument("argv", nargs=argparse.REMAINDER, help="`refit ...`, `train ...`, ..."),
        predictor,
    ),
    "simulate": (
        "simulator (simulated results): `kairos simulate --workload W ...` or `kairos simulate calibrate`",
        add_passthrough_arguments,
        simulate,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kairos", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return COMMANDS[args.command][2](args)
