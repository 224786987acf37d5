"""The contract between the scheduler and a model runner: what to compute this step, and what came out.

Torch-free plain data. The runner is stateless across steps except for per-request sampling generators,
which it drops when a request id appears in `finished_request_ids`.

One step's tokens are laid out flat, request after request (varlen, no padding):

    request:      r0 (prefill chunk, 5 tokens)   r1 (decode)   r2 (decode)
    token_ids:    [t t t t t]                    [t]           [t]
    positions:    [8 9 10 11 12]                 [40]          [7]      # position of each token in its sequence
    context_len:  13                             41            8        # KV length after this step's tokens
    slot:         block_table[pos // B] * B + pos % B                    # where each token's K/V is written
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.protocol import SamplingParams


@dataclass(frozen=True)
class ScheduledRequest:
    request_id: str
    token_ids: list[int]  # tokens to run this step (a prefill chunk, or the one last sampled token)
    start_position: int  # position of token_ids[0]; equals the number of tokens already in KV
    block_ids: list[int]  # the request's whole block table (covers start_position + len(token_ids))
    sampling: SamplingParams
    needs_sample: bool  # True when this chunk reaches the end of the known tokens: sample one token
    num_generated: int = 0  # output tokens so far (sampling generators are advanced once per sample)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.start_position + len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    finished_request_ids: list[str] = field(default_factory=list)  # freed since the last step
    preempted_request_ids: list[str] = field(default_factory=list)  # preempted this step (recompute or swap)
    # QLM eviction (engine/swap.py): KV block copies the runner makes before the forward pass, swap-outs first.
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, host block)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host block, device block)
    # QLM model swapping (engine/model_swap.py): load this model's weights after the swaps, before the forward pass.
    load_model: str = ""

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.scheduled)

    @property
    def is_empty(self) -> bool:
        """Nothing for the runner: no tokens and no KV to move (a lone swap-out must still run)."""
        return not self.scheduled and not self.swap_out and not self.swap_in and not self.load_model


@dataclass(frozen=True)
class ModelOutput:
    """One sampled token per scheduled request that had needs_sample; keyed by request id."""

    sampled: dict[str, int]
    elapsed_seconds: float = 0.0
    model_load_seconds: float = 0.0  # the SchedulerOutput's load_model took this long (0: none asked)
