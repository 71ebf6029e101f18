"""capture/readback.py on its own: jobs give what reading op by op gives, a batch of jobs reads
once per round whatever their number, and a held tensor keeps the values it had when a job
was queued even if it is written in place before the jobs run."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import precision_doctor as pd
from precision_doctor.capture import readback
from precision_doctor.capture.readback import Job, Parallel, Readback, run


def _stats_job(t: torch.Tensor) -> Job[tuple[float, int, float]]:
    """Two rounds: a sum and a count, then (depending on them) a max."""
    total, positive = yield (t.sum(), (t > 0).sum())
    biggest = yield t.max() if positive else t.min()
    return total, int(positive), biggest


def _reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the batched reads (`readback._values` calls) and checks each against `tolist`."""
    calls = [0]
    original = readback._values

    def counted(requests: list[torch.Tensor]) -> list[Any]:
        calls[0] += 1
        got = original(requests)
        for t, v in zip(requests, got, strict=True):
            assert v == (t.item() if t.dim() == 0 else t.tolist())  # exact, through float64
        return got

    monkeypatch.setattr(readback, "_values", counted)
    return calls


def test_run_gives_the_values_and_nested_parallel_results() -> None:
    t = torch.tensor([[1.5, -2.0], [4.0, 0.25]])

    def outer() -> Job[list[Any]]:
        rows = yield Parallel([_stats_job(t[0]), _stats_job(t[1])])
        whole = yield t.reshape(-1)
        return [*rows, whole]

    assert run(outer()) == [(-0.5, 1, 1.5), (4.25, 2, 4.0), [1.5, -2.0, 4.0, 0.25]]
    assert run(_stats_job(-t.abs())) == (-7.75, 0, -4.0)  # the other branch


@pytest.mark.parametrize("n_jobs", [1, 40])
def test_a_batch_reads_once_per_round_whatever_its_size(monkeypatch: pytest.MonkeyPatch, n_jobs: int) -> None:
    gen = torch.Generator().manual_seed(n_jobs)
    tensors = [torch.randn(7, generator=gen) for _ in range(n_jobs)]
    expected = [(float(t.sum()), int((t > 0).sum()), float(t.max() if (t > 0).any() else t.min())) for t in tensors]
    calls = _reads(monkeypatch)
    queue = Readback()
    got: list[Any] = []

    def collect(job: Job[Any]) -> Job[None]:
        got.append((yield from job))

    for t in tensors:
        queue.submit(collect(_stats_job(t)))
    assert calls[0] == 0  # nothing runs before the flush
    queue.flush()
    assert calls[0] == 2  # the two rounds, for every job at once
    assert sorted(got) == sorted(expected)  # float32 sums read exactly: the same floats


def test_held_tensor_written_in_place_keeps_its_queued_values() -> None:
    t = torch.tensor([1.0, 2.0, 3.0])
    queue = Readback()
    held = queue.hold(t)
    seen: list[float] = []
    order: list[str] = []

    def job() -> Job[None]:
        seen.append((yield held.t.sum()))
        order.append("job")

    queue.submit(job())
    queue.then(lambda: order.append("then"))
    queue.protect(t)  # what the pipeline's `before_write` does ...
    t.add_(10.0)  # ... before the op writes
    queue.flush()
    assert seen == [6.0] and float(t.sum()) == 36.0
    assert order == ["job", "then"]
    assert len(queue) == 0 and queue.held_bytes == 0


class _WritesItsOutput(nn.Module):
    """An op's output written in place by the next op: the op's statistics are its own values."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x) * 300.0
        y.mul_(1000.0)  # past fp16's range only after the write
        return y


def test_analysis_summarizes_an_output_before_it_is_written_in_place() -> None:
    torch.manual_seed(0)
    model = _WritesItsOutput()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        scaled = model.fc(x) * 300.0  # the mul's own output, independently
    report = pd.analyze(model, x, lambda out, b: out.float().pow(2).mean() * 1e-12, dtype="fp16")
    muls = [o for o in report.by_module()["<root>"].ops if o.op == "mul.Tensor" and o.phase == "forward"]
    assert muls, [o.op for o in report.by_module()["<root>"].ops]
    assert muls[0].max_abs == pytest.approx(float(scaled.abs().max()), rel=1e-6)
