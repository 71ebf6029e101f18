"""Number-format limits, derived from `torch.finfo`, and the rounding that emulates them; times
and sizes for people, in the unit that fits (`format_seconds`, `format_bytes`).

Emulation follows what tensor cores do: low-precision inputs, fp32 accumulate, a
low-precision output. On the CPU that is `x.to(low).float()` around fp32 kernels, which is
~30x faster than CPU fp16 kernels and rounds the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from precision_doctor.options import LowDtype

TORCH_DTYPES: dict[LowDtype, torch.dtype] = {
    LowDtype.FP16: torch.float16,
    LowDtype.BF16: torch.bfloat16,
    LowDtype.FP8: torch.bfloat16,  # fp8's run: every op but the Float8Linear casts under bf16 autocast
}
_SPELLING = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def dtype_spelling(name: str) -> str:
    """The report's spelling of a torch dtype name (`float16` -> `fp16`); other dtypes
    (`int64`, `bool`) keep torch's name."""
    return _SPELLING.get(name, name)


@dataclass(frozen=True)
class FormatLimits:
    """The representable range of a floating-point format."""

    name: str
    max_value: float
    smallest_normal: float
    smallest_subnormal: float
    eps: float

    @property
    def max_log2(self) -> float:
        return math.log2(self.max_value)

    @classmethod
    def of(cls, dtype: torch.dtype, name: str) -> FormatLimits:
        info = torch.finfo(dtype)
        # finfo has no smallest subnormal; for IEEE-like formats it is tiny * eps.
        return cls(
            name=name,
            max_value=float(info.max),
            smallest_normal=float(info.smallest_normal),
            smallest_subnormal=float(info.smallest_normal) * float(info.eps),
            eps=float(info.eps),
        )


FP16 = FormatLimits.of(torch.float16, "fp16")
BF16 = FormatLimits.of(torch.bfloat16, "bf16")
E4M3 = FormatLimits.of(torch.float8_e4m3fn, "e4m3")
E5M2 = FormatLimits.of(torch.float8_e5m2, "e5m2")
LIMITS: dict[LowDtype, FormatLimits] = {LowDtype.FP16: FP16, LowDtype.BF16: BF16, LowDtype.FP8: BF16}
"""The range the values a run holds low must fit (fp8: the bf16 values around the fp8 casts;
the casts' own ranges are `E4M3`/`E5M2`, judged per cast by `analysis.fp8`)."""


def loss_scale_fractions(
    counts: Sequence[float] | np.ndarray,
    log2_lo: int,
    scales_log2: Sequence[int] | range,
    limits: FormatLimits,
    sum_squares: Sequence[float] | np.ndarray | None = None,
    sum_squares_total: float | None = None,
    nonzero: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At each loss scale 2^k, from a histogram of floor(log2|g|) of the nonzero finite
    gradients (`counts[i]`: |g| in [2^(log2_lo+i), 2^(log2_lo+i+1))): the fraction of them
    that flush to zero in `limits`' format, the fraction that overflow, and the fraction of
    the L2 norm flushed, as three arrays. One power of two is the resolution: a value flushes
    when |g| * 2^k < the smallest subnormal's power, overflows when |g| * 2^k >= 2^ceil(log2
    max) (65536 for fp16); fractions are of `nonzero` (default: the histogram's total). The norm needs `sum_squares` (per bin, from `log2_lo`); bins past
    its end count 4^bin per value, a lower bound. One cumulative sum answers every scale: the
    summaries ask for 128 per unit. The one place this arithmetic lives: the capture's
    summaries and the saved report's statistics both call it.

    >>> lost, over, norm = loss_scale_fractions([1, 1], -25, [0, 1, 40], FP16)
    >>> lost.tolist(), over.tolist()
    ([0.5, 0.0, 0.0], [0.0, 0.0, 0.5])
    """
    k = np.asarray(scales_log2, dtype=np.int64)
    hist = np.asarray(counts, dtype=np.float64)
    zeros = np.zeros(len(k))
    nonzero = float(hist.sum()) if nonzero is None else nonzero
    if nonzero <= 0:
        return zeros, zeros.copy(), zeros.copy()
    below = np.concatenate(([0.0], np.cumsum(hist)))  # below[i]: values in bins < i
    top = len(hist)
    flush_log2 = math.frexp(limits.smallest_subnormal)[1] - 1
    lo = np.clip(flush_log2 - k - log2_lo, 0, top)  # bins below lo flush
    hi = np.clip(math.ceil(limits.max_log2) - k - log2_lo, 0, top)  # bins from hi overflow
    lost = below[lo] / nonzero
    over = (below[-1] - below[hi]) / nonzero
    norm = zeros
    if sum_squares is not None and sum_squares_total:
        sq = np.asarray(sum_squares, dtype=np.float64)
        bins = np.arange(top)
        fallback = hist * np.exp2(2.0 * (bins + log2_lo))
        per_bin = np.where(bins < len(sq), np.pad(sq, (0, max(0, top - len(sq))))[:top], fallback)
        sq_below = np.concatenate(([0.0], np.cumsum(per_bin)))
        norm = np.sqrt(np.minimum(1.0, sq_below[lo] / sum_squares_total))
    return lost, over, norm


# --- numbers for people: times and sizes in the unit that fits ----------------------------------

_TIME_UNITS = (("ns", 1e-9), ("µs", 1e-6), ("ms", 1e-3), ("s", 1.0))
_BYTE_UNITS = tuple((u, 1024.0**i) for i, u in enumerate(("B", "KiB", "MiB", "GiB", "TiB", "PiB")))


def _scaled(value: float, units: tuple[tuple[str, float], ...], sign: bool, zero: str) -> str:
    """`value` (in the first unit's base: seconds, bytes) in the largest of `units` (name,
    factor; ascending) it reaches, 3 significant digits."""
    plus = "+" if sign else ""
    if not math.isfinite(value):
        return f"{value:{plus}} {units[-1][0]}"
    if value == 0:
        return f"0 {zero}"
    i = max((k for k, (_, factor) in enumerate(units) if factor <= abs(value)), default=0)
    text = f"{value / units[i][1]:{plus}.3g}"
    if abs(float(text)) >= 1000 and i + 1 < len(units):  # rounded up to the next unit: 999.96 µs is 1 ms
        i += 1
        text = f"{value / units[i][1]:{plus}.3g}"
    if "e" in text:  # past the largest unit's 3 digits: whole units, no exponent
        text = f"{value / units[i][1]:{plus},.0f}"
    return f"{text} {units[i][0]}"


def _unit(value: float, units: tuple[tuple[str, float], ...]) -> tuple[str, float]:
    text = _scaled(value, units, False, units[0][0]) if math.isfinite(value) and value else f"0 {units[0][0]}"
    name = text.rsplit(" ", 1)[1]
    return name, dict(units)[name]


def seconds_unit(seconds: float) -> tuple[str, float]:
    """The unit `format_seconds` shows `seconds` in, and its size in seconds (an axis's unit,
    from its largest value).

    >>> seconds_unit(0.0042), seconds_unit(0.0)
    (('ms', 0.001), ('ns', 1e-09))
    """
    return _unit(seconds, _TIME_UNITS)


def bytes_unit(n: float) -> tuple[str, float]:
    """The unit `format_bytes` shows `n` in, and its size in bytes.

    >>> bytes_unit(3 * 2**20)
    ('MiB', 1048576.0)
    """
    return _unit(n, _BYTE_UNITS)


def format_seconds(seconds: float, *, sign: bool = False) -> str:
    """A duration with 3 significant digits in the unit that fits: ns, µs, ms or s (`sign`:
    with a leading + on positive values, for differences).

    >>> format_seconds(3e-7), format_seconds(0.0003), format_seconds(2.5), format_seconds(36.04)
    ('300 ns', '300 µs', '2.5 s', '36 s')
    >>> format_seconds(0.00099996), format_seconds(-2.4e-5, sign=True), format_seconds(1.5e-6, sign=True)
    ('1 ms', '-24 µs', '+1.5 µs')
    """
    return _scaled(seconds, _TIME_UNITS, sign, "s")


def format_bytes(n: float) -> str:
    """A size with 3 significant digits in the binary unit that fits (B, KiB, MiB, GiB, ...).

    >>> format_bytes(512), format_bytes(1536), format_bytes(3 * 2**20), format_bytes(1023.9 * 2**20)
    ('512 B', '1.5 KiB', '3 MiB', '1 GiB')
    >>> format_bytes(0), format_bytes(1023)
    ('0 B', '0.999 KiB')
    """
    return _scaled(n, _BYTE_UNITS, False, "B")


MAX_LOSS_SCALE_LOG2 = 127
"""fp32's largest power of two: the largest loss scale GradScaler holds (its scale is an fp32
tensor, grown only while the product is finite). The report's loss-scale curves, the
recommendation and the gradient flags' severities all cover 2^0..2^127."""
