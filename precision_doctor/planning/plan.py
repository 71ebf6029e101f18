"""The per-unit dtype plan: search, end-to-end verification, and applying it to a model.

`plan_model` turns a report into a plan: the cheapest assignment of fp32 / low dtype per unit
(module path) on a target device under an error budget (see `search`), verified by running
the plan for real: `apply_plan`'s overrides inside the real low-precision run of the autocast
regime (`verify_plan`; fp16, and bf16 without fast CPU kernels, emulated on the CPU). When the verified final-loss error exceeds
the tolerance, the worst low contributor is promoted to fp32 and the search re-solved, for a
bounded number of rounds.

`apply_plan` installs the plan inside the user's own `torch.autocast` region: fp32 units run
with autocast disabled and floating inputs cast to fp32; low units run under autocast in the
low dtype on their inputs as they come (a pure-regime plan's cast them to it), and hand their
results back in fp32 to an fp32 unit calling them: a plan with every unit low is plain
autocast. Outside an autocast region the model is untouched; inside one of another dtype
than the plan's it is refused (`capture.emulation.unit_overrides`, which the verification
installs too).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch
import torch.utils._pytree as pytree
from pydantic import Field
from torch.utils._python_dispatch import TorchDispatchMode

from precision_doctor.analysis.flags import gradient_flags_at_scale, own_error_finding
from precision_doctor.analysis.loss_scale import LossScaleAdvice, recommend_loss_scale
from precision_doctor.capture.emulation import UnitOverrides, check_region_dtype, unit_overrides
from precision_doctor.capture.lowrun import low_run
from precision_doctor.capture.ops import op_info
from precision_doctor.capture.statistics import relative_loss_error
from precision_doctor.capture.units import LOSS_UNIT, ROOT_UNIT, UNATTRIBUTED_UNIT, UnitTracker
from precision_doctor.errors import PrecisionDoctorError, PrecisionDoctorInternalError
from precision_doctor.extras import Fp32Unit, LossScaleSection, NotFp8Unit, PlanBytes, PlanCosts
from precision_doctor.formats import LIMITS, TORCH_DTYPES, format_bytes, format_seconds
from precision_doctor.model.parallel import reset_fsdp_iteration
from precision_doctor.model.spec import LossFn, OptimizerFactory, device_type, resolve_loss, run_model
from precision_doctor.model.state import ModelStateGuard
from precision_doctor.options import (
    AutocastPolicy,
    ExportFormat,
    Flag,
    LowDtype,
    PlanUnitDtype,
    Regime,
    Target,
    UnitDtype,
    percent,
)
from precision_doctor.planning.cost import (
    CostModel,
    UnitCost,
    autocast_assignment,
    build_cost_model,
    profile_for,
)
from precision_doctor.planning.fp8 import planned_recipes
from precision_doctor.planning.master import MasterWeights, hold_plan_weights
from precision_doctor.planning.pure import (
    PureRounds,
    lost_update_units,
    master_label,
    state_bytes,
    state_tensors,
    unit_params,
)
from precision_doctor.planning.search import Choice, PlanProblem, solve_milp
from precision_doctor.planning.training_check import TRAIN_STEPS
from precision_doctor.report import FlagRecord, Report, Unit, write_atomic
from precision_doctor.runtime import distributed
from precision_doctor.schema import Frozen, parse_json, read_text, validated

PLAN_SCHEMA_VERSION = 3
READABLE_PLAN_SCHEMA_VERSIONS = (1, 2, PLAN_SCHEMA_VERSION)
"""Plans `Plan.load` reads. 1: fp16/bf16 autocast plans; 2 adds fp8 plans (`fp8:<recipe>`
units, `not_fp8_units`) and pure-regime plans (`regime`, `master_weights`, `state_bytes`,
`training_check`): a version-1 plan is a version-2 plan with the new fields' defaults; 3 adds
`fp8:mxfp8` units (MX block scaling, Blackwell targets): a version-2 plan is a version-3 one
without them."""
DEFAULT_TOLERANCE = 1e-2
"""Relative error of the final loss against fp32 that a plan may cost: 1%, well inside the
step-to-step noise of a training loss, and far above the 1e-4..1e-3 a healthy fp16 model
shows, so only units that really hurt stay fp32."""
MAX_VERIFY_ROUNDS = 12
MEMORY_TIE_BREAK = 1e-6
"""Memory's weight in the objective: saving all activation memory is worth 1e-6 of the fp32
step time, so memory only breaks ties between plans of equal time."""
_HARD_FLAGS = {Flag.OVERFLOW: "overflows", Flag.NONFINITE_FP32: "is non-finite even in fp32"}


class MasterUnit(Frozen):
    """A low unit of a pure-regime plan whose parameters keep fp32 master weights."""

    unit: str
    params: int
    """Its parameters' elements: each takes 4 bytes more (the fp32 copy), and its optimizer
    state is fp32."""
    reason: str


class PlanTraining(Frozen):
    """A pure-regime plan's training check (`training_check.check_training`): real optimizer
    steps under the plan beside the same steps in fp32."""

    optimizer: str
    lr: float
    fp32_losses: list[float]
    """The fp32 run's loss before each step, and after the last."""
    plan_losses: list[float]
    tracks: bool
    """The plan's loss fell by at least `TRACK_FRACTION` of fp32's fall, finite throughout."""


class Plan(Frozen):
    """A per-module dtype plan. Saved as versioned JSON (`--export-format json`)."""

    schema_version: int = PLAN_SCHEMA_VERSION
    model: str
    dtype: LowDtype
    target: str
    tolerance: float
    units: dict[str, PlanUnitDtype]
    """Unit (module path, `<root>`, `<loss>`) -> the dtype it runs in: fp32, the plan's low
    dtype, and in an fp8 plan bf16 or `fp8:<recipe>` (a Linear torchao converts)."""
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
    regime: Regime = Regime.AUTOCAST
    """`autocast`: every parameter stays fp32 (autocast's master weights). `pure` (a report of
    `model.to(dtype)` training): the low units' own parameters are held in `dtype`, those of
    the `master_weights` units with an fp32 master copy the optimizer steps."""
    master_weights: list[MasterUnit] = Field(default_factory=list)
    """Pure regime: the low units whose parameters keep fp32 master weights, and why."""
    state_bytes: PlanBytes | None = None
    """Pure regime: parameters, master copies and optimizer state, in bytes (fp32 and autocast:
    fp32 parameters and state)."""
    training_check: PlanTraining | None = None
    """Pure regime: the plan trained for real beside fp32."""
    not_fp8_units: list[NotFp8Unit] = Field(default_factory=list)
    """fp8 plans: the Linear units kept out of float8 (bf16 or fp32), each with why."""
    fp32_under_autocast: list[str] = Field(default_factory=list)
    """Units labelled low that autocast runs in fp32 whatever their label (a LayerNorm, on
    CUDA's op lists): the label changes no compute. Exports that act per module class leave
    their classes out (DeepSpeed's `lower_precision_safe_modules` would communicate their
    parameters low)."""

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
            # A saved report: the plan it carries, where it was planned (`analyze --out` plans).
            report = Report.from_json(text, source=source)
            if report.extras.plan is None:
                raise PrecisionDoctorError(
                    f"{source} is an analysis report with no plan (`analyze --out` or `--export` plans it)"
                )
            return cls.from_report(report)
        if not isinstance(raw, dict) or raw.get("schema_version") not in READABLE_PLAN_SCHEMA_VERSIONS:
            got = raw.get("schema_version") if isinstance(raw, dict) else None
            readable = " or ".join(str(v) for v in READABLE_PLAN_SCHEMA_VERSIONS)
            raise PrecisionDoctorError(
                f"{source} is not a precision-doctor plan of schema_version {readable} (got {got!r})"
            )
        raw = {**raw, "schema_version": PLAN_SCHEMA_VERSION}  # read as the current version
        return validated(cls, raw, f"{source} does not match the plan schema")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        return cls.from_json(read_text(path, "plan"), source=str(Path(path)))

    @classmethod
    def from_report(cls, report: Report) -> Plan:
        """The plan a planned report carries (`plan_report`, `analyze` with a plan): its
        `extras.plan` section holds the plan's JSON export, the plan itself."""
        section = report.extras.plan
        if section is None or ExportFormat.JSON not in section.exports:
            raise PrecisionDoctorError(
                f"report of {report.model!r} has no plan: plan it with plan_report(model, batch, loss_fn, report)"
            )
        return cls.from_json(section.exports[ExportFormat.JSON], source=f"the plan in {report.model!r}'s report")

    def summary(self) -> str:
        n_low = sum(1 for d in self.units.values() if d != "fp32")
        t = self.estimated_step_time_s
        lines = [
            f"plan ({self.dtype} on {self.target}): {n_low} of {len(self.units)} units low; "
            f"estimated step {format_seconds(t.plan)} vs fp32 {format_seconds(t.fp32)} "
            f"({self.speedup_vs_fp32:.2f}x) and autocast {format_seconds(t.autocast)}; "
            f"activations {format_bytes(self.activation_bytes.plan)} vs "
            f"{format_bytes(self.activation_bytes.fp32)} fp32",
            f"verified final-loss error {self.verified_loss_rel_error:.2e} "
            f"(tolerance {self.tolerance:.0e}, {self.verification_passes} verification pass(es))"
            if self.verification_passes
            # Nothing was run: every unit fp32, by the estimates alone (exact, not measured).
            else f"not verified: every unit stays fp32 on the estimates alone (tolerance {self.tolerance:.0e})",
        ]
        for recipe, layers in planned_recipes(self.units).items():
            lines.append(f"  fp8 ({recipe}): {', '.join(layers)}")
        lines += [f"  {self.units.get(f.unit, 'bf16')}, not fp8: {f.unit}: {f.reason}" for f in self.not_fp8_units]
        lines += [f"  fp32: {f.unit}: {f.reason}" for f in self.fp32_units if f.unit not in self.not_fp8_reasons]
        lines += [f"  {self.dtype} + fp32 master weights: {m.unit}: {m.reason}" for m in self.master_weights]
        if self.state_bytes is not None:
            b = self.state_bytes
            lines.append(
                f"weights and optimizer state {format_bytes(b.plan)} vs {format_bytes(b.fp32)} fp32 "
                f"(pure {self.dtype}: parameters held low where planned low)"
            )
        if self.training_check is not None:
            c = self.training_check
            lines.append(
                f"trained {len(c.fp32_losses) - 1} {c.optimizer} steps at lr {c.lr:g}: loss {c.plan_losses[0]:.6g} -> "
                f"{c.plan_losses[-1]:.6g} under the plan, {c.fp32_losses[0]:.6g} -> {c.fp32_losses[-1]:.6g} in fp32 "
                f"({'tracks fp32' if c.tracks else 'does NOT track fp32'})"
            )
        return "\n".join(lines)

    @property
    def not_fp8_reasons(self) -> dict[str, str]:
        return {f.unit: f.reason for f in self.not_fp8_units}


# --- search + verification ------------------------------------------------------------------


CHEAPER_IN_FP32 = "cheaper in fp32"
"""How the reason of a unit kept in fp32 for its cost alone begins (it runs safely low)."""


def is_tie(dt: float, solver_scale: float) -> bool:
    """A change of the objective by `dt` that is no cost worth a number: under a picosecond, or
    within the MILP solver's own tolerance, HiGHS's absolute MIP gap of 1e-6 on the objective
    over `solver_scale` (`PlanProblem.solver_scale`: a plan of 10 ms kept a unit fp32 whose
    low label "would cost -1.15 ns per step"), doubled for its feasibility tolerance."""
    return abs(dt) < max(1e-12, 2e-6 * solver_scale)


def hard_fp32_reasons(report: Report) -> dict[str, str]:
    """Units that must not run low: they overflow or turn non-finite there, or their own error
    is an error-severity finding (DIVERGENCE, ERROR_GROWTH: the verdict's "not safe as-is",
    which a plan within the final-loss budget would leave standing, and the pre-flight judges
    a plan by the findings of the units it runs low), but for an fp8 analysis' converted
    Linears, which the fp8 plan gates recipe by recipe."""
    reasons: dict[str, str] = {}
    dtype = report.environment.dtype
    # An fp8 analysis' converted Linears: their error comes from the analysed recipe's matmuls,
    # and the fp8 plan weighs every recipe and bf16 for them, each gated on its own error.
    recipe_gated = set(report.extras.fp8.layers) if report.extras.fp8 is not None else set()
    for u in report.units:
        if u.name == LOSS_UNIT:
            why = "GradScaler scales an fp32 loss" if dtype is LowDtype.FP16 else "as autocast runs it"
            reasons[u.name] = f"the loss runs in fp32 under autocast ({why})"
            continue
        if u.name == UNATTRIBUTED_UNIT:
            # No module to override: a dtype here would only count a saving nothing makes.
            reasons[u.name] = (
                "backward ops that no module's forward made (FSDP2's gradient reduction, a backward "
                "hook's): no module to run low"
            )
            continue
        own = own_error_finding(u) if u.name not in recipe_gated else None
        first = next((f for f in u.flags if f.flag in _HARD_FLAGS or f is own), None)
        if first is not None and first.flag in _HARD_FLAGS:
            reasons[u.name] = f"{first.flag}: {u.name} {_HARD_FLAGS[first.flag]} in {dtype} ({first.evidence.message})"
        elif first is not None:
            reasons[u.name] = f"{first.flag} (error) in {dtype}: {first.evidence.message}"
        else:
            local = u.forward.local
            if local is not None and local.nonfinite_count > 0:
                reasons[u.name] = f"{local.nonfinite_count} non-finite value(s) made in {dtype} from finite inputs"
    return reasons


def error_contributions(report: Report, runs_fp32: Collection[str] = ()) -> dict[str, float]:
    """Each unit's share of the final-loss error when it runs low: its local error, scaled so
    that all units together account for the all-low run's measured final-loss error (none, where
    that error is 0: the plan's verification passes still measure whatever it picks). When
    that run is non-finite (a unit overflows), the local errors are used unscaled. `runs_fp32`:
    units that run in fp32 under either label (`CostModel.fp32_under_autocast`), whose label
    changes no value: no share."""
    local: dict[str, float] = {}
    for u in report.units:
        e = u.forward.local.rel_l2_error if u.forward.local is not None and u.name not in runs_fp32 else 0.0
        local[u.name] = e if math.isfinite(e) else 0.0
    total = sum(local.values())
    measured = report.losses.rel_error
    if total > 0 and math.isfinite(measured) and measured >= 0:
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
        choices=tuple(_unit_choices(report, u, contributions, forced) for u in costs.units),
        edges=tuple(
            (index[e.src], index[e.dst], e.cast_time_s) for e in costs.edges if e.src in index and e.dst in index
        ),
        error_budget=tolerance,
        memory_weight_s_per_byte=memory_weight_s_per_byte,
    )


def _unit_choices(
    report: Report, cost: UnitCost, contributions: Mapping[str, float], forced: set[str]
) -> tuple[Choice, ...]:
    """fp32, and the report's low dtype unless the unit is kept fp32."""
    fp32 = Choice("fp32", cost.fp32_time_s, cost.fp32_activation_bytes)
    if cost.name in forced:
        return (fp32,)
    low = report.environment.dtype.value
    return (
        fp32,
        Choice(
            low,
            cost.low_time_s,
            cost.low_activation_bytes,
            # Autocast runs it in fp32 under either label: the label changes no value.
            error=0.0 if cost.fp32_under_autocast else contributions.get(cost.name, 0.0),
            boundary="fp32" if cost.fp32_under_autocast else low,
        ),
    )


@dataclass(frozen=True)
class Reference:
    """The fp32 run a plan's verification compares with."""

    loss: float
    finite: dict[tuple[str, int], bool]
    """(module path, `<root>` for the root; which call of it) -> whether the call's floating
    outputs were all finite."""


@dataclass(frozen=True)
class Verification:
    loss_rel_error: float
    first_nonfinite_unit: str | None
    """Where the plan's run first went non-finite: the first module (in the order module calls
    returned) whose outputs were non-finite where the fp32 run's were finite, from finite
    inputs (else the first with such outputs)."""


class _WriteWatch(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch's TorchDispatchMode is unannotated
    """Runs every op as it is, reporting each tensor an op is about to write (for
    `ModelStateGuard.before_mutation`, which copies a parameter before it changes)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # As the capture's modes: torch would wrap the handler in `torch._dynamo.disable`,
        # whose first call imports torch._dynamo (~0.7 s); `_write_watch` wraps it when
        # torch._dynamo is already imported.
        return False

    def __init__(self, on_write: Callable[[torch.Tensor], None]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # torch's TorchDispatchMode is unannotated
        self.on_write = on_write

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        info = op_info(func)
        targets = [args[i] for i in info.mutates if i < len(args)] + [kwargs.get(n) for n in info.writes_kwargs]
        for target in targets:
            for t in target if isinstance(target, (list, tuple)) else (target,):
                if isinstance(t, torch.Tensor):
                    self.on_write(t)
        return func(*args, **kwargs)


_SAFE_WRITE_WATCH: list[type[_WriteWatch]] = []


def _write_watch(on_write: Callable[[torch.Tensor], None]) -> _WriteWatch:
    """A `_WriteWatch`; with torch._dynamo imported (a model with compiled parts), one whose
    handler dynamo never traces, wrapped as torch would wrap it."""
    if "torch._dynamo" not in sys.modules:
        return _WriteWatch(on_write)
    if not _SAFE_WRITE_WATCH:
        disable = cast(Callable[..., Any], torch.compiler.disable)  # unannotated in torch
        handler = disable(_WriteWatch.__torch_dispatch__, recursive=True)
        _SAFE_WRITE_WATCH.append(type("_WriteWatch", (_WriteWatch,), {"__torch_dispatch__": handler}))
    return _SAFE_WRITE_WATCH[0](on_write)


def _all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _floats(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def fp32_reference(model: torch.nn.Module, batch: Any, loss_fn: LossFn | None) -> Reference:
    """The fp32 forward and loss of `model` on `batch`, with which module calls made finite
    outputs. The model comes out as it went in, RNG states included: a run after this one
    draws the same dropout masks."""
    finite: dict[tuple[str, int], bool] = {}

    def record(path: str, call: int, out: Any) -> None:
        finite[(path, call)] = _all_finite(_floats(out))

    with (
        ModelStateGuard(model, batch) as guard,
        UnitTracker(model, on_exit=lambda path: None, on_output=record) as tracker,
    ):
        try:
            with _write_watch(guard.before_mutation):
                output = run_model(model, batch)
                tracker.outside = LOSS_UNIT
                loss = resolve_loss(output, batch, loss_fn)
        except PrecisionDoctorError:
            raise
        except Exception as e:
            raise PrecisionDoctorError(f"the verification's fp32 run raised {type(e).__name__}: {e}") from e
        value = float(loss.detach())
        del output, loss
        reset_fsdp_iteration(model)  # a forward without its backward (FSDP2 would prefetch twice)
    return Reference(value, finite)


def verify_plan(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: LossFn | None,
    low_dtype: torch.dtype,
    low: Mapping[str, bool],
    *,
    policy: AutocastPolicy | str = AutocastPolicy.CUDA,
    reference: Reference | None = None,
    cast_low_inputs: bool = False,
) -> Verification:
    """Final-loss relative error of the plan's real low-precision run against fp32, and the
    first module whose outputs went non-finite in it.

    The plan's run is what `apply_plan` executes: its overrides (`unit_overrides` with `low`,
    unit -> runs low) installed on the model, inside the autocast regime's real run
    (`lowrun.low_run`: `torch.autocast` in `low_dtype` with `policy`'s op lists, fp16 kernels
    emulated on the CPU). Plans are autocast override configurations - `apply_plan` installs
    them inside the user's `torch.autocast` region - so verification always runs the autocast
    regime, whatever regime the report was made in. The fp32 reference (`reference`, else
    `fp32_reference` here) and the plan's run start from the same RNG state, so dropout draws
    alike. `cast_low_inputs`: a pure-regime plan's low units cast their inputs, as `apply_plan`
    installs such a plan. The model comes out as it went in."""
    ref = reference if reference is not None else fp32_reference(model, batch, loss_fn)
    inputs_finite: dict[tuple[str, int], bool] = {}
    calls: dict[str, int] = {}

    def watch_inputs(path: str) -> Callable[[torch.nn.Module, Any, Any], None]:
        def hook(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
            call = calls.get(path, 0)  # counted as `UnitTracker` counts the calls
            calls[path] = call + 1
            inputs_finite[(path, call)] = _all_finite(_floats((args, kwargs)))

        return hook

    hooks = [
        m.register_forward_pre_hook(watch_inputs(name or ROOT_UNIT), with_kwargs=True)
        for name, m in model.named_modules()
    ]
    try:
        with unit_overrides(model, low, low_dtype, cast_low_inputs=cast_low_inputs):
            run = low_run(model, batch, loss_fn, low_dtype, regime=Regime.AUTOCAST, policy=policy, record_ops=False)
    except (PrecisionDoctorError, PrecisionDoctorInternalError):
        raise
    except Exception as e:
        raise PrecisionDoctorError(f"the verification run raised {type(e).__name__}: {e}") from e
    finally:
        for h in hooks:
            h.remove()
    reset_fsdp_iteration(model)  # a forward without its backward (FSDP2 would prefetch twice)
    # Module calls in the order they returned: the first whose outputs went non-finite where
    # fp32's did not, from finite inputs (the modules after it only inherit its inf/NaN; an
    # fp32 input that overflows in autocast's cast inside a low unit counts as that unit's doing).
    broken = [key for key, outs in run.module_outputs.items() if ref.finite.get(key, True) and not _all_finite(outs)]
    first_bad = next((k for k in broken if inputs_finite.get(k, True)), broken[0] if broken else None)
    return Verification(relative_loss_error(ref.loss, run.loss), first_bad[0] if first_bad else None)


def module_classes(model: torch.nn.Module) -> dict[str, str]:
    out = {}
    for name, mod in model.named_modules():
        cls = type(mod)
        out[name or ROOT_UNIT] = f"{cls.__module__}.{cls.__qualname__}"
    return out


@dataclass
class _Search:
    """The plan search across its verification rounds. Each round solves for the cheapest
    candidate within the error budget, runs it for real (`verify_plan`) and learns from the
    run: a unit whose outputs turned non-finite, or the worst contributor of a candidate over
    the tolerance, is promoted to fp32; the first finite run calibrates the contributions."""

    report: Report
    costs: CostModel
    tolerance: float
    weight: float
    """Memory's weight in the objective, seconds per byte."""
    contributions: dict[str, float]
    forced: set[str]
    """The units kept fp32: the hard ones, then each one promoted."""
    calibrated: bool
    """Whether `contributions` are on the scale of a verified run's error (until then a
    candidate is every unit low but the forced ones, run to calibrate on)."""
    promoted: dict[str, str] = field(default_factory=dict)
    passes: int = 0
    pure: PureRounds | None = None
    """A pure-regime report's plan: its master-weight choices and training check."""
    labels: dict[str, str] = field(default_factory=dict)
    """The last solved candidate's choice per unit."""
    relabelled: set[str] = field(default_factory=set)
    """Units of `labels` the search kept fp32 and `CostModel.label_low_where_fp32_anyway`
    labelled low (they run in fp32 under either label)."""

    def problem(self) -> PlanProblem:
        problem = build_problem(self.report, self.costs, self.contributions, self.forced, self.tolerance, self.weight)
        if self.pure is not None:
            return replace(problem, choices=self.pure.choices(self.report, self.costs, self.contributions, self.forced))
        return problem

    def candidate(self, problem: PlanProblem) -> dict[str, bool]:
        if self.calibrated:
            self.labels = problem.labels(solve_milp(problem).chosen)
            if self.pure is None:
                low = self.report.environment.dtype.value
                self.relabelled = self.costs.label_low_where_fp32_anyway(self.labels, self.forced, low)
            return {n: label != "fp32" for n, label in self.labels.items()}
        return {n: n not in self.forced for n in problem.names}

    def run(
        self, model: torch.nn.Module, batch: Any, loss_fn: LossFn | None, all_fp32: dict[str, bool], max_rounds: int
    ) -> tuple[dict[str, bool], float, PlanProblem]:
        """The plan (unit -> low), its verified final-loss error and the problem it solves;
        all fp32 when no round found one within the tolerance."""
        dtype = TORCH_DTYPES[self.report.environment.dtype]
        # Plans run under autocast (see `verify_plan`): a report of the pure regime has no policy.
        policy = self.report.environment.policy or AutocastPolicy.CUDA
        reference: Reference | None = None
        verified = math.inf
        for _ in range(max(1, max_rounds)):
            problem = self.problem()
            low = self.candidate(problem)
            if not any(v for n, v in low.items() if n not in self.relabelled):
                # All fp32 as solved (the relabelled units run fp32 either way): an fp32 plan.
                self.relabelled = set()
                low = dict.fromkeys(low, False)
                self.labels = dict.fromkeys(self.labels, "fp32")
                self._drop_failed_check()
                return low, 0.0, problem
            if reference is None:
                reference = fp32_reference(model, batch, loss_fn)
            # In a torch.distributed job each rank verifies on its own data and all decide on the
            # worst rank's error, so every rank runs the same passes.
            check = distributed.worst(
                verify_plan(
                    model,
                    batch,
                    loss_fn,
                    dtype,
                    low,
                    policy=policy,
                    reference=reference,
                    cast_low_inputs=self.pure is not None,
                ),
                lambda c: c.loss_rel_error,
            )
            verified = check.loss_rel_error
            self.passes += 1
            if self.settled(low, check):
                if self.pure is None:
                    return low, verified, problem
                trains = self.pure.trains(
                    model, batch, loss_fn, self.report.environment.dtype, self.labels, self.passes
                )
                if trains:
                    return low, verified, problem
                if trains is None:  # every low unit has master weights and it still does not train
                    break
        if self._drop_failed_check():
            return dict(all_fp32), 0.0, self.problem()
        if verified <= self.tolerance:  # the last round calibrated, on a run within the tolerance
            return low, verified, problem
        # No plan within tolerance in the allowed rounds: fall back to fp32, which is exact.
        return dict(all_fp32), 0.0, self.problem()

    def _drop_failed_check(self) -> bool:
        """Before an all-fp32 plan is returned: a training check that failed was an earlier
        candidate's, not this plan's (fp32 trains as fp32 does), and is dropped. Whether there
        was one."""
        if self.pure is not None and self.pure.check is not None and not self.pure.check.tracks:
            self.pure.check = None
            return True
        return False

    def settled(self, low: dict[str, bool], check: Verification) -> bool:
        """Whether `low`, verified by `check`, is the plan; if not, what the next round changes."""
        verified = check.loss_rel_error
        bad = check.first_nonfinite_unit
        if not math.isfinite(verified) and bad is not None and low.get(bad, False):
            self.promoted[bad] = (
                f"its outputs turned non-finite in verification pass {self.passes} "
                f"({self.report.environment.dtype} run of the plan)"
            )
            self.forced.add(bad)
            return False
        if not self.calibrated and math.isfinite(verified):
            spent = sum(self.contributions.get(n, 0.0) for n, v in low.items() if v)
            if spent > 0:
                self.contributions = {n: e * verified / spent for n, e in self.contributions.items()}
            self.calibrated = True
            return False
        if verified <= self.tolerance:
            return True
        units = self.report.by_module()

        def propagated(n: str) -> float:
            fwd = units[n].forward.propagated if n in units else None
            return fwd.rel_l2_error if fwd is not None and math.isfinite(fwd.rel_l2_error) else 0.0

        # Where no low unit's measured contribution accounts for the error (each 0), the one
        # whose values the low run changes most goes: name order would pick any.
        # A unit autocast runs in fp32 under either label changes nothing promoted.
        running = [n for n, v in low.items() if v and n not in self.costs.fp32_under_autocast]
        worst = max(
            running or [n for n, v in low.items() if v],
            key=lambda n: (self.contributions.get(n, 0.0), propagated(n), n),
        )
        share = self.contributions.get(worst, 0.0)
        why = (
            f"{worst} was its worst contributor ({share:.2e})"
            if share > 0
            else f"no low unit's measured contribution accounts for it: {worst} has the largest propagated "
            f"error of the low units ({propagated(worst):.2e})"
        )
        self.promoted[worst] = (
            f"promoted after verification pass {self.passes}: the plan's final-loss error {verified:.2e} "
            f"exceeded the tolerance and {why}"
        )
        self.forced.add(worst)
        return False


def plan_model(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: LossFn | None,
    report: Report,
    *,
    target: Target | str = Target.H100,
    tolerance: float = DEFAULT_TOLERANCE,
    max_rounds: int = MAX_VERIFY_ROUNDS,
    memory_weight_s_per_byte: float | None = None,
    costs: CostModel | None = None,
    build_optimizer: OptimizerFactory | None = None,
    lr: float | None = None,
    train_steps: int = TRAIN_STEPS,
) -> Plan:
    """The cheapest verified per-unit plan for `report`'s model on `target`, or under
    `costs` when given (measured ones, `timing.measure_cost_model`; `target` then only
    names them in the plan). Each candidate is verified as `apply_plan` runs it, under
    autocast with the report's op policy (`verify_plan`; CUDA's for a pure-regime report).
    An fp8 report gets an fp8 plan (`planning.fp8_plan.plan_fp8_model`).

    A pure-regime report (`model.to(dtype)` training) gets a pure plan (`Plan.regime`): each
    unit with parameters runs fp32, low with its weights held low, or low with fp32 master
    weights (`planning.pure`), and a candidate whose forward passes is also trained for
    `train_steps` real optimizer steps beside fp32 (`training_check`; the optimizer
    `build_optimizer(model)` makes, else AdamW at `lr`, else at the report's optimizer-step
    lr): a unit whose weights stall there gets master weights, and the search goes on."""
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise PrecisionDoctorError(f"tolerance must be a positive number, got {tolerance!r}")
    dtype = report.environment.dtype
    if costs is None:
        costs = build_cost_model(report, profile_for(target), dtype)
    all_fp32 = {u.name: False for u in report.units}
    base_time = costs.step_time_s(all_fp32)
    base_bytes = max(costs.activation_bytes(all_fp32), 1)
    weight = (
        memory_weight_s_per_byte if memory_weight_s_per_byte is not None else MEMORY_TIE_BREAK * base_time / base_bytes
    )
    if dtype is LowDtype.FP8:
        # Imported here: the fp8 search builds on this module's verification.
        from precision_doctor.planning.fp8_plan import plan_fp8_model

        return plan_fp8_model(
            model,
            batch,
            loss_fn,
            report,
            costs,
            target=str(target),
            tolerance=tolerance,
            max_rounds=max_rounds,
            memory_weight_s_per_byte=weight,
        )
    hard = hard_fp32_reasons(report)
    # Contributions are calibrated on the all-low run's final-loss error; when that run went
    # through a unit that must stay fp32 (its error says nothing about the others), the first
    # pass runs everything low but the hard units, to calibrate on.
    calibrated = math.isfinite(report.losses.rel_error) and all(n in (LOSS_UNIT, UNATTRIBUTED_UNIT) for n in hard)
    pure = _pure_rounds(report, build_optimizer, lr, train_steps)
    contributions = error_contributions(report, costs.fp32_under_autocast)
    search = _Search(report, costs, tolerance, weight, contributions, set(hard), calibrated, pure=pure)
    low, verified, problem = search.run(model, batch, loss_fn, all_fp32, max_rounds)

    labels = _final_labels(low, search.labels, dtype)
    # Reasons from the search's own solution (the relabelled units as it kept them), for the
    # units the plan keeps fp32.
    solved = {n: "fp32" if n in search.relabelled else label for n, label in labels.items()}
    reasons = _fp32_reasons(problem, hard, search.promoted, search.contributions, tolerance, solved)
    reasons = {n: r for n, r in reasons.items() if labels.get(n) == "fp32"}
    # Of the units as they run: one autocast runs in fp32 under a low label has fp32 gradients.
    runs = costs.runs_low(low)
    advice, kept_for_gradients = _keep_vanishing_gradients(report, runs)
    for name in kept_for_gradients:
        low[name] = False
    reasons.update(kept_for_gradients)
    auto = autocast_assignment(report)
    plan_time = costs.step_time_s(low)
    pure_fields: dict[str, Any] = {}
    if pure is not None:
        labels = _final_labels(low, labels, dtype)  # after the fp16 gradient moves
        plan_time, pure_fields = _pure_plan_fields(report, problem, labels, pure)
    return Plan(
        model=report.model,
        dtype=dtype,
        target=str(target),
        tolerance=tolerance,
        units={n: (cast(UnitDtype, dtype.value) if v else "fp32") for n, v in low.items()},  # fp8 planned above
        module_classes={n: c for n, c in module_classes(model).items() if n in low},
        module_count=sum(1 for _ in model.named_modules()),
        fp32_units=[Fp32Unit(unit=n, reason=reasons[n]) for n in low if not low[n]],
        estimated_step_time_s=PlanCosts(fp32=base_time, autocast=costs.step_time_s(auto), plan=plan_time),
        activation_bytes=PlanBytes(
            fp32=costs.activation_bytes(all_fp32),
            autocast=costs.activation_bytes(auto),
            plan=costs.activation_bytes(low),
        ),
        verified_loss_rel_error=verified,
        verification_passes=search.passes,
        loss_scale=advice.to_extras(),
        fp32_under_autocast=sorted(n for n in costs.fp32_under_autocast if low.get(n)) if pure is None else [],
        **pure_fields,
    )


# --- pure-regime plans: weights held low, fp32 master weights per unit ---------------------


def _pure_rounds(
    report: Report, build_optimizer: OptimizerFactory | None, lr: float | None, steps: int
) -> PureRounds | None:
    """The pure plan's part of the search, for a pure-regime report (else None)."""
    if report.environment.regime is not Regime.PURE:
        return None
    if lr is None and build_optimizer is None and report.optimizer_step is not None:
        lr = report.optimizer_step.lr  # the lr the analysis stepped at
    return PureRounds(lost_update_units(report), build_optimizer, lr, steps, AutocastPolicy.CUDA)


def _final_labels(low: Mapping[str, bool], labels: Mapping[str, str], dtype: LowDtype) -> dict[str, str]:
    """Each unit's choice in the plan `low` (the solved `labels` where they agree with it: the
    fallback and the fp16 gradient moves change `low` after the solve)."""
    out = {}
    for n, v in low.items():
        label = labels.get(n, "fp32")
        out[n] = "fp32" if not v else (label if label != "fp32" else dtype.value)
    return out


def _pure_plan_fields(
    report: Report, problem: PlanProblem, labels: Mapping[str, str], pure: PureRounds
) -> tuple[float, dict[str, Any]]:
    """A pure plan's step time (its choices' times and casts: a unit held low casts no weights)
    and its `Plan` fields: regime, master-weight units, weight and state bytes, training check."""
    dtype = report.environment.dtype
    chosen = _choice_indices(problem, labels)
    plan_time = replace(problem, memory_weight_s_per_byte=0.0).objective(chosen)
    params, tensors = unit_params(report), state_tensors(report)
    masters = [
        MasterUnit(
            unit=n,
            params=params.get(n, 0),
            reason=pure.needs_master.get(n, "chosen by the search: held low, with no lost-update finding to keep"),
        )
        for n, label in labels.items()
        if label == master_label(dtype)
    ]
    fp32_bytes = sum(state_bytes(params.get(n, 0), tensors, dtype, "fp32") for n in labels)
    plan_bytes = sum(state_bytes(params.get(n, 0), tensors, dtype, label) for n, label in labels.items())
    check = pure.check
    return plan_time, {
        "regime": Regime.PURE,
        "master_weights": masters,
        "state_bytes": PlanBytes(fp32=fp32_bytes, autocast=fp32_bytes, plan=plan_bytes),
        "training_check": None
        if check is None
        else PlanTraining(
            optimizer=check.optimizer,
            lr=check.lr,
            fp32_losses=list(check.fp32_losses),
            plan_losses=list(check.plan_losses),
            tracks=check.tracks,
        ),
    }


def _choice_indices(problem: PlanProblem, labels: Mapping[str, str]) -> list[int]:
    """Per unit of `problem`, the index of its choice labelled as in `labels` (fp32 where it
    has no such choice)."""
    out = []
    for n, choices in zip(problem.names, problem.choices, strict=True):
        names = [c.label for c in choices]
        label = labels.get(n, "fp32")
        out.append(names.index(label) if label in names else 0)
    return out


def _keep_vanishing_gradients(report: Report, low: dict[str, bool]) -> tuple[LossScaleAdvice, dict[str, str]]:
    """fp16 only: the loss scale for the plan's low units, and the units moved to fp32 (in
    `low`, with their reasons) because their gradients flush to zero at every usable scale:
    even at the largest one that keeps the low units' gradients finite (`finite_scale_log2`;
    one scale cannot cover gradients spread wider than fp16's range, as in a deep narrow
    net). A unit that some usable scale saves stays low: the recommendation is then raised to
    the smallest scale at which no low unit's gradients vanish, into the headroom if it must.

    Moves go one at a time, the unit with the largest gradients first (they are what limits
    the scale, and moving them raises it for the rest); afterwards each moved unit is tried
    low again at the scale the later moves allowed. Each move can only raise the largest
    usable scale, so the loop ends. (The plan's verified loss error was measured with them
    low: fp32 adds no rounding there.)"""
    advice = recommend_loss_scale(report, low_units=low)
    moved: dict[str, str] = {}
    if report.environment.dtype is not LowDtype.FP16:
        return advice, moved
    th = report.thresholds
    limits = LIMITS[LowDtype.FP16]
    units = report.by_module()

    def vanishing(k: int) -> list[tuple[str, FlagRecord]]:
        return [
            (u.name, f)
            for u in report.units
            if low.get(u.name, False)
            for f in gradient_flags_at_scale(u, k, limits, th)
            if f.flag is Flag.GRAD_UNDERFLOW
        ]

    def found_at(k: int, f: FlagRecord) -> str:
        # The flag's evidence without its advice (how far GradScaler could grow for that unit
        # alone), which does not hold here: above 2^k the low units' gradients overflow.
        v = f.evidence.values
        return (
            f"{percent(v['underflow_fraction'], '.1%')} of its nonzero gradients and "
            f"{percent(v['norm_fraction_lost'], '.1%')} of their L2 norm flush to 0 at 2^{k}"
        )

    def reason(k: int, f: FlagRecord) -> str:
        # Not "its gradients flush": a unit goes once more of its L2 norm flushes than
        # GRAD_UNDERFLOW allows, which may be a small part of it (deep_narrow's layers.4: 8.6%).
        return (
            f"more of its gradients' L2 norm flushes to 0 in fp16 than GRAD_UNDERFLOW allows "
            f"({percent(th.grad_underflow_norm_fraction, '.1%')}) at every usable loss scale, even at 2^{k}, "
            f"the largest that keeps the low units' gradients finite: {found_at(k, f)}"
        )

    while found := vanishing(advice.finite_scale_log2):
        name, f = max(found, key=lambda nf: (_grad_max_abs(units[nf[0]]), nf[0]))
        low[name] = False
        moved[name] = reason(advice.finite_scale_log2, f)
        advice = recommend_loss_scale(report, low_units=low)
    for name in reversed(list(moved)):
        low[name] = True
        trial = recommend_loss_scale(report, low_units=low)
        found = vanishing(trial.finite_scale_log2)
        own = [f for n, f in found if n == name]
        if not found:
            del moved[name]
            advice = trial
            continue
        low[name] = False
        if own:
            moved[name] = reason(trial.finite_scale_log2, own[0])
        else:  # its own gradients fit, but they hold the scale down for another unit's
            other, f = found[0]
            moved[name] = (
                f"low, its gradients (largest |g| {_grad_max_abs(units[name]):.3g}) cap the fp16 loss scale "
                f"at 2^{trial.finite_scale_log2}, where {other}'s gradients flush to 0: "
                f"{found_at(trial.finite_scale_log2, f)}"
            )
    k = advice.recommended_scale_log2
    if vanishing(k):
        # Saved by a larger scale, below the one that overflows: the smallest such scale.
        k = next(j for j in range(k + 1, advice.finite_scale_log2 + 1) if not vanishing(j))
        advice = recommend_loss_scale(report, low_units=low, scale_log2=k)
    return advice, moved


def _grad_max_abs(unit: Unit) -> float:
    return unit.backward.stats.max_abs if unit.backward.stats is not None else 0.0


def _fp32_reasons(
    problem: PlanProblem,
    hard: Mapping[str, str],
    promoted: Mapping[str, str],
    contributions: Mapping[str, float],
    tolerance: float,
    labels: Mapping[str, str],
) -> dict[str, str]:
    reasons: dict[str, str] = {}
    x = _choice_indices(problem, labels)
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
            flipped[i] = 1
            e = contributions.get(n, 0.0)
            if used + e > tolerance:
                reasons[n] = (
                    f"error budget: running low would add an estimated {e:.2e} of final-loss error (its share of "
                    f"the all-low run's) to the {used:.2e} estimated for the plan's low units, over the "
                    f"{tolerance:.0e} tolerance"
                )
            else:
                dt = problem.objective(flipped) - base
                cost = (
                    f"low would cost {format_seconds(dt, sign=True)} per step (casts around it)"
                    if not is_tie(dt, problem.solver_scale)
                    else "running it low saves no time here (on a tie it stays fp32)"
                )
                reasons[n] = f"{CHEAPER_IN_FP32}: {cost}"
    return reasons


# --- applying a plan -------------------------------------------------------------------------


class PlanHandle(UnitOverrides):
    """The installed overrides of `plan`; `remove()` (or leaving the `with` block) takes them off."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.plan = plan
        self.master_weights = MasterWeights([])
        """A pure-regime plan's fp32 master copies (`MasterWeights`): point the optimizer at
        them (`handle.master_weights.use_in(optimizer)`) and step with
        `handle.master_weights.step(optimizer)`. Empty for an autocast plan."""

    def __enter__(self) -> PlanHandle:
        return self


def check_plan_matches(model: torch.nn.Module, plan: Plan) -> dict[str, torch.nn.Module]:
    """The modules the plan names; refuses a plan made for another model."""
    modules = {name or ROOT_UNIT: m for name, m in model.named_modules()}
    unknown = [u for u in plan.units if u not in (LOSS_UNIT, UNATTRIBUTED_UNIT) and u not in modules]
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
    return {u: modules[u] for u in plan.units if u not in (LOSS_UNIT, UNATTRIBUTED_UNIT)}


def _check_fp8_converted(modules: Mapping[str, torch.nn.Module], plan: Plan) -> None:
    """An fp8 plan's overrides leave the fp8 layers to torchao (or Transformer Engine): refused
    while one is still a plain Linear, which would silently run in bf16."""
    plain = [u for u, d in plan.units.items() if d.startswith("fp8:") and type(modules.get(u)) is torch.nn.Linear]
    if plain:
        shown = ", ".join(plain[:3]) + (f" and {len(plain) - 3} more" if len(plain) > 3 else "")
        raise PrecisionDoctorError(
            f"the plan runs {shown} in fp8 but the model's are plain nn.Linear: convert them first "
            "(the torchao export's convert_planned(model), or te.Linear from the te export), then apply_plan"
        )


def apply_plan(model: torch.nn.Module, plan: Plan | Report | str | os.PathLike[str] | Mapping[str, Any]) -> PlanHandle:
    """Install `plan`'s per-module dtypes (a `Plan`, a planned `Report`, a plan file or its
    JSON as a mapping); they take effect inside `torch.autocast` regions of the plan's dtype.
    Inside a region of another dtype (an fp16 plan in a bf16 region) it, and every planned
    module entered there, raises `PrecisionDoctorError`: re-plan for that dtype.

    A pure-regime plan (`Plan.regime`, planned from a `--regime pure` report) also holds its
    low units' parameters in the plan's dtype, in place (instead of `model.to(dtype)`; `remove()`
    leaves them so), those of its `master_weights` units with fp32 master copies: train with
    `opt = handle.master_weights.use_in(build_optimizer(model))` and
    `handle.master_weights.step(opt)` in place of `opt.step()`. Apply it to the fp32 model.

    >>> import torch, precision_doctor as pd
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    >>> x, loss_fn = torch.randn(8, 4), (lambda out, b: out.pow(2).mean())
    >>> planned = pd.plan_report(net, x, loss_fn, pd.analyze(net, x, loss_fn=loss_fn, dtype="bf16"))
    >>> handle = apply_plan(net, planned)
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):  # on a GPU: "cuda" and the plan's dtype
    ...     loss = loss_fn(net(x), x)
    >>> handle.remove()
    """
    if isinstance(plan, Report):
        plan = Plan.from_report(plan)
    elif isinstance(plan, Mapping):
        plan = validated(Plan, dict(plan), "not a precision-doctor plan")
    elif not isinstance(plan, Plan):
        plan = Plan.load(plan)
    modules = check_plan_matches(model, plan)
    if plan.dtype is LowDtype.FP8:
        _check_fp8_converted(modules, plan)
    low_dtype = TORCH_DTYPES[plan.dtype]  # fp8 plans: bf16 autocast around the fp8 layers
    # Refused here when applied inside an autocast region of another dtype, and on entering a
    # planned module inside one (the overrides check each time).
    check_region_dtype(device_type(model), low_dtype)
    handle = unit_overrides(
        model, plan.low_units, low_dtype, PlanHandle(plan), cast_low_inputs=plan.regime is Regime.PURE
    )
    if plan.regime is Regime.PURE:
        try:
            handle.master_weights = hold_plan_weights(
                model, plan.low_units, {m.unit for m in plan.master_weights}, low_dtype
            )
        except PrecisionDoctorError:
            handle.remove()
            raise
    return handle
