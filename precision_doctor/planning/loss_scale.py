"""The initial loss scale for fp16 training, read off the gradient magnitude histograms.

Backward is linear in the loss, so scaling the loss by S = 2^k scales every backward value
(the gradients and every intermediate of the backward pass) by S. The largest safe k keeps
the largest backward magnitude times S, times a headroom for early-training growth, at or
below fp16's max (65504). That is the published heuristic (Fast-LLM: scale * max|grad| *
headroom < fp16 max); the histograms also give, exactly per power of two, the fraction of
nonzero gradients that flush to zero (below 2^-24) at any scale.

Only the gradients of units that run low count: the loss, `<backward>` leftovers and fp32
units keep fp32 gradients under AMP. GradScaler halves its scale on every step it skips
(backoff 0.5), so starting at 2^16 above a safe 2^k costs 16 - k skipped steps.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping

from precision_doctor.capture.units import LOSS_UNIT, UNATTRIBUTED_UNIT
from precision_doctor.extras import LossScaleSection
from precision_doctor.formats import LIMITS
from precision_doctor.options import LowDtype
from precision_doctor.report import Report

HEADROOM_LOG2 = 2
"""Gradients often grow several-fold in the first steps; 4x headroom keeps those steps."""
DEFAULT_SCALE_LOG2 = 16
"""torch.amp.GradScaler's init_scale, 2^16."""
MAX_SCALE_LOG2 = 32
"""DeepSpeed's usual ceiling (initial_scale_power 32); fractions above 2^24 come from the
histograms, not from the report's loss-scale curve (which stops at 2^24)."""
MIN_SCALE_LOG2 = -16
BACKOFF_FACTOR = 0.5
# Smallest fp16 subnormal is 2^-24: a bin b (|g| in [2^b, 2^(b+1))) flushes at scale 2^k
# when b + k < -24 (the statistics count |g| < smallest subnormal as flushed).
_FLUSH_LOG2 = {LowDtype.FP16: -24, LowDtype.BF16: -133}


class LossScaleAdvice(LossScaleSection):
    """The recommendation (the report's `loss_scale` section, `to_extras()`) and what it was
    read off."""

    dtype: LowDtype
    max_grad_abs: float
    headroom_log2: int = HEADROOM_LOG2

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


def safe_scale_log2(max_abs: float, dtype: LowDtype, headroom_log2: int = HEADROOM_LOG2) -> int:
    """Largest k with max_abs * 2^k * 2^headroom <= the dtype's max, clipped to the range."""
    if max_abs <= 0 or not math.isfinite(max_abs):
        return MAX_SCALE_LOG2
    k = math.floor(math.log2(LIMITS[dtype].max_value / max_abs)) - headroom_log2
    while k > MIN_SCALE_LOG2 and max_abs * 2.0 ** (k + headroom_log2) > LIMITS[dtype].max_value:
        k -= 1  # log2 rounding at exact powers of two
    return max(MIN_SCALE_LOG2, min(MAX_SCALE_LOG2, k))


def advise_from_histogram(
    counts_by_log2: Mapping[int, int],
    max_abs: float,
    dtype: LowDtype | str = LowDtype.FP16,
    *,
    unscaled_underflow_fraction: float | None = None,
) -> LossScaleAdvice:
    """The advice from a log2-magnitude histogram of the gradients (`{floor(log2|g|): count}`)
    and their largest magnitude. `unscaled_underflow_fraction` overrides the histogram's
    fraction lost at scale 1 (bf16's flush point lies below the histogram's lowest bin)."""
    low = LowDtype(dtype)
    at_one = (
        unscaled_underflow_fraction
        if unscaled_underflow_fraction is not None
        else underflow_fraction(counts_by_log2, 0, low)
    )
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
        )
    if low is LowDtype.BF16:
        # bf16 has fp32's exponent range: scaling only helps when something is lost unscaled.
        needed = at_one > 0 or max_abs > LIMITS[low].max_value
        k = safe_scale_log2(max_abs, low) if needed else 0
        k = min(k, DEFAULT_SCALE_LOG2) if needed else 0
    else:
        k = safe_scale_log2(max_abs, low)
        needed = True if at_one > 0 or k != 0 else max_abs > LIMITS[low].max_value
    return LossScaleAdvice(
        dtype=low,
        recommended_scale_log2=k,
        underflow_fraction_at_recommended=at_one if k == 0 else underflow_fraction(counts_by_log2, k, low),
        underflow_fraction_at_default=underflow_fraction(counts_by_log2, DEFAULT_SCALE_LOG2, low),
        skipped_steps_from_default=max(0, DEFAULT_SCALE_LOG2 - k),
        default_scale_log2=DEFAULT_SCALE_LOG2,
        scaler_needed=needed,
        max_grad_abs=max_abs,
    )


def recommend_loss_scale(
    report: Report,
    low_units: Mapping[str, bool] | None = None,
    dtype: LowDtype | str | None = None,
) -> LossScaleAdvice:
    """The initial loss scale for `report`'s model, over the backward values of the units
    that run low (all units but the loss when `low_units` is None)."""
    low = LowDtype(dtype) if dtype is not None else report.environment.dtype
    counts: dict[int, int] = defaultdict(int)
    max_abs = 0.0
    nonzero = 0
    lost_unscaled = 0
    for u in report.units:
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
        counts, max_abs, low, unscaled_underflow_fraction=lost_unscaled / nonzero if nonzero else 0.0
    )
