"""The compiled loops behind `capture.cpu_kernels` (imported by it, lazily: numba's import and
its first compile cost ~0.5 s and ~3 s, paid only where a CPU summary runs; the compiled code
is cached on disk, `cache=True`).

`summary_blocks` reads a float32 tensor's bit patterns per block of `block` values (two
passes, the second from cache): the 256-bin histogram of biased exponents, the counts and
extremes a `TensorSummary` holds, each format's tail counts against its thresholds, and
(gradients) the sums of x^2 per bin and over all finite values. Per block, in fixed blocks:
the float sums are the same whatever the thread count.
"""

from __future__ import annotations

import numba as nb
import numpy as np

INF_BITS = 0x7F800000
ABS_MASK = 0x7FFFFFFF
N_FORMATS = 2
# cnt columns: zeros, NaNs, largest finite bits, smallest nonzero finite bits, then per format
# (N_FORMATS each): above its max (finite), below its smallest subnormal, below its smallest
# normal (nonzero).
COUNT_COLUMNS = 4 + 3 * N_FORMATS


@nb.njit(cache=True, nogil=True, boundscheck=False)
def _count_below(v, lo, hi):  # type: ignore[no-untyped-def]
    """How many |x| bit patterns lie in [lo, hi)."""
    c = 0
    for i in range(v.shape[0]):
        b = v[i] & ABS_MASK
        c += (b >= lo) & (b < hi)
    return c


@nb.njit(cache=True, nogil=True, boundscheck=False)
def _below(v, hist, subnormals, t):  # type: ignore[no-untyped-def]
    """Nonzero finite |x| below the bit pattern `t`: whole bins from the histogram, a pass over
    the values only for the bin `t` falls inside (rare: a threshold's own binade)."""
    j = t >> 23
    if j == 0:
        return _count_below(v, 1, t) if subnormals else 0
    c = subnormals
    for i in range(1, j):
        c += hist[i]
    if t & 0x7FFFFF and hist[j]:
        c += _count_below(v, j << 23, t)
    return c


@nb.njit(cache=True, nogil=True, boundscheck=False)
def _above(v, hist, t):  # type: ignore[no-untyped-def]
    """Finite |x| above the bit pattern `t`, as `_below` counts."""
    j = t >> 23
    c = 0
    for i in range(j + 1, 255):
        c += hist[i]
    if hist[j]:
        c += _count_below(v, t + 1, (j + 1) << 23)
    return c


@nb.njit(cache=True, nogil=True, boundscheck=False)
def _block(v, f, maxes, subs, norms, with_sumsq, hist, cnt, sums):  # type: ignore[no-untyped-def]
    # Two passes over the block (in cache by the second), each one LLVM compiles to a short
    # loop: the histogram (gradients: with each bin's sum of x^2), then the extremes. The
    # counts come from the histogram; only Inf/NaN, fp32 subnormals and a threshold's own bin
    # take a pass of their own. One pass that also branched on each value's range ran ~2x
    # slower, ~4x on gradients below fp16's range (`docs/benchmarks.md`).
    # Four sub-histograms: consecutive values in the same bin would otherwise wait on each
    # other's increment (a store-to-load chain).
    h = np.zeros((4, 256), np.int64)
    if with_sumsq:
        s = np.zeros((4, 256), np.float64)
        for i in range(v.shape[0]):
            j = (v[i] >> 23) & 0xFF
            x = np.float64(f[i])
            h[i & 3, j] += 1
            s[i & 3, j] += x * x
        for j in range(256):
            sums[j] = s[0, j] + s[1, j] + s[2, j] + s[3, j]
    else:
        for i in range(v.shape[0]):
            h[i & 3, (v[i] >> 23) & 0xFF] += 1
    for j in range(256):
        hist[j] = h[0, j] + h[1, j] + h[2, j] + h[3, j]
    # `(b - 1) & ABS_MASK` sends 0 to the top and keeps the order of the rest: one min finds
    # the smallest nonzero pattern (Inf/NaN ones sort above every finite one).
    mx = 0
    mn = ABS_MASK
    for i in range(v.shape[0]):
        b = v[i] & ABS_MASK
        mx = max(mx, b)
        mn = min(mn, (b - 1) & ABS_MASK)
    mn = min(mn + 1, INF_BITS)
    nan = 0
    if hist[255]:
        mx = 0
        for i in range(v.shape[0]):
            b = v[i] & ABS_MASK
            if b < INF_BITS:
                mx = max(mx, b)
            elif b > INF_BITS:
                nan += 1
    subnormals = _count_below(v, 1, 1 << 23) if hist[0] and mn < 1 << 23 else 0
    cnt[0] = hist[0] - subnormals
    cnt[1] = nan
    cnt[2] = mx
    cnt[3] = mn
    for k in range(N_FORMATS):
        cnt[4 + k] = _above(v, hist, maxes[k]) if mx > maxes[k] else 0
        cnt[4 + N_FORMATS + k] = _below(v, hist, subnormals, subs[k]) if mn < subs[k] else 0
        cnt[4 + 2 * N_FORMATS + k] = _below(v, hist, subnormals, norms[k]) if mn < norms[k] else 0
    tot = 0.0
    if with_sumsq:
        for j in range(255):  # the finite values'
            tot += sums[j]
    return tot


@nb.njit(cache=True, nogil=True, boundscheck=False)
def _summary_parts(n, block):  # type: ignore[no-untyped-def]
    nblocks = max(1, (n + block - 1) // block)
    return (
        np.zeros((nblocks, 256), np.int64),
        np.zeros((nblocks, COUNT_COLUMNS), np.int64),
        np.zeros((nblocks, 256), np.float64),
        np.zeros(nblocks, np.float64),
    )


@nb.njit(cache=True, nogil=True, boundscheck=False)
def _summary_block(k, v, f, block, maxes, subs, norms, with_sumsq, hist, cnt, sums, tots):  # type: ignore[no-untyped-def]
    lo = k * block
    hi = min(v.shape[0], lo + block)
    tots[k] = _block(v[lo:hi], f[lo:hi], maxes, subs, norms, with_sumsq, hist[k], cnt[k], sums[k])


@nb.njit(cache=True, nogil=True, boundscheck=False)
def _summary_total(hist, cnt, sums, tots):  # type: ignore[no-untyped-def]
    """The blocks' parts added up in block order (the same sums on any number of threads):
    (histogram, counts as `_block` lays them out, sums of x^2 per bin, total)."""
    total_cnt = cnt[0].copy()
    for k in range(1, cnt.shape[0]):
        total_cnt[0] += cnt[k, 0]
        total_cnt[1] += cnt[k, 1]
        total_cnt[2] = max(total_cnt[2], cnt[k, 2])
        total_cnt[3] = min(total_cnt[3], cnt[k, 3])
        for j in range(4, COUNT_COLUMNS):
            total_cnt[j] += cnt[k, j]
    tot = 0.0
    for k in range(tots.shape[0]):
        tot += tots[k]
    return hist.sum(axis=0), total_cnt, sums.sum(axis=0), tot


@nb.njit(cache=True, nogil=True, boundscheck=False, parallel=True)
def summary_blocks(v, f, block, maxes, subs, norms, with_sumsq):  # type: ignore[no-untyped-def]
    """A tensor's summary (`_summary_total`), its blocks on numba's threads."""
    hist, cnt, sums, tots = _summary_parts(v.shape[0], block)
    for k in nb.prange(tots.shape[0]):
        _summary_block(k, v, f, block, maxes, subs, norms, with_sumsq, hist, cnt, sums, tots)
    return _summary_total(hist, cnt, sums, tots)


@nb.njit(cache=True, nogil=True, boundscheck=False)
def summary_serial(v, f, block, maxes, subs, norms, with_sumsq):  # type: ignore[no-untyped-def]
    """`summary_blocks` on the calling thread: a parallel loop costs a launch of ~50 us even
    on one thread, more than a small tensor's whole pass."""
    hist, cnt, sums, tots = _summary_parts(v.shape[0], block)
    for k in range(tots.shape[0]):
        _summary_block(k, v, f, block, maxes, subs, norms, with_sumsq, hist, cnt, sums, tots)
    return _summary_total(hist, cnt, sums, tots)


# Reassociation lets LLVM vectorize the sums (4-8 lanes, by the CPU's vector width); NaN and
# Inf are not assumed away: a non-finite pair makes a non-finite sum, which the caller redoes.
_SUM_FLAGS = {"reassoc", "contract", "nsz", "arcp"}


@nb.njit(cache=True, nogil=True, boundscheck=False, fastmath=_SUM_FLAGS)
def _distance_block(r, s):  # type: ignore[no-untyped-def]
    err = 0.0
    ref = 0.0
    own = 0.0
    for i in range(r.shape[0]):  # not `range(lo, hi)`: that loop is not vectorized
        d = np.float64(s[i] - r[i])  # the difference as fp32 computes it
        x = np.float64(r[i])
        y = np.float64(s[i])
        err += d * d
        ref += x * x
        own += y * y
    return err, ref, own


@nb.njit(cache=True, nogil=True, boundscheck=False)
def _distance_into(k, r, s, block, out):  # type: ignore[no-untyped-def]
    lo = k * block
    hi = min(r.shape[0], lo + block)
    e, x, y = _distance_block(r[lo:hi], s[lo:hi])
    out[k, 0] = e
    out[k, 1] = x
    out[k, 2] = y


@nb.njit(cache=True, nogil=True, boundscheck=False)
def _distance_total(out):  # type: ignore[no-untyped-def]
    e = x = y = 0.0
    for k in range(out.shape[0]):  # in block order
        e += out[k, 0]
        x += out[k, 1]
        y += out[k, 2]
    return e, x, y


@nb.njit(cache=True, nogil=True, boundscheck=False, parallel=True)
def distance_blocks(r, s, block):  # type: ignore[no-untyped-def]
    """(sum of (s - r)^2, sum of r^2, sum of s^2), in float64, per block on numba's threads
    and then over the blocks in order (the third costs no read: the pass is bound by its two)."""
    out = np.zeros((max(1, (r.shape[0] + block - 1) // block), 3), np.float64)
    for k in nb.prange(out.shape[0]):
        _distance_into(k, r, s, block, out)
    return _distance_total(out)


@nb.njit(cache=True, nogil=True, boundscheck=False)
def distance_serial(r, s, block):  # type: ignore[no-untyped-def]
    """`distance_blocks` on the calling thread (see `summary_serial`)."""
    out = np.zeros((max(1, (r.shape[0] + block - 1) // block), 3), np.float64)
    for k in range(out.shape[0]):
        _distance_into(k, r, s, block, out)
    return _distance_total(out)
