"""`python -m loadgen run|plan` (also `kairos bench run|plan`): replay a workload against a server, or show its plan;
`kairos bench experiment ecoserve|justitia|qlm|kunserve ...` runs experiment E1, E3, E2 or E4 (loadgen/experiment_*.py);
`kairos bench soak ...` the long overload replay with random disconnects (loadgen/soak.py).

    python -m loadgen run --base-url http://127.0.0.1:8000 --workload azure-conv --num-requests 50 \
        --time-scale 0.5 --goodput ttft:2000 tpot:100 --json out/azure.json --plot

Bad input (unknown workload, missing data file, a rate ≤ 0, ...) → one line on stderr and exit code 2. A run
exits 0 when at least one request completed, else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import platform
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import orjson

from loadgen.client import ENDPOINTS, ON_429, ClientConfig, first_model, run_plan
from loadgen.datasets import DEFAULT_DATA_DIR, WorkloadConfig
from loadgen.plan import Workload
from loadgen.report import SLO_METRICS, build_report, format_table
from loadgen.workloads import WORKLOADS, build_workload


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print the whole usage first
        raise UsageError(message)


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload")
    w.add_argument(
        "--workload", required=True, choices=list(WORKLOADS), help="what to replay (docs/loadgen.md)"
    )
    w.add_argument("--num-requests", type=_positive(int), default=100, help="requests (agent calls) to plan")
    w.add_argument("--seed", type=int, default=0, help="the same seed gives the same plan")
    w.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder of the datasets")
    w.add_argument(
        "--max-model-len", type=_positive(int), default=2048, help="context the token counts are fit into"
    )
    w.add_argument(
        "--endpoint",
        choices=list(ENDPOINTS),
        default=None,
        help="default: chat for sharegpt, completions (token-id prompts) for the traces",
    )
    w.add_argument("--vocab-size", type=_positive(int), default=32000, help="token ids are drawn below this")
    a = p.add_argument_group("arrivals")
    a.add_argument(
        "--rate",
        type=_positive(float),
        default=None,
        help="req/s (agents: sessions/s; servegen: total over tenants); inf = all at once; "
        "default: the trace's own timing, all at once for sharegpt and agent sessions",
    )
    a.add_argument("--burstiness", type=_positive(float), default=1.0, help="gamma shape k; CV = 1/sqrt(k)")
    a.add_argument("--time-scale", type=_positive(float), default=1.0, help="recorded times × S (>1: slower)")
    t = p.add_argument_group("lengths and tags")
    t.add_argument(
        "--max-tokens",
        type=_positive(int),
        default=None,
        help="sharegpt: tokens to generate (default 128); traces: cap on the scaled recorded length",
    )
    t.add_argument(
        "--use-recorded-length", action="store_true", help="sharegpt: max_tokens = recorded, with ignore_eos"
    )
    t.add_argument("--input-scale", type=_positive(float), default=0.0, help="token scale (default: auto)")
    t.add_argument("--output-scale", type=_positive(float), default=0.0, help="token scale (default: auto)")
    t.add_argument(
        "--num-tenants", type=int, default=0, help="spread requests over N tenants; servegen: top-N clients"
    )
    t.add_argument("--slo-class", default=None, help="X-SLO-Class for every request (default: per workload)")
    t.add_argument("--mooncake-trace", choices=["conversation", "synthetic"], default="conversation")
    t.add_argument(
        "--servegen-window-s", type=int, default=0, help="ServeGen 600-s window to take rates from"
    )


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    add_workload_arguments(p)
    c = p.add_argument_group("client and report")
    c.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    c.add_argument("--model", default=None, help="`model` to send; default: the first of GET /v1/models")
    c.add_argument("--api-key", default=None)
    c.add_argument("--max-concurrency", type=int, default=0, help="requests in flight at most; 0 = unlimited")
    c.add_argument("--on-429", choices=ON_429, default="count", help="count a 429 as failed, or retry it")
    c.add_argument("--request-timeout", type=_positive(float), default=600.0, help="s to wait for a byte")
    c.add_argument(
        "--goodput", nargs="+", default=[], metavar="METRIC:MS", help="SLOs: ttft:MS tpot:MS e2el:MS"
    )
    c.add_argument("--json", type=Path, default=None, help="write the report here")
    c.add_argument("--save-detailed", action="store_true", help="also store every request's ITLs")
    c.add_argument("--plot", action="store_true", help="write PNG plots next to the --json file")
    c.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="loadgen", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_run_arguments(sub.add_parser("run", help="replay a workload against a server and report"))
    plan = sub.add_parser("plan", help="build a workload's plan without sending it")
    add_workload_arguments(plan)
    plan.add_argument("--json", type=Path, default=None, help="write the plan here")
    return parser


def parse_goodput(items: Sequence[str]) -> dict[str, float]:
    slo: dict[str, float] = {}
    for item in items:
        name, _, value = item.partition(":")
        if name not in SLO_METRICS:
            raise UsageError(f"--goodput {item!r}: metric must be one of {', '.join(SLO_METRICS)}")
        try:
            slo[name] = float(value)
        except ValueError:
            raise UsageError(f"--goodput {item!r}: expected {name}:MILLISECONDS") from None
        if slo[name] <= 0:
            raise UsageError(f"--goodput {item!r}: the limit must be > 0 ms")
    return slo


def endpoint_of(args: argparse.Namespace) -> str:
    return args.endpoint or ("chat" if args.workload == "sharegpt" else "completions")


def workload_config(args: argparse.Namespace) -> WorkloadConfig:
    return WorkloadConfig(
        data_dir=args.data_dir,
        num_requests=args.num_requests,
        seed=args.seed,
        max_model_len=args.max_model_len,
        prompt_format="text" if endpoint_of(args) == "chat" else "ids",
        vocab_size=args.vocab_size,
        rate=args.rate,
        burstiness=args.burstiness,
        time_scale=args.time_scale,
        max_tokens=args.max_tokens,
        use_recorded_length=args.use_recorded_length,
        input_scale=args.input_scale,
        output_scale=args.output_scale,
        num_tenants=args.num_tenants,
        slo_class=args.slo_class,
        mooncake_trace=args.mooncake_trace,
        servegen_window_s=args.servegen_window_s,
    )


def plan_workload(args: argparse.Namespace) -> Workload:
    try:
        return build_workload(args.workload, workload_config(args))
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None


def run_meta(args: argparse.Namespace, workload: Workload, model: str) -> dict[str, Any]:
    rate = "inf" if args.rate is None or math.isinf(args.rate) else args.rate
    if args.rate is None and args.workload not in ("sharegpt", "agents"):
        rate = "trace"
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "backend": "openai-chat" if endpoint_of(args) == "chat" else "openai",
        "endpoint": ENDPOINTS[endpoint_of(args)],
        "base_url": args.base_url,
        "model_id": model,
        "workload": workload.name,
        "workload_info": workload.info,
        "num_prompts": len(workload.requests),
        "request_rate": rate,
        "burstiness": args.burstiness,
        "time_scale": args.time_scale,
        "max_concurrency": args.max_concurrency or None,
        "on_429": args.on_429,
        "seed": args.seed,
        "max_model_len": args.max_model_len,
        "client": {"python": platform.python_version(), "argv": sys.argv},
    }


def run(args: argparse.Namespace) -> int:
    slo = parse_goodput(args.goodput)
    if args.plot and args.json is None:
        raise UsageError("--plot writes next to the --json file: give --json OUT")
    if args.max_concurrency < 0:
        raise UsageError("--max-concurrency must be >= 0")
    workload = plan_workload(args)
    try:
        model = args.model or asyncio.run(first_model(args.base_url, args.api_key))
    except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as e:
        sys.stderr.write(f"loadgen: error: cannot list models at {args.base_url}: {e}\n")
        return 1
    client_config = ClientConfig(
        base_url=args.base_url,
        model=model,
        endpoint=endpoint_of(args),
        max_concurrency=args.max_concurrency,
        on_429=args.on_429,
        api_key=args.api_key,
        request_timeout_s=args.request_timeout,
        show_progress=False if args.no_progress else None,
    )
    results, duration = asyncio.run(run_plan(workload.requests, client_config))
    report = build_report(results, duration, slo, run_meta(args, workload, model))
    sys.stdout.write(format_table(report) + "\n")
    if errors := [r.error for r in results if r.error]:
        sys.stderr.write(f"loadgen: {len(errors)} request(s) failed; first: {errors[0][:200]}\n")
    if args.json is not None:
        report["requests"] = [r.to_dict(args.save_detailed) for r in results]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        if args.plot:
            from loadgen.plots import write_plots

            for path in write_plots(results, report, args.json):
                sys.stderr.write(f"loadgen: wrote {path}\n")
    return 0 if report["completed"] > 0 else 1


def show_plan(args: argparse.Namespace) -> int:
    workload = plan_workload(args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(orjson.dumps(workload.to_dict(), option=orjson.OPT_INDENT_2))
    reqs = workload.requests
    sys.stdout.write(
        f"{workload.name}: {len(reqs)} requests, {workload.num_prompt_tokens} prompt tokens, "
        f"{sum(r.max_tokens for r in reqs)} max output tokens, last open-loop send at "
        f"{max((r.offset_s for r in reqs if r.after is None), default=0.0):.2f} s, "
        f"{len({r.tenant for r in reqs})} tenant(s), {len({r.app_id for r in reqs if r.app_id})} app(s)\n"
        f"info: {orjson.dumps(workload.info).decode()}\n"
    )
    return 0


def experiment(argv: list[str]) -> int:
    """`experiment NAME ...`: one command that regenerates a DESIGN §8 experiment's results."""
    experiments = {
        "ecoserve": "loadgen.experiment_ecoserve",
        "justitia": "loadgen.experiment_justitia",
        "qlm": "loadgen.experiment_qlm",
        "kunserve": "loadgen.experiment_kunserve",
    }
    if not argv or argv[0] not in experiments:
        raise UsageError(f"experiment: choose one of {', '.join(experiments)}")
    import importlib

    return importlib.import_module(experiments[argv[0]]).main(argv[1:])


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["experiment"]:
            return experiment(argv[1:])
        if argv[:1] == ["soak"]:
            from loadgen.soak import main as soak_main

            return soak_main(argv[1:])
        args = build_parser().parse_args(argv)
        return run(args) if args.command == "run" else show_plan(args)
    except UsageError as e:
        sys.stderr.write(f"loadgen: error: {e}\n")
        return 2
