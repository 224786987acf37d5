"""A fake model runner that checks the scheduler's bookkeeping through a real paged "KV cache".

It stores each token id in the slot the scheduler assigns and, to sample, reads the whole context back through
the request's block table. Its next token is a fixed function of that context, so wrong block tables, positions
or prefix-cache hits change the output, which the tests compare with `reference_generate`.
"""

from __future__ import annotations

from engine.batch import ModelOutput, SchedulerOutput

VOCAB = 997


def next_token(context: list[int]) -> int:
    acc = len(context)
    for i, t in enumerate(context):
        acc = (acc * 31 + t * (i + 7)) % 1_000_003
    return 3 + acc % (VOCAB - 3)  # ids 0..2 are special (EOS = 2) and never sampled by accident


def reference_generate(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


class FakeRunner:
    model_name = "fake"
    device = "cpu"
    eos_token_ids = (2,)

    def __init__(
        self, num_kv_blocks: int, block_size: int, max_model_len: int = 4096, num_host_blocks: int = 0
    ) -> None:
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.slots: list[int | None] = [None] * (num_kv_blocks * block_size)
        self.num_host_blocks = num_host_blocks  # swap space (QLM eviction): host blocks of token slots
        self.host_slots: list[int | None] = [None] * (num_host_blocks * block_size)
        self.swap_seconds_per_block = 0.0
        self.forced: dict[str, list[int]] = {}  # request_id -> tokens to emit instead (to test EOS/stop ids)
        self.num_steps = 0

    def _slot(self, block_ids: list[int], position: int) -> int:
        return block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def _copy_block(self, src: list, src_block: int, dst: list, dst_block: int) -> None:
        bs = self.block_size
        dst[dst_block * bs : (dst_block + 1) * bs] = src[src_block * bs : (src_block + 1) * bs]

    def execute(self, output: SchedulerOutput) -> ModelOutput:
        self.num_steps += 1
        for device_block, host_block in output.swap_out:  # swap-outs first, as the real runner
            self._copy_block(self.slots, device_block, self.host_slots, host_block)
        for host_block, device_block in output.swap_in:
            self._copy_block(self.host_slots, host_block, self.slots, device_block)
        sampled = {}
        for item in output.scheduled:
            assert item.context_len <= len(item.block_ids) * self.block_size, "block table too short"
            for offset, token_id in enumerate(item.token_ids):
                self.slots[self._slot(item.block_ids, item.start_position + offset)] = token_id
            if not item.needs_sample:
                continue
            context = [self.slots[self._slot(item.block_ids, p)] for p in range(item.context_len)]
            forced = self.forced.get(item.request_id)
            sampled[item.request_id] = forced.pop(0) if forced else next_token(context)
        return ModelOutput(sampled)
