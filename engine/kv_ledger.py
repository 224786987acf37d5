"""KV ledger: per-request KV reservations over the paged block manager (EcoServe exact allocation + KVC pipelining).

The block manager hands out physical blocks lazily, a block at a time as a request writes. The ledger decides
whether a request may *start*, from what it is predicted to need, so that decode does not fail for memory:

    reservation   R_i = prompt + bucket(rl_q) tokens, capped at min(prompt + max_tokens, max_model_len)
    usage curve   u_i(t) = R_i - 1 + slack - (e_i - t)   for 0 <= t <= e_i, then 0 (freed at completion)
                  e_i = steps to its predicted last step (remaining predicted tokens - 1 + prefill steps),
                  slack = block_size - 1 (a request's last block is partly empty)

    flat (exact allocation, `lending=False`):   Σ_i (R_i + slack) + (R_new + slack) <= C
    KVC pipelining (`lending=True`):            max_t Σ_i u_i(t) + u_new(t) <= C
    C = pool - reserve (the global reserve, `reserve_fraction` of the pool)

With lending a short request lives in the not-yet-written tail of a long one's reservation: it is admitted if it
finishes before the long one's frontier needs the space. Σ_i u_i(t) only rises between completions, so the check
runs at the sorted completion times (the profile, rebuilt O(n log n) after a change, then O(log n) per check).

With grouping, requests predicted to finish in the same window of `bucket_width` steps form one group whose curve
is the sum of its members' ramps held until the group's last member ends (EcoServe SyncDecoupled: GTs of one RL
bucket are admitted and accounted together); fewer events, slightly more conservative.

Overrun (a request that reaches R_i without finishing): re-predict by doubling the reserved output length (rounded
up to a bucket, capped at max_tokens) and draw the extension from the reserve, i.e. check it against the whole pool
rather than C. If even the pool cannot take it, the request keeps running on free blocks, unreserved
(`is_overrun`), and is the pressure ladder's first victim. In a paged pool nobody sits at a fixed address inside a
lender's tail, so a borrower "moves" simply by taking any free block; the lender's own reservation is never given
away: the victims are overrunners and borrowers first (engine/pressure.py).

Torch-free; bucket edges come from predictor/buckets.py (pure Python).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from engine.block_manager import cdiv
from engine.request import Request
from predictor.buckets import BucketSpec

_INF = float("inf")


@dataclass
class Reservation:
    request_id: str
    num_prompt_tokens: int
    reserved_tokens: int  # R_i: prompt + reserved output tokens; grows on re-prediction
    group_key: int
    admission_seq: int  # admission order (the pressure ladder's "newest")
    is_borrower: bool = False  # admitted only thanks to lending: its flat reservation did not fit
    is_overrun: bool = False  # outgrew R_i and the pool could not extend it: running unreserved
    num_extensions: int = 0
    last_extension_try: int = -1  # tokens at the last failed try; retried once per block


@dataclass(frozen=True)
class LedgerConfig:
    reserve_fraction: float = 0.05  # of the pool, held back for under-predicted requests (CacheOPT)
    lending: bool = True  # KVC pipelining (future-feasibility); False: exact flat allocation
    grouping: bool = True  # account GTs per predicted-finish group
    bucket_width: int = 64  # RL bucket (tokens), and the group window (steps)
    reserve_max: bool = False  # reserve prompt + max_tokens (Orca/TGI) instead of the prediction
    max_num_batched_tokens: int = 2048  # to estimate how many steps a prefill takes


class NoReservations:
    """vLLM's memory model: no reservations, blocks on demand, preemption when the pool runs dry. Every verb of
    KVLedger, doing nothing, so the scheduler loop has no `if ledger`."""

    def start_step(self, step: int) -> None:
        pass

    def can_admit(self, request: Request) -> bool:
        return True

    def admit(self, request: Request) -> None:
        pass

    def release(self, request: Request) -> None:
        pass

    def ensure(self, request: Request, num_tokens_after: int) -> None:
        pass

    def entry(self, request_id: str) -> Reservation | None:
        return None

    def check_invariants(self, running: list[Request]) -> None:
        pass


class KVLedger:
    def __init__(self, num_blocks: int, block_size: int, max_model_len: int, config: LedgerConfig) -> None:
        self.config = config
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.buckets = BucketSpec("linear", config.bucket_width)
        self.pool_tokens = num_blocks * block_size
        self.num_reserve_tokens = int(num_blocks * config.reserve_fraction) * block_size
        self.capacity_tokens = self.pool_tokens - self.num_reserve_tokens  # C
        self.slack = block_size - 1
        self.entries: dict[str, Reservation] = {}
        self._requests: dict[str, Request] = {}
        self._groups: dict[int, set[str]] = {}
        self._step = 0
        self._num_admitted = 0
        self._flat_tokens = 0  # Σ (R_i + slack) over entries
        self._profile: _Profile | None = None  # None: rebuild before the next check
        self.num_borrowers_total = 0
        self.num_extensions_total = 0
        self.num_overruns_total = 0

    # ---- reservations ------------------------------------------------------------------------------------

    def max_reservation(self, request: Request) -> int:
        return min(request.max_total_tokens, self.max_model_len)

    def initial_reservation(self, request: Request) -> int:
        """prompt + bucket(rl_q); an untagged request (rl_q <= 0) reserves max_tokens. A re-admitted (preempted)
        request that already outgrew its prediction gets the overrun rule applied until it is covered."""
        cap = self.max_reservation(request)
        if self.config.reserve_max or request.rl_q <= 0:
            return cap
        output = self.buckets.bucket(request.rl_q)
        while (
            request.num_prompt_tokens + output <= request.num_tokens
            and request.num_prompt_tokens + output < cap
        ):
            output = self._repredict(output)
        return min(request.num_prompt_tokens + output, cap)

    def _repredict(self, num_output_tokens: int) -> int:
        """The overrun rule: double the reserved output length, rounded up to a bucket edge."""
        return self.buckets.bucket(2 * num_output_tokens)

    @property
    def num_reserved_tokens(self) -> int:
        return sum(e.reserved_tokens for e in self.entries.values())

    def entry(self, request_id: str) -> Reservation | None:
        return self.entries.get(request_id)

    # ---- the usage curve of one request ------------------------------------------------------------------

    def _end_step(self, request: Request, reserved_tokens: int) -> int:
        """e_i: steps from now to the request's predicted last step (a decode adds one token per step; a prompt
        still to prefill takes about ceil(uncomputed / budget) steps first)."""
        remaining = max(reserved_tokens - request.num_tokens, 1)  # predicted tokens still to come
        prefill_steps = cdiv(
            max(request.num_prompt_tokens - request.num_computed_tokens, 0),
            self.config.max_num_batched_tokens,
        )
        return remaining - 1 + prefill_steps

    def _group_key(self, end_step: int) -> int:
        """Requests predicted to finish in the same window of bucket_width steps share a group."""
        return (self._step + end_step) // self.config.bucket_width

    # ---- admission ---------------------------------------------------------------------------------------

    def start_step(self, step: int) -> None:
        """The scheduler's step counter: group keys are absolute predicted finish windows. Curves are relative to
        now, so the profile is rebuilt (lazily, at the first check) once per step."""
        self._step = step
        self._profile = None

    def can_admit(self, request: Request) -> bool:
        if (
            not self.entries
        ):  # liveness: alone, anything the pool can hold runs (the scheduler refused the rest)
            return True
        reserved = self.initial_reservation(request)
        if self._flat_tokens + reserved + self.slack <= self.capacity_tokens:
            return True  # fits without borrowing anybody's tail
        if not self.config.lending:
            return False
        end = self._end_step(request, reserved)
        peak = reserved - 1 + self.slack
        profile = self._profile_or_build()
        if self.config.grouping:  # joining a group: its ramp is held until the group's last member ends
            group_end = max(end, profile.group_ends.get(self._group_key(end), end))
            end, peak = group_end, peak + group_end - end
        return profile.fits(peak, end, self.capacity_tokens)

    def admit(self, request: Request) -> None:
        """Record the reservation of a request the scheduler has just admitted (can_admit was True)."""
        reserved = self.initial_reservation(request)
        is_borrower = self._flat_tokens + reserved + self.slack > self.capacity_tokens
        entry = Reservation(
            request.request_id,
            request.num_prompt_tokens,
            reserved,
            self._group_key(self._end_step(request, reserved)),
            self._num_admitted,
            is_borrower,
        )
        self._num_admitted += 1
        self.num_borrowers_total += is_borrower
        self._add(request, entry)

    def release(self, request: Request) -> None:
        """The request finished, was aborted or was preempted: its curve leaves the plan."""
        entry = self.entries.pop(request.request_id, None)
        if entry is None:
            return
        del self._requests[request.request_id]
        self._leave_group(entry)
        self._flat_tokens -= entry.reserved_tokens + self.slack
        self._profile = None

    def _add(self, request: Request, entry: Reservation) -> None:
        self.entries[request.request_id] = entry
        self._requests[request.request_id] = request
        self._groups.setdefault(entry.group_key, set()).add(request.request_id)
        self._flat_tokens += entry.reserved_tokens + self.slack
        self._profile = None

    def _leave_group(self, entry: Reservation) -> None:
        members = self._groups[entry.group_key]
        members.discard(entry.request_id)
        if not members:
            del self._groups[entry.group_key]

    # ---- overrun -----------------------------------------------------------------------------------------

    def ensure(self, request: Request, num_tokens_after: int) -> None:
        """Called before a running request gets blocks for `num_tokens_after` tokens. If that passes its
        reservation, re-predict (doubling) and extend from the reserve, at least one block ahead (a bucket is
        >= a block), so the allocation that follows is covered."""
        entry = self.entries[request.request_id]
        if num_tokens_after <= entry.reserved_tokens:
            return
        cap = self.max_reservation(request)
        if entry.reserved_tokens >= cap or num_tokens_after < entry.last_extension_try + self.block_size:
            return
        output = entry.reserved_tokens - entry.num_prompt_tokens
        while entry.num_prompt_tokens + output < num_tokens_after:
            output = self._repredict(output)
        extended = min(entry.num_prompt_tokens + output, cap)
        self.release(request)
        fits = self._extension_fits(request, extended)
        if fits:
            entry.reserved_tokens = extended
            entry.num_extensions += 1
            entry.is_overrun = False
            self.num_extensions_total += 1
        else:
            entry.last_extension_try = num_tokens_after
            self.num_overruns_total += not entry.is_overrun
            entry.is_overrun = True
        entry.group_key = self._group_key(self._end_step(request, entry.reserved_tokens))
        self._add(request, entry)

    def _extension_fits(self, request: Request, reserved: int) -> bool:
        """The reserve is for exactly this: check against the whole pool, not C."""
        if self._flat_tokens + reserved + self.slack <= self.pool_tokens:
            return True
        if not self.config.lending:
            return False
        end = self._end_step(request, reserved)
        return self._profile_or_build().fits(reserved - 1 + self.slack, end, self.pool_tokens)

    # ---- profile -----------------------------------------------------------------------------------------

    def _profile_or_build(self) -> _Profile:
        if self._profile is None:
            self._profile = self._build_profile()
        return self._profile

    def _build_profile(self) -> _Profile:
        """Ramps as (end step, Σ intercepts, count), one per group (or per request without grouping)."""
        ramps: dict[object, list[int]] = {}
        for request_id, entry in self.entries.items():
            request = self._requests[request_id]
            end = self._end_step(request, entry.reserved_tokens)
            intercept = entry.reserved_tokens - 1 + self.slack - end  # u(t) = intercept + t
            key = entry.group_key if self.config.grouping else request_id
            ramp = ramps.setdefault(key, [end, 0, 0])
            ramp[0] = max(ramp[0], end)
            ramp[1] += intercept
            ramp[2] += 1
        group_ends = {key: ramp[0] for key, ramp in ramps.items()} if self.config.grouping else {}
        return _Profile(sorted(ramps.values()), group_ends)

    def peak_tokens(self) -> int:
        """max_t Σ_i u_i(t) of the current plan (0 when empty)."""
        return self._profile_or_build().peak

    # ---- checks ------------------------------------------------------------------------------------------

    def check_invariants(self, running: list[Request]) -> None:
        assert set(self.entries) == {r.request_id for r in running}, "ledger entries differ from running"
        assert self._flat_tokens == sum(e.reserved_tokens + self.slack for e in self.entries.values())
        assert {i for members in self._groups.values() for i in members} == set(self.entries)
        for request in running:
            entry = self.entries[request.request_id]
            assert entry.num_prompt_tokens <= entry.reserved_tokens <= self.max_reservation(request), entry
            if not entry.is_overrun:
                held = len(request.block_ids) * self.block_size
                assert held <= entry.reserved_tokens + self.slack, f"{request} writes past its reservation"
        if not self.config.lending and len(self.entries) > 1:  # flat reservations never exceed the pool
            assert self._flat_tokens <= self.pool_tokens, f"{self._flat_tokens=} > {self.pool_tokens}"


class _Profile:
    """Σ_i u_i(t) at the sorted completion times, with what a new ramp may add before each of them.

    ends[k] (ascending) is a completion time; level[k] = Σ over ramps alive at ends[k] of (intercept + ends[k]).
    A new ramp (intercept a, end e) raises level[k] by a + ends[k] for every ends[k] <= e, and adds its own
    peak a + e at e on top of the ramps alive then. room[k] = min over j <= k of (C - level[j] - ends[j])."""

    def __init__(self, ramps: list[list[int]], group_ends: dict[object, int]) -> None:
        self.group_ends = group_ends  # group key -> the step its last member is predicted to end
        self.ends = [r[0] for r in ramps]
        n = len(ramps)
        self._suffix_intercepts = [0] * (n + 1)
        self._suffix_counts = [0] * (n + 1)
        for k in range(n - 1, -1, -1):
            self._suffix_intercepts[k] = self._suffix_intercepts[k + 1] + ramps[k][1]
            self._suffix_counts[k] = self._suffix_counts[k + 1] + ramps[k][2]
        self.levels = [self.level_at(end) for end in self.ends]
        self.peak = max(self.levels, default=0)
        self._slack_by_capacity: dict[int, list[float]] = {}

    def level_at(self, t: int) -> int:
        """Σ of the ramps still alive at step t (end >= t)."""
        lo = bisect.bisect_left(self.ends, t)
        return self._suffix_intercepts[lo] + t * self._suffix_counts[lo]

    def _room(self, capacity: int) -> list[float]:
        if (room := self._slack_by_capacity.get(capacity)) is None:
            room, best = [], _INF
            for end, level in zip(self.ends, self.levels, strict=True):
                best = min(best, capacity - level - end)
                room.append(best)
            self._slack_by_capacity[capacity] = room
        return room

    def fits(self, peak: int, end: int, capacity: int) -> bool:
        """Whether a ramp reaching `peak` tokens at step `end` (u(t) = peak - end + t) keeps every point it
        raises (t <= end) at or under capacity. Later points are not its doing: an extension may have pushed them
        over, and a request that ends before then does not make them worse."""
        if self.level_at(end) + peak > capacity:
            return False
        hi = bisect.bisect_right(self.ends, end)
        return hi == 0 or peak - end <= self._room(capacity)[hi - 1]
