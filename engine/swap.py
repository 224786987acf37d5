"""Host swap space for QLM eviction: which host blocks hold swapped-out KV, and whether a swap beats a recompute.

The scheduler owns block ids on both sides; the runner owns the bytes. A swap-out (device block → host block)
and a swap-in (host block → device block) travel in the step's `SchedulerOutput` as block-id pairs, as vLLM v0's
`blocks_to_swap_out` / `blocks_to_swap_in`; the runner applies every swap-out, then every swap-in, before the
forward pass. So a device block freed by a swap-out may be refilled by a swap-in or by the forward pass of the
same step. Host blocks released by a swap-in return to the pool only at the next step (`release_after_step`,
then `start_step`), so a swap-out in the same step cannot overwrite them before they are read.

Price (papers.md §5.5, CacheOPT's rule): swap when moving the KV out and back in is faster than recomputing it,

    swap      2 · blocks · seconds_per_block          (bytes per block / host bandwidth, measured by the runner)
    recompute tokens · seconds per prefill token      (measured online from the scheduler's steps)

Before any prefill step has been timed, swap: it never redoes work. Torch-free.
"""

from __future__ import annotations


class SwapSpace:
    def __init__(self, num_blocks: int = 0, seconds_per_block: float = 0.0) -> None:
        self.num_blocks = num_blocks
        self.seconds_per_block = seconds_per_block  # one block, one direction
        self._free_ids = list(range(num_blocks - 1, -1, -1))  # popped from the end: block 0 first
        self._released: list[int] = []  # swapped in (or aborted) this step; free from the next step on

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_ids)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free_ids)

    def allocate(self, num_blocks: int) -> list[int]:
        if not self.can_allocate(num_blocks):
            raise ValueError(f"swap space has {len(self._free_ids)} free host blocks, {num_blocks} asked")
        return [self._free_ids.pop() for _ in range(num_blocks)]

    def release_after_step(self, host_block_ids: list[int]) -> None:
        self._released.extend(host_block_ids)

    def start_step(self) -> None:
        self._free_ids.extend(reversed(self._released))
        self._released = []

    def prefers_swap(self, num_blocks: int, num_tokens: int, seconds_per_prefill_token: float | None) -> bool:
        """Swap rather than recompute `num_tokens` tokens held in `num_blocks` blocks (module docstring)."""
        if num_blocks == 0 or not self.can_allocate(num_blocks):
            return False
        if seconds_per_prefill_token is None:
            return True
        return 2 * num_blocks * self.seconds_per_block < num_tokens * seconds_per_prefill_token

    def check_invariants(self, swapped_host_ids: list[int]) -> None:
        """Every host block is free, pending release, or held by exactly one swapped-out request."""
        held = sorted(self._free_ids + self._released + swapped_host_ids)
        assert held == list(range(self.num_blocks)), "host blocks leaked or held twice"
