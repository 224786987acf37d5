"""QLM's LP reorder (papers.md §4.3, policy "lp"), solved exactly by HiGHS (scipy.optimize.milp) for small virtual
queues; None (the caller falls back to EDF) for a larger queue, an infeasible program or a failed solve.

For the n groups of one replica's virtual queue, with T_i the seconds group i runs (its tokens' per-group CLT bound
at Θ, plus its swap-ins and model load), D_i its deadline (the earliest member's next one, absolute) and S_0 = now +
the running work's seconds:

    x[i,p] ∈ {0,1}            group i at position p;  Σ_p x[i,p] = 1,  Σ_i x[i,p] = 1
    start(p) = S_0 + Σ_{q<p} Σ_j T_j · x[j,q]
    start(p) ≤ D_i + M · (1 − x[i,p])        every group starts by its deadline (the code's penalty ≤ 0)
    minimize Σ_p start(p)                    the code's Σ penalty, whose other terms are constants here

The public code's program fills every (GPU, slot), which is infeasible past one GPU (defect 4), and references
undefined names (defect 3); here the program is per replica (the balancer places groups on replicas), with n slots
for n groups. Model changes are not variables: a load time counts in the group that carries it (engine/qlm.py
`add_model_loads`). The per-group bounds add up to more than the queue's joint CLT bound, so the program is
conservative. Torch-free; scipy is a dependency already (predictor/).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

MAX_LP_GROUPS = 8  # n² binaries: 64 at 8 groups, a few milliseconds per solve


def lp_order(
    seconds: list[float], deadlines: list[float], start_s: float, max_groups: int = MAX_LP_GROUPS
) -> list[int] | None:
    """The group indices in the order that minimizes the summed start times with every group starting by its
    deadline (module docstring); None when n > max_groups or no order meets every deadline."""
    n = len(seconds)
    if n == 0 or n > max_groups:
        return None
    t = np.asarray(seconds, dtype=float)
    d = np.asarray(deadlines, dtype=float)
    if not np.all(np.isfinite(t)):
        return None
    d = np.minimum(d, start_s + t.sum() + 1.0)  # an infinite deadline is never binding
    big_m = t.sum() + max(0.0, start_s - d.min()) + 1.0

    def var(i: int, p: int) -> int:
        return i * n + p

    rows, lower, upper = [], [], []
    for i in range(n):  # each group at one position
        row = np.zeros(n * n)
        row[[var(i, p) for p in range(n)]] = 1
        rows.append(row), lower.append(1), upper.append(1)
    for p in range(n):  # each position holds one group
        row = np.zeros(n * n)
        row[[var(i, p) for i in range(n)]] = 1
        rows.append(row), lower.append(1), upper.append(1)
    for i in range(n):  # Σ_{q<p} Σ_j T_j x[j,q] + M x[i,p] ≤ D_i − S_0 + M
        for p in range(n):
            row = np.zeros(n * n)
            for q in range(p):
                for j in range(n):
                    row[var(j, q)] = t[j]
            row[var(i, p)] += big_m
            rows.append(row), lower.append(-np.inf), upper.append(d[i] - start_s + big_m)
    cost = np.array(
        [t[j] * (n - 1 - q) for j in range(n) for q in range(n)]
    )  # T_j delays the n-1-q later slots
    result = milp(
        cost,
        constraints=LinearConstraint(np.array(rows), lower, upper),
        integrality=np.ones(n * n),
        bounds=Bounds(0, 1),
        options={"time_limit": 0.05},
    )
    if result.status != 0 or result.x is None:
        return None
    x = result.x.reshape(n, n)
    return [int(np.argmax(x[:, p])) for p in range(n)]
