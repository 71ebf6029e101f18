"""The MILP plan equals the exhaustive optimum over all 2^n plans, same cost and constraints."""

from __future__ import annotations

import random

import pytest

from precision_doctor.planning.search import PlanProblem, solve_exhaustive, solve_milp


def random_problem(seed: int, n: int) -> PlanProblem:
    rng = random.Random(seed)
    fp32 = [rng.uniform(1e-6, 1e-3) for _ in range(n)]
    low = [t * rng.uniform(0.1, 1.3) for t in fp32]
    edges = []
    for j in range(1, n):  # a chain plus random skip edges, as residual networks have
        edges.append((j - 1, j, rng.uniform(0, 3e-4)))
        if j > 1 and rng.random() < 0.4:
            edges.append((rng.randrange(0, j - 1), j, rng.uniform(0, 3e-4)))
    error = [rng.uniform(0, 1e-2) for _ in range(n)]
    act = [rng.randrange(1, 10**6) for _ in range(n)]
    return PlanProblem(
        names=tuple(f"u{i}" for i in range(n)),
        fp32_time_s=tuple(fp32),
        low_time_s=tuple(low),
        fp32_activation_bytes=tuple(act),
        low_activation_bytes=tuple(a // 2 for a in act),
        edges=tuple(edges),
        error=tuple(error),
        error_budget=rng.uniform(0.005, 0.04),
        forced_fp32=frozenset(i for i in range(n) if rng.random() < 0.15),
        memory_weight_s_per_byte=rng.choice([0.0, 1e-12, 1e-9]),
    )


@pytest.mark.parametrize("seed", range(12))
def test_milp_equals_exhaustive(seed: int) -> None:
    n = 3 + seed % 10  # 3..12 units
    problem = random_problem(seed, n)
    milp_sol = solve_milp(problem)
    best = solve_exhaustive(problem)
    assert problem.feasible(milp_sol.low)
    assert milp_sol.objective == pytest.approx(best.objective, rel=1e-9, abs=1e-15)


def test_forced_units_stay_fp32_and_casts_make_islands_expensive() -> None:
    # Three equal units in a chain; the middle one is cheaper low, but its two casts cost more.
    p = PlanProblem(
        names=("a", "b", "c"),
        fp32_time_s=(1.0, 1.0, 1.0),
        low_time_s=(0.5, 0.5, 0.5),
        fp32_activation_bytes=(0, 0, 0),
        low_activation_bytes=(0, 0, 0),
        edges=((0, 1, 0.4), (1, 2, 0.4)),
        error=(0.0, 0.0, 0.0),
        error_budget=1.0,
        forced_fp32=frozenset({0, 2}),
    )
    assert solve_milp(p).low == (False, False, False)
    assert solve_exhaustive(p).low == (False, False, False)


def test_error_budget_binds() -> None:
    p = PlanProblem(
        names=("a", "b"),
        fp32_time_s=(1.0, 1.0),
        low_time_s=(0.2, 0.5),
        fp32_activation_bytes=(0, 0),
        low_activation_bytes=(0, 0),
        edges=(),
        error=(0.02, 0.005),
        error_budget=0.01,
        forced_fp32=frozenset(),
    )
    assert solve_milp(p).low == (False, True)
