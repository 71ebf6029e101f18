"""`summarize`, `scaled_lost_fractions` and `ErrorAccumulator` against numpy ground truth.

Ground truth comes from numpy formulas and from actual casts (numpy's float16, torch's
bfloat16), never from precision_doctor itself.

Definitions checked, and how they differ from what a cast does:
- overflow: |x| > max. A cast only gives Inf from the rounding midpoint up (65520 for fp16,
  (2 - 2^-8) * 2^127 for bf16): values in (max, midpoint) are counted as overflow by the
  definition but the cast rounds them down to max.
- flushed: 0 < |x| < smallest subnormal (2^-24 for fp16, 2^-133 for bf16). A cast flushes
  only |x| <= half of it (the midpoint ties to even, i.e. to 0): values in
  (2^-25, 2^-24) round *up* to 2^-24. The definition counts them as flushed.
- subnormal: smallest subnormal <= |x| < smallest normal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

import precision_doctor.capture.statistics as statistics
from precision_doctor.capture.statistics import (
    SUMSQ_BINS,
    ErrorAccumulator,
    SummaryBatch,
    TensorSummary,
    Workspace,
    summarize,
    summarize_unmasked,
)

# Numbers compared with an independent reference: CI runs these again at one thread (.ci/run).
pytestmark = pytest.mark.numerics

F32 = np.float32


SummarizeFn = Callable[..., TensorSummary]


def summarize_in_batch(x: torch.Tensor, *, with_sumsq: bool = False) -> TensorSummary:
    """`x` summarized in a SummaryBatch between two other tensors, one with a NaN and
    fp32 subnormals, so its slice starts and ends inside the batch's buffers."""
    batch = SummaryBatch(Workspace(), with_sumsq=with_sumsq)
    batch.add(torch.randn(37, generator=torch.Generator().manual_seed(0)))
    s = batch.add(x)
    batch.add(torch.tensor([math.nan, 1e-40, 0.0, 2.0**-30, 3.0]))
    batch.compute()
    return s


@pytest.fixture(params=["single", "batched"])
def summarize_fn(request: pytest.FixtureRequest) -> SummarizeFn:
    """Both ways a tensor is summarized: on its own, or in a batch of small tensors."""
    return summarize if request.param == "single" else summarize_in_batch


def f32_from_bits(*bits: int) -> list[float]:
    return [float(v) for v in np.array(bits, dtype=np.uint32).view(np.float32)]


def bf16_cast(x: np.ndarray) -> np.ndarray:
    return torch.tensor(x).to(torch.bfloat16).float().numpy()


def fp16_cast(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return x.astype(np.float16).astype(np.float32)


# Per format: max, smallest normal, smallest subnormal, the cast, and hand-built values
# that straddle every boundary.
FORMATS = {
    "fp16": dict(
        max=float(np.finfo(np.float16).max),  # 65504
        normal=2.0**-14,
        sub=2.0**-24,
        cast=fp16_cast,
        values=[
            # overflow side: (max, 65520) rounds to max; >= 65520 becomes inf
            65504.0,
            65505.0,
            65519.0,
            65520.0,
            70000.0,
            -1e6,
            3e38,
            # flush side
            2.0**-26,
            -(2.0**-25),
            1.5 * 2.0**-25,
            3e-8,
            2.0**-24,
            1e-10,
            1e-40,
            # subnormal side
            1e-6,
            -(2.0**-15),
            float(np.nextafter(F32(2.0**-14), F32(0))),
            2.0**-14,
            # ordinary values and zeros
            1.0,
            -3.5,
            0.0,
            -0.0,
            0.0,
        ],
    ),
    "bf16": dict(
        max=float(torch.finfo(torch.bfloat16).max),
        normal=2.0**-126,
        sub=2.0**-133,
        cast=bf16_cast,
        values=[
            # 0x7F7F0000 is bf16 max; 0x7F7F8000 the rounding midpoint (ties to inf)
            *f32_from_bits(0x7F7F0000, 0x7F7F0001, 0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF),
            -1e38,
            3e37,
            # flush side: 2^-134 ties to 0, 1.5 * 2^-134 rounds up to 2^-133
            2.0**-134,
            -1.5 * 2.0**-134,
            2.0**-140,
            2.0**-149,
            2.0**-133,
            # subnormal side (bf16 subnormals are fp32 subnormals too)
            2.0**-127,
            -(2.0**-130),
            float(np.nextafter(F32(2.0**-126), F32(0))),
            2.0**-126,
            # ordinary values and zeros
            1.0,
            -3.5,
            65505.0,
            1e-10,
            0.0,
            -0.0,
        ],
    ),
}


@pytest.fixture(params=list(FORMATS), ids=list(FORMATS))
def fmt(request: pytest.FixtureRequest) -> tuple[str, dict]:
    return request.param, FORMATS[request.param]


def _x(spec: dict) -> np.ndarray:
    return np.array(spec["values"], dtype=np.float32)


def test_masked_positions_count_as_zeros() -> None:
    """Positions holding mask values (a -1e38 sentinel, a -inf, a probability of 4e-44 a mask
    zeroes) count as zeros; the computed values beside them (a 1e32 blow-up, a 1e-10 that
    flushes) as usual; a NaN at a masked position is still a NaN (no mask makes one)."""
    values = [-1e38, -math.inf, 4e-44, math.nan, 1.5, 1e32, 1e-10]
    masked = [True, True, True, True, False, False, False]
    s = summarize_unmasked(torch.tensor(values), torch.tensor(masked))
    kept = np.array([v for v, m in zip(values, masked, strict=True) if not m], dtype=np.float64)
    assert s.masked_count == 3 and s.numel == len(values)
    assert s.zero_count == 3 and s.nan_count == 1 and s.inf_count == 0
    assert s.tails["fp16"].overflow == int((np.abs(kept) > 65504).sum()) == 1
    assert s.tails["fp16"].flushed == int(((kept != 0) & (np.abs(kept) < 2.0**-24)).sum()) == 1
    assert s.max_abs == float(np.float32(1e32))
    # broadcast: a (1, 3) mask over (2, 3) values
    wide = summarize_unmasked(
        torch.tensor([[-1e38, 2.0, 3.0], [-1e38, 5.0, 6.0]]), torch.tensor([[True, False, False]])
    )
    assert wide.masked_count == 2 and wide.tails["bf16"].overflow == 0 and wide.max_abs == 6.0


def test_error_leaves_masked_positions_out_unless_nan() -> None:
    """-1e38 held as -inf in fp16 is no error where it is a mask; a NaN there (a fully masked
    row's softmax) still is."""
    ref = torch.tensor([-1e38, 1.0, 2.0])
    masked = torch.tensor([True, False, False])
    acc = ErrorAccumulator()
    assert acc.add(ref, torch.tensor([-math.inf, 1.0, 2.5]), masked=masked) == pytest.approx(0.5 / math.sqrt(5))
    assert acc.nonfinite_mismatch == 0
    nan = ErrorAccumulator()
    assert nan.add(ref, torch.tensor([math.nan, 1.0, 2.0]), masked=masked) == math.inf
    unmasked = ErrorAccumulator()
    assert unmasked.add(ref, torch.tensor([-math.inf, 1.0, 2.0])) == math.inf


def test_overflow_count_matches_definition(fmt: tuple[str, dict], summarize_fn: SummarizeFn) -> None:
    name, spec = fmt
    x = _x(spec)
    s = summarize_fn(torch.from_numpy(x))
    expected = int((np.abs(x.astype(np.float64)) > spec["max"]).sum())
    assert expected >= 4  # the hand-built values do exercise the tail
    assert s.tails[name].overflow == expected


def test_overflow_vs_cast_differs_only_below_midpoint(fmt: tuple[str, dict], summarize_fn: SummarizeFn) -> None:
    """The cast turns fewer values into Inf than the definition counts: exactly those in
    (max, rounding midpoint), which the cast rounds down to max."""
    name, spec = fmt
    x = _x(spec)
    s = summarize_fn(torch.from_numpy(x))
    cast = spec["cast"](x)
    cast_inf = int((np.isinf(cast) & np.isfinite(x)).sum())
    rounds_to_max = int(((np.abs(x) > spec["max"]) & (np.abs(cast) == spec["max"])).sum())
    assert rounds_to_max == 2  # 65505, 65519 / 0x7F7F0001, 0x7F7F7FFF
    assert s.tails[name].overflow == cast_inf + rounds_to_max


def test_fp16_overflow_cast_threshold_is_65520(summarize_fn: SummarizeFn) -> None:
    x = np.array([65504, 65505, 65519, 65519.996, 65520, 65536], dtype=np.float32)
    assert np.isinf(fp16_cast(x)).tolist() == [False, False, False, False, True, True]
    s = summarize_fn(torch.from_numpy(x))
    assert s.tails["fp16"].overflow == 5  # everything > 65504


def test_flush_count_matches_definition(fmt: tuple[str, dict], summarize_fn: SummarizeFn) -> None:
    name, spec = fmt
    x = _x(spec)
    s = summarize_fn(torch.from_numpy(x))
    ax = np.abs(x.astype(np.float64))
    expected = int(((ax > 0) & (ax < spec["sub"])).sum())
    assert expected >= 4
    assert s.tails[name].flushed == expected


def test_flush_vs_cast_differs_only_in_round_up_band(fmt: tuple[str, dict], summarize_fn: SummarizeFn) -> None:
    """`(x != 0) & (cast(x) == 0)` misses the values in (sub/2, sub), which round up."""
    name, spec = fmt
    x = _x(spec)
    s = summarize_fn(torch.from_numpy(x))
    cast = spec["cast"](x)
    cast_flushed = int(((x != 0) & (cast == 0)).sum())
    ax = np.abs(x.astype(np.float64))
    round_up = (ax > spec["sub"] / 2) & (ax < spec["sub"])
    assert round_up.sum() >= 1
    assert np.all(np.abs(cast[round_up]) == spec["sub"])  # they do round up to the smallest subnormal
    assert s.tails[name].flushed == cast_flushed + int(round_up.sum())


@pytest.mark.parametrize(
    ("value", "flushed", "subnormal"),
    [
        (2.0**-26, 1, 0),
        (2.0**-25, 1, 0),  # the midpoint: the cast gives 0 too (ties to even)
        (1.5 * 2.0**-25, 1, 0),  # the cast gives 2^-24, the definition says flushed
        (float(np.nextafter(F32(2.0**-24), F32(0))), 1, 0),
        (2.0**-24, 0, 1),
        (2.0**-15, 0, 1),
        (float(np.nextafter(F32(2.0**-14), F32(0))), 0, 1),
        (2.0**-14, 0, 0),
    ],
    ids=["2^-26", "2^-25", "1.5*2^-25", "below-2^-24", "2^-24", "2^-15", "below-2^-14", "2^-14"],
)
def test_fp16_flush_boundaries(value: float, flushed: int, subnormal: int, summarize_fn: SummarizeFn) -> None:
    for sign in (1.0, -1.0):
        s = summarize_fn(torch.tensor([sign * value, 1.0], dtype=torch.float32))
        assert (s.tails["fp16"].flushed, s.tails["fp16"].subnormal) == (flushed, subnormal)
    cast = fp16_cast(np.array([value], dtype=np.float32))[0]
    # Document the cast's behaviour at the same points.
    assert (cast == 0) == (value <= 2.0**-25)


def test_subnormal_count_matches_definition(fmt: tuple[str, dict], summarize_fn: SummarizeFn) -> None:
    name, spec = fmt
    x = _x(spec)
    s = summarize_fn(torch.from_numpy(x))
    ax = np.abs(x.astype(np.float64))
    expected = int(((ax >= spec["sub"]) & (ax < spec["normal"])).sum())
    assert expected >= 3
    assert s.tails[name].subnormal == expected
    # Independent check through the cast: values whose cast is a nonzero subnormal.
    cast = np.abs(spec["cast"](x).astype(np.float64))
    cast_sub = (cast > 0) & (cast < spec["normal"])
    # Casts that round into the subnormal range from the flush band, or up to the smallest
    # normal from just below it, are the only disagreements.
    from_flush_band = (ax > spec["sub"] / 2) & (ax < spec["sub"])
    up_to_normal = (ax < spec["normal"]) & (cast == spec["normal"])
    assert s.tails[name].subnormal == int(cast_sub.sum()) - int(from_flush_band.sum()) + int(up_to_normal.sum())


def test_bf16_flush_uses_fp32_subnormals(summarize_fn: SummarizeFn) -> None:
    # bf16's smallest subnormal 2^-133 is itself an fp32 subnormal: exercised exactly.
    x = np.array([2.0**-149, 2.0**-134, 2.0**-133, 2.0**-132, 0.0], dtype=np.float32)
    assert bf16_cast(x).tolist() == [0.0, 0.0, 2.0**-133, 2.0**-132, 0.0]
    s = summarize_fn(torch.from_numpy(x))
    assert s.tails["bf16"].flushed == 2
    assert s.tails["bf16"].subnormal == 2
    # For fp16 all four nonzero values flush.
    assert s.tails["fp16"].flushed == 4


def test_nan_inf_zero_counts_and_extremes(summarize_fn: SummarizeFn) -> None:
    x = np.array([0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf, np.inf, 3.0, -7.5, 1e-30, 2.0**-140], dtype=np.float32)
    s = summarize_fn(torch.from_numpy(x))
    assert s.numel == x.size
    assert s.zero_count == int((x == 0).sum()) == 2
    assert s.nan_count == int(np.isnan(x).sum()) == 2
    assert s.inf_count == int(np.isinf(x).sum()) == 3
    finite = x[np.isfinite(x)]
    assert s.max_abs == float(np.abs(finite).max()) == 7.5
    nz = np.abs(finite[finite != 0])
    assert s.min_nonzero_abs == float(nz.min()) == float(np.float32(2.0**-140))
    assert s.nonzero_count == 4
    assert s.nonfinite_count == 5


def test_all_zero_and_all_nonfinite(summarize_fn: SummarizeFn) -> None:
    s = summarize_fn(torch.zeros(5))
    assert (s.zero_count, s.max_abs, s.min_nonzero_abs) == (5, 0.0, math.inf)
    s = summarize_fn(torch.tensor([math.inf, math.nan]))
    assert (s.inf_count, s.nan_count, s.max_abs, s.min_nonzero_abs) == (1, 1, 0.0, math.inf)
    assert s.tails["fp16"].overflow == 0  # Inf is not counted as overflow of a finite value


@pytest.fixture(params=["bincount", "scatter-rows"])
def histogram_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Both ways a chunk's histogram is counted: one serial bincount, or one row per thread."""
    threads = torch.get_num_threads()
    if request.param == "bincount":
        monkeypatch.setattr(statistics, "_PARALLEL_HIST_ELEMENTS", 1 << 62)
    else:
        monkeypatch.setattr(statistics, "_PARALLEL_HIST_ELEMENTS", 0)
        torch.set_num_threads(max(threads, 2))
    yield request.param
    torch.set_num_threads(threads)


def test_histogram_matches_numpy_log2(histogram_path: str, summarize_fn: SummarizeFn) -> None:
    g = np.random.default_rng(0)
    # An odd size: the rows of the threaded path leave a remainder.
    x = (g.standard_normal(4001) * np.exp2(g.integers(-60, 60, 4001))).astype(np.float32)
    x[:10] = 0.0
    x[10:15] = np.array([2.0**-149, 2.0**-130, 2.0**-126, 2.0**127, 3.0e38], dtype=np.float32)
    x[15] = np.inf
    x[16] = np.nan
    # exact powers of two and their neighbours below
    x[17:21] = np.array(
        [1.0, np.nextafter(F32(1.0), F32(0)), 2.0**-24, np.nextafter(F32(2.0**-24), F32(0))], dtype=np.float32
    )
    s = summarize_fn(torch.from_numpy(x))

    finite_nz = x[np.isfinite(x) & (x != 0)].astype(np.float64)
    exps = np.floor(np.log2(np.abs(finite_nz))).astype(np.int64)
    exps = np.maximum(exps, -127)  # fp32 subnormals share the lowest bin
    expected = np.bincount(exps + 127, minlength=256)
    expected[0] += int((x == 0).sum())
    expected[255] += int((~np.isfinite(x)).sum())
    np.testing.assert_array_equal(s.hist, expected)


def test_merge_equals_summary_of_concatenation() -> None:
    g = np.random.default_rng(1)
    a = (g.standard_normal(500) * np.exp2(g.integers(-40, 20, 500))).astype(np.float32)
    b = (g.standard_normal(300) * np.exp2(g.integers(-30, 30, 300))).astype(np.float32)
    a[:3] = [0.0, np.nan, 1e5]
    b[:3] = [np.inf, 0.0, 2.0**-140]
    merged = summarize(torch.from_numpy(a), with_sumsq=True)
    merged.merge(summarize(torch.from_numpy(b), with_sumsq=True))
    whole = summarize(torch.from_numpy(np.concatenate([a, b])), with_sumsq=True)
    assert_same_summary(merged, whole)


def assert_same_summary(got: TensorSummary, expected: TensorSummary) -> None:
    for name in ("numel", "zero_count", "nan_count", "inf_count", "max_abs", "min_nonzero_abs"):
        assert getattr(got, name) == getattr(expected, name), name
    np.testing.assert_array_equal(got.hist, expected.hist)
    assert got.tails == expected.tails
    assert got.sumsq is not None and expected.sumsq is not None
    np.testing.assert_allclose(got.sumsq, expected.sumsq, rtol=1e-6)
    assert got.sumsq_total == pytest.approx(expected.sumsq_total, rel=1e-6)


def test_sumsq_matches_numpy(summarize_fn: SummarizeFn) -> None:
    x = np.array(
        [3.0, -2.5, 0.5, 2.0**-30, -1.5 * 2.0**-30, 2.0**-25, 2.0**-24, 2.0**-140, np.inf, np.nan, 0.0],
        dtype=np.float32,
    )
    s = summarize_fn(torch.from_numpy(x), with_sumsq=True)
    assert s.sumsq is not None and len(s.sumsq) == SUMSQ_BINS
    f = x[np.isfinite(x)].astype(np.float64)
    assert s.sumsq_total == pytest.approx(float((f**2).sum()), rel=1e-7)
    # Per bin only below 2^-24 (bin 103), where some loss scale 2^0..2^24 can flush values.
    small = f[(f != 0) & (np.abs(f) < 2.0**-24)]
    bins = np.maximum(np.floor(np.log2(np.abs(small))).astype(np.int64) + 127, 0)
    expected = np.bincount(bins, weights=small**2, minlength=SUMSQ_BINS)
    np.testing.assert_allclose(s.sumsq, expected, rtol=1e-12)
    assert s.sumsq[127 - 30] == pytest.approx(2.0**-60 * (1 + 2.25))


@pytest.mark.parametrize("n_small", [3, 400], ids=["sparse", "dense"])
def test_sumsq_of_few_or_many_small_values(n_small: int, summarize_fn: SummarizeFn) -> None:
    """Values below 2^-24 are gathered 8 at a time when few (through the mask's int64
    words) and by `nonzero` when many; both give numpy's sums. The size is no multiple of 8
    and a small value sits last, where the padding of the words begins."""
    g = np.random.default_rng(5)
    x = g.uniform(0.5, 2.0, 10_003).astype(np.float32)
    where = [*(5 + g.choice(9_997, n_small - 1, replace=False)).tolist(), 10_002]
    x[where] = (g.uniform(1.0, 2.0, n_small) * np.exp2(g.integers(-60, -25, n_small))).astype(np.float32)
    x[:5] = 0.0
    s = summarize_fn(torch.from_numpy(x), with_sumsq=True)
    small = x[(x != 0) & (x < 2.0**-24)].astype(np.float64)
    assert len(small) == n_small
    bins = np.floor(np.log2(small)).astype(np.int64) + 127
    np.testing.assert_allclose(s.sumsq, np.bincount(bins, weights=small**2, minlength=SUMSQ_BINS), rtol=1e-12)


def test_chunked_summary_equals_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    g = np.random.default_rng(3)
    x = (g.standard_normal(10_000) * np.exp2(g.integers(-50, 20, 10_000))).astype(np.float32)
    x[[5, 77, 9000]] = [np.nan, np.inf, 0.0]
    whole = summarize(torch.from_numpy(x), with_sumsq=True)
    monkeypatch.setattr(statistics, "CHUNK_ELEMENTS", 1000)
    chunked = summarize(torch.from_numpy(x), with_sumsq=True)
    assert_same_summary(chunked, whole)


def _grad_tensor() -> np.ndarray:
    g = np.random.default_rng(2)
    mags = np.exp2(g.uniform(-60, 20, 3000))
    x = (mags * g.choice([-1.0, 1.0], 3000)).astype(np.float32)
    x[:20] = 0.0
    x[20] = np.inf
    x[21] = np.nan
    # exactly on the thresholds for k in (0, 8, 16, 24): not lost / overflowing
    x[22:26] = np.array([2.0**-24, 2.0**-32, 2.0**-40, 2.0**-48], dtype=np.float32)
    x[26:30] = np.array([2.0**16, 2.0**8, 1.0, 2.0**-8], dtype=np.float32)
    x[30] = 2.0**-140  # an fp32 subnormal
    return x


@pytest.mark.parametrize("k", [0, 4, 8, 16, 24])
def test_scaled_lost_fractions_against_numpy(k: int, summarize_fn: SummarizeFn) -> None:
    x = _grad_tensor()
    s = summarize_fn(torch.from_numpy(x), with_sumsq=True)
    lost, over, norm = s.scaled_lost_fractions(k)

    f = x[np.isfinite(x)].astype(np.float64)
    nz = f[f != 0]
    scaled = np.abs(nz) * 2.0**k
    exp_lost = float((scaled < 2.0**-24).mean())
    exp_over = float((scaled >= 2.0**16).mean())
    exp_norm = math.sqrt(float((nz[scaled < 2.0**-24] ** 2).sum()) / float((nz**2).sum()))
    assert lost == pytest.approx(exp_lost, abs=1e-12)
    assert over == pytest.approx(exp_over, abs=1e-12)
    assert norm == pytest.approx(exp_norm, rel=1e-5, abs=1e-12)
    assert 0 < exp_lost < 1 and (k > 4 or exp_over > 0)  # the data does straddle both ends


def test_loss_scale_fractions_for_all_scales_against_numpy(summarize_fn: SummarizeFn) -> None:
    """The vectorized curve (all 25 scales from one cumulative sum) against numpy per scale."""
    x = _grad_tensor()
    s = summarize_fn(torch.from_numpy(x), with_sumsq=True)
    scales = list(range(25))
    lost, over, norm = s.loss_scale_fractions(scales)
    nz = x[np.isfinite(x) & (x != 0)].astype(np.float64)
    for k in scales:
        scaled = np.abs(nz) * 2.0**k
        assert lost[k] == pytest.approx(float((scaled < 2.0**-24).mean()), abs=1e-12), k
        assert over[k] == pytest.approx(float((scaled >= 2.0**16).mean()), abs=1e-12), k
        exp_norm = math.sqrt(float((nz[scaled < 2.0**-24] ** 2).sum()) / float((nz**2).sum()))
        assert norm[k] == pytest.approx(exp_norm, rel=1e-5, abs=1e-12), k
    assert np.all(np.diff(lost) <= 0) and np.all(np.diff(over) >= 0)  # monotone in the scale


def test_scaled_lost_fractions_without_sumsq_and_empty(summarize_fn: SummarizeFn) -> None:
    s = summarize_fn(torch.tensor([2.0**-30, 1.0, 0.0]))
    assert s.scaled_lost_fractions(0) == (0.5, 0.0, 0.0)
    assert summarize_fn(torch.zeros(3)).scaled_lost_fractions(0) == (0.0, 0.0, 0.0)


# --- ErrorAccumulator -----------------------------------------------------------------------


def test_error_accumulator_rel_l2_and_sqnr() -> None:
    g = torch.Generator().manual_seed(3)
    pairs = []
    for n in (10, 100, 7):
        ref = torch.randn(n, generator=g)
        pairs.append((ref, ref.half()))
    pairs.append((torch.randn(5, generator=g) * 1e3, torch.randn(5, generator=g)))
    acc = ErrorAccumulator()
    for ref, sh in pairs:
        own = acc.add(ref, sh)
        r = ref.double().numpy()
        e = sh.double().numpy() - r
        assert own == pytest.approx(np.linalg.norm(e) / np.linalg.norm(r), rel=1e-5)

    r = np.concatenate([p[0].double().numpy() for p in pairs])
    y = np.concatenate([p[1].double().numpy() for p in pairs])
    assert acc.rel_l2 == pytest.approx(np.linalg.norm(r - y) / np.linalg.norm(r), rel=1e-5)
    # SQNR is near 0 dB here (the last pair dominates): compare in absolute dB.
    assert acc.sqnr_db == pytest.approx(20 * np.log10(np.linalg.norm(r) / np.linalg.norm(r - y)), abs=1e-5)

    # Only the fp16-rounded pairs: SQNR ~ 70 dB.
    acc16 = ErrorAccumulator()
    for ref, sh in pairs[:3]:
        acc16.add(ref, sh)
    r = np.concatenate([p[0].double().numpy() for p in pairs[:3]])
    y = np.concatenate([p[1].double().numpy() for p in pairs[:3]])
    expected_db = 20 * np.log10(np.linalg.norm(r) / np.linalg.norm(r - y))
    assert 60 < expected_db < 80
    assert acc16.sqnr_db == pytest.approx(expected_db, abs=1e-4)
    assert acc16.rel_l2 == pytest.approx(np.linalg.norm(r - y) / np.linalg.norm(r), rel=1e-5)

    merged = ErrorAccumulator()
    first, second = ErrorAccumulator(), ErrorAccumulator()
    for ref, sh in pairs[:2]:
        first.add(ref, sh)
    for ref, sh in pairs[2:]:
        second.add(ref, sh)
    merged.merge(first)
    merged.merge(second)
    assert merged.rel_l2 == pytest.approx(acc.rel_l2, rel=1e-12)


def test_error_accumulator_exact_and_nonfinite() -> None:
    acc = ErrorAccumulator()
    x = torch.tensor([1.0, 2.0, 3.0])
    assert acc.add(x, x.clone()) == 0.0
    assert acc.rel_l2 == 0.0
    assert acc.sqnr_db == math.inf

    acc = ErrorAccumulator()
    ref = torch.tensor([1.0, 70000.0, 3.0])
    own = acc.add(ref, ref.half())  # 70000 overflows fp16
    assert own == math.inf
    assert acc.nonfinite_mismatch == 1
    assert acc.rel_l2 == math.inf
    assert acc.sqnr_db == -math.inf

    # fp32 Inf where the shadow is Inf too: not a mismatch; the finite rest is compared.
    acc = ErrorAccumulator()
    ref = torch.tensor([math.inf, 1.0, 2.0])
    sh = torch.tensor([math.inf, 1.5, 2.0])
    own = acc.add(ref, sh)
    assert acc.nonfinite_mismatch == 0
    assert own == pytest.approx(0.5 / math.sqrt(5.0), rel=1e-6)


# --- batches of small tensors -----------------------------------------------------------------


def _batch_tensors() -> list[np.ndarray]:
    """Tensors of many sizes, most finite (the batched path proper), with zeros, fp32
    subnormals, values below 2^-24 and above 65504; one with a NaN (its own path)."""
    g = np.random.default_rng(7)
    out = []
    for i, n in enumerate([1, 7, 64, 300, 1001, 4096, 33, 2, 8000, 129]):
        x = (g.standard_normal(n) * np.exp2(g.integers(-40, 20, n))).astype(np.float32)
        if i % 3 == 0:
            x[: max(1, n // 10)] = 0.0
        if i == 4:
            x[-3:] = [2.0**-140, -(2.0**-130), 70000.0]
        if i == 6:
            x[5] = np.nan
        out.append(x)
    out.append(np.zeros(5, dtype=np.float32))
    return out


@pytest.mark.parametrize("with_sumsq", [False, True], ids=["forward", "gradient"])
def test_summary_batch_matches_numpy_per_tensor(with_sumsq: bool) -> None:
    xs = _batch_tensors()
    batch = SummaryBatch(Workspace(), with_sumsq=with_sumsq)
    summaries = [batch.add(torch.from_numpy(x)) for x in xs]
    assert len(batch) == len(xs) and batch.pending_elements == sum(x.size for x in xs)
    batch.compute()
    assert len(batch) == 0
    for x, s in zip(xs, summaries, strict=True):
        finite = x[np.isfinite(x)]
        a = np.abs(finite.astype(np.float64))
        nz = a[a != 0]
        assert s.numel == x.size
        assert s.zero_count == int((finite == 0).sum())
        assert s.nan_count == int(np.isnan(x).sum())
        assert s.max_abs == (float(a.max()) if a.size else 0.0)
        assert s.min_nonzero_abs == (float(nz.min()) if nz.size else math.inf)
        exps = np.maximum(np.floor(np.log2(nz)).astype(np.int64), -127) + 127
        expected = np.bincount(exps, minlength=256)
        expected[0] += int((finite == 0).sum())
        expected[255] += int((~np.isfinite(x)).sum())
        np.testing.assert_array_equal(s.hist, expected)
        assert s.tails["fp16"].overflow == int((a > 65504).sum())
        assert s.tails["fp16"].flushed == int((nz < 2.0**-24).sum())
        assert s.tails["fp16"].subnormal == int(((nz >= 2.0**-24) & (nz < 2.0**-14)).sum())
        assert s.tails["bf16"].subnormal == int(((nz >= 2.0**-133) & (nz < 2.0**-126)).sum())
        if with_sumsq:
            assert s.sumsq is not None
            assert s.sumsq_total == pytest.approx(float((a**2).sum()), rel=1e-5)
            small = nz[nz < 2.0**-24]
            bins = np.maximum(np.floor(np.log2(small)).astype(np.int64) + 127, 0)
            np.testing.assert_allclose(s.sumsq, np.bincount(bins, weights=small**2, minlength=SUMSQ_BINS), rtol=1e-12)
        else:
            assert s.sumsq is None
