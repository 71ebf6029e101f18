"""The initial loss scale for fp16 training, read off the gradient magnitude histograms.

Backward is linear in the loss, so scaling the loss by S = 2^k scales every backward value
(the gradients and every intermediate of the backward pass) by S. The largest safe k keeps
the largest backward magnitude times S, times a headroom for early-training growth, at or
below fp16's max (65504). That is the published heuristic (Fast-LLM: scale * max|grad| *
headroom < fp16 max); the histograms also give, exactly per power of two, the fraction of
nonzero gradients that flush to zero (below 2^-24) at any scale.

The search covers every power of two GradScaler can hold: its scale is an fp32 tensor (it
grows only while the product stays finite), so 2^0..2^127, and down to 2^-16 for gradients
that overflow fp16 unscaled. Above ~2^100 the fp32 values of the backward (the scaled loss
itself, fp32 units' and parameters' gradients) bound the scale too: they must stay below
fp32's max with the same headroom.

Only the gradients of units that run low count for fp16's range: the loss, `<backward>`
leftovers and fp32 units keep fp32 gradients under AMP. Where the run holds the loss itself in
fp16 (CPU autocast's `mean`, pure fp16), the scale reaches it as its gradient, in fp16: the
scale is then 2^15 at most, and GradScaler skips a step at its default 2^16. GradScaler halves its scale on every
step whose gradients hold an Inf or NaN (backoff 0.5) and skips that step, so from 2^16 it
skips one step per halving until the scaled gradients fit: 16 - k_fit steps, where k_fit is
the largest k whose scaled gradients all round to finite values (no headroom: that is the
scaler's own test), not 16 - the recommended k.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping

import torch

from precision_doctor.capture.units import LOSS_UNIT, UNATTRIBUTED_UNIT
from precision_doctor.deprecation import positional_deprecated
from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.extras import LossScaleSection
from precision_doctor.formats import LIMITS, MAX_LOSS_SCALE_LOG2
from precision_doctor.options import LowDtype
from precision_doctor.report import Report

HEADROOM_LOG2 = 2
"""Gradients often grow several-fold in the first steps; 4x headroom keeps those steps."""
DEFAULT_SCALE_LOG2 = 16
"""torch.amp.GradScaler's init_scale, 2^16."""
MAX_SCALE_LOG2 = MAX_LOSS_SCALE_LOG2
"""The largest scale GradScaler holds (`formats.MAX_LOSS_SCALE_LOG2`)."""
MIN_SCALE_LOG2 = -16
"""For gradients that overflow fp16 unscaled (above 16376 with the headroom)."""
FP32_MAX = float(torch.finfo(torch.float32).max)
# Smallest fp16 subnormal is 2^-24: a bin b (|g| in [2^b, 2^(b+1))) flushes at scale 2^k
# when b + k < -24 (the statistics count |g| < smallest subnormal as flushed).
_FLUSH_LOG2 = {LowDtype.FP16: -24, LowDtype.BF16: -133, LowDtype.FP8: -133}  # fp8: its bf16 gradients


class LossScaleAdvice(LossScaleSection):
    """The recommendation (the report's `loss_scale` section, `to_extras()`) and what it was
    read off."""

    dtype: LowDtype
    max_grad_abs: float
    headroom_log2: int = HEADROOM_LOG2
    finite_scale_log2: int = MAX_SCALE_LOG2
    """The largest scale at which every scaled gradient stays finite (no headroom): where
    GradScaler, started above it, backs off to; above it no scale is usable."""
    fp32_max_abs: float = 0.0
    """The largest fp32 backward magnitude (the loss, parameter gradients, fp32 units): the
    scale must keep it below fp32's max too."""

    @property
    def recommended_scale(self) -> float:
        return 2.0**self.recommended_scale_log2

    def to_extras(self) -> LossScaleSection:
        return LossScaleSection(**{name: getattr(self, name) for name in LossScaleSection.model_fields})

    def summary(self) -> str:
        return self.describe(self.dtype)


def underflow_fraction(counts_by_log2: Mapping[int, int], scale_log2: int, dtype: LowDtype) -> float:
    """Fraction of the nonzero values that flush to zero in `dtype` at scale 2^k."""
    total = sum(counts_by_log2.values())
    if total == 0:
        return 0.0
    flush = _FLUSH_LOG2[dtype]
    lost = sum(c for b, c in counts_by_log2.items() if b + scale_log2 < flush)
    return lost / total


def overflow_threshold(dtype: LowDtype) -> float:
    """The smallest magnitude that rounds to Inf in `dtype` (round to nearest even: the max
    plus half its ulp; 65520 for fp16)."""
    limits = LIMITS[dtype]
    ulp = 2.0 ** math.floor(limits.max_log2) * limits.eps
    return limits.max_value + ulp / 2


def _largest_k(max_abs: float, bound: float, *, strict: bool) -> int:
    """The largest integer k with max_abs * 2^k <= bound (< bound when `strict`); max_abs > 0.
    Powers of two scale an fp32 value exactly, so the compare is exact."""
    k = math.floor(math.log2(bound / max_abs)) + 1
    while max_abs * 2.0**k > bound or (strict and max_abs * 2.0**k == bound):
        k -= 1  # log2 rounding at exact powers of two
    return k


def safe_scale_log2(
    max_abs: float, dtype: LowDtype, headroom_log2: int = HEADROOM_LOG2, fp32_max_abs: float = 0.0
) -> int:
    """Largest k with max_abs * 2^k * 2^headroom <= the dtype's max (and fp32_max_abs * 2^k *
    2^headroom <= fp32's max), clipped to MIN_SCALE_LOG2..MAX_SCALE_LOG2."""
    if max_abs <= 0 or not math.isfinite(max_abs):
        return MAX_SCALE_LOG2
    k = _largest_k(max_abs, LIMITS[dtype].max_value, strict=False) - headroom_log2
    if fp32_max_abs > 0 and math.isfinite(fp32_max_abs):
        k = min(k, _largest_k(fp32_max_abs, FP32_MAX, strict=False) - headroom_log2)
    return max(MIN_SCALE_LOG2, min(MAX_SCALE_LOG2, k))


def seed_ceiling_log2(dtype: LowDtype, loss_held_low: bool, low_term_grad_max_abs: float = 0.0) -> int:
    """The largest loss scale the loss itself takes: a loss held in `dtype` gets the scale as
    its gradient in `dtype` (2^15 in fp16), a loss term held low the scale times its
    |d loss / d term|; otherwise no bound of its own (`MAX_SCALE_LOG2`)."""
    seed_max = finite_scale_log2(1.0, dtype) if loss_held_low else MAX_SCALE_LOG2
    if low_term_grad_max_abs > 0:
        seed_max = min(seed_max, finite_scale_log2(low_term_grad_max_abs, dtype))
    return seed_max


def finite_scale_log2(max_abs: float, dtype: LowDtype, fp32_max_abs: float = 0.0) -> int:
    """The largest k at which every scaled gradient is finite: max_abs * 2^k rounds to a
    finite `dtype` value (below `overflow_threshold`), and fp32_max_abs * 2^k stays finite in
    fp32; at most MAX_SCALE_LOG2. Not clipped below: GradScaler backs off as far as it must."""
    k = MAX_SCALE_LOG2
    if max_abs > 0 and math.isfinite(max_abs):
        k = min(k, _largest_k(max_abs, overflow_threshold(dtype), strict=True))
    if fp32_max_abs > 0 and math.isfinite(fp32_max_abs):
        k = min(k, _largest_k(fp32_max_abs, FP32_MAX, strict=False))
    return k


def advise_from_histogram(
    counts_by_log2: Mapping[int, int],
    max_abs: float,
    dtype: LowDtype | str = LowDtype.FP16,
    *,
    unscaled_underflow_fraction: float | None = None,
    fp32_max_abs: float = 0.0,
    scale_log2: int | None = None,
    loss_held_low: bool = False,
    low_term_grad_max_abs: float = 0.0,
) -> LossScaleAdvice:
    """The advice from a log2-magnitude histogram of the gradients (`{floor(log2|g|): count}`)
    and their largest magnitude. `unscaled_underflow_fraction` overrides the histogram's
    fraction lost at scale 1 (bf16's flush point lies below the histogram's lowest bin);
    `fp32_max_abs` is the largest fp32 backward magnitude (see `LossScaleAdvice`);
    `scale_log2` advises that scale instead of the largest safe one (fp16 only);
    `loss_held_low`: the loss itself is a `dtype` value (CPU autocast's fp16 `mean`, pure
    fp16), so the scale reaches it as its gradient in `dtype`: 2^15 at most in fp16, with no
    headroom (that gradient is the scale itself at every step); `low_term_grad_max_abs`
    likewise for a loss term held in `dtype` (`Losses.low_term_grad_max_abs`)."""
    low = LowDtype(dtype)
    at_one = (
        unscaled_underflow_fraction
        if unscaled_underflow_fraction is not None
        else underflow_fraction(counts_by_log2, 0, low)
    )
    seed_max = seed_ceiling_log2(low, loss_held_low, low_term_grad_max_abs)
    finite = min(finite_scale_log2(max_abs, low, fp32_max_abs), seed_max)
    if max_abs <= 0:
        # No nonzero gradient runs low (no unit does, or its gradients are exactly 0): there is
        # nothing to scale, and nothing a scaler would skip a step for.
        return LossScaleAdvice(
            dtype=low,
            recommended_scale_log2=0,
            underflow_fraction_at_recommended=0.0,
            underflow_fraction_at_default=0.0,
            skipped_steps_from_default=0,
            default_scale_log2=DEFAULT_SCALE_LOG2,
            scaler_needed=False,
            max_grad_abs=max_abs,
            finite_scale_log2=finite,
            fp32_max_abs=fp32_max_abs,
        )
    if low is LowDtype.BF16:
        # bf16 has fp32's exponent range: what it flushes unscaled lies below 2^-133 (~9e-41),
        # which moves no weight under any optimizer (Adam's eps, >= ~1e-16, swamps it), so a
        # scaler is needed only against overflow. (It was asked for over a few fp32 subnormal
        # gradients, 2e-10 of the norm, while the exports said bf16 trains without one.)
        needed = max_abs > LIMITS[low].max_value
        k = safe_scale_log2(max_abs, low, fp32_max_abs=fp32_max_abs) if needed else 0
        k = min(k, DEFAULT_SCALE_LOG2, seed_max) if needed else 0
    else:
        k = (
            min(safe_scale_log2(max_abs, low, fp32_max_abs=fp32_max_abs), seed_max)
            if scale_log2 is None
            else scale_log2
        )
        needed = True if at_one > 0 or k != 0 else max_abs > LIMITS[low].max_value
    return LossScaleAdvice(
        dtype=low,
        recommended_scale_log2=k,
        underflow_fraction_at_recommended=at_one if k == 0 else underflow_fraction(counts_by_log2, k, low),
        underflow_fraction_at_default=underflow_fraction(counts_by_log2, DEFAULT_SCALE_LOG2, low),
        # GradScaler from 2^16: one skipped step per halving until the scaled gradients fit.
        skipped_steps_from_default=max(0, DEFAULT_SCALE_LOG2 - finite),
        default_scale_log2=DEFAULT_SCALE_LOG2,
        scaler_needed=needed,
        max_grad_abs=max_abs,
        finite_scale_log2=finite,
        fp32_max_abs=fp32_max_abs,
    )


@positional_deprecated("low_units", "dtype")
def recommend_loss_scale(
    report: Report,
    *,
    low_units: Mapping[str, bool] | None = None,
    dtype: LowDtype | str | None = None,
    scale_log2: int | None = None,
) -> LossScaleAdvice:
    """The initial loss scale for `report`'s model, over the backward values of the units
    that run low (all units but the loss when `low_units` is None); `scale_log2` advises that
    scale instead of the largest safe one (what it loses, what GradScaler skips from 2^16)."""
    low = LowDtype(dtype) if dtype is not None else report.environment.dtype
    if low is LowDtype.FP8:
        raise PrecisionDoctorError(
            "fp8 training needs no loss scale: it runs under bf16 autocast (bf16 has fp32's range) and torchao "
            "scales every fp8 cast itself; the loss-scale recommendation is for fp16"
        )
    counts: dict[int, int] = defaultdict(int)
    max_abs = 0.0
    nonzero = 0
    lost_unscaled = 0
    # What stays fp32 under the scale: the scaled loss and the parameters' gradients (fp32
    # tensors under AMP), and any unit's gradients (those of fp32 units are fp32).
    fp32_max_abs = max((abs(v) for v in (report.losses.fp32, report.losses.low) if math.isfinite(v)), default=0.0)
    for u in report.units:
        for p in u.backward.param_grads.values():
            fp32_max_abs = max(fp32_max_abs, p.max_abs)
        if u.backward.stats is not None:
            fp32_max_abs = max(fp32_max_abs, u.backward.stats.max_abs)
        if u.name in (LOSS_UNIT, UNATTRIBUTED_UNIT) or u.backward.stats is None:
            continue
        if low_units is not None and not low_units.get(u.name, False):
            continue
        s = u.backward.stats
        for i, c in enumerate(s.histogram.counts):
            if c:
                counts[s.histogram.log2_lo + i] += c
        max_abs = max(max_abs, s.max_abs)
        nonzero += sum(s.histogram.counts)
        tails = s.bf16 if low is LowDtype.BF16 else s.fp16
        lost_unscaled += tails.underflow_count
    return advise_from_histogram(
        counts,
        max_abs,
        low,
        unscaled_underflow_fraction=lost_unscaled / nonzero if nonzero else 0.0,
        fp32_max_abs=fp32_max_abs,
        scale_log2=scale_log2,
        # A plan keeps the loss fp32 (`plan.hard_fp32_reasons`); the all-low run may not.
        loss_held_low=low_units is None and report.losses.low_dtype == low.value,
        # A term the model reduces in its own forward stays low under a plan that runs its
        # unit low; kept whatever the plan (a bound that only lowers the scale).
        low_term_grad_max_abs=report.losses.low_term_grad_max_abs if low is LowDtype.FP16 else 0.0,
    )
