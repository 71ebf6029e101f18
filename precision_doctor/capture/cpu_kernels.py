"""The statistics' per-value work on the CPU as compiled loops (numba), one read of a tensor
from memory each: a summary (`summary`), and a shadow's distance from its reference with the
squared norms (`squared_distance(s)`, also those of `statistics.squared_norm`).

On the CPU the torch path of a summary (`statistics._chunk_job`) is a dozen kernels over the
values - the bit patterns, their exponents widened to int64 for a `scatter_add_` histogram,
a min and a max, the tail compares - and a few Python rounds per 1M-value chunk: measured
~6 ns per value in a GPT-2 analysis, where the loops take ~1 (`benchmarks/README.md`). On a GPU the torch path runs, on the
device (`capture/readback.py`); here a host read costs nothing to save.

The loops are exact where the torch path is (counts, bit patterns) and compute their sums of
squares in float64, per fixed block of `BLOCK_ELEMENTS` values and then over the blocks in
order: the same sums on one thread or many (the distance's sums are vectorized, so their last
bits follow the CPU's vector width; the torch path's fp32 norms are ~1e-5 off anyway). A
distance of 2x128x768 values takes ~0.2 ns a value against ~0.7 for the torch path's upcast,
subtraction and two norms. A summary is two short loops per block, a histogram and the
extremes, with the counts read off the histogram: ~0.5 ns a value on two threads for a tensor
timed alone, ~0.75-1 ns in an analysis, where the tensor has left the core's cache
(`docs/benchmarks.md`, History). `PRECISION_DOCTOR_CPU_KERNELS=torch` runs the torch path
instead (it is also the path where numba is not installed); `tests/test_cpu_kernels.py` holds
the two to the same summaries.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch

from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.formats import FormatLimits

__all__ = [
    "CPU_KERNELS_ENV",
    "MIN_ELEMENTS",
    "RawSummary",
    "analysis_scope",
    "enabled",
    "squared_distance",
    "squared_distances",
    "summary",
]

CPU_KERNELS_ENV = "PRECISION_DOCTOR_CPU_KERNELS"
"""`numba` (or unset): the compiled loops where numba imports; `torch`: the torch kernels."""

BLOCK_ELEMENTS = 1 << 16
# Smaller tensors take the torch path: a model with none larger (the demo) never imports numba
# and loads its compiled loops (~0.7 s a process), which its statistics would not repay.
MIN_ELEMENTS = 1 << 15
# Below this many values one thread does it all (a launch on more costs more than it saves).
PARALLEL_ELEMENTS = 1 << 17

# numba's default threading layer aborts on launches from two threads at once.
_LOCK = threading.Lock()


def _import_kernels() -> ModuleType:
    from precision_doctor.capture import _numba_kernels

    return _numba_kernels


@functools.cache
def _kernels() -> ModuleType | None:
    """The compiled loops, or None where they cannot load: numba missing, or (`cache=True`)
    raising that it has no writable cache directory (a read-only install and home)."""
    try:
        return _import_kernels()
    except (ImportError, RuntimeError, OSError):
        return None


def _env_allows() -> bool:
    """Whether `PRECISION_DOCTOR_CPU_KERNELS` leaves the loops on (a bad value: one line)."""
    choice = os.environ.get(CPU_KERNELS_ENV, "").strip().lower()
    if choice == "torch":
        return False
    if choice not in ("", "numba"):
        raise PrecisionDoctorError(f"{CPU_KERNELS_ENV}={choice!r}: use numba (the default) or torch")
    return True


@dataclass(frozen=True)
class _Scope:
    env_allows: bool
    every_size: bool


# What `analysis_scope` decided for the analysis running in this context.
_SCOPE: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar("cpu_kernels_scope", default=None)


@contextlib.contextmanager
def analysis_scope(model: torch.nn.Module) -> Iterator[None]:
    """Within (an analysis of `model`), decided once before anything runs: whether the
    environment lets the loops run (read and validated here, not per tensor: 2.3 -> 0.6 us a
    call, a few calls a tensor), and whether tensors of any size take them, where `model` has
    a parameter of `MIN_ELEMENTS` values or more (its gradient loads them anyway). A small
    tensor's summary is a few torch kernels and Python rounds, ~10x a serial loop's cost: a
    GRU unrolled over 32 tokens, 1982 ops of a few thousand values, analyzed in 0.39-0.44 s
    instead of 0.49-0.52. The same paths for every tensor of every analysis of the model (a
    tensor's norm and its distance from a shadow taking one path each time)."""
    large = any(p.numel() >= MIN_ELEMENTS and p.device.type == "cpu" for p in model.parameters())
    token = _SCOPE.set(_Scope(env_allows=_env_allows(), every_size=large))
    try:
        yield
    finally:
        _SCOPE.reset(token)


def enabled(t: torch.Tensor) -> bool:
    """Whether `t`'s statistics run through the compiled loops: a CPU tensor of at least
    `MIN_ELEMENTS` values (any size within `analysis_scope` for a model that has a large
    one), numba there, and not switched off by `PRECISION_DOCTOR_CPU_KERNELS=torch`. Decided
    by the tensor and that scope alone, so a tensor's norm and its distance from a shadow take
    the same path."""
    if t.device.type != "cpu":
        return False
    scope = _SCOPE.get()
    if scope is None:  # statistics outside an analysis: the environment as it is now
        return t.numel() >= MIN_ELEMENTS and _env_allows() and _kernels() is not None
    return scope.env_allows and (scope.every_size or t.numel() >= MIN_ELEMENTS) and _kernels() is not None


def _bits(value: float) -> int:
    return int(np.array([value], dtype=np.float32).view(np.int32)[0])


@functools.cache
def _thresholds(formats: tuple[FormatLimits, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.array([_bits(f.max_value) for f in formats], dtype=np.int64),
        np.array([_bits(f.smallest_subnormal) for f in formats], dtype=np.int64),
        np.array([_bits(f.smallest_normal) for f in formats], dtype=np.int64),
    )


@dataclass(frozen=True)
class RawSummary:
    """What one pass found: the histogram, zero and NaN counts, the largest finite and the
    smallest nonzero finite bit patterns (0 and 0x7F800000 where there is none), per format
    the counts above its max, below its smallest subnormal and below its smallest normal
    (nonzero, finite), and the sums of x^2 per bin and over all finite values."""

    hist: np.ndarray
    zero_count: int
    nan_count: int
    max_bits: int
    min_nonzero_bits: int
    above_max: tuple[int, ...]
    below_subnormal: tuple[int, ...]
    below_normal: tuple[int, ...]
    sumsq: np.ndarray | None
    sumsq_total: float


def summary(flat: torch.Tensor, formats: tuple[FormatLimits, ...], sumsq_bins: int, with_sumsq: bool) -> RawSummary:
    """The summary of a contiguous 1-d float32 CPU tensor (`enabled` must hold)."""
    k = _kernels()
    assert k is not None and len(formats) == k.N_FORMATS
    values = flat.detach().numpy()
    maxes, subs, norms = _thresholds(formats)
    args = (values.view(np.int32), values, BLOCK_ELEMENTS, maxes, subs, norms, with_sumsq)
    hist, cnt, sums, tot = _run(k.summary_blocks, k.summary_serial, values.size, *args)
    n = k.N_FORMATS
    below_subnormal, below_normal = cnt[4 + n : 4 + 2 * n], cnt[4 + 2 * n :]
    return RawSummary(
        hist=hist,
        zero_count=int(cnt[0]),
        nan_count=int(cnt[1]),
        max_bits=int(cnt[2]),
        min_nonzero_bits=int(cnt[3]),
        above_max=tuple(cnt[4 : 4 + n].tolist()),
        below_subnormal=tuple(below_subnormal.tolist()),
        below_normal=tuple(below_normal.tolist()),
        sumsq=sums[:sumsq_bins] if with_sumsq else None,
        sumsq_total=tot if with_sumsq else 0.0,
    )


def _run(parallel: Callable[..., Any], serial: Callable[..., Any], n: int, *args: Any) -> Any:
    """`parallel(*args)`, a `parallel=True` loop, on as many of numba's threads as torch may use
    (what the user allows) for a tensor of `n` values past `PARALLEL_ELEMENTS`; else
    `serial(*args)`, the same loop without the launch. numba's OpenMP layer shares the runtime
    torch runs on, and starting it sets the runtime's thread count (torch's `get_num_threads()`
    went from 1 to the number of cores): torch's count is put back after each call. The lock:
    numba's fallback layer (workqueue) takes one launch at a time."""
    k = _kernels()
    assert k is not None
    threads = min(torch.get_num_threads(), k.nb.config.NUMBA_NUM_THREADS) if n > PARALLEL_ELEMENTS else 1
    if threads == 1:
        return serial(*args)
    with _LOCK:
        before = torch.get_num_threads()
        k.nb.set_num_threads(threads)
        try:
            return parallel(*args)
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)


def squared_distance(ref: torch.Tensor, shadow: torch.Tensor) -> tuple[float, float]:
    """(||shadow - ref||^2, ||ref||^2) of two contiguous 1-d float32 CPU tensors of one size:
    each difference rounded to fp32 as a torch subtraction makes it, the squares summed in
    float64 per block (`enabled` must hold for both). Non-finite where either holds Inf/NaN."""
    err, total, _ = squared_distances(ref, shadow)
    return err, total


def squared_distances(ref: torch.Tensor, other: torch.Tensor) -> tuple[float, float, float]:
    """(||other - ref||^2, ||ref||^2, ||other||^2) in one pass, as `squared_distance` sums them
    (a gradient comparison needs all three: `analysis.gradients.GradComparison`)."""
    k = _kernels()
    assert k is not None
    r, s = ref.detach().numpy(), other.detach().numpy()
    err, total, own = _run(k.distance_blocks, k.distance_serial, r.size, r, s, BLOCK_ELEMENTS)
    return float(err), float(total), float(own)
