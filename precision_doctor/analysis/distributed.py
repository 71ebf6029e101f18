"""Distributed analysis: one report for a torch.distributed job (`torchrun`).

Every rank captures its own part of the step (its data shard, its shard of the parameters);
the statistics are then combined across ranks *before* any flag is computed, so the flags are
the job's, judged once on the combined statistics (never one rank's flags OR-ed with
another's):

- histograms, counts and format tails summed; maxima reduced with max, minima with min; error
  sums of squares summed (a relative error is recomputed from the sums); loss-scale fractions
  follow from the summed histograms;
- activations and their gradients are each rank's own data: summed;
- parameter gradients are counted once per element: under `DistributedDataParallel` they are
  averaged across ranks (as DDP's reducer does: each divided by the world size, then summed)
  and each rank summarizes a 1/world_size slice of the result; a plain module's gradients are
  each rank's own (summed). DTensor gradients (FSDP2, tensor parallel) are counted by
  placement (`Shard`: each shard; `Replicate`: one copy; `Partial`: after the reduction);
- losses: each rank's own (`Report.ranks`), and the job's, their mean.

The statistics are combined with a handful of batched collectives (`StatsReducer`): three
`all_reduce`s of flat int64/float64 tensors, keyed by a deterministic order of ops and units
that every rank checks against rank 0's first. The job itself (the process group, the
checkpoints that give every rank the same outcome) is the runtime's: `runtime.distributed`.

Nothing here runs (and nothing is imported from torch.distributed) unless a process group of
more than one rank is initialized.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import torch

from precision_doctor.capture.records import UnitRecord
from precision_doctor.capture.statistics import (
    HIST_BINS,
    SUMSQ_BINS,
    ErrorAccumulator,
    SummaryBatch,
    TailCounts,
    TensorSummary,
    Workspace,
    relative_loss_error,
)
from precision_doctor.model.parallel import counted_parts, is_dtensor
from precision_doctor.options import Phase, Wrapper
from precision_doctor.report import DistributedJob, Losses, RankResult, Report
from precision_doctor.runtime.distributed import (
    RanksFailedError,
    active,
    collective_device,
    exchange,
    mesh_shape,
    rank,
    world_size,
)

__all__ = ["Job", "StatsReducer"]

# Elements per all_reduce of averaged gradients (DDP's default bucket is 25 MiB).
GRAD_BUCKET_ELEMENTS = 1 << 22


# --- combining statistics across ranks ------------------------------------------------------

_TAIL_NAMES = tuple(TensorSummary().tails)
_SUMMARY_HEAD = 5 + 3 * len(_TAIL_NAMES) + 1  # present, numel, zeros, nans, infs, tails, has sumsq
_EMPTY = TensorSummary()


class _Stream:
    """One flat array being packed: runs of scalars kept as a Python list until an array comes
    (one `np.array` per run, not per value: the capture of GPT-2 small is ~10^4 values)."""

    def __init__(self, dtype: type) -> None:
        self.dtype = dtype
        self.chunks: list[np.ndarray] = []
        self.pending: list[float] = []
        self.size = 0

    def scalars(self, *values: float) -> int:
        start = self.size
        self.pending.extend(values)
        self.size += len(values)
        return start

    def array(self, a: np.ndarray) -> int:
        start = self.size
        self._flush()
        self.chunks.append(a)
        self.size += len(a)
        return start

    def _flush(self) -> None:
        if self.pending:
            self.chunks.append(np.array(self.pending, dtype=self.dtype))
            self.pending = []

    def packed(self) -> np.ndarray:
        self._flush()
        return np.concatenate(self.chunks).astype(self.dtype, copy=False) if self.chunks else np.zeros(0, self.dtype)


Decoder = Callable[[np.ndarray, np.ndarray, np.ndarray], None]


class StatsReducer:
    """Statistics of this rank, registered under keys, then combined across the job's ranks
    by `reduce()`: each registered value is replaced (through its `assign` callback) by the
    job's. Every rank must register the same keys in the same order (the same ops and units):
    `reduce()` checks that first, and names the ranks that differ.

    Values are packed into three flat tensors (int64 sums, float64 sums, float64 maxima; a
    minimum is the maximum of its negation), each one `all_reduce`.

    `replicated=True` (a value every rank holds the same copy of) counts rank 0's only.

    >>> r = StatsReducer(); out = {}
    >>> r.maximum("m", 2.5, lambda v: out.update(m=v)); r.total("n", 3, lambda v: out.update(n=v))
    >>> r.reduce(); out  # one process: its own values
    {'m': 2.5, 'n': 3}
    """

    def __init__(self) -> None:
        self._ints = _Stream(np.int64)
        self._sums = _Stream(np.float64)
        self._maxs = _Stream(np.float64)
        self._keys: list[str] = []
        self._decoders: list[Decoder] = []
        self._texts: list[tuple[str | None, Callable[[str | None], None]]] = []
        self._gathers: list[tuple[Any, Callable[[list[Any]], None]]] = []
        self._rank = rank()

    def summary(
        self,
        key: str,
        s: TensorSummary | None,
        assign: Callable[[TensorSummary | None], None],
        *,
        grad: bool = False,
        replicated: bool = False,
    ) -> None:
        """A `TensorSummary` (None: this rank has none; the job's is None only if no rank has
        one). `grad`: it may carry sums of squares (gradients)."""
        own = s is not None and not (replicated and self._rank != 0)
        src = s if own and s is not None else _EMPTY
        head = [int(own), src.numel, src.zero_count, src.nan_count, src.inf_count]
        for name in _TAIL_NAMES:
            t = src.tails[name]
            head += [t.overflow, t.flushed, t.subnormal]
        head.append(int(src.sumsq is not None))
        i0 = self._ints.scalars(*head)
        self._ints.array(src.hist)
        s0 = 0
        if grad:
            s0 = self._sums.array(src.sumsq if src.sumsq is not None else np.zeros(SUMSQ_BINS))
            self._sums.scalars(src.sumsq_total if src.sumsq is not None else 0.0)
        m0 = self._maxs.scalars(src.max_abs, -src.min_nonzero_abs)

        def decode(i: np.ndarray, f: np.ndarray, m: np.ndarray) -> None:
            if not i[i0]:
                assign(None)
                return
            tails = {}
            for k, name in enumerate(_TAIL_NAMES):
                o = i0 + 5 + 3 * k
                tails[name] = TailCounts(overflow=int(i[o]), flushed=int(i[o + 1]), subnormal=int(i[o + 2]))
            has_sumsq = grad and bool(i[i0 + _SUMMARY_HEAD - 1])
            assign(
                TensorSummary(
                    numel=int(i[i0 + 1]),
                    zero_count=int(i[i0 + 2]),
                    nan_count=int(i[i0 + 3]),
                    inf_count=int(i[i0 + 4]),
                    max_abs=float(m[m0]),
                    min_nonzero_abs=float(-m[m0 + 1]),
                    hist=i[i0 + _SUMMARY_HEAD : i0 + _SUMMARY_HEAD + HIST_BINS].copy(),
                    sumsq=f[s0 : s0 + SUMSQ_BINS].copy() if has_sumsq else None,
                    sumsq_total=float(f[s0 + SUMSQ_BINS]) if has_sumsq else 0.0,
                    tails=tails,
                )
            )

        self._keys.append(key)
        self._decoders.append(decode)

    def error(self, key: str, acc: ErrorAccumulator | None, assign: Callable[[ErrorAccumulator | None], None]) -> None:
        """An `ErrorAccumulator`: its sums of squares and mismatch count summed."""
        src = acc if acc is not None else ErrorAccumulator()
        i0 = self._ints.scalars(int(acc is not None), src.nonfinite_mismatch)
        s0 = self._sums.scalars(src.sum_sq_ref, src.sum_sq_err)

        def decode(i: np.ndarray, f: np.ndarray, m: np.ndarray) -> None:
            assign(ErrorAccumulator(float(f[s0]), float(f[s0 + 1]), int(i[i0 + 1])) if i[i0] else None)

        self._keys.append(key)
        self._decoders.append(decode)

    def maximum(self, key: str, value: float, assign: Callable[[float], None]) -> None:
        m0 = self._maxs.scalars(value)
        self._keys.append(key)
        self._decoders.append(lambda i, f, m: assign(float(m[m0])))

    def minimum(self, key: str, value: float, assign: Callable[[float], None]) -> None:
        m0 = self._maxs.scalars(-value)
        self._keys.append(key)
        self._decoders.append(lambda i, f, m: assign(float(-m[m0])))

    def total(self, key: str, value: int, assign: Callable[[int], None]) -> None:
        i0 = self._ints.scalars(value)
        self._keys.append(key)
        self._decoders.append(lambda i, f, m: assign(int(i[i0])))

    def float_total(self, key: str, value: float, assign: Callable[[float], None]) -> None:
        """A float summed over ranks (in float64)."""
        s0 = self._sums.scalars(value)
        self._keys.append(key)
        self._decoders.append(lambda i, f, m: assign(float(f[s0])))

    def any(self, key: str, value: bool, assign: Callable[[bool], None]) -> None:
        """True on any rank."""
        m0 = self._maxs.scalars(float(value))
        self._keys.append(key)
        self._decoders.append(lambda i, f, m: assign(bool(m[m0])))

    def text(self, key: str, value: str | None, assign: Callable[[str | None], None]) -> None:
        """A name (the op that made an Inf/NaN): the lowest rank's that has one."""
        self._keys.append(key)
        self._texts.append((value, assign))

    def gather(self, value: Any, assign: Callable[[list[Any]], None]) -> None:
        """Every rank's `value` (picklable), in rank order: carried by the checkpoint
        `reduce` makes anyway, no collective of its own. Not keyed: each rank may send a
        different one (a rank's own findings)."""
        self._gathers.append((value, assign))

    def reduce(self) -> None:
        """Combine every registered value across ranks and hand each back to its `assign`."""
        arrays = [self._ints.packed(), self._sums.packed(), self._maxs.packed()]
        texts = [v for v, _ in self._texts]
        gathered: list[list[Any]] = [[v] for v, _ in self._gathers]
        if active():
            digest = hashlib.sha256("\n".join(self._keys).encode()).hexdigest()
            got = exchange((digest, len(self._keys), texts, [v for v, _ in self._gathers]))
            differ = [r for r, (d, _, _, _) in enumerate(got) if d != got[0][0]]
            if differ:
                self._mismatch(differ)
            texts = [next((t[2][k] for t in got if t[2][k] is not None), None) for k in range(len(texts))]
            gathered = [[t[3][k] for t in got] for k in range(len(self._gathers))]
            ops = [torch.distributed.ReduceOp.SUM, torch.distributed.ReduceOp.SUM, torch.distributed.ReduceOp.MAX]
            device = collective_device()
            for k, op in enumerate(ops):
                if len(arrays[k]):
                    t = torch.from_numpy(arrays[k]).to(device)
                    torch.distributed.all_reduce(t, op=op)
                    arrays[k] = t.cpu().numpy()
        ints, sums, maxs = arrays
        for decode in self._decoders:
            decode(ints, sums, maxs)
        for (_, assign), value in zip(self._texts, texts, strict=True):
            assign(value)
        for (_, assign_all), values in zip(self._gathers, gathered, strict=True):
            assign_all(values)

    def _mismatch(self, differ: list[int]) -> NoReturn:
        keys = exchange(self._keys)
        lines = []
        for r in differ:
            at = next((k for k, (a, b) in enumerate(zip(keys[0], keys[r], strict=False)) if a != b), None)
            if at is None:
                lines.append(f"rank {r} has {len(keys[r])} entries where rank 0 has {len(keys[0])}")
            else:
                lines.append(f"rank {r} has {keys[r][at]!r} where rank 0 has {keys[0][at]!r}")
        raise RanksFailedError(  # every rank found the same difference: already agreed
            "the ranks ran different computations, so their statistics cannot be combined "
            f"(ranks 0 and {', '.join(map(str, differ))} differ: {'; '.join(lines)}): every rank must run the "
            "same modules and ops (data-dependent control flow, or a different model on some rank?)"
        )


# --- the capture ----------------------------------------------------------------------------


def _setter(obj: object, name: str) -> Callable[[Any], None]:
    return lambda v: setattr(obj, name, v)


def reduce_capture(mode: Any, param_stats: Mapping[str, TensorSummary | None]) -> dict[str, TensorSummary]:
    """Combine a finished capture (`capture.shadow.ShadowCapture`: its op records, units and
    module errors) across the job's ranks in place, and `param_stats` (each rank's part of
    every parameter's gradient, counted once per element by the caller: see the module
    docstring) into the job's. What only describes this rank's device (FLOPs, bytes, saved
    activations) stays this rank's. Then `build_report` on `mode` judges the job."""
    red = StatsReducer()
    per_output: list[tuple[Any, dict[int, list[ErrorAccumulator | None]]]] = []
    for r in mode.records:
        if r.phase is not Phase.FORWARD:
            continue  # backward ops carry no statistics (gradients are per autograd node)
        key = f"op {r.index}: {r.op} in {r.unit}"
        red.summary(key, r.summary, _setter(r, "summary"))
        red.error(key + " local", r.local_error, _setter(r, "local_error"))
        outputs: dict[int, list[ErrorAccumulator | None]] = {}
        for k in range(len(r.output_shapes)):
            local, prop = r.output_errors.get(k, (None, None))
            pair = outputs.setdefault(k, [None, None])
            red.error(f"{key} out {k} local", local, functools.partial(pair.__setitem__, 0))
            red.error(f"{key} out {k} prop", prop, functools.partial(pair.__setitem__, 1))
        red.maximum(key + " in max", r.input_max_abs, _setter(r, "input_max_abs"))
        red.maximum(key + " out max", r.out_max_abs, _setter(r, "out_max_abs"))
        red.total(key + " nan roots", r.local_nonfinite_root, _setter(r, "local_nonfinite_root"))
        red.total(key + " cast overflow", r.cast_overflow, _setter(r, "cast_overflow"))
        red.any(key + " fp32 root", r.fp32_nonfinite_root, _setter(r, "fp32_nonfinite_root"))
        red.any(key + " inherited", r.overflow_inherited, _setter(r, "overflow_inherited"))
        red.any(key + " mask", r.mask_nonfinite, _setter(r, "mask_nonfinite"))
        per_output.append((r, outputs))
    units: dict[str, UnitRecord] = mode.units
    for name in sorted(units):
        u = units[name]
        key = f"unit {name}"
        red.summary(key + " forward", u.forward, _setter(u, "forward"))
        red.summary(key + " forward_low", u.forward_low, _setter(u, "forward_low"))
        red.summary(key + " backward", u.backward, _setter(u, "backward"), grad=True)
        nodes: list[tuple[str, TensorSummary]] = list(u.grad_nodes)
        for i, (node, s) in enumerate(nodes):
            red.summary(f"{key} grad {i} {node}", s, functools.partial(_set_node, u, i, node), grad=True)
        red.any(key + " wrote nonfinite", u.wrote_nonfinite_state, _setter(u, "wrote_nonfinite_state"))
        red.text(key + " grad root", u.grad_nonfinite_root, _setter(u, "grad_nonfinite_root"))
    module_errors: dict[str, ErrorAccumulator] = mode.module_errors
    for name in sorted(module_errors):
        red.error(f"module {name}", module_errors[name], functools.partial(_set_item, module_errors, name))
    stats: dict[str, TensorSummary] = {}
    for name in sorted(param_stats):
        red.summary(f"param {name}", param_stats[name], functools.partial(_set_item, stats, name), grad=True)
    red.reduce()
    for r, outputs in per_output:
        r.output_errors = {k: (v[0], v[1]) for k, v in outputs.items() if v[0] is not None or v[1] is not None}
    return stats


def _set_node(u: UnitRecord, i: int, node: str, s: TensorSummary | None) -> None:
    u.grad_nodes[i] = (node, s if s is not None else TensorSummary())


def _set_item(d: dict[str, Any], key: str, v: Any) -> None:
    if v is None:
        d.pop(key, None)
    else:
        d[key] = v


# --- gradients ------------------------------------------------------------------------------


def _dense_float(g: torch.Tensor) -> bool:
    return g.dtype == torch.float32 and g.layout == torch.strided and not is_dtensor(g)


def average_gradients(grads: Mapping[str, torch.Tensor]) -> None:
    """Average `grads` across ranks in place, as DDP's reducer does (each divided by the world
    size, then summed), in buckets of `GRAD_BUCKET_ELEMENTS`. Every rank must pass the same
    names (`Job.report` makes them the union, zeros where a rank has none)."""
    if not active():
        return
    world = world_size()
    unique = list({id(g): g for _, g in sorted(grads.items()) if _dense_float(g)}.values())
    bucket: list[torch.Tensor] = []

    def flush() -> None:
        if not bucket:
            return
        flat = torch.cat([g.reshape(-1) for g in bucket]).div_(world)
        torch.distributed.all_reduce(flat)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        bucket.clear()

    size = 0
    for g in unique:
        if size + g.numel() > GRAD_BUCKET_ELEMENTS:
            flush()
            size = 0
        bucket.append(g)
        size += g.numel()
    flush()


def rank_slices(grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's 1/world_size slice (a flat view, maybe empty) of each dense fp32 gradient
    that every rank holds the same copy of (averaged ones), one slice for all the names of a
    tied gradient; other gradients are left out. Over the ranks the slices cover each
    gradient once."""
    world, me = world_size(), rank()
    by_tensor: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, g in grads.items():
        if not _dense_float(g):
            continue
        if id(g) not in by_tensor:
            flat = g.detach().reshape(-1)
            chunk = -(-flat.numel() // world)
            by_tensor[id(g)] = flat[min(flat.numel(), me * chunk) : min(flat.numel(), (me + 1) * chunk)]
        out[name] = by_tensor[id(g)]
    return out


def sharded_summaries(grads: Mapping[str, torch.Tensor], workspace: Workspace) -> dict[str, TensorSummary]:
    """Summaries of this rank's slice (`rank_slices`) of each gradient that every rank holds
    the same copy of (averaged ones): summed across ranks (`reduce_capture`) they are the
    whole gradient's, each rank doing its share of the work. A tied gradient is summarized once."""
    batch = SummaryBatch(workspace, with_sumsq=True)
    by_tensor: dict[int, TensorSummary] = {}
    out: dict[str, TensorSummary] = {}
    for name, part in rank_slices(grads).items():
        if id(part) not in by_tensor:
            by_tensor[id(part)] = batch.add(part) if part.numel() else TensorSummary(sumsq=np.zeros(SUMSQ_BINS))
        out[name] = by_tensor[id(part)]
    batch.compute()
    return out


# --- one report for the job -----------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """This process's part of a torch.distributed job of more than one rank."""

    rank: int
    world_size: int
    backend: str
    wrapper: Wrapper
    mesh_shape: tuple[int, ...]

    @classmethod
    def of(cls, model: torch.nn.Module, wrapper: Wrapper) -> Job | None:
        """The job `model` (already unwrapped, see `unwrap`) runs in; None outside one."""
        if not active():
            return None
        world = world_size()
        return cls(rank(), world, str(torch.distributed.get_backend()), wrapper, tuple(mesh_shape(model, world)))

    def info(self) -> DistributedJob:
        return DistributedJob(
            world_size=self.world_size, backend=self.backend, wrapper=self.wrapper, mesh_shape=list(self.mesh_shape)
        )

    def report(
        self,
        build: Callable[..., Report],
        mode: Any,
        param_stats: dict[str, TensorSummary],
        model: torch.nn.Module,
        grads: dict[str, torch.Tensor],
        *,
        losses: Losses,
        env: Any,
        keep_own: list[Report] | None = None,
        **kwargs: Any,
    ) -> Report:
        """The job's report from this rank's capture: this rank's own report first (its flags
        go to `Report.ranks`), then, once every rank got there (`exchange`), the capture and
        the parameter gradients combined across ranks and judged once. Under DDP `grads` (the
        analysis' gradient tensors) are averaged in place, as DDP's reducer would. `keep_own`
        receives this rank's own report (the gradient fidelity judges its GRAD_DIVERGENCE for
        `Report.ranks` on it)."""
        kept = mode.units
        mode.units = copy.deepcopy(kept)  # `build` merges the parameter gradients into the units
        try:
            own = build(mode, param_stats, losses=losses, env=env, **kwargs)
        finally:
            mode.units = kept
        if keep_own is not None:
            keep_own.append(own)
        mine = RankResult(
            rank=self.rank,
            loss_fp32=losses.fp32,
            loss_low=losses.low,
            loss_rel_error=losses.rel_error,
            flags=own.flags(),
        )
        got = exchange((mine, sorted(grads)))
        ranks = [r for r, _ in got]
        if self.wrapper is Wrapper.DDP:
            self.average_gradients(model, grads, [names for _, names in got])
            job_stats: Mapping[str, TensorSummary | None] = sharded_summaries(grads, mode.workspace)
        else:
            job_stats = param_stats
        combined = reduce_capture(mode, job_stats)
        fp32 = math.fsum(r.loss_fp32 for r in ranks) / len(ranks)
        low = math.fsum(r.loss_low for r in ranks) / len(ranks)
        job_losses = losses.model_copy(update={"fp32": fp32, "low": low, "rel_error": relative_loss_error(fp32, low)})
        job_env = env.model_copy(update={"distributed": self.info()})
        report = build(mode, combined, losses=job_losses, env=job_env, **kwargs)
        return report.model_copy(update={"ranks": ranks})

    def average_gradients(
        self, model: torch.nn.Module, grads: dict[str, torch.Tensor], names: Sequence[Sequence[str]] | None = None
    ) -> None:
        """Under DDP, `grads` averaged across ranks in place, as DDP's reducer averages them;
        a gradient another rank has and this one does not (a parameter this rank's data did not
        reach) is added as zeros, what DDP reduces for it. `names`: every rank's gradient names,
        when already exchanged (else a checkpoint exchanges them). Other wrappers: nothing."""
        if self.wrapper is Wrapper.DDP:
            self.average_data_parallel(model, grads, names)

    def counted_gradients(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What this rank counts of each gradient when the job counts every element once, as
        the gradient statistics count them: under DDP (the gradients averaged: every rank
        holds the same) its slice (`rank_slices`); DTensor ones (FSDP2, tensor parallel) by
        placement, and under tensor parallel a plain one (every rank holds the same copy) on
        rank 0 (`model.parallel.counted_parts`); a plain module's, all of its own. Names this
        rank does not count are left out; sums over the parts, added across ranks, are the
        job's."""
        if self.wrapper is Wrapper.DDP:
            # Gradients the analysis does not average (sparse ones) stay each rank's own.
            slices = rank_slices(grads)
            return {n: slices.get(n, g) for n, g in grads.items()}
        if self.wrapper in (Wrapper.FSDP2, Wrapper.TP):
            return counted_parts(dict(grads), replicated=self.wrapper is Wrapper.TP)
        return dict(grads)

    def average_data_parallel(
        self, model: torch.nn.Module, grads: dict[str, torch.Tensor], names: Sequence[Sequence[str]] | None = None
    ) -> None:
        """`average_gradients` whatever the wrapper: plain gradients averaged across ranks as
        DDP averages them (DTensor ones, which FSDP2 and tensor parallel reduce themselves, are
        left as they are)."""
        if names is None:
            names = exchange(sorted(grads))
        params = dict(model.named_parameters(remove_duplicate=False))
        for n in sorted(set().union(*names)):
            if n not in grads and n in params:
                grads[n] = torch.zeros_like(params[n], memory_format=torch.contiguous_format)
        average_gradients(grads)
