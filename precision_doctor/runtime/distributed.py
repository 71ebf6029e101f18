"""The distributed runtime: this process as one rank of a torch.distributed job (`torchrun`).

The process group's life (`init_from_env`, `release`), where this rank stands (`active`,
`rank`, `world_size`, `unwrap`), and the control flow every rank keeps the same: a failure on
one rank (a non-finite loss, an exception in forward) is raised on every rank with the failing
rank named (`same_outcome`, `agreed`, at the checkpoints `exchange` and `worst`; inside a
sharded model's forward, whose own collectives the others wait in, `fail_fast`), so no rank
waits in a collective for a partner that is gone.

Why a stage of its own, just above `model` and below `capture`: the analysis, the planner, the
pre-flight's training runs and the CLI all need it, and none of it is statistics (the
combining of statistics across ranks stays in `analysis.distributed`, which uses this). It
reads how the job shards the model (`model.parallel`: FSDP2 modules, DTensor parameters) and
nothing above that; a module of `model/` would have put the process group's lifecycle and
the agreement protocol among descriptions of the user's model, which they are not.

Nothing here runs (and nothing is imported from torch.distributed) unless a process group of
more than one rank is initialized.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar, cast

import torch

from precision_doctor.errors import PrecisionDoctorError, PrecisionDoctorInternalError
from precision_doctor.model.parallel import fsdp_modules, is_dtensor, is_tensor_parallel
from precision_doctor.model.spec import device_of
from precision_doctor.options import Wrapper

__all__ = [
    "RanksFailedError",
    "RanksFailedInternalError",
    "active",
    "agreed",
    "collective_device",
    "exchange",
    "fail_fast",
    "init_from_env",
    "mesh_shape",
    "rank",
    "release",
    "same_outcome",
    "unwrap",
    "world_size",
    "worst",
]

Fn = TypeVar("Fn", bound=Callable[..., Any])
T = TypeVar("T")


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


def launched_rank() -> int | None:
    """This process's rank in a job of several: the process group's, else the one torchrun
    gave it (RANK, with WORLD_SIZE > 1, in its environment: before the group is joined);
    None outside a job."""
    if active():
        return rank()
    try:
        return int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    except (KeyError, ValueError):
        return None


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
    if is_tensor_parallel(model):
        return model, Wrapper.TP
    return model, Wrapper.NONE


def mesh_shape(model: torch.nn.Module, world: int) -> list[int]:
    """The device mesh's shape of the model's DTensor parameters; `[world]` without any."""
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


def collective_device() -> torch.device:
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


def same_outcome(fn: Fn) -> Fn:
    """`fn` run inside `agreed()`: a failure on one rank is raised on every rank."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not active():
            return fn(*args, **kwargs)
        with agreed():
            return fn(*args, **kwargs)

    return cast(Fn, wrapper)


_CREATED_GROUP: list[bool] = []


def init_from_env(model: torch.nn.Module) -> bool:
    """Join the job torchrun launched this process into (its environment names RANK and
    WORLD_SIZE > 1) when nothing initialized the process group yet (a model file may, to
    build a DDP or FSDP2 model): NCCL for a CUDA model, else gloo. Returns whether it
    initialized one (`release()` destroys it)."""
    if not torch.distributed.is_available() or torch.distributed.is_initialized():
        return False
    if launched_rank() is None:
        return False
    device = device_of(model)
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
