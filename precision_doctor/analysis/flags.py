"""Flag rules: from a unit's statistics to findings, each with its evidence.

Units are judged on what they do themselves: forward range flags look at the values each op
of the unit produces in fp32 (what the low dtype would have to hold), and error flags at the
*local* shadow, which feeds the unit the fp32 run's inputs. A unit downstream of an
overflow that merely receives Inf is therefore not flagged; the propagated error shows the
spread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from precision_doctor.capture.records import OpRecord, UnitRecord
from precision_doctor.capture.units import LOSS_UNIT
from precision_doctor.formats import FormatLimits
from precision_doctor.options import Flag, LowDtype, Phase, Thresholds
from precision_doctor.report import Evidence, FlagRecord, Unit


def _worst(records: Sequence[OpRecord], key: str, fmt: FormatLimits, phase: Phase) -> OpRecord | None:
    best: OpRecord | None = None
    best_v = 0.0
    for r in records:
        if r.phase != phase or r.summary is None or (key in ("overflow", "flushed") and not r.stored_low):
            continue
        s = r.summary
        v: float
        if key == "overflow":
            v = s.tails[fmt.name].overflow
        elif key == "flushed":
            v = s.tails[fmt.name].flushed
        elif key == "max_abs":
            v = s.max_abs
        else:
            v = r.local_rel_error or 0.0
        if v > best_v:
            best, best_v = r, v
    return best


def unit_flags(
    unit: UnitRecord,
    ops: Sequence[OpRecord],
    dtype: LowDtype,
    fmt: FormatLimits,
    th: Thresholds,
) -> list[FlagRecord]:
    flags: list[FlagRecord] = []

    def add(flag: Flag, op: OpRecord | None, phase: Phase, message: str, **values: float) -> None:
        flags.append(
            FlagRecord(
                flag=flag,
                unit=unit.name,
                evidence=Evidence(op=op.op if op else None, phase=phase, message=message, values=values),
            )
        )

    # Range flags judge only the values the real low-precision run holds in the low dtype
    # (under autocast a LayerNorm, a residual add or an upcast RMSNorm runs in fp32).
    fwd, bwd = unit.forward_low, unit.backward

    # An fp32 Inf/NaN the unit drops before handing its values on (a `where` that discards
    # T5's log(0)) breaks nothing; one it hands on or keeps in a buffer does.
    kept = unit.outputs_nonfinite or unit.wrote_nonfinite_state
    roots = [r for r in ops if r.fp32_nonfinite_root] if kept else []
    if roots or unit.grad_nonfinite_root:
        r = roots[0] if roots else None
        phase = Phase.FORWARD if roots else Phase.BACKWARD
        op_name = r.op if r else unit.grad_nonfinite_root
        s = r.summary if r else None
        flags.append(
            FlagRecord(
                flag=Flag.NONFINITE_FP32,
                unit=unit.name,
                evidence=Evidence(
                    op=op_name, phase=phase,
                    message=f"{op_name} produces Inf/NaN already in fp32 ({phase}) from finite inputs; "
                    "not a precision problem",
                    values={"nan_count": s.nan_count if s else 0, "inf_count": s.inf_count if s else 0},
                ),
            )
        )

    if unit.name == LOSS_UNIT:
        return flags  # it runs in fp32 under autocast: no range or error finding applies

    # Overflow is charged to the op whose inputs fit the format but whose output does not:
    # a ReLU or a residual add passing on an upstream overflow is not a root cause.
    # Mask constants (finfo.min, see statistics.SENTINEL_LOG2) overflow on purpose.
    def overflow_of(r: OpRecord) -> int:
        s = r.summary
        own = 0 if s is None or not r.stored_low else max(0, s.tails[fmt.name].overflow - s.sentinel_count)
        return own + r.cast_overflow

    over_ops = [
        r for r in ops if r.phase == Phase.FORWARD and r.input_max_abs <= fmt.max_value and overflow_of(r)
    ]
    over = sum(overflow_of(r) for r in over_ops)
    if over and fwd.fraction(over) > th.overflow_fraction:
        r = max(over_ops, key=overflow_of)
        largest = max(o.out_max_abs for o in over_ops)
        add(
            Flag.OVERFLOW, r, Phase.FORWARD,
            f"{over} value(s) exceed {fmt.name} max {fmt.max_value:g} (largest |x| {largest:.4g})",
            overflow_count=over, overflow_fraction=fwd.fraction(over), max_abs=largest,
            dtype_max=fmt.max_value,
        )

    flushed = fwd.tails[fmt.name].flushed
    if flushed and fwd.fraction(flushed) > th.underflow_fraction:
        r = _worst(ops, "flushed", fmt, Phase.FORWARD)
        add(
            Flag.UNDERFLOW, r, Phase.FORWARD,
            f"{fwd.fraction(flushed):.1%} of nonzero values flush to 0 in {fmt.name} "
            f"(below {fmt.smallest_subnormal:.3g})",
            underflow_count=flushed, underflow_fraction=fwd.fraction(flushed),
            min_nonzero_abs=fwd.min_nonzero_abs,
        )

    # Inf/NaN that the low run makes from finite inputs and that no range flag explains:
    # 0/0 after underflow, inf - inf after an intermediate overflow.
    nan_roots = [r for r in ops if r.local_nonfinite_root]
    if nan_roots and not any(f.flag is Flag.OVERFLOW for f in flags):
        r = nan_roots[0]
        flag = Flag.UNDERFLOW if flushed else Flag.DIVERGENCE
        add(
            flag, r, Phase.FORWARD,
            f"{r.op} gives {r.local_nonfinite_root} Inf/NaN in {fmt.name} where fp32 is finite",
            nonfinite_count=r.local_nonfinite_root,
        )

    local = unit.local_error.rel_l2
    if math.isfinite(local) and local > th.divergence_rel_error:
        r = _worst(ops, "local", fmt, Phase.FORWARD)
        add(
            Flag.DIVERGENCE, r, Phase.FORWARD,
            f"local relative error {local:.3g} fed fp32 inputs (threshold {th.divergence_rel_error:g})",
            rel_l2_error=local, sqnr_db=unit.local_error.sqnr_db,
        )

    prop = unit.prop_error.rel_l2
    if math.isfinite(prop) and prop >= th.error_growth_min_rel_error:
        base = unit.input_prop_error
        growth = prop / base if base > 0 else math.inf
        if growth >= th.error_growth_factor:
            add(
                Flag.ERROR_GROWTH, None, Phase.FORWARD,
                f"propagated error grows from {base:.3g} at the inputs to {prop:.3g}",
                rel_l2_error=prop, input_rel_l2_error=base,
                growth_factor=growth if math.isfinite(growth) else 1e30,
            )

    # The loss itself runs in fp32 under autocast and GradScaler scales the fp32 loss, so its
    # own gradients (the seed 1 among them) are not judged against the low dtype.
    if bwd.numel and unit.name != LOSS_UNIT:
        fed_overflow = reads_overflow(ops, fmt)
        scale = th.grad_scale_log2 if dtype is LowDtype.FP16 else 0
        lost, overflow, norm_lost = bwd.scaled_lost_fractions(scale, fmt)
        flags += _gradient_flags(
            unit.name, fmt, th, scale,
            lost=lost, overflow=0.0 if fed_overflow else overflow, norm_lost=norm_lost, max_abs=bwd.max_abs,
            overflow_op=max(unit.grad_nodes, key=lambda n: n[1].max_abs)[0],
            underflow_op=min(unit.grad_nodes, key=lambda n: n[1].max_abs)[0],
        )
    return flags


def _gradient_flags(
    unit: str, fmt: FormatLimits, th: Thresholds, scale: int, *, lost: float, overflow: float,
    norm_lost: float, max_abs: float, overflow_op: str | None, underflow_op: str | None,
) -> list[FlagRecord]:
    flags = []
    if overflow > th.grad_overflow_fraction:
        flags.append(_grad_flag(
            Flag.GRAD_OVERFLOW, unit, overflow_op,
            f"{overflow:.2%} of gradients overflow {fmt.name} at loss scale 2^{scale} "
            f"(largest |g| {max_abs:.3g})",
            overflow_fraction=overflow, max_abs=max_abs, scale_log2=scale,
        ))
    if norm_lost > th.grad_underflow_norm_fraction:
        flags.append(_grad_flag(
            Flag.GRAD_UNDERFLOW, unit, underflow_op,
            f"at loss scale 2^{scale}, {lost:.1%} of nonzero gradients and {norm_lost:.1%} "
            "of the gradient L2 norm flush to 0",
            underflow_fraction=lost, norm_fraction_lost=norm_lost, scale_log2=scale,
            max_abs=max_abs,
        ))
    return flags


def reads_overflow(ops: Sequence[OpRecord], fmt: FormatLimits) -> bool:
    """Whether the unit reads values that already overflowed `fmt` elsewhere: it then gets
    huge weight gradients from them, inherited like its forward Inf, not flagged."""
    return any(r.phase == Phase.FORWARD and r.input_max_abs > fmt.max_value for r in ops)


def gradient_flags_at_scale(unit: Unit, scale_log2: int, fmt: FormatLimits, th: Thresholds) -> list[FlagRecord]:
    """A reported unit's fp16 gradient flags judged again at loss scale 2^k (a plan's
    recommended scale instead of the default), from its gradient histogram."""
    stats = unit.backward.stats
    if stats is None or unit.name == LOSS_UNIT:
        return []
    lost, overflow, norm_lost = stats.loss_scale_fractions(scale_log2)
    ops = {f.flag: f.evidence.op for f in unit.flags}
    return _gradient_flags(
        unit.name, fmt, th, scale_log2,
        lost=lost, overflow=0.0 if unit.backward.reads_overflow else overflow, norm_lost=norm_lost,
        max_abs=stats.max_abs,
        overflow_op=ops.get(Flag.GRAD_OVERFLOW), underflow_op=ops.get(Flag.GRAD_UNDERFLOW),
    )


def _grad_flag(flag: Flag, unit: str, node: str | None, message: str, **values: float) -> FlagRecord:
    return FlagRecord(
        flag=flag, unit=unit,
        evidence=Evidence(op=node, phase=Phase.BACKWARD, message=message, values=values),
    )
