"""Plan search: which units run low, as a 0/1 integer program solved exactly.

Variables: x_u = 1 when unit u runs low; y_e = 1 when edge e joins units of different dtypes
(a cast). Minimize the estimated step time (unit times, plus cast times on the y edges) plus
an optional weighted activation-memory term, subject to
- hard constraints: x_u = 0 for every unit where low precision overflows or goes non-finite;
- the error budget: the units' error contributions summed over the low units stay within it;
- y_e >= x_src - x_dst and y_e >= x_dst - x_src (minimization makes y_e = |x_src - x_dst|).

`solve_milp` uses scipy.optimize.milp (HiGHS) with a zero optimality gap; `solve_exhaustive`
enumerates all 2^n plans with the same `objective` and `feasible`, as a test reference.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from precision_doctor.errors import PrecisionDoctorError

EXHAUSTIVE_MAX_UNITS = 20
_BUDGET_SLACK = 1e-9  # relative: float sums in two summation orders must agree on feasibility


@dataclass(frozen=True)
class PlanProblem:
    names: tuple[str, ...]
    fp32_time_s: tuple[float, ...]
    low_time_s: tuple[float, ...]
    fp32_activation_bytes: tuple[int, ...]
    low_activation_bytes: tuple[int, ...]
    edges: tuple[tuple[int, int, float], ...]
    """(producer index, consumer index, cast time in seconds)."""
    error: tuple[float, ...]
    """Each unit's contribution to the final-loss relative error when it runs low."""
    error_budget: float
    forced_fp32: frozenset[int]
    memory_weight_s_per_byte: float = 0.0

    def objective(self, low: Sequence[bool]) -> float:
        t = sum(lo if x else f for x, f, lo in zip(low, self.fp32_time_s, self.low_time_s, strict=True))
        t += sum(c for i, j, c in self.edges if low[i] != low[j])
        mem = sum(
            lo if x else f for x, f, lo in zip(low, self.fp32_activation_bytes, self.low_activation_bytes, strict=True)
        )
        return t + self.memory_weight_s_per_byte * mem

    def error_of(self, low: Sequence[bool]) -> float:
        return sum(e for x, e in zip(low, self.error, strict=True) if x)

    def feasible(self, low: Sequence[bool]) -> bool:
        if any(low[i] for i in self.forced_fp32):
            return False
        return self.error_of(low) <= self.error_budget * (1 + _BUDGET_SLACK) + 1e-300


@dataclass(frozen=True)
class Solution:
    low: tuple[bool, ...]
    objective: float


def solve_milp(problem: PlanProblem) -> Solution:
    # Imported here: scipy.optimize takes ~0.2 s to import, which `analyze` never needs.
    from scipy.optimize import Bounds, LinearConstraint, milp

    n, m = len(problem.names), len(problem.edges)
    if n == 0:
        return Solution((), 0.0)
    # Scale to O(1): HiGHS' tolerances are absolute.
    scale = max(sum(problem.fp32_time_s), 1e-30)
    w = problem.memory_weight_s_per_byte
    c = np.zeros(n + m)
    for u in range(n):
        c[u] = (problem.low_time_s[u] - problem.fp32_time_s[u]) + w * (
            problem.low_activation_bytes[u] - problem.fp32_activation_bytes[u]
        )
    for k, (_, _, cast) in enumerate(problem.edges):
        c[n + k] = cast
    c /= scale

    rows: list[np.ndarray] = []
    lo: list[float] = []
    hi: list[float] = []
    for k, (i, j, _) in enumerate(problem.edges):
        for sign in (1.0, -1.0):
            r = np.zeros(n + m)
            r[n + k] = 1.0
            r[i] -= sign
            r[j] += sign
            rows.append(r)
            lo.append(0.0)
            hi.append(np.inf)
    if problem.error_budget < float("inf"):
        r = np.zeros(n + m)
        budget = max(problem.error_budget, 1e-300)
        r[:n] = np.asarray(problem.error) / budget
        rows.append(r)
        lo.append(-np.inf)
        hi.append(1.0 + _BUDGET_SLACK)
    upper = np.ones(n + m)
    for i in problem.forced_fp32:
        upper[i] = 0.0
    constraints = [LinearConstraint(np.vstack(rows), lo, hi)] if rows else []
    res = milp(
        c,
        integrality=np.ones(n + m),
        bounds=Bounds(np.zeros(n + m), upper),
        constraints=constraints,
        options={"mip_rel_gap": 0.0},
    )
    if res.x is None:
        raise PrecisionDoctorError(f"the plan search found no solution: {res.message}")
    low = tuple(bool(round(v)) for v in res.x[:n])
    return Solution(low, problem.objective(low))


def solve_exhaustive(problem: PlanProblem) -> Solution:
    """Every one of the 2^n plans; the reference the MILP is tested against."""
    n = len(problem.names)
    if n > EXHAUSTIVE_MAX_UNITS:
        raise ValueError(f"exhaustive search over {n} units is 2^{n} plans")
    best: Solution | None = None
    for low in itertools.product((False, True), repeat=n):
        if not problem.feasible(low):
            continue
        obj = problem.objective(low)
        if best is None or obj < best.objective:
            best = Solution(tuple(low), obj)
    assert best is not None  # all-fp32 is always feasible
    return best
