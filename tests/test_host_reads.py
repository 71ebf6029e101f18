"""Host reads of device values in one analysis: the statistics stay on the device and are read
back a few times per phase (capture/readback.py), so the number of reads does not grow with
the number of ops.

Counted from outside the tool: a bare dispatch mode entered around `analyze` sees every
`aten._local_scalar_dense` (`.item()`, `float(t)`, `bool(t)`) dispatched while the tool's own
modes are on; the Tensor methods that read values without a dispatch (`.tolist()`,
`.numpy()`) or that copy to the host (`.cpu()`), and the conversions that the tool runs with
its modes off, are counted by wrapping them on `torch.Tensor`.

The reads bounded are the device path's (`capture.statistics`' torch jobs): the CPU's compiled
loops (`capture.cpu_kernels`) read a CPU tensor's memory in place, through `.numpy()`, and
never run on a GPU, so these tests run with them off."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import precision_doctor as pd
from precision_doctor.capture.cpu_kernels import CPU_KERNELS_ENV

from .fixtures import DeepMLP, build_gpt2, mlp_loss


@pytest.fixture(autouse=True)
def _device_path() -> Iterator[None]:
    # Its own patcher: the tests' `monkeypatch.undo()` would drop it after the first analysis.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CPU_KERNELS_ENV, "torch")
        yield


_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


class ScalarReads(TorchDispatchMode):
    """A bare mode: counts the ops that copy a tensor's value to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def counting_host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[collections.Counter[str]]:
    """Counts, by kind, every host read made inside: the Tensor methods (wrapped, so that
    reads made with the dispatch modes off count too) and the dispatched scalar reads (those
    the methods did not already count: an op's own read, e.g. `torch.nonzero` on a GPU)."""
    counts: collections.Counter[str] = collections.Counter()
    inside = [0]

    def wrap(name: str) -> None:
        original = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not inside[0]:
                counts[name] += 1
            inside[0] += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                inside[0] -= 1

        monkeypatch.setattr(torch.Tensor, name, read)

    for name in _READS:
        wrap(name)
    mode = ScalarReads()
    with mode:
        yield counts
    # The mode's count includes the wrapped methods' own dispatches only where the tool's
    # modes were on: count the dispatched reads no wrapper saw.
    counts["_local_scalar_dense (beyond the methods)"] = max(
        0, mode.count - sum(counts[n] for n in ("item", "__bool__", "__float__", "__int__", "__index__"))
    )
    monkeypatch.undo()


def _analysis_reads(depth: int, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int, collections.Counter[str]]:
    torch.manual_seed(0)
    model = DeepMLP(depth=depth)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    with counting_host_reads(monkeypatch) as counts:
        report = pd.analyze(model, x, mlp_loss, dtype="fp16")
    return sum(counts.values()), report.op_count_forward + report.op_count_backward, counts


def test_counter_sees_reads_with_modes_on_and_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The counter itself: a read inside a dispatch mode and one with the modes off both count."""
    from torch.utils._python_dispatch import _disable_current_modes

    t = torch.arange(6.0)
    with counting_host_reads(monkeypatch) as counts:
        float(t.sum())
        with _disable_current_modes():
            t.max().item()
            t.tolist()
        bool(t.any())
    assert sum(counts.values()) == 4


# A handful of read-back rounds for each of the analysis' phases (forward statistics, gradient
# statistics, parameter gradients, gradient fidelity, the propagated errors) and the two losses:
# how many rounds a phase takes depends on its values (an fp64 norm where fp32's is out of
# range, the tail counts of values past a format's range), never on how many ops made them.
MAX_HOST_READS = 24


def test_host_reads_do_not_grow_with_the_number_of_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    shallow, shallow_ops, shallow_counts = _analysis_reads(4, monkeypatch)
    deep, deep_ops, deep_counts = _analysis_reads(32, monkeypatch)
    assert deep_ops > 6 * shallow_ops  # the deep model runs many more ops ...
    assert shallow <= MAX_HOST_READS, shallow_counts  # ... and both read back a bounded number of times
    assert deep <= MAX_HOST_READS, deep_counts
    assert deep < shallow_ops  # not even one read per op of the shallow model


def test_host_reads_of_a_masked_transformer_do_not_grow_with_its_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT-2's causal mask reaches four ops per layer (capture/masks.py): whether a mask holds
    any masked position is read with the statistics too, not op by op."""
    pytest.importorskip("transformers")
    reads = {}
    for layers in (2, 6):
        case = build_gpt2(layers=layers)
        with counting_host_reads(monkeypatch) as counts:
            report = pd.analyze(case.model, case.batch, case.loss_fn, dtype="fp16")
        reads[layers] = (sum(counts.values()), report.op_count_forward + report.op_count_backward, counts)
    (shallow, shallow_ops, shallow_counts), (deep, deep_ops, deep_counts) = reads[2], reads[6]
    assert deep_ops > 2.5 * shallow_ops
    assert shallow <= MAX_HOST_READS, shallow_counts
    assert deep <= MAX_HOST_READS, deep_counts
