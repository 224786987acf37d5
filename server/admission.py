"""Admission limits (`--max-queued-requests`, `--max-queued-tokens` and their `-per-tenant` forms).

"Queued" means admitted by the server and not yet finished: from the AddRequest until the request's
generation ends however it ends (finish, engine error, abort, client disconnect), whether the engine still
has it waiting or is already running it. Tokens are those requests' prompt tokens. A limit of 0 is no limit.
A request over any limit is refused before it reaches the engine with HTTP 429 (OpenAI error shape,
`Retry-After`), and counted as `kairos:requests_rejected_total{reason}`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from server.schema import RequestError

REJECT_REASONS = ("queued_requests", "queued_tokens", "tenant_queued_requests", "tenant_queued_tokens")


@dataclass(frozen=True)
class AdmissionLimits:
    max_requests: int = 0
    max_tokens: int = 0
    max_requests_per_tenant: int = 0
    max_tokens_per_tenant: int = 0


class Overloaded(RequestError):
    def __init__(self, message: str, reason: str):
        super().__init__(message, status=429, type="RateLimitError")
        self.reason = reason


class Ticket:
    """One admitted request's hold on the counts; `release` is idempotent, so every exit path may call it."""

    def __init__(self, admission: Admission, tenant: str, tokens: int) -> None:
        self._admission = admission
        self.tenant = tenant
        self.tokens = tokens
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._release(self)


class Admission:
    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self.requests = 0
        self.tokens = 0
        self.tenant_requests: Counter[str] = Counter()
        self.tenant_tokens: Counter[str] = Counter()

    def admit(self, tenant: str, tokens: int) -> Ticket:
        """Raise Overloaded if this request would go over a limit; otherwise count it in."""
        lim = self.limits
        if lim.max_requests and self.requests + 1 > lim.max_requests:
            raise Overloaded(
                f"the server has {self.requests} queued requests (limit {lim.max_requests})",
                "queued_requests",
            )
        if lim.max_tokens and self.tokens + tokens > lim.max_tokens:
            raise Overloaded(
                f"the server has {self.tokens} queued prompt tokens and this request has {tokens} "
                f"(limit {lim.max_tokens})",
                "queued_tokens",
            )
        if lim.max_requests_per_tenant and self.tenant_requests[tenant] + 1 > lim.max_requests_per_tenant:
            raise Overloaded(
                f"tenant {tenant!r} has {self.tenant_requests[tenant]} queued requests "
                f"(limit {lim.max_requests_per_tenant})",
                "tenant_queued_requests",
            )
        if lim.max_tokens_per_tenant and self.tenant_tokens[tenant] + tokens > lim.max_tokens_per_tenant:
            raise Overloaded(
                f"tenant {tenant!r} has {self.tenant_tokens[tenant]} queued prompt tokens and this "
                f"request has {tokens} (limit {lim.max_tokens_per_tenant})",
                "tenant_queued_tokens",
            )
        self.requests += 1
        self.tokens += tokens
        self.tenant_requests[tenant] += 1
        self.tenant_tokens[tenant] += tokens
        return Ticket(self, tenant, tokens)

    def _release(self, ticket: Ticket) -> None:
        self.requests -= 1
        self.tokens -= ticket.tokens
        self.tenant_requests[ticket.tenant] -= 1
        self.tenant_tokens[ticket.tenant] -= ticket.tokens
        if self.tenant_requests[ticket.tenant] <= 0:  # forget idle tenants
            del self.tenant_requests[ticket.tenant]
            self.tenant_tokens.pop(ticket.tenant, None)
