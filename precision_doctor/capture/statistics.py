"""Fixed-size tensor summaries: log2-magnitude histograms and what follows from them.

Every float32 tensor is summarized from its bit pattern: `bits & 0x7FFFFFFF` is |x| as an
int (monotone in |x|, NaN above Inf), and `>> 23` is its biased exponent, so one
`bincount` gives a 256-bin histogram of floor(log2|x|). Bin `i` holds |x| in
[2^(i-127), 2^(i-126)); bin 0 holds zeros and fp32 subnormals; bin 255 Inf and NaN.
Thresholds that are powers of two (fp16's 2^-24 and 2^-14) are read off the histogram
exactly; the others (65504, bf16's max and its subnormal 2^-133) get one exact compare, and
only when the bin they fall in is not empty.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from precision_doctor.capture import cpu_kernels
from precision_doctor.capture.readback import Held, Job, Parallel, Readback, run
from precision_doctor.errors import PrecisionDoctorInternalError
from precision_doctor.formats import BF16, FP16, FormatLimits, loss_scale_fractions

HIST_BINS = 256
EXP_BIAS = 127
_ABS_MASK = 0x7FFFFFFF
_INF_BITS = 0x7F800000
_FORMATS: tuple[FormatLimits, ...] = (FP16, BF16)


def bin_of(value: float) -> int:
    """The histogram bin holding a positive finite fp32 value."""
    return max(0, min(254, math.frexp(value)[1] - 1 + EXP_BIAS))


def _bits_to_float(bits: int) -> float:
    return float(np.array([bits], dtype=np.int32).view(np.float32)[0])


@dataclass
class TailCounts:
    """Counts of one tensor (or many) against one format's limits."""

    overflow: int = 0  # |x| > max, finite in fp32
    flushed: int = 0  # 0 < |x| < smallest subnormal: becomes 0
    subnormal: int = 0  # smallest subnormal <= |x| < smallest normal: loses precision

    def add(self, other: TailCounts) -> None:
        self.overflow += other.overflow
        self.flushed += other.flushed
        self.subnormal += other.subnormal


# Loss scales are 2^0 and up (to fp32's 2^127, GradScaler's largest), so only values below
# fp16's 2^-24 can ever be flushed (a scale 2^k flushes those below 2^(-24-k)): the per-bin
# sums of squares (for "what fraction of the L2 norm is lost") are kept for the bins below it
# alone, which are rarely populated, plus one total. That is exact for every k >= 0.
SUMSQ_BINS = 103  # bin_of(2^-24) == 103
# Tensors are summarized in chunks: the temporaries of a 38.6M-element embedding gradient
# would otherwise be fresh 150 MiB allocations, page-fault bound (~10x slower per element).
CHUNK_ELEMENTS = 1 << 20


@dataclass
class TensorSummary:
    """Mergeable summary of the values of one or more float32 tensors."""

    numel: int = 0
    zero_count: int = 0
    nan_count: int = 0
    inf_count: int = 0
    max_abs: float = 0.0  # over finite values
    min_nonzero_abs: float = math.inf
    hist: np.ndarray = field(default_factory=lambda: np.zeros(HIST_BINS, dtype=np.int64))
    # Gradients only: sum of x^2 per bin below 2^-24 (SUMSQ_BINS) and over all finite values.
    sumsq: np.ndarray | None = None
    sumsq_total: float = 0.0
    tails: dict[str, TailCounts] = field(default_factory=lambda: {f.name: TailCounts() for f in _FORMATS})
    # Positions holding mask values (capture/masks.py), counted as the zeros they stand for.
    masked_count: int = 0

    @property
    def nonzero_count(self) -> int:
        return self.numel - self.zero_count - self.nan_count - self.inf_count

    @property
    def nonfinite_count(self) -> int:
        return self.nan_count + self.inf_count

    def merge(self, other: TensorSummary) -> None:
        self.numel += other.numel
        self.zero_count += other.zero_count
        self.nan_count += other.nan_count
        self.inf_count += other.inf_count
        self.max_abs = max(self.max_abs, other.max_abs)
        self.min_nonzero_abs = min(self.min_nonzero_abs, other.min_nonzero_abs)
        self.masked_count += other.masked_count
        self.hist += other.hist
        if other.sumsq is not None:
            self.sumsq = other.sumsq.copy() if self.sumsq is None else self.sumsq + other.sumsq
            self.sumsq_total += other.sumsq_total
        for name, counts in other.tails.items():
            self.tails[name].add(counts)

    # --- scaled views (loss scaling) -------------------------------------------------------
    def scaled_lost_fractions(self, scale_log2: int, limits: FormatLimits = FP16) -> tuple[float, float, float]:
        """At loss scale 2^k: (fraction of nonzero values flushed, fraction overflowing,
        fraction of the L2 norm flushed). Resolution is one power of two: a value counts as
        overflowing when |x| * 2^k >= 2^ceil(log2(max)) (65536 for fp16)."""
        lost, over, norm = self.loss_scale_fractions([scale_log2], limits)
        return float(lost[0]), float(over[0]), float(norm[0])

    def loss_scale_fractions(
        self, scales_log2: Sequence[int], limits: FormatLimits = FP16
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`scaled_lost_fractions` for many scales at once, as three arrays: one cumulative
        sum of the histogram answers every scale (a report asks for 128 per unit, 2^0..2^127).
        The norm fraction needs k >= 0 (sums of squares exist below 2^-24 only). fp32
        subnormals are one bin (below 2^-126), all kept from 2^103 on."""
        if self.nonzero_count <= 0:
            zeros = np.zeros(len(scales_log2))
            return zeros, zeros.copy(), zeros.copy()
        hist = self.hist.astype(np.float64)
        hist[0] -= self.zero_count
        hist[255] = 0
        if (
            self.sumsq is not None
            and self.sumsq_total > 0
            and bin_of(limits.smallest_subnormal) - min(scales_log2) > SUMSQ_BINS
        ):
            raise PrecisionDoctorInternalError(f"norm fraction below scale 2^{min(scales_log2)} was not collected")
        return loss_scale_fractions(
            hist, -EXP_BIAS, scales_log2, limits, self.sumsq, self.sumsq_total, nonzero=self.nonzero_count
        )

    def fraction(self, count: int) -> float:
        nonzero = self.nonzero_count
        return count / nonzero if nonzero > 0 else 0.0


class Workspace:
    """Reused chunk-sized buffers for the summaries' temporaries. A fresh multi-MiB CPU
    tensor is a fresh mmap whose pages fault in on first touch: reusing three buffers makes
    a summary ~5x faster than allocating its temporaries (measured on a 786K-element
    activation: 0.75 ms against 3.5 ms). One per analysis; not shared between threads."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(
        self, slot: str, n: int, dtype: torch.dtype, device: torch.device, *, fill: int | None = None
    ) -> torch.Tensor:
        """`n` elements of the slot's buffer; with `fill`, filled with that value when it is
        allocated (a constant buffer: one slot per value)."""
        key = (slot, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            size = max(n, min(CHUNK_ELEMENTS, 1 << 16))
            buf = torch.empty(size, dtype=dtype, device=device)
            if fill is not None:
                buf.fill_(fill)
            self._buffers[key] = buf
        return buf[:n]

    def owns(self, t: torch.Tensor) -> bool:
        ptr = t.untyped_storage().data_ptr()
        return any(b.untyped_storage().data_ptr() == ptr for b in self._buffers.values())

    def release(self, prefix: str) -> None:
        """Drop the buffers whose slot starts with `prefix`."""
        for key in [k for k in self._buffers if k[0].startswith(prefix)]:
            del self._buffers[key]


def summarize(x: torch.Tensor, *, with_sumsq: bool = False, workspace: Workspace | None = None) -> TensorSummary:
    """Summarize one float32 tensor's values, chunk by chunk: a handful of integer kernels
    and up to three host reads (fewer for a tensor without zeros, Inf/NaN or extreme values)."""
    return run(summarize_job(x, with_sumsq=with_sumsq, workspace=workspace))


def summarize_job(
    x: torch.Tensor | Held, *, with_sumsq: bool = False, workspace: Workspace | None = None
) -> Job[TensorSummary]:
    """`summarize` as a job (capture/readback.py): its chunks are read side by side."""
    flat = _held(x).detach().reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if cpu_kernels.enabled(flat):
        return _from_raw(cpu_kernels.summary(flat, _FORMATS, SUMSQ_BINS, with_sumsq), flat.numel())
    ws = workspace or Workspace()
    parts = yield Parallel(
        [
            _chunk_job(flat[start : start + CHUNK_ELEMENTS], with_sumsq, ws)
            for start in range(0, flat.numel(), CHUNK_ELEMENTS)
        ]
    )
    summary = TensorSummary()
    for part in parts:
        summary.merge(part)
    if with_sumsq and summary.sumsq is None:  # an empty tensor
        summary.sumsq = np.zeros(SUMSQ_BINS)
    return summary


def _from_raw(raw: cpu_kernels.RawSummary, n: int) -> TensorSummary:
    """A summary from the compiled loops (`capture.cpu_kernels`)."""
    summary = TensorSummary(numel=n, hist=raw.hist, zero_count=raw.zero_count, nan_count=raw.nan_count)
    summary.inf_count = int(raw.hist[255]) - raw.nan_count
    summary.max_abs = _bits_to_float(raw.max_bits)
    if raw.min_nonzero_bits < _INF_BITS:
        summary.min_nonzero_abs = _bits_to_float(raw.min_nonzero_bits)
    for i, limits in enumerate(_FORMATS):
        summary.tails[limits.name] = TailCounts(
            overflow=raw.above_max[i],
            flushed=raw.below_subnormal[i],
            subnormal=raw.below_normal[i] - raw.below_subnormal[i],
        )
    if raw.sumsq is not None:
        summary.sumsq, summary.sumsq_total = raw.sumsq, raw.sumsq_total
    return summary


def _held(x: torch.Tensor | Held) -> torch.Tensor:
    return x.t if isinstance(x, Held) else x


def summarize_unmasked(x: torch.Tensor, masked: torch.Tensor, *, workspace: Workspace | None = None) -> TensorSummary:
    """`summarize(x)` with the positions `masked` says hold mask values (a bool tensor that
    broadcasts to `x`) counted as zeros - what a mask constant or a probability it zeroes
    stands for - and counted in `masked_count`. A NaN there is kept: no mask makes one.

    >>> s = summarize_unmasked(torch.tensor([-1e38, 2.0, 4e-44]), torch.tensor([True, False, True]))
    >>> (s.masked_count, s.zero_count, s.tails["fp16"].overflow, s.tails["fp16"].flushed)
    (2, 2, 0, 0)
    """
    return run(summarize_unmasked_job(x, masked, workspace=workspace))


def summarize_unmasked_job(
    x: torch.Tensor | Held, masked: torch.Tensor, *, workspace: Workspace | None = None
) -> Job[TensorSummary]:
    x = _held(x).detach()
    clear = masked
    if math.isnan((yield torch.sum(x, dtype=torch.float32))):  # a NaN (or infinities of both signs)
        clear = masked & ~torch.isnan(x)
    summary, count = yield Parallel(
        [summarize_job(x.masked_fill(clear, 0.0), workspace=workspace), true_count_job(clear, x.shape)]
    )
    summary.masked_count = count
    assert isinstance(summary, TensorSummary)
    return summary


def compact(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`t` without its broadcast (stride-0) dimensions, each kept once, and how many times
    each remaining value stands in `t`: reductions over an expanded mask read it once."""
    index = tuple(slice(0, 1) if st == 0 else slice(None) for st in t.stride())
    repeat = math.prod(n for n, st in zip(t.shape, t.stride(), strict=True) if st == 0)
    return t[index], repeat


def true_count_job(mask: torch.Tensor, shape: Sequence[int]) -> Job[int]:
    values, repeat = compact(mask.expand(tuple(shape)))
    return int((yield values.sum())) * repeat


# Below this many values a chunk's histogram is one serial bincount; above, one row per thread.
_PARALLEL_HIST_ELEMENTS = 1 << 16


def _histogram(bits: torch.Tensor, ws: Workspace) -> torch.Tensor:
    """Counts of the biased exponents `bits >> 23`, on the device. `bincount` is one serial
    loop on the CPU (~0.45 ms per 1M values, the largest cost of a summary); a `scatter_add_`
    into one histogram row per thread runs on torch's own thread pool and takes half that on
    2 cores."""
    n = bits.numel()
    rows = torch.get_num_threads()
    if bits.device.type != "cpu" or rows < 2 or n < _PARALLEL_HIST_ELEMENTS:
        exps = torch.bitwise_right_shift(bits, 23, out=ws.get("tmp", n, torch.int32, bits.device))
        return torch.bincount(exps, minlength=HIST_BINS)
    width = n // rows
    body = rows * width
    exps = torch.bitwise_right_shift(bits, 23, out=ws.get("exps", n, torch.int64, bits.device))
    ones = ws.get("ones", body, torch.int64, bits.device, fill=1)
    hist2d = torch.zeros(rows, HIST_BINS, dtype=torch.int64)
    hist2d.scatter_add_(1, exps[:body].view(rows, width), ones.view(rows, width))
    hist = hist2d.sum(0)
    if body < n:
        hist += torch.bincount(exps[body:], minlength=HIST_BINS)
    return hist


def _abs_bits(flat: torch.Tensor, ws: Workspace) -> torch.Tensor:
    """|x| as int32 bit patterns, in the workspace's `bits` slot."""
    n = flat.numel()
    return torch.bitwise_and(flat.view(torch.int32), _ABS_MASK, out=ws.get("bits", n, torch.int32, flat.device))


def _chunk_job(flat: torch.Tensor, with_sumsq: bool, ws: Workspace) -> Job[TensorSummary]:
    """One chunk's summary in up to three rounds of reads: the histogram with the largest
    and the smallest nonzero bit pattern; then, where Inf/NaN or fp32 subnormals are there,
    their counts; then the exact tail counts in the bins a threshold falls in and the sums of
    squares. Workspace buffers are refilled after each read: other jobs use them meanwhile."""
    n = flat.numel()
    bits = _abs_bits(flat, ws)
    # `(b - 1) & MASK` sends 0 to the top of the range and keeps the order of the rest, so one
    # min finds the smallest nonzero (Inf/NaN patterns stay above every finite one); it also
    # tells whether any subnormal is there (rare), so the zero count needs no extra pass.
    shifted = torch.sub(bits, 1, out=ws.get("tmp", n, torch.int32, flat.device)).bitwise_and_(_ABS_MASK)
    min_t = shifted.min()
    max_t = bits.max()
    hist_v, max_v, min_v = yield (_histogram(bits, ws), max_t, min_t)
    hist = np.array(hist_v, dtype=np.int64)
    summary = TensorSummary(numel=n, hist=hist)
    max_bits, min_nz = int(max_v), int(min_v) + 1
    subnormals = bool(hist[0]) and min_nz < 1 << 23
    if hist[255] or subnormals:
        bits = _abs_bits(flat, ws)
        asked: list[torch.Tensor] = []
        if hist[255]:
            asked += [(bits > _INF_BITS).sum(), bits.masked_fill(bits >= _INF_BITS, 0).max()]
        if subnormals:
            asked.append(((bits > 0) & (bits < 1 << 23)).sum())
        got = list((yield tuple(asked)))
        if hist[255]:
            summary.nan_count = int(got.pop(0))
            summary.inf_count = int(hist[255]) - summary.nan_count
            max_bits = int(got.pop(0))
        if subnormals:
            summary.zero_count = int(hist[0]) - int(got.pop(0))
    if hist[0] and not subnormals:
        summary.zero_count = int(hist[0])
    summary.max_abs = _bits_to_float(max_bits)
    if min_nz < _INF_BITS:
        summary.min_nonzero_abs = _bits_to_float(min_nz)

    jobs: list[Job[Any]] = [_tails_job(functools.cache(lambda: _abs_bits(flat, ws)), hist, summary)]
    if with_sumsq:
        jobs += [_sumsq_job(flat, hist, summary, ws), squared_norm_job(flat, finite_only=bool(hist[255]))]
    results = yield Parallel(jobs)
    summary.tails = results[0]
    if with_sumsq:
        summary.sumsq, summary.sumsq_total = results[1], results[2]
    return summary


def _sumsq_job(flat: torch.Tensor, hist: np.ndarray, summary: TensorSummary, ws: Workspace) -> Job[np.ndarray]:
    """Sums of x^2 per bin below 2^-24 (gradients)."""
    n = flat.numel()
    small_count = int(hist[:SUMSQ_BINS].sum()) - summary.zero_count
    if not small_count:
        return np.zeros(SUMSQ_BINS)
    bits = _abs_bits(flat, ws)
    padded = -(-n // 8) * 8
    mask = ws.get("mask", padded, torch.bool, flat.device)
    mask[n:].zero_()
    # nonzero and below 2^-24: `(b - 1) & MASK` sends zeros to the top, one compare drops them
    shifted = torch.sub(bits, 1, out=ws.get("tmp", n, torch.int32, flat.device)).bitwise_and_(_ABS_MASK)
    torch.lt(shifted, (SUMSQ_BINS << 23) - 1, out=mask[:n])
    values = flat.take(_true_indices(mask, small_count))
    bins = (values.view(torch.int32) & _ABS_MASK) >> 23
    sums = torch.zeros(SUMSQ_BINS, dtype=torch.float64, device=flat.device)
    return np.array((yield sums.index_add_(0, bins.long(), values.double().square())))


def _true_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` True entries of a bool mask whose length is a multiple of 8.
    Few of them (the usual case: a median 0.1% of a gradient lies below 2^-24) are found
    8 at a time, through the mask read as int64 words: ~4x faster than `nonzero`."""
    if count * 64 > mask.numel():
        return mask.nonzero().squeeze(1)
    words = mask.view(torch.int64).nonzero().squeeze(1)
    candidates = (words.unsqueeze(1) * 8 + torch.arange(8, device=mask.device)).reshape(-1)
    return candidates[mask[candidates]]


def _count_in_bin(
    bits: Callable[[], torch.Tensor], hist: np.ndarray, zero_count: int, threshold: float, *, above: bool
) -> tuple[int, torch.Tensor | None]:
    """Exact count of |x| > threshold (above) or 0 < |x| < threshold (below): the histogram
    for whole bins, plus (the device tensor returned beside) one compare for the bin the
    threshold falls in. `bits()` gives the bit patterns, made only where a compare is needed."""
    b = bin_of(threshold)
    thr_bits = int(np.array([threshold], dtype=np.float32).view(np.int32)[0])
    on_edge = thr_bits == b << 23  # a power of two: the histogram alone is exact
    if above:
        count = int(hist[b + 1 : 255].sum())
        if hist[b] and not (on_edge and b > 0):
            v = bits()
            return count, ((v > thr_bits) & (v < (b + 1) << 23)).sum()
        return count, None
    if b == 0:  # below fp32's normal range: only a compare can tell
        v = bits()
        return 0, ((v < thr_bits) & (v > 0)).sum()
    count = int(hist[1:b].sum()) + int(hist[0]) - zero_count
    if hist[b] and not on_edge:
        v = bits()
        return count, ((v < thr_bits) & (v >= b << 23)).sum()
    return count, None


def _tails_job(bits: Callable[[], torch.Tensor], hist: np.ndarray, s: TensorSummary) -> Job[dict[str, TailCounts]]:
    """Each format's tail counts: the histogram's, plus at most one read of the compares
    (`bits()`: the values' |x| bit patterns, called only where a compare is needed)."""
    counts: dict[str, list[tuple[int, torch.Tensor | None]]] = {}
    for limits in _FORMATS:
        parts: list[tuple[int, torch.Tensor | None]] = [(0, None)] * 3
        if s.max_abs > limits.max_value:
            parts[0] = _count_in_bin(bits, hist, s.zero_count, limits.max_value, above=True)
        if s.min_nonzero_abs < limits.smallest_normal:
            parts[1] = _count_in_bin(bits, hist, s.zero_count, limits.smallest_subnormal, above=False)
            parts[2] = _count_in_bin(bits, hist, s.zero_count, limits.smallest_normal, above=False)
        counts[limits.name] = parts
    asked = tuple(t for parts in counts.values() for _, t in parts if t is not None)
    got = iter((yield asked) if asked else ())
    tails = {}
    for name, parts in counts.items():
        overflow, flushed, below_normal = (c + (int(next(got)) if t is not None else 0) for c, t in parts)
        tails[name] = TailCounts(overflow=overflow, flushed=flushed, subnormal=below_normal - flushed)
    return tails


@dataclass
class ErrorAccumulator:
    """Relative L2 error of a low-precision shadow against the fp32 values, over many tensors."""

    sum_sq_ref: float = 0.0
    sum_sq_err: float = 0.0
    nonfinite_mismatch: int = 0  # shadow non-finite where fp32 is finite

    def add(
        self,
        ref: torch.Tensor,
        shadow: torch.Tensor,
        ref_norm_sq: float | None = None,
        workspace: Workspace | None = None,
        *,
        masked: torch.Tensor | None = None,
    ) -> float:
        """Add one tensor pair; returns that pair's own relative error (inf if non-finite).
        Pass `ref_norm_sq` when several shadows are compared with the same fp32 tensor;
        `masked` (a bool tensor broadcasting to `ref`) where `ref` holds mask values
        (capture/masks.py): those positions are left out wherever the shadow is no NaN -
        -1e38 turned into -inf in fp16 masks just as well, a probability meant to be zero is
        no error to charge - while a NaN there (a fully masked row in fp16) still counts."""
        return run(self.add_job(ref, shadow, ref_norm_sq, workspace, masked=masked))

    def add_job(
        self,
        ref: torch.Tensor | Held,
        shadow: torch.Tensor | Held,
        ref_norm_sq: float | None = None,
        workspace: Workspace | None = None,
        *,
        masked: torch.Tensor | None = None,
    ) -> Job[float]:
        """`add` as a job (capture/readback.py): two rounds of reads, one more with a mask, one
        more with Inf/NaN."""
        ref, shadow = _held(ref).detach(), _held(shadow).detach()
        if masked is not None and not (yield compact(masked)[0].any()):
            masked = None  # an empty mask (capture/masks.py keeps those): the plain comparison
        if masked is not None:
            keep = ~(masked.expand(ref.shape) & ~torch.isnan(shadow))
            ref, shadow, ref_norm_sq = ref[keep], shadow[keep], None
        if _fused_distance(ref, shadow):
            err_sq, own_ref_sq = _cpu_squared_distance(ref, shadow, workspace or Workspace())
            ref_norm_sq = own_ref_sq if ref_norm_sq is None else ref_norm_sq
        else:
            jobs: list[Job[float]] = [_squared_distance_job(ref, shadow, workspace or Workspace())]
            if ref_norm_sq is None:
                jobs.append(squared_norm_job(ref))
            sums = yield Parallel(jobs)
            err_sq = sums[0]
            if ref_norm_sq is None:
                ref_norm_sq = sums[1]
        if math.isfinite(err_sq) and math.isfinite(ref_norm_sq):
            own = rel_error(err_sq, ref_norm_sq)
        else:
            # Equal infinities (an attention mask's -inf in both) are no error; a non-finite
            # shadow where fp32 is finite is counted, and the rest compared as usual.
            ref_finite = torch.isfinite(ref)
            diff = shadow - ref
            diff = torch.where(shadow.to(ref.dtype) == ref, 0.0, diff)
            bad = ~torch.isfinite(diff)
            got = yield (
                (bad & ref_finite).sum(),
                torch.linalg.vector_norm(diff.masked_fill(bad, 0.0), dtype=torch.float64),
                torch.linalg.vector_norm(ref.masked_fill(~ref_finite, 0.0), dtype=torch.float64),
            )
            mismatch = int(got[0])
            self.nonfinite_mismatch += mismatch
            err_sq, ref_norm_sq = float(got[1]) ** 2, float(got[2]) ** 2
            own = math.inf if mismatch else rel_error(err_sq, ref_norm_sq)
        self.sum_sq_ref += ref_norm_sq
        self.sum_sq_err += err_sq
        return own

    def merge(self, other: ErrorAccumulator) -> None:
        self.sum_sq_ref += other.sum_sq_ref
        self.sum_sq_err += other.sum_sq_err
        self.nonfinite_mismatch += other.nonfinite_mismatch

    @property
    def rel_l2(self) -> float:
        if self.nonfinite_mismatch:
            return math.inf
        return rel_error(self.sum_sq_err, self.sum_sq_ref)

    @property
    def sqnr_db(self) -> float:
        """20 log10(||x|| / ||x - y||), as torch.ao.ns defines it; inf when exact."""
        if self.nonfinite_mismatch:
            return -math.inf
        if self.sum_sq_err == 0:
            return math.inf
        if self.sum_sq_ref == 0:
            return -math.inf
        return 10.0 * math.log10(self.sum_sq_ref / self.sum_sq_err)


def squared_norm(t: torch.Tensor) -> float:
    """||t||^2 as a Python float. An fp32 norm is ~5x faster than an fp64 one on the CPU
    and accurate to fp32's relative precision; fp64 only where fp32 would overflow or go
    below its normal range."""
    return run(squared_norm_job(t))


def squared_norm_job(t: torch.Tensor, *, finite_only: bool = False) -> Job[float]:
    """`squared_norm` as a job; `finite_only`: over the finite values alone. On the CPU a
    float64 sum of the compiled loops (the one `ErrorAccumulator.add` sums a reference in: a
    shadow that is all zeros is then exactly 100% off)."""
    if finite_only:
        t = t.masked_fill(~torch.isfinite(t), 0.0)
    if t.dtype == torch.float32 and cpu_kernels.enabled(t):
        flat = t.detach().reshape(-1).contiguous()
        return cpu_kernels.squared_distance(flat, flat)[1]
    n = float((yield torch.linalg.vector_norm(t)))
    if _fp32_norm_ok(n):
        return n * n
    return float((yield torch.linalg.vector_norm(t, dtype=torch.float64))) ** 2


def _fp32_norm_ok(n: float) -> bool:
    return math.isfinite(n) and 1e-10 < n < 1e18


def _squared_distance_job(ref: torch.Tensor, shadow: torch.Tensor, ws: Workspace) -> Job[float]:
    """||shadow - ref||^2, chunk by chunk into a reused buffer (see Workspace): every
    chunk's fp32 norm in one read, fp64 ones (a second read) only where fp32's is out of range."""
    if ref.dtype != torch.float32 or ref.shape != shadow.shape or not (ref.is_contiguous() and shadow.is_contiguous()):
        return (yield from squared_norm_job(shadow - ref))
    r, sh = ref.reshape(-1), shadow.reshape(-1)
    starts = range(0, r.numel(), CHUNK_ELEMENTS)

    def diff(start: int) -> torch.Tensor:
        rc, sc = r[start : start + CHUNK_ELEMENTS], sh[start : start + CHUNK_ELEMENTS]
        # Upcast into the buffer, then subtract in place: a mixed-dtype `sub(out=)` would
        # upcast into a hidden temporary first (~4x slower on a 1M chunk).
        return ws.get("diff", rc.numel(), torch.float32, rc.device).copy_(sc).sub_(rc)

    norms = yield tuple(torch.linalg.vector_norm(diff(start)) for start in starts)
    redo = [start for start, n in zip(starts, norms, strict=True) if not _fp32_norm_ok(n)]
    exact = dict(
        zip(
            redo,
            (yield tuple(torch.linalg.vector_norm(diff(start), dtype=torch.float64) for start in redo)) if redo else (),
            strict=True,
        )
    )
    total = 0.0
    for start, n in zip(starts, norms, strict=True):
        total += n * n if start not in exact else exact[start] ** 2
    return total


def _fused_distance(ref: torch.Tensor, shadow: torch.Tensor) -> bool:
    """Whether `_cpu_squared_distance` takes this pair: contiguous CPU tensors of one shape, an
    fp32 reference and a float shadow."""
    return (
        ref.dtype == torch.float32
        and shadow.is_floating_point()
        and shadow.element_size() <= 4
        and ref.shape == shadow.shape
        and ref.is_contiguous()
        and shadow.is_contiguous()
        and shadow.device.type == "cpu"
        and cpu_kernels.enabled(ref)
    )


def compiled_squared_sums(ref: torch.Tensor, other: torch.Tensor) -> tuple[float, float, float] | None:
    """(||other - ref||^2, ||ref||^2, ||other||^2) of two fp32 tensors in one pass of the
    compiled loops (`cpu_kernels.squared_distances`); None where the pair does not take them."""
    if other.dtype != torch.float32 or not _fused_distance(ref, other):
        return None
    return cpu_kernels.squared_distances(ref.detach().reshape(-1), other.detach().reshape(-1))


def _cpu_squared_distance(ref: torch.Tensor, shadow: torch.Tensor, ws: Workspace) -> tuple[float, float]:
    """(||shadow - ref||^2, ||ref||^2) through the compiled loops (`capture.cpu_kernels`); a
    low-precision shadow upcast chunk by chunk into a reused buffer first."""
    r, sh = ref.detach().reshape(-1), shadow.detach().reshape(-1)
    if sh.dtype == torch.float32:
        return cpu_kernels.squared_distance(r, sh)
    err = total = 0.0
    for start in range(0, r.numel(), CHUNK_ELEMENTS):
        rc, sc = r[start : start + CHUNK_ELEMENTS], sh[start : start + CHUNK_ELEMENTS]
        e, t = cpu_kernels.squared_distance(rc, ws.get("diff", rc.numel(), torch.float32, rc.device).copy_(sc))
        err += e
        total += t
    return err, total


def rel_error(sum_sq_err: float, sum_sq_ref: float) -> float:
    if sum_sq_err == 0:
        return 0.0
    if sum_sq_ref == 0:
        return math.inf
    return math.sqrt(sum_sq_err / sum_sq_ref)


# --- batches of small tensors ----------------------------------------------------------------

# Gradients up to this many values are summarized in batches. On its own a gradient summary
# is ~25 torch calls (the values below 2^-24 gathered, binned and squared, a norm): 7.2 ms
# for the demo model's 66 gradients (16K values or fewer), ~110 us each. In a batch the bit-level work and the gather run once over one
# buffer and a tensor costs 3-4 reductions of its slice: the demo model's backward went from
# ~15 to ~13 ms. Forward outputs (no sums of squares) measured no gain - their summaries are
# bound by passes over the values, which the batch's copy only adds to - so they are
# summarized one by one.
BATCH_TENSOR_ELEMENTS = 1 << 16


def _bounds(lengths: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for n in lengths:
        out.append((start, start + n))
        start += n
    return out


class SummaryBatch:
    """Summaries of float32 tensors: a large one is summarized at once, small ones together
    by `compute()`. `add` returns the tensor's `TensorSummary`, which for a small tensor holds
    its values only after `compute()`: until then the batch keeps a reference to the tensor,
    so do not change it in place meanwhile (`reads` tells whether it waits on some memory).
    With a `readback`, summaries are filled in when it is flushed (the tensors it holds are
    protected from writes there), not at `add` or `compute`.

    >>> batch = SummaryBatch(Workspace())
    >>> s = batch.add(torch.tensor([0.0, 1e5, 2.0**-30]))
    >>> batch.compute(); (s.zero_count, s.tails["fp16"].overflow, s.tails["fp16"].flushed)
    (1, 1, 1)
    """

    def __init__(self, workspace: Workspace, *, with_sumsq: bool = False, readback: Readback | None = None) -> None:
        self._ws = workspace
        self.with_sumsq = with_sumsq
        self._readback = readback
        self._items: list[tuple[torch.Tensor, TensorSummary]] = []
        self._storages: set[int] = set()  # memory the waiting tensors read
        self.pending_elements = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, t: torch.Tensor) -> TensorSummary:
        # The compiled loops take a small tensor as cheaply alone: batching buys them nothing.
        if t.numel() > BATCH_TENSOR_ELEMENTS or cpu_kernels.enabled(t):
            if self._readback is None:
                return summarize(t, with_sumsq=self.with_sumsq, workspace=self._ws)
            target = TensorSummary()
            job = summarize_job(self._readback.hold(t), with_sumsq=self.with_sumsq, workspace=self._ws)
            self._readback.submit(_fill(target, job))
            return target
        target = TensorSummary()
        self._items.append((t.detach(), target))
        self._storages.add(t.untyped_storage().data_ptr())
        self.pending_elements += t.numel()
        return target

    def reads(self, t: torch.Tensor) -> bool:
        """Whether a waiting tensor shares `t`'s memory."""
        return bool(self._storages) and t.untyped_storage().data_ptr() in self._storages

    def compute(self) -> None:
        items, self._items, self.pending_elements = self._items, [], 0
        self._storages.clear()
        if not items:
            return
        if self._readback is None:
            run(self._compute_job([(t, target) for t, target in items]))
        else:
            self._readback.submit(self._compute_job([(self._readback.hold(t), target) for t, target in items]))

    def _compute_job(self, items: list[tuple[torch.Tensor | Held, TensorSummary]]) -> Job[None]:
        """The batch's summaries: the bit-level work over one concatenated buffer of its own
        (other jobs run between its reads), then per tensor what its values call for."""
        tensors = [_held(t) for t, _ in items]
        bounds = _bounds([t.numel() for t in tensors])
        flat = torch.cat([t.reshape(-1) for t in tensors])
        bits = torch.bitwise_and(flat.view(torch.int32), _ABS_MASK)
        exps = torch.bitwise_right_shift(bits, 23)
        hists_t = torch.stack([torch.bincount(exps[a:b], minlength=HIST_BINS) for a, b in bounds])
        # `(b - 1) & MASK` sends zeros to the top and keeps the order of the rest: its
        # minimum + 1 is the smallest nonzero (as in _chunk_job).
        shifted = torch.sub(bits, 1).bitwise_and_(_ABS_MASK)
        asked = [
            hists_t,
            torch.stack([bits[a:b].max() for a, b in bounds]),
            torch.stack([shifted[a:b].min() for a, b in bounds]),
        ]
        if self.with_sumsq:
            asked.append(torch.stack([torch.linalg.vector_norm(flat[a:b]) for a, b in bounds]))
        got = yield tuple(asked)
        hists = np.array(got[0], dtype=np.int64).reshape(len(bounds), HIST_BINS)
        max_bits = [int(v) for v in got[1]]
        min_nz = [int(v) + 1 for v in got[2]]
        jobs: list[Job[Any]] = []
        if self.with_sumsq:
            jobs.append(self._sums_of_squares_job(flat, shifted, hists, bounds, got[3]))
        for i, ((a, b), (_, target)) in enumerate(zip(bounds, items, strict=True)):
            jobs.append(self._item_job(flat[a:b], bits[a:b], hists[i].copy(), max_bits[i], min_nz[i], target))
        results = yield Parallel(jobs)
        if self.with_sumsq:
            per_bin, totals = results[0]
            for i, (_, target) in enumerate(items):
                if not hists[i][255]:
                    target.sumsq, target.sumsq_total = per_bin[i], totals[i]

    def _item_job(
        self,
        values: torch.Tensor,
        bits: torch.Tensor,
        hist: np.ndarray,
        max_bits: int,
        min_nz: int,
        target: TensorSummary,
    ) -> Job[None]:
        """One small tensor's summary from the batch's histogram and extremes (`bits`: its
        slice of the batch's own bit patterns)."""
        if hist[255]:  # an Inf or NaN: the single-tensor path over its slice (rare)
            vars(target).update(vars((yield from _chunk_job(values, self.with_sumsq, self._ws))))
            return
        target.numel, target.hist = values.numel(), hist
        target.max_abs = _bits_to_float(max_bits)
        target.zero_count = int(hist[0])
        if min_nz < 1 << 23:  # fp32 subnormals share bin 0 with the zeros (rare)
            target.zero_count -= int((yield ((bits > 0) & (bits < 1 << 23)).sum()))
        if min_nz < _INF_BITS:
            target.min_nonzero_abs = _bits_to_float(min_nz)
        target.tails = yield from _tails_job(lambda: bits, hist, target)

    def _sums_of_squares_job(
        self,
        flat: torch.Tensor,
        shifted: torch.Tensor,
        hists: np.ndarray,
        bounds: list[tuple[int, int]],
        norms: list[float],
    ) -> Job[tuple[np.ndarray, list[float]]]:
        """Per tensor: sums of x^2 in the bins below 2^-24, and over all values (segments
        with an Inf or NaN are redone by the single-tensor path)."""
        redo = [i for i, n in enumerate(norms) if not _fp32_norm_ok(n)]
        # fp32 norms are exact enough in fp32's normal range; elsewhere redo in fp64
        exact = dict(
            zip(
                redo, (yield Parallel([squared_norm_job(flat[a:b]) for a, b in (bounds[i] for i in redo)])), strict=True
            )
        )
        totals = [exact[i] if i in exact else n * n for i, n in enumerate(norms)]
        per_bin = np.zeros((len(bounds), SUMSQ_BINS))
        zero_counts = hists[:, 0]
        if (hists[:, :SUMSQ_BINS].sum(1) - zero_counts).any():
            n = flat.numel()
            padded = -(-n // 8) * 8
            mask = torch.zeros(padded, dtype=torch.bool, device=flat.device)
            torch.lt(shifted, (SUMSQ_BINS << 23) - 1, out=mask[:n])  # nonzero and below 2^-24
            small = int((yield mask.sum()))
            idx = _true_indices(mask, small)
            values = flat.take(idx)
            starts = torch.tensor([a for a, _ in bounds], device=flat.device)
            segment = torch.searchsorted(starts, idx, right=True) - 1
            key = segment * SUMSQ_BINS + ((values.view(torch.int32) & _ABS_MASK) >> 23)
            sums = torch.zeros(len(bounds) * SUMSQ_BINS, dtype=torch.float64, device=flat.device)
            summed = yield sums.index_add_(0, key, values.double().square())
            per_bin = np.array(summed).reshape(len(bounds), SUMSQ_BINS)
        return per_bin, totals


def _fill(target: TensorSummary, job: Job[TensorSummary]) -> Job[None]:
    vars(target).update(vars((yield from job)))


def relative_loss_error(ref: float, low: float) -> float:
    if not math.isfinite(low):
        return math.inf
    if ref == 0:
        return abs(low)
    return abs(low - ref) / abs(ref)
