"""CUDA's autocast op policy applied by `torch.autocast("cpu")`.

CPU and CUDA autocast cast different ops: CUDA runs softmax, layer_norm, exp, pow and sums in
fp32 where CPU runs them in the low dtype, and casts fewer ops overall. A low-precision run on
the CPU that is to stand for GPU training must follow CUDA's lists. `autocast_policy(CUDA)`
replaces the AutocastCPU kernels of aten ops with Python kernels implementing CUDA's lists
(copied from torch's `ATen/autocast_mode.h`) and lets every other op fall through, so that
`torch.autocast("cpu", low)` casts exactly as `torch.autocast("cuda", low)` would. Recurrent
layers are the exception: CUDA casts them in a kernel of its own, which `RECURRENT` models (see
there). Leaving the context destroys the registrations, which brings torch's own CPU kernels
back.

The override is process-wide (the dispatcher has one kernel table): while it is installed,
every thread's CPU autocast follows CUDA's lists. Only aten ops are overridden; an extension's
own autocast kernels (torchvision's) keep their CPU registration.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import torch

from precision_doctor.capture.ops import map_args, tensor_leaves
from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.options import AutocastPolicy

__all__ = [
    "BANNED",
    "FP32",
    "FP32_APPEND_DTYPE",
    "FP32_SET_OPT_DTYPE",
    "LOWER_PRECISION_FP",
    "PROMOTE",
    "RECURRENT",
    "autocast_policy",
]

# The CUDA op lists, as aten overload names (`name` for the default overload, `name.overload`
# otherwise), in the order of torch 2.13's ATen/autocast_mode.h. tests/test_lowrun.py checks
# them against the header of the installed torch.

# AT_FORALL_LOWER_PRECISION_FP: every floating input cast to the low dtype.
LOWER_PRECISION_FP: tuple[str, ...] = (
    "_convolution.deprecated", "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc",
    "conv_transpose1d", "conv_transpose2d.input", "conv_transpose3d.input", "convolution",
    "prelu", "addmm", "addmv", "addr", "matmul", "einsum", "mm", "mv", "linalg_vecdot", "linear",
    "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot", "_thnn_fused_lstm_cell",
    "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
    "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
)  # fmt: skip
# AT_FORALL_FP32: every floating input cast to fp32.
FP32: tuple[str, ...] = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
    "reciprocal", "rsqrt", "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar",
    "softplus", "layer_norm", "native_layer_norm", "rms_norm", "group_norm", "frobenius_norm.dim",
    "nuclear_norm", "nuclear_norm.dim", "cosine_similarity", "poisson_nll_loss",
    "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div",
    "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
    "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d",
    "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d",
    "upsample_linear1d", "upsample_bilinear2d", "_upsample_bilinear2d_aa",
    "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bicubic2d_aa",
)  # fmt: skip
# AT_FORALL_FP32_SET_OPT_DTYPE: fp32 unless the call gives a dtype (when the first input is
# eligible): `dtype=float32` is passed, the inputs are not cast.
FP32_SET_OPT_DTYPE: tuple[str, ...] = (
    "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum",
    "linalg_vector_norm", "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum",
    "sum.dim_IntList",
)  # fmt: skip
# AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE: redispatched to the overload that takes a dtype,
# with fp32 (or the first input's dtype when it is not eligible).
FP32_APPEND_DTYPE: Mapping[str, str] = {
    "norm.Scalar": "norm.ScalarOpt_dtype",
    "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype",
}
# AT_FORALL_PROMOTE: all floating inputs cast to the widest of them (fp32 if any is fp32).
PROMOTE: tuple[str, ...] = (
    "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler",
    "index_put", "tensordot", "scatter_add",
)  # fmt: skip
# Modelled, not copied from a list: CUDA runs nn.LSTM/GRU/RNN through `_cudnn_rnn`, whose
# autocast kernel (ATen/cudnn/AutocastRNN.cpp, `_cudnn_rnn_cast_reflatten`) casts the input,
# the hidden states and the flattened weights to fp16 and returns fp16: the whole layer runs
# low. The CPU has no `_cudnn_rnn`. These composite ops, whose CPU decompositions (oneDNN's
# `mkldnn_rnn_layer` per layer, or matmuls and pointwise gates) do its work, get every
# floating input cast low and run their decomposition without autocast. Left to fall
# through, an LSTM ran fp32 (`mkldnn_rnn_layer` is on the CPU's list only) and a GRU its gates
# in fp32 beside fp16 matmuls. One difference is kept: CUDA casts to fp16 even under bf16
# autocast; here they run in the autocast dtype, as the analysis holds one low dtype.
RECURRENT: tuple[str, ...] = (
    "lstm.input", "lstm.data", "gru.input", "gru.data", "rnn_tanh.input", "rnn_tanh.data",
    "rnn_relu.input", "rnn_relu.data",
)  # fmt: skip
# An LSTM on an fp32 input runs oneDNN's fused layers on the CPU, the counterpart of
# `_cudnn_rnn`: cast low by the same rule. `lstm.input` lets them run (its input upcast where
# it is low: exact, and cast back), because cast low before its decomposition an LSTM that
# trains runs matmuls and gates instead (torch's `use_mkldnn` takes fp16 only without grad):
# other ops than the fp32 run's, which the analysis compares op by op.
_FUSED_RNN = "mkldnn_rnn_layer"
# Registered in autocast_mode.cpp, not in the header's lists: an error under CUDA autocast.
BANNED: tuple[str, ...] = ("binary_cross_entropy",)

_BANNED_MESSAGE = (
    "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast "
    "(CUDA autocast policy). Many models use a sigmoid layer right before the binary cross "
    "entropy layer. In this case, combine the two layers using "
    "torch.nn.functional.binary_cross_entropy_with_logits or torch.nn.BCEWithLogitsLoss, "
    "which are safe to autocast."
)

_KEY = "AutocastCPU"
# Our kernels call the op again: without the AutocastCPU key, as the C++ kernels redispatch.
_EXCLUDE_AUTOCAST = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
_LOWER, _FP32, _SET_OPT_DTYPE, _APPEND_DTYPE, _PROMOTE, _BANNED, _RECURRENT = range(7)
_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd
_NATIVE: Mapping[str, AutocastPolicy] = {"cpu": AutocastPolicy.CPU, "cuda": AutocastPolicy.CUDA}


def _eligible(t: torch.Tensor) -> bool:
    """autocast's `is_eligible` for the CPU: a CPU floating tensor other than float64."""
    return t.is_floating_point() and t.dtype != torch.float64 and t.device.type == "cpu"


class _CastCache:
    """The Python twin of autocast's weight cache: within one autocast region, each fp32 leaf
    that requires grad (a parameter) is cast to the low dtype once, however many ops read it.
    Besides the saved casts this keeps the ops of a run those of a real one (one `_to_copy`
    of a weight, not one per use) and autograd's graph alike (one cast node)."""

    def __init__(self) -> None:
        self._casts: dict[int, tuple[weakref.ref[torch.Tensor], int, torch.Tensor]] = {}

    def cast(self, t: torch.Tensor, to: torch.dtype) -> torch.Tensor:
        if not _eligible(t) or t.dtype == to:
            return t
        if (
            to == torch.get_autocast_dtype("cpu")
            and t.dtype == torch.float32
            and t.requires_grad
            and t.is_leaf
            and not t._is_view()
            and torch.is_autocast_cache_enabled()
        ):
            hit = self._casts.get(id(t))
            # The version check goes beyond torch's cache: a weight updated in place inside
            # one region (an optimizer step under the context) is cast afresh, not stale.
            if hit is not None and hit[0]() is t and hit[1] == t._version:
                return hit[2]
            cast = t.to(to)
            self._casts[id(t)] = (weakref.ref(t), t._version, cast)
            return cast
        return t.to(to)

    def clear(self) -> None:
        self._casts.clear()


def _overload(name: str) -> Any:
    """The OpOverload of `name` (`mm`, `pow.Tensor_Scalar`); None if this torch lacks it."""
    base, _, overload = name.partition(".")
    packet = getattr(torch.ops.aten, base, None)
    return getattr(packet, overload or "default", None) if packet is not None else None


def _fusable_lstm(args: tuple[Any, ...]) -> bool:
    """Whether torch runs `lstm.input` on these arguments as oneDNN layers once its input is
    fp32 (`use_mkldnn` in ATen's RNN.cpp, and no projections: a cell state wider than the
    hidden one)."""
    x, hx = (args[0], args[1]) if len(args) > 1 else (None, None)
    return (
        isinstance(x, torch.Tensor)
        and _eligible(x)
        and x.numel() > 0
        and isinstance(hx, (list, tuple))
        and len(hx) == 2
        and hx[0].size(-1) == hx[1].size(-1)
        and torch._C._has_mkldnn
        and torch._C._get_mkldnn_enabled()
    )


def _make_kernel(op: Any, category: int, cache: _CastCache, target: Any = None) -> Callable[..., Any]:
    arguments = op._schema.arguments
    dtype_arg = next((i for i, a in enumerate(arguments) if a.name == "dtype"), None)
    dtype_kwarg_only = dtype_arg is not None and arguments[dtype_arg].kwarg_only
    positional = [a for a in arguments if not a.kwarg_only]

    def first_eligible(args: tuple[Any, ...]) -> bool:
        return bool(args) and isinstance(args[0], torch.Tensor) and _eligible(args[0])

    def kernel(*args: Any, **kwargs: Any) -> Any:
        low = torch.get_autocast_dtype("cpu")
        if category == _RECURRENT and op is torch.ops.aten.lstm.input and _fusable_lstm(args):
            # torch's own decomposition (not the Python one in `py_kernels`), autocast on, so
            # that it calls `mkldnn_rnn_layer`, whose kernel casts everything low. A low input
            # is upcast for it (exactly: it is cast back): on a low input torch decomposes
            # into matmuls and gates instead, other ops than the fp32 run's (`_FUSED_RNN`).
            x = args[0] if args[0].dtype == torch.float32 else args[0].float()
            return op._op_dk(_COMPOSITE, x, *args[1:], **kwargs)
        with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE_AUTOCAST):
            if category in (_LOWER, _FP32, _RECURRENT):
                to = torch.float32 if category == _FP32 else low
                cargs, ckwargs = map_args(args, kwargs, lambda t: cache.cast(t, to))
                return op(*cargs, **ckwargs)
            if category == _SET_OPT_DTYPE:
                # An ineligible first input runs as called: setting a dtype could change the
                # op's own promotion (autocast_mode.h says the same).
                if first_eligible(args) and dtype_arg is not None:
                    if not dtype_kwarg_only and dtype_arg < len(args):
                        if args[dtype_arg] is None:
                            args = (*args[:dtype_arg], torch.float32, *args[dtype_arg + 1 :])
                    elif kwargs.get("dtype") is None:
                        kwargs = {**kwargs, "dtype": torch.float32}
                return op(*args, **kwargs)
            if category == _APPEND_DTYPE:
                # The dtype overload has no defaults where this one has (norm's p=2): the
                # omitted trailing arguments are filled in from this overload's schema.
                full = list(args)
                for a in positional[len(args) :]:
                    full.append(kwargs.pop(a.name) if a.name in kwargs else a.default_value)
                dtype = torch.float32 if first_eligible(args) else args[0].dtype
                return target(*full, **kwargs, dtype=dtype)
            if category == _PROMOTE:
                to = low
                for t in tensor_leaves(args, kwargs):
                    if _eligible(t):
                        if t.dtype == torch.float32:
                            to = torch.float32
                        elif t.dtype != low:
                            raise RuntimeError(
                                f"Unexpected floating ScalarType {t.dtype} in autocast's promote "
                                f"policy ({op}, autocast dtype {low})"
                            )
                cargs, ckwargs = map_args(args, kwargs, lambda t: cache.cast(t, to))
                return op(*cargs, **ckwargs)
            raise RuntimeError(_BANNED_MESSAGE)

    return kernel


_cpu_autocast_ops: list[str] | None = None


def _cpu_autocast_op_names() -> list[str]:
    """The aten ops (`name.overload`) with a CPU autocast kernel, read from the dispatcher."""
    global _cpu_autocast_ops
    if _cpu_autocast_ops is None:
        _cpu_autocast_ops = [
            n.removeprefix("aten::")
            for n in torch._C._dispatch_get_all_op_names()
            if n.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(n, _KEY)
        ]
    return _cpu_autocast_ops


def _install(cache: _CastCache) -> Any:
    """A `torch.library.Library` holding the CUDA policy's AutocastCPU kernels (as `Any`:
    torch.library is unannotated)."""
    lib: Any = cast(Any, torch.library.Library)("aten", "IMPL")
    try:
        with warnings.catch_warnings():
            # torch warns, once per process, that a kernel is overridden: that is the point.
            warnings.filterwarnings("ignore", message=r"(?s).*Overriding a previously registered kernel")
            done: set[str] = set()
            lists = (
                (_LOWER, LOWER_PRECISION_FP), (_FP32, FP32), (_SET_OPT_DTYPE, FP32_SET_OPT_DTYPE),
                (_PROMOTE, PROMOTE), (_BANNED, BANNED), (_RECURRENT, RECURRENT),
                (_LOWER, (_FUSED_RNN,)),
            )  # fmt: skip
            for category, names in lists:
                for name in names:
                    op = _overload(name)
                    if op is not None:  # an op this torch does not have is never called
                        lib.impl(name, _make_kernel(op, category, cache), _KEY)
                        done.add(name)
            for name, target in FP32_APPEND_DTYPE.items():
                op, target_op = _overload(name), _overload(target)
                if op is not None and target_op is not None:
                    lib.impl(name, _make_kernel(op, _APPEND_DTYPE, cache, target_op), _KEY)
                    done.add(name)
            # CPU casts ops CUDA does not (cat, stack, fft, linalg): not under CUDA's policy.
            for name in _cpu_autocast_op_names():
                if name.removesuffix(".default") not in done:
                    lib.impl(name, torch.library.fallthrough_kernel, _KEY)
    except BaseException:
        lib._destroy()
        raise
    return lib


_lock = threading.Lock()
_depth = 0
_library: Any = None  # the installed Library
_cache = _CastCache()


@contextlib.contextmanager
def autocast_policy(policy: AutocastPolicy | str, device_type: str = "cpu") -> Iterator[None]:
    """While active, `torch.autocast(device_type, ...)` casts by `policy`'s op lists.

    A no-op when `policy` is the device's own. Policy CUDA on a CPU device installs the
    override; it is removed when the outermost such context exits, whatever happened, and
    nested contexts share it (one registration, counted). Only CUDA's policy on the CPU is
    supported.

    >>> import torch
    >>> x = torch.randn(2, 4)
    >>> with autocast_policy("cuda"), torch.autocast("cpu", dtype=torch.float16):
    ...     torch.softmax(x.half(), -1).dtype
    torch.float32
    >>> with torch.autocast("cpu", dtype=torch.float16):
    ...     torch.softmax(x.half(), -1).dtype
    torch.float16
    """
    global _depth, _library
    policy = AutocastPolicy(policy)
    native = _NATIVE.get(device_type)
    if native is None or (policy != native and policy != AutocastPolicy.CUDA):
        raise PrecisionDoctorError(
            f"autocast policy {policy} on device type {device_type!r} is not supported "
            "(the device's own policy, or CUDA's on the CPU)"
        )
    if policy == native:
        with _lock:
            overridden = _depth > 0
        if overridden and device_type == "cpu":
            raise PrecisionDoctorError(
                "autocast policy cpu requested inside autocast_policy(cuda): the override is "
                "process-wide, the CPU's own lists cannot apply inside it"
            )
        yield
        return
    with _lock:
        if _depth == 0:
            _library = _install(_cache)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _cache.clear()
                if _library is not None:
                    _library._destroy()
                    _library = None
