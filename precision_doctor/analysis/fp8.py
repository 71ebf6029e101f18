"""The fp8 low run's casts and matmuls judged: the report's `extras.fp8` section and the
FP8_ERROR / FP8_UNDERFLOW findings, each naming the layer, the GEMM, the role and the recipe
that fixes it (or bf16 for the layer).

Thresholds (`options.Thresholds`), from published references: Transformer Engine's
auto-switch falls back to high precision above 5 % underflow (`fp8_underflow_fraction`);
torchao's tests hold a Float8Linear's output to an SQNR of 18 dB and its weight gradient to
17 dB (`fp8_output_sqnr_db`, `fp8_wgrad_sqnr_db`). A matmul is judged by the smaller of its
SQNR over the whole output and the median of its rows' (one outlier token's norm would hide
every other token's error in the first).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence

from precision_doctor.extras import Fp8Cast, Fp8Exclusion, Fp8Gemm, Fp8Section
from precision_doctor.options import Flag, Fp8Recipe, Phase, Severity, Thresholds, percent
from precision_doctor.report import Evidence, FlagRecord, Report

__all__ = [
    "CONVENTIONAL_PATTERNS",
    "FP8_FLAGS",
    "exclusions",
    "fix_for",
    "fp8_flags",
    "fp8_section",
    "gemm_db",
    "layer_fixes",
    "sqnr_limit_db",
    "unjudged",
    "with_fp8",
]

BF16_FIX = "bf16"
"""What `fix_for` names when no recipe passes: keep the layer out of fp8."""

FP8_FLAGS = frozenset({Flag.FP8_ERROR, Flag.FP8_UNDERFLOW})
"""The findings an fp8 analysis adds (`fp8_flags`)."""


def fp8_section(
    recipe: Fp8Recipe,
    version: str,
    emulated: bool,
    layers: Iterable[str],
    casts: Sequence[Fp8Cast],
    gemms: Sequence[Fp8Gemm],
) -> Fp8Section:
    return Fp8Section(
        recipe=recipe.value,
        torchao_version=version,
        emulated=emulated,
        layers=list(layers),
        casts=list(casts),
        gemms=list(gemms),
    )


def gemm_db(g: Fp8Gemm, recipe: str) -> float:
    """The SQNR a matmul is judged by under `recipe`: the smaller of the whole output's and
    the median row's."""
    return min(g.sqnr_db.get(recipe, math.inf), g.row_sqnr_db.get(recipe, math.inf))


def sqnr_limit_db(gemm: str, th: Thresholds) -> float:
    """The SQNR (dB) a matmul must reach: the weight gradient's threshold for wgrad, the output's else."""
    return th.fp8_wgrad_sqnr_db if gemm == "wgrad" else th.fp8_output_sqnr_db


def layer_fixes(section: Fp8Section, th: Thresholds) -> dict[str, str]:
    """Per converted layer (in the model's order), `fix_for` its matmuls."""
    gemms: dict[str, list[Fp8Gemm]] = {layer: [] for layer in section.layers}
    for g in section.gemms:
        if g.layer in gemms:
            gemms[g.layer].append(g)
    return {layer: fix_for(gs, th) for layer, gs in gemms.items()}


def fix_for(gemms: Sequence[Fp8Gemm], th: Thresholds) -> str:
    """The first recipe (in `Fp8Recipe`'s order: tensorwise, rowwise, rowwise_with_gw_hp,
    mxfp8) under which every one of a layer's matmuls passes, else `bf16` (the layer out of
    fp8). A recipe a matmul was not measured under (mxfp8 where a dimension is not in whole
    blocks of 32) does not pass."""
    for recipe in Fp8Recipe:
        if all(recipe.value in g.sqnr_db and gemm_db(g, recipe.value) >= sqnr_limit_db(g.gemm, th) for g in gemms):
            return recipe.value
    return BF16_FIX


def _worst_role(casts: Sequence[Fp8Cast]) -> Fp8Cast | None:
    if not casts:
        return None
    return max(casts, key=lambda c: (c.flushed_fraction, -c.sqnr_db))


def unjudged(gemms: Sequence[Fp8Gemm]) -> list[str]:
    """The matmuls this run cannot judge: exact under every recipe because an operand was all
    0 (a gradient the forward's own fp8 error zeroed, or a loss that ignores the output)."""
    return [g.gemm for g in gemms if all(math.isinf(v) and v > 0 for v in g.sqnr_db.values())]


def _advice(fix: str, recipe: str, layer: str, gemms: Sequence[Fp8Gemm]) -> str:
    if fix == BF16_FIX:
        return f"no fp8 recipe passes: keep {layer!r} in bf16 (leave it out of convert_to_float8_training's module_filter_fn)"
    text = f"the {fix} recipe fixes it" if fix != recipe else f"its matmuls pass under {recipe}"
    blind = unjudged(gemms)
    if blind and fix != recipe:
        text += f" (its {'/'.join(blind)} operands were all 0 in this run: confirm with --fp8-recipe {fix})"
    return text


def fp8_flags(section: Fp8Section, th: Thresholds) -> dict[str, list[FlagRecord]]:
    """Per layer, its FP8_ERROR (a matmul below its SQNR threshold; error) and FP8_UNDERFLOW
    (a cast flushing more than `fp8_underflow_fraction` of its nonzero values; warning)
    findings."""
    recipe = section.recipe
    out: dict[str, list[FlagRecord]] = {}
    for layer in section.layers:
        gemms = [g for g in section.gemms if g.layer == layer]
        casts = [c for c in section.casts if c.layer == layer]
        fix = fix_for(gemms, th)
        flags: list[FlagRecord] = []
        seen: set[str] = set()
        for g in gemms:
            db, limit = gemm_db(g, recipe), sqnr_limit_db(g.gemm, th)
            if db >= limit or g.gemm in seen:
                continue
            seen.add(g.gemm)
            worst = _worst_role([c for c in casts if c.gemm == g.gemm])
            role = worst.role if worst is not None else "?"
            flags.append(
                FlagRecord(
                    flag=Flag.FP8_ERROR,
                    unit=layer,
                    severity=Severity.ERROR,
                    evidence=Evidence(
                        op=g.gemm,
                        phase=Phase.FORWARD if g.gemm == "fprop" else Phase.BACKWARD,
                        message=(
                            f"{g.gemm} matmul under {recipe} fp8: SQNR {db:.1f} dB < {limit:g} dB "
                            f"(worst cast: {role}); {_advice(fix, recipe, layer, gemms)}"
                        ),
                        values={
                            "sqnr_db": db,
                            "threshold_db": limit,
                            **{f"sqnr_db_{r}": gemm_db(g, r) for r in g.sqnr_db},
                        },
                    ),
                )
            )
        for c in casts:
            if c.flushed_fraction <= th.fp8_underflow_fraction:
                continue
            key = f"{c.gemm}/{c.role}"
            if key in seen:
                continue
            seen.add(key)
            flags.append(
                FlagRecord(
                    flag=Flag.FP8_UNDERFLOW,
                    unit=layer,
                    severity=Severity.WARNING,
                    evidence=Evidence(
                        op=c.gemm,
                        phase=Phase.FORWARD if c.gemm == "fprop" else Phase.BACKWARD,
                        message=(
                            f"{percent(c.flushed_fraction)} of the nonzero {c.role} values of the {c.gemm} matmul "
                            f"flush to 0 in {c.fp8_dtype} ({c.granularity} scale, amax {c.amax:.3g}); "
                            f"{_advice(fix, recipe, layer, gemms)}"
                        ),
                        values={
                            "flushed_fraction": c.flushed_fraction,
                            "amax": c.amax,
                            "outlier_ratio": c.outlier_ratio,
                        },
                    ),
                )
            )
        if flags:
            out[layer] = flags
    return out


CONVENTIONAL_PATTERNS = ("*lm_head*", "*router*", "*mlp.gate*", "*output_layer*")
"""ModelOpt's default fp8 exclusions (module-name globs); Megatron keeps the first and the last
layer in bf16 besides."""


def exclusions(section: Fp8Section, flags: Mapping[str, Sequence[FlagRecord]], th: Thresholds) -> list[Fp8Exclusion]:
    """The layers convention keeps out of fp8, in the model's order, each judged on this run
    rather than assumed: flagged or not under its recipe, and the recipe (or bf16) that passes it."""
    if not section.layers:
        return []
    fixes = layer_fixes(section, th)
    # A model with one Linear: that layer is both, and convention keeps it out on both counts.
    first, last = section.layers[0], section.layers[-1]
    picked = {first: "first and last"} if first == last else {first: "first", last: "last"}
    for layer in section.layers:
        for pattern in CONVENTIONAL_PATTERNS:
            if fnmatch.fnmatchcase(layer, pattern):
                picked.setdefault(layer, pattern)
    return [
        Fp8Exclusion(
            layer=layer,
            convention=picked[layer],
            flagged=bool(flags.get(layer)),
            fix=fixes[layer],
        )
        for layer in section.layers
        if layer in picked
    ]


def with_fp8(report: Report, section: Fp8Section) -> Report:
    """`report` with `extras.fp8` set (its conventional exclusions judged) and the fp8 findings
    added to their layers' units (a layer that is no unit of the report, for one the capture
    did not see, keeps its findings in the section only)."""
    env = report.environment.model_copy(update={"emulated": section.emulated})
    found = fp8_flags(section, report.thresholds)
    section = section.model_copy(update={"exclusions": exclusions(section, found, report.thresholds)})
    flagged = report.with_unit_flags(found)
    return flagged.model_copy(update={"environment": env}).with_extras(fp8=section)
