"""The user's model as torch.distributed shards it: FSDP2 (`fully_shard`) and tensor parallel
(`parallelize_module`) hold parameters as DTensors, whose memory is a local shard.

A DTensor can exist only once `torch.distributed.tensor` is imported, and an FSDP2 module
only once `torch.distributed.fsdp` is: the checks here read `sys.modules` instead of
importing them (importing DTensor costs ~0.4 s a process that never uses it).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from precision_doctor.errors import PrecisionDoctorError


def dtensor_type() -> type[torch.Tensor] | None:
    """torch's DTensor class, None while no DTensor can exist."""
    module = sys.modules.get("torch.distributed.tensor")
    cls: type[torch.Tensor] | None = getattr(module, "DTensor", None) if module is not None else None
    return cls


def async_collective_type() -> type[torch.Tensor] | None:
    """The tensor a functional collective hands back before it is waited on (its own
    dispatch waits before any op reads its values), None while none can exist."""
    module = sys.modules.get("torch.distributed._functional_collectives")
    cls: type[torch.Tensor] | None = getattr(module, "AsyncCollectiveTensor", None) if module is not None else None
    return cls


def wrapper_types() -> frozenset[type[torch.Tensor]]:
    """Tensor subclasses whose ops a dispatch mode hands on to the subclass (returns
    NotImplemented): the mode then sees the ops on the local tensors they run, and the
    collectives they issue, as this rank executes them."""
    return frozenset(t for t in (dtensor_type(), async_collective_type()) if t is not None)


def is_dtensor(t: object) -> bool:
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The memory this rank holds of `t`: a DTensor's local shard, else `t` itself."""
    if is_dtensor(t):
        local: torch.Tensor = t._local_tensor  # type: ignore[attr-defined]  # DTensor's field
        return local
    return t


def memory_of(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor whose memory `t` is on this rank: a DTensor's local shard, an unwaited
    collective result's buffer (without waiting), else `t`."""
    t = local_tensor(t)
    cls = async_collective_type()
    if cls is not None and isinstance(t, cls):
        elem: torch.Tensor = t.elem  # type: ignore[attr-defined]  # AsyncCollectiveTensor's field
        return elem
    return t


def storage_ptr(t: torch.Tensor) -> int:
    """The address of the memory this rank holds of `t` (0: none, or a tensor without
    storage)."""
    try:
        return int(local_tensor(t).untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return 0


def counted_part(t: torch.Tensor, *, replicated: bool = False) -> torch.Tensor | None:
    """What this rank contributes when the job counts every element of `t` once: of a
    DTensor, a shard (`Shard`) counts on every rank and a replicated copy (`Replicate`) only
    on the first rank of that mesh dimension (None on the others). A `Partial` DTensor holds
    no element yet (its values are the sum over ranks): the caller reduces it first
    (`redistribute`), or skips it where the reduced value is counted anyway; None here. A
    plain tensor is this rank's own, unless `replicated` (every rank holds the same copy: a
    plain parameter of a tensor-parallel model), then rank 0's."""
    if not is_dtensor(t):
        if replicated and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return None
        return t
    spec: Any = t._spec  # type: ignore[attr-defined]  # DTensor's field
    coordinate = spec.mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the tensor's mesh
        return None
    for dim, placement in enumerate(spec.placements):
        if placement.is_partial():
            return None
        if placement.is_replicate() and coordinate[dim] != 0:
            return None
    return local_tensor(t)


def waited(t: torch.Tensor) -> torch.Tensor:
    """The values of a functional collective's result, waited for (`trigger_wait` waits
    once); other tensors as they are."""
    cls = async_collective_type()
    if cls is not None and isinstance(t, cls):
        out: torch.Tensor = t.trigger_wait()  # type: ignore[attr-defined]  # AsyncCollectiveTensor's method
        return out
    return t


def local_parts(ts: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """For tensors that may be DTensors or unwaited collective results (tensor parallel's
    gradients): (what this rank holds of each, with values; the parts it counts, see
    `counted_part`), empty ones left out."""
    held: list[torch.Tensor] = []
    counted: list[torch.Tensor] = []
    for t in ts:
        t = waited(t)
        local = local_tensor(t)
        if local.numel():
            held.append(local)
            part = counted_part(t)
            if part is not None:
                counted.append(part)
    return held, counted


def reduced(t: torch.Tensor) -> torch.Tensor:
    """`t` with its `Partial` placements reduced (a collective: every rank of the mesh calls
    it, in the same order); other tensors as they are."""
    if not is_dtensor(t):
        return t
    placements = t.placements  # type: ignore[attr-defined]  # DTensor's field
    if not any(p.is_partial() for p in placements):
        return t
    from torch.distributed.tensor import Replicate

    new = [Replicate() if p.is_partial() else p for p in placements]
    out: torch.Tensor = t.redistribute(placements=new)  # type: ignore[attr-defined]  # DTensor's method
    return out


def counted_parts(tensors: dict[str, torch.Tensor], *, replicated: bool = False) -> dict[str, torch.Tensor]:
    """`counted_part` of each (Partial ones reduced first: every rank calls this with the
    same names, in the same order); those this rank does not count left out."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        part = counted_part(reduced(t), replicated=replicated)
        if part is not None:
            out[name] = part
    return out


def fsdp_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The modules `fully_shard` (FSDP2) was applied to, by name."""
    module = sys.modules.get("torch.distributed.fsdp")
    fsdp_module = getattr(module, "FSDPModule", None) if module is not None else None
    if fsdp_module is None:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, fsdp_module)]


def is_tensor_parallel(model: torch.nn.Module) -> bool:
    """DTensor parameters without FSDP2: tensor parallel (`parallelize_module`), whose plain
    parameters every rank holds the same copy of."""
    return not fsdp_modules(model) and any(is_dtensor(p) for p in model.parameters())


def mixed_parameters(model: torch.nn.Module) -> tuple[str, str] | None:
    """(a DTensor parameter, a plain one) of a model that trains both, else None. torch's
    GradScaler unscales the gradients of one device and dtype in one call, which DTensor
    refuses for a mix of DTensors and plain tensors: fp16 training of such a model (tensor
    parallel with some modules left unsharded) fails at its first `scaler.step`."""
    dtensor = plain = None
    for name, p in model.named_parameters():
        if p.requires_grad and p.is_floating_point():
            if is_dtensor(p):
                dtensor = dtensor or name
            else:
                plain = plain or name
    return (dtensor, plain) if dtensor is not None and plain is not None else None


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether torch.distributed shards the model: FSDP2 modules or DTensor parameters."""
    return bool(fsdp_modules(model)) or any(is_dtensor(p) for p in model.parameters())


def _fsdp_state(module: torch.nn.Module) -> Any:
    get = getattr(module, "_get_fsdp_state", None)
    return get() if get is not None else None


def check_fsdp_precision(model: torch.nn.Module) -> None:
    """Refuse an FSDP2 `MixedPrecisionPolicy` that runs anything below fp32: the analysis
    compares a low-precision run with an fp32 reference, and under such a policy no fp32 run
    of the model exists (FSDP casts the gathered parameters itself)."""
    for name, module in fsdp_modules(model):
        state = _fsdp_state(module)
        policy = getattr(state, "_mp_policy", None)
        if policy is None:
            group = getattr(state, "_fsdp_param_group", None)
            policy = getattr(group, "mp_policy", None)
        for field in ("param_dtype", "reduce_dtype", "output_dtype"):
            dtype = getattr(policy, field, None)
            if isinstance(dtype, torch.dtype) and dtype != torch.float32:
                low = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float16", "fp16")
                raise PrecisionDoctorError(
                    f"fully_shard({name or 'model'!r}) has MixedPrecisionPolicy({field}={dtype}): the analysis "
                    f"needs the fp32 reference, so shard the model with the default (fp32) policy and "
                    f"analyze it with --dtype {low}"
                )


def reset_fsdp_iteration(model: torch.nn.Module) -> None:
    """Reset FSDP2's per-iteration state (`FSDPModule.reset_iter_state` on each root): every
    parameter resharded, the forward order it prefetches by in backward cleared. A forward
    without its backward (the analysis' low run, a forward that raised) leaves that order
    doubled, and the next backward would prefetch - all-gather - a module twice."""
    for _, module in fsdp_modules(model):
        reset = getattr(module, "reset_iter_state", None)
        if reset is not None and getattr(_fsdp_state(module), "_is_root", None) is True:
            reset()


def gathered_params(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(the unsharded parameter FSDP2 gathers for forward and backward, the registered sharded
    parameter it stands for), per FSDP2 parameter gathered so far. FSDP2 swaps the unsharded
    tensors into the modules while they run, so the ops the capture sees read those; their
    memory exists only while gathered."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for _, module in fsdp_modules(model):
        group = getattr(_fsdp_state(module), "_fsdp_param_group", None)
        for fsdp_param in getattr(group, "fsdp_params", None) or ():
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            sharded = getattr(fsdp_param, "sharded_param", None)
            if isinstance(unsharded, torch.Tensor) and isinstance(sharded, torch.Tensor):
                pairs.append((unsharded, sharded))
    return pairs
