"""What the capture needs to know about aten ops: which ones only move values (views,
copies), which write their arguments, what they read and write in bytes, their FLOPs, and
which autograd nodes only rearrange a gradient."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten
# Ops whose outputs hold the same values as their inputs: no statistics, no rounding.
COPY_OPS = frozenset(
    {
        aten.detach.default,
        aten.clone.default,
        aten.alias.default,
        aten.copy_.default,
        aten.lift_fresh.default,
        aten._to_copy.default,
        # Not views by schema, but their outputs hold their inputs' values (matmul's reshape
        # of its result, concatenation): summarized where those values were made.
        aten._unsafe_view.default,
        aten.cat.default,
        aten.stack.default,
    }
)
# Ops whose outputs are values picked from a float input (rows of a table).
SELECT_OPS = frozenset({aten.embedding.default, aten.index_select.default, aten.gather.default})
NO_SHADOW_OPS = frozenset({aten._local_scalar_dense.default})
# Allocations hold whatever was in memory: their values are no statistic of the model.
UNINITIALIZED_OPS = frozenset(
    {
        aten.empty.memory_format,
        aten.empty_like.default,
        aten.empty_strided.default,
        aten.new_empty.default,
        aten.new_empty_strided.default,
    }
)


# Namespaces of communication ops: torch.distributed's collectives (c10d's, the functional
# ones DTensor and tensor parallel issue, with their waits) and FSDP2's all-gather and
# reduce-scatter buffer ops. Their buffers are no activations of the model (FSDP's
# all-gather output is uninitialized where other ranks' shards go until the collective
# lands), and a shadow must never run one again: every rank would have to join it.
COMM_NAMESPACES = frozenset({"c10d", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd", "fsdp"})
# Of those, the ones that move no bytes: the wait on a functional collective's result, and
# its wrapping for autograd.
COMM_HANDLE_OPS = frozenset({"wait_tensor", "_wrap_tensor_autograd"})


# In-place ops that change a tensor's shape or strides, not its values (`nn.GRU(batch_first=
# True)` calls `transpose_`): the same op is applied to the tensor's shadows.
RESTRIDE_PACKETS = frozenset(
    {aten.transpose_, aten.t_, aten.unsqueeze_, aten.squeeze_, aten.as_strided_, aten.swapdims_, aten.swapaxes_}
)


@dataclass(frozen=True)
class OpInfo:
    name: str
    preserves_values: bool
    is_view: bool
    mutates: tuple[int, ...]  # positional args written in place
    random: bool
    packet: Any
    writes_kwargs: tuple[str, ...] = ()  # keyword-only args written (`out=`)
    restrides: bool = False  # an in-place view op (see RESTRIDE_PACKETS)
    communicates: bool = False  # a collective or a collective's buffer op (COMM_NAMESPACES)
    bookkeeping: bool = False  # no values at all: the profiler's record_function marks (FSDP2's)


_OP_INFO: dict[Any, OpInfo] = {}


def op_info(func: Any) -> OpInfo:
    info = _OP_INFO.get(func)
    if info is None:
        schema = func._schema
        written = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        mutates = tuple(i for i, a in enumerate(schema.arguments) if a in written and not a.kwarg_only)
        restrides = func.overloadpacket in RESTRIDE_PACKETS
        info = OpInfo(
            name=str(func).removeprefix("aten."),
            preserves_values=bool(func.is_view) or func in COPY_OPS or func in UNINITIALIZED_OPS or restrides,
            is_view=bool(func.is_view),
            mutates=mutates,
            random=torch.Tag.nondeterministic_seeded in func.tags,
            packet=func.overloadpacket,
            writes_kwargs=tuple(a.name for a in written if a.kwarg_only),
            restrides=restrides,
            communicates=func.namespace in COMM_NAMESPACES,
            bookkeeping=func.namespace == "profiler",
        )
        _OP_INFO[func] = info
    return info


_DTYPE_NAMES: dict[torch.dtype, str] = {}


def dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def tensor_leaves(args: Any, kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, torch.Tensor))
    return out


def map_args(
    args: Any, kwargs: Mapping[str, Any], fn: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[Any, dict[str, Any]]:
    def m(a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            return fn(a)
        if isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in a):
            return type(a)(fn(t) if isinstance(t, torch.Tensor) else t for t in a)
        return a

    return tuple(m(a) for a in args), {k: m(v) for k, v in kwargs.items()}


def fills_nonfinite(args: Any, kwargs: Mapping[str, Any]) -> bool:
    """An op given a non-finite Python scalar (`masked_fill(mask, -inf)`) puts it there on
    purpose: attention masks do this. That is not a NaN finding."""
    return any(isinstance(a, float) and not math.isfinite(a) for a in (*args, *kwargs.values()))


def outputs_of(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for t in out if isinstance(t, torch.Tensor)]
    return []


def shapes_of(x: Any) -> Any:
    """Tensors replaced by their shapes, through lists and tuples: what torch's FLOP
    formulas take."""
    if isinstance(x, torch.Tensor):
        return x.shape
    if isinstance(x, list):
        return [shapes_of(v) for v in x]
    if isinstance(x, tuple):
        return tuple(shapes_of(v) for v in x)
    return x


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def moved_bytes(func: Any, info: OpInfo, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> int:
    """What one op reads and writes: nothing for a view; a lookup reads the rows it picks
    (as many bytes as it writes) and its indices, not the whole table."""
    if info.is_view:
        return 0
    out = sum(nbytes(t) for t in outputs)
    if func in SELECT_OPS:
        return 2 * out + sum(nbytes(t) for t in inputs if not t.is_floating_point())
    return sum(nbytes(t) for t in inputs) + out


_OUT_OVERLOADS: dict[Any, Any] = {}


def out_overload(func: Any) -> Any:
    """The `out=` overload of a single-output functional op (`mm.out` for `mm.default`):
    the overload whose arguments are `func`'s plus one keyword `out`. None if there is none."""
    if func in _OUT_OVERLOADS:
        return _OUT_OVERLOADS[func]
    found = None
    schema = func._schema
    if len(schema.returns) == 1 and not any(a.alias_info is not None for a in schema.arguments):
        signature = [(a.name, str(a.type)) for a in schema.arguments]
        for name in func.overloadpacket.overloads():
            candidate = getattr(func.overloadpacket, name)
            args = candidate._schema.arguments
            outs = [a for a in args if a.alias_info is not None and a.alias_info.is_write]
            rest = [(a.name, str(a.type)) for a in args if a not in outs]
            if len(outs) == 1 and outs[0].name == "out" and outs[0].kwarg_only and rest == signature:
                found = candidate
                break
    _OUT_OVERLOADS[func] = found
    return found


# Backward nodes whose gradient w.r.t. their input is the incoming gradient rearranged
# (or zero-padded): no new values. Names without the trailing overload number.
_REARRANGING_NODES = frozenset(
    {
        "ViewBackward",
        "UnsafeViewBackward",
        "ReshapeAliasBackward",
        "AliasBackward",
        "TBackward",
        "TransposeBackward",
        "PermuteBackward",
        "CloneBackward",
        "SqueezeBackward",
        "UnsqueezeBackward",
        "SplitBackward",
        "SplitWithSizesBackward",
        "CatBackward",
        "SliceBackward",
        "SelectBackward",
        "UnbindBackward",
        "StackBackward",
        "AsStridedBackward",
        "ToCopyBackward",
        # The parallel libraries' pass-through nodes: FSDP2's hook on a sharded module's
        # inputs (the gradient of the module before it, which it would be charged with) and
        # DTensor's to_local / from_local (the same values, local or wrapped).
        "RegisterPostBackwardFunctionBackward",
        "_ToTorchTensorBackward",
        "_FromTorchTensorBackward",
    }
)


def rearranges(node: Any) -> bool:
    return bool(node.name().rstrip("0123456789") in _REARRANGING_NODES)


# A Python number in a tensor op (`x * 2.5`) becomes a 0-dim tensor of one of these dtypes.
WRAPPED_SCALAR_DTYPES = frozenset({torch.float64, torch.int64, torch.complex128, torch.bool})


def op_flops(info: OpInfo, args: Any, kwargs: Mapping[str, Any], out: Any) -> int:
    formula = flop_registry.get(info.packet)
    if formula is None:
        return 0
    try:
        # torch's formulas take shapes; its wrapper maps them with pytree (~10 us a call)
        raw = getattr(formula, "__wrapped__", None)
        if raw is None:
            return int(formula(*args, **kwargs, out_val=out))
        shapes = [shapes_of(a) for a in args]
        return int(raw(*shapes, out_shape=shapes_of(out), **{k: shapes_of(v) for k, v in kwargs.items()}))
    except Exception:  # a formula that does not fit this overload: cost it as 0 FLOPs
        return 0
