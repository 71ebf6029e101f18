"""The per-unit dtype plan: search, end-to-end verification, and applying it to a model.

`plan_model` turns a report into a plan: the cheapest assignment of fp32 / low dtype per unit
(module path) on a target device under an error budget (see `search`), verified by an
emulated run of the whole model under the plan. When the verified final-loss error exceeds
the tolerance, the worst low contributor is promoted to fp32 and the search re-solved, for a
bounded number of rounds.

`apply_plan` installs the plan inside the user's own `torch.autocast` region: fp32 units run
with autocast disabled and floating inputs cast to fp32; low units run under autocast in the
low dtype with floating inputs cast to it. Outside an autocast region the model is untouched.
"""

from __future__ import annotations

import functools
import math
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from pydantic import Field
from torch.nn.modules import module as nn_module

from precision_doctor.analysis.flags import gradient_flags_at_scale
from precision_doctor.capture.shadow import capture_pass
from precision_doctor.capture.statistics import relative_loss_error
from precision_doctor.capture.units import LOSS_UNIT, ROOT_UNIT, Policy
from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.extras import Fp32Unit, LossScaleSection, PlanBytes, PlanCosts
from precision_doctor.formats import LIMITS, TORCH_DTYPES
from precision_doctor.model.spec import LossFn, device_type, resolve_loss, run_model
from precision_doctor.model.state import ModelStateGuard
from precision_doctor.options import Flag, LowDtype, UnitDtype
from precision_doctor.planning.cost import (
    CostModel,
    autocast_assignment,
    build_cost_model,
    profile_for,
)
from precision_doctor.planning.loss_scale import LossScaleAdvice, recommend_loss_scale
from precision_doctor.planning.search import PlanProblem, solve_milp
from precision_doctor.report import Report, write_atomic
from precision_doctor.schema import Frozen, parse_json, read_text, validated

PLAN_SCHEMA_VERSION = 1
DEFAULT_TOLERANCE = 1e-2
"""Relative error of the final loss against fp32 that a plan may cost: 1%, well inside the
step-to-step noise of a training loss, and far above the 1e-4..1e-3 a healthy fp16 model
shows, so only units that really hurt stay fp32."""
MAX_VERIFY_ROUNDS = 12
MEMORY_TIE_BREAK = 1e-6
"""Memory's weight in the objective: saving all activation memory is worth 1e-6 of the fp32
step time, so memory only breaks ties between plans of equal time."""
_HARD_FLAGS = {Flag.OVERFLOW: "overflows", Flag.NONFINITE_FP32: "is non-finite even in fp32"}


class Plan(Frozen):
    """A per-module dtype plan. Saved as versioned JSON (`--export-format json`)."""

    schema_version: int = PLAN_SCHEMA_VERSION
    model: str
    dtype: LowDtype
    target: str
    tolerance: float
    units: dict[str, UnitDtype]
    """Unit (module path, `<root>`, `<loss>`) -> the dtype it runs in."""
    module_classes: dict[str, str] = Field(default_factory=dict)
    """Unit -> qualified class name of its module (for DeepSpeed's module-class lists)."""
    module_count: int | None = None
    """How many modules the planned model had (`named_modules()`): a model with more (an
    extra layer) is another model, whose extra modules the plan would leave alone."""
    fp32_units: list[Fp32Unit]
    estimated_step_time_s: PlanCosts
    activation_bytes: PlanBytes
    verified_loss_rel_error: float
    verification_passes: int
    loss_scale: LossScaleSection | None = None
    """The initial loss scale for the plan's low units (the report's `loss_scale` section)."""

    @property
    def low_units(self) -> dict[str, bool]:
        return {u: d != "fp32" for u, d in self.units.items()}

    @property
    def speedup_vs_fp32(self) -> float:
        return self.estimated_step_time_s.fp32 / max(self.estimated_step_time_s.plan, 1e-30)

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    def save(self, path: str | os.PathLike[str]) -> None:
        write_atomic(Path(path), self.to_json())

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> Plan:
        raw = parse_json(text, source)
        if isinstance(raw, dict) and isinstance(raw.get("units"), list) and "environment" in raw:
            raise PrecisionDoctorError(f"{source} is an analysis report, not a plan (`analyze --export` writes plans)")
        if not isinstance(raw, dict) or raw.get("schema_version") != PLAN_SCHEMA_VERSION:
            got = raw.get("schema_version") if isinstance(raw, dict) else None
            raise PrecisionDoctorError(
                f"{source} is not a precision-doctor plan of schema_version {PLAN_SCHEMA_VERSION} (got {got!r})"
            )
        return validated(cls, raw, f"{source} does not match the plan schema")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        return cls.from_json(read_text(path, "plan"), source=str(Path(path)))

    def summary(self) -> str:
        n_low = sum(1 for d in self.units.values() if d != "fp32")
        t = self.estimated_step_time_s
        lines = [
            f"plan ({self.dtype} on {self.target}): {n_low} of {len(self.units)} units low; "
            f"estimated step {t.plan * 1e3:.3g} ms vs fp32 {t.fp32 * 1e3:.3g} ms "
            f"({self.speedup_vs_fp32:.2f}x) and autocast {t.autocast * 1e3:.3g} ms; "
            f"activations {self.activation_bytes.plan / 2**20:.3g} MiB vs "
            f"{self.activation_bytes.fp32 / 2**20:.3g} MiB fp32",
            f"verified final-loss error {self.verified_loss_rel_error:.2e} "
            f"(tolerance {self.tolerance:.0e}, {self.verification_passes} verification pass(es))",
        ]
        lines += [f"  fp32: {f.unit}: {f.reason}" for f in self.fp32_units]
        return "\n".join(lines)


# --- search + verification ------------------------------------------------------------------


def hard_fp32_reasons(report: Report) -> dict[str, str]:
    """Units that must not run low: they overflow or turn non-finite there."""
    reasons: dict[str, str] = {}
    dtype = report.environment.dtype
    for u in report.units:
        if u.name == LOSS_UNIT:
            why = "GradScaler scales an fp32 loss" if dtype is LowDtype.FP16 else "as autocast runs it"
            reasons[u.name] = f"the loss runs in fp32 under autocast ({why})"
            continue
        for f in u.flags:
            if f.flag in _HARD_FLAGS:
                reasons[u.name] = f"{f.flag}: {u.name} {_HARD_FLAGS[f.flag]} in {dtype} ({f.evidence.message})"
                break
        else:
            local = u.forward.local
            if local is not None and local.nonfinite_count > 0:
                reasons[u.name] = f"{local.nonfinite_count} non-finite value(s) made in {dtype} from finite inputs"
    return reasons


def error_contributions(report: Report) -> dict[str, float]:
    """Each unit's share of the final-loss error when it runs low: its local error, scaled so
    that all units together account for the all-low run's measured final-loss error. When
    that run is non-finite (a unit overflows), the local errors are used unscaled."""
    local: dict[str, float] = {}
    for u in report.units:
        e = u.forward.local.rel_l2_error if u.forward.local is not None else 0.0
        local[u.name] = e if math.isfinite(e) else 0.0
    total = sum(local.values())
    measured = report.losses.rel_error
    if total > 0 and math.isfinite(measured) and measured > 0:
        return {n: e * measured / total for n, e in local.items()}
    return local


def build_problem(
    report: Report,
    costs: CostModel,
    contributions: Mapping[str, float],
    forced: set[str],
    tolerance: float,
    memory_weight_s_per_byte: float,
) -> PlanProblem:
    names = tuple(u.name for u in costs.units)
    index = {n: i for i, n in enumerate(names)}
    return PlanProblem(
        names=names,
        fp32_time_s=tuple(u.fp32_time_s for u in costs.units),
        low_time_s=tuple(u.low_time_s for u in costs.units),
        fp32_activation_bytes=tuple(u.fp32_activation_bytes for u in costs.units),
        low_activation_bytes=tuple(u.low_activation_bytes for u in costs.units),
        edges=tuple((index[e.src], index[e.dst], e.cast_time_s) for e in costs.edges if e.src in index and e.dst in index),
        error=tuple(0.0 if n in forced else contributions.get(n, 0.0) for n in names),
        error_budget=tolerance,
        forced_fp32=frozenset(index[n] for n in forced if n in index),
        memory_weight_s_per_byte=memory_weight_s_per_byte,
    )


@dataclass(frozen=True)
class Verification:
    loss_rel_error: float
    first_nonfinite_unit: str | None
    """The first unit (in execution order) whose output went non-finite in the emulated run."""


def verify_plan(
    model: torch.nn.Module, batch: Any, loss_fn: LossFn | None, low_dtype: torch.dtype, low: Mapping[str, bool]
) -> Verification:
    """Final-loss relative error of an emulated run of the whole model under the plan (the
    capture's global shadow with this policy), and where it first went non-finite."""
    policy = Policy({"": False, **{u: bool(v) for u, v in low.items()}})
    first_bad: list[str] = []
    with ModelStateGuard(model) as guard, capture_pass(
        model, low_dtype, policy, collect=False, local=False, on_mutation=guard.before_mutation
    ) as mode:

        def watch(mod: torch.nn.Module, args: Any, out: Any) -> None:
            if first_bad:
                return
            outs = [out] if isinstance(out, torch.Tensor) else [t for t in (out if isinstance(out, (tuple, list)) else ()) if isinstance(t, torch.Tensor)]
            for t in outs:
                sh = mode.global_shadow(t)
                if sh is not None and not bool(torch.isfinite(sh).all()) and bool(torch.isfinite(t).all()):
                    first_bad.append(mode.tracker.paths.get(id(mod), ROOT_UNIT))
                    return

        hook = nn_module.register_module_forward_hook(watch)
        try:
            output = run_model(model, batch)
            mode.tracker.outside = LOSS_UNIT
            loss = resolve_loss(output, batch, loss_fn)
        except PrecisionDoctorError:
            raise
        except Exception as e:
            raise PrecisionDoctorError(f"the verification run raised {type(e).__name__}: {e}") from e
        finally:
            hook.remove()
        ref = float(loss.detach())
        shadow = mode.global_shadow(loss)
        low_loss = float(shadow) if shadow is not None else ref
    return Verification(relative_loss_error(ref, low_loss), first_bad[0] if first_bad else None)


def _module_classes(model: torch.nn.Module) -> dict[str, str]:
    out = {}
    for name, mod in model.named_modules():
        cls = type(mod)
        out[name or ROOT_UNIT] = f"{cls.__module__}.{cls.__qualname__}"
    return out


def plan_model(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: LossFn | None,
    report: Report,
    *,
    target: str = "h100",
    tolerance: float = DEFAULT_TOLERANCE,
    max_rounds: int = MAX_VERIFY_ROUNDS,
    memory_weight_s_per_byte: float | None = None,
    costs: CostModel | None = None,
) -> Plan:
    """The cheapest verified per-unit plan for `report`'s model on `target`, or under
    `costs` when given (measured ones, `timing.measure_cost_model`; `target` then only
    names them in the plan)."""
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise PrecisionDoctorError(f"tolerance must be a positive number, got {tolerance!r}")
    low_dtype = report.environment.dtype
    if costs is None:
        costs = build_cost_model(report, profile_for(target), low_dtype)
    all_fp32 = {u.name: False for u in report.units}
    base_time = costs.step_time_s(all_fp32)
    base_bytes = max(costs.activation_bytes(all_fp32), 1)
    weight = memory_weight_s_per_byte if memory_weight_s_per_byte is not None else MEMORY_TIE_BREAK * base_time / base_bytes

    hard = hard_fp32_reasons(report)
    contributions = error_contributions(report)
    # Contributions are calibrated on the all-low run's final-loss error; when that run went
    # through a unit that must stay fp32 (its error says nothing about the others), the first
    # pass runs everything low but the hard units, to calibrate on.
    calibrated = math.isfinite(report.losses.rel_error) and all(n == LOSS_UNIT for n in hard)
    forced = set(hard)
    promoted: dict[str, str] = {}
    passes = 0
    verified = math.inf
    names = [u.name for u in costs.units]
    low: dict[str, bool] = dict(all_fp32)
    problem = build_problem(report, costs, contributions, forced, tolerance, weight)
    for _ in range(max(1, max_rounds)):
        problem = build_problem(report, costs, contributions, forced, tolerance, weight)
        if calibrated:
            low = dict(zip(problem.names, solve_milp(problem).low, strict=True))
        else:
            low = {n: n not in forced for n in names}
        if not any(low.values()):
            verified = 0.0
            break
        check = verify_plan(model, batch, loss_fn, TORCH_DTYPES[low_dtype], low)
        verified = check.loss_rel_error
        passes += 1
        bad = check.first_nonfinite_unit
        if not math.isfinite(verified) and bad is not None and low.get(bad, False):
            promoted[bad] = f"its outputs turned non-finite in verification pass {passes} ({low_dtype} run of the plan)"
            forced.add(bad)
            continue
        if not calibrated and math.isfinite(verified):
            spent = sum(contributions.get(n, 0.0) for n, v in low.items() if v)
            if spent > 0:
                contributions = {n: e * verified / spent for n, e in contributions.items()}
            calibrated = True
            continue
        if verified <= tolerance:
            break
        worst = max((n for n, v in low.items() if v), key=lambda n: (contributions.get(n, 0.0), n))
        promoted[worst] = (
            f"promoted after verification pass {passes}: the plan's final-loss error {verified:.2e} "
            f"exceeded the tolerance and {worst} was its worst contributor ({contributions.get(worst, 0.0):.2e})"
        )
        forced.add(worst)
    else:
        if not (verified <= tolerance):
            # No plan within tolerance in the allowed rounds: fall back to fp32, which is exact.
            low = dict(all_fp32)
            verified = 0.0
            problem = build_problem(report, costs, contributions, forced, tolerance, weight)

    reasons = _fp32_reasons(problem, low, hard, promoted, contributions, tolerance)
    advice, kept_for_gradients = _keep_vanishing_gradients(report, low)
    reasons.update(kept_for_gradients)
    auto = autocast_assignment(report)
    return Plan(
        model=report.model,
        dtype=low_dtype,
        target=str(target),
        tolerance=tolerance,
        units={n: (low_dtype.value if v else "fp32") for n, v in low.items()},
        module_classes={n: c for n, c in _module_classes(model).items() if n in low},
        module_count=sum(1 for _ in model.named_modules()),
        fp32_units=[Fp32Unit(unit=n, reason=reasons[n]) for n in low if not low[n]],
        estimated_step_time_s=PlanCosts(fp32=base_time, autocast=costs.step_time_s(auto), plan=costs.step_time_s(low)),
        activation_bytes=PlanBytes(
            fp32=costs.activation_bytes(all_fp32), autocast=costs.activation_bytes(auto), plan=costs.activation_bytes(low)
        ),
        verified_loss_rel_error=verified,
        verification_passes=passes,
        loss_scale=advice.to_extras(),
    )


def _keep_vanishing_gradients(report: Report, low: dict[str, bool]) -> tuple[LossScaleAdvice, dict[str, str]]:
    """fp16 only: the loss scale for the plan's low units, and the units moved to fp32 (in
    `low`, with their reasons) because their gradients flush to zero even at that scale (one
    scale cannot cover gradients spread wider than fp16's range, as in a deep narrow net).
    Each move can only raise the scale (the largest low gradient can only shrink), so the
    loop ends. (The plan's verified loss error was measured with them low: fp32 adds no
    rounding there.)"""
    advice = recommend_loss_scale(report, low)
    moved: dict[str, str] = {}
    if report.environment.dtype is not LowDtype.FP16:
        return advice, moved
    th = report.thresholds
    fmt = LIMITS[LowDtype.FP16]
    while True:
        k = advice.recommended_scale_log2
        vanishing = [
            (u.name, f)
            for u in report.units
            if low.get(u.name, False)
            for f in gradient_flags_at_scale(u, k, fmt, th)
            if f.flag is Flag.GRAD_UNDERFLOW
        ]
        if not vanishing:
            return advice, moved
        for name, f in vanishing:
            low[name] = False
            moved[name] = f"its gradients flush to 0 in fp16 even at the plan's loss scale: {f.evidence.message}"
        advice = recommend_loss_scale(report, low)


def _fp32_reasons(
    problem: PlanProblem,
    low: Mapping[str, bool],
    hard: Mapping[str, str],
    promoted: Mapping[str, str],
    contributions: Mapping[str, float],
    tolerance: float,
) -> dict[str, str]:
    reasons: dict[str, str] = {}
    x = [low[n] for n in problem.names]
    base = problem.objective(x)
    used = problem.error_of(x)
    for i, n in enumerate(problem.names):
        if x[i]:
            continue
        if n in hard:
            reasons[n] = hard[n]
        elif n in promoted:
            reasons[n] = promoted[n]
        else:
            flipped = list(x)
            flipped[i] = True
            e = contributions.get(n, 0.0)
            if used + e > tolerance:
                reasons[n] = (
                    f"error budget: running low would add {e:.2e} to the {used:.2e} already spent "
                    f"of the {tolerance:.0e} tolerance"
                )
            else:
                dt = problem.objective(flipped) - base
                reasons[n] = f"cheaper in fp32: low would cost {dt * 1e6:+.3g} us per step (casts around it)"
    return reasons


# --- applying a plan -------------------------------------------------------------------------


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_cast_floats(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_cast_floats(o, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    return obj


# Each installed override -> (its handle, whether the module had its own `forward`, the
# forward it wrapped). Looked up by identity: `functools.wraps` copies a wrapper's attributes
# onto whatever wraps it (Accelerate's hooks), so a marker attribute would be inherited.
_WRAPPERS: weakref.WeakKeyDictionary[Any, tuple[PlanHandle, bool, Any]] = weakref.WeakKeyDictionary()


class PlanHandle:
    """The installed overrides; `remove()` (or leaving the `with` block) takes them off."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._installed: list[tuple[torch.nn.Module, bool, Any, Any]] = []
        self._depth = 0  # >0 while inside a planned module entered in an autocast region

    def _wrap(self, module: torch.nn.Module, low: bool, low_dtype: torch.dtype) -> None:
        had = "forward" in module.__dict__
        orig = module.forward

        @functools.wraps(orig)
        def forward(*args: Any, **kwargs: Any) -> Any:
            dev = device_type(module, *args, *kwargs.values())
            if not self._installed or (self._depth == 0 and not torch.is_autocast_enabled(dev)):
                # Removed (but still called by a wrapper installed on top of it), or not in
                # an autocast region: the model as written.
                return orig(*args, **kwargs)
            self._depth += 1
            try:
                dtype = low_dtype if low else torch.float32
                args, kwargs = _cast_floats(args, dtype), _cast_floats(kwargs, dtype)
                ctx = torch.autocast(dev, dtype=low_dtype) if low else torch.autocast(dev, enabled=False)
                with ctx:
                    return orig(*args, **kwargs)
            finally:
                self._depth -= 1

        _WRAPPERS[forward] = (self, had, orig)
        module.forward = forward
        self._installed.append((module, had, orig, forward))

    @property
    def active(self) -> bool:
        return bool(self._installed)

    def remove(self) -> None:
        """Take the overrides off. Where something wrapped a module's forward on top of ours
        (another handle, Accelerate), its wrapper stays and ours only passes calls through;
        restoring a forward also drops removed handles' wrappers below it."""
        installed, self._installed = self._installed, []
        for module, had, orig, ours in reversed(installed):
            if module.__dict__.get("forward") is not ours:
                continue
            while (unwrap := _WRAPPERS.get(orig)) is not None and not unwrap[0].active:
                _, had, orig = unwrap
            if had:
                module.forward = orig
            else:
                module.__dict__.pop("forward", None)

    def __enter__(self) -> PlanHandle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()


def check_plan_matches(model: torch.nn.Module, plan: Plan) -> dict[str, torch.nn.Module]:
    """The modules the plan names; refuses a plan made for another model."""
    modules = {name or ROOT_UNIT: m for name, m in model.named_modules()}
    unknown = [u for u in plan.units if u != LOSS_UNIT and u not in modules]
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise PrecisionDoctorError(
            f"the plan does not match this model: it names module(s) {shown} that the model "
            f"({type(model).__name__}) does not have; was the plan made for {plan.model!r}?"
        )
    if plan.module_count is not None and len(modules) != plan.module_count:
        raise PrecisionDoctorError(
            f"the plan does not match this model: it was made for a model of {plan.module_count} modules, "
            f"this {type(model).__name__} has {len(modules)}; was the plan made for {plan.model!r}?"
        )
    return {u: modules[u] for u in plan.units if u != LOSS_UNIT}


def apply_plan(model: torch.nn.Module, plan: Plan | str | os.PathLike[str] | Mapping[str, Any]) -> PlanHandle:
    """Install `plan`'s per-module dtypes; they take effect inside `torch.autocast` regions.

    >>> import torch, precision_doctor as pd
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    >>> x, loss_fn = torch.randn(8, 4), (lambda out, b: out.pow(2).mean())
    >>> plan = pd.plan_model(net, x, loss_fn, pd.analyze(net, x, loss_fn=loss_fn, dtype="bf16"))
    >>> handle = apply_plan(net, plan)
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):  # on a GPU: "cuda" and the plan's dtype
    ...     loss = loss_fn(net(x), x)
    >>> handle.remove()
    """
    if isinstance(plan, Mapping):
        plan = validated(Plan, dict(plan), "not a precision-doctor plan")
    elif not isinstance(plan, Plan):
        plan = Plan.load(plan)
    modules = check_plan_matches(model, plan)
    handle = PlanHandle(plan)
    low_dtype = TORCH_DTYPES[plan.dtype]
    for unit, module in modules.items():
        handle._wrap(module, plan.units[unit] != "fp32", low_dtype)
    return handle

