"""The pre-flight gate: a go / no-go verdict before a long low-precision run.

`preflight(model, batch)` runs the analysis (one fp32 step with low-precision shadows), then a
short training run of `steps` optimizer steps three ways, each on deep copies of the model
and optimizer (the objects passed in are never touched):

- `fp32`: the reference;
- `low`: the plain low-precision recipe of `regime`, run for real (`capture.lowrun.low_precision`:
  real dtypes, fp16 (and bf16 without fast CPU kernels) emulated on the CPU). `autocast` (default): `torch.autocast` in
  the low dtype with `policy`'s op lists (CUDA's by default, also on the CPU), with
  `torch.amp.GradScaler`'s defaults (init scale 2^16) for fp16 and no scaler for bf16.
  `pure`: `model.to(dtype)` with floating batch tensors cast, built (or copied) optimizer
  over the low parameters, and no scaler: GradScaler does not support fp16 parameters
  (`unscale_` refuses fp16 gradients), so pure fp16 runs unscaled, as its users run it;
- `master` (pure regime only): the same low model with fp32 master weights: the optimizer
  holds fp32 copies (its state fp32 too), the low gradients are copied up before each step and
  the stepped weights cast down after it; in the pure regime each step also records the
  fraction of the trained weights it left unchanged (`StepRecord.unchanged_fraction`);
- `untrained` (pure regime, batches that vary): the low model with no update applied, each
  batch's loss before training, which STALLED_LOSS reads the others against;
- `planned`: the recommended per-unit plan (`planning.plan`) as `apply_plan` installs it,
  inside `torch.autocast` (plans are autocast override configurations, whatever `regime`
  the analysis ran) and, for fp16, a GradScaler started at the recommended initial loss scale
  (`analysis.loss_scale`). A pure plan trains as its export does: its low units' weights
  held low, fp32 master copies where it gives them, and no scaler (its fp16 gradients could
  not be unscaled): judged at 2^0.

Each run records its loss curve, the steps GradScaler skipped and the non-finite steps (a
non-finite loss, or non-finite gradients that no scaler caught). The risks found are
named with the analysis' flag names (`OVERFLOW`, `GRAD_UNDERFLOW`, ...) plus:

- `DIVERGENT_LOSS`: the run's loss differs from the fp32 run's after the same optimizer steps
  applied by more than `loss_tolerance` (relative to the fp32 loss), at some step. A step
  GradScaler skipped applied no update, so a run that skipped steps is compared with an fp32
  run skipping the same steps (same batches, same dropout draws): a skipped first step is one
  skipped step, not a curve shifted by one. Such a run's noise floor (an fp32 run from the
  weights rounded once to the low dtype: how far the loss moves from one rounding) is
  measured: within `NOISE_FLOOR_FACTOR` times it the finding is information only (a chaotic
  loss, not precision damage: a raw-pixel ViT's fp32 loss moved 134% from fp16-sized noise);
- `SKIPPED_STEPS`: GradScaler skipped more than `max_skipped_steps` (default 2) steps, or
  was still skipping at the last step (a scale that never settles);
- `NONFINITE_STEPS`: a step had a non-finite loss, or non-finite gradients applied unscaled;
- `STALLED_LOSS` (pure regime): the low run's loss stays where the master-weight run's falls
  (`_stalled`): the optimizer's updates are rounded away in the low weights (LOST_UPDATE).

Each risk found has a severity (`Reason.severity`): an analysis flag's own (see
`analysis/flags.py`), `error` for NONFINITE_STEPS, DIVERGENT_LOSS (`info` within its noise
floor) and NONFINITE_FP32, and `warning` for SKIPPED_STEPS unless GradScaler was still
skipping at the last step.

The verdict judges one configuration (`judge`, default `"low"`: the plain low-precision run
the user is about to launch; `"planned"`: the plan): it is no-go when a risk selected by
`fail_on` is found in that run, or flagged by the analysis on a unit that runs low in it.
`fail_on` names risks, or severities: `error` selects every error-severity risk, `warning`
warnings and errors, `info` all. The default is `error` (`DEFAULT_FAIL_ON`): what breaks
training or costs accuracy, a diverging loss included; warnings (a GradScaler back-off, which
GradScaler absorbs by design) are kept as notes, and `fail_on="warning"` makes them fail too
(`ALL`: every risk by name, whatever its severity). The other configuration's outcome is
reported beside it (`planned_go`, `notes`). A non-finite fp32 run (`NONFINITE_FP32`) fails
every judgment.

Defaults: 8 steps (`DEFAULT_STEPS`); the optimizer is the model file's
`build_optimizer(model)` when given, else `torch.optim.AdamW(params, lr=1e-4)` with torch's
other defaults; the batches are `make_batches()`'s first `steps` (cycled when fewer), else
the one `batch` every step. Every run starts from the same RNG seed, so dropout masks match.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field

from precision_doctor.analysis.distributed import Job
from precision_doctor.analysis.flags import OWN_ERROR_FLAGS, gradient_flags_at_scale, report_scale_ceiling
from precision_doctor.analysis.fp8 import FP8_FLAGS
from precision_doctor.capture.emulation import unit_overrides
from precision_doctor.capture.lowrun import cast_floats, low_precision, low_precision_backward
from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.extras import (
    LossScaleSection,
    ModeRun,
    PlanSection,
    PreflightPrediction,
    PreflightSection,
    Reason,
    StepRecord,
)
from precision_doctor.formats import LIMITS, TORCH_DTYPES
from precision_doctor.model.parallel import fsdp_modules, local_tensor, mixed_parameters
from precision_doctor.model.spec import (
    LossFn,
    OptimizerFactory,
    call_build_optimizer,
    copy_batch,
    copy_optimizer_settings,
    device_type,
    rebuild_optimizer,
    resolve_loss,
    run_model,
)
from precision_doctor.model.state import ModelStateGuard
from precision_doctor.options import (
    DEFAULT_FAIL_ON,
    SEVERITY_RANK,
    AutocastPolicy,
    Driver,
    Flag,
    Fp8Recipe,
    Judge,
    LowDtype,
    PlanUnitDtype,
    Regime,
    Severity,
    StrEnum,
    Target,
    Thresholds,
    parse_enum,
    percent,
)
from precision_doctor.planning.fp8 import planned_recipes
from precision_doctor.planning.master import MasterWeights, hold_plan_weights
from precision_doctor.report import Report, fp32_modules
from precision_doctor.runtime.distributed import exchange, same_outcome, unwrap
from precision_doctor.schema import validated
from precision_doctor.training.fp8_scaling import (
    DELAYED_RISK,
    Fp8Training,
    bf16_divergence_reasons,
    delayed_scaling_reasons,
)
from precision_doctor.training.monitor import ScalerMonitor

__all__ = [
    "DEFAULT_FAIL_ON",
    "DEFAULT_STEPS",
    "RISK_NAMES",
    "ModeRun",
    "PreflightResult",
    "Reason",
    "Risk",
    "StepRecord",
    "describe_fail_on",
    "parse_fail_on",
    "preflight",
]

DEFAULT_STEPS = 8
"""Optimizer steps per mode: enough to see GradScaler back off a few powers of two."""
DEFAULT_LOSS_TOLERANCE = 0.05
DEFAULT_LR = 1e-4
DEFAULT_MAX_SKIPPED_STEPS = 2
"""GradScaler backs off one power of two per skipped step; a couple at the start is normal."""
SEED = 0


class Risk(StrEnum):
    """Risks found by the short training runs (beside the analysis' flags)."""

    DIVERGENT_LOSS = "DIVERGENT_LOSS"
    SKIPPED_STEPS = "SKIPPED_STEPS"
    NONFINITE_STEPS = "NONFINITE_STEPS"
    STALLED_LOSS = "STALLED_LOSS"
    FP8_DELAYED_SCALING = DELAYED_RISK
    FP32_DIVERGES = "FP32_DIVERGES"
    """The fp32 reference itself: its loss grows by more than `FP32_DIVERGES_FACTOR` over the
    run (information: the optimizer or lr does not train, whatever the precision)."""


FP32_DIVERGES_FACTOR = 10.0


RISK_NAMES: tuple[str, ...] = tuple(f.value for f in Flag) + tuple(r.value for r in Risk)
"""Every risk name `fail_on` accepts (plus the severities and the keywords ALL and NONE)."""

Progress = Callable[[str], None]


def parse_fail_on(value: str | Iterable[str] | None, option: str = "fail_on") -> tuple[str, ...]:
    """Validate `fail_on`: a comma list (or iterable) of risk names, severities (`error`,
    `warning`, `info`: that severity or worse; kept lowercase), `ALL` or `NONE`.
    None means the default, `DEFAULT_FAIL_ON`. `option`: what an error calls it (the CLI's
    `--fail-on`).

    >>> parse_fail_on("error,SKIPPED_STEPS")
    ('error', 'SKIPPED_STEPS')
    >>> parse_fail_on(None)
    ('error',)
    """
    if value is None:
        value = DEFAULT_FAIL_ON
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(i).strip().upper() for i in items if str(i).strip()]
    if isinstance(value, str) and not names:  # an empty --fail-on (a CI variable unset?)
        raise PrecisionDoctorError(f"{option} is empty; give risk names, severities, ALL or NONE")
    out: list[str] = []
    for n in names:
        if n == "ALL":
            out.extend(RISK_NAMES)
        elif n == "NONE":
            continue
        elif n in RISK_NAMES:
            out.append(n)
        elif n.lower() in SEVERITY_RANK:
            out.append(n.lower())
        else:
            severities = ", ".join(s.value for s in Severity)
            raise PrecisionDoctorError(
                f"unknown risk {n!r} in {option}; choose from: {', '.join(RISK_NAMES)}, {severities}, ALL, NONE"
            )
    return tuple(dict.fromkeys(out))


def describe_fail_on(fail_on: Sequence[str]) -> str:
    """What `fail_on` makes fail, in words, for the verdict.

    >>> describe_fail_on(["error"]), describe_fail_on(["warning", "SKIPPED_STEPS"])
    ('error-severity risk', 'warning- or error-severity risk nor 1 named risk')
    >>> describe_fail_on(["OVERFLOW", "DIVERGENT_LOSS"])
    'risk among 2 checked'
    """
    severities = [Severity(s) for s in fail_on if s in SEVERITY_RANK]
    names = [n for n in fail_on if n not in SEVERITY_RANK]
    if not severities:
        return f"risk among {len(names)} checked"
    loosest = max(severities, key=SEVERITY_RANK.__getitem__)
    gated = {
        Severity.ERROR: "error-severity risk",
        Severity.WARNING: "warning- or error-severity risk",
        Severity.INFO: "risk of any severity",
    }[loosest]
    return f"{gated} nor {len(names)} named risk{'s' if len(names) > 1 else ''}" if names else gated


def _selected(reason: Reason, fail_on: Sequence[str]) -> bool:
    """Whether `fail_on` selects this risk: by its name, or by a severity it meets."""
    rank = SEVERITY_RANK[reason.severity]
    return reason.risk in fail_on or any(s in SEVERITY_RANK and rank <= SEVERITY_RANK[Severity(s)] for s in fail_on)


# --- the result -----------------------------------------------------------------------------


class PreflightResult(PreflightSection):
    """The verdict and its evidence (the report's `preflight` section) with the plan and loss
    scale the planned run used. `bool(result)` is `result.go`."""

    loss_scale: LossScaleSection | None = None
    plan: PlanSection | None = None
    report: Report | None = Field(default=None, exclude=True, repr=False)
    """The analysis report, with the plan's `plan` and `loss_scale` sections (Python API
    only; not in the JSON)."""

    def __bool__(self) -> bool:
        return self.go

    @property
    def verdict(self) -> str:
        regime = Regime.AUTOCAST if self.judge == "planned" else self.regime
        how = f"{regime}, {self.policy} op lists" if regime is Regime.AUTOCAST and self.policy else str(regime)
        head = f"{'GO' if self.go else 'NO-GO'}: {self.model} in {self.dtype} ({self.judge} configuration; {how})"
        if self.go:
            body = f"no {describe_fail_on(self.fail_on)} in {self.steps} steps"
        else:
            counts: dict[str, int] = {}
            for r in self.reasons:
                counts[r.risk] = counts.get(r.risk, 0) + 1
            risks = [f"{k} x{n}" if n > 1 else k for k, n in sorted(counts.items())]
            body = f"{len(self.reasons)} reason(s): {', '.join(risks)}"
        tail = ""
        if self.judge == "low" and self.planned_go is not None and not self.go:
            # A loss scale is fp16's alone (bf16 and fp8 plans run without a scaler), and a pure
            # plan's run has none either.
            planned = self.runs.get("planned")
            scale = " and recommended loss scale" if planned is not None and planned.init_scale_log2 is not None else ""
            tail = f"; with the plan{scale}: " + ("go" if self.planned_go else "still no-go")
        return f"{head}: {body}{tail}"

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "pre-flight result") -> PreflightResult:
        """A result read back from `to_json()` (`preflight --json`); without its `report`."""
        return validated(cls, text, f"{source} does not match the pre-flight schema")

    def prediction(self) -> PreflightPrediction:
        """What the pre-flight predicts for the run the verdict judged, for `ScalerMonitor`
        (`prediction=`)."""
        run = self.runs.get(self.judge) or self.runs["low"]
        return PreflightPrediction(
            go=self.go,
            dtype=self.dtype,
            judge=self.judge,
            steps=self.steps,
            init_scale_log2=run.init_scale_log2,
            skipped_steps=list(run.skipped_steps),
            nonfinite_steps=list(run.nonfinite_steps),
            max_divergence=run.max_divergence,
            reasons=[r.line() for r in self.reasons],
            recommended_scale_log2=self.loss_scale.recommended_scale_log2 if self.loss_scale is not None else None,
        )

    def section(self) -> PreflightSection:
        """The report's `extras.preflight`."""
        return PreflightSection(**{name: getattr(self, name) for name in PreflightSection.model_fields})

    def annotated_report(self) -> Report | None:
        """The analysis report with the pre-flight in `extras` (beside the plan and loss
        scale, which it already carries when the pre-flight planned)."""
        if self.report is None:
            return None
        return self.report.with_extras(preflight=self.section())


# --- the runs -------------------------------------------------------------------------------


def _default_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=DEFAULT_LR)


def _factory_of(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> OptimizerFactory:
    """`build_optimizer` for `optimizer` (over `model`'s parameters): the same class and
    parameter groups with their hyperparameters, over another model of the same structure
    (the analysis' copy), by parameter position. Its state (a warm Adam's moments) is not
    carried: the analysis' step is an optimizer's first."""
    position = {id(p): i for i, p in enumerate(model.parameters())}
    groups = [
        ([position[id(p)] for p in g["params"] if id(p) in position], {k: v for k, v in g.items() if k != "params"})
        for g in optimizer.param_groups
    ]

    def build(m: torch.nn.Module) -> torch.optim.Optimizer:
        params = list(m.parameters())
        return rebuild_optimizer(
            optimizer, [{"params": [params[i] for i in idx], **hyper} for idx, hyper in groups if idx]
        )

    return build


def _copy(obj: Any, what: str) -> Any:
    try:
        return copy.deepcopy(obj)
    except Exception as e:
        raise PrecisionDoctorError(
            f"the pre-flight works on copies and cannot deep-copy the {what}: {type(e).__name__}: {e}"
        ) from e


def _grads_finite(params: Sequence[torch.nn.Parameter]) -> bool:
    """Whether this rank's gradients are finite (of a DTensor, its local shard)."""
    grads = [local_tensor(p.grad) for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


_FP32_SCALAR_STATE = frozenset({"step", "mu_product", "eta", "mu"})


def _to_low(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, dtype: torch.dtype) -> None:
    """`model.to(dtype)` (the parameters stay the same objects, so an optimizer over them
    still holds them) and a copied optimizer's state with it (`_state_like_params`)."""
    model.to(dtype)
    if optimizer is not None:
        _state_like_params(optimizer)


def _state_like_params(optimizer: torch.optim.Optimizer) -> None:
    """A copied optimizer's per-parameter state in its parameter's dtype, as an optimizer built
    over the parameters as they are now (some cast low) would keep it."""
    for p, state in optimizer.state.items():
        if not isinstance(p, torch.Tensor):
            continue
        for k, v in list(state.items()):
            # Not the fp32 scalars torch keeps whatever the parameter's dtype (Adam's step count,
            # which in bf16 stops at 256; NAdam's mu_product, ASGD's eta and mu), shaped like a
            # scalar parameter.
            if (
                k not in _FP32_SCALAR_STATE
                and isinstance(v, torch.Tensor)
                and v.is_floating_point()
                and v.shape == p.shape
            ):
                state[k] = v.to(p.dtype)


def rounded_once(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` with each value's significand rounded (to nearest even) to `dtype`'s precision, its
    range left as it is: the relative perturbation of one rounding to `dtype`, without the
    Inf an fp16 cast makes of a weight above 65504 or the 0 of one below its subnormals.

    >>> rounded_once(torch.tensor([1.0 + 2**-12, 7e4, 1e-9]), torch.float16).tolist()
    [1.0, 70016.0, 1.000444171950221e-09]
    """
    bits = 1 - round(math.log2(torch.finfo(dtype).eps))  # significand bits: 11 in fp16, 8 in bf16
    wide = t.double() if t.dtype == torch.float64 else t.float()  # fp64 weights keep their range
    mantissa, exponent = torch.frexp(wide)  # |mantissa| in [0.5, 1)
    return torch.ldexp(torch.round(mantissa * 2.0**bits) / 2.0**bits, exponent).to(t.dtype)


def _point_at_masters(optimizer: torch.optim.Optimizer, held: MasterWeights) -> None:
    """`held.use_in(optimizer)`, for an optimizer that may have stepped already (the user's,
    copied): the state of a parameter with a master copy moves to the copy (it was made over
    the fp32 values the copy holds)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if (master := held.master(p)) is not p and p in optimizer.state:
                optimizer.state[master] = optimizer.state.pop(p)
        group["params"] = [held.master(p) for p in group["params"]]


@dataclass(frozen=True)
class HeldPlan:
    """A pure-regime plan's weights, as `planning.master.hold_plan_weights` holds them."""

    low_units: Mapping[str, bool]
    master_units: tuple[str, ...]


@dataclass(frozen=True)
class _Place:
    """Where the pre-flight runs, decided once from the model it is given (`of`).

    torch cannot deep-copy an FSDP2 model (`sharded`): the analysis, the plan and each run
    get the model itself, and put it back (a run under a `ModelStateGuard`). In a
    torch.distributed `job` each rank runs the pre-flight on its own batches: the analysis
    and plan are the job's, the short runs train data parallel (`step_loss`), and every rank
    reaches the same verdict. A DDP model's copies are copies of its `module` (`model`); the
    analysis gets the wrapper as given (`wrapped`) and sets it aside itself."""

    wrapped: torch.nn.Module
    model: torch.nn.Module
    job: Job | None
    sharded: bool

    @classmethod
    def of(cls, model: torch.nn.Module) -> _Place:
        unwrapped, wrapper = unwrap(model)
        return cls(model, unwrapped, Job.of(unwrapped, wrapper), bool(fsdp_modules(unwrapped)))

    def for_analysis(self) -> torch.nn.Module:
        # The analysis restores the model it is given; a copy keeps even that out of the
        # user's way.
        return self.wrapped if self.wrapped is not self.model or self.sharded else _copy(self.model, "model")

    def for_plan(self) -> torch.nn.Module:
        return self.model if self.sharded else _copy(self.model, "model")

    def for_training(
        self, optimizer: torch.optim.Optimizer | None
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer | None]:
        """The model a run trains, and the optimizer's copy over it (None: none given)."""
        if self.sharded:
            memo = {id(p): p for p in self.model.parameters()}
            if optimizer is None:
                return self.model, None
            opt = copy.deepcopy(optimizer, memo)
            copy_optimizer_settings(optimizer, opt)
            return self.model, opt
        if optimizer is not None:
            # One deepcopy call for both: the copied optimizer then holds the copied parameters.
            m, opt = _copy((self.model, optimizer), "model and optimizer")
            copy_optimizer_settings(optimizer, opt)  # what deepcopy leaves out
            return m, opt
        return _copy(self.model, "model"), None

    def step_loss(self, model: torch.nn.Module, loss: float, finite: bool) -> tuple[float, list[float], bool]:
        """A step's loss, each rank's (none outside a job), and whether the gradients are
        finite: the job's, its gradients averaged across ranks (`_average_step`), or this
        process's own."""
        if self.job is None:
            return loss, [], finite
        rank_losses, finite = _average_step(self.job, model, loss, finite)
        return math.fsum(rank_losses) / len(rank_losses), rank_losses, finite


class _TrainingRun:
    """One configuration's model and optimizer (copies, or the FSDP2 model itself), trained
    one step at a time (`step`): in fp32 (`dtype` None), or in `dtype` as `regime` runs it
    (`low_precision`). With a GradScaler from 2^`init_scale_log2`; without one, the steps in
    `skip` compute their loss and gradients but apply no update (as another run's GradScaler
    skipped them: the reference that run is compared with)."""

    def __init__(
        self,
        place: _Place,
        optimizer: torch.optim.Optimizer | None,
        build_optimizer: OptimizerFactory,
        loss_fn: LossFn | None,
        *,
        mode: str,
        dtype: torch.dtype | None,
        regime: Regime,
        policy: AutocastPolicy,
        init_scale_log2: int | None,
        skip: frozenset[int],
        master: bool = False,
        track_unchanged: bool = False,
        fp8: Fp8Training | None = None,
        held: HeldPlan | None = None,
        rounded_to: torch.dtype | None = None,
    ) -> None:
        self.place, self.loss_fn, self.mode, self.skip = place, loss_fn, mode, skip
        self.pure = dtype is not None and regime is Regime.PURE
        self.dtype = dtype
        self.track_unchanged = track_unchanged
        m, opt = place.for_training(optimizer)
        if rounded_to is not None:  # the noise floor's start: each weight rounded once
            with torch.no_grad():
                for p in m.parameters():
                    if p.is_floating_point():
                        p.copy_(rounded_once(p, rounded_to))
        if fp8 is not None:  # the copy's Linear layers swapped for torchao's, same parameters
            m = fp8.convert(m)
        # fp32 master weights (pure regime): the optimizer holds and steps the fp32 model; a
        # low copy runs forward and backward, its gradients copied up before each step and
        # the stepped weights cast down after it.
        self.master: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] | None = None
        master_model: torch.nn.Module | None = None
        if self.pure and master:
            assert dtype is not None
            master_model = m
            m = _copy(m, "model").to(dtype)
            self.master = list(zip(master_model.parameters(), m.parameters(), strict=True))
        elif self.pure:
            assert dtype is not None
            _to_low(m, opt, dtype)  # without an optimizer, it is built over the low parameters
        # A pure plan's weights, as its export holds them: the low units' own in `dtype`, its
        # master units' with fp32 copies the optimizer steps.
        self.held: MasterWeights | None = None
        if held is not None:
            assert dtype is not None
            self.held = hold_plan_weights(m, held.low_units, held.master_units, dtype)
        if opt is None:  # over the fp32 master copies where there are some
            opt = call_build_optimizer(build_optimizer, master_model if master_model is not None else m)
        self.model, self.opt = m, opt
        # The optimizer's parameters only, as GradScaler checks them: a gradient it never
        # applies (a parameter it does not hold) cannot reach the weights.
        self.params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
        # The weights the optimizer steps, whose unchanged elements a step counts: the fp32
        # master copies where there are some (their low copies round most small moves away).
        self.tracked = list(self.params)
        if self.master is not None:
            in_opt = {id(p) for p in self.params}
            self.params = [low for up, low in self.master if id(up) in in_opt]
        if self.held is not None and dtype is not None:
            _point_at_masters(opt, self.held)
            _state_like_params(opt)  # the state of the low weights without copies
        self.monitor: ScalerMonitor | None = None
        if init_scale_log2 is not None:
            self.monitor = ScalerMonitor(torch.amp.GradScaler(device_type(m), init_scale=2.0**init_scale_log2))
        # Forward and loss as `with torch.autocast(...): loss = ...`, the backward outside it
        # as PyTorch prescribes (`low_precision_backward`); the update: fp32 master weights
        # under autocast (no context), the low parameters' update in the pure regime (its
        # fp16 arithmetic emulated on the CPU as the forward's).
        no_context: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
        self.precision, self.backward_precision, self.optimizer_precision = no_context, no_context, no_context
        if dtype is not None:
            self.precision = functools.partial(low_precision, m, dtype, regime=regime, policy=policy)
            self.backward_precision = functools.partial(low_precision_backward, m, dtype)
            if self.pure:
                self.optimizer_precision = self.precision

    def step(self, i: int, b: Any) -> StepRecord:
        """Optimizer step `i` on batch `b`."""
        # Each step reads the batch as given, as a loader's next one: not what an earlier
        # step's forward wrote into it in place (`x.mul_(2)` compounded over the runs' steps
        # into a false DIVERGENT_LOSS); the caller's tensors get no write and no `.grad`.
        b = copy_batch(b)
        if self.pure:
            assert self.dtype is not None
            b = cast_floats(b, self.dtype)
        self.opt.zero_grad(set_to_none=True)
        if self.master is not None:
            for _, low in self.master:
                low.grad = None
        monitor = self.monitor
        scale = monitor.get_scale() if monitor is not None else None
        try:
            with self.precision():
                loss = resolve_loss(run_model(self.model, b), b, self.loss_fn)
            with self.backward_precision():
                (monitor.scale(loss) if monitor is not None else loss).backward()
        except PrecisionDoctorError:
            raise
        except Exception as e:
            raise PrecisionDoctorError(f"the {self.mode} training step {i} raised {type(e).__name__}: {e}") from e
        loss_v, rank_losses, finite = self.place.step_loss(self.model, float(loss.detach()), _grads_finite(self.params))
        skipped = False
        before = [p.detach().clone() for p in self.tracked] if self.track_unchanged else None
        if self.master is not None:
            for up, low in self.master:
                up.grad = None if low.grad is None else low.grad.float()
        if self.held is not None:
            self.held.grads_to_master()
        with self.optimizer_precision():
            if monitor is not None:
                monitor.step(self.opt)
                monitor.update()
                skipped = bool(monitor.skipped_steps) and monitor.skipped_steps[-1] == i
            elif i in self.skip:
                skipped = True
            else:
                self.opt.step()  # as a real run would: non-finite gradients reach the weights
        if self.master is not None:
            with torch.no_grad():
                for up, low in self.master:
                    low.copy_(up)
        if self.held is not None:
            self.held.copy_to_model()
        return StepRecord(
            step=i,
            loss=loss_v,
            grads_finite=finite,
            scale=scale,
            skipped=skipped,
            rank_losses=rank_losses,
            unchanged_fraction=_unchanged(before, self.tracked) if before is not None else None,
        )


def _unchanged(before: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> float:
    """The fraction of the trained weights' elements a step left exactly as they were."""
    same = sum(int((b == p.detach()).sum()) for b, p in zip(before, params, strict=True))
    total = sum(b.numel() for b in before)
    return same / total if total else 0.0


@dataclass(frozen=True)
class _Trainer:
    """What every short training run shares: where it runs, the optimizer (or how one is
    built) and the batches."""

    place: _Place
    optimizer: torch.optim.Optimizer | None
    build_optimizer: OptimizerFactory
    batches: Sequence[Any]
    loss_fn: LossFn | None

    def run(
        self,
        mode: str,
        description: str,
        *,
        dtype: torch.dtype | None,
        regime: Regime = Regime.AUTOCAST,
        policy: AutocastPolicy = AutocastPolicy.CUDA,
        units: Mapping[str, PlanUnitDtype] | None,
        init_scale_log2: int | None,
        skip: frozenset[int] = frozenset(),
        master: bool = False,
        track_unchanged: bool = False,
        fp8: Fp8Training | None = None,
        cast_low_inputs: bool = False,
        held: HeldPlan | None = None,
        rounded_to: torch.dtype | None = None,
    ) -> ModeRun:
        """`len(batches)` optimizer steps of one configuration (`_TrainingRun`), with `units`'
        overrides (a plan's) installed as `apply_plan` installs them (`cast_low_inputs`: a pure
        plan's, whose low units cast their inputs; `held`: its weights, held as its export
        holds them).

        In a torch.distributed job every rank trains its copy on its own batches, data
        parallel: the gradients are averaged across ranks before each update, as DDP averages
        them, so the copies stay equal and GradScaler decides alike on every rank; each step's
        loss is the ranks' mean (each rank's in `rank_losses`)."""
        t0 = time.perf_counter()
        if dtype is not None and regime is Regime.PURE and units is not None:
            raise PrecisionDoctorError("a plan's per-unit dtypes run under autocast, not in the pure regime")
        with torch.random.fork_rng(devices=[]), contextlib.ExitStack() as installed:
            if self.place.sharded:
                # The model itself: put back afterwards, from before the run changes anything
                # (weights rounded for the noise floor, or held low for a pure plan).
                guard = installed.enter_context(ModelStateGuard(self.place.model))
                for p in self.place.model.parameters():
                    guard.before_mutation(p)
            run = _TrainingRun(
                self.place,
                self.optimizer,
                self.build_optimizer,
                self.loss_fn,
                mode=mode,
                dtype=dtype,
                regime=regime,
                policy=policy,
                init_scale_log2=init_scale_log2,
                skip=skip,
                master=master,
                track_unchanged=track_unchanged,
                fp8=fp8,
                held=held,
                rounded_to=rounded_to,
            )
            if dtype is not None and units is not None:
                # The plan's units ("" is the default of those it does not name: fp32, so none).
                low = {u: d != "fp32" for u, d in units.items() if u != ""}
                installed.enter_context(unit_overrides(run.model, low, dtype, cast_low_inputs=cast_low_inputs))
            if fp8 is not None:
                installed.enter_context(fp8.running())
            torch.manual_seed(SEED)
            records = []
            for i, b in enumerate(self.batches):
                with fp8.step(i) if fp8 is not None else contextlib.nullcontext():
                    records.append(run.step(i, b))
        del run
        return ModeRun(
            mode=mode,
            description=description,
            units=dict(units) if units is not None else {},
            init_scale_log2=init_scale_log2,
            steps=records,
            skipped_steps=[r.step for r in records if r.skipped],
            nonfinite_steps=[
                r.step for r in records if not math.isfinite(r.loss) or (not r.grads_finite and not r.skipped)
            ],
            seconds=time.perf_counter() - t0,
        )


def _average_step(job: Job, model: torch.nn.Module, loss: float, finite: bool) -> tuple[list[float], bool]:
    """One data-parallel step's exchange: every rank's loss (a checkpoint: a rank whose step
    failed is named on every rank), then the model's gradients averaged across ranks, zeros
    where a rank has none and another has one. Also whether the job's gradients are finite
    (`finite`: this rank's, before averaging): an average of finite halves is finite, and
    a non-finite value on any rank makes its average non-finite; sharded gradients (FSDP2,
    tensor parallel) are finite where every rank's shard is."""
    named = dict(model.named_parameters())
    got = exchange((loss, sorted(n for n, p in named.items() if p.grad is not None), finite))
    grads = {n: p.grad for n, p in named.items() if p.grad is not None}
    job.average_data_parallel(model, grads, [names for _, names, _ in got])
    for n, g in grads.items():
        if named[n].grad is None:  # a gradient only another rank's data reached
            named[n].grad = g
    return [v for v, _, _ in got], all(f for _, _, f in got)


def _step_divergence(s: StepRecord, r: StepRecord) -> float:
    """The relative loss difference of a step from the reference's; in a distributed job the
    worst rank's (each rank's loss against its own reference loss, on the same batch)."""
    pairs = (
        list(zip(s.rank_losses, r.rank_losses, strict=True)) if s.rank_losses and r.rank_losses else [(s.loss, r.loss)]
    )
    worst = 0.0
    for low, ref in pairs:
        if not math.isfinite(low):
            return math.inf
        if math.isfinite(ref):
            worst = max(worst, abs(low - ref) / max(abs(ref), 1e-30))
    return worst


def _with_divergence(run: ModeRun, ref: ModeRun) -> ModeRun:
    """`run` with its largest loss divergence from `ref`, step by step: `ref` is the fp32 run
    that skipped the steps `run` skipped, so both losses at a step come after the same
    optimizer steps applied, on the same batch."""
    assert ref.skipped_steps == run.skipped_steps, (ref.skipped_steps, run.skipped_steps)
    worst, at = 0.0, None
    for s, r in zip(run.steps, ref.steps, strict=True):
        if not math.isfinite(r.loss):
            continue  # the fp32 run itself broke: reported as NONFINITE_FP32
        d = _step_divergence(s, r)
        if at is None or d > worst:
            worst, at = d, s.step
    return run.model_copy(update={"max_divergence": worst, "divergence_step": at})


def _fp32_diverges(run: ModeRun, optimizer: str) -> Reason | None:
    """FP32_DIVERGES where the fp32 reference's last loss is over `FP32_DIVERGES_FACTOR` times
    its first (both finite, the first positive): the other runs are judged against a run that
    does not train. ffn_overflow's fp32 loss went 0.131 -> 1.6e4 under AdamW at lr 1e-4, and
    its plan's "no-go" came from that."""
    losses = run.losses
    if len(losses) < 2 or not all(map(math.isfinite, losses)) or losses[0] <= 0:
        return None
    if losses[-1] <= FP32_DIVERGES_FACTOR * losses[0]:
        return None
    return Reason(
        risk=Risk.FP32_DIVERGES.value,
        mode=run.mode,
        message=f"the fp32 reference's loss rises from {losses[0]:.4g} to {losses[-1]:.4g} in {len(losses)} "
        f"steps under {optimizer}: training diverges without low precision too, so the runs are "
        "compared where nothing trains; give the model file a build_optimizer (a lower lr) that trains",
        severity=Severity.INFO,
    )


def _run_reasons(run: ModeRun, tolerance: float, max_skipped: int) -> list[Reason]:
    out: list[Reason] = []
    n = len(run.steps)
    if run.nonfinite_steps:
        first = run.nonfinite_steps[0]
        what = "loss" if not math.isfinite(run.steps[first].loss) else "gradients (no scaler)"
        out.append(
            Reason(
                risk=Risk.NONFINITE_STEPS.value,
                mode=run.mode,
                message=f"{len(run.nonfinite_steps)}/{n} steps non-finite; first at step {first} (non-finite {what})",
            )
        )
    # GradScaler skipping a few early steps while it backs off is by design; more than
    # `max_skipped` skips, or a last step still skipped (it never settled), is the risk.
    unsettled = bool(run.skipped_steps) and run.skipped_steps[-1] == n - 1
    if len(run.skipped_steps) > max_skipped or unsettled:
        out.append(
            Reason(
                risk=Risk.SKIPPED_STEPS.value,
                mode=run.mode,
                severity=Severity.ERROR if unsettled else Severity.WARNING,
                message=(
                    f"GradScaler skipped {len(run.skipped_steps)}/{n} steps "
                    f"(steps {_ranges(run.skipped_steps)}) starting at scale 2^{run.init_scale_log2}"
                ),
            )
        )
    if run.max_divergence is not None and run.max_divergence > tolerance:
        message = (
            f"loss differs from fp32 by {_pct(run.max_divergence)} at step {run.divergence_step} "
            f"(tolerance {_pct(tolerance)})" + ("; fp32 skipping the same steps" if run.skipped_steps else "")
        )
        floor = run.noise_floor
        chaotic = floor is not None and run.max_divergence <= NOISE_FLOOR_FACTOR * floor
        if floor is not None:
            message += f"; fp32 itself, from its weights rounded once to the low dtype, differs by {_pct(floor)}" + (
                ": the loss is that sensitive to any rounding here (chaotic at this lr and batch), "
                "so the difference is no evidence of precision damage"
                if chaotic
                else ""
            )
        out.append(
            Reason(
                risk=Risk.DIVERGENT_LOSS.value,
                mode=run.mode,
                message=message,
                severity=Severity.INFO if chaotic else Severity.ERROR,
            )
        )
    return out


NOISE_FLOOR_FACTOR = 2.0
"""DIVERGENT_LOSS is information only where the run diverges by at most this many times its
noise floor (`ModeRun.noise_floor`): fp32 rounded once moves the loss that far already."""

STALL_MIN_DESCENT = 1e-3
"""STALLED_LOSS needs the master-weight run's loss to fall by at least this fraction over the
steps (less is noise, not descent)..."""
STALL_RATIO = 0.25
"""...and the pure run's to fall by less than this fraction of that."""


def _descent(run: ModeRun, untrained: ModeRun | None = None) -> float | None:
    """How much the run's loss fell over its last quarter, relative: against the first step's
    loss, or with batches that vary (`untrained`: each batch's loss before any update), batch
    by batch against that batch's own (a batch's loss varies more than training moves it in
    a few steps); None where a loss is not finite or the run is too short."""
    losses = run.losses
    if len(losses) < 2 or not all(math.isfinite(v) for v in losses):
        return None
    quarter = max(1, len(losses) // 4)
    if untrained is not None and len(untrained.losses) == len(losses):
        # Summed over the batches, not averaged per batch: a batch whose loss is near 0 would
        # outweigh the rest.
        before = untrained.losses[-quarter:]
        scale = sum(abs(b) for b in before)
        if not all(math.isfinite(v) for v in before) or scale == 0:
            return None
        return (sum(before) - sum(losses[-quarter:])) / scale
    if losses[0] == 0:
        return None
    tail = losses[-quarter:]
    return (losses[0] - sum(tail) / len(tail)) / abs(losses[0])


def _stalled(low: ModeRun, master: ModeRun, untrained: ModeRun | None = None) -> list[Reason]:
    """STALLED_LOSS: the pure run's loss stays where the same low model with fp32 master
    weights descends: its optimizer step rounds the updates away (the analysis' LOST_UPDATE)."""
    fell, moved = _descent(master, untrained), _descent(low, untrained)
    if fell is None or moved is None or fell < STALL_MIN_DESCENT or moved >= STALL_RATIO * fell:
        return []
    unchanged = [s.unchanged_fraction for s in low.steps if s.unchanged_fraction is not None]
    kept = (
        f"; it left {percent(sum(unchanged) / len(unchanged))} of its weights unchanged per step" if unchanged else ""
    )
    return [
        Reason(
            risk=Risk.STALLED_LOSS.value,
            mode=low.mode,
            message=(
                f"the loss {'falls' if moved >= 0 else 'rises'} {percent(abs(moved))} over {len(low.steps)} steps "
                "where fp32 master weights make it fall "
                f"{percent(fell)}{kept}: the updates are rounded away in the low weights (keep fp32 master weights, "
                "use a compensating optimizer, or raise the learning rate; see LOST_UPDATE)"
            ),
        )
    ]


def _pct(x: float) -> str:
    return percent(x)


def _ranges(steps: Sequence[int]) -> str:
    parts: list[str] = []
    for _, grp in itertools.groupby(enumerate(steps), key=lambda t: t[1] - t[0]):
        g = [s for _, s in grp]
        parts.append(str(g[0]) if len(g) == 1 else f"{g[0]}-{g[-1]}")
    return ",".join(parts)


def _batches(batch: Any, make_batches: Callable[[], Iterable[Any]] | None, steps: int) -> list[Any]:
    if make_batches is None:
        return [batch] * steps
    try:
        first = list(itertools.islice(iter(make_batches()), steps))
    except PrecisionDoctorError:
        raise
    except Exception as e:
        raise PrecisionDoctorError(f"make_batches() raised {type(e).__name__}: {e}") from e
    if not first:
        raise PrecisionDoctorError("make_batches() yielded no batch")
    return list(itertools.islice(itertools.cycle(first), steps))


def _optimizer_name(
    optimizer: torch.optim.Optimizer | None, build: OptimizerFactory | None, model: torch.nn.Module
) -> str:
    if optimizer is not None:
        return f"{type(optimizer).__name__} (copied)"
    if build is not None:
        name = getattr(build, "__name__", type(build).__name__)
        return "build_optimizer(model)" if name == "build_optimizer" else f"build_optimizer: {name}"
    return f"AdamW(lr={DEFAULT_LR:g}) (default)"


@same_outcome
def preflight(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: LossFn | None = None,
    *,
    dtype: str | LowDtype = LowDtype.FP16,
    regime: str | Regime = Regime.AUTOCAST,
    policy: str | AutocastPolicy = AutocastPolicy.CUDA,
    steps: int = DEFAULT_STEPS,
    fail_on: str | Iterable[str] | None = None,
    build_optimizer: OptimizerFactory | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    make_batches: Callable[[], Iterable[Any]] | None = None,
    judge: str | Judge = Judge.LOW,
    loss_tolerance: float = DEFAULT_LOSS_TOLERANCE,
    max_skipped_steps: int = DEFAULT_MAX_SKIPPED_STEPS,
    thresholds: Thresholds | Mapping[str, float] | None = None,
    plan: bool = True,
    target: Target | str = Target.H100,
    name: str | None = None,
    progress: Progress | None = None,
    fp8_recipe: str | Fp8Recipe | None = None,
    driver: str | Driver = Driver.AUTO,
) -> PreflightResult:
    """Analyze, then train `steps` steps in fp32, plain `dtype` and the planned mix (each on
    deep copies), and judge whether the run is safe to launch. See the module docstring.

    `regime` (`autocast` or `pure`) and `policy` (`cuda` or `cpu`: whose autocast op lists)
    say what the analysis and the plain low run execute, as `analyze` takes them; the planned
    run is always autocast, with the op lists the plan was verified with (the report's
    policy; CUDA's after a pure analysis).

    `dtype="fp8"` (`fp8_recipe`, default tensorwise; autocast regime): the analysis and the
    `low` run are torchao's (`convert_fp8` on the run's copy: every Linear under the recipe,
    emulated on the CPU, under bf16 autocast), a `bf16` autocast run runs beside them, and
    each fp8 run's loss is judged against bf16's too (DIVERGENT_LOSS naming the layers the
    analysis flags that run fp8 in it). With `plan`, the fp8 plan (`planning.fp8_plan`, on
    `target`) and a `planned` run: the copy converted by `planning.fp8.convert_planned` (the
    plan's fp8 layers, each under its recipe) under bf16 autocast with the plan's fp32 units
    overridden, as the plan was verified; `judge="planned"` judges it (the analysis' fp8
    findings count only for layers the plan runs under the analysed recipe). Transformer
    Engine's delayed scaling is modelled over the judged fp8 run's steps and layers
    (`training.fp8_scaling`, `fp8_scaling` in the result, its `run` saying which;
    FP8_DELAYED_SCALING notes, warnings).

    `driver`: how the analysis captures the fp32 step's ops, as `analyze` takes it.

    `optimizer`: an existing optimizer over `model`'s parameters, deep-copied together with
    the model for each run (its state and hyperparameters carry over); otherwise
    `build_optimizer(model_copy)`, else AdamW(lr=1e-4). `plan=False` skips the planned run.

    The phases, in order: validate the options (`_validate`) and decide where the pre-flight
    runs (`_Place`: copies or the FSDP2 model itself, one process or a job's rank); the
    analysis and plan (`_analyze_and_plan`); the short training runs (`_training_runs`); each
    compared with an fp32 run skipping the same steps (`_compared`); the judgment (`_Judge`).

    >>> import torch, precision_doctor as pd
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> result = pd.preflight(net, torch.randn(8, 4), lambda out, b: out.pow(2).mean(), steps=2, plan=False)
    >>> bool(result), result.runs["low"].skipped_steps
    (True, [])
    """
    low, run_regime, op_policy, risks, judge = _validate(
        model,
        dtype,
        regime,
        policy,
        fail_on,
        judge,
        plan,
        steps,
        max_skipped_steps,
        loss_tolerance,
        optimizer,
        build_optimizer,
    )
    target = parse_enum(Target, target, "target")
    th = Thresholds.of(thresholds)
    recipe = _fp8_recipe(low, run_regime, fp8_recipe)
    messages: list[str] = []
    run_driver = parse_enum(Driver, driver, "driver")
    place = _Place.of(model)
    say = progress or (lambda _msg: None)
    timings: dict[str, float] = {}
    batches = _batches(batch, make_batches, steps)
    # The analysis steps the pre-flight's own optimizer (LOST_UPDATE): the one given, as a
    # factory; in the pure regime, where the weights are low, else the default the runs
    # train with (pure fp16's AdamW, whose eps is 0 in fp16, then has its finding instead of
    # an unexplained non-finite run; under autocast it would only add notes that fp32
    # master weights lose nothing).
    default = _default_optimizer if run_regime is Regime.PURE else None
    stepped = build_optimizer or (_factory_of(optimizer, place.model) if optimizer is not None else default)
    report, plan_units, planned_scale, held = _analyze_and_plan(
        place,
        batch,
        loss_fn,
        low,
        run_regime,
        op_policy,
        th,
        name,
        plan,
        target,
        say,
        timings,
        stepped,
        fp8_recipe=recipe,
        driver=run_driver,
    )
    pure = run_regime is Regime.PURE
    # The planned run runs the plan as it was verified: autocast with the report's op lists.
    plan_policy = report.environment.policy or AutocastPolicy.CUDA
    trainer = _Trainer(place, optimizer, build_optimizer or _default_optimizer, batches, loss_fn)
    fp8 = Fp8Training(recipe) if recipe is not None else None
    runs = _training_runs(
        trainer, low, run_regime, op_policy, plan_policy, plan_units, planned_scale, say, messages, fp8=fp8, held=held
    )
    # The delayed-scaling model covers the fp8 layers of the run the verdict judges.
    judged_fp8 = fp8.planned if fp8 is not None and judge is Judge.PLANNED else fp8
    for k in ("fp32", "bf16", "low", "master", "untrained", "planned"):
        if k in runs:
            timings[f"run_{k}"] = runs[k].seconds
    runs = _compared(trainer, runs, say, timings, loss_tolerance, LowDtype.BF16 if fp8 else low)

    judging = _Judge(
        report,
        runs,
        low,
        pure,
        th,
        plan_units,
        planned_scale,
        loss_tolerance,
        max_skipped_steps,
        held,
    )
    judged = judging.found(judge)
    fp8_scaling = (
        judged_fp8.scaling.result(judge) if judged_fp8 is not None and judged_fp8.scaling is not None else None
    )
    # fp8: each configuration's loss against the bf16 run's (the planned run's judged once,
    # whether it is the one judged or the plan's verdict and notes).
    planned_vs_bf16 = (
        bf16_divergence_reasons(runs["planned"], runs["bf16"], loss_tolerance, judging.fp8_flagged(plan_units))
        if fp8 is not None and "planned" in runs
        else []
    )
    if fp8 is not None:
        judged += (
            planned_vs_bf16
            if judge == "planned"
            else bf16_divergence_reasons(runs[judge], runs["bf16"], loss_tolerance, judging.fp8_flagged(None))
        )
    if fp8_scaling is not None:
        judged += delayed_scaling_reasons(fp8_scaling, th)
    reasons = [r for r in judged if _selected(r, risks)]
    notes = [r for r in judged if not _selected(r, risks)]
    planned_go: bool | None = None
    if "planned" in runs:
        found = judging.found("planned") + planned_vs_bf16
        planned_go = not any(_selected(r, risks) for r in found)
        if judge == "low":
            notes += [r for r in _run_reasons(runs["planned"], loss_tolerance, max_skipped_steps)]
            notes += planned_vs_bf16

    optimizer_name = _optimizer_name(optimizer, build_optimizer, place.model)
    if (fp32_diverges := _fp32_diverges(runs["fp32"], optimizer_name)) is not None:
        (reasons if _selected(fp32_diverges, risks) else notes).append(fp32_diverges)

    return PreflightResult(
        model=report.model,
        dtype=low,
        regime=run_regime,
        policy=plan_policy if "planned" in runs else (None if pure else op_policy),
        steps=steps,
        optimizer=optimizer_name,
        judge=judge,
        fail_on=list(risks),
        loss_tolerance=loss_tolerance,
        max_skipped_steps=max_skipped_steps,
        go=not reasons,
        reasons=reasons,
        notes=notes,
        planned_go=planned_go,
        analysis_verdict=report.verdict,
        flagged_units=_flagged_units(report),
        runs=runs,
        loss_scale=report.extras.loss_scale,
        plan=report.extras.plan,
        timings_s={k: round(v, 4) for k, v in timings.items()},
        messages=messages,
        report=report,
        fp8_scaling=fp8_scaling,
    )


def _fp8_recipe(low: LowDtype, regime: Regime, fp8_recipe: str | Fp8Recipe | None) -> Fp8Recipe | None:
    """The fp8 pre-flight's recipe (None for another dtype), checked: fp8 trains under bf16
    autocast."""
    if low is not LowDtype.FP8:
        if fp8_recipe is not None:
            raise PrecisionDoctorError(f"fp8_recipe={str(fp8_recipe)!r} needs dtype='fp8' (got {low})")
        return None
    if regime is not Regime.AUTOCAST:
        raise PrecisionDoctorError(
            "fp8 trains under bf16 autocast as torchao does: use --regime autocast with --dtype fp8"
        )
    return parse_enum(Fp8Recipe, fp8_recipe if fp8_recipe is not None else Fp8Recipe.TENSORWISE, "fp8 recipe")


def _validate(
    model: torch.nn.Module,
    dtype: str | LowDtype,
    regime: str | Regime,
    policy: str | AutocastPolicy,
    fail_on: str | Iterable[str] | None,
    judge: str | Judge,
    plan: bool,
    steps: int,
    max_skipped_steps: int,
    loss_tolerance: float,
    optimizer: torch.optim.Optimizer | None,
    build_optimizer: OptimizerFactory | None,
) -> tuple[LowDtype, Regime, AutocastPolicy, tuple[str, ...], Judge]:
    """The options parsed (the dtype, regime, op policy, `fail_on`'s risks, the judge) and checked
    before anything runs, with the one model that torch's fp16 training cannot train."""
    low = parse_enum(LowDtype, dtype, "dtype")
    run_regime = parse_enum(Regime, regime, "regime")
    op_policy = parse_enum(AutocastPolicy, policy, "policy")
    risks = parse_fail_on(fail_on)
    judged = parse_enum(Judge, judge, "judge")
    if judged is Judge.PLANNED and not plan:
        raise PrecisionDoctorError(
            "judging the planned configuration needs the plan (plan=True; the CLI without --no-plan)"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PrecisionDoctorError(f"steps must be a positive integer, not {steps!r}")
    if isinstance(max_skipped_steps, bool) or not isinstance(max_skipped_steps, int) or max_skipped_steps < 0:
        raise PrecisionDoctorError(f"max_skipped_steps must be a non-negative integer, not {max_skipped_steps!r}")
    if not (loss_tolerance >= 0):
        raise PrecisionDoctorError(f"loss_tolerance must be >= 0, not {loss_tolerance!r}")
    if not isinstance(model, torch.nn.Module):
        raise PrecisionDoctorError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    if optimizer is not None and build_optimizer is not None:
        raise PrecisionDoctorError("pass optimizer= or build_optimizer=, not both")
    if optimizer is not None:
        own = {id(p) for p in model.parameters()}
        if not any(id(p) in own for g in optimizer.param_groups for p in g["params"]):
            raise PrecisionDoctorError("the optimizer holds none of the model's parameters")
    mixed = mixed_parameters(unwrap(model)[0]) if low is LowDtype.FP16 and run_regime is Regime.AUTOCAST else None
    if mixed is not None:
        raise PrecisionDoctorError(
            f"fp16 training of this model fails in torch: GradScaler cannot unscale DTensor and plain gradients "
            f"together ({mixed[0]!r} is a DTensor, {mixed[1]!r} is not); distribute every trained parameter "
            "(parallelize_module/distribute_module), or pre-flight it with --dtype bf16 (no loss scaler)"
        )
    return low, run_regime, op_policy, risks, judged


def _analyze_and_plan(
    place: _Place,
    batch: Any,
    loss_fn: LossFn | None,
    low: LowDtype,
    regime: Regime,
    policy: AutocastPolicy,
    thresholds: Thresholds | None,
    name: str | None,
    plan: bool,
    target: Target,
    say: Progress,
    timings: dict[str, float],
    build_optimizer: OptimizerFactory | None = None,
    fp8_recipe: Fp8Recipe | None = None,
    driver: Driver = Driver.AUTO,
) -> tuple[Report, dict[str, PlanUnitDtype] | None, int | None, HeldPlan | None]:
    """The analysis report, with the plan and loss scale when `plan`: the report, the plan's
    units (None: no plan), the recommended initial loss scale (fp16 under autocast) and a pure
    plan's weights (None: no pure plan)."""
    from precision_doctor.analysis.engine import analyze

    say("analysis")
    t = time.perf_counter()
    report = analyze(
        place.for_analysis(),
        batch,
        loss_fn,
        dtype=low,
        thresholds=thresholds,
        name=name or type(place.model).__name__,
        regime=regime,
        policy=policy,
        build_optimizer=build_optimizer,  # the optimizer step (LOST_UPDATE) with the user's optimizer
        fp8_recipe=fp8_recipe,
        driver=driver,
    )
    timings["analysis"] = time.perf_counter() - t
    if not plan:
        return report, None, None, None
    say("plan and loss scale")
    t = time.perf_counter()
    from precision_doctor.planning.pipeline import plan_report

    # A pure plan's training check trains with the pre-flight's optimizer (its default included).
    report = plan_report(
        place.for_plan(), batch, loss_fn, report, target=target, build_optimizer=build_optimizer or _default_optimizer
    )
    plan_units: dict[str, PlanUnitDtype] | None = None
    held: HeldPlan | None = None
    if (found := report.extras.plan) is not None:
        plan_units = dict(found.units)
        plan_units.setdefault("", "fp32")  # a unit the plan does not name stays fp32
        if found.regime is Regime.PURE:
            held = HeldPlan(found.low_units, tuple(found.master_units))
    ls = report.extras.loss_scale
    planned_scale = ls.recommended_scale_log2 if ls is not None and low is LowDtype.FP16 else None
    if held is not None and planned_scale is not None:
        planned_scale = 0  # a pure plan trains unscaled, as its export does (GradScaler refuses fp16 gradients)
    timings["plan"] = time.perf_counter() - t
    return report, plan_units, planned_scale, held


def _training_runs(
    trainer: _Trainer,
    low: LowDtype,
    regime: Regime,
    policy: AutocastPolicy,
    plan_policy: AutocastPolicy,
    plan_units: Mapping[str, PlanUnitDtype] | None,
    planned_scale: int | None,
    say: Progress,
    messages: list[str],
    fp8: Fp8Training | None = None,
    held: HeldPlan | None = None,
) -> dict[str, ModeRun]:
    """The fp32 reference, the plain low-precision recipe of `regime` and, with a plan, the
    planned mix (`plan_policy`'s autocast op lists); for fp8 (`fp8`), a bf16 autocast run and
    the torchao-converted run (`low`: every Linear under the recipe) instead of the plain one,
    and with a plan the planned run as `verify_fp8_plan` runs it: the copy converted by
    `planning.fp8.convert_planned` (each planned layer under its recipe), under bf16 autocast
    with the plan's fp32 units overridden (`fp8.planned`)."""
    runs: dict[str, ModeRun] = {}
    say("fp32 run")
    pure = regime is Regime.PURE
    runs["fp32"] = trainer.run(
        "fp32", "fp32 reference", dtype=None, units=None, init_scale_log2=None, track_unchanged=pure
    )
    if fp8 is not None:
        say("bf16 run")
        runs["bf16"] = trainer.run(
            "bf16",
            f"torch.autocast(bf16, {policy} op lists), no loss scaler",
            dtype=torch.bfloat16,
            policy=policy,
            units=None,
            init_scale_log2=None,
        )
        say(f"fp8 ({fp8.recipe}) run")
        runs["low"] = trainer.run(
            "low",
            f"torchao fp8 {fp8.recipe} (every converted Linear; emulated on the CPU) under "
            f"torch.autocast(bf16, {policy} op lists), no loss scaler",
            dtype=torch.bfloat16,
            policy=policy,
            units=None,
            init_scale_log2=None,
            fp8=fp8,
        )
        if plan_units is not None:
            say("planned run")
            fp8.planned = Fp8Training(fp8.recipe, units=plan_units)
            kinds = planned_recipes(plan_units)
            fp8_desc = ", ".join(f"{len(v)} {r}" for r, v in kinds.items()) or "none"
            n_fp32 = len(fp32_modules(plan_units))
            runs["planned"] = trainer.run(
                "planned",
                f"plan: fp8 layers converted by torchao ({fp8_desc}; emulated on the CPU), {n_fp32} unit(s) fp32, "
                f"the rest under torch.autocast(bf16, {plan_policy} op lists), no loss scaler",
                dtype=torch.bfloat16,
                policy=plan_policy,
                units=plan_units,
                init_scale_log2=None,
                fp8=fp8.planned,
            )
        return runs
    say(f"{low} run")
    # GradScaler is for fp32 master weights: on a pure fp16 model its `step` raises
    # "Attempting to unscale FP16 gradients", so pure fp16 trains without one.
    default_scale = 16 if low is LowDtype.FP16 and not pure else None
    scaler_txt = f", GradScaler from 2^{default_scale}" if default_scale is not None else ", no loss scaler"
    if pure:
        low_desc = f"model.to({low}), inputs cast{scaler_txt}"
        if low is LowDtype.FP16:
            messages.append(
                "the pure fp16 run has no loss scaler: GradScaler does not unscale fp16 gradients "
                "(torch refuses them), so pure fp16 trains unscaled; gradients below fp16's range flush to 0"
            )
    else:
        low_desc = f"torch.autocast({low}, {policy} op lists){scaler_txt}"
    tdtype = TORCH_DTYPES[low]
    runs["low"] = trainer.run(
        "low",
        low_desc,
        dtype=tdtype,
        regime=regime,
        policy=policy,
        units=None,
        init_scale_log2=default_scale,
        track_unchanged=pure,
    )
    if pure:
        # The same low model with fp32 master weights: what the optimizer step costs apart.
        say(f"{low} run with fp32 master weights")
        runs["master"] = trainer.run(
            "master",
            f"model.to({low}), inputs cast, fp32 master weights (the optimizer steps fp32 copies), no loss scaler",
            dtype=tdtype,
            regime=regime,
            policy=policy,
            units=None,
            init_scale_log2=None,
            master=True,
            track_unchanged=True,
        )
        if any(exchange(len({id(b) for b in trainer.batches}) > 1)):  # every rank runs it, or none
            # Batches that vary: each one's loss before any update, which the runs' descents are
            # read against batch by batch (STALLED_LOSS), not against the first batch's loss.
            say(f"{low} losses before training, batch by batch")
            runs["untrained"] = trainer.run(
                "untrained",
                f"model.to({low}), inputs cast, no update applied: each batch's loss before training",
                dtype=tdtype,
                regime=regime,
                policy=policy,
                units=None,
                init_scale_log2=None,
                skip=frozenset(range(len(trainer.batches))),
            )
    if plan_units is not None:
        say("planned run")
        any_fp16 = any(d == "fp16" for d in plan_units.values())
        s = planned_scale if any_fp16 and held is None else None
        n_low = sum(1 for u, d in plan_units.items() if u and d != "fp32")
        desc = f"plan: {n_low} unit(s) low under torch.autocast({low}, {plan_policy} op lists)"
        if held is not None:
            desc += f", their weights {low} ({len(held.master_units)} unit(s) with fp32 master copies)"
        desc += f", GradScaler from 2^{s}" if s is not None else ", no loss scaler"
        runs["planned"] = trainer.run(
            "planned",
            desc,
            dtype=tdtype,
            regime=Regime.AUTOCAST,
            policy=plan_policy,
            units=plan_units,
            init_scale_log2=s,
            # A pure-regime plan's low units cast their inputs and hold their weights low, as
            # apply_plan installs it.
            cast_low_inputs=pure,
            held=held,
        )
    return runs


def _compared(
    trainer: _Trainer,
    runs: Mapping[str, ModeRun],
    say: Progress,
    timings: dict[str, float],
    tolerance: float,
    rounding: LowDtype,
) -> dict[str, ModeRun]:
    """Each low run with its divergence from fp32 (`_with_divergence`). Like with like: a step
    GradScaler skipped applied no update, so the run's later losses come one update behind
    the fp32 run's at the same step. Each run is compared with an fp32 run that skipped the
    same steps (on the same batches, with the same dropout draws), one per set of skipped
    steps; its skipped steps are reported as such (SKIPPED_STEPS), not as divergence. A run
    that diverges by more than `tolerance` gets its noise floor (`ModeRun.noise_floor`): the
    divergence of an fp32 run from weights rounded once to `rounding`."""
    references: dict[frozenset[int], ModeRun] = {frozenset(): runs["fp32"]}
    floors: dict[frozenset[int], float | None] = {}
    out: dict[str, ModeRun] = {}
    for k, run in runs.items():
        if k in ("fp32", "untrained"):  # the reference, and losses before training: nothing to compare
            out[k] = run
            continue
        skipped = frozenset(run.skipped_steps)
        if skipped not in references:
            say(f"fp32 run skipping steps {_ranges(sorted(skipped))}")
            ref = trainer.run(
                "fp32",
                "fp32 reference, skipping the same steps",
                dtype=None,
                units=None,
                init_scale_log2=None,
                skip=skipped,
            )
            references[skipped] = ref
            timings["run_fp32_skipping"] = timings.get("run_fp32_skipping", 0.0) + ref.seconds
        out[k] = _with_divergence(run, references[skipped])
        if (out[k].max_divergence or 0.0) > tolerance and math.isfinite(out[k].max_divergence or 0.0):
            if skipped not in floors:
                name = str(rounding)
                say(f"fp32 run from weights rounded to {name} (the loss' own sensitivity)")
                control = trainer.run(
                    "fp32",
                    f"fp32 reference from its weights rounded to {name} once",
                    dtype=None,
                    units=None,
                    init_scale_log2=None,
                    skip=skipped,
                    rounded_to=TORCH_DTYPES[rounding],
                )
                floor = _with_divergence(control, references[skipped]).max_divergence
                # A control that broke (non-finite) measures nothing: no floor, the finding stands.
                floors[skipped] = floor if floor is not None and math.isfinite(floor) else None
                timings["run_noise_floor"] = timings.get("run_noise_floor", 0.0) + control.seconds
            out[k] = out[k].model_copy(update={"noise_floor": floors[skipped]})
    return out


# --- judging ---------------------------------------------------------------------------------


def _flagged_units(report: Report) -> dict[str, list[str]]:
    """The analysis' flag names by unit, each once."""
    flagged: dict[str, list[str]] = {}
    for f in report.flags():
        flagged.setdefault(f.unit, [])
        if f.flag.value not in flagged[f.unit]:
            flagged[f.unit].append(f.flag.value)
    return flagged


@dataclass(frozen=True)
class _Judge:
    """The risks found for a configuration (`found`): the low recipe (`"low"`) or the plan
    (`"planned"`), from the fp32 run, the analysis' flags that apply to it and its own run."""

    report: Report
    runs: Mapping[str, ModeRun]
    low: LowDtype
    pure: bool
    th: Thresholds
    plan_units: Mapping[str, PlanUnitDtype] | None
    planned_scale: int | None
    loss_tolerance: float
    max_skipped_steps: int
    held: HeldPlan | None = None
    """A pure plan's weights (the planned configuration's)."""

    def found(self, config: str) -> list[Reason]:
        if config == "low":
            # Pure fp16 trains unscaled: its gradients are judged at 2^0, not GradScaler's.
            units, scale = None, (0 if self.pure and self.low is LowDtype.FP16 else None)
        else:  # the plan's units at the plan's recommended scale (fp16 only: bf16 has no scaler)
            units, scale = self.plan_units, self.planned_scale if self.low is LowDtype.FP16 else None
        stalled = (
            _stalled(self.runs["low"], self.runs["master"], self.runs.get("untrained"))
            if config == "low" and "master" in self.runs
            else []
        )
        return (
            self.fp32_reasons()
            + self.analysis_reasons(units, scale)
            + _run_reasons(self.runs[config], self.loss_tolerance, self.max_skipped_steps)
            + stalled
        )

    def analysed_fp8_label(self) -> str | None:
        """How a plan spells the recipe the fp8 analysis ran (None: not an fp8 analysis)."""
        section = self.report.extras.fp8
        return Fp8Recipe(section.recipe).unit_dtype if section is not None else None

    def fp8_flagged(self, units: Mapping[str, str] | None) -> list[str]:
        """The layers with an fp8 finding that run fp8 in a configuration: every one in the
        all-Linear run (`units` None), in a plan those it converts under the analysed recipe."""
        layers = [u for u, names in _flagged_units(self.report).items() if any(n in FP8_FLAGS for n in names)]
        if units is None:
            return layers
        return [u for u in layers if units.get(u) == self.analysed_fp8_label()]

    def fp32_reasons(self) -> list[Reason]:
        """NONFINITE_FP32 when the fp32 run itself broke: it fails every judgment."""
        fp32 = self.runs["fp32"]
        if not fp32.nonfinite_steps:
            return []
        return [
            Reason(
                risk=Flag.NONFINITE_FP32.value,
                mode="fp32",
                message=(
                    f"the fp32 run itself goes non-finite at step {fp32.nonfinite_steps[0]}: the model or optimizer "
                    "diverges before any precision change (learning rate?)"
                ),
            )
        ]

    def analysis_reasons(self, units: Mapping[str, str] | None, scale_log2: int | None) -> list[Reason]:
        """The analysis' flags that apply to a configuration: those of the units it runs low
        (and NONFINITE_FP32 anywhere), with the gradient flags judged at its loss scale."""
        report, th = self.report, self.th
        flags = report.flags()
        if units is not None:
            # Measured on the all-low run at its own loss scale: a plan changes both (its own
            # training run says how its gradients fare). LOST_UPDATE is the low weights'
            # (the pure regime's): a plan's optimizer steps fp32 weights, except a pure plan's
            # low units without master copies.
            held = self.held
            flags = [
                f
                for f in flags
                if f.flag is not Flag.GRAD_DIVERGENCE
                and (f.flag is not Flag.LOST_UPDATE or (held is not None and f.unit not in held.master_units))
            ]
        if scale_log2 is not None and scale_log2 != th.grad_scale_log2:
            # Pure fp16 (judged at 2^0) has no GradScaler to back off or grow, nor a pure plan.
            scaler = not self.pure if units is None else self.held is None
            ceiling = report_scale_ceiling(report)
            grad_flags = (Flag.GRAD_OVERFLOW, Flag.GRAD_UNDERFLOW)
            flags = [f for f in flags if f.flag not in grad_flags] + [
                f
                for u in report.units
                for f in gradient_flags_at_scale(
                    u, scale_log2, LIMITS[self.low], th, scaler=scaler, ceiling_log2=ceiling
                )
            ]
            flags.sort(key=report.flag_order)
        out = []
        fp8_layers = set(report.extras.fp8.layers) if report.extras.fp8 is not None else set()
        for f in flags:
            runs_low = units is None or units.get(f.unit, units.get("", "fp32")) != "fp32"
            gated = f.flag in FP8_FLAGS or (f.flag in OWN_ERROR_FLAGS and f.unit in fp8_layers)
            if gated and units is not None:
                # Measured under the analysis' recipe: a plan running the layer in bf16, or
                # under a recipe the plan's gate and verification passed, does not carry it
                # (nor the error an fp8 layer's matmuls made under that recipe).
                runs_low = units.get(f.unit) == self.analysed_fp8_label()
            if runs_low or f.flag is Flag.NONFINITE_FP32:
                out.append(
                    Reason(
                        risk=f.flag.value,
                        mode="analysis",
                        unit=f.unit,
                        message=f.evidence.message,
                        severity=f.severity,
                    )
                )
        return out
