"""The fp8 run for people: summary lines and next steps for the terminal, and the per-layer
table (one row per Float8Linear and cast role) the HTML report and the app can show."""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence

from precision_doctor.analysis.fp8 import BF16_FIX, fix_for, gemm_db
from precision_doctor.extras import Fp8Section
from precision_doctor.options import Flag, Fp8Recipe, percent
from precision_doctor.report import Report

__all__ = ["conventional_lines", "fp8_gemm_rows", "fp8_layer_rows", "fp8_next_steps", "fp8_summary_lines"]


def _db(x: float) -> str:
    return "exact" if math.isinf(x) and x > 0 else f"{x:.1f} dB"


def _fixes(report: Report, section: Fp8Section) -> dict[str, str]:
    """Per layer, the first recipe under which every one of its matmuls passes (or bf16)."""
    return {
        layer: fix_for([g for g in section.gemms if g.layer == layer], report.thresholds) for layer in section.layers
    }


def fp8_summary_lines(report: Report) -> list[str]:
    """The fp8 run in a few lines: recipe and torchao version, how many Linear layers take fp8
    as-is, and each failing layer's fix."""
    section = report.extras.fp8
    if section is None:
        return []
    how = "emulated" if section.emulated else "native"
    flagged = {f.unit for f in report.flags() if f.flag in (Flag.FP8_ERROR, Flag.FP8_UNDERFLOW)}
    ok = [layer for layer in section.layers if layer not in flagged]
    lines = [
        f"fp8: torchao {section.torchao_version}, recipe {section.recipe} ({how}): {len(ok)} of "
        f"{len(section.layers)} Linear layer(s) take fp8 as-is"
    ]
    fixes = _fixes(report, section)
    for layer in section.layers:
        if layer not in flagged:
            continue
        worst = min(
            (g for g in section.gemms if g.layer == layer),
            key=lambda g: gemm_db(g, section.recipe),
            default=None,
        )
        flushed = max((c.flushed_fraction for c in section.casts if c.layer == layer), default=0.0)
        detail = f"worst matmul {worst.gemm} {_db(gemm_db(worst, section.recipe))}" if worst is not None else ""
        fix = fixes[layer]
        to = "keep it in bf16" if fix == BF16_FIX else f"recipe {fix}"
        lines.append(f"  {layer}: {detail}, flushed up to {percent(flushed)} -> {to}")
    return lines + conventional_lines(report)


CONVENTIONAL = ("lm_head", "router", "gate", "output_layer")
"""Name parts of the layers kept in high precision by convention (ModelOpt's default
exclusions `*lm_head*`, `*router*`, `*mlp.gate*`, `*output_layer*`), besides the first and the
last layer (Megatron)."""


def conventional_lines(report: Report) -> list[str]:
    """Whether this model needs the conventional exclusions: each conventionally excluded
    layer (first, last, by name) with what the analysis found for it."""
    section = report.extras.fp8
    if section is None or not section.layers:
        return []
    flagged = {f.unit for f in report.flags() if f.flag in (Flag.FP8_ERROR, Flag.FP8_UNDERFLOW)}
    fixes = _fixes(report, section)
    picked: dict[str, str] = {section.layers[0]: "first", section.layers[-1]: "last"}
    for layer in section.layers:
        for part in CONVENTIONAL:
            if part in layer.split(".")[-1] or part in layer:
                picked.setdefault(layer, part)
    said = []
    for layer, why in picked.items():
        if layer not in flagged:
            verdict = f"takes fp8 under {section.recipe}"
        elif fixes[layer] == BF16_FIX:
            verdict = "needs bf16"
        else:
            verdict = f"needs the {fixes[layer]} recipe"
        said.append(f"{layer} ({why}): {verdict}")
    return ["conventionally kept in high precision: " + "; ".join(said)]


def fp8_next_steps(report: Report, command: Sequence[str]) -> list[str]:
    """What to run next after an fp8 analysis: the recipe that fixes every flagged layer, or
    which layers to leave out of fp8."""
    section = report.extras.fp8
    if section is None:
        return []
    flagged = {f.unit for f in report.flags() if f.flag in (Flag.FP8_ERROR, Flag.FP8_UNDERFLOW)}
    if not flagged:
        return [f"every Linear layer takes fp8 under {section.recipe} (no FP8_ERROR, no FP8_UNDERFLOW)"]
    fixes = {layer: fix for layer, fix in _fixes(report, section).items() if layer in flagged}
    lines = []
    keep = sorted(layer for layer, fix in fixes.items() if fix == BF16_FIX)
    if keep:
        lines.append(f"keep in bf16 (leave out of convert_to_float8_training's module_filter_fn): {', '.join(keep)}")
    recipes = [fix for fix in fixes.values() if fix not in (BF16_FIX, section.recipe)]
    if recipes:
        # `fix_for` tries the recipes in Fp8Recipe's order: the last one any layer needs fixes
        # the layers before it too (it passed none of the earlier ones).
        order = [r.value for r in Fp8Recipe]
        best = max(recipes, key=order.index)
        run = [*command, "--dtype", "fp8", "--fp8-recipe", best]
        lines.append(f"check the {best} recipe: {shlex.join(run)}")
    return lines


def fp8_layer_rows(section: Fp8Section) -> list[dict[str, object]]:
    """One row per cast: layer, GEMM, role, format, amax, scale, flushed fraction, saturated,
    SQNR, outlier ratio, zero groups (Transformer Engine's names where they exist)."""
    return [
        {
            "layer": c.layer,
            "gemm": c.gemm,
            "role": c.role,
            "format": c.fp8_dtype,
            "granularity": c.granularity,
            "cur_amax": c.amax,
            "scale_min": c.scale_min,
            "scale_max": c.scale_max,
            "underflows%": 100 * c.flushed_fraction,
            "saturated": c.saturated,
            "sqnr_db": c.sqnr_db,
            "sqnr_vs_bf16_db": c.sqnr_vs_bf16_db,
            "mse": c.mse,
            "outlier_ratio": c.outlier_ratio,
            "zero_groups": f"{c.zero_groups}/{c.groups}",
        }
        for c in section.casts
    ]


def fp8_gemm_rows(section: Fp8Section) -> list[dict[str, object]]:
    """One row per Float8Linear matmul: its judged SQNR (dB: the smaller of the whole output's
    and the median row's) under each recipe, the run's own recipe first."""
    recipes = [section.recipe, *(r.value for r in Fp8Recipe if r.value != section.recipe)]
    return [
        {"layer": g.layer, "gemm": g.gemm, **{r: round(gemm_db(g, r), 2) for r in recipes if r in g.sqnr_db}}
        for g in section.gemms
    ]
