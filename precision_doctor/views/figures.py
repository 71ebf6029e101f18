"""Plotly figures and table rows built from a saved `Report`; shared by the Streamlit app and
the standalone HTML report, so both show the same thing. Nothing here reruns the analysis.

Plotly renders a subset of HTML inside text (ticks, hovers, titles), so every unit name that
goes into a figure is passed through `html.escape` first: names are shown, never interpreted.
"""

from __future__ import annotations

import html
import itertools
import math
from collections import Counter
from typing import TYPE_CHECKING, Any

from precision_doctor.extras import LossScaleSection, MonitorSection, PlanSection, PreflightSection
from precision_doctor.formats import (
    LIMITS,
    FormatLimits,
    bytes_unit,
    format_bytes,
    format_seconds,
    seconds_unit,
)
from precision_doctor.options import Flag, LowDtype, percent
from precision_doctor.report import ErrorStats, LossScalePoint, Report, TensorStats, Unit

if TYPE_CHECKING:
    import plotly.graph_objects as go

_OVERFLOW_COLOR = "rgba(214, 39, 40, 0.15)"
_UNDERFLOW_COLOR = "rgba(31, 119, 180, 0.15)"
_SUBNORMAL_COLOR = "rgba(255, 187, 0, 0.22)"

ALL_LOW_RUN = "all-low run"
"""The analysis's low run, every unit in the low dtype: what the report's loss-scale curve
(`Report.loss_scale`, fp16) is measured on."""

# --- the one theme: the app (st.plotly_chart(theme=None)) and the HTML report both draw
# every figure with it, on the same white page.
FONT = '"Source Sans Pro", "Source Sans 3", system-ui, -apple-system, "Segoe UI", sans-serif'
COLORWAY = [
    "#4c78a8",
    "#f58518",
    "#54a24b",
    "#e45756",
    "#72b7b2",
    "#eeca3b",
    "#b279a2",
    "#ff9da6",
    "#9d755d",
    "#bab0ac",
]
_AXIS: dict[str, Any] = {
    "showgrid": True,
    "gridcolor": "#ebebeb",
    "linecolor": "#c8c8c8",
    "showline": True,
    "zerolinecolor": "#d9d9d9",
    "ticks": "outside",
    "tickcolor": "#c8c8c8",
    "automargin": True,
    "title": {"standoff": 8},
}
TEMPLATE_LAYOUT: dict[str, Any] = {
    "font": {"family": FONT, "size": 12, "color": "#31333f"},
    "paper_bgcolor": "#ffffff",
    "plot_bgcolor": "#ffffff",
    "colorway": COLORWAY,
    "xaxis": _AXIS,
    "yaxis": _AXIS,
    "hoverlabel": {"bgcolor": "#ffffff", "font": {"family": FONT, "size": 12}},
    "title": {"font": {"size": 15}, "x": 0.01, "xanchor": "left"},
    "legend": {"bgcolor": "rgba(255,255,255,0.85)", "font": {"size": 11}},
}
"""The Plotly template both views use (`template()`): white, grey grid, one font and colorway."""


def template() -> Any:
    """TEMPLATE_LAYOUT as a plotly Template."""
    go = _go()
    return go.layout.Template(layout=TEMPLATE_LAYOUT)


def themed(fig: go.Figure) -> go.Figure:
    """The figure on the shared template; every figure builder here returns through it."""
    fig.update_layout(template=template())
    return fig


# --- the report's extras (typed sections, `report.extras`) -------------------------------------
def preflight_verdict(pre: PreflightSection) -> str:
    planned = "" if pre.planned_go is None else f"; with the plan: {'go' if pre.planned_go else 'no-go'}"
    return f"Pre-flight: {'GO' if pre.go else 'NO-GO'} ({pre.judge} configuration, {pre.steps} steps){planned}"


def preflight_run_rows(pre: PreflightSection) -> list[dict[str, Any]]:
    return [
        {
            "run": name,
            "configuration": r.description,
            "steps": len(r.steps),
            "skipped": len(r.skipped_steps) if name != "untrained" else None,  # no update by design
            "non-finite": len(r.nonfinite_steps),
            "max loss divergence": fmt(r.max_divergence),
        }
        for name, r in pre.runs.items()
    ]


def monitor_items(mon: MonitorSection) -> dict[str, str]:
    """The real run against the pre-flight's prediction, where there is one."""
    items = {
        "steps": str(mon.steps),
        "skipped steps": str(len(mon.skipped_steps)),
        "current scale": f"2^{math.log2(mon.current_scale):g}" if mon.current_scale > 0 else fmt(mon.current_scale),
    }
    p = mon.prediction
    if p is not None:
        items["predicted skipped"] = f"{len(p.skipped_steps)} in {p.steps} steps"
        items["pre-flight"] = "go" if p.go else "no-go"
    return items


def training_figure(pre: PreflightSection | None, mon: MonitorSection | None) -> go.Figure:
    """Left: each pre-flight run's loss per step. Right: the real run's loss scale (log2)
    over its steps, skipped steps marked."""
    go = _go()
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("pre-flight loss per step", "GradScaler scale (log2)"))
    for name, run in (pre.runs if pre is not None else {}).items():
        losses = run.losses
        fig.add_trace(
            go.Scatter(
                x=list(range(len(losses))),
                y=[v if math.isfinite(v) else None for v in losses],
                mode="lines+markers",
                name=name,
            ),
            row=1,
            col=1,
        )
    if mon is not None and mon.scale_history:
        xs, ys = [], []
        for i, (step, scale) in enumerate(mon.scale_history):
            end = mon.scale_history[i + 1][0] if i + 1 < len(mon.scale_history) else max(mon.steps, step + 1)
            xs += [step, end]
            ys += [math.log2(scale) if scale > 0 else None] * 2
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="scale", line={"color": "#4c78a8"}), row=1, col=2)
        if mon.skipped_steps:
            fig.add_trace(
                go.Scatter(
                    x=mon.skipped_steps,
                    y=[_scale_at(mon, s) for s in mon.skipped_steps],
                    mode="markers",
                    name="skipped",
                    marker={"color": "#d62728", "symbol": "x"},
                ),
                row=1,
                col=2,
            )
    fig.update_layout(height=340, margin={"t": 50, "b": 40, "l": 50, "r": 20})
    return themed(fig)


def _scale_at(mon: MonitorSection, step: int) -> float | None:
    scale = None
    for s, v in mon.scale_history:
        if s > step:
            break
        scale = v
    return math.log2(scale) if scale is not None and scale > 0 else None


# --- numbers and rows --------------------------------------------------------------------------
def fmt(x: float | None, spec: str = ".3g") -> str:
    """A number for display: None as '-', infinities spelled out."""
    if x is None:
        return "-"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x, spec)


fmt_bytes = format_bytes  # sizes and times in the unit that fits, as the plan summary prints them
fmt_seconds = format_seconds


def ordered_units(report: Report) -> list[Unit]:
    """Units in execution order."""
    return sorted(report.units, key=lambda u: u.order)


def flag_counts(report: Report) -> dict[str, int]:
    """Units carrying each flag (a unit counts once per flag), in severity order."""
    c: Counter[str] = Counter()
    for u in report.units:
        for flag in {f.flag for f in u.flags}:
            c[flag.value] += 1
    return {f.value: c[f.value] for f in Flag if c[f.value]}


def _err(e: ErrorStats | None) -> float | None:
    return None if e is None else e.rel_l2_error


def layer_rows(report: Report, plan: PlanSection | None = None) -> list[dict[str, Any]]:
    """One row per unit, execution order: flags and key numbers (floats stay floats, so the
    table sorts numerically; infinities stay inf)."""
    dtype = report.environment.dtype
    rows = []
    for u in ordered_units(report):
        fwd, grad = u.forward.stats, u.backward.stats
        tails = None if fwd is None else (fwd.fp16 if dtype == LowDtype.FP16 else fwd.bf16)
        row: dict[str, Any] = {
            "order": u.order,
            "unit": u.name,
            "kind": u.kind,
            "flags": ", ".join(dict.fromkeys(f.flag.value for f in u.flags)),
            "max |x|": None if fwd is None else fwd.max_abs,
            "overflow frac": None if tails is None else tails.overflow_fraction,
            "underflow frac": None if tails is None else tails.underflow_fraction,
            "local rel err": _err(u.forward.local),
            "propagated rel err": _err(u.forward.propagated),
            "SQNR dB": None if u.forward.propagated is None else u.forward.propagated.sqnr_db,
            "max |grad|": None if grad is None else grad.max_abs,
            "grad rel err": None if u.backward.grad_fidelity is None else u.backward.grad_fidelity.rel_l2_error,
            "grad cosine": None if u.backward.grad_fidelity is None else u.backward.grad_fidelity.cosine,
            "GFLOP fwd": u.flops_forward / 1e9,
            "activation MiB": u.activation_bytes / 2**20,
        }
        if plan is not None:
            row["plan dtype"] = plan.units.get(u.name, "")
        rows.append(row)
    return rows


def flag_rows(report: Report, unit: Unit | None = None) -> list[dict[str, Any]]:
    """Every flag (of one unit, or all worst first) with the op that triggered it."""
    flags = unit.flags if unit is not None else report.flags()
    return [
        {
            "severity": f.severity.value,
            "flag": f.flag.value,
            "unit": f.unit,
            "phase": f.evidence.phase.value,
            "op": f.evidence.op or "-",
            "evidence": f.evidence.message,
        }
        for f in flags
    ]


def error_rows(unit: Unit) -> list[dict[str, Any]]:
    """Local (fed fp32 inputs) against propagated (everything low) error of one unit."""
    rows = []
    for label, e in (("local", unit.forward.local), ("propagated", unit.forward.propagated)):
        rows.append(
            {
                "error": label,
                "rel L2 error": None if e is None else e.rel_l2_error,
                "SQNR dB": None if e is None else e.sqnr_db,
                "non-finite": None if e is None else e.nonfinite_count,
            }
        )
    return rows


def grad_fidelity_text(report: Report) -> str | None:
    """One line on the low run's parameter gradients against fp32's, model-wide and the
    worst unit; None where the report has none."""
    g = report.grad_fidelity
    if g is None:
        return None
    line = (
        f"parameter gradients: {report.environment.dtype} backward at loss scale 2^{g.scale_log2}, "
        f"relative L2 error {fmt(g.rel_l2_error)}, cosine {fmt(g.cosine, '.7g')} against fp32"
    )
    worst = next(iter(report.grad_fidelity_by_unit().items()), None)
    if worst is not None:
        name, f = worst
        line += f"; worst unit {name}: {fmt(f.rel_l2_error)}, cosine {fmt(f.cosine, '.7g')}"
    return line


def grad_fidelity_rows(unit: Unit) -> list[dict[str, Any]]:
    """One row per parameter of a unit: its gradient in the low run against fp32's."""
    return [
        {
            "parameter": name,
            "rel L2 error": f.rel_l2_error,
            "cosine": f.cosine,
            "non-finite": f.nonfinite_count,
            "values": f.numel,
            "fp32 L2 norm": f.fp32_l2_norm,
        }
        for name, f in unit.backward.param_grad_fidelity.items()
    ]


def overview_items(report: Report, plan: PlanSection | None = None) -> list[tuple[str, str]]:
    """(label, value) pairs for the overview."""
    env = report.environment
    items = [
        ("dtype", env.dtype.value),
        ("precision", env.precision_text()),
        ("regime", f"{env.regime}" + (f" ({env.policy} op lists)" if env.policy is not None else "")),
        ("device", env.device or "-"),
        ("capture path", env.capture_path.value),
        ("units", str(len(report.units))),
        ("flagged units", str(sum(1 for u in report.units if u.flags))),
        ("findings", ", ".join(f"{n} {s}(s)" for s, n in report.severity_counts().items()) or "none"),
        (f"final-loss rel error ({ALL_LOW_RUN})", fmt(report.losses.rel_error, ".2e")),
        (
            "loss tolerance",
            f"{report.thresholds.loss_rel_error:g}" + ("" if report.loss_within_tolerance else " (over)"),
        ),
    ]
    g = report.grad_fidelity
    if g is not None:
        items.append((f"gradient rel error ({ALL_LOW_RUN})", f"{fmt(g.rel_l2_error)} at 2^{g.scale_log2}"))
    job = distributed_text(report)
    if job is not None:
        items.append(("distributed", job))
    if plan is not None:
        items.append(("plan: verified final-loss rel error (planned run)", fmt(plan.verified_loss_rel_error, ".2e")))
        if plan.speedup is not None:
            items.append(("plan speed-up (est.)", f"{plan.speedup:.2f}x"))
        if plan.memory_saving is not None:
            items.append(("plan activation saving (est.)", f"{plan.memory_saving:.0%}"))
    return items


def distributed_text(report: Report) -> str | None:
    """ "2 ranks (gloo, ddp, mesh 2)" for a torch.distributed job's report, None for one
    process."""
    job = report.environment.distributed
    if job is None:
        return None
    mesh = "x".join(map(str, job.mesh_shape))
    return f"{job.world_size} ranks ({job.backend}, {job.wrapper}, mesh {mesh})"


def rank_rows(report: Report) -> list[dict[str, Any]]:
    """Each rank of a distributed job on its own statistics: its losses and the findings it
    alone raises (the job's flags, in the units above, combine every rank's statistics)."""
    dtype = report.environment.dtype.value
    return [
        {
            "rank": r.rank,
            "fp32 loss": r.loss_fp32,
            f"{dtype} loss": r.loss_low,
            "loss rel error": r.loss_rel_error,
            "flags": len(r.flags),
            "findings": "; ".join(f"{f.flag.value} at {f.unit} ({f.severity.value})" for f in r.flags) or "none",
        }
        for r in report.ranks
    ]


def takeoff_unit(report: Report) -> Unit | None:
    """The first unit, in execution order, whose propagated error exceeds the divergence
    threshold or turns non-finite from what it reads within it: where the error takes off (a
    parent returning its child's non-finite output read it, the child made it)."""
    limit = report.thresholds.divergence_rel_error

    def bad(err: float) -> bool:
        return not math.isfinite(err) or err > limit

    for u in ordered_units(report):
        p = u.forward.propagated
        if p is None or bad(u.forward.input_rel_l2_error or 0.0):
            continue
        if p.nonfinite_count > 0 or bad(p.rel_l2_error):
            return u
    return None


# --- figures -----------------------------------------------------------------------------------
def _go() -> Any:
    import plotly.graph_objects as go  # lazy: plotly is heavy and only needed for figures

    return go


def limits_for(dtype: LowDtype | str) -> FormatLimits:
    return LIMITS[LowDtype(dtype)]


def histogram_figure(stats: TensorStats, dtype: LowDtype | str, title: str) -> go.Figure:
    """Counts of log2|x| drawn against the dtype's range: overflow region (red), subnormal
    band (amber) and flush-to-zero region (blue) shaded, both limits marked."""
    go = _go()
    lim = limits_for(dtype)
    h = stats.histogram
    # counts[i] covers [2^(lo+i), 2^(lo+i+1)): centre each bar on its interval.
    x = [h.log2_lo + i + 0.5 for i in range(len(h.counts))]
    hover = [f"|x| in [2^{h.log2_lo + i}, 2^{h.log2_lo + i + 1}): {c}" for i, c in enumerate(h.counts)]
    over = lim.max_log2
    normal = math.log2(lim.smallest_normal)
    sub = math.log2(lim.smallest_subnormal)
    lo = min([h.log2_lo, sub]) - 3
    hi = max([h.log2_lo + len(h.counts), over]) + 3
    fig = go.Figure(
        go.Bar(
            x=x,
            y=h.counts,
            width=[1.0] * len(x),
            hovertext=hover,
            hoverinfo="text",
            name="values",
            marker_color="#4c78a8",
        )
    )
    bands = (
        (over, hi, _OVERFLOW_COLOR, f"overflow > {lim.max_value:.4g}", "top right"),
        (sub, normal, _SUBNORMAL_COLOR, "subnormal", "top left"),
        (lo, sub, _UNDERFLOW_COLOR, "flush to 0", "bottom left"),
    )
    for x0, x1, color, text, position in bands:
        fig.add_vrect(
            x0=x0,
            x1=x1,
            fillcolor=color,
            line_width=0,
            layer="below",
            annotation_text=text,
            annotation_position=position,
        )
    fig.add_vline(x=over, line_color="#d62728", line_dash="dash")
    fig.add_vline(x=sub, line_color="#1f77b4", line_dash="dash")
    extra = []
    if stats.zero_count:
        extra.append(f"{stats.zero_count} zeros")
    if stats.nan_count or stats.inf_count:
        extra.append(f"{stats.nan_count} NaN, {stats.inf_count} Inf")
    fig.update_layout(
        title=html.escape(title) + (f" ({', '.join(extra)} not shown)" if extra else ""),
        xaxis_title=f"log2|x| against the {lim.name} range",
        yaxis_title="count",
        xaxis_range=[lo, hi],
        bargap=0.05,
        showlegend=False,
        height=320,
        margin={"t": 60, "b": 40, "l": 50, "r": 20},
    )
    return themed(fig)


# Where a per-unit value is exact, non-finite or ordinary: exactly 0 error (and so +inf SQNR)
# is a perfect unit, drawn as "exact" at the plot's floor (or top); only Inf/NaN is
# "non-finite". The two never share a marker.
EXACT = "exact (0 error)"
NONFINITE = "non-finite"
_EXACT_MARKER = {"symbol": "diamond", "size": 9, "color": "#2ca02c"}
_NONFINITE_MARKER = {"symbol": "x", "size": 11, "color": "#d62728"}


def _log_floor(values: list[float | None]) -> float:
    """A floor for a log axis, a decade below its smallest positive finite value: where
    exact (0) values are drawn."""
    positive = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return 10.0 ** (math.floor(math.log10(min(positive))) - 1) if positive else 1e-8


def _split_errors(values: list[float | None]) -> tuple[list[float | None], list[bool], list[bool]]:
    """(positive finite values, None elsewhere), which are exactly 0, which are Inf/NaN."""
    shown = [v if v is not None and math.isfinite(v) and v > 0 else None for v in values]
    exact = [v is not None and v == 0 for v in values]
    bad = [v is not None and not math.isfinite(v) for v in values]
    return shown, exact, bad


def _capped(values: list[float | None], *, up: bool) -> tuple[list[float | None], list[float | None], float]:
    """Split values into finite ones and a marker row where they are non-finite, drawn at a
    cap just beyond the finite range (plotly cannot draw inf)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    cap = max([*finite, 1.0]) * 10 if up else min([*finite, 0.0]) - 10
    shown = [v if v is not None and math.isfinite(v) else None for v in values]
    marks = [cap if v is not None and not math.isfinite(v) else None for v in values]
    return shown, marks, cap


def short_name(name: str, limit: int = 28) -> str:
    """A unit name short enough for an axis: its tail (the most specific part), cut at a dot
    where one is near; the full name goes in the hover."""
    if len(name) <= limit:
        return name
    tail = name[-(limit - 1) :]
    dot = tail.find(".")
    if 0 <= dot < limit // 2:
        tail = tail[dot + 1 :]
    return "…" + tail


MAX_UNIT_TICKS = 80
"""Unit names along a per-unit axis; past this, every k-th (all in the hover)."""


def _per_unit_layout(fig: go.Figure, names: list[str], lower_title: str) -> go.Figure:
    """The layout shared by the two-row per-unit figures: a relative-error log axis above,
    `lower_title` below, the units' names along the shared x axis: abbreviated (the full
    name is in each point's hover), turned upright, every k-th past MAX_UNIT_TICKS, and the
    legend on the right, out of their way."""
    n = len(names)
    step = max(1, math.ceil(n / MAX_UNIT_TICKS))
    tickvals = list(range(0, n, step))
    labels = [html.escape(short_name(names[i])) for i in tickvals]
    longest = max((len(t) for t in labels), default=0)
    many = n > 24
    fig.update_xaxes(
        tickvals=tickvals,
        ticktext=labels,
        tickangle=-90 if many else -45,
        tickfont={"size": 10 if many else 12},
        automargin=True,
        row=2,
        col=1,
    )
    fig.update_xaxes(range=[-0.7, n - 0.3] if n else None)
    fig.update_yaxes(type="log", title_text="rel L2 error", exponentformat="power", dtick=1, row=1, col=1)
    fig.update_yaxes(title_text=lower_title, row=2, col=1)
    fig.update_layout(
        height=520 + min(longest, 30) * 6,
        margin={"t": 70, "b": 20, "l": 60, "r": 20},
        legend={"orientation": "v", "x": 1.01, "xanchor": "left", "y": 1, "yanchor": "top"},
        hovermode="closest",
    )
    return themed(fig)


def _marker_trace(
    x: list[int],
    where: list[bool],
    y: float,
    names: list[str],
    name: str,
    hover: str,
    marker: dict[str, Any],
    *,
    legendgroup: str,
    showlegend: bool = True,
) -> Any:
    go = _go()
    # In the legend only where some unit has one: an empty "exact" entry would suggest one.
    return go.Scatter(
        x=x,
        y=[y if w else None for w in where],
        mode="markers",
        name=name,
        text=names,
        marker=marker,
        legendgroup=legendgroup,
        showlegend=showlegend and any(where),
        hovertemplate="%{text}<br>" + hover + "<extra></extra>",
    )


def depth_figure(report: Report) -> go.Figure:
    """Propagated (and local) relative error, and SQNR, along execution order; the unit where
    the error takes off is marked. Exactly 0 error is drawn as "exact" (a green diamond at
    the error axis's floor, +inf SQNR at the top of the SQNR axis); only Inf/NaN is
    "non-finite" (a red cross beyond the finite range)."""
    from plotly.subplots import make_subplots

    units = ordered_units(report)
    names = [html.escape(u.name) for u in units]
    x = list(range(len(units)))
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        subplot_titles=("relative L2 error vs fp32", "SQNR (dB), propagated"),
    )
    _error_panel(fig, x, names, units)
    _sqnr_panel(fig, x, names, units)
    limit = report.thresholds.divergence_rel_error
    if limit:
        fig.add_hline(
            y=limit, line_dash="dot", line_color="gray", row=1, col=1, annotation_text=f"divergence threshold {limit:g}"
        )
    _mark_takeoff(fig, report, units)
    return _per_unit_layout(fig, [u.name for u in units], "dB")


def _error_panel(fig: go.Figure, x: list[int], names: list[str], units: list[Unit]) -> None:
    """The depth figure's upper panel: each unit's propagated and local relative error, with
    exact (0) and non-finite errors as markers at the axis's floor and beyond its top."""
    go = _go()
    prop = [_err(u.forward.propagated) for u in units]
    local = [_err(u.forward.local) for u in units]
    p_shown, p_exact, p_bad = _split_errors(prop)
    l_shown, l_exact, l_bad = _split_errors(local)
    floor = _log_floor([*prop, *local])
    finite = [v for v in [*prop, *local] if v is not None and math.isfinite(v)]
    cap = max([*finite, 1.0]) * 10
    fig.add_trace(
        go.Scatter(
            x=x,
            y=p_shown,
            mode="lines+markers",
            name="propagated",
            text=names,
            hovertemplate="%{text}<br>propagated %{y:.3g}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=[v if v is not None else (floor if e else None) for v, e in zip(l_shown, l_exact, strict=True)],
            mode="markers",
            name="local",
            text=names,
            marker_symbol="circle-open",
            hovertext=[
                f"{n}<br>local: {EXACT}" if e else f"{n}<br>local {fmt(v)}"
                for n, v, e in zip(names, local, l_exact, strict=True)
            ],
            hoverinfo="text",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        _marker_trace(
            x,
            [a or b for a, b in zip(p_bad, l_bad, strict=True)],
            cap,
            names,
            NONFINITE,
            "non-finite (Inf/NaN) error",
            _NONFINITE_MARKER,
            legendgroup="nonfinite",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        _marker_trace(x, p_exact, floor, names, EXACT, f"propagated: {EXACT}", _EXACT_MARKER, legendgroup="exact"),
        row=1,
        col=1,
    )


def _sqnr_panel(fig: go.Figure, x: list[int], names: list[str], units: list[Unit]) -> None:
    """The depth figure's lower panel: each unit's propagated SQNR, -inf and +inf dB as
    markers below and above the finite range."""
    go = _go()
    sqnr = [None if u.forward.propagated is None else u.forward.propagated.sqnr_db for u in units]
    s_fin = [v for v in sqnr if v is not None and math.isfinite(v)]
    top, bottom = max([*s_fin, 0.0]) + 10, min([*s_fin, 0.0]) - 10
    fig.add_trace(
        go.Scatter(
            x=x,
            y=[v if v is not None and math.isfinite(v) else None for v in sqnr],
            mode="lines+markers",
            name="SQNR",
            text=names,
            hovertemplate="%{text}<br>%{y:.1f} dB<extra></extra>",
        ),
        row=2,
        col=1,
    )
    fig.add_trace(
        _marker_trace(
            x,
            [v is not None and (math.isnan(v) or v == -math.inf) for v in sqnr],
            bottom,
            names,
            "SQNR -inf",
            "SQNR -inf dB (non-finite)",
            _NONFINITE_MARKER,
            legendgroup="nonfinite",
            showlegend=False,
        ),
        row=2,
        col=1,
    )
    fig.add_trace(
        _marker_trace(
            x,
            [v == math.inf for v in sqnr],
            top,
            names,
            "SQNR +inf",
            f"SQNR +inf dB: {EXACT}",
            _EXACT_MARKER,
            legendgroup="exact",
            showlegend=False,
        ),
        row=2,
        col=1,
    )


def _mark_takeoff(fig: go.Figure, report: Report, units: list[Unit]) -> None:
    """A line at the unit where the error takes off (`takeoff_unit`), if any."""
    start = takeoff_unit(report)
    if start is None:
        return
    i = units.index(start)
    fig.add_vline(x=i, line_color="#d62728", line_dash="dash")
    fig.add_annotation(
        x=i,
        y=1.0,
        yref="paper",
        text=f"error takes off: {html.escape(short_name(start.name))}",
        hovertext=html.escape(start.name),
        showarrow=False,
        xanchor="left",
        yanchor="bottom",
        font={"color": "#d62728"},
    )


def grad_fidelity_figure(report: Report) -> go.Figure:
    """Per unit with parameters, in execution order: the relative L2 error of its parameter
    gradients in the low run against fp32's, and their cosine, with GRAD_DIVERGENCE's
    thresholds; exactly 0 error drawn as "exact", Inf/NaN as "non-finite"."""
    go = _go()
    from plotly.subplots import make_subplots

    units = [u for u in ordered_units(report) if u.backward.grad_fidelity is not None]
    names = [html.escape(u.name) for u in units]
    x = list(range(len(units)))
    fid = [u.backward.grad_fidelity for u in units]
    scale = report.grad_fidelity.scale_log2 if report.grad_fidelity is not None else 0
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        subplot_titles=(
            f"parameter-gradient relative L2 error vs fp32 (loss scale 2^{scale})",
            "cosine with fp32's gradient",
        ),
    )
    errs = [f.rel_l2_error if f is not None else None for f in fid]
    shown, exact, bad = _split_errors(errs)
    floor = _log_floor(errs)
    _, _, cap = _capped(errs, up=True)
    fig.add_trace(
        go.Bar(
            x=x,
            y=shown,
            name="rel L2 error",
            text=names,
            textposition="none",
            marker_color="#4c78a8",
            hovertemplate="%{text}<br>%{y:.3g}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        _marker_trace(
            x,
            bad,
            cap,
            names,
            NONFINITE,
            "non-finite (Inf/NaN) gradient error",
            _NONFINITE_MARKER,
            legendgroup="nonfinite",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=[f.cosine if f is not None else None for f in fid],
            mode="markers",
            name="cosine",
            text=names,
            marker_color="#2ca02c",
            hovertemplate="%{text}<br>cosine %{y:.6g}<extra></extra>",
        ),
        row=2,
        col=1,
    )
    fig.add_trace(_marker_trace(x, exact, floor, names, EXACT, EXACT, _EXACT_MARKER, legendgroup="exact"), row=1, col=1)
    th = report.thresholds
    fig.add_hline(
        y=th.grad_rel_error,
        line_dash="dot",
        line_color="gray",
        row=1,
        col=1,
        annotation_text=f"warning above {th.grad_rel_error:g}",
    )
    fig.add_hline(
        y=th.grad_cosine_min,
        line_dash="dot",
        line_color="#d62728",
        row=2,
        col=1,
        annotation_text=f"error below {th.grad_cosine_min:g}",
    )
    return _per_unit_layout(fig, [u.name for u in units], "cosine")


def recommendation_run(report: Report) -> str:
    """Whose gradients the loss-scale recommendation (`extras.loss_scale`) reads: the plan's
    low units when the report has a plan (the plan sets it), else the all-low run's."""
    return "planned run" if report.extras.plan is not None else ALL_LOW_RUN


def curve_point(report: Report, scale_log2: int) -> LossScalePoint | None:
    """The all-low run's curve at 2^k (None off the curve, e.g. below 2^0)."""
    return next((p for p in report.loss_scale if p.scale_log2 == scale_log2), None)


def loss_scale_rows(report: Report, ls: LossScaleSection) -> list[dict[str, str]]:
    """The recommendation's numbers, each in the column of the run it describes: the run the
    recommendation was made for (the planned run where there is a plan) and the all-low run
    the curve is measured on."""
    run = recommendation_run(report)
    k, d = ls.recommended_scale_log2, ls.default_scale_log2
    at_k, at_d = curve_point(report, k), curve_point(report, d)
    curve = f"{ALL_LOW_RUN} (the curve)"
    own = f"{run} (the recommendation)"
    rows = [
        {
            "": f"underflow at the recommended scale 2^{k}",
            own: percent(ls.underflow_fraction_at_recommended),
            curve: "-" if at_k is None else percent(at_k.underflow_fraction),
        },
        {
            "": f"underflow at the default scale 2^{d}",
            own: percent(ls.underflow_fraction_at_default),
            curve: "-" if at_d is None else percent(at_d.underflow_fraction),
        },
        {
            "": f"overflow at the recommended scale 2^{k}",
            own: "-",
            curve: "-" if at_k is None else percent(at_k.overflow_fraction),
        },
        {"": f"steps GradScaler skips backing off from 2^{d}", own: str(ls.skipped_steps_from_default), curve: "-"},
        {"": "GradScaler needed", own: "yes" if ls.scaler_needed else "no", curve: "-"},
    ]
    if run == ALL_LOW_RUN:  # one run: one column
        return [{"": r[""], ALL_LOW_RUN: r[own] if r[own] != "-" else r[curve]} for r in rows]
    return rows


def loss_scale_figure(report: Report, recommended: LossScaleSection | None = None) -> go.Figure:
    """The all-low run's gradients against the loss scale 2^k: the fraction lost to underflow
    and to overflow in fp16, with the 2^16 default and (when known) the recommended initial
    scale marked, and the recommendation's own underflow there (the planned run's, where the
    report has a plan: its low units only). The curve spans 2^0..2^127; the axis shows where
    it changes, the marks, and a little beyond."""
    go = _go()
    pts = sorted(report.loss_scale, key=lambda p: p.scale_log2)
    k = [p.scale_log2 for p in pts]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=k,
            y=[p.underflow_fraction for p in pts],
            mode="lines+markers",
            name=f"underflow, {ALL_LOW_RUN} (values)",
            line_color="#1f77b4",
            hovertemplate="2^%{x}: %{y:.3%} of nonzero gradients flush to 0<extra></extra>",
        )
    )
    if any(p.underflow_norm_fraction is not None for p in pts):
        fig.add_trace(
            go.Scatter(
                x=k,
                y=[p.underflow_norm_fraction for p in pts],
                mode="lines",
                name=f"underflow, {ALL_LOW_RUN} (L2 norm)",
                line={"color": "#1f77b4", "dash": "dot"},
                hovertemplate="2^%{x}: %{y:.3%} of the gradients' L2 norm lost<extra></extra>",
            )
        )
    fig.add_trace(
        go.Scatter(
            x=k,
            y=[p.overflow_fraction for p in pts],
            mode="lines+markers",
            name=f"overflow, {ALL_LOW_RUN}",
            line_color="#d62728",
            hovertemplate="2^%{x}: %{y:.3%} overflow<extra></extra>",
        )
    )
    default = recommended.default_scale_log2 if recommended is not None else 16
    fig.add_vline(
        x=default,
        line_dash="dash",
        line_color="gray",
        annotation_text=f"default 2^{default}",
        annotation_position="top left",
    )
    if recommended is not None:
        run = recommendation_run(report)
        rk = recommended.recommended_scale_log2
        fig.add_vline(
            x=rk,
            line_color="#2ca02c",
            line_width=3,
            annotation_text=f"recommended 2^{rk} ({run})",
            annotation_position="top right",
        )
        if run != ALL_LOW_RUN:
            fig.add_trace(
                go.Scatter(
                    x=[rk],
                    y=[recommended.underflow_fraction_at_recommended],
                    mode="markers",
                    name=f"underflow, {run}, at 2^{rk}",
                    marker={"symbol": "diamond", "size": 12, "color": "#2ca02c"},
                    hovertemplate=f"{run} at 2^{rk}: %{{y:.3%}} flush to 0<extra></extra>",
                )
            )
    changing = [
        a.scale_log2
        for a, b in itertools.pairwise(pts)
        if (a.underflow_fraction, a.overflow_fraction, a.underflow_norm_fraction)
        != (b.underflow_fraction, b.overflow_fraction, b.underflow_norm_fraction)
    ]
    marks = [default] + ([recommended.recommended_scale_log2] if recommended is not None else [])
    shown = [*k[:1], *changing, *marks]
    x_range = [min(shown) - 1, max(shown) + 3] if k else None
    fig.update_layout(
        title=f"fp16 loss scale: the {ALL_LOW_RUN}'s gradients",
        xaxis_title="loss scale 2^k (k)",
        xaxis_range=x_range,
        yaxis_title="fraction of nonzero gradients",
        yaxis_range=[-0.02, 1.05],
        yaxis_tickformat=".0%",
        height=400,
        margin={"t": 60, "b": 40, "l": 60, "r": 20},
        legend={"orientation": "v", "x": 1.01, "xanchor": "left", "y": 1, "yanchor": "top"},
    )
    return themed(fig)


def plan_cost_rows(plan: PlanSection) -> list[dict[str, Any]]:
    """Estimated step time and activation memory of fp32, plain autocast and the plan."""
    t, a = plan.estimated_step_time_s.model_dump(), plan.activation_bytes.model_dump()
    return [{"config": k, "est. step time": fmt_seconds(t[k]), "activations": fmt_bytes(a[k])} for k in t]


def plan_cost_figure(plan: PlanSection) -> go.Figure:
    """Estimated step time and activation memory: fp32, plain autocast and the plan."""
    go = _go()
    from plotly.subplots import make_subplots

    t: dict[str, float] = plan.estimated_step_time_s.model_dump()
    a: dict[str, int] = plan.activation_bytes.model_dump()
    # Each axis in the unit that fits its largest bar (what fmt_seconds / fmt_bytes would pick).
    t_unit, t_factor = seconds_unit(max(t.values(), default=0.0))
    a_unit, a_factor = bytes_unit(max(a.values(), default=0))
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"est. step time ({t_unit})", f"activation memory ({a_unit})"))
    panels = (
        (list(t), [v / t_factor for v in t.values()], "step time", [fmt_seconds(v) for v in t.values()], "#4c78a8"),
        (list(a), [v / a_factor for v in a.values()], "activations", [fmt_bytes(v) for v in a.values()], "#f58518"),
    )
    for col, (x, y, name, text, color) in enumerate(panels, start=1):
        fig.add_trace(go.Bar(x=x, y=y, name=name, text=text, marker_color=color), row=1, col=col)
    fig.update_layout(showlegend=False, height=320, margin={"t": 50, "b": 40, "l": 50, "r": 20})
    return themed(fig)


EXPORT_FILES: dict[str, tuple[str, str]] = {
    "json": ("precision_plan.json", "application/json"),
    "python": ("precision_plan.py", "text/x-python"),
    "deepspeed": ("ds_config.json", "application/json"),
    "hf": ("hf_precision.json", "application/json"),
}
"""Export format -> (download file name, MIME type)."""


def export_file(fmt_name: str) -> tuple[str, str]:
    return EXPORT_FILES.get(fmt_name, (f"precision_plan.{fmt_name}.txt", "text/plain"))


def optimizer_step_text(report: Report) -> str | None:
    """One line on the optimizer step with low-precision weights (`Report.optimizer_step`),
    model-wide and the unit losing most; None where the report has none."""
    step = report.optimizer_step
    if step is None:
        return None
    t = step.total
    if t.nonfinite:
        # Weights gone Inf/NaN: what fraction of the updates "survived" means nothing then.
        line = (
            f"optimizer step: {step.optimizer} at lr {step.lr:g} with {step.dtype} weights and state makes "
            f"{t.nonfinite} weight(s) Inf/NaN in one step"
        )
    else:
        ratio = t.update_norm_ratio
        norm = f"update norm {fmt(ratio)}x fp32's" if ratio is not None and math.isfinite(ratio) else "no update norm"
        line = (
            f"optimizer step: {step.optimizer} at lr {step.lr:g} with {step.dtype} weights and state loses "
            f"{percent(t.lost_fraction)} of the updates fp32's makes (partly {percent(t.partly_lost_fraction)}; "
            f"{norm})"
        )
    worst = max(step.units, key=lambda u: u.lost_fraction, default=None)
    if worst is not None and worst.lost:
        line += f"; worst unit {worst.unit}: {percent(worst.lost_fraction)} lost"
    if step.master_weights:
        line += "; autocast keeps fp32 master weights, which lose none of it"
    return line


def optimizer_step_rows(report: Report) -> list[dict[str, Any]]:
    """One row per unit with parameters: its optimizer step with low-precision weights
    against fp32's, and its optimizer state's lost fractions."""
    step = report.optimizer_step
    if step is None:
        return []
    rows = []
    for u in step.units:
        row: dict[str, Any] = {
            "unit": u.unit,
            "elements": u.numel,
            "lost": u.lost_fraction,
            "partly lost": u.partly_lost_fraction,
            "non-finite": u.nonfinite,
            "update norm ratio": u.update_norm_ratio,
            "lr for 90% to survive": u.survive_lr,
        }
        for key, s in u.state.items():
            row[f"{key} lost"] = s.lost_fraction
        rows.append(row)
    return rows
