"""The report: a versioned, JSON-serializable result with query helpers.

Every model is a frozen pydantic model, so a report saved and loaded compares equal. Infinite
values are written as the strings "Infinity"/"-Infinity" (strict JSON has no literal for
them) and read back as floats. Reports are only ever read as JSON: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import Field

from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.extras import MONITOR_KIND, ReportExtras
from precision_doctor.formats import FP16, loss_scale_fractions
from precision_doctor.options import (
    FLAG_RANK,
    SEVERITY_RANK,
    AutocastPolicy,
    CapturePath,
    Flag,
    LowDtype,
    Phase,
    Regime,
    Severity,
    Thresholds,
    UnitDtype,
    Wrapper,
)
from precision_doctor.schema import Frozen as _Frozen
from precision_doctor.schema import parse_json, read_text, validated
from precision_doctor.version import __version__

SCHEMA_VERSION = 9
"""Bumped on any change that an older reader would misread; the history is in CHANGELOG.md."""
READABLE_SCHEMA_VERSIONS = (6, 7, 8, SCHEMA_VERSION)
"""Versions `Report.load` reads: a version-6 report has every field 7 has but the new
threshold, which takes its default; a version-7 report every field 8 has but
`optimizer_step` (None) and the LOST_UPDATE thresholds (their defaults); a version-8 report
every field 9 has but `environment.driver_reason` (None), its `capture_path` `dispatch` or
the older `fx` (9 also widens what plan units and pre-flight runs may hold: `fp8:mxfp8`,
fp8 planned runs)."""


ROOT_UNIT = "<root>"
"""The unit of the model's own forward, outside any submodule (its module path is "")."""
LOSS_UNIT = "<loss>"
"""The loss function's unit: what `loss_fn` computes from the model's output."""
UNATTRIBUTED_UNIT = "<backward>"
"""The backward's ops that no forward unit owns (autograd's own accumulation, the seed)."""


def fp32_modules(units: Mapping[str, str]) -> list[str]:
    """The units a plan (unit -> dtype) keeps in fp32 that a user applies to modules, sorted:
    not `<loss>`, which autocast runs in fp32 anyway."""
    return sorted(u for u, d in units.items() if u and u != LOSS_UNIT and d == "fp32")


class Histogram(_Frozen):
    """Counts of floor(log2|x|): `counts[i]` holds |x| in [2^(log2_lo+i), 2^(log2_lo+i+1)).
    Zeros and non-finite values are counted apart. Values below 2^-126 (fp32 subnormals)
    are folded into the lowest fp32 bin, log2 = -127."""

    log2_lo: int
    counts: list[int]
    sum_squares: list[float] | None = None
    """Gradients only: the sum of x^2 of the bins below 2^-24 (the only values a loss scale
    of 2^0..2^127 can flush), starting at `log2_lo`; with `TensorStats.sum_squares_total`, the
    fraction of the L2 norm those bins hold. Shorter than `counts` when values reach 2^-24."""


class FormatTails(_Frozen):
    """Values out of one format's range. Fractions are of the nonzero finite values."""

    overflow_count: int
    overflow_fraction: float
    underflow_count: int
    underflow_fraction: float
    subnormal_count: int
    subnormal_fraction: float


class TensorStats(_Frozen):
    numel: int
    zero_count: int
    nan_count: int
    inf_count: int
    max_abs: float
    min_nonzero_abs: float | None
    fp16: FormatTails
    bf16: FormatTails
    histogram: Histogram
    sum_squares_total: float | None = None
    """Gradients only: the sum of x^2 over the finite values."""
    masked_count: int = 0
    """Values recognised from the dataflow as mask values (a -1e38 or -100 a fill wrote into
    the scores, a probability such a mask zeroes; a constant mask only where it lies beyond
    the low formats), counted as the zeros they stand for: in `zero_count`, in no overflow or
    underflow."""

    def loss_scale_fractions(self, scale_log2: int) -> tuple[float, float, float]:
        """At fp16 loss scale 2^k, as the report's loss-scale curves count (one power of two
        resolution), for any k: (fraction of nonzero values flushed, fraction overflowing,
        fraction of the L2 norm flushed). The norm is exact for k >= 0; below, the bins
        between 2^-24 and the flush point have no sums of squares and count 4^bin per value
        (a lower bound)."""
        h = self.histogram
        lost, over, norm = loss_scale_fractions(
            h.counts, h.log2_lo, [scale_log2], FP16, h.sum_squares, self.sum_squares_total
        )
        return float(lost[0]), float(over[0]), float(norm[0])


class LossScalePoint(_Frozen):
    scale_log2: int
    underflow_fraction: float
    """Fraction of nonzero gradients that flush to zero in fp16 at scale 2^k."""
    overflow_fraction: float
    """Fraction of nonzero gradients with |g| * 2^k >= 2^16 (one power-of-two resolution)."""
    underflow_norm_fraction: float | None = None
    """Fraction of the gradients' L2 norm lost to underflow at scale 2^k."""


class ErrorStats(_Frozen):
    rel_l2_error: float
    sqnr_db: float
    nonfinite_count: int = 0
    """Low-precision Inf/NaN where the fp32 value is finite."""


class OpStats(_Frozen):
    """One op (aten overload) inside a unit, aggregated over its calls in one phase."""

    op: str
    phase: Phase
    calls: int
    flops: int
    max_abs: float | None
    """Largest |x| of its outputs; None where they are not summarized (views and copies of
    values summarized where they were made; backward ops, summarized per autograd node)."""
    nonfinite_count: int
    fp16_overflow_count: int
    fp16_underflow_count: int
    local_rel_l2_error: float | None = None
    low_dtypes: list[str] = Field(default_factory=list)
    """The dtypes the real low-precision run gave its outputs (`fp16`, or `fp32` where
    autocast runs it in fp32 or an upcast precedes it); empty where it has no counterpart
    there (views, copies, backward ops)."""


class OpCost(_Frozen):
    """The work of identical calls of one op in one unit: what the cost model's per-op
    roofline reads. FLOPs from torch.utils.flop_counter's formulas (0 where it has none)."""

    op: str
    phase: Phase
    flops: int
    bytes: int
    """Read and written per call, in the captured (fp32) dtypes; 0 for views."""
    calls: int


class Evidence(_Frozen):
    op: str | None
    phase: Phase
    message: str
    values: dict[str, float] = Field(default_factory=dict)


class FlagRecord(_Frozen):
    flag: Flag
    unit: str
    evidence: Evidence
    severity: Severity
    """`error`, `warning` or `info`: the rules per flag are in `analysis/flags.py` (and the
    README's Flags table)."""


class UnitForward(_Frozen):
    stats: TensorStats | None
    local: ErrorStats | None
    """The unit fed the fp32 run's inputs, rounded to the low dtype."""
    propagated: ErrorStats | None
    """The unit's values in the run where every unit is low."""
    input_rel_l2_error: float | None = None
    """The largest propagated error of the values it reads from other units (0 where it reads
    only the batch and parameters): `propagated` over this is the error growth in the unit."""


class GradFidelity(_Frozen):
    """Parameter gradients of the real low-precision run (its backward at the loss scale of
    `Report.grad_fidelity`, unscaled in fp32 as GradScaler unscales them) against the fp32
    run's, over one parameter or all of a unit's, where the fp32 gradient is finite: each
    tensor's squared norms to fp32's relative precision (`capture.statistics.squared_norm`),
    summed over tensors in float64."""

    rel_l2_error: float
    """||g_low - g_fp32|| / ||g_fp32||; inf where the low gradients hold Inf/NaN the fp32
    ones do not (or fp32's are all 0 and the low ones are not)."""
    cosine: float | None
    """g_low . g_fp32 / (||g_low|| ||g_fp32||): 1 when the update points the same way; None
    where either norm is 0 or the low gradients are not finite."""
    nonfinite_count: int
    """Low-precision Inf/NaN gradients where the fp32 gradient is finite."""
    numel: int
    fp32_l2_norm: float
    """||g_fp32||: how much this gradient weighs in the model's."""


class ModelGradFidelity(GradFidelity):
    """`GradFidelity` over every parameter of the model (a tied one once)."""

    scale_log2: int
    """The loss scale 2^k of the low backward: the recommended initial scale
    (`analysis.loss_scale.recommend_loss_scale`: what GradScaler should start at, and the
    scale it keeps when started there) under autocast and in bf16; 2^0 in pure fp16, which
    trains without a loss scaler (GradScaler refuses fp16 gradients, and a scaled fp16 loss
    overflows from 2^16)."""


class UnitBackward(_Frozen):
    stats: TensorStats | None
    loss_scale: list[LossScalePoint] = Field(default_factory=list)
    param_grads: dict[str, TensorStats] = Field(default_factory=dict)
    reads_overflow: bool = False
    """The unit reads values that overflowed the low dtype elsewhere: its gradients' overflow
    is inherited from there, and not flagged here at any loss scale."""
    grad_fidelity: GradFidelity | None = None
    """Its parameters' gradients in the low run against fp32 (None: no parameter gradient)."""
    param_grad_fidelity: dict[str, GradFidelity] = Field(default_factory=dict)
    """The same per parameter (as `param_grads`)."""


class Unit(_Frozen):
    name: str
    kind: str
    order: int
    """Position in execution order (first forward op)."""
    flops_forward: int
    flops_backward: int
    activation_bytes: int
    """Bytes of this unit's forward outputs that autograd saved for backward (by any op; each
    storage once; parameters, buffers and the batch are not activations)."""
    param_bytes: int
    op_count: int
    flags: list[FlagRecord]
    forward: UnitForward
    backward: UnitBackward
    ops: list[OpStats]
    op_costs: list[OpCost] = Field(default_factory=list)


class UnitEdge(_Frozen):
    """Forward dataflow between units: tensors `src` produced and `dst` consumed."""

    src: str
    dst: str
    bytes: int


class DistributedJob(_Frozen):
    """A job of `world_size` ranks analyzed as one (`analysis.distributed`)."""

    world_size: int
    backend: str
    """The process group's backend: `gloo`, `nccl`, ..."""
    wrapper: Wrapper
    mesh_shape: list[int]
    """Ranks per dimension of the device mesh the model is laid out on (`[world_size]` for
    data parallel)."""


class Environment(_Frozen):
    tool_version: str
    torch_version: str
    python_version: str
    platform: str
    device: str
    dtype: LowDtype
    emulated: bool
    """True where the low run's arithmetic is emulated: its ops ran as fp32 kernels on the
    low-precision inputs with each result rounded to the dtype the real op returns
    (`capture.lowrun.EmulateLowMode`). fp16 on the CPU always; bf16 on a CPU without fast
    bf16 kernels (`capture.lowrun.cpu_bf16_emulated`: no oneDNN bf16, as on an AVX2 CPU),
    where a CPU with them runs its real bf16 kernels (False); never on a GPU. (Reports
    written before the fp16/bf16 distinction say True for every CPU run, bf16 too.)"""
    capture_path: CapturePath
    """Which driver captured the fp32 step's ops: `dispatch` or `graph` (`options.Driver`)."""
    fx_traceable: bool
    fx_error: str | None = None
    driver_reason: str | None = None
    """Where the graph driver was asked for (`--driver graph`) or considered (`auto`) and the
    dispatch driver ran: why, in one line. None where the graph driver ran or dispatch was
    asked for."""
    regime: Regime = Regime.AUTOCAST
    """What the low-precision run executed: `autocast` (torch.autocast's op policy) or `pure`
    (`model.to(dtype)`)."""
    policy: AutocastPolicy | None = AutocastPolicy.CUDA
    """Whose autocast op lists (`cuda` or `cpu`); None in the pure regime."""
    distributed: DistributedJob | None = None
    """The torch.distributed job the report covers (every rank's statistics combined); None
    for one process."""

    def precision_text(self) -> str:
        """How the low run computed its dtype, as the views say it: what is emulated, or
        that the dtype's own kernels ran."""
        if self.dtype is LowDtype.FP8:  # extras.fp8 says which recipe
            return f"torchao float8 matmuls{' emulated' if self.emulated else ''}, bf16 autocast elsewhere"
        if self.emulated:
            why = "; the CPU has no fast bf16 kernels" if self.dtype is LowDtype.BF16 and self.device == "cpu" else ""
            return f"emulated: fp32 kernels, results rounded to {self.dtype}{why}"
        return f"native {self.dtype} kernels"


class Losses(_Frozen):
    fp32: float
    """For a distributed job, the mean of the ranks' losses (what a data-parallel run logs
    when it averages them); each rank's own is in `Report.ranks`."""
    low: float
    rel_error: float
    low_dtype: UnitDtype = "fp32"
    """The dtype of the low run's loss: a loss scale reaches a low loss as its gradient, in
    this dtype (an fp16 loss holds at most 2^15; see `analysis.loss_scale`)."""
    low_term_grad_max_abs: float = 0.0
    """The largest |d loss / d term| over the 0-dim values the low run holds low (a loss term
    a model reduces in fp16 inside its forward, `h.abs().mean() * 1e-3`): the scale times it
    reaches that term in the low dtype, so it bounds the scale as a low loss does. 0: none."""


class RankResult(_Frozen):
    """One rank of a distributed job, judged on its own statistics before they were
    combined: a fault in one rank's data shard shows here."""

    rank: int
    loss_fp32: float
    loss_low: float
    loss_rel_error: float
    flags: list[FlagRecord]
    """The findings this rank's own statistics raise (its gradients before they are averaged;
    GRAD_DIVERGENCE from its own low gradients against its own fp32 ones)."""


class StepFidelity(_Frozen):
    """One optimizer step run twice on the same gradients (`analysis.optimizer_step`): with
    fp32 tensors (the intended step) and with the tensors in the low dtype (the applied step),
    compared element by element over one tensor or several. An element's update is the
    change the step makes to it."""

    numel: int
    changed: int
    """Elements the intended (fp32) step changes."""
    applied_changed: int
    """Elements the applied (low-precision) step changes."""
    lost: int
    """Elements the fp32 step changes and the low one leaves as they were: the update is
    rounded away (below half the element's spacing in the low dtype)."""
    partly_lost: int
    """Elements the low step changes, but by less than half the intended update (or the other
    way): rounded to a smaller multiple of the element's spacing."""
    nonfinite: int = 0
    """Elements the low step makes Inf/NaN (Adam's eps of 1e-8 is 0 in fp16: a second moment
    that flushes to 0 divides by 0)."""
    update_norm_ratio: float | None = None
    """||applied update|| / ||intended update|| over the finite updates: the effective learning
    rate as a fraction of the set one (None where the intended update is 0; inf where the low
    step makes Inf/NaN)."""
    mean_update_ratio: float | None = None
    """sum(applied * sign(intended)) / sum(|intended|): the share of the intended update that
    arrives on average, 1 for a step that rounds stochastically (its moves of a whole spacing
    average out to the update), near 0 where rounding to nearest drops the updates (None
    where the intended update is 0 or the low step makes Inf/NaN)."""
    mean_update_ratio_stderr: float | None = None
    """The standard error of `mean_update_ratio` over one draw of a step that rounds
    stochastically (each element moving a whole spacing with the probability of its update's
    share of it): a ratio read off few expected moves is noise."""

    @property
    def lost_fraction(self) -> float:
        """Fraction of the elements the fp32 step changes whose update is lost."""
        return self.lost / self.changed if self.changed else 0.0

    @property
    def partly_lost_fraction(self) -> float:
        return self.partly_lost / self.changed if self.changed else 0.0

    @property
    def unchanged_fraction(self) -> float:
        """Fraction of all the elements the applied step leaves as they were."""
        return 1.0 - self.applied_changed / self.numel if self.numel else 0.0


class ParamStep(StepFidelity):
    """`StepFidelity` of one parameter tensor, with its optimizer state's."""

    name: str
    unit: str
    state: dict[str, StepFidelity] = Field(default_factory=dict)
    """Each state tensor the optimizer keeps for it (`exp_avg`, `exp_avg_sq`,
    `momentum_buffer`): the intended (fp32) state after the step against the applied one."""


class UnitStep(StepFidelity):
    """`StepFidelity` over the parameters a unit owns (`owner_of`)."""

    unit: str
    state: dict[str, StepFidelity] = Field(default_factory=dict)
    """Per state key, over the unit's parameters."""
    survive_lr: float | None = None
    """The learning rate at which 90% of the unit's updates survive the low dtype, from the
    weights' magnitudes (half the spacing of each weight over its update per unit of lr);
    None where no update is lost at any rate the step tells."""
    survive_lr_half: float | None = None
    """The same for 50% of the updates."""
    lr: float | None = None
    """The learning rate of the parameter group holding the unit's parameters (None where
    they are in groups with different ones)."""


class OptimizerStep(_Frozen):
    """`Report.optimizer_step`: one real optimizer step on the analysis' gradients, intended
    (fp32 parameters and state) against applied (parameters and state in `dtype`)."""

    optimizer: str
    """The optimizer's class (`AdamW`), as `build_optimizer` made it or the default."""
    lr: float
    dtype: LowDtype
    master_weights: bool
    """True where the regime keeps fp32 master weights (autocast): the applied step is what
    the weights *would* lose held low (`model.to(dtype)`); training under autocast loses
    none of it."""
    sampled_every: int = 1
    """1: every element was stepped. k > 1: a model over `SAMPLE_BUDGET` (2^21) parameters,
    with an elementwise optimizer, is stepped on every k-th element of each parameter over
    2^16 elements (`analysis.optimizer_step`): the counts (`numel` included) are of the
    elements stepped, the fractions estimates."""
    stochastic_rounding: bool = False
    """The optimizer's step on low weights depends on the RNG (stochastic rounding): its
    steps are judged by `mean_update_ratio`."""
    units: list[UnitStep]
    params: list[ParamStep]
    total: StepFidelity
    seconds: float
    """Wall time of the two steps and their comparison."""


class Report(_Frozen):
    schema_version: int = SCHEMA_VERSION
    model: str
    environment: Environment
    losses: Losses
    thresholds: Thresholds
    op_count_forward: int
    op_count_backward: int
    units: list[Unit]
    edges: list[UnitEdge]
    loss_scale: list[LossScalePoint]
    """Over all gradients of the backward pass."""
    grad_fidelity: ModelGradFidelity | None = None
    """The low run's parameter gradients against fp32's, over the model (per unit:
    `backward.grad_fidelity`); None where no parameter gets a gradient."""
    optimizer_step: OptimizerStep | None = None
    """The optimizer step with low-precision weights against fp32 (`analysis.optimizer_step`);
    None where no optimizer was given (`build_optimizer`, `lr`) or the model is sharded."""
    ranks: list[RankResult] = Field(default_factory=list)
    """Per rank of a distributed job (`environment.distributed`), in rank order; empty for
    one process. The units and flags above are the job's: combined statistics, judged once."""
    extras: ReportExtras = Field(default_factory=ReportExtras)
    """Results of later stages (plan, loss scale, pre-flight, a real run's GradScaler)."""

    # --- queries ----------------------------------------------------------------------------
    def by_module(self) -> dict[str, Unit]:
        return {u.name: u for u in self.units}

    def by_op(self) -> dict[str, OpStats]:
        """Ops merged over all units, per op name and phase ("mm/forward")."""
        merged: dict[str, list[OpStats]] = defaultdict(list)
        for unit in self.units:
            for op in unit.ops:
                merged[f"{op.op}/{op.phase}"].append(op)
        out: dict[str, OpStats] = {}
        for key, ops in merged.items():
            errs = [o.local_rel_l2_error for o in ops if o.local_rel_l2_error is not None]
            out[key] = OpStats(
                op=ops[0].op,
                phase=ops[0].phase,
                calls=sum(o.calls for o in ops),
                flops=sum(o.flops for o in ops),
                max_abs=max((o.max_abs for o in ops if o.max_abs is not None), default=None),
                nonfinite_count=sum(o.nonfinite_count for o in ops),
                fp16_overflow_count=sum(o.fp16_overflow_count for o in ops),
                fp16_underflow_count=sum(o.fp16_underflow_count for o in ops),
                local_rel_l2_error=max(errs) if errs else None,
            )
        return out

    def grad_fidelity_by_unit(self) -> dict[str, GradFidelity]:
        """Each unit's parameter-gradient fidelity (`backward.grad_fidelity`), worst first:
        by relative L2 error, non-finite ones first."""
        found = [(u.name, u.backward.grad_fidelity) for u in self.units if u.backward.grad_fidelity is not None]
        return dict(sorted(found, key=lambda kv: -_sortable(kv[1].rel_l2_error)))

    def flags(self) -> list[FlagRecord]:
        """Every flag, worst first."""
        return sorted((f for u in self.units for f in u.flags), key=self.flag_order)

    @staticmethod
    def flag_order(f: FlagRecord) -> tuple[int, int, float]:
        """Sort key of `flags()`: severity, then the flag (`options.Flag`'s order), then
        magnitude, largest first."""
        return (SEVERITY_RANK[f.severity], FLAG_RANK[f.flag], -_magnitude(f))

    def flagged_units(self) -> list[Unit]:
        order = {f.unit: i for i, f in reversed(list(enumerate(self.flags())))}
        return sorted((u for u in self.units if u.flags), key=lambda u: order[u.name])

    def severity_counts(self) -> dict[Severity, int]:
        """Findings per severity, worst first (severities without a finding left out)."""
        counts = {s: 0 for s in Severity}
        for f in self.flags():
            counts[f.severity] += 1
        return {s: n for s, n in counts.items() if n}

    @property
    def loss_within_tolerance(self) -> bool:
        """The final-loss error is finite and at most `thresholds.loss_rel_error`."""
        e = self.losses.rel_error
        return math.isfinite(e) and e <= self.thresholds.loss_rel_error

    def error_growth(self) -> list[tuple[str, float]]:
        """Where the propagated error grows on its way to the loss: per unit whose outputs
        reach the loss (through `edges`; every unit when there is no `<loss>` unit), the
        factor propagated error / input error, the input error floored at the low dtype's
        rounding error (2^-11 fp16, 2^-8 bf16: a unit reading exact inputs and rounding its
        output grows nothing). Along a path these factors multiply up to the final-loss
        error, so the largest ones are the units most responsible for it. Largest first,
        factors > 1 only; a unit that makes Inf/NaN from finite inputs has factor inf, one
        reading non-finite inputs none (inherited)."""
        floor = _ROUNDING[self.environment.dtype]
        names = {u.name for u in self.units}
        reach = names
        if LOSS_UNIT in names:
            into: dict[str, set[str]] = defaultdict(set)
            for e in self.edges:
                into[e.dst].add(e.src)
            reach, todo = {LOSS_UNIT}, [LOSS_UNIT]
            while todo:
                for src in into[todo.pop()] - reach:
                    reach.add(src)
                    todo.append(src)
        out = []
        for u in self.units:
            prop, base = u.forward.propagated, u.forward.input_rel_l2_error
            if u.name not in reach or prop is None or (base is not None and not math.isfinite(base)):
                continue
            err = prop.rel_l2_error if prop.nonfinite_count == 0 else math.inf
            if math.isnan(err):
                err = math.inf
            factor = err / max(base or 0.0, floor)
            if factor > 1:
                out.append((u.name, factor))
        return sorted(out, key=lambda kv: -kv[1])

    @property
    def safe(self) -> bool:
        """True when the model is safe to train in the low dtype as-is: no error-severity
        finding and the final-loss error within `thresholds.loss_rel_error`."""
        return Severity.ERROR not in self.severity_counts() and self.loss_within_tolerance

    def __bool__(self) -> bool:
        """`self.safe`: a report passes as a comparison result does."""
        return self.safe

    @property
    def verdict(self) -> str:
        """One line: "Safe to train in this dtype" only when `bool(self)`; otherwise "Not
        safe as-is", with the findings counted by severity, and, when the final-loss error is
        over the tolerance, the units where the error grows most (`error_growth`)."""
        dtype = self.environment.dtype
        err, tol = self.losses.rel_error, self.thresholds.loss_rel_error
        flags = self.flags()
        units = sum(1 for u in self.units if u.flags)
        # The pure regime holds the weights low: a verdict without its optimizer step says so.
        unchecked = (
            "; its optimizer step on low weights was not checked (--lr or analyze(lr=...), or build_optimizer)"
            if self.environment.regime is Regime.PURE and self.optimizer_step is None
            else ""
        )
        if not flags and self:
            return (
                f"{dtype}: no unit flagged; final-loss error {err:.2e} against fp32. "
                f"Safe to train in this dtype{unchecked}."
            )
        by_severity: dict[Severity, dict[Flag, int]] = {}
        for f in flags:
            per_flag = by_severity.setdefault(f.severity, {})
            per_flag[f.flag] = per_flag.get(f.flag, 0) + 1
        counts = "; ".join(
            f"{sum(per_flag.values())} {severity}(s) ({', '.join(f'{n} {flag}' for flag, n in per_flag.items())})"
            for severity, per_flag in by_severity.items()
        )
        found = f"{units} unit(s) flagged: {counts}" if flags else "no unit flagged"
        if self:
            warnings = sum(by_severity.get(Severity.WARNING, {}).values())
            heed = f" with {warnings} warning(s)" if warnings else ""  # info findings: counted above
            return (
                f"{dtype}: {found}; final-loss error {err:.2e} within tolerance {tol:g}. "
                f"Safe to train in this dtype{heed}{unchecked}."
            )
        if self.loss_within_tolerance:
            loss = f"final-loss error {err:.2e} (tolerance {tol:g})"
        else:
            loss = f"final-loss error {err:.2e} over the tolerance {tol:g}"
            worst = self.error_growth()[:3]
            if worst:
                loss += "; the error grows most in " + ", ".join(
                    f"{name} (x{factor:.3g})" if math.isfinite(factor) else f"{name} (Inf/NaN)"
                    for name, factor in worst
                )
        return f"{dtype}: {found}; {loss}. Not safe as-is."

    def with_unit_flags(self, flags: Mapping[str, Sequence[FlagRecord]]) -> Report:
        """This report with `flags` (unit name -> findings) added to those units' own."""
        units = [
            u.model_copy(update={"flags": [*u.flags, *flags[u.name]]}) if u.name in flags else u for u in self.units
        ]
        return self.model_copy(update={"units": units})

    def with_extras(self, **sections: object) -> Report:
        """A copy with these `extras` sections set (`plan=`, `loss_scale=`, `preflight=`,
        `scaler_monitor=`), each a section model or its JSON form, validated: a section that
        does not fit is a one-line PrecisionDoctorError naming the field."""
        current = {name: getattr(self.extras, name) for name in ReportExtras.model_fields}
        extras = validated(ReportExtras, {**current, **sections}, "report extras")
        return self.model_copy(update={"extras": extras})

    # --- files -------------------------------------------------------------------------------
    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    def save(self, path: str | os.PathLike[str]) -> None:
        write_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Report:
        return cls.from_json(read_text(path, "report"), source=str(Path(path)))

    @classmethod
    def from_json(cls, text: str, source: str = "report") -> Report:
        raw = parse_json(text, source)
        if not isinstance(raw, dict) or "schema_version" not in raw:
            raise PrecisionDoctorError(f"{source} is not a precision-doctor report (no schema_version)")
        if "units" not in raw and {"steps", "optimizer"} <= raw.keys():
            # What `preflight --json` prints: its schema_version is the section's own.
            raise PrecisionDoctorError(
                f"{source} is a pre-flight result (`preflight --json`), not a report: "
                "`precision-doctor preflight model.py --out report.json` writes the report with it"
            )
        if raw.get("kind") == MONITOR_KIND:
            raise PrecisionDoctorError(
                f"{source} is a GradScaler monitor file (`ScalerMonitor.save`), not a report: "
                "`report.with_extras(scaler_monitor=ScalerMonitor.load(path))` puts it in one"
            )
        if raw["schema_version"] not in READABLE_SCHEMA_VERSIONS:
            older = ", ".join(str(v) for v in READABLE_SCHEMA_VERSIONS if v != SCHEMA_VERSION)
            written = _written_by(raw)
            by = f" (written by precision-doctor {written})" if written is not None else ""
            raise PrecisionDoctorError(
                f"{source} has schema_version {raw['schema_version']!r}{by}; precision-doctor "
                f"{__version__} reads {SCHEMA_VERSION} (and {older})"
            )
        return validated(cls, text, f"{source} does not match the report schema")

    def version_warning(self, source: str = "report") -> str | None:
        """One line when another version of precision-doctor wrote this report
        (`environment.tool_version`): its schema reads, but its findings are that version's
        (thresholds, flag rules and fixes since); None when this version wrote it."""
        written = self.environment.tool_version
        if written == __version__:
            return None
        return (
            f"{source} was written by precision-doctor {written}, this is {__version__}: its findings "
            f"are {written}'s; analyze the model again for this version's"
        )


def _written_by(raw: dict[str, object]) -> str | None:
    env = raw.get("environment")
    version = env.get("tool_version") if isinstance(env, dict) else None
    return version if isinstance(version, str) else None


_ROUNDING = {LowDtype.FP16: 2.0**-11, LowDtype.BF16: 2.0**-8, LowDtype.FP8: 2.0**-8}  # fp8: its bf16 values
"""Unit roundoff of each low dtype: the error rounding alone gives a value."""


def _magnitude(f: FlagRecord) -> float:
    v = f.evidence.values
    for key in (
        "overflow_fraction",
        "rel_l2_error",
        "norm_fraction_lost",
        "growth_factor",
        "underflow_fraction",
        "nonfinite_count",
        "lost_fraction",
    ):
        if key in v:
            return float(v[key])
    return 0.0


def _sortable(x: float) -> float:
    return math.inf if math.isnan(x) else x


def check_writable(path: Path) -> None:
    """Fail now, one line, if `write_atomic(path, ...)` cannot succeed for a reason visible
    before any work: `path` is a folder, or the nearest existing folder above it is a file
    or not writable. (A full disk still shows only at the write.)"""
    if path.is_dir():
        raise PrecisionDoctorError(f"cannot write {path}: it is a directory; give a file path")
    path = _write_target(path)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise PrecisionDoctorError(f"cannot write {path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PrecisionDoctorError(f"cannot write {path}: {folder} is not writable")
    # os.access says yes to root everywhere, and to a read-only or virtual file system
    # (/proc): a file made and removed at once is the answer the write will get.
    probe = folder / f".precision-doctor-probe.{secrets.token_hex(8)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise PrecisionDoctorError(f"cannot write {path}: {e.strerror or e}") from None
    with contextlib.suppress(OSError):
        os.unlink(probe)


def _write_target(path: Path) -> Path:
    """The file a write to `path` replaces: a symbolic link's target (the link is kept), never
    a device, pipe or socket (the rename would replace it with a regular file: /dev/null)."""
    try:
        target = path.resolve()
        special = target.exists() and not target.is_file() and not target.is_dir()
    except (OSError, RuntimeError) as e:  # a loop of links: RuntimeError before Python 3.13
        raise PrecisionDoctorError(f"cannot write {path}: {e}") from None
    if special:
        raise PrecisionDoctorError(f"cannot write {path}: it is not a regular file (a device, pipe or socket)")
    return target


def write_atomic(path: Path, text: str) -> None:
    """Write to a temp file beside `path`, then rename: readers never see half a file.
    A path that cannot be written (its folder is a file, no permission, a full disk) is the
    user's input: PrecisionDoctorError, one line."""
    path = _write_target(path)
    # Not mkstemp, which makes the file 0600: created like a plain open() (0666, less the
    # umask, which the kernel applies), exclusively under a random name.
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise PrecisionDoctorError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise PrecisionDoctorError(f"cannot write {path}: {e.strerror or e}") from None
        raise
