"""The fp8 plan: per unit fp32 / bf16, and per Linear `fp8:<recipe>`, in the same exact search
(`search.solve_milp`), verified end to end by running the planned model through torchao.

Choices (`fp8_choices`): every unit fp32 or bf16 (its times from the bf16 cost model, errors
from its local error), each Linear torchao may run (`planning.fp8.fp8_layers`: its shape, its
matmuls' SQNR per recipe) also `fp8:<recipe>`, timed by `cost.fp8_linear_time_s` (the matmuls
at the fp8 peak, the amax / scale / cast passes at the bandwidth). bf16 and fp8 units exchange
bf16 values (one boundary); fp32 units pay the edge casts.

Verification (`verify_fp8_plan`): the candidate is converted as the user's run would be
(`planning.fp8.convert_planned`: torchao's `convert_to_float8_training` once per recipe, emulated
on the CPU), run under bf16 autocast with the plan's fp32 units overridden as `apply_plan`
does (`plan.verify_plan`), and its final loss compared with fp32's; each fp8 layer's forward
matmul is judged again on that run's operands, and a layer below its SQNR there loses that
recipe (the search runs again). A candidate over the
tolerance loses its worst contributor's choice (an fp8 recipe is banned for that layer, which
then takes its next-best choice; a bf16 unit goes to fp32) and the search is solved again; a
layer whose outputs went non-finite loses its fp8 choices.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from precision_doctor.analysis.fp8 import gemm_db, sqnr_limit_db
from precision_doctor.capture.fp8 import Fp8Recorder
from precision_doctor.capture.units import LOSS_UNIT, UNATTRIBUTED_UNIT
from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.extras import Fp32Unit, NotFp8Unit, PlanBytes, PlanCosts
from precision_doctor.formats import format_seconds
from precision_doctor.model.spec import LossFn
from precision_doctor.options import AutocastPolicy, Fp8Recipe, LowDtype, PlanUnitDtype, Thresholds, fp8_recipe_of
from precision_doctor.planning.cost import CostModel, autocast_assignment, fp8_linear_time_s
from precision_doctor.planning.fp8 import (
    BF16_MATMUL_REL_ERROR,
    Fp8Layer,
    convert_planned,
    fp8_error,
    fp8_layers,
    planned_recipes,
)
from precision_doctor.planning.plan import (
    Plan,
    Reference,
    Verification,
    fp32_reference,
    hard_fp32_reasons,
    is_tie,
    module_classes,
    verify_plan,
)
from precision_doctor.planning.search import Choice, PlanProblem, solve_milp
from precision_doctor.report import Report
from precision_doctor.runtime import distributed

__all__ = ["Fp8Verification", "fp8_choices", "plan_fp8_model", "verify_fp8_plan"]

BF16 = "bf16"
FP32 = "fp32"


def raw_errors(report: Report, layers: Mapping[str, Fp8Layer]) -> dict[str, dict[str, float]]:
    """Unit -> label -> its error before scaling: a Linear's fp8 choices their fprop matmul's
    relative error, its bf16 choice `BF16_MATMUL_REL_ERROR`; every other unit's bf16 choice its
    local error in the report's run (bf16 autocast around the fp8 layers)."""
    out: dict[str, dict[str, float]] = {}
    for u in report.units:
        if u.name in layers:
            out[u.name] = {BF16: BF16_MATMUL_REL_ERROR}
            out[u.name].update({r.unit_dtype: fp8_error(report, u.name, r) for r in Fp8Recipe})
        else:
            e = u.forward.local.rel_l2_error if u.forward.local is not None else 0.0
            out[u.name] = {BF16: e if math.isfinite(e) else 0.0}
    return out


def analysed_labels(report: Report, layers: Mapping[str, Fp8Layer]) -> dict[str, str]:
    """What each unit ran as in the report's fp8 run: the converted Linears under its recipe,
    the rest bf16."""
    section = report.extras.fp8
    recipe = Fp8Recipe(section.recipe) if section is not None else Fp8Recipe.TENSORWISE
    return {u.name: (recipe.unit_dtype if u.name in layers else BF16) for u in report.units}


def scale_to_loss(raw: Mapping[str, Mapping[str, float]], labels: Mapping[str, str], measured: float) -> float:
    """The factor that makes the errors of `labels` sum to the `measured` final-loss error
    (1 where that error is not a usable positive number)."""
    spent = sum(raw.get(n, {}).get(lab, 0.0) for n, lab in labels.items() if lab != FP32)
    if spent > 0 and math.isfinite(measured) and measured > 0:
        return measured / spent
    return 1.0


def fp8_choices(
    costs: CostModel,
    layers: Mapping[str, Fp8Layer],
    report: Report,
    contributions: Mapping[str, Mapping[str, float]],
    forced: set[str],
    banned: Mapping[str, set[str]],
) -> tuple[tuple[Choice, ...], ...]:
    """Per unit of `costs`: fp32; unless forced to fp32, bf16; and for a Linear, each allowed
    recipe not banned by verification."""
    units = report.by_module()
    out: list[tuple[Choice, ...]] = []
    for uc in costs.units:
        fp32 = Choice(FP32, uc.fp32_time_s, uc.fp32_activation_bytes)
        if uc.name in forced:
            out.append((fp32,))
            continue
        errs = contributions.get(uc.name, {})
        choices = [fp32]
        if BF16 not in banned.get(uc.name, set()):
            # A unit autocast runs in fp32 (a LayerNorm) hands on fp32 under bf16 autocast too.
            boundary = FP32 if uc.fp32_under_autocast else BF16
            error = 0.0 if uc.fp32_under_autocast else errs.get(BF16, 0.0)
            choices.append(Choice(BF16, uc.low_time_s, uc.low_activation_bytes, error=error, boundary=boundary))
        layer = layers.get(uc.name)
        if layer is not None:
            for recipe in layer.allowed:
                label = recipe.unit_dtype
                if label in banned.get(uc.name, set()):
                    continue
                t = fp8_linear_time_s(units[uc.name], layer.in_features, layer.out_features, recipe, costs.profile)
                # torchao saves the high-precision (bf16) input and weight for the backward.
                choices.append(Choice(label, t, uc.low_activation_bytes, error=errs.get(label, 0.0), boundary=BF16))
        out.append(tuple(choices))
    return tuple(out)


def fp8_problem(
    costs: CostModel,
    choices: tuple[tuple[Choice, ...], ...],
    tolerance: float,
    memory_weight_s_per_byte: float,
) -> PlanProblem:
    names = tuple(u.name for u in costs.units)
    index = {n: i for i, n in enumerate(names)}
    return PlanProblem(
        names=names,
        choices=choices,
        edges=tuple(
            (index[e.src], index[e.dst], e.cast_time_s) for e in costs.edges if e.src in index and e.dst in index
        ),
        error_budget=tolerance,
        memory_weight_s_per_byte=memory_weight_s_per_byte,
    )


@dataclass(frozen=True)
class Fp8Verification:
    check: Verification
    """The planned model's final-loss error and first non-finite module."""
    below: dict[str, str]
    """fp8 layer -> why its forward matmul, fed the planned run's own operands, fell below its
    SQNR threshold under its recipe (its inputs there differ from the analysis run's)."""


def verify_fp8_plan(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: LossFn | None,
    units: Mapping[str, str],
    *,
    thresholds: Thresholds | None = None,
    policy: AutocastPolicy | str = AutocastPolicy.CUDA,
    reference: Reference | None = None,
) -> Fp8Verification:
    """The fp8 plan `units` as torchao runs it: a copy of `model` converted by
    `convert_planned`, under bf16 autocast with the plan's fp32 units overridden
    (`verify_plan`): its final-loss relative error against fp32, and each fp8 layer's forward
    matmul judged again on the operands of this run (`capture.fp8.Fp8Recorder`). `model`
    itself is not touched."""
    th = thresholds or Thresholds()
    ref = reference if reference is not None else fp32_reference(model, batch, loss_fn)
    converted = convert_planned(model, units)
    low = {n: d != FP32 for n, d in units.items()}
    recipes = tuple(planned_recipes(units))
    recorder = Fp8Recorder(converted, recipes=recipes) if recipes else None
    with recorder.recording() if recorder is not None else contextlib.nullcontext():
        check = verify_plan(converted, batch, loss_fn, torch.bfloat16, low, policy=policy, reference=ref)
    below: dict[str, str] = {}
    for g in recorder.gemms if recorder is not None else []:
        recipe = fp8_recipe_of(units.get(g.layer, ""))
        if recipe is None or g.layer in below:
            continue
        db, limit = gemm_db(g, recipe.value), sqnr_limit_db(g.gemm, th)
        if db < limit:
            below[g.layer] = (
                f"its {g.gemm} matmul under {recipe} in the planned run has SQNR {db:.1f} dB < {limit:g} dB"
            )
    return Fp8Verification(check, below)


@dataclass
class _Fp8Search:
    report: Report
    costs: CostModel
    layers: dict[str, Fp8Layer]
    tolerance: float
    weight: float
    contributions: dict[str, dict[str, float]]
    forced: set[str]
    calibrated: bool
    banned: dict[str, set[str]] = field(default_factory=dict)
    why_banned: dict[tuple[str, str], str] = field(default_factory=dict)
    promoted: dict[str, str] = field(default_factory=dict)
    passes: int = 0
    relabelled: set[str] = field(default_factory=set)
    """Units the last candidate labelled bf16 that its solution kept fp32 (see `candidate`)."""

    def problem(self) -> PlanProblem:
        choices = fp8_choices(self.costs, self.layers, self.report, self.contributions, self.forced, self.banned)
        return fp8_problem(self.costs, choices, self.tolerance, self.weight)

    def candidate(self, problem: PlanProblem) -> dict[str, str]:
        if self.calibrated:
            labels = problem.labels(solve_milp(problem).chosen)
            # Labelled bf16, they run as the bf16 autocast around the fp8 layers runs them.
            self.relabelled = self.costs.label_low_where_fp32_anyway(labels, self.forced, BF16)
            return labels
        # Calibration run: every unit at its lowest-precision choice left (the last one).
        return {n: cs[-1].label for n, cs in zip(problem.names, problem.choices, strict=True)}

    def ban(self, unit: str, label: str, why: str) -> None:
        if label == FP32:
            return
        if label == BF16 and unit not in self.layers:
            self.forced.add(unit)
            self.promoted[unit] = why
            return
        self.banned.setdefault(unit, set()).add(label)
        self.why_banned[(unit, label)] = why

    def run(
        self, model: torch.nn.Module, batch: Any, loss_fn: LossFn | None, max_rounds: int
    ) -> tuple[dict[str, str], float, PlanProblem]:
        policy = self.report.environment.policy or AutocastPolicy.CUDA
        reference: Reference | None = None
        verified = math.inf
        labels: dict[str, str] = {}
        problem = self.problem()
        for _ in range(max(1, max_rounds)):
            problem = self.problem()
            labels = self.candidate(problem)
            if all(lab == FP32 or n in self.relabelled for n, lab in labels.items()):
                # All fp32 as solved: no unit to label bf16 for the autocast around fp8 layers.
                self.relabelled = set()
                return dict.fromkeys(labels, FP32), 0.0, problem
            if reference is None:
                reference = fp32_reference(model, batch, loss_fn)
            result = distributed.worst(
                verify_fp8_plan(
                    model,
                    batch,
                    loss_fn,
                    labels,
                    thresholds=self.report.thresholds,
                    policy=policy,
                    reference=reference,
                ),
                lambda c: c.check.loss_rel_error,
            )
            verified = result.check.loss_rel_error
            self.passes += 1
            if result.below:
                for layer, why in result.below.items():
                    self.ban(layer, labels[layer], f"verification pass {self.passes}: {why}")
                verified = math.inf  # this candidate failed: never the plan returned below
                continue
            if self.settled(labels, result.check):
                return labels, verified, problem
        if verified <= self.tolerance and self.calibrated:
            return labels, verified, problem
        return {n: FP32 for n in problem.names}, 0.0, self.problem()

    def settled(self, labels: dict[str, str], check: Verification) -> bool:
        verified = check.loss_rel_error
        bad = check.first_nonfinite_unit
        if not math.isfinite(verified) and bad is not None and labels.get(bad, FP32) != FP32:
            why = f"its outputs turned non-finite in verification pass {self.passes} (torchao run of the plan)"
            for label in [labels[bad]] + ([r.unit_dtype for r in Fp8Recipe] if bad in self.layers else []):
                self.ban(bad, label, why)
            return False
        if not self.calibrated and math.isfinite(verified):
            spent = sum(self.contributions.get(n, {}).get(lab, 0.0) for n, lab in labels.items() if lab != FP32)
            if spent > 0:
                k = verified / spent
                self.contributions = {n: {lab: e * k for lab, e in d.items()} for n, d in self.contributions.items()}
            self.calibrated = True
            return False
        if verified <= self.tolerance:
            return True
        low = [n for n, lab in labels.items() if lab != FP32]
        worst = max(
            [n for n in low if n not in self.costs.fp32_under_autocast] or low,
            key=lambda n: (self.contributions.get(n, {}).get(labels[n], 0.0), n),
        )
        self.ban(
            worst,
            labels[worst],
            f"verification pass {self.passes}: the plan's final-loss error {verified:.2e} exceeded the tolerance "
            f"and {worst} ({labels[worst]}) was its worst contributor",
        )
        return False


def plan_fp8_model(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: LossFn | None,
    report: Report,
    costs: CostModel,
    *,
    target: str,
    tolerance: float,
    max_rounds: int,
    memory_weight_s_per_byte: float,
) -> Plan:
    """The cheapest verified fp8 plan of an fp8 report (`plan.plan_model` with `dtype=fp8`
    comes here): `costs` is the report's bf16 cost model on a device with an fp8 peak."""
    if report.extras.fp8 is None:
        raise PrecisionDoctorError(
            "an fp8 plan needs an fp8 analysis (analyze with dtype='fp8'): it has no fp8 section"
        )
    costs.profile.peak_flops_per_s("fp8")  # one line where the device has no fp8 matmul
    layers = fp8_layers(model, report, costs.profile)
    raw = raw_errors(report, layers)
    hard = hard_fp32_reasons(report)
    measured = report.losses.rel_error
    analysed = analysed_labels(report, layers)
    k = scale_to_loss(raw, analysed, measured)
    contributions = {n: {lab: e * k for lab, e in d.items()} for n, d in raw.items()}
    # A run under a recipe the plan refuses for some layer (a matmul below its SQNR; a shape or
    # device that cannot run it) is no candidate the search can pick, and its final-loss error
    # tells little of theirs: on outlier_token, tensorwise flushes the ordinary tokens (loss
    # error 1) and calibrating on it inflated every estimate ~25x, keeping the layer fp32 where
    # rowwise passes. Then the first verification pass calibrates instead.
    refused_run = any(fp8_recipe_of(label) not in layers[n].allowed for n, label in analysed.items() if n in layers)
    calibrated = math.isfinite(measured) and not refused_run and all(n in (LOSS_UNIT, UNATTRIBUTED_UNIT) for n in hard)
    search = _Fp8Search(
        report, costs, layers, tolerance, memory_weight_s_per_byte, contributions, set(hard), calibrated
    )
    labels, verified, problem = search.run(model, batch, loss_fn, max_rounds)

    # Costs and reasons of the search's own solution (the relabelled units as it kept them).
    solved = {n: FP32 if n in search.relabelled else lab for n, lab in labels.items()}
    chosen = [
        next(i for i, c in enumerate(cs) if c.label == solved[n])
        for n, cs in zip(problem.names, problem.choices, strict=True)
    ]
    timing = PlanProblem(problem.names, problem.choices, problem.edges, math.inf)
    all_fp32 = {n: False for n in problem.names}
    auto = autocast_assignment(report)
    picked = problem.chosen_choices(chosen)
    reasons = _reasons(search, problem, chosen, hard)
    return Plan(
        model=report.model,
        dtype=LowDtype.FP8,
        target=target,
        tolerance=tolerance,
        units={n: cast(PlanUnitDtype, lab) for n, lab in labels.items()},
        module_classes={n: c for n, c in module_classes(model).items() if n in labels},
        module_count=sum(1 for _ in model.named_modules()),
        fp32_units=[Fp32Unit(unit=n, reason=reasons[n]) for n, lab in labels.items() if lab == FP32],
        not_fp8_units=[
            NotFp8Unit(unit=n, reason=reasons[n]) for n in layers if n in labels and fp8_recipe_of(labels[n]) is None
        ],
        estimated_step_time_s=PlanCosts(
            fp32=costs.step_time_s(all_fp32), autocast=costs.step_time_s(auto), plan=timing.objective(chosen)
        ),
        activation_bytes=PlanBytes(
            fp32=costs.activation_bytes(all_fp32),
            autocast=costs.activation_bytes(auto),
            plan=sum(c.activation_bytes for c in picked),
        ),
        verified_loss_rel_error=verified,
        verification_passes=search.passes,
        loss_scale=None,  # bf16 autocast around fp8 matmuls: no loss scaler (torchao scales each cast itself)
    )


def _reasons(search: _Fp8Search, problem: PlanProblem, chosen: list[int], hard: Mapping[str, str]) -> dict[str, str]:
    """Why each fp32 unit is fp32 and each Linear out of fp8 is out of it."""
    base = problem.objective(chosen)
    used = problem.error_of(chosen)
    out: dict[str, str] = {}
    for i, n in enumerate(problem.names):
        label = problem.choices[i][chosen[i]].label
        if fp8_recipe_of(label) is not None or (label != FP32 and n not in search.layers):
            continue
        if label == FP32 and n in hard:
            out[n] = hard[n]
            continue
        if label == FP32 and n in search.promoted:
            out[n] = search.promoted[n]
            continue
        layer = search.layers.get(n)
        if layer is not None and label != FP32 and not layer.allowed:
            out[n] = "; ".join(dict.fromkeys(layer.refused.values()))
            continue
        why = _cheaper_or_budget(search, problem, chosen, i, base, used)
        if layer is not None:
            refused = [f"{r}: {w}" for r, w in layer.refused.items()]
            refused += [w for (u, _), w in search.why_banned.items() if u == n]
            if refused:
                why += " (" + "; ".join(dict.fromkeys(refused)) + ")"
        out[n] = why
    return out


def _cheaper_or_budget(
    search: _Fp8Search, problem: PlanProblem, chosen: list[int], i: int, base: float, used: float
) -> str:
    here = problem.choices[i][chosen[i]]
    alternatives = [k for k, c in enumerate(problem.choices[i]) if k != chosen[i] and c.label != FP32]
    if not alternatives:
        return f"kept {here.label}: no other choice left"
    costlier: list[str] = []
    over_budget: list[str] = []
    for k in alternatives:
        c = problem.choices[i][k]
        extra = c.error - here.error
        if used + extra > search.tolerance * (1 + 1e-9):
            over_budget.append(f"{c.label} would add {extra:.2e} to the {used:.2e} spent")
            continue
        flipped = list(chosen)
        flipped[i] = k
        dt = problem.objective(flipped) - base
        if is_tie(dt, problem.solver_scale):
            costlier.append(f"{c.label} would save no time here (on a tie it stays {here.label})")
        else:
            costlier.append(f"{c.label} would cost {format_seconds(dt, sign=True)} per step")
    budget = f"of the {search.tolerance:.0e} tolerance"
    if not over_budget:
        return f"cheaper in {here.label}: " + "; ".join(costlier)
    if not costlier:
        return "error budget: " + "; ".join(over_budget) + f" {budget}"
    return f"kept {here.label}: " + "; ".join(costlier) + "; " + "; ".join(over_budget) + f" {budget}"
