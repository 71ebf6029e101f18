"""Flag rules: from a unit's statistics to findings, each with its evidence.

Units are judged on what they do themselves: forward range flags look at the values each op
of the unit produces in fp32 (what the low dtype would have to hold), and error flags at the
*local* shadow, which feeds the unit the fp32 run's inputs. A unit downstream of an
overflow that merely receives Inf is therefore not flagged; the propagated error shows the
spread.

Each finding has a severity (`options.Severity`), by a few fixed rules:

- `error`: OVERFLOW, NONFINITE_FP32, DIVERGENCE; UNDERFLOW and ERROR_GROWTH when the unit's
  error is over `divergence_rel_error` (UNDERFLOW's local error, ERROR_GROWTH's propagated
  one) or the low run makes Inf/NaN there; GRAD_OVERFLOW when no smaller power-of-two loss
  scale down to 2^0 removes it, or there is no loss scaler; GRAD_UNDERFLOW when no loss scale
  GradScaler can hold (2^0..2^127, below the smallest scale at which any gradient of the
  model overflows) keeps the norm, or there is no loss scaler.
- `warning`: otherwise. GRAD_OVERFLOW then says how many times GradScaler halves its scale
  (skipping a step each time) before the unit's gradients fit (`backoff_steps`), read off the
  unit's gradient histogram; GRAD_UNDERFLOW the nearest scale that keeps the norm
  (`fixing_scale_log2`).

The scale the gradient flags are judged at: in fp16, `analyze` judges them at
2^`Thresholds.grad_scale_log2` (GradScaler's default 2^16) with a GradScaler that backs off
and grows, in both regimes (pure fp16 included; `unit_flags`); in bf16 at 2^0 with no loss
scaler (bf16's range needs none). Only the pre-flight judges a pure fp16 run at 2^0 without
a scaler (`gradient_flags_at_scale(..., scaler=False)`), as it trains: there every gradient
flag is an error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from precision_doctor.capture.records import OpRecord, UnitRecord
from precision_doctor.capture.statistics import TensorSummary
from precision_doctor.capture.units import LOSS_UNIT
from precision_doctor.formats import E4M3, LIMITS, MAX_LOSS_SCALE_LOG2, FormatLimits
from precision_doctor.options import Flag, LowDtype, Phase, Severity, Thresholds, percent
from precision_doctor.report import Evidence, FlagRecord, GradFidelity, OptimizerStep, Report, Unit

MAX_SCALE_LOG2 = MAX_LOSS_SCALE_LOG2
"""The largest loss scale the gradient severities consider: GradScaler's whole range."""


def _worst(records: Sequence[OpRecord], key: str, limits: FormatLimits, phase: Phase) -> OpRecord | None:
    best: OpRecord | None = None
    best_v = 0.0
    for r in records:
        if r.phase != phase or r.summary is None or (key in ("overflow", "flushed") and not r.stored_low):
            continue
        s = r.summary
        v: float
        if key == "overflow":
            v = s.tails[limits.name].overflow
        elif key == "flushed":
            v = s.tails[limits.name].flushed
        elif key == "max_abs":
            v = s.max_abs
        else:
            v = r.local_rel_error or 0.0
        if v > best_v:
            best, best_v = r, v
    return best


@dataclass(frozen=True)
class _UnitCase:
    """What the flag rules read of one unit: its records, the low format and the thresholds.
    `fwd`, `bwd`: the values the real low-precision run holds in the low dtype (under
    autocast a LayerNorm, a residual add or an upcast RMSNorm runs in fp32), forward, and the
    unit's gradients."""

    unit: UnitRecord
    ops: Sequence[OpRecord]
    dtype: LowDtype
    limits: FormatLimits
    th: Thresholds
    scale_ceiling_log2: int
    loss_ceiling_log2: int = MAX_SCALE_LOG2
    """The largest scale the low run's loss itself takes (a loss held in fp16: 2^15)."""

    @property
    def fwd(self) -> TensorSummary:
        return self.unit.forward_low

    @property
    def bwd(self) -> TensorSummary:
        return self.unit.backward

    @property
    def local(self) -> float:
        return self.unit.local_error.rel_l2

    @property
    def flushed(self) -> int:
        return self.fwd.tails[self.limits.name].flushed

    def flag(
        self, flag: Flag, severity: Severity, op: OpRecord | None, phase: Phase, message: str, **values: float
    ) -> FlagRecord:
        return FlagRecord(
            flag=flag,
            unit=self.unit.name,
            severity=severity,
            evidence=Evidence(op=op.op if op else None, phase=phase, message=message, values=values),
        )


_Rule = Callable[[_UnitCase, Sequence[FlagRecord]], Sequence[FlagRecord]]
"""One flag's rule: the findings it adds for a unit, given those the rules before it found."""


def _nonfinite_fp32(case: _UnitCase, found: Sequence[FlagRecord]) -> list[FlagRecord]:
    """NONFINITE_FP32: an fp32 Inf/NaN the unit hands on or keeps in a buffer (one it drops
    before handing its values on, a `where` that discards T5's log(0), breaks nothing), or
    one its backward makes."""
    unit = case.unit
    kept = unit.outputs_nonfinite or unit.wrote_nonfinite_state
    roots = [r for r in case.ops if r.fp32_nonfinite_root] if kept else []
    if not roots and not unit.grad_nonfinite_root:
        return []
    r = roots[0] if roots else None
    phase = Phase.FORWARD if roots else Phase.BACKWARD
    op_name = r.op if r else unit.grad_nonfinite_root
    s = r.summary if r else None
    return [
        FlagRecord(
            flag=Flag.NONFINITE_FP32,
            unit=unit.name,
            severity=Severity.ERROR,
            evidence=Evidence(
                op=op_name,
                phase=phase,
                message=f"{op_name} produces Inf/NaN already in fp32 ({phase}) from finite inputs; "
                "not a precision problem",
                values={"nan_count": s.nan_count if s else 0, "inf_count": s.inf_count if s else 0},
            ),
        )
    ]


def _overflow(case: _UnitCase, found: Sequence[FlagRecord]) -> list[FlagRecord]:
    """OVERFLOW, charged to the op whose inputs fit the format but whose output does not: a
    ReLU or a residual add passing on an upstream overflow is not a root cause. Mask values
    (-1e38, finfo.min) overflow on purpose: the summaries count them apart (capture/masks.py)."""
    limits, fwd = case.limits, case.fwd

    def overflow_of(r: OpRecord) -> int:
        s = r.summary
        own = 0 if s is None or not r.stored_low else s.tails[limits.name].overflow
        return own + r.cast_overflow

    over_ops = [
        r for r in case.ops if r.phase == Phase.FORWARD and r.input_max_abs <= limits.max_value and overflow_of(r)
    ]
    over = sum(overflow_of(r) for r in over_ops)
    if not over or fwd.fraction(over) <= case.th.overflow_fraction:
        return []
    r = max(over_ops, key=overflow_of)
    largest = max(o.out_max_abs for o in over_ops)
    return [
        case.flag(
            Flag.OVERFLOW,
            Severity.ERROR,
            r,
            Phase.FORWARD,
            f"{over} value(s) exceed {limits.name} max {limits.max_value:g} (largest |x| {largest:.4g})",
            overflow_count=over,
            overflow_fraction=fwd.fraction(over),
            max_abs=largest,
            dtype_max=limits.max_value,
        )
    ]


def _underflow(case: _UnitCase, found: Sequence[FlagRecord]) -> list[FlagRecord]:
    """UNDERFLOW: nonzero values flushing to 0; an error when the unit's local error shows it."""
    limits, fwd, th, local, flushed = case.limits, case.fwd, case.th, case.local, case.flushed
    if not flushed or fwd.fraction(flushed) <= th.underflow_fraction:
        return []
    r = _worst(case.ops, "flushed", limits, Phase.FORWARD)
    costly = not math.isfinite(local) or local > th.divergence_rel_error
    return [
        case.flag(
            Flag.UNDERFLOW,
            Severity.ERROR if costly else Severity.WARNING,
            r,
            Phase.FORWARD,
            f"{percent(fwd.fraction(flushed), '.1%')} of nonzero values flush to 0 in {limits.name} "
            f"(below {limits.smallest_subnormal:.3g}); local error {local:.3g}",
            underflow_count=flushed,
            underflow_fraction=fwd.fraction(flushed),
            min_nonzero_abs=fwd.min_nonzero_abs,
        )
    ]


def _low_nonfinite(case: _UnitCase, found: Sequence[FlagRecord]) -> list[FlagRecord]:
    """Inf/NaN that the low run makes from finite inputs and that no range flag explains
    (0/0 after underflow: UNDERFLOW; inf - inf after an intermediate overflow: DIVERGENCE)."""
    nan_roots = [r for r in case.ops if r.local_nonfinite_root]
    if not nan_roots or any(f.flag is Flag.OVERFLOW for f in found):
        return []
    r = nan_roots[0]
    return [
        case.flag(
            Flag.UNDERFLOW if case.flushed else Flag.DIVERGENCE,
            Severity.ERROR,
            r,
            Phase.FORWARD,
            f"{r.op} gives {r.local_nonfinite_root} Inf/NaN in {case.limits.name} where fp32 is finite",
            nonfinite_count=r.local_nonfinite_root,
        )
    ]


def _divergence(case: _UnitCase, found: Sequence[FlagRecord]) -> list[FlagRecord]:
    """DIVERGENCE: the unit's local error, fed fp32 inputs, over the threshold."""
    local, th = case.local, case.th
    if not (math.isfinite(local) and local > th.divergence_rel_error):
        return []
    r = _worst(case.ops, "local", case.limits, Phase.FORWARD)
    return [
        case.flag(
            Flag.DIVERGENCE,
            Severity.ERROR,
            r,
            Phase.FORWARD,
            f"local relative error {local:.3g} fed fp32 inputs (threshold {th.divergence_rel_error:g})",
            rel_l2_error=local,
            sqnr_db=case.unit.local_error.sqnr_db,
        )
    ]


def _error_growth(case: _UnitCase, found: Sequence[FlagRecord]) -> list[FlagRecord]:
    """ERROR_GROWTH across the unit: its propagated error far above its inputs'."""
    unit, th = case.unit, case.th
    prop = unit.prop_error.rel_l2
    if not (math.isfinite(prop) and prop >= th.error_growth_min_rel_error):
        return []
    base = unit.input_prop_error
    # In an fp8 run a Linear casts what it reads to e4m3, whose rounding alone (up to 6%)
    # puts a healthy first layer at ~3.6% from the batch's exact values: an infinite growth
    # over 0. There its inputs' error is taken as no less than that rounding (as
    # `op_error_growth` takes the format's rounding for what an op reads from outside).
    base_or_floor = max(base, E4M3.eps / 2 if case.dtype is LowDtype.FP8 else 0.0)
    growth = prop / base_or_floor if base_or_floor > 0 else math.inf
    if growth < th.error_growth_factor:
        return []
    return [
        case.flag(
            Flag.ERROR_GROWTH,
            Severity.ERROR if prop > th.divergence_rel_error else Severity.WARNING,
            None,
            Phase.FORWARD,
            f"propagated error grows from {base:.3g} at the inputs to {prop:.3g}",
            rel_l2_error=prop,
            input_rel_l2_error=base,
            growth_factor=growth if math.isfinite(growth) else 1e30,
        )
    ]


def _inner_error_growth(case: _UnitCase, found: Sequence[FlagRecord]) -> list[FlagRecord]:
    """ERROR_GROWTH inside the unit, where the unit's own is not flagged: an op whose local
    error is far above that of what it reads (cancellation, `(x + c) - c`, a small update
    lost against a large value), charged here with the op named, even when the unit's own
    output error stays small."""
    th = case.th
    inner = op_error_growth(case.ops, case.limits, th) if not any(f.flag is Flag.ERROR_GROWTH for f in found) else None
    if inner is None:
        return []
    r, op_err, in_err = inner
    return [
        case.flag(
            Flag.ERROR_GROWTH,
            Severity.ERROR if op_err > th.divergence_rel_error else Severity.WARNING,
            r,
            Phase.FORWARD,
            f"{r.op} inside the unit: local error grows from {in_err:.3g} in what it reads to {op_err:.3g}",
            rel_l2_error=op_err,
            input_rel_l2_error=in_err,
            growth_factor=op_err / in_err,
        )
    ]


def _gradients(case: _UnitCase, found: Sequence[FlagRecord]) -> list[FlagRecord]:
    """GRAD_OVERFLOW and GRAD_UNDERFLOW at the loss scale the run trains at (`_gradient_flags`)."""
    unit, bwd, limits = case.unit, case.bwd, case.limits
    if not bwd.numel:
        return []
    fp16 = case.dtype is LowDtype.FP16
    scale = case.th.grad_scale_log2 if fp16 else 0
    curves = bwd.loss_scale_fractions(range(MAX_SCALE_LOG2 + 1), limits)

    def at_scale(k: int) -> tuple[float, float, float]:
        return float(curves[0][k]), float(curves[1][k]), float(curves[2][k])

    return _gradient_flags(
        unit.name,
        limits,
        case.th,
        scale,
        at_scale,
        inherited_overflow=reads_overflow(case.ops, limits),
        max_abs=bwd.max_abs,
        scaler=fp16,
        ceiling_log2=case.scale_ceiling_log2,
        loss_ceiling_log2=case.loss_ceiling_log2,
        overflow_op=max(unit.grad_nodes, key=lambda n: n[1].max_abs)[0],
        underflow_op=min(unit.grad_nodes, key=lambda n: n[1].max_abs)[0],
    )


_RULES: tuple[_Rule, ...] = (
    _overflow,
    _underflow,
    _low_nonfinite,
    _divergence,
    _error_growth,
    _inner_error_growth,
    _gradients,
)
"""The range, error and gradient rules, in the order their findings are listed."""


def unit_flags(
    unit: UnitRecord,
    ops: Sequence[OpRecord],
    dtype: LowDtype,
    limits: FormatLimits,
    th: Thresholds,
    scale_ceiling_log2: int = MAX_SCALE_LOG2,
    *,
    loss_ceiling_log2: int = MAX_SCALE_LOG2,
) -> list[FlagRecord]:
    """The unit's findings, one rule per flag (`_RULES`), each seeing what the rules before
    it found. `scale_ceiling_log2`: the largest loss scale at which no gradient of the model
    overflows (`scale_ceiling`), the highest GradScaler can settle at; `loss_ceiling_log2`:
    the largest the low run's loss takes (`loss_scale.seed_ceiling_log2`)."""
    case = _UnitCase(unit, ops, dtype, limits, th, scale_ceiling_log2, loss_ceiling_log2)
    flags = _nonfinite_fp32(case, [])
    # The loss runs in fp32 under autocast and GradScaler scales the fp32 loss: no range,
    # error or gradient finding applies to it (its gradients, the seed 1 among them, are not
    # the low dtype's).
    if unit.name == LOSS_UNIT:
        return flags
    for rule in _RULES:
        flags += rule(case, flags)
    return flags


def scale_ceiling(overflow_at: Callable[[int], float], th: Thresholds) -> int:
    """The largest loss scale 2^k (k <= 127, `MAX_SCALE_LOG2`: the curves' whole range) at
    which the model's gradients do not overflow (`overflow_at(k)`: the fraction overflowing at
    2^k): GradScaler backs off from any scale above it, so it cannot settle higher. 0 when they
    overflow even at 2^0."""
    return max((k for k in range(MAX_SCALE_LOG2 + 1) if overflow_at(k) <= th.grad_overflow_fraction), default=0)


def _gradient_flags(
    unit: str,
    limits: FormatLimits,
    th: Thresholds,
    scale: int,
    at_scale: Callable[[int], tuple[float, float, float]],
    *,
    inherited_overflow: bool,
    max_abs: float,
    scaler: bool,
    ceiling_log2: int,
    overflow_op: str | None,
    underflow_op: str | None,
    loss_ceiling_log2: int = MAX_SCALE_LOG2,
) -> list[FlagRecord]:
    """GRAD_OVERFLOW and GRAD_UNDERFLOW at loss scale 2^`scale`, with their severities (see
    the module docstring). `at_scale(k)`: (fraction of nonzero gradients flushed, fraction
    overflowing, fraction of the L2 norm flushed) at 2^k, k in 0..127 (`MAX_SCALE_LOG2`).
    `scaler`: a GradScaler moves the scale (fp16 in `analyze`, pure fp16 included; in the
    pre-flight, fp16 under autocast); without one the scale is fixed."""
    lost, overflow, norm_lost = at_scale(scale)
    if inherited_overflow:
        overflow = 0.0

    def overflows(k: int) -> bool:
        return not inherited_overflow and at_scale(k)[1] > th.grad_overflow_fraction

    flags = []
    if overflow > th.grad_overflow_fraction:
        backoff = next((j for j in range(1, scale + 1) if not overflows(scale - j)), None) if scaler else None
        flags.append(_grad_overflow(unit, overflow_op, limits, scale, overflow, max_abs, backoff, scaler=scaler))
    if norm_lost > th.grad_underflow_norm_fraction:
        # A larger scale keeps more: GradScaler grows to it unless some gradient of the
        # model overflows on the way (the ceiling) or this unit's do.
        fix = (
            next(
                (
                    k
                    for k in range(scale + 1, min(ceiling_log2, loss_ceiling_log2) + 1)
                    if at_scale(k)[2] <= th.grad_underflow_norm_fraction and not overflows(k)
                ),
                None,
            )
            if scaler
            else None
        )
        flags.append(
            _grad_underflow(
                unit,
                underflow_op,
                scale,
                (lost, norm_lost),
                max_abs,
                fix,
                scaler=scaler,
                ceiling_log2=ceiling_log2,
                loss_ceiling_log2=loss_ceiling_log2,
            )
        )
    return flags


def _grad_overflow(
    unit: str,
    op: str | None,
    limits: FormatLimits,
    scale: int,
    overflow: float,
    max_abs: float,
    backoff: int | None,
    *,
    scaler: bool,
) -> FlagRecord:
    """GRAD_OVERFLOW at 2^`scale`: a warning when GradScaler backs off from it in `backoff`
    halvings, else an error."""
    what = f"{percent(overflow)} of gradients (largest |g| {max_abs:.3g}) overflow {limits.name} at 2^{scale}"
    values = {"overflow_fraction": overflow, "max_abs": max_abs, "scale_log2": scale}
    if backoff is not None:
        message = f"{what}: GradScaler backs off in {backoff} step(s), to 2^{scale - backoff}"
        return _grad_flag(Flag.GRAD_OVERFLOW, Severity.WARNING, unit, op, message, **values, backoff_steps=backoff)
    why = "at every loss scale down to 2^0" if scaler else "beyond the format (no loss scaler)"
    return _grad_flag(Flag.GRAD_OVERFLOW, Severity.ERROR, unit, op, f"{what}: {why}", **values)


OWN_ERROR_FLAGS = frozenset({Flag.DIVERGENCE, Flag.ERROR_GROWTH})
"""The findings on a unit's own forward error: at error severity, what makes the verdict "not
safe as-is" where the final loss is within tolerance."""


def own_error_finding(unit: Unit) -> FlagRecord | None:
    """`unit`'s first error-severity finding on its own error (`OWN_ERROR_FLAGS`), if any."""
    return next((f for f in unit.flags if f.flag in OWN_ERROR_FLAGS and f.severity is Severity.ERROR), None)


GRADSCALER_GROWTH_INTERVAL = 2000
"""torch.amp.GradScaler's default growth_interval: it doubles its scale after this many steps
in a row without Inf/NaN."""


def _grad_underflow(
    unit: str,
    op: str | None,
    scale: int,
    flushed: tuple[float, float],
    max_abs: float,
    fix: int | None,
    *,
    scaler: bool,
    ceiling_log2: int,
    loss_ceiling_log2: int = MAX_SCALE_LOG2,
) -> FlagRecord:
    """GRAD_UNDERFLOW at 2^`scale` (`flushed`: the fractions of the nonzero gradients and of
    their L2 norm that flush to 0): a warning when GradScaler can grow to 2^`fix`, which
    keeps them, else an error."""
    lost, norm_lost = flushed
    what = (
        f"at loss scale 2^{scale}, {percent(lost, '.1%')} of nonzero gradients and "
        f"{percent(norm_lost, '.1%')} of the gradient L2 norm flush to 0"
    )
    values = {"underflow_fraction": lost, "norm_fraction_lost": norm_lost, "scale_log2": scale, "max_abs": max_abs}
    if fix is not None:
        message = f"{what}; GradScaler can grow to 2^{fix}, which keeps them"
        if fix > scale:  # growing there takes GradScaler a doubling per growth_interval clean steps
            steps = (fix - scale) * GRADSCALER_GROWTH_INTERVAL
            message += (
                f", after {steps:,} steps at its default growth: start it higher (the recommended initial loss "
                "scale covers every unit)"
            )
        return _grad_flag(Flag.GRAD_UNDERFLOW, Severity.WARNING, unit, op, message, **values, fixing_scale_log2=fix)
    above = " (above it the model's gradients overflow)" if ceiling_log2 < MAX_SCALE_LOG2 else ""
    why = f"no loss scale up to 2^{ceiling_log2}{above} keeps them" if scaler else "no loss scaler"
    if scaler and loss_ceiling_log2 < ceiling_log2:
        # The loss bounds the scale before the model's gradients do.
        why = (
            f"no loss scale up to 2^{loss_ceiling_log2} keeps them: the loss itself is held low, and a larger "
            "scale overflows its gradient (compute the loss in fp32)"
        )
    return _grad_flag(Flag.GRAD_UNDERFLOW, Severity.ERROR, unit, op, f"{what}; {why}", **values)


def op_error_growth(
    ops: Sequence[OpRecord], limits: FormatLimits, th: Thresholds
) -> tuple[OpRecord, float, float] | None:
    """The op of a unit whose local error grows most over that of the values it reads, if it
    grows by `error_growth_factor` to at least `error_growth_min_rel_error`: (op, its error,
    its inputs' error). What it reads from another unit, a parameter or the batch enters the
    local shadow rounded once: its error is taken as the format's rounding error (eps / 2)."""
    by_index = {r.index: r for r in ops}
    floor = limits.eps / 2
    best: tuple[OpRecord, float, float] | None = None
    for r in ops:
        if r.phase != Phase.FORWARD or r.local_error is None:
            continue
        err = r.local_error.rel_l2
        if not math.isfinite(err) or err < th.error_growth_min_rel_error:
            continue
        read = floor
        for i, slot in zip(r.inputs, r.input_slots, strict=False):
            src = by_index.get(i)
            if src is None:
                continue
            # Through views and copies, to the ops that made the values.
            for v, k in src.value_sources if src.value_sources is not None else ((i, slot),):
                maker = by_index.get(v)
                local = maker.output_errors.get(k, (None, None))[0] if maker is not None else None
                if local is not None:
                    read = max(read, local.rel_l2)
        if (
            math.isfinite(read)
            and err >= th.error_growth_factor * read
            and (best is None or err / read > best[1] / best[2])
        ):
            best = (r, err, read)
    return best


def reads_overflow(ops: Sequence[OpRecord], limits: FormatLimits) -> bool:
    """Whether the unit reads values that already overflowed `limits` elsewhere: it then gets
    huge weight gradients from them, inherited like its forward Inf, not flagged."""
    return any(r.phase == Phase.FORWARD and r.input_max_abs > limits.max_value for r in ops)


def gradient_flags_at_scale(
    unit: Unit,
    scale_log2: int,
    limits: FormatLimits,
    th: Thresholds,
    *,
    scaler: bool = True,
    ceiling_log2: int = MAX_SCALE_LOG2,
) -> list[FlagRecord]:
    """A reported unit's fp16 gradient flags judged again at loss scale 2^k (a plan's
    recommended scale instead of the default), from its gradient histogram. `scaler`: False
    where the run has no GradScaler (pure fp16): every gradient flag is then an error.
    `ceiling_log2`: `scale_ceiling` of the report's loss-scale curve."""
    stats = unit.backward.stats
    if stats is None or unit.name == LOSS_UNIT:
        return []
    ops = {f.flag: f.evidence.op for f in unit.flags}
    return _gradient_flags(
        unit.name,
        limits,
        th,
        scale_log2,
        stats.loss_scale_fractions,
        inherited_overflow=unit.backward.reads_overflow,
        max_abs=stats.max_abs,
        scaler=scaler,
        ceiling_log2=ceiling_log2,
        overflow_op=ops.get(Flag.GRAD_OVERFLOW),
        underflow_op=ops.get(Flag.GRAD_UNDERFLOW),
    )


def report_scale_ceiling(report: Report) -> int:
    """`scale_ceiling` of a report's model-wide loss-scale curve."""
    over = {p.scale_log2: p.overflow_fraction for p in report.loss_scale}
    return scale_ceiling(lambda k: over.get(k, 0.0), report.thresholds)


def _grad_flag(
    flag: Flag, severity: Severity, unit: str, node: str | None, message: str, **values: float
) -> FlagRecord:
    return FlagRecord(
        flag=flag,
        unit=unit,
        severity=severity,
        evidence=Evidence(op=node, phase=Phase.BACKWARD, message=message, values=values),
    )


def grad_norm_flushed(unit: Unit, limits: FormatLimits, scale_log2: int) -> float:
    """The fraction of the L2 norm of the gradients the unit holds low (`backward.stats`,
    what GRAD_UNDERFLOW reads) that lies below `limits`'s smallest subnormal at loss scale
    2^`scale_log2`, and so flushes to 0: read off their histogram at one power of two
    resolution, as the loss-scale curves are. The unit's output gradients count: the
    parameters' are computed from them (a weight gradient sums a batch of output gradients
    that each flush). bf16's subnormals lie below fp32's normal range: none flush there."""
    stats = unit.backward.stats
    sq = stats.histogram.sum_squares if stats is not None else None
    if stats is None or sq is None or not stats.sum_squares_total:
        return 0.0
    h = stats.histogram
    flush_below = math.floor(math.log2(limits.smallest_subnormal)) - scale_log2
    lost = 0.0
    for i, c in enumerate(h.counts):
        b = h.log2_lo + i
        if b >= flush_below:
            break
        lost += sq[i] if i < len(sq) else c * 4.0**b
    return math.sqrt(min(1.0, lost / stats.sum_squares_total))


def grad_divergence_flags(
    report: Report,
    fidelity: Mapping[str, GradFidelity],
    th: Thresholds,
    scale_log2: int,
    model_fp32_l2_norm: float,
) -> dict[str, list[FlagRecord]]:
    """GRAD_DIVERGENCE findings by unit, from each unit's parameter-gradient fidelity
    (`analysis.gradients`) at loss scale 2^`scale_log2`: its relative L2 error over
    `grad_rel_error` is a warning (the update's size is off; Adam-like optimizers mostly
    absorb that), its cosine below `grad_cosine_min` an error (the update no longer points
    the way fp32's does: gradients lost, or their direction), as are Inf/NaN gradients where
    fp32's are finite (unless the unit's GRAD_OVERFLOW already says so).

    Gradients computed from a broken forward are inherited, not flagged, as a forward unit
    that receives Inf is not: a unit's parameter gradients read its inputs, its own values
    and those of every unit between it and the loss, so when one of those already carries a
    propagated error over `divergence_rel_error` (or Inf/NaN), or the low loss is not finite,
    that forward finding is the cause. A unit whose fp32 gradients are all zero has nothing
    to compare with.

    A unit is weighed by its share of the model's gradient (`model_fp32_l2_norm`, fp32's
    over every parameter): an error ||g_low - g_fp32|| below `grad_error_share_min` of that
    norm is not a finding, unless the low format's range flushes more than
    `grad_underflow_norm_fraction` of the norm of the gradients the unit holds low
    (`grad_norm_flushed`: GRAD_UNDERFLOW's measure, at the backward's scale) or the
    gradients are Inf/NaN. At that size a real gradient and cancellation residue that fp32
    makes as well (attention's query/key projections, whose gradient softmax's shift
    invariance makes ~0: ~1e-8 of the model's norm) look alike; rounding tells them apart
    no better, but a flush takes the gradient whatever it holds and stops the unit learning
    (a deep sigmoid stack's first layers)."""
    if not math.isfinite(report.losses.low):
        return {}
    units = report.by_module()
    into: dict[str, set[str]] = {}
    for e in report.edges:
        into.setdefault(e.src, set()).add(e.dst)
    limits = LIMITS[report.environment.dtype]
    out: dict[str, list[FlagRecord]] = {}
    for name, f in fidelity.items():
        if f.fp32_l2_norm == 0:
            continue
        if not (f.nonfinite_count or _lost_direction(f, th) or f.rel_l2_error > th.grad_rel_error):
            continue
        unit = units.get(name)
        if unit is None or _forward_explains(name, units, into, th):
            continue
        if f.nonfinite_count and any(x.flag is Flag.GRAD_OVERFLOW for x in unit.flags):
            continue
        # rel_l2_error * ||g_fp32|| is ||g_low - g_fp32||; inf (non-finite) is always weighed in.
        share = f.rel_l2_error * f.fp32_l2_norm / model_fp32_l2_norm if model_fp32_l2_norm > 0 else math.inf
        if (
            share < th.grad_error_share_min
            and grad_norm_flushed(unit, limits, scale_log2) <= th.grad_underflow_norm_fraction
        ):
            continue
        out[name] = [_grad_divergence(name, f, th, report.environment.dtype, scale_log2, share)]
    return out


def _lost_direction(f: GradFidelity, th: Thresholds) -> bool:
    """The low gradients no longer point the way fp32's do (or are all 0)."""
    return f.cosine is None or f.cosine < th.grad_cosine_min


def _forward_broken(name: str, unit: Unit | None, th: Thresholds) -> bool:
    """Whether the unit's forward already carries an error over `divergence_rel_error` (or
    Inf/NaN): what it hands on, or what it receives."""
    if unit is None or name == LOSS_UNIT:
        return False  # the loss's own error is the verdict's (`loss_rel_error`)
    prop = unit.forward.propagated
    if prop is not None and (prop.nonfinite_count or not prop.rel_l2_error <= th.divergence_rel_error):
        return True
    base = unit.forward.input_rel_l2_error
    return base is not None and not base <= th.divergence_rel_error


def _forward_explains(name: str, units: Mapping[str, Unit], into: Mapping[str, set[str]], th: Thresholds) -> bool:
    """Whether a broken forward explains the unit's gradient error: its own, or that of any
    unit between it and the loss (`into`: each unit's consumers)."""
    seen, todo = {name}, [name]
    while todo:
        current = todo.pop()
        if _forward_broken(current, units.get(current), th):
            return True
        for nxt in into.get(current, ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return False


def _grad_divergence(
    name: str, f: GradFidelity, th: Thresholds, low: LowDtype, scale_log2: int, share: float
) -> FlagRecord:
    """The GRAD_DIVERGENCE finding, its severity and message by what went wrong: Inf/NaN,
    every gradient 0, the direction lost (errors), or only the size off (a warning)."""
    lost_direction = _lost_direction(f, th)
    values: dict[str, float] = {"rel_l2_error": f.rel_l2_error, "scale_log2": scale_log2}
    if math.isfinite(share):
        values["error_norm_share"] = share
    at = f"in {low} at loss scale 2^{scale_log2}"
    if f.nonfinite_count:
        values["nonfinite_count"] = f.nonfinite_count
        message = f"{f.nonfinite_count} parameter gradient(s) Inf/NaN {at} where fp32's are finite"
    elif f.cosine is None:
        message = f"every parameter gradient is 0 {at} where fp32's are not: the unit does not learn"
    else:
        values["cosine"] = f.cosine
        if lost_direction:
            message = (
                f"parameter gradients {at}: cosine {f.cosine:.3g} with fp32's (below {th.grad_cosine_min:g}: "
                f"the update no longer points the way fp32's does), relative L2 error {f.rel_l2_error:.3g}"
            )
        else:
            message = (
                f"parameter gradients {at}: relative L2 error {f.rel_l2_error:.3g} against fp32's "
                f"(threshold {th.grad_rel_error:g}); cosine {f.cosine:.4g}: the direction holds"
            )
    severity = Severity.ERROR if f.nonfinite_count or lost_direction else Severity.WARNING
    return _grad_flag(Flag.GRAD_DIVERGENCE, severity, name, None, message, **values)


ANY_LR = 1e-20
"""A learning rate below any in use: a survive-lr under it (bf16's: the spacing of a weight at
0 is its smallest subnormal, ~1e-40; fp16's, 6e-8, reads as a number) is said as "any lr"."""


def lost_update_flags(step: OptimizerStep, th: Thresholds) -> dict[str, list[FlagRecord]]:
    """LOST_UPDATE per unit of `step` (`analysis.optimizer_step`): an error when more than
    `lost_update_fraction` of the elements the fp32 step changes keep their value with the
    weights in the low dtype, a warning when more than `lost_update_partial_fraction` are lost
    or partly lost; information only where the regime keeps fp32 master weights (autocast),
    which lose none of it. The message names the remedies: fp32 master weights for the unit,
    a compensating optimizer, or the learning rate at which the updates survive."""
    out: dict[str, list[FlagRecord]] = {}
    # fp8 training keeps its weights in bf16 at the lowest (torchao casts them per matmul):
    # the step of an fp8 analysis is taken on bf16 weights (`formats.TORCH_DTYPES`).
    dtype = LowDtype.BF16 if step.dtype is LowDtype.FP8 else step.dtype
    for u in step.units:
        lost, partial = u.lost_fraction, u.lost_fraction + u.partly_lost_fraction
        stochastic = step.stochastic_rounding and u.mean_update_ratio is not None
        if stochastic:
            # Most elements keep their value in one draw; what counts is what arrives on average,
            # less three standard errors of the draw (a unit with few expected moves tells nothing).
            margin = 3 * (u.mean_update_ratio_stderr or 0.0)
            lost = partial = min(1.0, max(0.0, 1.0 - (u.mean_update_ratio or 0.0) - margin))
        if lost > th.lost_update_fraction or u.nonfinite:
            severity = Severity.ERROR
        elif partial > th.lost_update_partial_fraction:
            severity = Severity.WARNING
        else:
            continue
        at = f"lr {u.lr:g}" if u.lr is not None else "its parameter groups' lrs"
        ratio = f"{u.update_norm_ratio:.2g}x" if u.update_norm_ratio is not None else "none"
        what = (
            f"{step.optimizer} at {at} with {dtype} weights: {percent(lost)} of the weight updates the "
            f"fp32 step makes here are rounded away ({percent(u.partly_lost_fraction)} more move less than half of it; "
            f"update norm {ratio} the fp32 one)"
        )
        if stochastic:
            what = (
                f"{step.optimizer} at {at} with {dtype} weights rounds stochastically, yet on average only "
                f"{percent(1.0 - lost)} of the fp32 step's update arrives"
            )
        if u.nonfinite:
            what = (
                f"{step.optimizer} at {at} with {dtype} weights and state makes {u.nonfinite} of this "
                f"unit's weights Inf/NaN in one step (its state or eps underflows {dtype}: Adam's eps of 1e-8 is 0 "
                "in fp16, and a second moment that flushes divides by 0)"
            )
        half = u.survive_lr_half
        # Weights at 0 (a LayerNorm's biases) take any update: half of them survive at any lr.
        half_text = f"half at {half:.2g}" if half is not None and half > ANY_LR else "half at any lr"
        survive = (
            f"; or lr >= {u.survive_lr:.2g} (90% of its updates survive this first step; {half_text}; "
            "Adam's later steps are smaller where gradients vary)"
            if u.survive_lr is not None and half is not None and not stochastic
            else ""
        )
        compensated = (
            "torch-optimi's optimizers (Kahan summation, on for bf16 parameters) or "
            "torchao.optim._AdamW(bf16_stochastic_round=True)"
            if dtype is LowDtype.BF16 and not step.stochastic_rounding
            else "an optimizer with Kahan summation (torch-optimi's kahan_sum=True)"
        )
        if step.master_weights:
            severity = Severity.INFO
            message = (
                f"{what}, held as model.to({dtype}) holds them; autocast keeps fp32 master weights, so training "
                "here loses none of it"
            )
        elif u.nonfinite:
            message = (
                f"{what}. Remedy: keep fp32 master weights and optimizer state for {u.unit} (the fp32 optimizer "
                "step of mixed precision)"
            )
        else:
            message = (
                f"{what}. Remedy: keep fp32 master weights for {u.unit} (an fp32 copy the optimizer steps, cast to "
                f"{dtype} for the forward), or a compensating optimizer: {compensated}{survive}"
            )
        values = {
            "lost_fraction": lost,
            "nonfinite_weights": float(u.nonfinite),
            "partly_lost_fraction": u.partly_lost_fraction,
        }
        if u.lr is not None:
            values["lr"] = u.lr
        if u.mean_update_ratio is not None:
            values["mean_update_ratio"] = u.mean_update_ratio
        if u.update_norm_ratio is not None:
            values["update_norm_ratio"] = u.update_norm_ratio
        if u.survive_lr is not None:
            values["survive_lr"] = u.survive_lr
        for key, s in u.state.items():
            values[f"state_{key}_lost_fraction"] = s.lost_fraction
        evidence = Evidence(op=None, phase=Phase.BACKWARD, message=message, values=values)
        out[u.unit] = [FlagRecord(flag=Flag.LOST_UPDATE, unit=u.unit, evidence=evidence, severity=severity)]
    return out
