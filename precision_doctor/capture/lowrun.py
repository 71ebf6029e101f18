"""The real low-precision run: real dtypes, emulated kernels.

The model runs for real with real low dtypes - under `torch.autocast`, or with a low copy of
its parameters (`model.to(low)`) - so everything that depends on dtypes is exactly what real
low-precision training executes: which ops autocast casts (with CUDA's or the CPU's op
lists, see `autocast_policy`), the model's own `.float()` casts and `if x.dtype ==
torch.float16` branches (T5's clamp, Llama's RMSNorm upcast), type promotion, and the dtypes
of backward. Only the arithmetic of fp16 on the CPU is emulated (CPU fp16 kernels are ~30x
slower than fp32 ones), and that of bf16 on a CPU without fast bf16 kernels
(`cpu_bf16_emulated`: there a bf16 matmul falls back to scalar loops, a GPT-2 step 55x
fp32's): `EmulateLowMode` runs each op that reads tensors of the emulated dtype as an fp32
kernel on upcast inputs and rounds each output to the dtype the real op makes - low inputs,
fp32 accumulate, low outputs, which is what tensor cores compute, and what the CPU's own fp16
and bf16 kernels compute too.

`low_precision` is the context for real training loops (pre-flight); `low_run` is the one
forward the analysis compares its fp32 run with, op by op (`LowRun.op_dtypes`) and module by
module (`LowRun.module_outputs`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from precision_doctor.capture.autocast_policy import autocast_policy
from precision_doctor.capture.dispatch import dynamo_safe, faking
from precision_doctor.capture.ops import COPY_OPS, aten, op_info, outputs_of, tensor_leaves
from precision_doctor.capture.units import LOSS_UNIT, OpDtypes, OpKey, OpKeyer, UnitTracker
from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.model.parallel import storage_ptr, wrapper_types
from precision_doctor.model.spec import LossFn, as_tree, resolve_loss, run_model
from precision_doctor.model.spec import device_type as model_device_type
from precision_doctor.model.state import ModelStateGuard
from precision_doctor.options import AutocastPolicy, Regime

__all__ = [
    "EMULATE_BF16_ENV",
    "EmulateLowMode",
    "GradientSink",
    "LowGraph",
    "LowRun",
    "cpu_bf16_emulated",
    "emulates",
    "low_precision",
    "low_run",
]

# Ops that run as the real low-precision kernel even on emulated inputs: their results do not
# depend on arithmetic (they move, pick, fill or compare values), so the real kernel is exact
# and costs no upcast; `nan_to_num`'s defaults are the dtype's own limits, which an fp32 kernel
# would get wrong. Views, copies and random ops (`op_info`) run as they are too; a random op
# must, to draw what the real one draws.
_REAL_KERNEL_OPS = frozenset(
    {
        *COPY_OPS,
        aten._local_scalar_dense.default, aten.contiguous.default, aten._copy_from.default,
        aten._copy_from_and_resize.default, aten.zeros_like.default, aten.ones_like.default,
        aten.full_like.default, aten.new_zeros.default, aten.new_ones.default,
        aten.new_full.default, aten.fill_.Scalar, aten.zero_.default, aten.resize_.default,
        aten.set_.source_Storage_storage_offset, aten.index_select.default, aten.embedding.default,
        aten.gather.default, aten.constant_pad_nd.default, aten.slice_scatter.default,
        aten.select_scatter.default, aten.masked_fill.Scalar, aten.masked_fill_.Scalar,
        aten.repeat.default, aten.flip.default, aten.roll.default, aten.tril.default,
        aten.triu.default, aten.tril_.default, aten.triu_.default, aten.where.self,
        aten.index.Tensor, aten.nan_to_num.default, aten.nan_to_num_.default,
    }
)  # fmt: skip


@dataclass(frozen=True)
class _Plan:
    """What the emulation does with one op, decided once per op."""

    real: bool  # always the real kernel
    written: tuple[int, ...]  # positional arguments the op writes
    written_kwargs: tuple[str, ...]  # keyword arguments it writes (`out=`)


_PLANS: dict[Any, _Plan] = {}


def _plan(func: Any) -> _Plan:
    plan = _PLANS.get(func)
    if plan is None:
        info = op_info(func)
        plan = _PLANS[func] = _Plan(
            # A collective moves values (in the dtype it is given, as a real run's does) and
            # must run exactly once: an fp32 copy of its input would be reduced instead.
            real=info.preserves_values or info.random or info.communicates or func in _REAL_KERNEL_OPS,
            written=info.mutates,
            written_kwargs=info.writes_kwargs,
        )
    return plan


def _signature_of(a: Any) -> Any:
    # What decides an op's output dtypes: tensor dtypes (and whether 0-dim, which type
    # promotion ranks lower), dtype arguments, the types of Python numbers, and booleans by
    # value: an output mask (`native_layer_norm_backward`'s) decides which outputs exist.
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.dim() == 0)
    if isinstance(a, (list, tuple)):
        return tuple(_signature_of(x) for x in a)
    if isinstance(a, torch.dtype):
        return a
    if isinstance(a, bool):
        return a
    if isinstance(a, (int, float, complex)):
        return type(a)
    return None


def _signature(func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """The cache key of an op's output dtypes (one pass over the top level: the hot path)."""
    key = [func]
    for a in args:
        key.append((a.dtype, a.dim() == 0) if isinstance(a, torch.Tensor) else _signature_of(a))
    for k, v in kwargs.items():
        key.append(k)
        key.append(_signature_of(v))
    return tuple(key)


def _to_meta(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
    if isinstance(a, (list, tuple)):
        return type(a)(_to_meta(x) for x in a)
    return a


def _flat(out: Any) -> list[Any]:
    """An op's results as a list: one tensor, or the items of its tuple/list."""
    return list(out) if isinstance(out, (list, tuple)) else [out]


# (op, signature) -> the dtypes of the real op's results (None: not a tensor). Process-wide:
# they depend on nothing else.
_OUT_DTYPES: dict[tuple[Any, ...], tuple[torch.dtype | None, ...]] = {}


def _real_dtypes(
    func: Any, plan: _Plan, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[torch.dtype | None, ...]:
    key = _signature(func, args, kwargs)
    found = _OUT_DTYPES.get(key)
    if found is None:
        found = _OUT_DTYPES[key] = _probe(func, plan, args, kwargs)
    return found


def _clone_tensors(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return a.clone()
    if isinstance(a, (list, tuple)):
        return type(a)(_clone_tensors(x) for x in a)
    return a


def _tiny(a: Any) -> Any:
    """A one-element tensor of `a`'s dtype and rank (a copy: probes may write it)."""
    if isinstance(a, torch.Tensor):
        if a.numel() <= 1:
            return a.detach().clone()
        return a.detach().reshape(-1)[:1].reshape((1,) * a.dim()).clone()
    if isinstance(a, (list, tuple)):
        return type(a)(_tiny(x) for x in a)
    return a


def _probe(func: Any, plan: _Plan, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[torch.dtype | None, ...]:
    """The dtypes of `func`'s results, from the real low-precision kernel run once on the real
    inputs (the arguments it writes cloned): the CPU's own dtypes by construction (CPU norm
    kernels keep fp16 statistics where meta kernels say fp32), and what real training hits
    where the CPU kernel refuses a dtype mix. Meta kernels would need no compute, but many are
    Python decompositions whose first call imports torch._dynamo (~0.7 s a process); they
    answer only where the CPU has no kernel for these dtypes (then CUDA's dtypes, which the
    CPU-less op would have there)."""
    # First on one-element stand-ins of the same dtypes and ranks (an fp16 CPU matmul of
    # GPT-2's logits takes seconds; a 1x1 one answers the same): broadcasting, reductions over
    # a dim and matmuls take them; ops whose size arguments must match (a layer norm's
    # normalized_shape, a grouped convolution) refuse them and get the real inputs.
    # Only ops that return one tensor and write none: how many tensors a split returns, and
    # what a kernel does with a written argument of the wrong size, depend on the sizes.
    returns = func._schema.returns
    if len(returns) == 1 and str(returns[0].type) == "Tensor" and not (plan.written or plan.written_kwargs):
        try:
            out = func(*_tiny(args), **{k: _tiny(v) for k, v in kwargs.items()})
            return tuple(t.dtype if isinstance(t, torch.Tensor) else None for t in _flat(out))
        except Exception:
            pass
    if plan.written or plan.written_kwargs:
        args = tuple(_clone_tensors(a) if i in plan.written else a for i, a in enumerate(args))
        kwargs = {k: _clone_tensors(v) if k in plan.written_kwargs else v for k, v in kwargs.items()}
    try:
        out = func(*args, **kwargs)
    except Exception as error:
        try:
            out = func(*_to_meta(args), **{k: _to_meta(v) for k, v in kwargs.items()})
        except Exception:
            raise error from None
    return tuple(t.dtype if isinstance(t, torch.Tensor) else None for t in _flat(out))


class EmulateLowMode(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch's TorchDispatchMode is unannotated
    """Ops reading tensors of the `emulate` dtypes run as fp32 kernels on upcast inputs, their
    outputs rounded to the dtypes the real op makes (found once per op and input dtypes and
    kept for the process: `_probe`). Dtypes, aliasing and in-place writes are those of the
    real op; values are what an fp32-accumulating low-precision kernel computes. Ops that
    only move values, and random ops, run the real kernel.

    `low_run` and `low_precision` emulate bf16 only where the CPU has no fast bf16 kernels
    (`cpu_bf16_emulated`)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # As ShadowMode: torch would wrap the handler in `torch._dynamo.disable`, whose first
        # call imports torch._dynamo (~0.7 s) and each op would pay the wrapper. `dynamo_safe`
        # wraps it when torch._dynamo is already imported.
        return False

    def __init__(self, emulate: tuple[torch.dtype, ...] = (torch.float16,)) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # torch's TorchDispatchMode is unannotated
        self.emulate = tuple(emulate)
        self._wrappers = wrapper_types()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if types and not self._wrappers.isdisjoint(types):
            return NotImplemented  # a DTensor's ops reach this mode on its local tensors
        if self._wrappers and faking():
            return func(*args, **(kwargs or {}))
        return self.run(func, args, kwargs or {})

    def run(self, func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        """`func(*args, **kwargs)` with the emulation (called with this mode off the stack)."""
        plan = _PLANS.get(func) or _plan(func)
        if plan.real or not self._reads_low(args, kwargs):
            return func(*args, **kwargs)
        return self._emulated(func, plan, _real_dtypes(func, plan, args, kwargs), args, kwargs)

    def _reads_low(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
        low = self.emulate
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                if a.dtype in low:
                    return True
            elif isinstance(a, (list, tuple)):
                for t in a:
                    if isinstance(t, torch.Tensor) and t.dtype in low:
                        return True
        return False

    def _up(self, a: Any, upcast: dict[int, torch.Tensor]) -> Any:
        if isinstance(a, torch.Tensor):
            if a.dtype not in self.emulate:
                return a
            u = upcast.get(id(a))
            if u is None:
                u = upcast[id(a)] = a.float()
            return u
        if isinstance(a, torch.dtype):
            # A dtype argument in the low dtype (`sum(dtype=)`, the softmax backward's
            # input_dtype) follows the upcast; the result is rounded to the real dtype.
            return torch.float32 if a in self.emulate else a
        if isinstance(a, (list, tuple)):
            return type(a)(self._up(x, upcast) for x in a)
        return a

    def _emulated(
        self,
        func: Any,
        plan: _Plan,
        dtypes: tuple[torch.dtype | None, ...],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
    ) -> Any:
        upcast: dict[int, torch.Tensor] = {}  # one copy per tensor: `x * x` stays one input
        try:
            out = func(*[self._up(a, upcast) for a in args], **{k: self._up(v, upcast) for k, v in kwargs.items()})
        except Exception:
            # The fp32 kernel refused what the low one takes: the real kernel decides (and
            # raises the model's own error where it fails too).
            return func(*args, **kwargs)

        # Written arguments get the rounded result, and the op returns them as the real op
        # returns its written arguments, so aliasing is kept.
        written_by_upcast: dict[int, torch.Tensor] = {}
        if plan.written or plan.written_kwargs:
            targets = [args[i] for i in plan.written if i < len(args)]
            targets += [kwargs[n] for n in plan.written_kwargs if n in kwargs]
            for target in targets:
                for t in target if isinstance(target, (list, tuple)) else (target,):
                    if isinstance(t, torch.Tensor) and id(t) in upcast:
                        u = upcast[id(t)]
                        if t.shape != u.shape:  # an `out=` the op resized
                            t.resize_(u.shape)
                        t.copy_(u)
                        written_by_upcast[id(u)] = t

        def fix(t: Any, dtype: torch.dtype | None) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            original = written_by_upcast.get(id(t))
            if original is not None:
                return original
            return t.to(dtype) if dtype is not None and t.dtype != dtype else t

        if isinstance(out, (list, tuple)):
            if len(dtypes) != len(out):
                # A `Tensor[]` result (`unsafe_split`): its length depends on sizes, which the
                # cache key leaves out (a GRU's gates split in 3, an LSTM's in 4), its dtype
                # does not. Zipped with the cached entry, the result lost tensors, and torch's
                # C++ caller read past the list's end (a segfault).
                dtypes = (dtypes[0] if dtypes else None,) * len(out)
            fixed = [fix(t, d) for t, d in zip(out, dtypes, strict=True)]
            return fixed if isinstance(out, list) else tuple(fixed)
        return fix(out, dtypes[0] if dtypes else None)


EMULATE_BF16_ENV = "PRECISION_DOCTOR_EMULATE_BF16"
"""Forces the bf16 decision of `cpu_bf16_emulated`: `1` emulates, `0` runs the CPU's bf16
kernels, `auto` (or unset) decides from the CPU."""

_ON, _OFF = frozenset({"1", "true", "yes", "on"}), frozenset({"0", "false", "no", "off"})


@functools.cache
def _onednn_bf16() -> bool:
    """Whether oneDNN runs bf16 on this CPU (an x86 CPU with AVX-512 or AMX, an ARM one with
    its BF16 extension; oneDNN's own ISA cap, `ONEDNN_MAX_CPU_ISA`, counts)."""
    try:
        available = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]  # unannotated in torch
        return bool(available and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the query: assume the slow path
        return False


def cpu_bf16_emulated() -> bool:
    """Whether a bf16 run on the CPU emulates its arithmetic (`EmulateLowMode`): where the CPU
    has no fast bf16 kernels. Decided from the CPU's features, not from a timing: CPU bf16
    matmuls and convolutions are fast only through oneDNN, which runs bf16 on CPUs with
    AVX-512 or AMX (ARM's BF16 extension); elsewhere (an AVX2 CPU, or oneDNN switched off by
    `torch.backends.mkldnn`) they fall back to ATen's scalar loops: a 512x512 matmul 100-150x
    fp32's, a GPT-2 training step 55x. The features decide the same on every run, where a
    timing on a loaded machine would not (a report should not change with the machine's
    load). `PRECISION_DOCTOR_EMULATE_BF16` (`EMULATE_BF16_ENV`) overrides: `1` emulates, `0`
    runs the real kernels.

    The emulation is as faithful as fp16's: the CPU's bf16 kernels compute in fp32 and round
    each result to bf16, as the emulation does; the two differ where fp32 accumulation order
    makes a result round the other way, and in the few kernels with their own approximation
    (CPU bf16 `rsqrt`): one bf16 ulp, 2^-8..2^-7 relative (`tests/test_bf16_emulation.py`)."""
    forced = os.environ.get(EMULATE_BF16_ENV, "").strip().lower()
    if forced in _ON:
        return True
    if forced in _OFF:
        return False
    if forced not in ("", "auto"):
        raise PrecisionDoctorError(
            f"{EMULATE_BF16_ENV}={forced!r}: use 1 (emulate bf16), 0 (real bf16 kernels) or auto"
        )
    return not (torch.backends.mkldnn.enabled and _onednn_bf16())


def emulates(dtype: torch.dtype, device: str) -> bool:
    """Whether a low run in `dtype` on `device` emulates its arithmetic (`low_run`,
    `low_precision` by default): fp16 on the CPU; bf16 on a CPU without fast bf16 kernels
    (`cpu_bf16_emulated`); never on a GPU, whose kernels are real.

    >>> emulates(torch.float16, "cpu"), emulates(torch.float16, "cuda"), emulates(torch.bfloat16, "cuda")
    (True, False, False)
    """
    return bool(_emulated_dtypes(dtype, device, None))


def _emulated_dtypes(dtype: torch.dtype, device: str, emulate: bool | None) -> tuple[torch.dtype, ...]:
    if emulate is None:
        # Some CPU fp16 kernels are very slow (convolution backward ~100x fp32), CPU bf16 ones
        # are where oneDNN runs them (`cpu_bf16_emulated`); a GPU runs its own.
        emulate = device == "cpu" and (dtype == torch.float16 or (dtype == torch.bfloat16 and cpu_bf16_emulated()))
    if emulate and device != "cpu":
        raise PrecisionDoctorError(
            f"low precision is emulated on the CPU only, not on {device!r}: its kernels are real"
        )
    return (dtype,) if emulate else ()


@contextlib.contextmanager
def low_precision(
    model: torch.nn.Module,
    dtype: torch.dtype,
    *,
    regime: Regime | str,
    policy: AutocastPolicy | str,
    device_type: str | None = None,
    emulate: bool | None = None,
) -> Iterator[None]:
    """Run `model` in `dtype` as real low-precision training does, for training loops.

    `regime=autocast`: `torch.autocast(device_type, dtype)` with `policy`'s op lists (CUDA's
    on the CPU: see `autocast_policy`). `regime=pure`: the caller has cast the model
    (`model.to(dtype)`) and casts floating inputs; this context adds only the emulation, and
    `policy` does not apply. A loss computed inside runs under the same autocast (as in
    `with torch.autocast(...): loss = loss_fn(model(x), y)`); run its backward outside, in
    `low_precision_backward`.

    `emulate` (default: fp16 on the CPU, and bf16 on a CPU without fast bf16 kernels: see
    `emulates`) runs low-precision ops as fp32 kernels with rounded results
    (`EmulateLowMode`), backward included; on the CPU only (a GPU's kernels are real). The
    device type defaults to that of the model's parameters.

    >>> import torch
    >>> net = torch.nn.Linear(2, 1)
    >>> with low_precision(net, torch.float16, regime="autocast", policy="cuda"):
    ...     y = net(torch.tensor([[70000.0, 0.0]]))
    >>> y.dtype, bool(torch.isinf(y).all())
    (torch.float16, True)
    """
    regime = Regime(regime)
    policy = AutocastPolicy(policy)
    device = device_type or model_device_type(model)
    emulated = _emulated_dtypes(dtype, device, emulate)
    with contextlib.ExitStack() as stack:
        if regime == Regime.AUTOCAST:
            stack.enter_context(autocast_policy(policy, device))
            stack.enter_context(torch.autocast(device, dtype=dtype))
        if emulated:
            stack.enter_context(dynamo_safe(EmulateLowMode)(emulated))
        yield


@contextlib.contextmanager
def low_precision_backward(
    model: torch.nn.Module, dtype: torch.dtype, *, emulate: bool | None = None
) -> Iterator[None]:
    """The backward of a step whose forward and loss ran in `low_precision`: outside autocast,
    as PyTorch prescribes (each backward op runs in the dtypes its forward op left it; inside
    an autocast region the region casts the backward's matmuls too, so a unit a plan keeps in
    fp32 would get its weight gradient computed in fp16), with the low dtype's kernels
    emulated on the CPU as in the forward (`emulate` as in `low_precision`).

    >>> import torch
    >>> net = torch.nn.Linear(2, 1)
    >>> with low_precision(net, torch.float16, regime="autocast", policy="cuda"):
    ...     loss = net(torch.ones(1, 2)).float().sum()
    >>> with low_precision_backward(net, torch.float16):
    ...     loss.backward()
    >>> net.weight.grad.dtype
    torch.float32
    """
    emulated = _emulated_dtypes(dtype, model_device_type(model), emulate)
    with dynamo_safe(EmulateLowMode)(emulated) if emulated else contextlib.nullcontext():
        yield


@dataclass
class LowRun:
    """What one real low-precision forward (and loss) computed."""

    loss: float
    loss_dtype: torch.dtype
    op_dtypes: dict[OpKey, OpDtypes]
    """Per value-making op (`OpKeyer`'s name): the dtypes of its tensor inputs
    (`ops.tensor_leaves` order) and of its outputs (`ops.outputs_of` order)."""
    module_outputs: dict[tuple[str, int], list[torch.Tensor]]
    """(module path, `<root>` for the root; which call of it) -> the floating tensors of the
    call's output (pytree order), detached, in their own dtype."""
    op_log: list[tuple[str, tuple[torch.dtype, ...]]] = field(default_factory=list)
    """Every aten op (`mm.default`) with its output dtypes, in order (`record_ops`)."""
    graph: LowGraph | None = None
    """The loss with its autograd graph, for one backward later (`keep_graph`)."""


GradientSink = Callable[[list[str], torch.Tensor], None]
"""Takes one parameter's low-precision gradient, unscaled, as the backward makes it: the
names the parameter goes by (a tied one has several) and the fp32 tensor."""


class LowGraph:
    """The low run's loss with its autograd graph, kept for one backward at a loss scale
    chosen after it (the analysis picks the scale from the fp32 run's gradients, which come
    later). The graph holds the low run's activations until `backward`."""

    def __init__(
        self, loss: torch.Tensor, params: Mapping[str, torch.Tensor], emulate: tuple[torch.dtype, ...]
    ) -> None:
        self._loss: torch.Tensor | None = loss
        self._params = dict(params)  # by name: the low copies in the pure regime
        self._emulate = emulate

    def backward(self, scale_log2: int, sink: GradientSink) -> None:
        """Backward of the loss scaled by 2^k, as `GradScaler.scale` multiplies it (by an
        fp32 scale: the product is fp32, and its gradient reaches a low loss in the loss's
        dtype), outside autocast, emulated as the forward was. Each parameter's
        gradient goes to `sink` as soon as it is accumulated, unscaled as
        `GradScaler.unscale_` does it, in fp32 (`grad.float() * 2^-k`), and is dropped from
        the parameter: a sink that compares and forgets holds one gradient at a time, not a
        second copy of every one (GPT-2's are 0.5 GB). Parameters that get none are not
        sunk. The parameters' `.grad` are as before afterwards; the graph is freed. The
        model's own backward exceptions propagate, and the sink's."""
        loss = self._loss
        if loss is None:
            raise RuntimeError("the low run's graph was already used")
        self._loss = None
        names: dict[int, list[str]] = {}
        for n, p in self._params.items():
            names.setdefault(id(p), []).append(n)
        unique = {id(p): p for p in self._params.values()}
        saved = {i: p.grad for i, p in unique.items()}

        def arrived(p: torch.Tensor) -> None:
            g = p.grad
            p.grad = None
            if g is None:
                return
            with _disable_current_modes():  # the sink's work is no op of the run
                g = (g.to_dense() if g.is_sparse else g).detach()
                # `.float()` of a complex gradient keeps its real part only (a sink that
                # keeps it for the optimizer step would step with that).
                g = g.to(torch.complex64) if g.is_complex() else g.float()
                # In place, as unscale_ does: this backward made the tensor (or `.float()`
                # copied it).
                sink(names[id(p)], g.mul_(2.0**-scale_log2) if scale_log2 else g)

        handles = []
        try:
            for p in unique.values():
                p.grad = None
                if p.requires_grad:
                    handles.append(p.register_post_accumulate_grad_hook(arrived))  # type: ignore[no-untyped-call]  # unannotated in torch
            with contextlib.ExitStack() as stack:
                if self._emulate:
                    stack.enter_context(dynamo_safe(EmulateLowMode)(self._emulate))
                scaled = loss * torch.tensor(2.0**scale_log2, dtype=torch.float32, device=loss.device)
                del loss
                scaled.backward()  # type: ignore[no-untyped-call]  # unannotated in torch
        finally:
            for h in handles:
                h.remove()
            for i, p in unique.items():
                p.grad = saved[i]


@dataclass(frozen=True)
class _Recast:
    """A saved low-precision cast of a parameter, packed as how to make it again (see
    `_ParamCasts`): the view of it that was saved, and the parameter's version then."""

    param: torch.Tensor
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    version: int


class _ParamCasts:
    """The autocast casts of the parameters (`w.to(fp16)` before a matmul), which the low
    graph saves for its backward: kept as how to make them again instead of the casts
    themselves while the graph waits through the fp32 capture (`saved_tensors_hooks`), and made
    again, bit for bit, when the backward unpacks them. On GPT-2 small that is 250 MB of fp16
    weights off the analysis' peak. A parameter written in place since makes the unpack raise,
    and the caller runs forward and backward again at once (`LowRun.graph`'s contract)."""

    def __init__(self, model: torch.nn.Module) -> None:
        # Plain parameters only: `low_run` takes no recipes where `applies` does not hold.
        self.params = {id(p): p for p in model.parameters() if p.is_floating_point()}
        # storage -> (the cast, weakly: a freed cast's memory may hold another tensor; param;
        # its version)
        self.casts: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor, int]] = {}
        self._storages = {p.untyped_storage().data_ptr() for p in self.params.values()}
        # A write into a parameter's memory or a cast's during the forward (through `.data`
        # too, which a version does not see; a parameter is restored when the run ends): no
        # cast can be made again.
        self.stale = False

    @staticmethod
    def applies(model: torch.nn.Module) -> bool:
        """Whether every parameter is a plain tensor (no DTensor, no subclass)."""
        return all(type(p) in (torch.Tensor, torch.nn.Parameter) for p in model.parameters())

    def written(self, t: torch.Tensor) -> None:
        """An op of the forward is about to write `t`: a parameter, or a cast of one (whose
        saved values `param.to(dtype)` would no longer make), stales every recipe."""
        ptr = t.untyped_storage().data_ptr()
        if ptr in self._storages or ptr in self.casts:
            self.stale = True

    def saw(self, func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any) -> None:
        """An op of the low run: note it if it casts a parameter as autocast does (a dtype and
        nothing else: `p.to(fp16, memory_format=...)` is no cast `p.to(fp16)` makes again)."""
        if func is aten._to_copy.default and args and id(args[0]) in self.params and isinstance(out, torch.Tensor):
            p = args[0]
            if set(kwargs) == {"dtype"} and out.device == p.device and out.stride() == p.stride():
                self.casts[out.untyped_storage().data_ptr()] = (weakref.ref(out), p, p._version)

    def forward_done(self) -> None:
        """The forward has ended: nothing is packed from here on, and a storage address noted
        here may come to hold another tensor."""
        self.casts.clear()

    def pack(self, t: torch.Tensor) -> Any:
        if not self.casts or type(t) is not torch.Tensor or t.device.type == "meta":
            return t
        ptr = t.untyped_storage().data_ptr()
        found = self.casts.get(ptr)
        if found is None:
            return t
        ref, param, version = found
        cast = ref()
        if cast is None or cast.untyped_storage().data_ptr() != ptr or cast.dtype != t.dtype:
            return t
        return _Recast(param, t.dtype, tuple(t.size()), tuple(t.stride()), int(t.storage_offset()), version)

    def unpack(self, x: Any) -> torch.Tensor:
        if not isinstance(x, _Recast):
            return x  # type: ignore[no-any-return]
        if self.stale or x.param._version != x.version:
            raise RuntimeError("a parameter was written in place since the low forward cast it")
        with _disable_current_modes(), torch.no_grad():
            made = x.param.detach().to(x.dtype)
        return torch.as_strided(made, x.size, x.stride, x.offset)

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _LowRunMode(EmulateLowMode):  # type: ignore[no-untyped-call]  # as EmulateLowMode
    """The emulation plus what `LowRun` records: keyed op dtypes and the op log."""

    def __init__(
        self,
        emulate: tuple[torch.dtype, ...],
        tracker: UnitTracker,
        on_write: Callable[[torch.Tensor], None],
        log: list[tuple[str, tuple[torch.dtype, ...]]] | None,
        casts: _ParamCasts | None = None,
    ) -> None:
        super().__init__(emulate)
        self.tracker = tracker
        self.keyer = OpKeyer(tracker)
        self.on_write = on_write
        self.log = log
        self.casts = casts
        self.op_dtypes: dict[OpKey, OpDtypes] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if types and not self._wrappers.isdisjoint(types):
            return NotImplemented  # a DTensor's ops reach this mode on its local tensors
        if self._wrappers and faking():
            return func(*args, **(kwargs or {}))
        kwargs = kwargs or {}
        info = op_info(func)
        if info.mutates or info.writes_kwargs:
            for i in info.mutates:
                if i < len(args):
                    self._before_write(args[i])
            for name in info.writes_kwargs:
                self._before_write(kwargs.get(name))
        out = self.run(func, args, kwargs)
        if self.casts is not None:
            self.casts.saw(func, args, kwargs, out)
        if not (info.preserves_values or info.communicates or info.bookkeeping):  # as the capture keys them
            key = self.keyer.key(self.tracker.current, info.name)
            self.op_dtypes[key] = (
                tuple(t.dtype for t in tensor_leaves(args, kwargs)),
                tuple(t.dtype for t in outputs_of(out)),
            )
        if self.log is not None:
            self.log.append((info.name, tuple(t.dtype for t in outputs_of(out))))
        return out

    def _before_write(self, target: Any) -> None:
        for t in target if isinstance(target, (list, tuple)) else (target,):
            if isinstance(t, torch.Tensor):
                self.on_write(t)


class _ModuleOutputs:
    """Each module call's floating outputs. An output written in place later (a ReLU with
    inplace=True on a Linear's output) is copied first, so each entry keeps what the call
    returned."""

    def __init__(self) -> None:
        self.outputs: dict[tuple[str, int], list[torch.Tensor]] = {}
        self._by_storage: dict[int, list[tuple[tuple[str, int], int]]] = {}

    def record(self, path: str, call: int, out: Any) -> None:
        floats = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        self.outputs[(path, call)] = floats
        for i, t in enumerate(floats):
            ptr = storage_ptr(t)
            if ptr:
                self._by_storage.setdefault(ptr, []).append(((path, call), i))

    def before_write(self, t: torch.Tensor) -> None:
        """Called from the mode's handler (the mode is off the stack: the clone is no op of
        the run), before an op writes `t`."""
        if not self._by_storage:
            return
        entries = self._by_storage.pop(storage_ptr(t), None)
        for key, i in entries or ():
            self.outputs[key][i] = self.outputs[key][i].detach().clone()

    def detached(self) -> dict[tuple[str, int], list[torch.Tensor]]:
        return {k: [t.detach() for t in v] for k, v in self.outputs.items()}


@contextlib.contextmanager
def _low_copy(model: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[dict[int, torch.Tensor]]:
    """The model's floating parameters and buffers swapped for `dtype` copies, as
    `model.to(dtype)` makes them (tied parameters stay tied), and swapped back on exit;
    yields id(original) -> copy. `dtype` None: only the buffers, every one swapped for a
    clone (see `low_run`'s `keep_graph`)."""
    copies: dict[int, torch.Tensor] = {}
    swapped: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for mod in model.modules():
                stores: tuple[tuple[dict[str, Any], bool], ...] = ((mod._parameters, True), (mod._buffers, False))
                for store, is_param in stores:
                    if dtype is None and is_param:
                        continue
                    for name, t in list(store.items()):
                        if t is None or (dtype is not None and (not t.is_floating_point() or t.dtype == dtype)):
                            continue
                        low = copies.get(id(t))
                        if low is None:
                            low = t.detach().to(dtype) if dtype is not None else t.detach().clone()
                            if is_param:
                                low = torch.nn.Parameter(low, requires_grad=t.requires_grad)
                            copies[id(t)] = low
                        swapped.append((store, name, t))
                        store[name] = low
        yield copies
    finally:
        for store, name, t in reversed(swapped):
            store[name] = t


def cast_floats(batch: Any, dtype: torch.dtype) -> Any:
    """The batch with its floating tensors in `dtype` (the pure regime's inputs). A mapping
    that pytree does not know (transformers' `BatchEncoding`/`BatchFeature`) becomes the dict
    `run_model` passes as keyword arguments, so its float tensors (`pixel_values`) are cast
    too instead of passing through as one opaque leaf."""
    batch = as_tree(batch)

    def cast_one(x: Any) -> Any:
        return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    return pytree.tree_map(cast_one, batch)


def low_run(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: LossFn | None,
    dtype: torch.dtype,
    *,
    regime: Regime | str,
    policy: AutocastPolicy | str,
    record_ops: bool = True,
    keep_graph: bool = False,
    gradients_at: tuple[int, GradientSink] | None = None,
) -> LowRun:
    """One forward (and loss) of the real low-precision run of `model` on `batch`; no backward.

    `regime=autocast` runs it under `torch.autocast(device, dtype)` with `policy`'s op lists;
    `regime=pure` swaps the parameters and floating buffers for `dtype` copies for the call
    and casts the batch's floating tensors. fp16 on the CPU is emulated (`EmulateLowMode`),
    and bf16 on a CPU without fast bf16 kernels (`emulates`).

    `keep_graph`: the loss keeps its autograd graph (`LowRun.graph`) for one backward later.
    The run then reads clones of the buffers, so what the graph saved is neither the buffers
    restored here in place nor those a later run updates (BatchNorm's running statistics and
    BERT's `position_ids` are saved for their backward). `gradients_at=(k, sink)` runs that
    backward at once, before the model is restored, at loss scale 2^k (`LowGraph.backward`):
    where a kept graph cannot run any more (the model writes a parameter in place in its
    forward, which restoring it undoes in place).

    The model comes out as it went in (parameters, buffers, `.grad`, modes, RNG states: a
    later run draws the same dropout masks), also when the forward raises; the model's and
    the loss function's own exceptions propagate unchanged.
    """
    regime = Regime(regime)
    policy = AutocastPolicy(policy)
    device = model_device_type(model, *pytree.tree_leaves(batch))
    log: list[tuple[str, tuple[torch.dtype, ...]]] | None = [] if record_ops else None
    outputs = _ModuleOutputs()
    tracker = UnitTracker(model, on_exit=lambda path: None, on_output=outputs.record)
    with ModelStateGuard(model, batch) as guard, contextlib.ExitStack() as stack:

        def before_write(t: torch.Tensor) -> None:
            guard.before_mutation(t)
            outputs.before_write(t)
            if casts is not None:
                casts.written(t)

        # A graph kept through the fp32 capture saves its parameter casts as recipes; not where
        # parameters are DTensors (tensor parallel, FSDP2): packing every saved tensor makes a
        # collective's unwaited result wait in another place than the model's own run.
        casts = (
            _ParamCasts(model)
            if keep_graph and gradients_at is None and regime == Regime.AUTOCAST and _ParamCasts.applies(model)
            else None
        )
        named: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
        if regime == Regime.PURE:
            copies = stack.enter_context(_low_copy(model, dtype))
            named = {n: copies.get(id(p), p) for n, p in named.items()}
            batch = cast_floats(batch, dtype)
        else:
            stack.enter_context(autocast_policy(policy, device))
        if keep_graph or gradients_at is not None:
            stack.enter_context(_low_copy(model, None))
        emulated = _emulated_dtypes(dtype, device, None)
        mode = dynamo_safe(_LowRunMode)(emulated, tracker, before_write, log, casts)
        autocast = torch.autocast(device, dtype=dtype) if regime == Regime.AUTOCAST else contextlib.nullcontext()
        with tracker, mode, autocast, casts.hooks() if casts is not None else contextlib.nullcontext():
            output = run_model(model, batch)
            tracker.outside = LOSS_UNIT
            loss = resolve_loss(output, batch, loss_fn)
        del output
        if casts is not None:
            casts.forward_done()
        value = float(loss.detach())
        graph = (
            LowGraph(loss, named, emulated) if (keep_graph or gradients_at is not None) and loss.requires_grad else None
        )
        if gradients_at is not None and graph is not None:
            graph.backward(*gradients_at)
        return LowRun(
            loss=value,
            loss_dtype=loss.dtype,
            op_dtypes=mode.op_dtypes,
            module_outputs=outputs.detached(),
            op_log=log if log is not None else [],
            graph=graph if keep_graph and gradients_at is None else None,
        )
