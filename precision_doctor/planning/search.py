"""Plan search: what each unit runs as, one choice per unit, as an integer program solved exactly.

Each unit has a list of `Choice`s (fp32 first, always allowed; then the low dtype, and where a
plan offers them fp32 master weights or an fp8 recipe), each with its step time, the memory it
holds and its contribution to the final-loss error. Variables: z_uk = 1 when unit u takes
choice k (one per unit); y_e = 1 when edge e joins units whose choices exchange values in
different dtypes (their `boundary`: a cast). Minimize the estimated step time (the chosen
choices' times, plus cast times on the y edges) plus an optional weighted memory term, subject
to
- one choice per unit: sum_k z_uk = 1 (a unit that must stay fp32 has only that choice);
- the error budget: the chosen choices' error contributions sum to at most the budget;
- for each boundary dtype b: y_e >= [src's choice has boundary b] - [dst's choice has b]
  (so y_e = 1 exactly when the two ends' boundaries differ; minimization keeps it 0 otherwise).

`solve_milp` uses scipy.optimize.milp (HiGHS) with a zero optimality gap; `solve_exhaustive`
enumerates every combination with the same `objective` and `feasible`, as a test reference.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from precision_doctor.errors import PrecisionDoctorError

EXHAUSTIVE_MAX_PLANS = 2**20
_BUDGET_SLACK = 1e-9  # relative: float sums in two summation orders must agree on feasibility
FP32_BOUNDARY = "fp32"


@dataclass(frozen=True)
class Choice:
    """One way a unit can run in a plan."""

    label: str
    """What the unit runs as, e.g. `fp32`, `bf16`, `fp16`."""
    time_s: float
    """Its estimated share of the step time."""
    activation_bytes: int
    """Activations it keeps for the backward."""
    state_bytes: int = 0
    """Parameters, master copies and optimizer state held for it."""
    error: float = 0.0
    """Its contribution to the final-loss relative error (spent from the budget)."""
    boundary: str = FP32_BOUNDARY
    """The dtype of the values it exchanges with neighbouring units: an edge whose two ends
    differ here pays the edge's cast time."""


@dataclass(frozen=True)
class PlanProblem:
    names: tuple[str, ...]
    choices: tuple[tuple[Choice, ...], ...]
    """Per unit; `choices[u][0]` is fp32, always allowed (a unit kept fp32 has only it)."""
    edges: tuple[tuple[int, int, float], ...]
    """(producer index, consumer index, cast time in seconds)."""
    error_budget: float
    memory_weight_s_per_byte: float = 0.0
    """Weighs each choice's `activation_bytes + state_bytes` in the objective."""

    def __post_init__(self) -> None:
        if len(self.choices) != len(self.names) or any(not c for c in self.choices):
            raise ValueError("a plan problem needs at least one choice for every unit")

    @property
    def solver_scale(self) -> float:
        """What `solve_milp` divides the objective by (the units' first choices' times, fp32's
        for a dtype plan): HiGHS's tolerances, absolute, apply to the objective over this."""
        return max(sum(cs[0].time_s for cs in self.choices), 1e-30)

    def chosen_choices(self, chosen: Sequence[int]) -> list[Choice]:
        return [cs[k] for cs, k in zip(self.choices, chosen, strict=True)]

    def objective(self, chosen: Sequence[int]) -> float:
        picked = self.chosen_choices(chosen)
        t = sum(c.time_s for c in picked)
        t += sum(cast for i, j, cast in self.edges if picked[i].boundary != picked[j].boundary)
        mem = sum(c.activation_bytes + c.state_bytes for c in picked)
        return t + self.memory_weight_s_per_byte * mem

    def error_of(self, chosen: Sequence[int]) -> float:
        return sum(c.error for c in self.chosen_choices(chosen))

    def feasible(self, chosen: Sequence[int]) -> bool:
        if any(not 0 <= k < len(cs) for cs, k in zip(self.choices, chosen, strict=True)):
            return False
        return self.error_of(chosen) <= self.error_budget * (1 + _BUDGET_SLACK) + 1e-300

    def labels(self, chosen: Sequence[int]) -> dict[str, str]:
        return {n: c.label for n, c in zip(self.names, self.chosen_choices(chosen), strict=True)}


@dataclass(frozen=True)
class Solution:
    chosen: tuple[int, ...]
    """Per unit, the index of its choice."""
    objective: float


def solve_milp(problem: PlanProblem) -> Solution:
    # Imported here: scipy.optimize takes ~0.2 s to import, which `analyze` never needs.
    from scipy.optimize import Bounds, LinearConstraint, milp

    n, m = len(problem.names), len(problem.edges)
    if n == 0:
        return Solution((), 0.0)
    offsets = list(itertools.accumulate((len(cs) for cs in problem.choices), initial=0))
    nz = offsets[-1]
    size = nz + m
    # Scale to O(1): HiGHS' tolerances are absolute.
    scale = problem.solver_scale
    w = problem.memory_weight_s_per_byte
    c = np.zeros(size)
    for u, cs in enumerate(problem.choices):
        for k, ch in enumerate(cs):
            c[offsets[u] + k] = ch.time_s + w * (ch.activation_bytes + ch.state_bytes)
    for e, (_, _, cast) in enumerate(problem.edges):
        c[nz + e] = cast
    c /= scale

    rows: list[np.ndarray] = []
    lo: list[float] = []
    hi: list[float] = []
    for u, cs in enumerate(problem.choices):
        r = np.zeros(size)
        r[offsets[u] : offsets[u] + len(cs)] = 1.0
        rows.append(r)
        lo.append(1.0)
        hi.append(1.0)
    boundaries = sorted({ch.boundary for cs in problem.choices for ch in cs})
    for e, (i, j, _) in enumerate(problem.edges):
        for b in boundaries:
            r = np.zeros(size)
            r[nz + e] = 1.0
            for k, ch in enumerate(problem.choices[i]):
                if ch.boundary == b:
                    r[offsets[i] + k] -= 1.0
            for k, ch in enumerate(problem.choices[j]):
                if ch.boundary == b:
                    r[offsets[j] + k] += 1.0
            rows.append(r)
            lo.append(0.0)
            hi.append(np.inf)
    if math.isfinite(problem.error_budget):
        r = np.zeros(size)
        budget = max(problem.error_budget, 1e-300)
        for u, cs in enumerate(problem.choices):
            for k, ch in enumerate(cs):
                r[offsets[u] + k] = ch.error / budget
        rows.append(r)
        lo.append(-np.inf)
        hi.append(1.0 + _BUDGET_SLACK)
    res = milp(
        c,
        integrality=np.ones(size),
        bounds=Bounds(np.zeros(size), np.ones(size)),
        constraints=[LinearConstraint(np.vstack(rows), lo, hi)],
        options={"mip_rel_gap": 0.0},
    )
    if res.x is None:
        raise PrecisionDoctorError(f"the plan search found no solution: {res.message}")
    chosen = tuple(int(np.argmax(res.x[offsets[u] : offsets[u] + len(cs)])) for u, cs in enumerate(problem.choices))
    return Solution(chosen, problem.objective(chosen))


def solve_exhaustive(problem: PlanProblem) -> Solution:
    """Every combination of choices; the reference the MILP is tested against."""
    count = math.prod(len(cs) for cs in problem.choices)
    if count > EXHAUSTIVE_MAX_PLANS:
        raise ValueError(f"exhaustive search over {len(problem.names)} units is {count} plans")
    best: Solution | None = None
    for chosen in itertools.product(*(range(len(cs)) for cs in problem.choices)):
        if not problem.feasible(chosen):
            continue
        obj = problem.objective(chosen)
        if best is None or obj < best.objective:
            best = Solution(tuple(chosen), obj)
    assert best is not None  # all-fp32 is always feasible
    return best
