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
    "Fp8Recorder",
    "convert_fp8",
    "fp8_config",
    "require_torchao",
    "torchao_version",
]

INSTALL_HINT = "pip install 'precision-doctor[fp8]' (or: pip install --no-deps torchao)"

GEMMS = ("fprop", "dgrad", "wgrad")
"""Transformer Engine's names of a Linear's three matmuls: the output, the input's gradient,
the weight's gradient."""

OUTLIER_QUANTILE = 0.999
"""`Fp8Cast.outlier_ratio` is amax over this quantile of |x|."""

_QUANTILE_SAMPLE = 1 << 20  # |x| sampled (evenly strided) above this many values for the quantile


def require_torchao() -> Any:
    """torchao's float8 package, or a one-line error saying what to install."""
    # Its import logs a warning per CUDA extension a CPU build cannot load, and torch one about
    # its enum registration: harmless, and nothing the user can act on.
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        import torchao.float8 as float8
    except ImportError as e:
        raise PrecisionDoctorError(
            f"--dtype fp8 runs torchao's float8 training, which is not installed: {INSTALL_HINT}"
        ) from e
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    return float8


def torchao_version() -> str:
    require_torchao()
    import torchao

    return str(getattr(torchao, "__version__", "unknown"))


def fp8_config(recipe: Fp8Recipe | str, *, emulate: bool) -> Any:
    """torchao's `Float8LinearConfig` for `recipe`, emulated (CPU) or not."""
    float8 = require_torchao()
    config = float8.Float8LinearConfig.from_recipe_name(Fp8Recipe(recipe).value)
    return dataclasses.replace(config, emulate=emulate)


def convert_fp8(model: torch.nn.Module, recipe: Fp8Recipe | str, *, emulate: bool | None = None) -> torch.nn.Module:
    """A deep copy of `model` with its Linear layers swapped for torchao's `Float8Linear`
    (`convert_to_float8_training` with torchao's default filter: every `nn.Linear`), emulated
    when the model is on the CPU (`emulate=None`)."""
    float8 = require_torchao()
    if emulate is None:
        emulate = next((p.device.type for p in model.parameters()), "cpu") != "cuda"
    converted = float8.convert_to_float8_training(copy.deepcopy(model), config=fp8_config(recipe, emulate=emulate))
    from torchao.float8.float8_linear import Float8Linear

    for m in converted.modules():
        if isinstance(m, Float8Linear):
            m.register_forward_pre_hook(autocast_input)
    return converted  # type: ignore[no-any-return]


def autocast_input(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """A Float8Linear's input cast to the CPU autocast's dtype, as `Float8Linear.forward` casts
    it to CUDA's (a forward pre-hook; nothing outside CPU autocast, or under CUDA's, which
    torchao handles itself)."""
    if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
        return None
    if not torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
        return None
    return (args[0].to(torch.get_autocast_dtype("cpu")), *args[1:])


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
    fmax = float(torch.finfo(bits.dtype).max)
    deq = dequantize(bits, scale)
    nonzero = x != 0
    err = deq - x
    amax_val = float(x.abs().max()) if x.numel() else 0.0
    q = _quantile_abs(x, OUTLIER_QUANTILE) if x.numel() else 0.0
    outlier = amax_val / q if q > 0 else (math.inf if amax_val > 0 else 1.0)
    # The scaling groups: the dims where the scale is broadcast (size 1) and x is not.
    if scale.numel() > 1:
        dims = [d for d in range(x.dim()) if scale.dim() == x.dim() and scale.shape[d] == 1 and x.shape[d] > 1]
        group_amax = x.abs().amax(dim=dims) if dims else x.abs()
        zero_groups, groups = int((group_amax == 0).sum()), int(group_amax.numel())
    else:
        zero_groups, groups = int(amax_val == 0), 1
    return Fp8Cast(
        layer=layer,
        gemm=gemm,
        role=role,
        fp8_dtype=_dtype_name(bits.dtype),
        hp_dtype=_dtype_name(hp.dtype),
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


class Fp8Recorder:
    """Records torchao's casts of a converted model's Float8Linear layers (`Fp8Cast`) and
    each layer's matmuls under every recipe (`Fp8Gemm`) while active (`recording`).

    Layers are named by their path in the converted model (the same as in the original: the
    conversion swaps modules in place)."""

    def __init__(self, model: torch.nn.Module, recipes: tuple[Fp8Recipe, ...] = tuple(Fp8Recipe)) -> None:
        float8 = require_torchao()
        from torchao.float8.float8_linear import Float8Linear

        self._float8 = float8
        self.layers: dict[str, Any] = {n: m for n, m in model.named_modules() if isinstance(m, Float8Linear)}
        self._by_config = {id(m.linear_mm_config): n for n, m in self.layers.items()}
        emulate = True
        for m in self.layers.values():
            emulate = bool(m.config.emulate)
            break
        self._configs = {r: fp8_config(r, emulate=emulate) for r in recipes}
        self.casts: list[Fp8Cast] = []
        self.gemms: list[Fp8Gemm] = []
        self._last_backward_role: dict[str, str] = {}
        self._inputs: dict[str, list[torch.Tensor]] = {}

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
        fl.hp_tensor_to_float8_dynamic = recorded
        try:
            yield
        finally:
            fl.hp_tensor_to_float8_dynamic = original
            for h in handles:
                h.remove()

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

    def _cast(self, t: torch.Tensor, config: Any, field_name: str, axis: int, role: str) -> torch.Tensor:
        """`t` through torchao's cast for one operand (dequantized), or as is where the recipe
        keeps it in high precision."""
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
        for recipe, config in self._configs.items():
            err = product(self._cast(a, config, fa, axa, ra), self._cast(b, config, fb, axb, rb)) - ref
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
        emulated = all(bool(m.config.emulate) for m in recorder.layers.values())
        return cls(converted, recorder, emulated)

    def recording(self) -> contextlib.AbstractContextManager[None]:
        return self.recorder.recording()
