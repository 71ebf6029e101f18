"""Host reads of device values, batched: what the capture's statistics read back to the host is
read once per round for every pending computation together, not once per op.

A computation that needs device values on the host is written as a generator (a *job*): it
launches its kernels, yields the device tensors it wants read (one tensor, or a tuple of
them), and gets back their values - a Python float for a 0-dim tensor, a list of floats
otherwise (every value goes through float64, exact for the counts, bit patterns and fp32/fp64
norms the statistics read). `yield Parallel(jobs)` runs sub-jobs side by side and gets their
return values. Run one job at once with `run` (each round one read, as many rounds as the
job's longest chain of reads), or hand many to a `Readback`, which runs them all in lock-step
when flushed: one read per round for all of them, so the reads of a whole phase are bounded
by the deepest job (a handful of rounds), not by the number of ops.

A job reads its tensors when it runs, which may be long after it was submitted: whatever it
reads must still hold the values it stood for then. `Readback.hold` keeps a tensor for a
job, and `Readback.protect(t)`, called before anything writes `t` in place, gives the jobs
holding it a copy first. A job must not keep a reused buffer (a `Workspace` slot) across a
yield: other jobs run in between and reuse it.

On the CPU a read is a memory access; on a GPU each one waits for the stream to drain, which
is what batching saves.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")
Request = torch.Tensor | tuple[torch.Tensor, ...]
Job = Generator[Any, Any, T]
"""A generator yielding a `Request` (answered with its values) or `Parallel` (answered with
the list of its jobs' return values), returning its result."""

# Pending tensors held past this many bytes (distinct storages) flush the queue at the next
# op boundary: what the held tensors keep alive beyond their own lifetime stays bounded. On
# the CPU a read waits for nothing, and memory is what holding costs (RSS that would have been
# freed, and page faults to get it back): there the queue runs every megabyte.
HOLD_BUDGET_BYTES = 64 << 20
CPU_HOLD_BUDGET_BYTES = 1 << 20


@dataclass(frozen=True)
class Parallel:
    """Yielded by a job: run these jobs side by side; the reply is their results, in order."""

    jobs: Sequence[Job[Any]]


class Held:
    """A tensor a pending job reads: `protect` swaps in a copy before the tensor is written."""

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Task:
    __slots__ = ("gen", "parent", "results", "slot", "waiting")

    def __init__(self, gen: Job[Any], parent: _Task | None, slot: int) -> None:
        self.gen = gen
        self.parent = parent
        self.slot = slot
        self.results: list[Any] = []
        self.waiting = 0


def _values(requests: list[torch.Tensor]) -> list[Any]:
    """One host read for all requested tensors (per device): their values, as floats."""
    out: list[Any] = [None] * len(requests)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(requests):
        by_device.setdefault(t.device, []).append(i)
    for idx in by_device.values():
        parts = [requests[i].detach().reshape(-1) for i in idx]
        # One kernel: cat promotes every part to float64 (the empty first one's dtype), exact
        # for counts below 2^53 and for fp32/fp64 values.
        flat: list[float] = torch.cat([parts[0].new_empty(0, dtype=torch.float64), *parts]).tolist()
        start = 0
        for i in idx:
            n = requests[i].numel()
            out[i] = flat[start] if requests[i].dim() == 0 else flat[start : start + n]
            start += n
    return out


def _drive(roots: list[Job[Any]]) -> list[Any]:
    """Run jobs in lock-step: every job runs until it waits on a read, then all waiting reads
    are done at once. Returns the roots' results."""
    root = _Task(iter(()), None, 0)  # type: ignore[arg-type]  # a sentinel parent, never stepped
    root.results = [None] * len(roots)
    root.waiting = len(roots)
    ready: list[tuple[_Task, Any]] = [(_Task(g, root, i), None) for i, g in enumerate(roots)]
    while ready:
        waiting: list[tuple[_Task, Request]] = []
        while ready:
            task, reply = ready.pop()
            try:
                req = task.gen.send(reply)
            except StopIteration as stop:
                parent = task.parent
                assert parent is not None
                parent.results[task.slot] = stop.value
                parent.waiting -= 1
                if parent.waiting == 0 and parent is not root:
                    ready.append((parent, parent.results))
                continue
            if isinstance(req, Parallel):
                if not req.jobs:
                    ready.append((task, []))
                    continue
                task.results = [None] * len(req.jobs)
                task.waiting = len(req.jobs)
                ready.extend((_Task(g, task, i), None) for i, g in enumerate(req.jobs))
            else:
                waiting.append((task, req))
        if not waiting:
            break
        tensors: list[torch.Tensor] = []
        for _, req in waiting:
            tensors.extend(req if isinstance(req, tuple) else (req,))
        values = _values(tensors)
        k = 0
        for task, req in waiting:
            if isinstance(req, tuple):
                ready.append((task, tuple(values[k : k + len(req)])))
                k += len(req)
            else:
                ready.append((task, values[k]))
                k += 1
    return root.results


def run(job: Job[T]) -> T:
    """Run one job now (one read per round of it)."""
    result: T = _drive([job])[0]
    return result


class Readback:
    """Jobs waiting for one batched run (`flush`), the tensors they hold, and the callbacks
    that read their results, run after them in the order they were queued."""

    def __init__(self) -> None:
        self._jobs: list[Job[Any]] = []
        self._then: list[Callable[[], None]] = []
        self._held: dict[int, list[Held]] = {}
        self.held_bytes = 0
        self._budget = HOLD_BUDGET_BYTES

    def __len__(self) -> int:
        return len(self._jobs) + len(self._then)

    @property
    def over_budget(self) -> bool:
        return self.held_bytes > self._budget

    def hold(self, t: torch.Tensor) -> Held:
        """Keep `t` for a pending job (see `protect`), as a detached alias: a mode that still
        references the very tensor an op returns makes torch re-wrap it for the caller, a
        `detach` the model's code would see. Call it with the capture modes off."""
        h = Held(t.detach())
        key = _storage_key(t)
        holders = self._held.get(key)
        if holders is None:
            self._held[key] = [h]
            self.held_bytes += t.untyped_storage().nbytes()
            if t.device.type == "cpu":
                self._budget = CPU_HOLD_BUDGET_BYTES
        else:
            holders.append(h)
        return h

    def protect(self, t: torch.Tensor) -> None:
        """`t` is about to be written in place: the pending jobs that read its memory get a
        copy of what it holds now."""
        if not self._held:
            return
        holders = self._held.pop(_storage_key(t), None)
        for h in holders or ():
            h.t = h.t.clone()

    def submit(self, job: Job[Any]) -> None:
        self._jobs.append(job)

    def then(self, fn: Callable[[], None]) -> None:
        """Run `fn` after the jobs submitted so far have run, in the order of `then` calls."""
        self._then.append(fn)

    def flush(self) -> None:
        """Run every pending job (one read per round for all), then the callbacks, in order;
        callbacks that submit more jobs get them run too."""
        while self._jobs or self._then:
            jobs, self._jobs = self._jobs, []
            if jobs:
                with torch.no_grad():
                    _drive(jobs)
            self._held.clear()
            self.held_bytes = 0
            self._budget = HOLD_BUDGET_BYTES
            then, self._then = self._then, []
            for fn in then:
                fn()
