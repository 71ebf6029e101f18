"""The fp8 run for people: summary lines and next steps for the terminal, the per-layer
tables (one row per cast; one per layer and role) and figure (amax, scale, flushed fraction
per role) the HTML report and the app show, and the recipe comparison (`--fp8-recipe all`)
side by side. Nothing here reruns the analysis."""

from __future__ import annotations

import html
import math
import shlex
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from precision_doctor.analysis.fp8 import BF16_FIX, FP8_FLAGS, gemm_db, layer_fixes
from precision_doctor.extras import Fp8RecipeComparison, Fp8ScalingModel, Fp8Section
from precision_doctor.options import Fp8Recipe, percent
from precision_doctor.report import Report
from precision_doctor.views.figures import short_name, themed

if TYPE_CHECKING:
    import plotly.graph_objects as go

__all__ = [
    "conventional_lines",
    "fp8_exclusion_rows",
    "fp8_figure",
    "fp8_gemm_rows",
    "fp8_layer_rows",
    "fp8_next_steps",
    "fp8_recipe_layer_rows",
    "fp8_recipe_lines",
    "fp8_recipe_loss_rows",
    "fp8_role_rows",
    "fp8_scaling_rows",
    "fp8_summary_lines",
]

ROLES = ("input", "weight", "grad_output")


def _db(x: float) -> str:
    return "exact" if math.isinf(x) and x > 0 else f"{x:.1f} dB"


def fp8_summary_lines(report: Report) -> list[str]:
    """The fp8 run in a few lines: recipe and torchao version, how many Linear layers take fp8
    as-is, and each failing layer's fix."""
    section = report.extras.fp8
    if section is None:
        return []
    how = "emulated" if section.emulated else "native"
    flagged = {f.unit for f in report.flags() if f.flag in FP8_FLAGS}
    ok = [layer for layer in section.layers if layer not in flagged]
    lines = [
        f"fp8: torchao {section.torchao_version}, recipe {section.recipe} ({how}): {len(ok)} of "
        f"{len(section.layers)} Linear layer(s) take fp8 as-is"
    ]
    fixes = layer_fixes(section, report.thresholds)
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
        if fix == BF16_FIX:
            to = "keep it in bf16"
        elif fix == section.recipe:
            # Flushed values the matmuls' SQNR does not miss: a warning, not a change of recipe.
            to = f"its matmuls pass under {fix}"
        else:
            to = f"recipe {fix}"
        lines.append(f"  {layer}: {detail}, flushed up to {percent(flushed)} -> {to}")
    return lines + conventional_lines(report)


def conventional_lines(report: Report) -> list[str]:
    """Whether this model needs the conventional exclusions (`extras.fp8.exclusions`): each
    conventionally excluded layer (first, last, by name) with what the analysis found for it,
    then the ones this model needs."""
    section = report.extras.fp8
    if section is None or not section.exclusions:
        return []
    said = []
    for e in section.exclusions:
        if not e.flagged:
            verdict = f"takes fp8 under {section.recipe}"
        elif e.needed:
            verdict = "needs bf16"
        elif e.fix == section.recipe:
            verdict = f"takes fp8 under {section.recipe} (an FP8_UNDERFLOW warning)"
        else:
            # Not "needs": read beside "needs none of these exclusions" it contradicted it.
            verdict = f"takes fp8 under the {e.fix} recipe, not {section.recipe}"
        said.append(f"{e.layer} ({e.convention}): {verdict}")
    needed = [e.layer for e in section.exclusions if e.needed]
    return [
        "conventionally kept in high precision: " + "; ".join(said),
        f"this model needs the exclusion of {', '.join(needed)} (no fp8 recipe passes it)"
        if needed
        else "this model needs none of these exclusions: each of these layers takes fp8 under a recipe named",
    ]


def fp8_exclusion_rows(section: Fp8Section) -> list[dict[str, object]]:
    """One row per conventionally excluded layer: why convention excludes it, whether this run
    flagged it, the recipe (or bf16) that passes it, and whether this model needs the exclusion."""
    return [
        {"layer": e.layer, "convention": e.convention, "flagged": e.flagged, "fix": e.fix, "needed": e.needed}
        for e in section.exclusions
    ]


def fp8_next_steps(report: Report, command: Sequence[str]) -> list[str]:
    """What to run next after an fp8 analysis: the recipe that fixes every flagged layer, or
    which layers to leave out of fp8."""
    section = report.extras.fp8
    if section is None:
        return []
    flagged = {f.unit for f in report.flags() if f.flag in FP8_FLAGS}
    if not flagged:
        return [f"every Linear layer takes fp8 under {section.recipe} (no FP8_ERROR, no FP8_UNDERFLOW)"]
    fixes = {layer: fix for layer, fix in layer_fixes(section, report.thresholds).items() if layer in flagged}
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
        blackwell = (
            " (Blackwell GPUs only: MX block scaling needs their tensor cores)" if best == Fp8Recipe.MXFP8 else ""
        )
        lines.append(f"check the {best} recipe{blackwell}: {shlex.join(run)}")
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


def fp8_role_rows(section: Fp8Section) -> list[dict[str, Any]]:
    """One row per layer and cast role, over that role's casts (it feeds two matmuls): the
    largest amax, the smallest and largest scale torchao applied, the worst flushed fraction
    (%) and the saturated count; what `fp8_figure` draws."""
    rows = []
    for layer in section.layers:
        for role in ROLES:
            casts = [c for c in section.casts if c.layer == layer and c.role == role]
            if not casts:
                continue
            rows.append(
                {
                    "layer": layer,
                    "role": role,
                    "gemms": "/".join(c.gemm for c in casts),
                    "amax": max(c.amax for c in casts),
                    "scale_min": min(c.scale_min for c in casts),
                    "scale_max": max(c.scale_max for c in casts),
                    "flushed%": 100 * max(c.flushed_fraction for c in casts),
                    "saturated": sum(c.saturated for c in casts),
                }
            )
    return rows


def fp8_figure(section: Fp8Section) -> go.Figure:
    """Per layer (x, execution order) and cast role (one color each): amax and the scale
    (log axes) and the worst flushed fraction, from `fp8_role_rows`."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = fp8_role_rows(section)
    layers = list(section.layers)
    fig = make_subplots(
        rows=3,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.06,
        subplot_titles=("amax (cast input)", "scale (smallest, per cast)", "flushed to 0 (% of nonzero, worst cast)"),
    )
    for i, role in enumerate(ROLES):
        mine = [r for r in rows if r["role"] == role]
        if not mine:
            continue
        x = [layers.index(r["layer"]) for r in mine]
        text = [html.escape(f"{r['layer']} ({r['gemms']})") for r in mine]
        for panel, key in enumerate(("amax", "scale_min", "flushed%"), start=1):
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=[r[key] for r in mine],
                    text=text,
                    mode="markers",
                    name=role,
                    legendgroup=role,
                    showlegend=panel == 1,
                    marker={"size": 9, "symbol": ["circle", "square", "diamond"][i]},
                    hovertemplate=f"%{{text}}<br>{role} {key} %{{y:.4g}}<extra></extra>",
                ),
                row=panel,
                col=1,
            )
    fig.update_yaxes(type="log", exponentformat="power", row=1, col=1)
    fig.update_yaxes(type="log", exponentformat="power", row=2, col=1)
    fig.update_yaxes(rangemode="tozero", row=3, col=1)
    fig.update_xaxes(
        tickvals=list(range(len(layers))),
        ticktext=[html.escape(short_name(n)) for n in layers],
        range=[-0.7, len(layers) - 0.3],
        row=3,
        col=1,
    )
    fig.update_layout(
        title=f"fp8 casts per layer ({html.escape(section.recipe)})",
        height=620,
        margin={"t": 80, "b": 20, "l": 60, "r": 20},
        hovermode="closest",
    )
    return themed(fig)


def fp8_recipe_loss_rows(comparison: Fp8RecipeComparison) -> list[dict[str, Any]]:
    """One row per recipe: its final loss, the loss's relative error against fp32, how many
    layers it flags."""
    return [
        {
            "recipe": run.recipe,
            "loss_low": run.loss_low,
            "loss_rel_error": run.loss_rel_error,
            "flagged_layers": len(run.findings),
        }
        for run in comparison.runs
    ]


def fp8_recipe_layer_rows(comparison: Fp8RecipeComparison) -> list[dict[str, str]]:
    """One row per layer, one column per recipe: its fp8 findings under that recipe (`ok`
    where none), and the fix the analyses name for it."""
    rows = []
    for layer in comparison.layers:
        row = {"layer": layer}
        for run in comparison.runs:
            row[run.recipe] = ", ".join(run.findings.get(layer, [])) or "ok"
        fixes = {run.fixes[layer] for run in comparison.runs if layer in run.fixes}
        row["fix"] = " / ".join(sorted(fixes)) if fixes else "-"
        rows.append(row)
    return rows


def fp8_recipe_lines(report: Report) -> list[str]:
    """The recipe comparison as a terminal table: the final-loss error row, then one row per
    layer (its findings under each recipe)."""
    comparison = report.extras.fp8_recipes
    if comparison is None:
        return []
    recipes = [run.recipe for run in comparison.runs]
    table = [["", *recipes]]
    table.append(["final-loss rel error", *(f"{run.loss_rel_error:.2e}" for run in comparison.runs)])
    for row in fp8_recipe_layer_rows(comparison):
        table.append([row["layer"], *(row[r] for r in recipes)])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = [f"fp8 recipes side by side (fp32 loss {comparison.loss_fp32:.6g}):"]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table]
    return lines


def fp8_scaling_rows(model: Fp8ScalingModel) -> list[dict[str, Any]]:
    """The pre-flight's modelled delayed scaling, one row per layer and tensor: the steps, the
    largest amax, and at its worst step after the first (by how far the amax lands past the
    format's max, then by flushes) what the delayed and the current scale flush and saturate;
    step 0 (TE's initial scale 1) apart."""
    from precision_doctor.training.fp8_scaling import overshoot

    rows = []
    for t in model.tracks:
        later = [s for s in t.steps if s.step > 0] or t.steps
        worst = max(later, key=lambda s: (overshoot(s, t.fp8_dtype), s.flushed_delayed_fraction))
        first = t.steps[0]
        rows.append(
            {
                "layer": t.layer,
                "role": t.role,
                "format": t.fp8_dtype,
                "steps": len(t.steps),
                "max_amax": max(s.amax for s in t.steps),
                "worst_step": worst.step,
                "delayed_scale": worst.delayed_scale,
                "current_scale": worst.current_scale,
                "flushed%_delayed": 100 * worst.flushed_delayed_fraction,
                "flushed%_current": 100 * worst.flushed_current_fraction,
                "saturated_delayed": worst.saturated_delayed,
                "saturated_current": worst.saturated_current,
                "step0_flushed%": 100 * first.flushed_delayed_fraction,
            }
        )
    return rows
