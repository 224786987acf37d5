"""QLM load balancing (engine/balance.py): a new request joins its group's replica or goes to the least estimated
waiting time, each replica's estimate at its own measured Θ. Balancer tests use schedulers over the fake runner
with Θ set by hand, so the estimates are exact; one test runs a 2-replica ReplicaEngine of the tiny Llama on CPU."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from fake_runner import FakeRunner

from engine.balance import LeastLoaded, RwtBalancer
from engine.config import DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.core import EngineCore, build_scheduler
from engine.kunserve import MemoryMonitor, MonitorConfig
from engine.policy import make_policy
from engine.protocol import AddRequest, SamplingParams
from engine.replicas import ReplicaEngine
from engine.request import Request
from engine.runner import ModelRunner
from engine.scheduler import Scheduler
from engine.weights import load_weights

BLOCK_SIZE = 4


def scheduler(tokens_per_s: float | None = 100.0, policy: str = "qlm") -> Scheduler:
    config = EngineConfig(scheduler=SchedulerConfig(policy=policy, block_size=BLOCK_SIZE))
    s = build_scheduler(config, FakeRunner(1024, BLOCK_SIZE), clock=lambda: 0.0)
    s.policy.slo.meter.tokens_per_s.value = tokens_per_s  # Θ as if measured
    return s


def request(request_id: str, slo_class: str, rl_mean: float) -> Request:
    """σ = 0 (rl_q = rl_mean), so an estimate is exactly tokens ahead / Θ."""
    params = SamplingParams(max_tokens=2000, temperature=0.0)
    return Request(request_id, [5, 6, 7], params, slo_class=slo_class, rl_mean=rl_mean, rl_q=rl_mean)


def queue(s: Scheduler, *requests: Request) -> None:
    for r in requests:
        assert s.add_request(r) is None


def test_backlog_in_tokens_not_requests_decides():
    """Replica 0 holds fewer requests but 800 tokens of batch work; replica 1 four short chats (16 tokens). The
    least-loaded rule picks replica 0; the RWT balancer replica 1, at 16 / 100 s instead of 800 / 100 s."""
    s0, s1 = scheduler(), scheduler()
    queue(s0, request("b0", "batch", 400), request("b1", "batch", 400))
    queue(s1, *(request(f"c{i}", "interactive", 4) for i in range(4)))  # bucket 1: the newcomer is bucket 2
    chat = request("new", "interactive", 40)
    assert LeastLoaded().place(chat, [s0, s1]).index == 0
    placement = RwtBalancer().place(chat, [s0, s1])
    assert placement.index == 1 and placement.reason == "least_wait"
    assert placement.waits == pytest.approx((8.0, 0.16))


def test_estimate_is_per_replica():
    """The same backlog on both replicas: each is estimated at its own Θ; an unmeasured replica borrows the mean of
    the measured ones; with none measured the estimate is swap-ins only and the least loaded wins."""
    fast, slow = scheduler(tokens_per_s=400.0), scheduler(tokens_per_s=100.0)
    for s in (slow, fast):
        queue(s, request("b0", "batch", 400), request("b1", "batch", 400))
    chat = request("new", "interactive", 40)
    placement = RwtBalancer().place(chat, [slow, fast])
    assert placement.index == 1 and placement.waits == pytest.approx((8.0, 2.0))

    fast.policy.slo.meter.tokens_per_s.value = None
    assert RwtBalancer().waits(chat, [slow, fast]) == pytest.approx([8.0, 8.0])
    slow.policy.slo.meter.tokens_per_s.value = None
    queue(fast, request("b2", "batch", 1))
    placement = RwtBalancer().place(chat, [slow, fast])
    assert placement.waits == (0.0, 0.0) and placement.index == 0  # fewer requests held


def test_ablations_shared_theta_and_no_joins():
    """shared_theta prices both replicas at the mean Θ (250 tok/s); join_groups=False ignores where a group waits."""
    fast, slow = scheduler(tokens_per_s=400.0), scheduler(tokens_per_s=100.0)
    for s in (slow, fast):
        queue(s, request("b0", "batch", 400), request("b1", "batch", 400))
    chat = request("new", "interactive", 40)
    assert RwtBalancer(shared_theta=True).waits(chat, [slow, fast]) == pytest.approx([3.2, 3.2])
    job = request("job", "batch", 40)  # its group (batch, bucket 2) waits on the slow replica, 10 s ≪ 600 s
    queue(slow, request("c0", "batch", 40))
    assert RwtBalancer().place(job, [slow, fast]).reason == "joined"
    placement = RwtBalancer(join_groups=False).place(job, [slow, fast])
    assert (placement.index, placement.reason) == (1, "least_wait")


def test_same_group_requests_colocate():
    """A request joins the replica where its group (class, length bucket) already waits, though the other replica
    is idle; another class or bucket is a new group and goes to the least wait."""
    s0, s1 = scheduler(), scheduler()
    queue(s0, request("a", "interactive", 10))
    balancer = RwtBalancer()
    same = request("b", "interactive", 12)  # log4 bucket 1, as "a"
    placement = balancer.place(same, [s0, s1])
    assert (placement.index, placement.reason) == (0, "joined")
    assert placement.waits == pytest.approx((0.1, 0.0))  # behind "a"'s 10 tokens at 100 tok/s
    queue(s0, same)
    assert balancer.place(request("c", "interactive", 8), [s0, s1]).index == 0
    for other in (request("d", "batch", 10), request("e", "interactive", 100)):
        placement = balancer.place(other, [s0, s1])
        assert (placement.index, placement.reason) == (1, "least_wait")


def test_group_splits_when_joining_would_miss_the_deadline():
    """The chats on replica 0 wait behind 1,000 batch tokens (10 s > the 2 s TTFT target): a new chat of their group
    starts a new group on idle replica 1. A batch request still joins its group (10 s ≪ 600 s)."""
    s0, s1 = scheduler(), scheduler()
    queue(s0, request("batch", "batch", 1000), request("a", "interactive", 10))
    placement = RwtBalancer().place(request("b", "interactive", 10), [s0, s1])
    assert (placement.index, placement.reason) == (1, "split")
    assert placement.waits[0] == pytest.approx(10.1)
    placement = RwtBalancer().place(request("c", "batch", 1000), [s0, s1])
    assert (placement.index, placement.reason) == (0, "joined")


def test_policies_pick_their_balancer():
    assert isinstance(make_policy("qlm").balancer, RwtBalancer)
    # kairos: least-loaded, measured better than QLM's rule (docs/results/qlm.md, "Load balancing")
    for name in ("kairos", "vllm", "edf", "ecoserve", "justitia", "vtc", "reserve-max", "sjf-oracle"):
        assert isinstance(make_policy(name).balancer, LeastLoaded)


# ---- in the replica engine --------------------------------------------------------------------------------------

# tiny Llama: layers x (k, v) x tokens x KV heads x head_dim x fp32
BYTES_PER_BLOCK = 2 * 2 * BLOCK_SIZE * 2 * 16 * 4


def add_message(request_id: str, slo_class: str, seed: int) -> AddRequest:
    rng = random.Random(seed)
    prompt = [rng.randrange(3, 320) for _ in range(rng.randrange(3, 20))]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    return AddRequest(request_id, prompt, params, 0.0, slo_class=slo_class)


def test_replica_engine_places_by_estimated_wait(tiny_llama_dir: Path):
    """qlm over 2 replicas of 2 seats each: the batch requests all join their group on replica 0 (no Θ yet: no
    split); once replica 0 has a measured backlog, a chat goes to idle replica 1. Greedy outputs equal one replica's,
    and the invariants hold after every step (check_invariants)."""
    sched = SchedulerConfig(policy="qlm", block_size=BLOCK_SIZE, max_num_batched_tokens=64, max_num_seqs=2)
    device = DeviceConfig(device="cpu", kv_cache_memory=80 * BYTES_PER_BLOCK)
    config = EngineConfig(model=ModelConfig(model=str(tiny_llama_dir)), scheduler=sched, device=device)
    runners = [ModelRunner(config.model, device, BLOCK_SIZE) for _ in range(2)]
    engine = ReplicaEngine(
        config,
        runners,
        load_weights(tiny_llama_dir).layers,
        False,
        MemoryMonitor(MonitorConfig()),
        check_invariants=True,
    )
    single_runner = ModelRunner(config.model, device, BLOCK_SIZE)
    single = EngineCore(build_scheduler(config, single_runner), single_runner, check_invariants=True)

    waves = {
        0: [add_message(f"b{i}", "batch", i) for i in range(5)],
        3: [add_message("chat", "interactive", 99)],
    }
    outputs: dict[str, dict[str, list[int]]] = {"replicas": {}, "single": {}}
    for name, core in (("replicas", engine), ("single", single)):
        step = 0
        while step <= max(waves) or core.has_work():
            for msg in waves.get(step, []):
                core.add_request(msg)
            if name == "replicas" and step == 0:
                assert set(engine.groups[0].scheduler.requests) == {f"b{i}" for i in range(5)}
            if name == "replicas" and step == 3:
                assert "chat" in engine.groups[1].scheduler.requests
                assert engine.groups[0].scheduler.waiting  # the backlog it avoided
            for delta in core.step():
                outputs[name].setdefault(delta.request_id, []).extend(delta.token_ids)
            step += 1
            assert step < 500
    assert outputs["replicas"] == outputs["single"]
    assert all(len(tokens) == 24 for tokens in outputs["single"].values())
    extra = engine.stats().extra
    assert extra["dispatch_joined_total"] == 4 and extra["dispatch_least_wait_total"] == 2

    # After a KunServe drop the pipeline group is one replica: the balancer places on it, and it serves.
    assert engine.drop(demand_bytes=1) and len(engine.groups) == 1
    for msg in (add_message("p0", "interactive", 7), add_message("p1", "batch", 8)):
        engine.add_request(msg)
    tokens: dict[str, list[int]] = {}
    while engine.has_work():
        for delta in engine.step():
            tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
    assert {k: len(v) for k, v in tokens.items()} == {"p0": 24, "p1": 24}
