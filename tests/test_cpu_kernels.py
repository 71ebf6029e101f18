"""The CPU's compiled summary loops (`capture.cpu_kernels`) against the torch path they replace
on the CPU (`PRECISION_DOCTOR_CPU_KERNELS=torch`, the path a GPU runs) and against NumPy
counts: the same histograms, counts, extremes and tail counts, exactly; sums of squares within
fp32's precision (the loops sum in float64, the torch path's norms in fp32)."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pytest
import torch

import precision_doctor as pd
from precision_doctor.analysis.gradients import GradComparison
from precision_doctor.capture import cpu_kernels
from precision_doctor.capture.readback import Held, run
from precision_doctor.capture.statistics import (
    SUMSQ_BINS,
    ErrorAccumulator,
    SummaryBatch,
    TensorSummary,
    Workspace,
    squared_norm,
    summarize,
)
from precision_doctor.errors import PrecisionDoctorError

from .fixtures import assert_same_fields

# numba is a dependency; a test that needs its loops still says so where it is missing.
needs_numba = pytest.mark.skipif(cpu_kernels._kernels() is None, reason="numba is not installed")

# Serial against parallel loops needs two threads to run the parallel one on.
needs_two_threads = pytest.mark.skipif(
    (os.cpu_count() or 1) < 2
    or cpu_kernels._kernels() is None
    or cpu_kernels._kernels().nb.config.NUMBA_NUM_THREADS < 2,  # type: ignore[union-attr]
    reason="one CPU thread: the parallel loop would run serially too",
)

# Numbers compared with an independent reference: CI runs these again at one thread (.ci/run).
pytestmark = pytest.mark.numerics


@pytest.fixture(autouse=True)
def _every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loops for small tensors too (an analysis gives them only tensors of MIN_ELEMENTS
    values and more): the edge cases below are small."""
    monkeypatch.setattr(cpu_kernels, "MIN_ELEMENTS", 0)


SPECIALS = [
    0.0, -0.0, 1e5, -7e4, 65504.0, 65505.0, 65520.0, 2.0**-24, -(2.0**-25), 2.0**-14, 6e-5,
    1e-40, math.nan, math.inf, -math.inf, 3e38, 3.4e38, 2.0**-133, 2.0**-134, 2.0**-126, 1.0, -2.5,
]  # fmt: skip


def _spread(n: int, seed: int) -> torch.Tensor:
    """Values over ~80 binades, with zeros: many histogram bins and every tail populated."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-40, 40, (n,), generator=g).float())
    x[torch.randint(0, n, (n // 50,), generator=g)] = 0.0
    return x


CASES = {
    "specials": lambda: torch.tensor(SPECIALS),
    "empty": lambda: torch.empty(0),
    "zeros": lambda: torch.zeros(1000),
    "all-nan": lambda: torch.full((300,), math.nan),
    "spread-small": lambda: _spread(5000, 0),
    # past PARALLEL_ELEMENTS: the threaded loop, several blocks
    "spread-large": lambda: _spread(3 * cpu_kernels.PARALLEL_ELEMENTS + 17, 1),
    "specials-in-large": lambda: torch.cat([_spread(cpu_kernels.PARALLEL_ELEMENTS + 5, 2), torch.tensor(SPECIALS)]),
}


def _torch_path(x: torch.Tensor, with_sumsq: bool, monkeypatch: pytest.MonkeyPatch) -> TensorSummary:
    with monkeypatch.context() as mp:
        mp.setenv(cpu_kernels.CPU_KERNELS_ENV, "torch")
        return summarize(x, with_sumsq=with_sumsq, workspace=Workspace())


def _assert_same(a: TensorSummary, b: TensorSummary) -> None:
    assert np.array_equal(a.hist, b.hist)
    for name in ("numel", "zero_count", "nan_count", "inf_count", "max_abs", "min_nonzero_abs"):
        assert getattr(a, name) == getattr(b, name), name
    assert a.tails == b.tails
    assert (a.sumsq is None) == (b.sumsq is None)
    if a.sumsq is not None and b.sumsq is not None:
        np.testing.assert_allclose(a.sumsq, b.sumsq, rtol=1e-10, atol=0)  # both float64 sums
        # The torch path squares an fp32 norm, whose fp32 sums drift (up to ~6e-6 measured on these
        # ~400K values across 80 binades; the loops sum in float64: test_counts_match_numpy holds
        # them to 1e-10, which a sum of squares meets in any order up to ~1M values).
        assert a.sumsq_total == pytest.approx(b.sumsq_total, rel=1e-4, abs=0)


@needs_numba
@pytest.mark.parametrize("with_sumsq", [False, True], ids=["activations", "gradients"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_compiled_loops_summarize_as_the_torch_path(
    case: str, with_sumsq: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = CASES[case]()
    assert cpu_kernels.enabled(x)
    _assert_same(summarize(x, with_sumsq=with_sumsq), _torch_path(x, with_sumsq, monkeypatch))


@needs_numba
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_counts_match_numpy(case: str) -> None:
    x = CASES[case]()
    s = summarize(x, with_sumsq=True)
    v = x.numpy().astype(np.float64)
    a = np.abs(v)
    finite = np.isfinite(v)
    nonzero = finite & (a > 0)
    assert s.zero_count == int((v == 0).sum())
    assert s.nan_count == int(np.isnan(v).sum())
    assert s.inf_count == int(np.isinf(v).sum())
    assert s.max_abs == (a[finite].max() if finite.any() else 0.0)
    assert s.min_nonzero_abs == (a[nonzero].min() if nonzero.any() else math.inf)
    # fp16: finite beyond 65504; nonzero below 2^-24 (flushed) and in [2^-24, 2^-14) (subnormal)
    assert s.tails["fp16"].overflow == int((finite & (a > 65504.0)).sum())
    assert s.tails["fp16"].flushed == int((nonzero & (a < 2.0**-24)).sum())
    assert s.tails["fp16"].subnormal == int((nonzero & (a >= 2.0**-24) & (a < 2.0**-14)).sum())
    bf16_max = float(torch.finfo(torch.bfloat16).max)
    assert s.tails["bf16"].overflow == int((finite & (a > bf16_max)).sum())
    assert s.tails["bf16"].flushed == int((nonzero & (a < 2.0**-133)).sum())
    # histogram: bin floor(log2|x|) + 127 for normal values, 0 for zeros and fp32 subnormals
    normal = nonzero & (a >= 2.0**-126)
    bins = np.floor(np.log2(a[normal])).astype(np.int64) + 127
    expected = np.bincount(bins, minlength=256)
    expected[0] += int((finite & ~normal).sum())
    expected[255] += int((~finite).sum())
    assert np.array_equal(s.hist, expected)
    assert s.sumsq is not None
    low = nonzero & (a < 2.0**-24)
    la = a[low]
    low_bins = np.where(la >= 2.0**-126, np.floor(np.log2(la)) + 127, 0).astype(np.int64)
    np.testing.assert_allclose(s.sumsq, np.bincount(low_bins, weights=la**2, minlength=SUMSQ_BINS), rtol=1e-10)
    # float64 sums in another order (per block, vectorized by the CPU's width): ~n*eps at worst
    assert s.sumsq_total == pytest.approx(float((a[finite] ** 2).sum()), rel=1e-10)


@needs_numba
@needs_two_threads
def test_sums_do_not_depend_on_the_thread_count() -> None:
    x = _spread(4 * cpu_kernels.PARALLEL_ELEMENTS, 3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = summarize(x, with_sumsq=True)
        torch.set_num_threads(max(2, before))
        many = summarize(x, with_sumsq=True)
    finally:
        torch.set_num_threads(before)
    assert one.sumsq_total == many.sumsq_total
    assert one.sumsq is not None and many.sumsq is not None
    assert np.array_equal(one.sumsq, many.sumsq)


@needs_numba
@needs_two_threads
def test_distances_do_not_depend_on_the_thread_count() -> None:
    """One thread takes the serial loop, more the parallel one: the same blocks, the same sums."""
    x = _spread(4 * cpu_kernels.PARALLEL_ELEMENTS, 9)
    y = x.to(torch.bfloat16).float()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.squared_distances(x, y)
        torch.set_num_threads(max(2, before))
        many = cpu_kernels.squared_distances(x, y)
    finally:
        torch.set_num_threads(before)
    assert one == many


@needs_numba
def test_batched_small_gradients_take_the_loops_too(monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = [_spread(n, seed) for seed, n in enumerate((10, 700, 4096))] + [torch.tensor(SPECIALS)]
    batch = SummaryBatch(Workspace(), with_sumsq=True)
    got = [batch.add(t) for t in tensors]
    batch.compute()
    for t, s in zip(tensors, got, strict=True):
        _assert_same(s, _torch_path(t, True, monkeypatch))


@needs_numba
def test_strided_and_low_precision_inputs_are_summarized_as_their_fp32_values() -> None:
    x = _spread(2000, 4)
    _assert_same(summarize(x.view(40, 50).t()), summarize(x.view(40, 50).t().contiguous()))
    h = x.to(torch.bfloat16)
    _assert_same(summarize(h), summarize(h.float()))


def test_a_bad_choice_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_kernels.CPU_KERNELS_ENV, "fortran")
    with pytest.raises(PrecisionDoctorError, match=cpu_kernels.CPU_KERNELS_ENV):
        cpu_kernels.enabled(torch.zeros(1))


def test_without_numba_the_torch_path_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "_kernels", lambda: None)
    x = torch.tensor(SPECIALS)
    assert not cpu_kernels.enabled(x)
    s = summarize(x)
    assert (s.nan_count, s.inf_count, s.tails["fp16"].overflow, s.tails["bf16"].overflow) == (1, 2, 6, 1)


@pytest.mark.parametrize(
    "error",
    [ImportError("No module named 'numba'"), RuntimeError("cannot cache function: no locator available")],
    ids=["numba-missing", "no-writable-cache"],
)
def test_loops_that_cannot_load_leave_the_torch_path(error: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    """numba missing, or its `cache=True` finding no writable directory (a read-only install
    and home): no compiled loops, not a failed analysis."""

    def fail() -> None:
        raise error

    monkeypatch.setattr(cpu_kernels, "_import_kernels", fail)
    assert cpu_kernels._kernels.__wrapped__() is None


SHADOWS = {
    "fp32-noise": lambda r: r + 1e-3 * torch.randn(r.shape, generator=torch.Generator().manual_seed(5)),
    "bf16": lambda r: r.to(torch.bfloat16),
    "fp16": lambda r: r.to(torch.float16),
    "zeros": torch.zeros_like,
    "overflowed": lambda r: torch.where(r.abs() > 3.0, torch.inf, r).to(torch.float16),
}


@needs_numba
@pytest.mark.parametrize("n", [1000, 3 * cpu_kernels.PARALLEL_ELEMENTS + 5], ids=["small", "threaded"])
@pytest.mark.parametrize("shadow", list(SHADOWS), ids=list(SHADOWS))
def test_errors_match_the_torch_path_and_float64(shadow: str, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = torch.randn(n, generator=torch.Generator().manual_seed(6))
    sh = SHADOWS[shadow](ref)
    compiled = ErrorAccumulator()
    own = compiled.add(ref, sh)
    with monkeypatch.context() as mp:
        mp.setenv(cpu_kernels.CPU_KERNELS_ENV, "torch")
        torch_path = ErrorAccumulator()
        torch_own = torch_path.add(ref, sh)
    assert compiled.nonfinite_mismatch == torch_path.nonfinite_mismatch
    if not math.isfinite(torch_own):
        assert own == torch_own == math.inf
        return
    r64, s64 = ref.double(), sh.double()
    assert compiled.sum_sq_ref == pytest.approx(float((r64**2).sum()), rel=1e-10)
    # the difference rounded to fp32 first, as a torch subtraction of the upcast shadow makes it
    assert compiled.sum_sq_err == pytest.approx(float(((sh.float() - ref).double() ** 2).sum()), rel=1e-10)
    assert own == pytest.approx(float((s64 - r64).norm() / r64.norm()), rel=1e-6)
    assert own == pytest.approx(torch_own, rel=1e-4)  # the torch path's fp32 norms (see above)
    if shadow == "zeros":
        assert own == 1.0  # the reference's norm and the distance from zero: one sum, both ways
        assert squared_norm(ref) == compiled.sum_sq_err


@needs_numba
@pytest.mark.parametrize("threads", [1, pytest.param(2, marks=needs_two_threads)], ids=["1-thread", "2-threads"])
def test_the_loops_leave_torchs_thread_count_alone(threads: int) -> None:
    """The loops run on their own threads, as many as torch may use: a threading layer that
    shares torch's OpenMP runtime set torch's count from 1 to the number of cores."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        x = _spread(4 * cpu_kernels.PARALLEL_ELEMENTS, 7)
        summarize(x)
        ErrorAccumulator().add(x, x.to(torch.float16))
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


@needs_numba
def test_small_tensors_take_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the module's own threshold
    small, large = torch.zeros(cpu_kernels.MIN_ELEMENTS - 1), torch.zeros(cpu_kernels.MIN_ELEMENTS)
    assert not cpu_kernels.enabled(small)
    assert cpu_kernels.enabled(large)


LOW_GRADS = {
    "rounded": lambda r: r.to(torch.bfloat16).float(),
    "flushed": torch.zeros_like,
    "overflowed": lambda r: torch.where(r.abs() > 3.0, torch.inf, r),
}


@needs_numba
@pytest.mark.parametrize("low", list(LOW_GRADS), ids=list(LOW_GRADS))
def test_a_gradient_comparison_sums_as_float64_in_one_pass(low: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`GradComparison` takes its three sums from one compiled pass: each equal to a float64
    sum, a flushed gradient exactly 100% off, and Inf/NaN left to the torch path's rules."""
    ref = torch.randn(3 * cpu_kernels.PARALLEL_ELEMENTS + 5, generator=torch.Generator().manual_seed(8))
    lo = LOW_GRADS[low](ref)
    compiled = GradComparison()
    passes: list[int] = []
    one_pass = cpu_kernels.squared_distances
    with monkeypatch.context() as mp:
        mp.setattr(cpu_kernels, "squared_distances", lambda r, o: passes.append(r.numel()) or one_pass(r, o))
        run(compiled.add_job(Held(ref), Held(lo), Workspace()))
    if low != "overflowed":
        assert passes == [ref.numel()]  # the three sums in one pass
    with monkeypatch.context() as mp:
        mp.setenv(cpu_kernels.CPU_KERNELS_ENV, "torch")
        torch_path = GradComparison()
        run(torch_path.add_job(Held(ref), Held(lo), Workspace()))
    assert compiled.nonfinite == torch_path.nonfinite == int((~torch.isfinite(lo)).sum())
    assert compiled.numel == ref.numel()
    r64, l64 = ref.double(), lo.double()
    finite = torch.isfinite(l64)
    assert compiled.sum_sq_ref == pytest.approx(float((r64**2).sum()), rel=1e-10)
    assert compiled.sum_sq_low == pytest.approx(float((l64[finite] ** 2).sum()), rel=1e-10)
    assert compiled.sum_sq_err == pytest.approx(float(((l64 - r64)[finite] ** 2).sum()), rel=1e-10)
    assert compiled.rel_l2_error == pytest.approx(torch_path.rel_l2_error, rel=1e-4)
    if low == "flushed":
        assert compiled.rel_l2_error == 1.0 and compiled.cosine is None


class _WideVocab(torch.nn.Module):
    """A language model whose embedding (2048 x 32) is past MIN_ELEMENTS, every activation under it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(2048, 32)
        self.mix = torch.nn.Linear(32, 32)
        self.norm = torch.nn.LayerNorm(32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.nn.functional.gelu(self.mix(self.embed(ids))))
        return h @ self.embed.weight.t()


def _lm_loss(out: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out.flatten(0, 1), ids.flatten())


def test_every_size_is_decided_by_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the module's own threshold
    small = torch.zeros(100)
    assert not cpu_kernels.enabled(small)
    with cpu_kernels.analysis_scope(torch.nn.Linear(8, 8)):  # no parameter past MIN_ELEMENTS
        assert not cpu_kernels.enabled(small)
    with cpu_kernels.analysis_scope(_WideVocab()):
        assert cpu_kernels.enabled(small) == (cpu_kernels._kernels() is not None)
    assert not cpu_kernels.enabled(small)


def test_the_environment_is_read_once_per_analysis(monkeypatch: pytest.MonkeyPatch) -> None:
    """Within an analysis the choice made at its start holds (a tensor's norm and its distance
    take one path); a bad value stops the analysis before it runs, in one line."""
    x = torch.zeros(10)
    with cpu_kernels.analysis_scope(torch.nn.Linear(2, 2)):
        monkeypatch.setenv(cpu_kernels.CPU_KERNELS_ENV, "torch")
        assert cpu_kernels.enabled(x) == (cpu_kernels._kernels() is not None)
    assert not cpu_kernels.enabled(x)  # outside, the environment as it is now
    monkeypatch.setenv(cpu_kernels.CPU_KERNELS_ENV, "fortran")
    calls: list[int] = []
    with pytest.raises(PrecisionDoctorError, match=f"^{cpu_kernels.CPU_KERNELS_ENV}='fortran'"):
        pd.analyze(torch.nn.Linear(2, 1), torch.randn(4, 2), lambda out, b: calls.append(1) or out.pow(2).mean())
    assert not calls


@needs_numba
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_an_analysis_of_a_model_with_a_large_parameter_summarizes_small_tensors_compiled(
    dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within an analysis of such a model the small tensors take the loops too, and the report
    is the torch path's: the same flags, counts and histograms, the errors to 1e-4."""
    monkeypatch.undo()  # the module's own threshold
    torch.manual_seed(0)
    model, ids = _WideVocab(), torch.randint(0, 2048, (4, 16))
    sizes: list[int] = []
    real = cpu_kernels.summary

    def counted(flat: torch.Tensor, *args: Any) -> cpu_kernels.RawSummary:
        sizes.append(flat.numel())
        return real(flat, *args)

    with monkeypatch.context() as mp:
        mp.setattr(cpu_kernels, "summary", counted)
        compiled = pd.analyze(model, ids, _lm_loss, dtype=dtype)
    assert any(n < cpu_kernels.MIN_ELEMENTS for n in sizes)
    with monkeypatch.context() as mp:
        mp.setenv(cpu_kernels.CPU_KERNELS_ENV, "torch")
        torch_path = pd.analyze(model, ids, _lm_loss, dtype=dtype)
    a, b = compiled.model_dump(), torch_path.model_dump()
    a.pop("environment")
    b.pop("environment")
    # the torch path's fp32 norms against float64 sums: floats to 1e-4, ints identical
    assert_same_fields(a, b, rel=1e-4, abs_tol=1e-12)
    assert [(f.unit, f.flag) for f in compiled.flags()] == [(f.unit, f.flag) for f in torch_path.flags()]
