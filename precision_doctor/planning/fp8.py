"""The fp8 side of the plan: which Linear layers may run in float8 under which torchao recipe,
what each choice costs and risks, and the planned model as torchao converts it.

A Linear unit of an fp8 report (`analyze --dtype fp8`) gets, beside fp32 and bf16, one choice
per recipe (`fp8:<recipe>`) unless:
- torchao could not run it: not an `nn.Linear`, or a weight dimension not divisible by 16
  (the fp8 matmul's hardware requirement that torchao's `_auto_filter_for_recipe` checks; its
  size cut-offs are H100 speed heuristics, which the cost model replaces);
- `mxfp8` only: the target has no MX tensor cores (`DeviceProfile.mx_fp8`: Blackwell has them,
  Hopper does not), or the layer is not in whole blocks of 32 - torchao's `MXTensor.to_mx`
  (and its GPU cast kernels) need the cast dimension divisible by 32, which is in_features
  (fprop), out_features (dgrad) and the rows fed to the layer (wgrad's casts run along the
  tokens): the weight's two dimensions checked here, the rows by the analysis, which measured
  no mxfp8 matmul where they are not (`capture.fp8.Fp8Recorder._gemm`);
- the recipe fails the layer: one of its matmuls (fprop, dgrad, wgrad: the report's
  `Fp8Gemm`, each recipe's error measured on the analysis run's operands) is below the SQNR
  that torchao's own tests hold a Float8Linear to (the FP8_ERROR threshold,
  `Thresholds.fp8_output_sqnr_db` / `fp8_wgrad_sqnr_db`). One forward's loss error cannot see
  a bad weight gradient, which only shows over training steps; the matmul SQNR can.

Error contributions (budgeted as the bf16 plan's are): an fp8 choice's is its fprop matmul's
relative error under that recipe; a Linear's bf16 choice's the relative error of a matmul of
bf16-rounded operands (derived below, data-independent: bf16 needs no scale); other units' their
local error. All are scaled together so that the analysed configuration (every converted Linear
under the report's recipe, the rest bf16) accounts for the measured final-loss error.

`convert_planned` is the planned model as a user's torchao run holds it: a copy converted by
`convert_to_float8_training`, once per Float8Linear recipe, each call's `module_filter_fn`
selecting that recipe's layers (torchao takes one config per call); the `mxfp8` layers swapped
for torchao's `MXFP8Linear` as the analysis swaps them (`capture.fp8.convert_mx`, filtered to
the plan's layers).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from precision_doctor.analysis.flags import own_error_finding
from precision_doctor.analysis.fp8 import gemm_db, sqnr_limit_db
from precision_doctor.capture.fp8 import (
    MX_BLOCK,
    autocast_input,
    convert_mx,
    fp8_config,
    mx_convertible,
    require_torchao,
)
from precision_doctor.extras import Fp8Gemm
from precision_doctor.options import Fp8Recipe, fp8_recipe_of
from precision_doctor.planning.cost import MX_NEEDS, DeviceProfile
from precision_doctor.report import Report

__all__ = [
    "BF16_MATMUL_REL_ERROR",
    "FP8_DIM_MULTIPLE",
    "Fp8Layer",
    "convert_planned",
    "fp8_error",
    "fp8_layers",
    "planned_recipes",
]

FP8_DIM_MULTIPLE = 16
"""torchao (`_auto_filter_for_recipe`): "All dims must be divisible by 16 due to float8
hardware requirements" (cuBLASLt's fp8 matmul)."""

_BF16_EPS = torch.finfo(torch.bfloat16).eps
BF16_MATMUL_REL_ERROR = math.sqrt(2) * _BF16_EPS / (2 * math.sqrt(3)) * math.sqrt(3 / (8 * math.log(2)))
"""Relative L2 error of a matmul whose two operands are rounded to bf16 (autocast), against
the same matmul unrounded: round-to-nearest leaves an error uniform over +-half an ulp, whose
relative RMS over a log-uniform significand in [1, 2) is eps / (2 sqrt 3) * sqrt(E[1/m^2]),
E[1/m^2] = 3 / (8 ln 2); two independent operands add in quadrature. ~2.3e-3 (a 256^3
random matmul measures 2.34e-3)."""


@dataclass(frozen=True)
class Fp8Layer:
    """One Linear unit of an fp8 report, as the plan may run it."""

    name: str
    in_features: int
    out_features: int
    allowed: tuple[Fp8Recipe, ...]
    """The recipes the plan may choose for it (fastest first)."""
    refused: dict[Fp8Recipe, str]
    """Recipe -> why the plan may not (a shape torchao cannot run, a matmul below its SQNR)."""


def _shape_reason(module: torch.nn.Module) -> str | None:
    if not isinstance(module, torch.nn.Linear):
        return f"{type(module).__name__} is not an nn.Linear: torchao converts nn.Linear only"
    out_f, in_f = module.weight.shape
    if out_f % FP8_DIM_MULTIPLE or in_f % FP8_DIM_MULTIPLE:
        return (
            f"its weight is {out_f}x{in_f}: torchao's fp8 matmul needs both dimensions divisible by "
            f"{FP8_DIM_MULTIPLE} (a hardware requirement of the fp8 tensor cores)"
        )
    return None


def _mx_reason(module: torch.nn.Module, profile: DeviceProfile | None) -> str | None:
    if profile is None or not profile.mx_fp8:
        where = f" ({profile.name} has none)" if profile is not None else ""
        return MX_NEEDS + where
    if type(module) is not torch.nn.Linear:  # what the MX conversion swaps (`mx_convertible`)
        return f"{type(module).__name__} is not a plain nn.Linear: the MX conversion swaps nn.Linear only"
    if not mx_convertible(module):
        out_f, in_f = module.weight.shape
        return (
            f"its weight is {out_f}x{in_f}: torchao's MXFP8Linear casts in blocks of {MX_BLOCK} along both "
            "dimensions (MXTensor.to_mx)"
        )
    return None


def _gate(gemms: list[Fp8Gemm], recipe: Fp8Recipe, report: Report) -> str | None:
    th = report.thresholds
    for g in gemms:
        if recipe.value not in g.sqnr_db:
            # The analysis measures every recipe on every matmul it can cast: only mxfp8's
            # blocks can be missing, where the tokens are not in whole blocks of 32.
            return (
                f"its {g.gemm} matmul has no {recipe} measurement: its operands are not in whole blocks of "
                f"{MX_BLOCK} (the weight gradient's MX casts run along the tokens)"
            )
        db, limit = gemm_db(g, recipe.value), sqnr_limit_db(g.gemm, th)
        if db < limit:
            return f"its {g.gemm} matmul under {recipe} has SQNR {db:.1f} dB < {limit:g} dB (FP8_ERROR)"
    return None


def fp8_layers(model: torch.nn.Module, report: Report, profile: DeviceProfile | None = None) -> dict[str, Fp8Layer]:
    """The Linear units of `report` (an fp8 analysis of `model`) with their allowed recipes on
    the device `profile` (None: one without MX tensor cores); empty for a report without an
    fp8 section."""
    section = report.extras.fp8
    if section is None:
        return {}
    modules = dict(model.named_modules())
    units = report.by_module()
    analysed = Fp8Recipe(section.recipe)
    out: dict[str, Fp8Layer] = {}
    for name in section.layers:
        module = modules.get(name)
        if module is None or name not in units:
            continue
        weight = getattr(module, "weight", None)
        out_f, in_f = (int(weight.shape[0]), int(weight.shape[1])) if isinstance(weight, torch.Tensor) else (0, 0)
        shape = _shape_reason(module)
        gemms = [g for g in section.gemms if g.layer == name]
        refused: dict[Fp8Recipe, str] = {}
        for recipe in Fp8Recipe:
            mx = _mx_reason(module, profile) if recipe is Fp8Recipe.MXFP8 else None
            own = own_error_finding(units[name]) if recipe is analysed else None
            # An error finding on the layer's own error was measured under the analysed recipe
            # alone (the pre-flight counts it against a plan running the layer so).
            why = (
                shape
                or mx
                or _gate(gemms, recipe, report)
                or (f"{own.flag} (error) under {recipe}: {own.evidence.message}" if own else None)
            )
            if why is not None:
                refused[recipe] = why
        allowed = tuple(r for r in Fp8Recipe if r not in refused)
        out[name] = Fp8Layer(name, in_f, out_f, allowed, refused)
    return out


def fp8_error(report: Report, layer: str, recipe: Fp8Recipe) -> float:
    """The relative error of `layer`'s forward matmul under `recipe` (the worst of its calls)."""
    section = report.extras.fp8
    errors = [
        g.rel_error.get(recipe.value, 0.0)
        for g in (section.gemms if section is not None else [])
        if g.layer == layer and g.gemm == "fprop"
    ]
    finite = [e for e in errors if math.isfinite(e)]
    return max(finite, default=0.0)


def planned_recipes(units: Mapping[str, str]) -> dict[Fp8Recipe, list[str]]:
    """Recipe -> the plan's layers converted under it (in the plan's order)."""
    out: dict[Fp8Recipe, list[str]] = {}
    for unit, dtype in units.items():
        recipe = fp8_recipe_of(dtype)
        if recipe is not None:
            out.setdefault(recipe, []).append(unit)
    return out


def convert_planned(
    model: torch.nn.Module, units: Mapping[str, str], *, emulate: bool | None = None, copy_model: bool = True
) -> torch.nn.Module:
    """`model` (a deep copy unless `copy_model=False`) with the plan's fp8 layers swapped for
    torchao's Float8Linear: `convert_to_float8_training` once per recipe, its module_filter_fn
    selecting that recipe's layers; emulated off CUDA (`emulate=None`). Each converted layer
    casts its input to the CPU autocast's dtype as torchao does under CUDA's
    (`capture.fp8.autocast_input`). The `mxfp8` layers become torchao's `MXFP8Linear` through
    the analysis' own conversion (`capture.fp8.convert_mx`, filtered to them); on the CPU run
    them inside `capture.fp8.mx_gemm_as_gpu` (torchao's emulated MX matmul cannot take
    autocast's bf16 x fp32 mix). The converted layers hold the model's parameter objects."""
    float8 = require_torchao()
    from torchao.float8.float8_linear import Float8Linear

    if emulate is None:
        emulate = next((p.device.type for p in model.parameters()), "cpu") != "cuda"
    converted = copy.deepcopy(model) if copy_model else model
    for recipe, layers in planned_recipes(units).items():
        chosen = frozenset(layers)
        if recipe is Fp8Recipe.MXFP8:
            converted = convert_mx(converted, emulate=emulate, inplace=True, only=chosen)
            continue

        def keep(module: torch.nn.Module, fqn: str, chosen: frozenset[str] = chosen) -> bool:
            return fqn in chosen and not isinstance(module, Float8Linear)

        converted = float8.convert_to_float8_training(
            converted, config=fp8_config(recipe, emulate=emulate), module_filter_fn=keep
        )
    for name, m in converted.named_modules():
        if isinstance(m, Float8Linear) and fp8_recipe_of(units.get(name, "")) is not None:
            m.register_forward_pre_hook(autocast_input)
    return converted
