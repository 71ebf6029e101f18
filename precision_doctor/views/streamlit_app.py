"""The interactive report: `precision-doctor app report.json` (or
`streamlit run app/streamlit_app.py -- report.json`). It only reads a saved report and never
reruns the analysis.

Unit names come from user models and may contain HTML or markdown: they are shown only in
dataframe cells, st.text, widget options or escaped markdown (st.table's cells are markdown:
escaped too), never with unsafe_allow_html.

Streamlit runs this file as `__main__`; importing it (doctest collection, a test) only
defines the functions.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import streamlit as st

from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.extras import Fp8Section, LossScaleSection, MonitorSection, PlanSection, PreflightSection
from precision_doctor.options import LowDtype
from precision_doctor.report import Report, Unit
from precision_doctor.views import figures
from precision_doctor.views.fp8 import (
    fp8_exclusion_rows,
    fp8_figure,
    fp8_gemm_rows,
    fp8_layer_rows,
    fp8_recipe_layer_rows,
    fp8_recipe_loss_rows,
    fp8_role_rows,
    fp8_scaling_rows,
    fp8_summary_lines,
)
from precision_doctor.views.launcher import ENV_VAR

NO_FLAG = "(no flag)"
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:&=\"'])")


def md(text: str) -> str:
    """Escape text for st.markdown-like calls: shown literally, never interpreted."""
    return _MD_SPECIAL.sub(r"\\\1", text)


def report_path(argv: Sequence[str], environ: Mapping[str, str]) -> str | None:
    """The report to show: the first script argument (after `--`), else the env variable."""
    args = [a for a in argv[1:] if a]
    if args:
        return args[0]
    return environ.get(ENV_VAR) or None


@st.cache_resource(max_entries=4, show_spinner=False)
def _load_cached(path: str, mtime_ns: int, size: int) -> Report:
    # mtime and size are in the key so a rewritten report is reloaded; errors are not cached.
    return Report.load(path)


def load_report(path: str) -> Report:
    p = Path(path)
    try:
        st_ = p.stat()
    except FileNotFoundError:
        raise PrecisionDoctorError(f"report {p} does not exist") from None
    except OSError as e:
        raise PrecisionDoctorError(f"report {p} cannot be read: {e}") from None
    if p.is_dir():
        raise PrecisionDoctorError(f"report {p} is a directory, not a JSON report")
    return _load_cached(str(p), st_.st_mtime_ns, st_.st_size)


def _df(rows: list[dict[str, Any]]) -> Any:
    import pandas as pd

    return pd.DataFrame(rows)


def _chart(fig: Any, key: str) -> None:
    # theme=None: the figure's own template (figures.TEMPLATE_LAYOUT, as in the HTML report),
    # not Streamlit's restyling.
    st.plotly_chart(fig, width="stretch", theme=None, key=key, config={"displaylogo": False})


def _kv_table(items: Sequence[tuple[str, str]]) -> None:
    """Label/value pairs as a table: every value in full (wrapped, never cut short)."""
    st.table(_df([{"": md(k), "value": md(v)} for k, v in items]).set_index(""))


def _text_width(values: Sequence[object], header: str, *, cap: int = 640) -> int:
    """A column's width in pixels that shows its longest value and its header whole (the
    grid's 14 px font: under 6.5 px a lowercase character, under 10 px an uppercase one)."""

    def px(text: str) -> float:
        return sum(10 if c.isupper() or c in "MW@%" else 6.5 for c in text)

    return min(cap, 28 + math.ceil(max([px(header), *(px(str(v)) for v in values)])))


def _table_height(rows: int) -> int:
    """Every row of a table up to ~20, then a scroll bar."""
    return min(35 * (rows + 1) + 3, 35 * 21 + 3)


# --- sections ----------------------------------------------------------------------------------
def overview(report: Report, plan: PlanSection | None) -> None:
    items = figures.overview_items(report, plan)
    half = (len(items) + 1) // 2
    c1, c2 = st.columns(2)
    with c1:
        _kv_table(items[:half])
    with c2:
        _kv_table(items[half:])
    counts = figures.flag_counts(report)
    if counts:
        st.subheader("Flagged units by flag")
        st.dataframe(_df([{"flag": k, "units": v} for k, v in counts.items()]), hide_index=True, width="content")
        st.subheader("Flags, worst first")
        flags = figures.flag_rows(report)
        st.dataframe(
            _df(flags),
            hide_index=True,
            height=_table_height(len(flags)),
            column_config={
                "unit": st.column_config.TextColumn(width=_text_width([r["unit"] for r in flags], "unit", cap=360)),
                "evidence": st.column_config.TextColumn(width="large"),
            },
        )
    else:
        st.success("No unit flagged.")
    if report.ranks:
        st.subheader("Ranks")
        st.caption(
            md(
                f"{figures.distributed_text(report)}: the units and flags combine every rank's statistics; "
                "here each rank is judged on its own."
            )
        )
        st.dataframe(_df(figures.rank_rows(report)), hide_index=True)


LAYER_COLUMNS: dict[str, tuple[str, str, str]] = {
    # row key: (header shown, number format, what it is)
    "max |x|": ("max |x|", "%.3g", "largest |value| of the unit's forward outputs (fp32 run)"),
    "overflow frac": ("overflow", "%.3g", "fraction of the forward outputs that overflow the low dtype"),
    "underflow frac": ("underflow", "%.3g", "fraction of the nonzero forward outputs that flush to 0"),
    "local rel err": ("local err", "%.3g", "relative L2 error of the unit run low on fp32 inputs"),
    "propagated rel err": ("prop. err", "%.3g", "relative L2 error with everything before it low too"),
    "SQNR dB": ("SQNR dB", "%.1f", "signal-to-quantization-noise ratio of the propagated output (inf: exact)"),
    "max |grad|": ("max |grad|", "%.3g", "largest |gradient| in the unit's backward"),
    "grad rel err": ("grad err", "%.3g", "relative L2 error of its parameters' gradients against fp32's"),
    "grad cosine": ("grad cos", "%.6g", "cosine of its parameters' gradients with fp32's"),
    "GFLOP fwd": ("GFLOP", "%.3g", "forward GFLOP"),
    "activation MiB": ("act. MiB", "%.3g", "activations saved for backward, MiB"),
}
# (The layer table's number columns: short headers so that every column fits a wide page. A
# comment, not a docstring: Streamlit's "magic" would print a bare string.)


def layer_table(report: Report, plan: PlanSection | None) -> None:
    every = figures.layer_rows(report, plan)  # column widths from every row: stable while filtering
    rows = every
    present = list(figures.flag_counts(report))
    severities = list(dict.fromkeys(f.severity.value for f in report.flags()))
    c1, c2, c3 = st.columns([2, 1, 2])
    chosen = c1.multiselect(
        "Filter by flag", [*present, NO_FLAG], key="flag_filter", help="Show only units with any of these flags."
    )
    levels = c2.multiselect(
        "Filter by severity",
        severities,
        key="severity_filter",
        help="Show only units with a finding of any of these severities.",
    )
    needle = c3.text_input("Filter by name", key="name_filter", placeholder="substring of the unit name")
    if chosen:
        want = set(chosen)
        rows = [
            r
            for r in rows
            if (want & set(filter(None, r["flags"].split(", ")))) or (NO_FLAG in want and not r["flags"])
        ]
    if levels:
        keep = {u.name for u in report.units if any(f.severity.value in levels for f in u.flags)}
        rows = [r for r in rows if r["unit"] in keep]
    if needle:
        rows = [r for r in rows if needle.lower() in r["unit"].lower()]
    st.caption(f"{len(rows)} of {len(report.units)} units; click a column header to sort.")
    if rows:
        config: dict[str, Any] = {
            c: st.column_config.NumberColumn(label, format=f, help=h) for c, (label, f, h) in LAYER_COLUMNS.items()
        }
        for col, cap in (("unit", 420), ("kind", 200), ("flags", 640)):
            config[col] = st.column_config.TextColumn(width=_text_width([r[col] for r in every], col, cap=cap))
        st.dataframe(_df(rows), hide_index=True, column_config=config, height=_table_height(len(rows)))


def unit_detail(report: Report) -> None:
    units = figures.ordered_units(report)
    if not units:
        st.info("This report has no units.")
        return
    flagged = report.flagged_units()
    default = units.index(flagged[0]) if flagged else 0
    dtypes = [d.value for d in LowDtype]

    def label(i: int) -> str:
        u = units[i]
        flags = ", ".join(dict.fromkeys(f.flag.value for f in u.flags))
        return f"{u.order}: {u.name}" + (f"  [{flags}]" if flags else "")

    c1, c2 = st.columns([4, 1])
    i = c1.selectbox(
        "Unit (execution order; worst flagged first selected)",
        range(len(units)),
        index=default,
        format_func=label,
        key="unit_pick",
    )
    choice = c2.radio(
        "Histogram range of",
        dtypes,
        index=dtypes.index(report.environment.dtype.value),
        key="range_dtype",
        horizontal=True,
        help="The format whose representable range the histograms show.",
    )
    dtype = LowDtype(choice or report.environment.dtype.value)
    unit: Unit = units[i if i is not None else default]
    st.text(f"{unit.name}  ({unit.kind}), execution order {unit.order}, {unit.op_count} ops")
    if unit.flags:
        st.markdown("**Flags and the op that triggered each**")
        st.dataframe(_df(figures.flag_rows(report, unit)), hide_index=True)
    st.markdown("**Local error (fed fp32 inputs) against propagated error (everything low)**")
    st.dataframe(_df(figures.error_rows(unit)), hide_index=True, width="content")
    if unit.backward.param_grad_fidelity:
        st.markdown("**Parameter gradients in the low run against fp32's**")
        st.dataframe(_df(figures.grad_fidelity_rows(unit)), hide_index=True, width="content")
    c1, c2 = st.columns(2)
    with c1:
        if unit.forward.stats is not None:
            _chart(figures.histogram_figure(unit.forward.stats, dtype, f"{unit.name}: forward"), f"hist_fwd_{i}")
        else:
            st.info("No forward statistics for this unit.")
    with c2:
        if unit.backward.stats is not None:
            _chart(figures.histogram_figure(unit.backward.stats, dtype, f"{unit.name}: gradient"), f"hist_grad_{i}")
        else:
            st.info("No gradient statistics for this unit.")
    if unit.ops:
        with st.expander("Ops in this unit"):
            st.dataframe(_df([o.model_dump(mode="json") for o in unit.ops]), hide_index=True)


def depth(report: Report) -> None:
    start = figures.takeoff_unit(report)
    if start is not None:
        st.text(f"Error takes off at {start.name} (execution order {start.order}).")
    else:
        st.text("Propagated error stays under the divergence threshold through the whole model.")
    _chart(figures.depth_figure(report), "depth")


def gradients(report: Report) -> None:
    text = figures.grad_fidelity_text(report)
    if text is None:
        st.info("No parameter-gradient comparison in this report.")
        return
    st.text(text)
    _chart(figures.grad_fidelity_figure(report), "grad_fidelity")
    rows = [
        {
            "unit": name,
            "rel L2 error": f.rel_l2_error,
            "cosine": f.cosine,
            "non-finite": f.nonfinite_count,
            "values": f.numel,
        }
        for name, f in report.grad_fidelity_by_unit().items()
    ]
    st.markdown("**Units, worst first**")
    st.dataframe(
        _df(rows),
        hide_index=True,
        height=_table_height(len(rows)),
        column_config={
            "unit": st.column_config.TextColumn(width=_text_width([r["unit"] for r in rows], "unit", cap=420)),
            "rel L2 error": st.column_config.NumberColumn(format="%.3g"),
            "cosine": st.column_config.NumberColumn(format="%.6g"),
        },
    )


def optimizer_step(report: Report) -> None:
    """The optimizer step with low-precision weights against fp32's, per unit (a table)."""
    text = figures.optimizer_step_text(report)
    if text is None:
        return
    st.markdown("**Optimizer step**")
    st.text(text)
    rows = figures.optimizer_step_rows(report)
    st.dataframe(_df(rows), hide_index=True, height=_table_height(len(rows)))


def loss_scale(report: Report, ls: LossScaleSection | None) -> None:
    if ls is not None:
        run = figures.recommendation_run(report)
        c1, c2 = st.columns([1, 3])
        c1.metric(f"Recommended initial scale ({run})", f"2^{ls.recommended_scale_log2}")
        c1.metric("Default scale", f"2^{ls.default_scale_log2}")
        with c2:
            if run == figures.ALL_LOW_RUN:
                st.markdown(
                    md(f"The recommendation and the curve below both read the {run}'s gradients (every unit low).")
                )
            else:
                st.markdown(
                    md(
                        f"Each number in the column of the run it describes: the recommendation "
                        f"reads the {run}'s gradients (its low units only); the curve below is "
                        f"the {figures.ALL_LOW_RUN}'s (every unit low)."
                    )
                )
            rows = figures.loss_scale_rows(report, ls)
            st.table(_df([{k: md(v) for k, v in r.items()} for r in rows]).set_index(""))
    else:
        st.info(
            "No loss-scale recommendation in this report; the curve is the all-low run's, with the 2^16 default marked."
        )
    if report.loss_scale:
        _chart(figures.loss_scale_figure(report, ls), "loss_scale")
    else:
        st.info("No gradient statistics in this report.")


def training_section(pre: PreflightSection | None, mon: MonitorSection | None) -> None:
    if pre is not None:
        (st.success if pre.go else st.error)(md(figures.preflight_verdict(pre)))
        if pre.reasons:
            st.dataframe(_df([r.model_dump() for r in pre.reasons]), hide_index=True)
        st.dataframe(_df(figures.preflight_run_rows(pre)), hide_index=True)
        if pre.fp8_scaling is not None:
            st.markdown(
                f"**fp8 delayed scaling, modelled** ({md(pre.fp8_scaling.recipe)}; the "
                f"{md(pre.fp8_scaling.run)} run's fp8 layers)"
            )
            st.dataframe(_df(fp8_scaling_rows(pre.fp8_scaling)), hide_index=True)
    if mon is not None:
        st.markdown("**The real run's GradScaler**")
        _kv_table(list(figures.monitor_items(mon).items()))
    _chart(figures.training_figure(pre, mon), "training")


def plan_section(plan: PlanSection) -> None:
    n32 = sum(1 for d in plan.units.values() if d == "fp32")
    st.text(f"Target {plan.target}, low dtype {plan.dtype}: {n32} of {len(plan.units)} units stay fp32.")
    st.markdown("**Units kept in fp32, and why**")
    if plan.fp32_units:
        st.dataframe(_df([r.model_dump() for r in plan.fp32_units]), hide_index=True)
    else:
        st.text("none")
    st.markdown("**Cost**")
    st.dataframe(_df(figures.plan_cost_rows(plan)), hide_index=True, width="content")
    _chart(figures.plan_cost_figure(plan), "plan_cost")
    _kv_table(
        [
            ("verified final-loss rel error (planned run)", figures.fmt(plan.verified_loss_rel_error, ".2e")),
            ("verification passes", str(plan.verification_passes)),
        ]
    )
    if plan.exports:
        st.markdown("**Exports**")
        cols = st.columns(max(1, len(plan.exports)))
        for col, (name, text) in zip(cols, plan.exports.items(), strict=False):
            fname, mime = figures.export_file(name)
            col.download_button(
                f"Download {md(name.value)}", text, file_name=fname, mime=mime, key=f"export_{name.value}"
            )


# --- page --------------------------------------------------------------------------------------
def get_report() -> Report:
    path = report_path(sys.argv, os.environ)
    if path is not None:
        return load_report(path)
    upload = st.file_uploader("No report given: upload a precision-doctor report JSON", type=["json"])
    if upload is None:
        st.info("Start with `precision-doctor app report.json`, or upload a report above.")
        st.stop()
    try:
        text = upload.getvalue().decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrecisionDoctorError(f"{upload.name} is not UTF-8 text: {e}") from None
    return Report.from_json(text, source=upload.name)


def fp8_tab(report: Report, section: Fp8Section) -> None:
    """The fp8 run: summary, the conventional exclusions judged, each layer's casts per role
    (table and figure), each matmul's SQNR per recipe, each cast's statistics, and the recipe
    comparison where there is one."""
    st.text("\n".join(fp8_summary_lines(report)))
    st.subheader("Conventional exclusions, judged on this model")
    st.dataframe(_df(fp8_exclusion_rows(section)), hide_index=True)
    st.subheader("Per layer and role")
    st.dataframe(_df(fp8_role_rows(section)), hide_index=True)
    _chart(fp8_figure(section), "fp8-figure")
    st.subheader("Matmuls per recipe (SQNR, dB)")
    st.dataframe(_df(fp8_gemm_rows(section)), hide_index=True)
    st.subheader("Casts")
    st.dataframe(_df(fp8_layer_rows(section)), hide_index=True)
    comparison = report.extras.fp8_recipes
    if comparison is not None:
        st.subheader(f"Recipes side by side (fp32 loss {comparison.loss_fp32:.6g})")
        st.dataframe(_df(fp8_recipe_loss_rows(comparison)), hide_index=True)
        st.dataframe(_df(fp8_recipe_layer_rows(comparison)), hide_index=True)


def render(report: Report) -> None:
    extras = report.extras
    plan, ls, pre, mon = extras.plan, extras.loss_scale, extras.preflight, extras.scaler_monitor

    st.title(f"precision-doctor: {md(report.model)}")
    stale = report.version_warning()
    if stale is not None:
        st.warning(md(stale))
    (st.success if report else st.error)(md(report.verdict))
    if (bf16 := extras.bf16_check) is not None:
        (st.info if bf16.safe else st.warning)(md(f"Checked in bf16 too: {bf16.verdict}"))
    st.caption("This app only reads the saved report; it never reruns the analysis.")

    training = pre is not None or mon is not None
    names = ["Overview", "Layers", "Unit detail", "Depth", "Gradients", "Loss scale"] + (["Plan"] if plan else [])
    names += ["fp8"] if extras.fp8 is not None else []
    names += ["Training"] if training else []
    tabs = st.tabs(names)
    with tabs[0]:
        overview(report, plan)
    with tabs[1]:
        layer_table(report, plan)
    with tabs[2]:
        unit_detail(report)
    with tabs[3]:
        depth(report)
    with tabs[4]:
        gradients(report)
        optimizer_step(report)
    with tabs[5]:
        loss_scale(report, ls)
    if plan is not None:
        with tabs[6]:
            plan_section(plan)
    if extras.fp8 is not None:
        with tabs[names.index("fp8")]:
            fp8_tab(report, extras.fp8)
    if training:
        with tabs[-1]:
            training_section(pre, mon)


# Wide tables and per-unit figures: a narrower margin than Streamlit's wide layout keeps.
# Constant CSS (no report text), so st.html is safe here.
_PAGE_CSS = """<style>
[data-testid="stMainBlockContainer"], .block-container { padding-left: 1.5rem; padding-right: 1.5rem;
  max-width: 100%; }
</style>"""


def main() -> None:
    st.set_page_config(page_title="precision-doctor", layout="wide", initial_sidebar_state="collapsed")
    st.html(_PAGE_CSS)
    try:
        report = get_report()
    except PrecisionDoctorError as e:
        st.error(md(str(e)))
        st.stop()
    try:
        render(report)
    except Exception as e:  # a page, never a traceback, even on our own bug
        st.error(
            md(
                f"precision-doctor could not render this report (internal error, please report): "
                f"{type(e).__name__}: {e}"
            )
        )


if __name__ == "__main__":
    main()
