"""QLM model swapping (engine/model_swap.py, engine/scheduler.py, engine/runner.py `load_model`): two tiny random
Llamas of one shape with different weights on one replica. Each request's greedy output equals a single-model
engine's for its model (so KV and prefix-cache blocks never cross models); the swap counter rises; under qlm an
urgent chat for model b swaps in past a batch backlog of model a, while FCFS (vllm) makes it wait for the backlog."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
from fake_runner import VOCAB, FakeRunner, next_token

from engine.batch import ModelOutput, SchedulerOutput
from engine.config import DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.core import EngineCore, build_scheduler
from engine.model_store import save_tiny_random
from engine.protocol import AddRequest, FinishReason, SamplingParams
from engine.request import Request
from engine.runner import ModelRunner

BLOCK_SIZE = 4
BYTES_PER_BLOCK = (
    2 * 2 * BLOCK_SIZE * 2 * 16 * 4
)  # tiny Llama: layers x (k, v) x tokens x KV heads x head_dim x fp32


@pytest.fixture(scope="module")
def other_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama's shape with other random weights (seed 7): a 'fine-tuned variant' of the same vocab."""
    return save_tiny_random(tmp_path_factory.mktemp("tiny-llama-b"), arch="llama", seed=7)


def real_core(model: ModelConfig, policy: str) -> EngineCore:
    device = DeviceConfig(device="cpu", kv_cache_memory=96 * BYTES_PER_BLOCK, swap_space=64 * BYTES_PER_BLOCK)
    runner = ModelRunner(model, device, BLOCK_SIZE)
    config = EngineConfig(
        model=model,
        scheduler=SchedulerConfig(policy=policy, block_size=BLOCK_SIZE, max_num_batched_tokens=64),
        device=device,
    )
    return EngineCore(build_scheduler(config, runner), runner, check_invariants=True)


def message(request_id: str, model: str, seed: int) -> AddRequest:
    rng = random.Random(seed)
    prompt = [rng.randrange(3, 320) for _ in range(rng.randrange(4, 20))]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    return AddRequest(request_id, prompt, params, 0.0, model=model)


def run(core: EngineCore, waves: dict[int, list[AddRequest]]) -> dict[str, list[int]]:
    outputs: dict[str, list[int]] = {}
    step = 0
    while step <= max(waves) or core.has_work():
        for msg in waves.get(step, []):
            core.add_request(msg)
        for delta in core.step():
            outputs.setdefault(delta.request_id, []).extend(delta.token_ids)
        step += 1
        assert step < 1000
    return outputs


@pytest.mark.parametrize("policy", ["vllm", "qlm"])
def test_interleaved_requests_match_single_model_engines(
    tiny_llama_dir: Path, other_llama_dir: Path, policy: str
):
    # The same prompt (seed) goes to both models in every wave: a prefix-cache hit across models would show.
    waves = {
        0: [message("a0", "a", 0), message("b0", "b", 0), message("a1", "a", 1)],
        4: [message("b1", "b", 1), message("a2", "a", 2)],
        9: [message("b2", "b", 2), message("a3", "a", 0), message("b3", "b", 3)],
        30: [message("a4", "a", 4)],  # arrives while (or after) b is served: a swap back either way
    }
    two = ModelConfig(
        model=str(tiny_llama_dir),
        served_model_name="a",
        extra_models=(str(other_llama_dir),),
        extra_served_model_names=("b",),
    )
    engine = real_core(two, policy)
    assert engine.runner.model_names == ("a", "b") and engine.scheduler.models == ("a", "b")
    assert set(engine.runner.model_load_seconds) == {"a", "b"}
    got = run(engine, waves)

    expected: dict[str, list[int]] = {}
    for name, path in (("a", tiny_llama_dir), ("b", other_llama_dir)):
        single = real_core(ModelConfig(model=str(path), served_model_name=name), policy)
        mine = {k: [replace(m, model="") for m in v if m.model == name] for k, v in waves.items()}
        expected |= run(single, mine)
    assert got == expected
    assert got["a0"] != got["b0"] and got["a0"] == got["a3"]  # the models differ; a model agrees with itself
    stats = engine.stats()
    assert stats.extra["model_swaps_total"] >= 2
    assert engine.scheduler.model_load_seconds["b"] > 0


def test_models_of_another_shape_are_refused(tiny_llama_dir: Path, tiny_qwen2_dir: Path):
    two = ModelConfig(
        model=str(tiny_llama_dir),
        served_model_name="a",
        extra_models=(str(tiny_qwen2_dir),),
        extra_served_model_names=("q",),
    )
    with pytest.raises(ValueError, match="architecture or shape"):
        ModelRunner(two, DeviceConfig(device="cpu", kv_cache_memory=8 * BYTES_PER_BLOCK), BLOCK_SIZE)


# ---- swap decisions on the fake runner ----------------------------------------------------------------------------


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def next_token_b(context: list[int]) -> int:
    return 3 + (next_token(context) * 7) % (VOCAB - 3)  # model b: another fixed function of the context


def reference(prompt: list[int], max_tokens: int, model: str) -> list[int]:
    step = next_token if model == "a" else next_token_b
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(step(tokens))
    return tokens[len(prompt) :]


class TwoModelRunner(FakeRunner):
    """The fake runner serving model a or b (one resident), on a manual clock: 0.02 s a step, 0.1 s a load."""

    model_names = ("a", "b")

    def __init__(self, clock: ManualClock, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.clock = clock
        self.resident = "a"
        self.model_load_seconds = {"a": 0.1, "b": 0.1}
        self.loads: list[str] = []

    def execute(self, output: SchedulerOutput) -> ModelOutput:
        self.clock.now += 0.02
        if output.load_model:
            self.resident = output.load_model
            self.loads.append(output.load_model)
            self.clock.now += 0.1
        sampled = super().execute(output).sampled
        if self.resident == "b":
            sampled = {rid: 3 + (t * 7) % (VOCAB - 3) for rid, t in sampled.items()}
        return ModelOutput(sampled, 0.0, 0.1 if output.load_model else 0.0)


def prompt_of(seed: int, n: int) -> list[int]:
    return [3 + (seed * 7919 + i * 31) % 990 for i in range(n)]


def run_urgent_chat(policy: str) -> tuple[float, EngineCore, dict[str, list[int]]]:
    """12 batch requests of 200 tokens for model a fill 4 seats; at t = 1 s a chat (8 tokens) for model b arrives.
    Returns the chat's TTFT, the core and every request's output."""
    clock = ManualClock()
    runner = TwoModelRunner(clock, 1024, BLOCK_SIZE, num_host_blocks=512)
    config = EngineConfig(scheduler=SchedulerConfig(policy=policy, block_size=BLOCK_SIZE, max_num_seqs=4))
    core = EngineCore(build_scheduler(config, runner, clock), runner, check_invariants=True)
    batch = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    for i in range(12):
        core.add_request(AddRequest(f"batch{i}", prompt_of(i, 16), batch, 0.0, slo_class="batch", model="a"))
    outputs: dict[str, list[int]] = {}
    arrival = ttft = None
    while core.has_work() or arrival is None:
        if clock.now >= 1.0 and arrival is None:
            chat = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
            core.add_request(AddRequest("chat", prompt_of(100, 8), chat, 0.0, rl_mean=8, rl_q=8, model="b"))
            arrival = clock.now
        for delta in core.step():
            outputs.setdefault(delta.request_id, []).extend(delta.token_ids)
            if delta.request_id == "chat" and ttft is None and delta.token_ids:
                ttft = clock.now - arrival
    assert ttft is not None
    for request_id, tokens in outputs.items():
        seed, n, model = (100, 8, "b") if request_id == "chat" else (int(request_id[5:]), 16, "a")
        assert tokens == reference(prompt_of(seed, n), len(tokens), model), request_id
        assert len(tokens) == (8 if request_id == "chat" else 200)
    return ttft, core, outputs


def test_urgent_chat_for_another_model_swaps_past_a_batch_backlog():
    qlm_ttft, qlm_core, _ = run_urgent_chat("qlm")
    vllm_ttft, vllm_core, _ = run_urgent_chat("vllm")
    assert qlm_ttft <= 2.0 < vllm_ttft  # the interactive TTFT target is 2 s
    # qlm: a -> b for the chat (evicting the batch requests, which are a lower class), then b -> a for the rest.
    assert qlm_core.runner.loads == ["b", "a"] and qlm_core.stats().extra["model_swaps_total"] == 2
    assert qlm_core.scheduler.num_swaps_total >= 1  # evicted batch KV went to host memory
    # vllm (FCFS): the chat is the last in line; its model is loaded once the backlog is done.
    assert vllm_core.runner.loads == ["b"]


def test_unknown_model_is_refused():
    runner = TwoModelRunner(ManualClock(), 64, BLOCK_SIZE)
    core = EngineCore(build_scheduler(EngineConfig(), runner), runner)
    core.add_request(AddRequest("x", [5, 6], SamplingParams(), 0.0, model="zzz"))
    (delta,) = core.step()
    assert delta.finish_reason == FinishReason.ERROR and "not served" in delta.error
    request = Request("y", [5], SamplingParams())
    assert core.scheduler.resolve_model(request) == "" and request.model == "a"  # "" is the first model


# ---- the server: --model repeated, the request's `model` ----------------------------------------------------------


def test_server_routes_the_model_field():
    import asyncio

    import httpx
    from fake_engine_client import FakeClient
    from tiny_tokenizer import tiny_tokenizer

    from server.app import build_app
    from server.config import ServerConfig

    fake = FakeClient()
    config = ServerConfig(served_model_names=("a", "alias"), extra_model_names=("b",))
    user = [{"role": "user", "content": "hi"}]

    async def go() -> tuple[list[httpx.Response], httpx.Response]:
        app = build_app(config, fake, tokenizer=tiny_tokenizer())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            body = {"messages": user}
            responses = [
                await http.post("/v1/chat/completions", json={**body, "model": m})
                for m in ("b", "alias", "zzz")
            ]
            return responses, await http.get("/v1/models")

    responses, models = asyncio.run(go())
    assert [r.status_code for r in responses] == [200, 200, 404]
    assert responses[0].json()["model"] == "b" and responses[1].json()["model"] == "a"
    assert [msg.model for msg in fake.requests] == ["b", ""]  # "" = the first model
    assert [m["id"] for m in models.json()["data"]] == ["a", "alias", "b"]


def test_cli_names_extra_models_and_checks_their_tokenizer(
    tmp_path: Path, tiny_llama_dir: Path, other_llama_dir: Path
):
    import shutil

    from server.cli import _extra_model_names, build_parser

    args = build_parser().parse_args(["serve", "--model", "x", "--model", "y"])
    assert args.model == ["x", "y"] and build_parser().parse_args(["serve"]).model is None
    assert _extra_model_names([str(other_llama_dir)], tiny_llama_dir, ("a",)) == (other_llama_dir.name,)
    with pytest.raises(SystemExit, match="taken"):
        _extra_model_names([str(other_llama_dir)], tiny_llama_dir, (other_llama_dir.name,))
    copy = tmp_path / "with-tokenizer"
    shutil.copytree(other_llama_dir, copy)
    (copy / "tokenizer.json").write_text("{}")
    with pytest.raises(SystemExit, match="tokenizer differs"):
        _extra_model_names([str(copy)], tiny_llama_dir, ("a",))
