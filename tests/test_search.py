"""The MILP plan equals the exhaustive optimum over every combination of choices, same cost
and constraints: two choices per unit (fp32 / low) as the autocast plan has, and up to four
with several boundary dtypes (fp32 master weights, fp8 recipes)."""

from __future__ import annotations

import random

import pytest

from precision_doctor.planning.search import Choice, PlanProblem, solve_exhaustive, solve_milp


def _edges(rng: random.Random, n: int) -> tuple[tuple[int, int, float], ...]:
    edges = []
    for j in range(1, n):  # a chain plus random skip edges, as residual networks have
        edges.append((j - 1, j, rng.uniform(0, 3e-4)))
        if j > 1 and rng.random() < 0.4:
            edges.append((rng.randrange(0, j - 1), j, rng.uniform(0, 3e-4)))
    return tuple(edges)


def random_problem(seed: int, n: int, max_choices: int = 2) -> PlanProblem:
    rng = random.Random(seed)
    boundaries = ["fp32", "bf16", "fp16"]
    units = []
    for _ in range(n):
        fp32_time, act = rng.uniform(1e-6, 1e-3), rng.randrange(1, 10**6)
        choices = [Choice("fp32", fp32_time, act, state_bytes=rng.randrange(0, 10**5))]
        if rng.random() >= 0.15:  # else kept fp32
            for k in range(rng.randint(1, max_choices - 1)):
                choices.append(
                    Choice(
                        f"c{k}",
                        fp32_time * rng.uniform(0.1, 1.3),
                        act // rng.choice([1, 2, 4]),
                        state_bytes=rng.randrange(0, 10**5),
                        error=rng.uniform(0, 1e-2),
                        boundary=rng.choice(boundaries[1:] if max_choices == 2 else boundaries),
                    )
                )
        units.append(tuple(choices))
    return PlanProblem(
        names=tuple(f"u{i}" for i in range(n)),
        choices=tuple(units),
        edges=_edges(rng, n),
        error_budget=rng.uniform(0.005, 0.04),
        memory_weight_s_per_byte=rng.choice([0.0, 1e-12, 1e-9]),
    )


@pytest.mark.parametrize(
    ("seed", "max_choices"),
    [(s, 2) for s in range(12)] + [(s, 4) for s in range(8)],
    ids=[f"two-way-{s}" for s in range(12)] + [f"multi-{s}" for s in range(8)],
)
def test_milp_equals_exhaustive(seed: int, max_choices: int) -> None:
    n = (3 + seed % 10) if max_choices == 2 else (3 + seed % 6)  # 4^8 plans at most
    problem = random_problem(seed, n, max_choices)
    milp_sol = solve_milp(problem)
    best = solve_exhaustive(problem)
    assert problem.feasible(milp_sol.chosen)
    assert milp_sol.objective == pytest.approx(best.objective, rel=1e-9, abs=1e-15)


def _two_way(fp32: float, low: float, error: float = 0.0, *, forced: bool = False) -> tuple[Choice, ...]:
    f = Choice("fp32", fp32, 0)
    return (f,) if forced else (f, Choice("bf16", low, 0, error=error, boundary="bf16"))


def test_forced_units_stay_fp32_and_casts_make_islands_expensive() -> None:
    # Three equal units in a chain; the middle one is cheaper low, but its two casts cost more.
    p = PlanProblem(
        names=("a", "b", "c"),
        choices=(_two_way(1.0, 0.5, forced=True), _two_way(1.0, 0.5), _two_way(1.0, 0.5, forced=True)),
        edges=((0, 1, 0.4), (1, 2, 0.4)),
        error_budget=1.0,
    )
    assert solve_milp(p).chosen == (0, 0, 0)
    assert solve_exhaustive(p).chosen == (0, 0, 0)


def test_error_budget_binds() -> None:
    p = PlanProblem(
        names=("a", "b"),
        choices=(_two_way(1.0, 0.2, 0.02), _two_way(1.0, 0.5, 0.005)),
        edges=(),
        error_budget=0.01,
    )
    assert solve_milp(p).chosen == (0, 1)


def test_same_boundary_pays_no_cast_and_state_memory_breaks_ties() -> None:
    # b's two low choices run equally fast and exchange the same dtype with a; the one that
    # holds less state wins on the memory term, and no cast is charged between a and b.
    a = (Choice("fp32", 1.0, 0), Choice("bf16", 0.5, 0, boundary="bf16"))
    b = (
        Choice("fp32", 1.0, 0),
        Choice("bf16+fp32-master", 0.5, 0, state_bytes=600, boundary="bf16"),
        Choice("bf16", 0.5, 0, state_bytes=200, boundary="bf16"),
    )
    p = PlanProblem(
        names=("a", "b"), choices=(a, b), edges=((0, 1, 0.3),), error_budget=1.0, memory_weight_s_per_byte=1e-6
    )
    sol = solve_milp(p)
    assert sol.chosen == (1, 2) == solve_exhaustive(p).chosen
    assert sol.objective == pytest.approx(0.5 + 0.5 + 200e-6)


def test_a_problem_needs_a_choice_per_unit() -> None:
    with pytest.raises(ValueError, match="at least one choice"):
        PlanProblem(names=("a",), choices=((),), edges=(), error_budget=1.0)
