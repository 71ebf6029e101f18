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

Control flow is the same on every rank: a failure on one rank (a non-finite loss, an exception
in forward) is raised on every rank with the failing rank named (`same_outcome`,
`exchange`; inside a sharded model's forward, whose own collectives the others wait in,
`fail_fast`), so no rank waits in a collective for a partner that is gone. The statistics are
combined with a handful of batched collectives (`StatsReducer`): three `all_reduce`s of flat
int64/float64 tensors, keyed by a deterministic order of ops and units that every rank checks
against rank 0's first.

Nothing here runs (and nothing is imported from torch.distributed) unless a process group of
more than one rank is initialized.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar, cast

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
from precision_doctor.errors import PrecisionDoctorError, PrecisionDoctorInternalError
from precision_doctor.model.parallel import counted_parts, fsdp_modules, is_dtensor
from precision_doctor.options import Phase, Wrapper
from precision_doctor.report import DistributedJob, Losses, RankResult, Report

__all__ = [
    "Job",
    "RanksFailedError",
    "RanksFailedInternalError",
    "StatsReducer",
    "active",
    "agreed",
    "exchange",
    "fail_fast",
    "init_from_env",
    "rank",
    "release",
    "same_outcome",
    "unwrap",
    "world_size",
    "worst",
]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

# Elements per all_reduce of averaged gradients (DDP's default bucket is 25 MiB).
GRAD_BUCKET_ELEMENTS = 1 << 22


# --- the job ---------------------------------------------------------------------------------


def active() -> bool:
    """Whether this process is one rank of a torch.distributed job of more than one rank."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    return torch.distributed.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a job)."""
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def _is_ddp(model: torch.nn.Module) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def unwrap(model: torch.nn.Module) -> tuple[torch.nn.Module, Wrapper]:
    """The module the analysis runs, and how the job wraps it. `DistributedDataParallel` is
    unwrapped: its `module` runs as each rank runs it, without DDP's forward (which broadcasts
    buffers) or its gradient hooks (its reducer is left as it was, so a training step after the
    analysis runs as before), and its units are named as the user names them, without DDP's
    `module.` prefix; the analysis averages the gradients itself, as DDP would."""
    if _is_ddp(model):
        return cast(torch.nn.Module, model.module), Wrapper.DDP
    if not active():
        return model, Wrapper.NONE
    if fsdp_modules(model):
        return model, Wrapper.FSDP2
    if any(is_dtensor(p) for p in model.parameters()):
        return model, Wrapper.TP
    return model, Wrapper.NONE


def _mesh_shape(model: torch.nn.Module, world: int) -> list[int]:
    for p in model.parameters():
        if is_dtensor(p):
            mesh = p.device_mesh  # type: ignore[attr-defined]  # DTensor's field
            return [int(n) for n in mesh.shape]
    return [world]


# --- the same outcome on every rank ---------------------------------------------------------


class RanksFailedError(PrecisionDoctorError):
    """A user error on one or more ranks, raised on every rank with the ranks named."""


class RanksFailedInternalError(PrecisionDoctorInternalError):
    """An internal error on one or more ranks, raised on every rank with the ranks named."""


_OK = "ok"
_FAILED = "failed"


@dataclass(frozen=True)
class _Failure:
    rank: int
    user_error: bool
    message: str


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    if not isinstance(e, (PrecisionDoctorError, PrecisionDoctorInternalError)):
        line = f"{type(e).__name__}: {line}"
    return line


def _raise_failures(failures: Sequence[_Failure]) -> NoReturn:
    """One error on every rank: the failing ranks with their messages (ranks that failed with
    the same message named together), a user error unless every failure was internal."""
    by_message: dict[str, list[int]] = {}
    for f in failures:
        by_message.setdefault(f.message, []).append(f.rank)
    parts = [
        f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {message}"
        for message, ranks in by_message.items()
    ]
    text = "; ".join(parts)
    if any(f.user_error for f in failures):
        raise RanksFailedError(text)
    raise RanksFailedInternalError(text)


def _gather(item: Any) -> list[Any]:
    got: list[Any] = [None] * torch.distributed.get_world_size()
    store = _store()
    try:
        torch.distributed.all_gather_object(got, item)
    except RuntimeError as e:  # a rank crashed, or missed the process group's timeout
        with contextlib.suppress(RuntimeError):
            failed = _failure_posted(store)
            if failed is not None:  # a rank that failed inside a sharded model's pass (`fail_fast`)
                _abort()
                _raise_failures([failed])
        raise RanksFailedError(
            f"rank {rank()} lost the other ranks of the job (a rank crashed or stopped answering): {_first_line(e)}"
        ) from e
    return got


def _collective_device() -> torch.device:
    """Where the statistics' tensors go for a collective: NCCL reduces CUDA tensors only."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def exchange(payload: T) -> list[T]:
    """Every rank's `payload`, in rank order ([payload] outside a job). A checkpoint: a rank
    that failed since the last one arrives here with its error instead (see `same_outcome`),
    and then every rank raises the same error, naming it. Call it where every rank calls it,
    before any collective that a failed rank would never join."""
    if not active():
        return [payload]
    got = _gather((_OK, payload))
    failures = [item[1] for item in got if item[0] == _FAILED]
    if failures:
        _raise_failures(failures)
    return [cast(T, item[1]) for item in got]


def worst(value: T, error: Callable[[T], float]) -> T:
    """The value of the rank where `error(value)` is largest (NaN counts as the largest; the
    lowest such rank), from every rank (`exchange`): a decision every rank then takes alike,
    on the worst rank's evidence. Outside a job, `value`."""
    got = exchange(value)

    def badness(v: T) -> float:
        e = error(v)
        return math.inf if math.isnan(e) else e

    return max(got, key=badness)  # max keeps the first of equal ones: the lowest rank


@contextlib.contextmanager
def agreed() -> Iterator[None]:
    """Run the body so that every rank of a job ends it the same way: when it raises on one
    rank, that rank joins the next `exchange` the others reach (inside the body, or the one
    every rank makes when the body ends) with its error, and all of them raise it, the rank
    named. Outside a job (checked when the body ends: the body may start one) it does nothing."""
    try:
        yield
    except (RanksFailedError, RanksFailedInternalError):
        raise  # every rank raises it already
    except Exception as e:
        if not active():
            raise
        failure = _Failure(rank(), isinstance(e, PrecisionDoctorError), _first_line(e))
        got = _gather((_FAILED, failure))
        _raise_failures([item[1] for item in got if item[0] == _FAILED])
    if active():
        exchange(None)  # a rank failing after the body's last checkpoint meets the others here


# A failure inside a pass of a sharded model (`fail_fast`), posted to the job's store.
_FAILED_KEY = "precision_doctor/failed"


def _store() -> Any:
    try:
        return torch.distributed.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):
        return None


def _failure_posted(store: Any) -> _Failure | None:
    """The failure a rank posted before aborting (`fail_fast`), if one did. Raises
    RuntimeError when the store is gone (the failing rank hosted it and has exited)."""
    if store is None or not store.check([_FAILED_KEY]):
        return None
    failed_rank, user_error, message = json.loads(store.get(_FAILED_KEY))
    return _Failure(int(failed_rank), bool(user_error), str(message))


def _abort() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.distributed_c10d._abort_process_group()


@contextlib.contextmanager
def fail_fast(enabled: bool = True) -> Iterator[None]:
    """Around a pass of a sharded model (FSDP2, tensor parallel), where a rank that fails
    cannot meet the others at a checkpoint: they wait in the model's own next collective (an
    all-gather, an all-reduce). So the failing rank posts its failure to the job's store,
    aborts its process group (it joins no collective again) and raises at once. gloo's abort
    closes no connection (torch 2.13): the others' pending collective fails when the failing
    process exits (the CLI exits at once; gloo: connection closed by peer), not after the
    process group's timeout; they read the failure from the store, abort theirs too (a rank
    waiting on one of them is released alike) and raise the same error, the failing rank
    named. A failing rank that hosts the store (rank 0 outside torchrun, whose agent hosts it)
    takes it along: the others then say they lost a rank, unnamed. The process group is gone
    afterwards (as after NCCL's watchdog aborts a job): the job can only end. Outside a job,
    or not `enabled`, it does nothing."""
    if not enabled or not active():
        yield
        return
    store = _store()
    try:
        yield
    except (RanksFailedError, RanksFailedInternalError):
        raise
    except Exception as e:
        me = rank()
        try:
            failed = _failure_posted(store)
        except (RuntimeError, ValueError):  # the store went with the failing rank
            _abort()
            raise RanksFailedError(
                f"rank {me} lost the other ranks of the job (a rank crashed or stopped answering): {_first_line(e)}"
            ) from e
        if failed is not None:  # another rank failed first: its exit reached this collective
            _abort()
            _raise_failures([failed])
        failed = _Failure(me, isinstance(e, PrecisionDoctorError), _first_line(e))
        if store is not None:
            with contextlib.suppress(RuntimeError):
                store.set(_FAILED_KEY, json.dumps([failed.rank, failed.user_error, failed.message]))
        _abort()
        _raise_failures([failed])


def same_outcome(fn: F) -> F:
    """`fn` run inside `agreed()`: a failure on one rank is raised on every rank."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not active():
            return fn(*args, **kwargs)
        with agreed():
            return fn(*args, **kwargs)

    return cast(F, wrapper)


_CREATED_GROUP: list[bool] = []


def init_from_env(model: torch.nn.Module) -> bool:
    """Join the job torchrun launched this process into (its environment names RANK and
    WORLD_SIZE > 1) when nothing initialized the process group yet (a model file may, to
    build a DDP or FSDP2 model): NCCL for a CUDA model, else gloo. Returns whether it
    initialized one (`release()` destroys it)."""
    if not torch.distributed.is_available() or torch.distributed.is_initialized():
        return False
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    cuda = device.type == "cuda" and torch.distributed.is_nccl_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    _CREATED_GROUP.append(True)
    return True


def release() -> None:
    """Destroy the process group `init_from_env` initialized, if it did."""
    if _CREATED_GROUP and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _CREATED_GROUP.clear()


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
        self, key: str, s: TensorSummary | None, assign: Callable[[TensorSummary | None], None], *,
        grad: bool = False, replicated: bool = False,
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
            assign(TensorSummary(
                numel=int(i[i0 + 1]), zero_count=int(i[i0 + 2]), nan_count=int(i[i0 + 3]), inf_count=int(i[i0 + 4]),
                max_abs=float(m[m0]), min_nonzero_abs=float(-m[m0 + 1]),
                hist=i[i0 + _SUMMARY_HEAD : i0 + _SUMMARY_HEAD + HIST_BINS].copy(),
                sumsq=f[s0 : s0 + SUMSQ_BINS].copy() if has_sumsq else None,
                sumsq_total=float(f[s0 + SUMSQ_BINS]) if has_sumsq else 0.0,
                tails=tails,
            ))

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
            device = _collective_device()
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
        return cls(rank(), world, str(torch.distributed.get_backend()), wrapper, tuple(_mesh_shape(model, world)))

    def info(self) -> DistributedJob:
        return DistributedJob(
            world_size=self.world_size, backend=self.backend, wrapper=self.wrapper, mesh_shape=list(self.mesh_shape)
        )

    def reporter(
        self,
        build: Callable[..., Report],
        model: torch.nn.Module,
        grads: dict[str, torch.Tensor],
        keep_own: list[Report] | None = None,
    ) -> Callable[..., Report]:
        """`build` (`engine.build_report`, same arguments) for the job: see `report`."""

        def report(mode: Any, param_stats: dict[str, TensorSummary], **kwargs: Any) -> Report:
            return self.report(build, mode, param_stats, model, grads, keep_own=keep_own, **kwargs)

        return report

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
            rank=self.rank, loss_fp32=losses.fp32, loss_low=losses.low, loss_rel_error=losses.rel_error,
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

