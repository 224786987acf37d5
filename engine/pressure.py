"""The pressure ladder's last rungs: which running request gives its KV back (recompute) when a running request
cannot get a block. The cheaper rungs live elsewhere: stop admitting (the scheduler admits nothing in a step that
preempted), lend unwritten KV and draw from the reserve (engine/kv_ledger.py). QLM eviction (`ClassVictim`; swap
or recompute, engine/swap.py) and KunServe drop plug in here.

`candidates` are the running requests not yet scheduled this step, in the scheduler's running order.
"""

from __future__ import annotations

from typing import Protocol

from engine.kv_ledger import KVLedger, NoReservations
from engine.ordering import Ordering, predicted_remaining, true_remaining
from engine.request import Request


class VictimSelector(Protocol):
    def select_victim(self, candidates: list[Request], ledger: KVLedger | NoReservations) -> Request: ...


class NewestVictim:
    """vLLM V1: the last of the running order (with FCFS, the newest admitted), preempted by recompute."""

    def select_victim(self, candidates: list[Request], ledger: KVLedger | NoReservations) -> Request:
        return candidates[-1]


class LedgerVictim:
    """Never the lender: a request running past its reservation unreserved goes first, then a borrower (admitted
    only thanks to KVC pipelining), then batch-class work before interactive (QLM), and among equals the newest
    admission. A request inside its own reservation is chosen only when nothing else is left."""

    def _rank(self, request: Request, ledger: KVLedger | NoReservations) -> tuple[bool, bool, bool, int]:
        entry = ledger.entry(request.request_id)
        if entry is None:
            return (False, False, request.slo_class != "interactive", -1)
        return (entry.is_overrun, entry.is_borrower, request.slo_class != "interactive", entry.admission_seq)

    def select_victim(self, candidates: list[Request], ledger: KVLedger | NoReservations) -> Request:
        return max(candidates, key=lambda r: self._rank(r, ledger))


class LongestRemainingVictim:
    """SRPT's victim: the request with the most true remaining work."""

    def select_victim(self, candidates: list[Request], ledger: KVLedger | NoReservations) -> Request:
        return max(candidates, key=true_remaining)


class LatestDeadlineVictim:
    """EDF's victim: the running request whose next deadline is furthest away, the newest among equals."""

    def select_victim(self, candidates: list[Request], ledger: KVLedger | NoReservations) -> Request:
        return max(enumerate(candidates), key=lambda ir: (ir[1].next_deadline, ir[0]))[1]


class ClassVictim:
    """QLM eviction (DESIGN §4 pressure ladder, rung 4): the lowest SLO class first (the most relaxed target),
    then the one holding the most KV (it frees the most), then the longest predicted remaining length (it would
    hold that KV longest)."""

    @staticmethod
    def rank(request: Request) -> tuple[float, int, float]:
        return (request.slo.tightness, len(request.block_ids), predicted_remaining(request))

    def select_victim(self, candidates: list[Request], ledger: KVLedger | NoReservations) -> Request:
        return max(candidates, key=self.rank)


class FairVictim:
    """Justitia / VTC: the running request the fair order ranks last (Justitia: the app with the latest virtual
    finish tag, its newest request; VTC: the tenant with the largest counter). vLLM's newest-admitted victim would
    often be the head app's own request, just admitted ahead of everyone: preempting it undoes the order."""

    def __init__(self, ordering: Ordering) -> None:
        self.ordering = ordering

    def select_victim(self, candidates: list[Request], ledger: KVLedger | NoReservations) -> Request:
        return self.ordering.waiting_order(candidates)[-1]
