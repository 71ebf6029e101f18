"""Where the analysis runs: one process, or one rank of a torch.distributed job.

`analysis_job` picks the kind once, before any pass runs; the engine's phases then ask it the
three things that differ (`engine.analyze`):

- whether a failure inside the model's passes must abort the job at once (`fail_fast`);
- the report: this process's capture judged (`report`), or the job's, combined across ranks
  (`distributed.Job.report`);
- the gradient fidelity: the low run's parameter gradients against fp32's
  (`gradient_fidelity`), streamed in one process, gathered, averaged and counted once per
  element in a job.

The kinds, as classes (each an `AnalysisJob`):

- `SingleProcess`: a plain model, no job;
- `ShardedSingleProcess`: DTensor parameters (FSDP2, tensor parallel) on a process group of
  one rank: the gradients are counted by placement;
- `RankOfJob`: a plain module on every rank of a job (each rank's data, its own gradients);
- `DataParallelRank`: DDP's module, whose gradients the analysis averages as DDP would;
- `ShardedRank`: FSDP2 or tensor parallel across ranks, whose passes run the model's own
  collectives (the ranks meet before the backward, and a failing rank aborts the job).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

from precision_doctor.analysis.distributed import Job
from precision_doctor.analysis.gradients import (
    GradComparer,
    rank_grad_divergence,
    with_grad_fidelity,
)
from precision_doctor.capture.lowrun import GradientSink
from precision_doctor.capture.shadow import ShadowCapture
from precision_doctor.capture.statistics import TensorSummary, Workspace
from precision_doctor.model.parallel import counted_parts, is_sharded, is_tensor_parallel
from precision_doctor.options import Wrapper
from precision_doctor.report import FlagRecord, Report
from precision_doctor.runtime.distributed import exchange

__all__ = [
    "AnalysisJob",
    "DataParallelRank",
    "RankOfJob",
    "ShardedRank",
    "ShardedSingleProcess",
    "SingleProcess",
    "analysis_job",
]

Grads = dict[str, torch.Tensor]
LowBackward = Callable[[GradientSink], None]
"""Runs the low backward at the fidelity's loss scale, each unscaled gradient into the sink."""
BuildReport = Callable[..., Report]


@dataclass(frozen=True)
class CapturedStep:
    """What the report phase hands a job: the capture of the fp32 step, its parameter
    gradients' statistics, and the build that makes a report of them. `grads` are the
    analysis' fp32 gradients, which `gradient_fidelity` reads later if `fidelity_follows`."""

    build: BuildReport
    capture: ShadowCapture
    param_stats: dict[str, TensorSummary]
    model: torch.nn.Module
    grads: Grads
    fidelity_follows: bool


@dataclass(frozen=True)
class LowGradients:
    """What the gradient-fidelity phase hands a job: the report so far, the fp32 gradients,
    and the low backward at 2^`scale_log2`, which hands each low gradient to a sink."""

    report: Report
    model: torch.nn.Module
    grads: Grads
    scale_log2: int
    workspace: Workspace
    low_backward: LowBackward
    keep: dict[str, torch.Tensor] | None = None
    """Where given (a pure-regime report with an optimizer step, one process): each low
    gradient is also kept here, by every name of its parameter, in `keep_dtype` (the applied
    optimizer step then steps the low run's own gradients)."""
    keep_dtype: torch.dtype | None = None
    drop_compared: bool = False
    """Whether `grads` may lose each fp32 gradient once it is compared (`GradComparer`): the
    caller reads them no more."""


"""`engine.build_report`: a capture and its parameter gradients' summaries judged."""


def analysis_job(model: torch.nn.Module, wrapper: Wrapper) -> AnalysisJob:
    """The kind of run for `model` (already unwrapped: `runtime.distributed.unwrap`)."""
    job = Job.of(model, wrapper)
    if job is None:
        return ShardedSingleProcess() if is_sharded(model) else SingleProcess()
    if job.wrapper is Wrapper.DDP:
        return DataParallelRank(job)
    if job.wrapper in (Wrapper.FSDP2, Wrapper.TP):
        return ShardedRank(job)
    return RankOfJob(job)


def _gathered(low_backward: LowBackward) -> Grads:
    """Every low gradient at once, by each name of its parameter: what is compared after the
    job's reductions (a streamed comparison could not average or count them first)."""
    low_grads: Grads = {}

    def keep(names: list[str], g: torch.Tensor) -> None:
        low_grads.update(dict.fromkeys(names, g))

    low_backward(keep)
    return low_grads


class AnalysisJob:
    """Where the analysis runs; by default in one process, whose report is its own capture's."""

    fail_fast = False
    """Whether a failure in the model's passes aborts the job at once (`runtime.distributed.fail_fast`)."""

    def before_backward(self) -> None:
        """The moment before the fp32 backward, once this rank's loss is known to be sound."""

    def report(self, step: CapturedStep, **kwargs: Any) -> Report:
        """The report `step.build` makes of the capture (`kwargs`: `build`'s own)."""
        return step.build(step.capture, step.param_stats, **kwargs)

    def gradient_fidelity(self, low: LowGradients) -> Report:
        """`low.report` with the low backward's gradients at 2^`low.scale_log2` compared with
        the fp32 ones (`low.grads`)."""
        raise NotImplementedError


class SingleProcess(AnalysisJob):
    """One process, a plain model: each low gradient is compared as it arrives and dropped,
    never all at once (`GradComparer`)."""

    def gradient_fidelity(self, low: LowGradients) -> Report:
        comparer = GradComparer(low.grads, low.workspace, drop_compared=low.drop_compared)
        keep, dtype = low.keep, low.keep_dtype
        if keep is None:
            low.low_backward(comparer.add)
        else:

            def add(names: list[str], g: torch.Tensor) -> None:
                comparer.add(names, g)
                kept = g.to(dtype) if dtype is not None else g
                for n in names:
                    keep.setdefault(n, kept)

            low.low_backward(add)
        return comparer.with_fidelity(low.report, low.scale_log2)


class ShardedSingleProcess(AnalysisJob):
    """DTensor gradients outside a job: the parts this process counts, as local tensors
    (`model.parallel.counted_parts`), which a streamed comparison could not pick."""

    def gradient_fidelity(self, low: LowGradients) -> Report:
        replicated = is_tensor_parallel(low.model)
        grads = counted_parts(low.grads, replicated=replicated)
        low_grads = counted_parts(_gathered(low.low_backward), replicated=replicated)
        return with_grad_fidelity(
            low.report, grads, low_grads, low.scale_log2, low.workspace, job_params=None, rank_flags=[]
        )


class RankOfJob(AnalysisJob):
    """One rank of a job of more than one rank: the report is the job's (`Job.report`), and
    the gradient fidelity is judged on the job's gradients, each element counted on one rank,
    with each rank's own GRAD_DIVERGENCE kept for `Report.ranks`."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.own: list[Report] = []  # this rank's own report (`Job.report` appends it)

    def report(self, step: CapturedStep, **kwargs: Any) -> Report:
        return self.job.report(
            step.build, step.capture, step.param_stats, step.model, step.grads, keep_own=self.own, **kwargs
        )

    def gradient_fidelity(self, low: LowGradients) -> Report:
        report, model, scale_log2, workspace = low.report, low.model, low.scale_log2, low.workspace
        low_grads = _gathered(low.low_backward)
        own_flags = self._own_divergence(low_grads, scale_log2, workspace)
        self.job.average_gradients(model, low_grads)  # compared with the averaged fp32 ones
        # Each element compared on one rank, as the gradient statistics count it; the sums
        # are the job's before GRAD_DIVERGENCE is judged.
        grads, low_grads = self.job.counted_gradients(low.grads), self.job.counted_gradients(low_grads)
        if own_flags is None:  # the parts this rank holds: its own already
            own_flags = rank_grad_divergence(self.own[0], grads, low_grads, scale_log2, workspace)
        tied: dict[int, list[str]] = {}
        for pname, p in model.named_parameters(remove_duplicate=False):
            tied.setdefault(id(p), []).append(pname)
        return with_grad_fidelity(
            report, grads, low_grads, scale_log2, workspace, job_params=list(tied.values()), rank_flags=own_flags
        )

    def _own_divergence(self, low_grads: Grads, scale_log2: int, workspace: Workspace) -> list[FlagRecord] | None:
        """This rank's own GRAD_DIVERGENCE where it must be judged before the job's
        reductions change the gradients; None: judged on the counted parts."""
        return None


class DataParallelRank(RankOfJob):
    """DDP: the job's report averages the fp32 gradients in place (as DDP's reducer would),
    so this rank's own GRAD_DIVERGENCE compares a copy taken before, and its low gradients
    before they are averaged too."""

    def __init__(self, job: Job) -> None:
        super().__init__(job)
        self.own_fp32: Grads | None = None

    def report(self, step: CapturedStep, **kwargs: Any) -> Report:
        if step.fidelity_follows:
            copies: dict[int, torch.Tensor] = {}  # one per tied tensor
            self.own_fp32 = {n: copies.setdefault(id(g), g.clone()) for n, g in step.grads.items()}
        return super().report(step, **kwargs)

    def _own_divergence(self, low_grads: Grads, scale_log2: int, workspace: Workspace) -> list[FlagRecord] | None:
        assert self.own_fp32 is not None
        own_fp32, self.own_fp32 = self.own_fp32, None  # dropped once read: a copy of every gradient
        return rank_grad_divergence(self.own[0], own_fp32, low_grads, scale_log2, workspace)


class ShardedRank(RankOfJob):
    """FSDP2 or tensor parallel across ranks: the other ranks wait in the model's own
    collectives for a rank that fails in a pass, so that rank aborts the job at once, naming
    itself (`fail_fast`); and a rank whose loss failed says so before the backward runs those
    collectives."""

    fail_fast = True

    def before_backward(self) -> None:
        with _disable_current_modes():  # the checkpoint is no op of the model
            exchange(None)
