"""Terminal rendering of a report (rich): flagged units worst first, then one verdict line."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table
from rich.text import Text

from precision_doctor.report import Environment, Report
from precision_doctor.views.figures import grad_fidelity_text

_STYLE = {
    "NONFINITE_FP32": "bold magenta",
    "OVERFLOW": "bold red",
    "GRAD_OVERFLOW": "red",
    "DIVERGENCE": "yellow",
    "GRAD_DIVERGENCE": "yellow",
    "ERROR_GROWTH": "yellow",
    "GRAD_UNDERFLOW": "cyan",
    "UNDERFLOW": "cyan",
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
        Text(f"final loss: fp32 {report.losses.fp32:.6g}, {env.dtype} {report.losses.low:.6g} "
             f"(relative error {_num(report.losses.rel_error)})")
    )
    gradients = grad_fidelity_text(report)
    if gradients is not None:
        console.print(Text(gradients))
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
        console.print(Text(
            f"  rank {r.rank}: loss fp32 {r.loss_fp32:.6g}, {dtype} {r.loss_low:.6g} "
            f"(relative error {_num(r.loss_rel_error)}); on its own: {found}"
        ))
    if len(ranks) > MAX_RANK_LINES:
        console.print(Text(f"  ... and {len(ranks) - MAX_RANK_LINES} more rank(s) without findings"
                           if not ranks[MAX_RANK_LINES].flags else f"  ... and {len(ranks) - MAX_RANK_LINES} more rank(s)"))
