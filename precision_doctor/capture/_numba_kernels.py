"""The compiled loops behind `capture.cpu_kernels` (imported by it, lazily: numba's import and
its first compile cost ~0.5 s and ~3 s, paid only where a CPU summary runs; the compiled code
is cached on disk, `cache=True`).

`summary_blocks` makes one pass over a float32 tensor's bit patterns per block of
`block` values: the 256-bin histogram of biased exponents, the counts and extremes a
`TensorSummary` holds, each format's tail counts against its thresholds, and (gradients) the
sums of x^2 in the bins below 2^-24 and over all finite values. Per block, in fixed blocks:
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
def _block(v, f, maxes, subs, norms, sumsq_limit, with_sumsq, hist, cnt, sums):  # type: ignore[no-untyped-def]
    # Four sub-histograms: consecutive values in the same bin would otherwise wait on each
    # other's increment (a store-to-load chain), which bounds a one-histogram loop.
    h = np.zeros((4, 256), np.int64)
    band_hi = min(maxes[0], maxes[1])  # inside [band_lo, band_hi] no tail count applies
    band_lo = max(norms[0], norms[1])
    zero = 0
    nan = 0
    mx = 0
    mn = INF_BITS
    tot = 0.0
    # Over whole (sliced) arrays: a loop over `range(lo, hi)` is one LLVM does not vectorize.
    for i in range(v.shape[0]):
        b = v[i] & ABS_MASK
        h[i & 3, b >> 23] += 1
        if b >= band_lo and b <= band_hi:
            mx = max(mx, b)
            mn = min(mn, b)
            if with_sumsq:
                x = np.float64(f[i])
                tot += x * x
            continue
        if b == 0:
            zero += 1
            continue
        if b >= INF_BITS:
            if b > INF_BITS:
                nan += 1
            continue
        mx = max(mx, b)
        mn = min(mn, b)
        if with_sumsq:
            x = np.float64(f[i])
            tot += x * x
            if b < sumsq_limit:
                sums[b >> 23] += x * x
        for k in range(N_FORMATS):
            if b > maxes[k]:
                cnt[4 + k] += 1
            if b < subs[k]:
                cnt[4 + N_FORMATS + k] += 1
            if b < norms[k]:
                cnt[4 + 2 * N_FORMATS + k] += 1
    for j in range(256):
        hist[j] = h[0, j] + h[1, j] + h[2, j] + h[3, j]
    cnt[0] = zero
    cnt[1] = nan
    cnt[2] = mx
    cnt[3] = mn
    return tot


@nb.njit(cache=True, nogil=True, boundscheck=False, parallel=True)
def summary_blocks(v, f, block, maxes, subs, norms, sumsq_limit, with_sumsq):  # type: ignore[no-untyped-def]
    """Per block: (histograms, counts, sums of squares per low bin, total sums of squares), the
    blocks on numba's threads (the same blocks on any number of threads: the same sums)."""
    n = v.shape[0]
    nblocks = max(1, (n + block - 1) // block)
    hist = np.zeros((nblocks, 256), np.int64)
    cnt = np.zeros((nblocks, COUNT_COLUMNS), np.int64)
    sums = np.zeros((nblocks, 256), np.float64)
    tots = np.zeros(nblocks, np.float64)
    for k in nb.prange(nblocks):
        lo = k * block
        hi = min(n, lo + block)
        tots[k] = _block(v[lo:hi], f[lo:hi], maxes, subs, norms, sumsq_limit, with_sumsq, hist[k], cnt[k], sums[k])
    return hist, cnt, sums, tots


# Reassociation lets LLVM vectorize the sums (4-8 lanes, by the CPU's vector width); NaN and
# Inf are not assumed away: a non-finite pair makes a non-finite sum, which the caller redoes.
_SUM_FLAGS = {"reassoc", "contract", "nsz", "arcp"}


@nb.njit(cache=True, nogil=True, boundscheck=False, fastmath=_SUM_FLAGS)
def _distance_block(r, s):  # type: ignore[no-untyped-def]
    err = 0.0
    ref = 0.0
    for i in range(r.shape[0]):  # not `range(lo, hi)`: that loop is not vectorized
        d = np.float64(s[i] - r[i])  # the difference as fp32 computes it
        x = np.float64(r[i])
        err += d * d
        ref += x * x
    return err, ref


@nb.njit(cache=True, nogil=True, boundscheck=False, parallel=True)
def distance_blocks(r, s, block):  # type: ignore[no-untyped-def]
    """Per block: (sum of (s - r)^2, sum of r^2), in float64."""
    n = r.shape[0]
    nblocks = max(1, (n + block - 1) // block)
    out = np.zeros((nblocks, 2), np.float64)
    for k in nb.prange(nblocks):
        lo = k * block
        hi = min(n, lo + block)
        e, x = _distance_block(r[lo:hi], s[lo:hi])
        out[k, 0] = e
        out[k, 1] = x
    return out
