"""fp8 training as torchao executes it: the model converted with `convert_to_float8_training`
(a copy: the user's model is not touched), and each of torchao's own casts recorded.

torchao is an optional dependency (`pip install precision-doctor[fp8]`), imported when an fp8
run is asked for (`require_torchao`). On the CPU its matmuls are emulated
(`Float8LinearConfig(emulate=True)`: the fp8 operands dequantized, an fp32 `mm`), the casts
and scales are its own.

`Fp8Recorder` wraps the one function `Float8Linear`'s matmul calls for every cast,
`torchao.float8.float8_linear.hp_tensor_to_float8_dynamic`, for the length of a run: each
call's high-precision input, torchao's scale and its fp8 bits give one `Fp8Cast`. Beside
them, per layer and per GEMM (fprop, dgrad, wgrad: Transformer Engine's names), it runs
torchao's cast of the same operands under each recipe (`Fp8Gemm`): the matmul's SQNR
against the unquantized one, the layer's *local* error (fed the low run's own values).

`Float8Linear.forward` casts its input to the autocast dtype only under CUDA's autocast
(`torch.is_autocast_enabled()`, `torch.get_autocast_gpu_dtype()`); under the CPU's autocast the
input would reach the casts in whatever dtype it arrives in (fp32 after a norm), and
`rowwise_with_gw_hp`'s high-precision weight-gradient matmul then fails on a bf16 x fp32 mix.
`convert_fp8` adds that one cast for the CPU (`autocast_input`, a forward pre-hook), so the
CPU run holds the dtypes a GPU run under `torch.autocast("cuda", torch.bfloat16)` holds.

The `mxfp8` recipe is torchao's `MXFP8Linear` (`torchao.prototype.moe_training.mxfp8_linear`
in torchao 0.18, where MX training moved; the `MXLinearConfig` of earlier releases is gone):
`convert_mx` swaps each `nn.Linear` whose two dimensions are multiples of 32 for one, its
weight and bias the same parameters, `kernel_preference` EMULATED on the CPU and the
`ScaleCalculationMode.RCEIL` scales of torchao's `mxfp8_rceil` recipe. Every one of its casts
goes through `mx_tensor.to_mx` (the module function: the dim0 casts and the emulated dim1
casts alike), which the recorder wraps. Two things keep the CPU from running it as it is:
torchao's emulated matmul (`_addmm_mx_dispatch`) dequantizes each operand to the dtype it was
cast from and calls `mm`, so a bf16 activation against an fp32 weight (autocast's mix) fails
with "expected m1 and m2 to have the same dtype"; and the GPU's `_scaled_mm` returns bf16
(`out_dtype=torch.bfloat16`) whatever went in. While recording, the emulated matmul is
replaced by the GPU kernel's arithmetic: the same fp8 operands and e8m0 scales dequantized to
fp32 (exact), an fp32 `mm`/`addmm` (fp32 accumulation), the result rounded to bf16.
`MXTensor.to_mx` needs the cast dimension to be a multiple of 32: the weight gradient's casts
run along the tokens, so a layer fed a number of rows that is not one is refused (one line).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.extras import Fp8Cast, Fp8Gemm
from precision_doctor.options import Fp8Recipe

__all__ = [
    "GEMMS",
    "MX_BLOCK",
    "Fp8Recorder",
    "convert_fp8",
    "convert_mx",
    "fp8_config",
    "fp8_layers",
    "mx_cast",
    "mx_gemm_as_gpu",
    "require_torchao",
    "torchao_version",
]

INSTALL_HINT = "pip install 'precision-doctor[fp8]' (or: pip install --no-deps torchao)"

GEMMS = ("fprop", "dgrad", "wgrad")
"""Transformer Engine's names of a Linear's three matmuls: the output, the input's gradient,
the weight's gradient."""

OUTLIER_QUANTILE = 0.999
"""`Fp8Cast.outlier_ratio` is amax over this quantile of |x|."""

MX_BLOCK = 32
"""Values per MX scaling block (torchao's `mxfp8` recipe: one e8m0 scale per 32)."""

_QUANTILE_SAMPLE = 1 << 20  # |x| sampled (evenly strided) above this many values for the quantile


@contextlib.contextmanager
def _quiet_torchao_import() -> Iterator[None]:
    """torchao's imports log a warning per CUDA extension a CPU build cannot load, and torch one
    per enum torchao registers with pytree (`ScaleCalculationMode`, from the MX modules):
    harmless, and nothing the user can act on."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def require_torchao() -> Any:
    """torchao's float8 package, or a one-line error saying what to install."""
    try:
        with _quiet_torchao_import():
            import torchao.float8 as float8
    except ImportError as e:
        raise PrecisionDoctorError(
            f"--dtype fp8 runs torchao's float8 training, which is not installed: {INSTALL_HINT}"
        ) from e
    return float8


def torchao_version() -> str:
    require_torchao()
    import torchao

    return str(getattr(torchao, "__version__", "unknown"))


def fp8_config(recipe: Fp8Recipe | str, *, emulate: bool) -> Any:
    """torchao's `Float8LinearConfig` for `recipe` (not `mxfp8`, which has none), emulated
    (CPU) or not."""
    float8 = require_torchao()
    config = float8.Float8LinearConfig.from_recipe_name(Fp8Recipe(recipe).value)
    return dataclasses.replace(config, emulate=emulate)


def _on_cpu(model: torch.nn.Module) -> bool:
    return next((p.device.type for p in model.parameters()), "cpu") != "cuda"


def convert_fp8(
    model: torch.nn.Module, recipe: Fp8Recipe | str, *, emulate: bool | None = None, inplace: bool = False
) -> torch.nn.Module:
    """A deep copy of `model` (`inplace`: `model` itself) with its Linear layers swapped for
    torchao's `Float8Linear` (`convert_to_float8_training` with torchao's default filter: every
    `nn.Linear`), emulated when the model is on the CPU (`emulate=None`); for `mxfp8`,
    `convert_mx`. The swapped layers hold the same parameter objects (an optimizer over them
    still holds them)."""
    float8 = require_torchao()
    if emulate is None:
        emulate = _on_cpu(model)
    if Fp8Recipe(recipe) is Fp8Recipe.MXFP8:
        return convert_mx(model, emulate=emulate, inplace=inplace)
    target = model if inplace else copy.deepcopy(model)
    converted = float8.convert_to_float8_training(target, config=fp8_config(recipe, emulate=emulate))
    from torchao.float8.float8_linear import Float8Linear

    for m in converted.modules():
        if isinstance(m, Float8Linear):
            m.register_forward_pre_hook(autocast_input)
    return converted  # type: ignore[no-any-return]


def _mx_modules() -> tuple[Any, Any, Any, Any]:
    """torchao 0.18's MX training pieces: the module `mx_tensor`, `MXFP8Linear`, `mx_mm`,
    `KernelPreference`; a one-line error where this torchao has none."""
    require_torchao()
    try:
        with _quiet_torchao_import():
            import torchao.prototype.mx_formats.mx_tensor as mx_tensor
            from torchao.prototype.moe_training.mxfp8_linear import MXFP8Linear, mx_mm
            from torchao.quantization.quantize_.common.kernel_preference import KernelPreference
    except ImportError as e:
        raise PrecisionDoctorError(
            f"--fp8-recipe mxfp8 runs torchao's MXFP8Linear (torchao.prototype.moe_training, torchao 0.18), "
            f"which this torchao lacks: {e}"
        ) from e
    return mx_tensor, MXFP8Linear, mx_mm, KernelPreference


def mx_convertible(module: torch.nn.Module) -> bool:
    """An `nn.Linear` whose input and output features are multiples of 32: `to_mx` casts the
    input along in_features (fprop) and the output gradient along out_features (dgrad)."""
    return (
        type(module) is torch.nn.Linear and module.in_features % MX_BLOCK == 0 and module.out_features % MX_BLOCK == 0
    )


def convert_mx(
    model: torch.nn.Module,
    *,
    emulate: bool | None = None,
    inplace: bool = False,
    only: frozenset[str] | None = None,
) -> torch.nn.Module:
    """A deep copy of `model` (`inplace`: `model` itself) with each `mx_convertible` Linear
    (`only`: of those, the ones at these paths: a plan's) swapped for torchao's `MXFP8Linear`
    (RCEIL scales, EMULATED kernels on the CPU), holding the same weight and bias parameters;
    the others stay as they are."""
    _, mxfp8_linear, _, kernel_preference = _mx_modules()  # first: its imports, quietly
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    if emulate is None:
        emulate = _on_cpu(model)
    if isinstance(model, torch.nn.Linear) and mx_convertible(model):
        raise PrecisionDoctorError("--fp8-recipe mxfp8 converts the Linear layers inside a model, not a bare nn.Linear")
    converted = model if inplace else copy.deepcopy(model)
    for name, module in list(converted.named_modules()):
        if not mx_convertible(module) or (only is not None and name not in only):
            continue
        assert isinstance(module, torch.nn.Linear)
        new = mxfp8_linear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device="meta",
            kernel_preference=kernel_preference.EMULATED if emulate else kernel_preference.AUTO,
            scale_calculation_mode=ScaleCalculationMode.RCEIL,
        )
        new.weight = module.weight
        new.bias = module.bias
        new.train(module.training)
        new.register_forward_pre_hook(_mx_rows_check(name))
        parent_name, _, child = name.rpartition(".")
        setattr(converted.get_submodule(parent_name) if parent_name else converted, child, new)
    return converted


def _mx_rows_check(name: str) -> Any:
    def check(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1]:
            rows = x.numel() // x.shape[-1]
            if rows % MX_BLOCK:
                raise PrecisionDoctorError(
                    f"--fp8-recipe mxfp8: {name!r} is fed {rows} rows (tokens), not a multiple of {MX_BLOCK}: "
                    "torchao's MX weight-gradient matmul casts along the tokens in blocks of 32"
                )

    return check


def mx_cast(t: torch.Tensor, *, to_mx: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`t` (its last dimension a multiple of 32) through torchao's mxfp8 cast (`to_mx`, e4m3,
    RCEIL): its e4m3 bits, the per-value multiplier torchao applied before the cast, and the
    dequantized values (bits times the block's e8m0 scale, as `MXTensor.dequantize`)."""
    mx_tensor = _mx_modules()[0]  # first: its imports, quietly
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    cast = to_mx if to_mx is not None else mx_tensor.to_mx
    exponent, bits = cast(t.contiguous(), torch.float8_e4m3fn, MX_BLOCK, ScaleCalculationMode.RCEIL)
    return bits, *_mx_scales(bits, exponent)


def _mx_scales(bits: torch.Tensor, exponent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per value: the multiplier torchao's RCEIL cast applied (`_to_mx_rceil`'s `rcp_fp32`:
    2^(127 - e), 1 where e = 0) and the dequantized value (bits * 2^(e - 127))."""
    e = exponent.view(torch.uint8).to(torch.float32).repeat_interleave(MX_BLOCK, dim=-1).reshape(bits.shape)
    rcp = torch.where(e == 0, torch.ones_like(e), torch.exp2(127 - e))
    return rcp, bits.float() * torch.exp2(e - 127)


def _gpu_mx_gemm(a: Any, b: Any, aten_op: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The emulated MX matmul with the GPU kernel's arithmetic (`_scaled_mm(..., out_dtype=
    torch.bfloat16)`): the operands' exact fp32 values, fp32 accumulation, a bf16 result."""
    a32, b32 = a.dequantize(torch.float32), b.dequantize(torch.float32)
    res = torch.mm(a32, b32) if bias is None else torch.addmm(bias.float(), a32, b32)
    return res.to(torch.bfloat16)


@contextlib.contextmanager
def mx_gemm_as_gpu() -> Iterator[None]:
    """While active, torchao's emulated MX matmul computes as the GPU kernel does
    (`_gpu_mx_gemm`): what a training run of an `mxfp8` model on the CPU needs (the
    recorder's `recording` does the same for an analysis)."""
    mx_tensor, _, _, kernel_preference = _mx_modules()
    dispatch = mx_tensor._addmm_mx_dispatch

    def gemm(a: Any, b: Any, aten_op: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
        emulated = kernel_preference.EMULATED
        if getattr(a, "kernel_preference", None) == emulated and getattr(b, "kernel_preference", None) == emulated:
            return _gpu_mx_gemm(a, b, aten_op, bias)
        return dispatch(a, b, aten_op, bias)  # type: ignore[no-any-return]

    mx_tensor._addmm_mx_dispatch = gemm
    try:
        yield
    finally:
        mx_tensor._addmm_mx_dispatch = dispatch


def fp8_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The layers of a converted model that run fp8 (torchao's Float8Linear or MXFP8Linear),
    by path."""
    return {n: m for n, m in model.named_modules() if type(m).__name__ in ("Float8Linear", "MXFP8Linear")}


def autocast_input(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """A Float8Linear's input cast to the CPU autocast's dtype, as `Float8Linear.forward` casts
    it to CUDA's (a forward pre-hook; nothing outside CPU autocast, or under CUDA's, which
    torchao handles itself)."""
    if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
        return None
    if not torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
        return None
    return (args[0].to(torch.get_autocast_dtype("cpu")), *args[1:])


# A plan's override of a unit entered from an fp32 caller applies it again inside the autocast
# region it enters (`emulation._autocast_cast_hooks`): a pre-hook runs before that region.
autocast_input.casts_to_autocast_dtype = True  # type: ignore[attr-defined]


def _role_name(role: Any) -> str:
    name = str(getattr(role, "name", role)).lower()
    return name


def _dtype_name(dtype: torch.dtype) -> str:
    return {
        torch.float8_e4m3fn: "e4m3",
        torch.float8_e5m2: "e5m2",
        torch.float32: "fp32",
        torch.bfloat16: "bf16",
        torch.float16: "fp16",
    }.get(dtype, str(dtype).removeprefix("torch."))


def _sqnr(ref: torch.Tensor, err: torch.Tensor) -> float:
    num = float(torch.linalg.vector_norm(ref.double()))
    den = float(torch.linalg.vector_norm(err.double()))
    if den == 0:
        return math.inf
    if num == 0:
        return -math.inf
    return 20 * math.log10(num / den)


def _rel(ref: torch.Tensor, err: torch.Tensor) -> float:
    num = float(torch.linalg.vector_norm(ref.double()))
    den = float(torch.linalg.vector_norm(err.double()))
    if den == 0:
        return 0.0
    return den / num if num else math.inf


def _median_row_sqnr(ref: torch.Tensor, err: torch.Tensor) -> float:
    num = torch.linalg.vector_norm(ref.double(), dim=-1)
    den = torch.linalg.vector_norm(err.double(), dim=-1)
    keep = num > 0
    if not bool(keep.any()):
        return math.inf
    db = 20 * torch.log10(num[keep] / den[keep])  # inf where a row is exact
    return float(db.median())


def _quantile_abs(x: torch.Tensor, q: float) -> float:
    a = x.abs().reshape(-1)
    if a.numel() > _QUANTILE_SAMPLE:
        a = a[:: a.numel() // _QUANTILE_SAMPLE + 1]
    k = max(1, min(a.numel(), math.ceil(q * a.numel())))
    return float(torch.kthvalue(a, k).values)


def dequantize(bits: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 bits back to fp32, as torchao's emulated matmul reads them (bits / scale)."""
    return bits.float() / scale.float()


def cast_record(layer: str, gemm: str, role: str, hp: torch.Tensor, fp8: Any, granularity: str) -> Fp8Cast:
    """The statistics of one torchao cast: `hp` the value cast, `fp8` torchao's
    `Float8TrainingTensor` (its `_data` bits and `_scale`)."""
    bits: torch.Tensor = fp8._data
    scale: torch.Tensor = fp8._scale.float()
    x = hp.detach().float()
    # The scaling groups: the dims where the scale is broadcast (size 1) and x is not.
    if scale.numel() > 1:
        dims = [d for d in range(x.dim()) if scale.dim() == x.dim() and scale.shape[d] == 1 and x.shape[d] > 1]
        group_amax = x.abs().amax(dim=dims) if dims else x.abs()
    else:
        group_amax = x.abs().amax().reshape(1) if x.numel() else torch.zeros(1)
    return _record(layer, gemm, role, hp.dtype, x, bits, scale, dequantize(bits, scale), granularity, group_amax)


def mx_cast_record(
    layer: str, gemm: str, role: str, hp: torch.Tensor, exponent: torch.Tensor, bits: torch.Tensor
) -> Fp8Cast:
    """The statistics of one of torchao's mxfp8 casts (`to_mx`): `hp` the value cast (its last
    dimension in blocks of 32), `exponent` the blocks' biased e8m0 scales, `bits` the e4m3
    values. `scale_min`/`scale_max` are the multipliers applied before the cast (2^-e)."""
    x = hp.detach().float()
    rcp, deq = _mx_scales(bits, exponent)
    group_amax = x.reshape(*x.shape[:-1], x.shape[-1] // MX_BLOCK, MX_BLOCK).abs().amax(dim=-1)
    return _record(layer, gemm, role, hp.dtype, x, bits, rcp, deq, f"block{MX_BLOCK}", group_amax)


def _record(
    layer: str,
    gemm: str,
    role: str,
    hp_dtype: torch.dtype,
    x: torch.Tensor,
    bits: torch.Tensor,
    scale: torch.Tensor,
    deq: torch.Tensor,
    granularity: str,
    group_amax: torch.Tensor,
) -> Fp8Cast:
    fmax = float(torch.finfo(bits.dtype).max)
    nonzero = x != 0
    err = deq - x
    amax_val = float(x.abs().max()) if x.numel() else 0.0
    q = _quantile_abs(x, OUTLIER_QUANTILE) if x.numel() else 0.0
    outlier = amax_val / q if q > 0 else (math.inf if amax_val > 0 else 1.0)
    zero_groups, groups = int((group_amax == 0).sum()), int(group_amax.numel())
    return Fp8Cast(
        layer=layer,
        gemm=gemm,
        role=role,
        fp8_dtype=_dtype_name(bits.dtype),
        hp_dtype=_dtype_name(hp_dtype),
        granularity=granularity,
        numel=x.numel(),
        nonzero=int(nonzero.sum()),
        amax=amax_val,
        scale_min=float(scale.min()),
        scale_max=float(scale.max()),
        flushed=int((nonzero & (bits.float() == 0)).sum()),
        saturated=int(((x * scale).abs() > fmax).sum()),
        zero_groups=zero_groups,
        groups=groups,
        sqnr_db=_sqnr(x, err),
        sqnr_vs_bf16_db=_sqnr(x.to(torch.bfloat16).float(), deq - x.to(torch.bfloat16).float()),
        rel_error=_rel(x, err),
        mse=float(err.double().pow(2).mean()) if x.numel() else 0.0,
        outlier_ratio=outlier,
    )


# Per GEMM: (config field, axiswise dim, role) of its two operands, as torchao's
# `matmul_with_hp_or_float8_args` casts them (a: input/grad_output, b: weight_t/input).
_OPERANDS = {
    "fprop": (("cast_config_input", -1, "INPUT"), ("cast_config_weight", 0, "WEIGHT")),
    "dgrad": (("cast_config_grad_output", -1, "GRAD_OUTPUT"), ("cast_config_weight_for_grad_input", -1, "WEIGHT")),
    "wgrad": (
        ("cast_config_grad_output_for_grad_weight", 0, "GRAD_OUTPUT"),
        ("cast_config_input_for_grad_weight", 0, "INPUT"),
    ),
}


def _emulated(layer: Any) -> bool:
    """Whether a converted layer runs torchao's emulated kernels: a `Float8Linear` by its
    config, an `MXFP8Linear` by its kernel preference."""
    emulate = getattr(getattr(layer, "config", None), "emulate", None)
    return bool(emulate) if emulate is not None else layer.kernel_preference.name == "EMULATED"


class Fp8Recorder:
    """Records torchao's casts of a converted model's Float8Linear layers (`Fp8Cast`) and
    each layer's matmuls under every recipe (`Fp8Gemm`) while active (`recording`).

    Layers are named by their path in the converted model (the same as in the original: the
    conversion swaps modules in place)."""

    def __init__(self, model: torch.nn.Module, recipes: tuple[Fp8Recipe, ...] = tuple(Fp8Recipe)) -> None:
        float8 = require_torchao()
        from torchao.float8.float8_linear import Float8Linear

        self._float8 = float8
        # torchao's MX training modules, where an MX layer is there or mxfp8 is compared; the
        # MX cast the recording patches out while it runs (`_mx_patched`).
        self._mx: tuple[Any, ...] | None = None
        self._to_mx: Any = None
        mx_types: tuple[type, ...] = ()
        if any(type(m).__name__ == "MXFP8Linear" for m in model.modules()):
            self._mx = _mx_modules()
            mx_types = (self._mx[1],)
        elif Fp8Recipe.MXFP8 in recipes:
            try:
                self._mx = _mx_modules()
            except PrecisionDoctorError:  # a torchao without MX training: compare the others
                recipes = tuple(r for r in recipes if r is not Fp8Recipe.MXFP8)
        self.layers: dict[str, Any] = {
            n: m for n, m in model.named_modules() if isinstance(m, (Float8Linear, *mx_types))
        }
        self._by_config = {id(m.linear_mm_config): n for n, m in self.layers.items() if isinstance(m, Float8Linear)}
        emulate = next((_emulated(m) for m in self.layers.values()), True)
        self._configs: dict[Fp8Recipe, Any] = {
            r: fp8_config(r, emulate=emulate) for r in recipes if r is not Fp8Recipe.MXFP8
        }
        self._recipes = recipes
        self.casts: list[Fp8Cast] = []
        self.gemms: list[Fp8Gemm] = []
        self._last_backward_role: dict[str, str] = {}
        self._inputs: dict[str, list[torch.Tensor]] = {}
        # mxfp8: the layer whose forward is running, and the (gemm, role) of the casts to come
        # inside one `mx_mm` forward or backward, in the order torchao 0.18 makes them.
        self._mx_layer: str | None = None
        self._mx_slots: list[tuple[str, str, str]] = []

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        import torchao.float8.float8_linear as fl

        original = fl.hp_tensor_to_float8_dynamic
        recorder = self

        def recorded(
            hp_tensor: torch.Tensor, float8_dtype: torch.dtype, linear_mm_config: Any, *args: Any, **kwargs: Any
        ) -> Any:
            out = original(hp_tensor, float8_dtype, linear_mm_config, *args, **kwargs)
            recorder._record(hp_tensor, out, linear_mm_config, kwargs)
            return out

        handles = []
        for name, m in self.layers.items():
            handles.append(m.register_forward_hook(self._forward_hook(name)))
            if not isinstance(m, fl.Float8Linear):
                handles.append(m.register_forward_pre_hook(self._mx_enter(name)))
        fl.hp_tensor_to_float8_dynamic = recorded
        try:
            with self._mx_patched() if self._mx is not None else contextlib.nullcontext():
                yield
        finally:
            fl.hp_tensor_to_float8_dynamic = original
            for h in handles:
                h.remove()

    def _mx_enter(self, name: str) -> Any:
        def pre(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            self._mx_layer = name

        return pre

    @contextlib.contextmanager
    def _mx_patched(self) -> Iterator[None]:
        """torchao's MX pieces wrapped for the run: `to_mx` records each cast, `mx_mm` says
        which layer and matmuls its casts feed, the emulated matmul computes as the GPU's."""
        assert self._mx is not None
        mx_tensor, _, mx_mm, _ = self._mx
        to_mx = mx_tensor.to_mx
        forward, backward = mx_mm.forward, mx_mm.backward
        recorder = self

        def recorded_to_mx(data_hp: torch.Tensor, elem_dtype: Any, *args: Any, **kwargs: Any) -> Any:
            exponent, bits = to_mx(data_hp, elem_dtype, *args, **kwargs)
            if recorder._mx_slots and isinstance(bits, torch.Tensor) and bits.dtype == torch.float8_e4m3fn:
                layer, gemm, role = recorder._mx_slots.pop(0)
                with recorder._quiet():
                    recorder.casts.append(mx_cast_record(layer, gemm, role, data_hp, exponent, bits))
            return exponent, bits

        def mm_forward(ctx: Any, input_hp: torch.Tensor, weight_hp: torch.Tensor, *args: Any) -> Any:
            layer = recorder._mx_layer or "?"
            ctx.precision_doctor_layer = layer
            recorder._mx_slots = [(layer, "fprop", "input"), (layer, "fprop", "weight")]
            try:
                return forward(ctx, input_hp, weight_hp, *args)
            finally:
                recorder._mx_slots = []

        def mm_backward(ctx: Any, grad_output: torch.Tensor) -> Any:
            layer = getattr(ctx, "precision_doctor_layer", "?")
            slots = [(layer, "dgrad", "grad_output"), (layer, "dgrad", "weight")]
            if not ctx.wgrad_with_hp:
                slots += [(layer, "wgrad", "grad_output"), (layer, "wgrad", "input")]
            recorder._mx_slots = slots
            try:
                return backward(ctx, grad_output)
            finally:
                recorder._mx_slots = []

        mx_tensor.to_mx = recorded_to_mx
        mx_mm.forward, mx_mm.backward = staticmethod(mm_forward), staticmethod(mm_backward)
        self._to_mx = to_mx
        try:
            with mx_gemm_as_gpu():
                yield
        finally:
            mx_tensor.to_mx = to_mx
            mx_mm.forward, mx_mm.backward = staticmethod(forward), staticmethod(backward)

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        """The recorder's own work: no op of the run (no dispatch mode, no autocast, no graph)."""
        with _disable_current_modes(), torch.no_grad(), contextlib.ExitStack() as stack:
            for device in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device):
                    stack.enter_context(torch.autocast(device, enabled=False))
            yield

    def _record(self, hp: torch.Tensor, out: Any, linear_mm_config: Any, kwargs: dict[str, Any]) -> None:
        layer = self._by_config.get(id(linear_mm_config))
        if layer is None:
            return
        role = _role_name(kwargs.get("gemm_input_role", "input"))
        backward = torch._C._current_graph_task_id() != -1
        if not backward:
            gemm = "fprop"
        elif role == "weight":
            gemm = "dgrad"
        elif role == "input":
            gemm = "wgrad"
        else:  # grad_output feeds dgrad first, then wgrad (`matmul_with_hp_or_float8_args.backward`)
            config = self.layers[layer].config
            disabled = self._float8.config.ScalingType.DISABLED
            if config.cast_config_grad_output.scaling_type is disabled:
                gemm = "wgrad"
            elif config.cast_config_grad_output_for_grad_weight.scaling_type is disabled:
                gemm = "dgrad"
            else:
                gemm = "wgrad" if self._last_backward_role.get(layer) == "weight" else "dgrad"
        if backward:
            self._last_backward_role[layer] = role
        granularity = _role_name(kwargs.get("scaling_granularity", "tensorwise"))
        with self._quiet():
            self.casts.append(cast_record(layer, gemm, role, hp, out, granularity))

    def _forward_hook(self, name: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
                return
            with self._quiet():
                x2 = x.detach().reshape(-1, x.shape[-1]).float()
                weight: torch.Tensor = getattr(module, "weight")  # noqa: B009  # typed: a Module attribute is Tensor | Module
                w_t = weight.detach().float().t()
                self.gemms.append(self._gemm(name, "fprop", x2, w_t))
            if output.requires_grad:

                def on_grad(grad: torch.Tensor) -> None:
                    with self._quiet():
                        g = grad.detach().reshape(-1, grad.shape[-1]).float()
                        self.gemms.append(self._gemm(name, "dgrad", g, w_t))
                        self.gemms.append(self._gemm(name, "wgrad", g, x2))

                output.register_hook(on_grad)  # type: ignore[no-untyped-call]  # unannotated in torch

        return hook

    def _cast(self, t: torch.Tensor, config: Any, field_name: str, axis: int, role: str) -> torch.Tensor | None:
        """`t` through torchao's cast for one operand (dequantized), or as is where the recipe
        keeps it in high precision; `config` None: the mxfp8 cast (None where `t` is not in
        whole blocks of 32 along `axis`)."""
        if config is None:  # mxfp8: blocks of 32 along `axis`; torchao's cast needs whole blocks
            x = t if axis == -1 else t.t()
            if x.shape[-1] % MX_BLOCK:
                return None
            deq = mx_cast(x, to_mx=self._to_mx)[2]
            return deq if axis == -1 else deq.t()
        float8 = self._float8
        from torchao.float8.float8_scaling_utils import get_maybe_axiswise_dim, hp_tensor_to_float8_dynamic
        from torchao.float8.float8_training_tensor import GemmInputRole, LinearMMConfig

        cc = getattr(config, field_name)
        if cc.scaling_type is float8.config.ScalingType.DISABLED:
            return t
        fp8 = hp_tensor_to_float8_dynamic(
            t,
            cc.target_dtype,
            LinearMMConfig(),
            gemm_input_role=getattr(GemmInputRole, role),
            scaling_granularity=cc.scaling_granularity,
            axiswise_dim=get_maybe_axiswise_dim(axis, cc.scaling_granularity),
            round_scales_to_power_of_2=config.round_scales_to_power_of_2,
        )
        return dequantize(fp8._data, fp8._scale)

    def _gemm(self, layer: str, gemm: str, a: torch.Tensor, b: torch.Tensor) -> Fp8Gemm:
        def product(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if gemm == "fprop":
                return x @ y
            if gemm == "dgrad":
                return x @ y.t()
            return x.t() @ y

        ref = product(a, b)
        sqnr_db: dict[str, float] = {}
        rel_error: dict[str, float] = {}
        row_sqnr_db: dict[str, float] = {}
        (fa, axa, ra), (fb, axb, rb) = _OPERANDS[gemm]
        for recipe in self._recipes:
            config = self._configs.get(recipe)
            ca, cb = self._cast(a, config, fa, axa, ra), self._cast(b, config, fb, axb, rb)
            if ca is None or cb is None:
                continue  # no mxfp8 for a matmul not in whole blocks: left out (not judged as passing)
            err = product(ca, cb) - ref
            sqnr_db[recipe.value] = _sqnr(ref, err)
            rel_error[recipe.value] = _rel(ref, err)
            row_sqnr_db[recipe.value] = _median_row_sqnr(ref, err)
        return Fp8Gemm(layer=layer, gemm=gemm, sqnr_db=sqnr_db, row_sqnr_db=row_sqnr_db, rel_error=rel_error)


@dataclass
class Fp8Run:
    """A torchao-converted copy of a model (`convert_fp8`) and the recorder of its casts."""

    model: torch.nn.Module
    recorder: Fp8Recorder
    emulated: bool

    @classmethod
    def start(cls, model: torch.nn.Module, recipe: Fp8Recipe | str) -> Fp8Run:
        converted = convert_fp8(model, recipe)
        recorder = Fp8Recorder(converted)
        emulated = all(_emulated(m) for m in recorder.layers.values())
        return cls(converted, recorder, emulated)

    def recording(self) -> contextlib.AbstractContextManager[None]:
        return self.recorder.recording()
