"""The same model analyzed under each fp8 recipe, side by side (`--fp8-recipe all`): each
recipe's final-loss error and its flagged layers, from one full `analyze` per recipe (no
shortcut: a recipe's numbers here are the ones its own analysis gives)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from precision_doctor.analysis.engine import analyze
from precision_doctor.analysis.fp8 import FP8_FLAGS, layer_fixes
from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.extras import Fp8RecipeComparison, Fp8RecipeRun
from precision_doctor.options import Fp8Recipe, LowDtype, parse_enum
from precision_doctor.report import Report

logger = logging.getLogger("precision_doctor")

__all__ = ["compare_fp8_recipes", "recipe_comparison"]


def recipe_comparison(reports: Mapping[Fp8Recipe | str, Report]) -> Fp8RecipeComparison:
    """The side-by-side section from fp8 analyses of one model, one per recipe (in the
    mapping's order)."""
    if not reports:
        raise PrecisionDoctorError("a recipe comparison needs at least one fp8 analysis")
    layers: list[str] = []
    runs = []
    for recipe, report in reports.items():
        section = report.extras.fp8
        if section is None:
            raise PrecisionDoctorError(f"the {recipe} report is no fp8 analysis (it has no extras.fp8)")
        layers += [layer for layer in section.layers if layer not in layers]
        findings: dict[str, list[str]] = {}
        for f in report.flags():
            if f.flag in FP8_FLAGS:
                text = f"{f.flag.value} {f.evidence.op}"
                if text not in findings.setdefault(f.unit, []):
                    findings[f.unit].append(text)
        fixes = layer_fixes(section, report.thresholds)
        runs.append(
            Fp8RecipeRun(
                recipe=section.recipe,
                loss_low=report.losses.low,
                loss_rel_error=report.losses.rel_error,
                findings=findings,
                fixes=fixes,
            )
        )
    first = next(iter(reports.values()))
    return Fp8RecipeComparison(loss_fp32=first.losses.fp32, layers=layers, runs=runs)


def compare_fp8_recipes(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: Any = None,
    *,
    recipes: Iterable[Fp8Recipe | str] | None = None,
    **analyze_kwargs: Any,
) -> Report:
    """`analyze(model, batch, loss_fn, dtype="fp8", fp8_recipe=r, **analyze_kwargs)` for each
    recipe (default: every `Fp8Recipe`); the first recipe's report, with the comparison in
    `extras.fp8_recipes`.

    >>> report = compare_fp8_recipes(model, batch, loss_fn)  # doctest: +SKIP
    >>> [(r.recipe, r.loss_rel_error) for r in report.extras.fp8_recipes.runs]  # doctest: +SKIP
    """
    for key in ("dtype", "fp8_recipe"):
        if key in analyze_kwargs:
            raise PrecisionDoctorError(f"compare_fp8_recipes sets {key} itself (dtype fp8, each recipe in turn)")
    chosen = [parse_enum(Fp8Recipe, r, "fp8 recipe") for r in (recipes if recipes is not None else Fp8Recipe)]
    if not chosen:
        raise PrecisionDoctorError("compare_fp8_recipes needs at least one recipe")
    reports: dict[Fp8Recipe | str, Report] = {}
    for r in dict.fromkeys(chosen):
        try:
            reports[r] = analyze(model, batch, loss_fn, dtype=LowDtype.FP8, fp8_recipe=r, **analyze_kwargs)
        except PrecisionDoctorError as e:
            # Every recipe by default: mxfp8's blocks of 32 fit few models' shapes (a layer fed
            # 16 tokens). The others are compared without it, and a line says why; a recipe
            # asked for by name, or any other, fails the comparison.
            if recipes is not None or r is not Fp8Recipe.MXFP8:
                raise
            logger.warning("precision-doctor: mxfp8 left out of the recipe comparison: %s", e)
    return next(iter(reports.values())).with_extras(fp8_recipes=recipe_comparison(reports))
