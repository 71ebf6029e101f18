"""Terminal rendering of a report (rich): flagged units worst first, then one verdict line;
`next_steps` says what to do about it."""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from precision_doctor.extras import LossScaleSection
from precision_doctor.options import LowDtype, Regime, percent
from precision_doctor.planning.plan import CHEAPER_IN_FP32
from precision_doctor.report import LOSS_UNIT, UNATTRIBUTED_UNIT, Environment, Report, fp32_modules
from precision_doctor.views.figures import grad_fidelity_text, optimizer_step_text
from precision_doctor.views.fp8 import fp8_next_steps, fp8_recipe_lines, fp8_summary_lines

_STYLE = {
    "NONFINITE_FP32": "bold magenta",
    "OVERFLOW": "bold red",
    "GRAD_OVERFLOW": "red",
    "DIVERGENCE": "yellow",
    "GRAD_DIVERGENCE": "yellow",
    "ERROR_GROWTH": "yellow",
    "GRAD_UNDERFLOW": "cyan",
    "UNDERFLOW": "cyan",
    "FP8_ERROR": "yellow",
    "FP8_UNDERFLOW": "cyan",
    "LOST_UPDATE": "magenta",
}
_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.3g}"


def regime_text(env: Environment) -> str:
    """`autocast (cuda op lists)` or `pure`."""
    return f"{env.regime} ({env.policy} op lists)" if env.policy is not None else str(env.regime)


def render_report(report: Report, console: Console, *, max_rows: int = 30) -> None:
    env = report.environment
    console.print(
        Text(
            f"{report.model}: {len(report.units)} units, {report.op_count_forward} forward + "
            f"{report.op_count_backward} backward ops, {env.dtype} "
            f"({env.precision_text()}) on {env.device}, {regime_text(env)}, "
            f"capture: {env.capture_path}"
        )
    )
    console.print(
        Text(
            f"final loss: fp32 {report.losses.fp32:.6g}, {env.dtype} {report.losses.low:.6g} "
            f"(relative error {_num(report.losses.rel_error)})"
        )
    )
    gradients = grad_fidelity_text(report)
    if gradients is not None:
        console.print(Text(gradients))
    step = optimizer_step_text(report)
    if step is not None:
        console.print(Text(step))
    if report.ranks:
        _render_ranks(report, console)
    flags = report.flags()
    if flags:
        table = Table(title="Flagged units (worst first)", show_lines=False)
        table.add_column("severity")
        table.add_column("flag")
        table.add_column("unit", overflow="fold")
        table.add_column("op")
        table.add_column("evidence", overflow="fold")
        for f in flags[:max_rows]:
            # Text() so that markup-like unit names are shown, not interpreted.
            table.add_row(
                Text(f.severity.value, style=_SEVERITY_STYLE.get(f.severity.value, "")),
                Text(f.flag.value, style=_STYLE.get(f.flag.value, "")),
                Text(f.unit),
                Text(f.evidence.op or "-"),
                Text(f.evidence.message),
            )
        console.print(table)
        if len(flags) > max_rows:
            console.print(Text(f"... and {len(flags) - max_rows} more flags (see --out report.json)"))
    for line in [*fp8_summary_lines(report), *fp8_recipe_lines(report)]:
        console.print(Text(line))
    console.print(Text(report.verdict, style="bold green" if report else "bold red"))


MAX_RANK_LINES = 8


def _render_ranks(report: Report, console: Console) -> None:
    """One line per rank of a distributed job (those with findings first when there are many):
    what each rank's own statistics say, beside the job's combined ones."""
    job = report.environment.distributed
    head = f"{job.world_size} ranks ({job.backend}, {job.wrapper})" if job is not None else f"{len(report.ranks)} ranks"
    console.print(Text(f"distributed: {head}; units and flags combine every rank's statistics"))
    ranks = sorted(report.ranks, key=lambda r: (not r.flags, r.rank))
    dtype = report.environment.dtype
    for r in ranks[:MAX_RANK_LINES]:
        found = ", ".join(f"{f.flag.value} at {f.unit}" for f in r.flags) or "no flag"
        console.print(
            Text(
                f"  rank {r.rank}: loss fp32 {r.loss_fp32:.6g}, {dtype} {r.loss_low:.6g} "
                f"(relative error {_num(r.loss_rel_error)}); on its own: {found}"
            )
        )
    if len(ranks) > MAX_RANK_LINES:
        console.print(
            Text(
                f"  ... and {len(ranks) - MAX_RANK_LINES} more rank(s) without findings"
                if not ranks[MAX_RANK_LINES].flags
                else f"  ... and {len(ranks) - MAX_RANK_LINES} more rank(s)"
            )
        )


def _fp8_plan_step(report: Report, command: Sequence[str], export: Path | None) -> list[str]:
    """After an fp8 analysis: apply the fp8 plan written, or write one."""
    plan = report.extras.plan
    if plan is not None and export is not None:
        n_fp8 = sum(1 for d in plan.units.values() if d.startswith("fp8:"))
        if not n_fp8:
            return [
                f"train in bf16: the plan converts no layer to fp8 on {plan.target} (each layer's reason is "
                f"under 'bf16, not fp8' above); {export} converts none"
            ]
        return [f"convert the plan's {n_fp8} fp8 layer(s) with {export} (torchao: convert_planned(model))"]
    run = [*command, "--dtype", "fp8", "--export", "fp8_plan.py"]
    return [
        f"plan which Linear layers run in fp8, under which recipe, as torchao's module_filter_fn: {shlex.join(run)}"
    ]


def next_steps(
    report: Report,
    command: Sequence[str],
    *,
    bf16: Report | None = None,
    bf16_skipped: bool = False,
    export: Path | None = None,
    export_per_module: bool = True,
) -> list[str]:
    """What to do next, one line each, from the findings: where the model is not safe as-is,
    the plan that keeps its failing units in fp32 (the `--export` command, or the export
    already written); in fp16 under autocast, the loss scale GradScaler should start at; and
    where an fp16 model is not safe, what `bf16` - the bf16 analysis of the same model, run by
    the caller - found ("bf16 is clean for this model" only from that report, never guessed).
    `command` re-runs the analysis (`precision-doctor analyze model.py` with its regime
    options, without --dtype)."""
    env = report.environment
    dtype = env.dtype
    if dtype is LowDtype.FP8:  # no loss scale for fp8: bf16 autocast, torchao scales each cast
        return fp8_next_steps(report, command) + _fp8_plan_step(report, command, export)
    run = [*command, *(["--dtype", dtype.value] if dtype is not LowDtype.FP16 else [])]
    lines: list[str] = []
    if not report:
        plan = report.extras.plan
        n_fp32 = sum(1 for d in plan.units.values() if d == "fp32") if plan is not None else 0
        if plan is not None and n_fp32 == len(plan.units):
            # A unit kept for cost runs safely low; only the others are kept for what they do.
            cost = [f.unit for f in plan.fp32_units if f.reason.startswith(CHEAPER_IN_FP32)]
            flagged = [
                f.unit for f in plan.fp32_units if f.unit not in cost and f.unit not in (LOSS_UNIT, UNATTRIBUTED_UNIT)
            ]
            if cost:
                lines.append(
                    f"the plan keeps every unit in fp32: {', '.join(cost)} only because running them in {dtype} "
                    f"saves no time on {plan.target} at this size"
                    + (f"; {', '.join(flagged)} for what the analysis found" if flagged else "")
                )
            else:
                lines.append(f"the plan keeps every unit in fp32: no unit of this model runs safely in {dtype}")
        elif plan is not None and export is not None:
            if export_per_module:
                lines.append(
                    f"apply the plan written to {export}: it keeps {n_fp32} of {len(plan.units)} units in fp32"
                )
            else:  # a DeepSpeed config without per-module dtypes: the python export carries them
                lines.append(
                    f"{export} runs every module in {dtype}; apply the plan's {len(fp32_modules(plan.units))} fp32 "
                    f"module(s) with the python export too: {shlex.join([*run, '--export', 'plan.py'])}"
                )
        elif plan is not None:
            # Planned already (--out plans): what is left is writing it where training reads it.
            lines.append(
                f"write the plan above (it keeps {n_fp32} of {len(plan.units)} units in fp32) as a Python "
                f"snippet for your training script: {shlex.join([*run, '--export', 'plan.py'])}"
            )
        else:
            scaled = "; it gives the loss scale for the units that stay low too" if _scaled(env) else ""
            lines.append(
                f"plan which units stay in fp32 and write it as a Python snippet: "
                f"{shlex.join([*run, '--export', 'plan.py'])}{scaled}"
            )
    # Not safe as-is, every unit's loss scale is the scale of a configuration that fails: the
    # plan's low units' (`extras.loss_scale`) where there is a plan, else planning gives it.
    scale = _loss_scale_line(report) if report or report.extras.loss_scale is not None else None
    if scale is not None:
        lines.append(scale)
    if dtype is LowDtype.FP16 and not report:
        base = shlex.join([*command, "--dtype", "bf16"])
        if bf16 is not None:
            err = bf16.losses.rel_error
            if bf16 and not bf16.flags():
                lines.append(
                    f"bf16 is clean for this model (checked: no unit flagged, final-loss error {err:.2e} "
                    f"against fp32): {base}"
                )
            elif bf16:
                found = ", ".join(f"{n} {severity}(s)" for severity, n in bf16.severity_counts().items())
                lines.append(
                    f"bf16 is safe to train for this model with {found} (checked: final-loss "
                    f"error {err:.2e} against fp32): {base}"
                )
            else:
                lines.append(f"bf16 is not safe either (checked): {bf16.verdict}")
        elif bf16_skipped:
            lines.append(f"bf16 not checked (--no-bf16-check): {base}")
    return lines


def _loss_scale_line(report: Report) -> str | None:
    """fp16 under autocast trains with GradScaler: the scale to start it at (the plan's low
    units' advice where there is a plan, else every unit's). Where the verdict clears plain
    autocast (every unit low) and the plan's advice differs, that run's scale too: the plan
    may keep units fp32 for their cost alone, and a user may train as the verdict says."""
    if not _scaled(report.environment):
        return None
    from precision_doctor.analysis.loss_scale import recommend_loss_scale

    planned: LossScaleSection | None = report.extras.loss_scale
    all_low = recommend_loss_scale(report).to_extras() if planned is None or report else None
    line = _scale_advice(planned if planned is not None else all_low)
    if planned is None or all_low is None or not all_low.scaler_needed:
        return line
    if (planned.scaler_needed, planned.recommended_scale_log2) == (True, all_low.recommended_scale_log2):
        return line
    if line is None:
        return f"under plain autocast (every unit in fp16, as the verdict judges it): {_scale_advice(all_low)}"
    return f"{line}; under plain autocast (every unit in fp16) 2^{all_low.recommended_scale_log2} instead"


def _scale_advice(advice: LossScaleSection | None) -> str | None:
    if advice is None or not advice.scaler_needed:
        return None
    k, default = advice.recommended_scale_log2, advice.default_scale_log2
    line = f"start the loss scale at 2^{k}: torch.amp.GradScaler(init_scale=2**{k})"
    if k == default:
        line += " (GradScaler's default)"
    elif advice.skipped_steps_from_default:
        line += f" (from the default 2^{default} it skips {advice.skipped_steps_from_default} step(s) backing off)"
    elif advice.underflow_fraction_at_default > advice.underflow_fraction_at_recommended:
        line += (
            f" (at the default 2^{default}, {percent(advice.underflow_fraction_at_default)} of the "
            f"gradients flush to zero; {percent(advice.underflow_fraction_at_recommended)} at 2^{k})"
        )
    return line


def _scaled(env: Environment) -> bool:
    """fp16 under autocast trains with GradScaler; bf16 needs no scaler, and pure fp16's
    gradients are fp16, which GradScaler refuses to unscale."""
    return env.dtype is LowDtype.FP16 and env.regime is Regime.AUTOCAST


def render_next_steps(lines: Sequence[str], console: Console) -> None:
    if lines:
        console.print(Text("Next steps:", style="bold"))
        for line in lines:
            console.print(Text(f"  - {line}"))
