"""The `agents` workload: real multi-call agent sessions (agent_sessions_lmcache.csv, data/GUIDE.md §2.6).

Each session is one application (`app_id` = "<app>:<session_id>", tenant = the agent framework). Its calls are
chained: call k+1 is sent (t_{k+1} − t_k) × time_scale after call k has *finished*. The trace does not record
call latencies, so the recorded gap (which includes the original call's latency) is used whole: think time is
overstated, never understated. Calls less than PARALLEL_GAP_S apart were fanned out in parallel (RepoAgent), so
such a call waits for the same call as its predecessor instead of for the predecessor itself.

Prompts keep the recorded prefix reuse: call k+1 starts with the first `prefix_shared_with_prev_call_tokens`
(scaled) tokens of call k's prompt. Sessions are taken in a seeded order until --num-requests calls are planned
(the last session may be cut short); session starts follow --rate (default: all at once).
"""

from __future__ import annotations

from dataclasses import dataclass

from loadgen import arrivals
from loadgen.datasets import (
    STREAM_ARRIVALS,
    STREAM_PROMPTS,
    STREAM_SAMPLE,
    WorkloadConfig,
    data_file,
    p95,
    read_csv,
)
from loadgen.plan import DEFAULT_SLO_CLASS, PlannedRequest, Workload
from loadgen.synthetic import LengthFit, PromptMaker, fit_lengths

FILE_NAME = "agent_sessions_lmcache.csv"
PARALLEL_GAP_S = 0.05


def read_sessions(config: WorkloadConfig) -> dict[tuple[str, str], list[dict[str, str]]]:
    """(app, session_id) → its calls in call order; keys sorted, so the dict order is deterministic."""
    sessions: dict[tuple[str, str], list[dict[str, str]]] = {}
    for row in read_csv(data_file(config, FILE_NAME)):
        sessions.setdefault((row["app"], row["session_id"]), []).append(row)
    return {key: sorted(sessions[key], key=lambda r: int(r["call_idx"])) for key in sorted(sessions)}


def build_agents(config: WorkloadConfig) -> Workload:
    sessions = read_sessions(config)
    all_calls = [row for calls in sessions.values() for row in calls]
    if config.num_requests > len(all_calls):
        raise ValueError(f"asked for {config.num_requests} calls, {FILE_NAME} has {len(all_calls)}")
    fit = fit_lengths(
        p95([float(r["input_tokens"]) for r in all_calls]),
        p95([float(r["output_tokens"]) for r in all_calls]),
        config.max_model_len,
        config.input_scale,
        config.output_scale,
        config.max_tokens,
    )
    keys = list(sessions)
    order = config.rng(STREAM_SAMPLE).permutation(len(keys)).tolist()
    chosen: list[tuple[tuple[str, str], list[dict[str, str]]]] = []
    remaining = config.num_requests
    for k in order:
        if remaining == 0:
            break
        calls = sessions[keys[k]][:remaining]
        chosen.append((keys[k], calls))
        remaining -= len(calls)
    starts = arrivals.schedule(len(chosen), config.rate, config.burstiness, config.rng(STREAM_ARRIVALS))
    planner = SessionPlanner(
        config, PromptMaker(config.prompt_format, config.vocab_size, config.rng(STREAM_PROMPTS)), fit
    )
    requests: list[PlannedRequest] = []
    for (key, calls), start in zip(chosen, starts, strict=True):
        requests.extend(planner.requests(key, calls, start, len(requests)))
    info = {
        "source": FILE_NAME,
        "length_fit": fit.to_dict(),
        "time_scale": config.time_scale,
        "num_sessions": len(chosen),
        "parallel_gap_s": PARALLEL_GAP_S,
    }
    info.update(
        fit.num_clipped(
            [float(r["input_tokens"]) for _, calls in chosen for r in calls],
            [float(r["output_tokens"]) for _, calls in chosen for r in calls],
        )
    )
    return Workload("agents", tuple(requests), info)


@dataclass(frozen=True)
class SessionPlanner:
    config: WorkloadConfig
    maker: PromptMaker
    fit: LengthFit

    def requests(
        self, key: tuple[str, str], calls: list[dict[str, str]], start_s: float, first_index: int
    ) -> list[PlannedRequest]:
        """One session's calls, chained; indices from `first_index`."""
        app, session_id = key
        fit, time_scale = self.fit, self.config.time_scale
        requests: list[PlannedRequest] = []
        prev_units: list[int] = []
        for k, row in enumerate(calls):
            num_prompt = fit.input(float(row["input_tokens"]))
            shared = min(
                round(float(row["prefix_shared_with_prev_call_tokens"]) * fit.input_scale), num_prompt
            )
            units = prev_units[:shared] + self.maker.fresh(num_prompt - min(shared, len(prev_units)))
            if k == 0:
                after, offset = None, start_s
            else:
                gap = max(0.0, float(row["timestamp_unix_s"]) - float(calls[k - 1]["timestamp_unix_s"]))
                prev = requests[-1]
                if gap < PARALLEL_GAP_S:  # fanned out with the previous call: wait for what it waits for
                    after, offset = prev.after, prev.offset_s + gap * time_scale
                else:
                    after, offset = prev.index, gap * time_scale
            requests.append(
                PlannedRequest(
                    index=first_index + k,
                    offset_s=offset,
                    prompt=self.maker.render(units),
                    num_prompt_tokens=len(units),
                    max_tokens=fit.output(float(row["output_tokens"])),
                    ignore_eos=True,
                    tenant=app,
                    app_id=f"{app}:{session_id}",
                    slo_class=self.config.slo_class or DEFAULT_SLO_CLASS,
                    after=after,
                )
            )
            prev_units = units
        return requests
