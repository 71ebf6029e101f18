"""The interactive report: `precision-doctor app report.json` (or
`streamlit run app/streamlit_app.py -- report.json`). It only reads a saved report and never
reruns the analysis.

Unit names come from user models and may contain HTML or markdown: they are shown only in
dataframe cells, st.text, widget options or escaped markdown, never with unsafe_allow_html.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import streamlit as st

import precision_doctor.views.figures as F
from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.extras import LossScaleSection, MonitorSection, PlanSection, PreflightSection
from precision_doctor.options import LowDtype
from precision_doctor.report import Report, Unit

ENV_VAR = "PRECISION_DOCTOR_REPORT"
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
    st.plotly_chart(fig, width="stretch", key=key, config={"displaylogo": False})


# --- sections ----------------------------------------------------------------------------------
def overview(report: Report, plan: PlanSection | None) -> None:
    items = F.overview_items(report, plan)
    for row in range(0, len(items), 4):
        cols = st.columns(4)
        for col, (label, value) in zip(cols, items[row : row + 4], strict=False):
            col.metric(md(label), value)  # metric values are plain text
    counts = F.flag_counts(report)
    if counts:
        st.subheader("Flagged units by flag")
        st.dataframe(_df([{"flag": k, "units": v} for k, v in counts.items()]), hide_index=True, width="content")
        st.subheader("Flags, worst first")
        st.dataframe(_df(F.flag_rows(report)), hide_index=True)
    else:
        st.success("No unit flagged.")
    if report.ranks:
        st.subheader("Ranks")
        st.caption(md(f"{F.distributed_text(report)}: the units and flags combine every rank's statistics; "
                      "here each rank is judged on its own."))
        st.dataframe(_df(F.rank_rows(report)), hide_index=True)


def layer_table(report: Report, plan: PlanSection | None) -> None:
    rows = F.layer_rows(report, plan)
    present = list(F.flag_counts(report))
    c1, c2 = st.columns([2, 1])
    chosen = c1.multiselect("Filter by flag", [*present, NO_FLAG], key="flag_filter",
                            help="Show only units with any of these flags.")
    needle = c2.text_input("Filter by name", key="name_filter", placeholder="substring of the unit name")
    if chosen:
        want = set(chosen)
        rows = [r for r in rows if (want & set(filter(None, r["flags"].split(", "))))
                or (NO_FLAG in want and not r["flags"])]
    if needle:
        rows = [r for r in rows if needle.lower() in r["unit"].lower()]
    st.caption(f"{len(rows)} of {len(report.units)} units; click a column header to sort.")
    if rows:
        st.dataframe(_df(rows), hide_index=True, column_config={
            "max |x|": st.column_config.NumberColumn(format="%.3g"),
            "overflow frac": st.column_config.NumberColumn(format="%.3g"),
            "underflow frac": st.column_config.NumberColumn(format="%.3g"),
            "local rel err": st.column_config.NumberColumn(format="%.3g"),
            "propagated rel err": st.column_config.NumberColumn(format="%.3g"),
            "SQNR dB": st.column_config.NumberColumn(format="%.1f"),
            "max |grad|": st.column_config.NumberColumn(format="%.3g"),
            "grad rel err": st.column_config.NumberColumn(format="%.3g"),
            "grad cosine": st.column_config.NumberColumn(format="%.6g"),
            "GFLOP fwd": st.column_config.NumberColumn(format="%.3g"),
            "activation MiB": st.column_config.NumberColumn(format="%.3g"),
        })


def unit_detail(report: Report, dtype: LowDtype) -> None:
    units = F.ordered_units(report)
    if not units:
        st.info("This report has no units.")
        return
    flagged = report.flagged_units()
    default = units.index(flagged[0]) if flagged else 0

    def label(i: int) -> str:
        u = units[i]
        flags = ", ".join(dict.fromkeys(f.flag.value for f in u.flags))
        return f"{u.order}: {u.name}" + (f"  [{flags}]" if flags else "")

    i = st.selectbox("Unit (execution order; worst flagged first selected)", range(len(units)),
                     index=default, format_func=label, key="unit_pick")
    unit: Unit = units[i if i is not None else default]
    st.text(f"{unit.name}  ({unit.kind}), execution order {unit.order}, {unit.op_count} ops")
    if unit.flags:
        st.markdown("**Flags and the op that triggered each**")
        st.dataframe(_df(F.flag_rows(report, unit)), hide_index=True)
    st.markdown("**Local error (fed fp32 inputs) against propagated error (everything low)**")
    st.dataframe(_df(F.error_rows(unit)), hide_index=True, width="content")
    if unit.backward.param_grad_fidelity:
        st.markdown("**Parameter gradients in the low run against fp32's**")
        st.dataframe(_df(F.grad_fidelity_rows(unit)), hide_index=True, width="content")
    c1, c2 = st.columns(2)
    with c1:
        if unit.forward.stats is not None:
            _chart(F.histogram_figure(unit.forward.stats, dtype, f"{unit.name}: forward"), f"hist_fwd_{i}")
        else:
            st.info("No forward statistics for this unit.")
    with c2:
        if unit.backward.stats is not None:
            _chart(F.histogram_figure(unit.backward.stats, dtype, f"{unit.name}: gradient"), f"hist_grad_{i}")
        else:
            st.info("No gradient statistics for this unit.")
    if unit.ops:
        with st.expander("Ops in this unit"):
            st.dataframe(_df([o.model_dump(mode="json") for o in unit.ops]), hide_index=True)


def depth(report: Report) -> None:
    start = F.takeoff_unit(report)
    if start is not None:
        st.text(f"Error takes off at {start.name} (execution order {start.order}).")
    else:
        st.text("Propagated error stays under the divergence threshold through the whole model.")
    _chart(F.depth_figure(report), "depth")


def gradients(report: Report) -> None:
    text = F.grad_fidelity_text(report)
    if text is None:
        st.info("No parameter-gradient comparison in this report.")
        return
    st.text(text)
    _chart(F.grad_fidelity_figure(report), "grad_fidelity")
    rows = [{"unit": name, "rel L2 error": f.rel_l2_error, "cosine": f.cosine, "non-finite": f.nonfinite_count,
             "values": f.numel} for name, f in report.grad_fidelity_by_unit().items()]
    st.markdown("**Units, worst first**")
    st.dataframe(_df(rows), hide_index=True, column_config={
        "rel L2 error": st.column_config.NumberColumn(format="%.3g"),
        "cosine": st.column_config.NumberColumn(format="%.6g"),
    })


def loss_scale(report: Report, ls: LossScaleSection | None) -> None:
    if ls is not None:
        cols = st.columns(4)
        cols[0].metric("Recommended initial scale", f"2^{ls.recommended_scale_log2}")
        cols[1].metric("Default scale", f"2^{ls.default_scale_log2}")
        cols[2].metric("Underflow at recommended", F.fmt(ls.underflow_fraction_at_recommended))
        cols[3].metric("Underflow at default", F.fmt(ls.underflow_fraction_at_default))
        cols = st.columns(4)
        cols[0].metric("Steps skipped from the default", str(ls.skipped_steps_from_default))
        cols[1].metric("GradScaler needed", "yes" if ls.scaler_needed else "no")
    else:
        st.info("No loss-scale recommendation in this report; the curve is shown with the 2^16 default.")
    if report.loss_scale:
        _chart(F.loss_scale_figure(report, ls), "loss_scale")
    else:
        st.info("No gradient statistics in this report.")


def training_section(pre: PreflightSection | None, mon: MonitorSection | None) -> None:
    if pre is not None:
        (st.success if pre.go else st.error)(md(F.preflight_verdict(pre)))
        if pre.reasons:
            st.dataframe(_df([r.model_dump() for r in pre.reasons]), hide_index=True)
        st.dataframe(_df(F.preflight_run_rows(pre)), hide_index=True)
    if mon is not None:
        st.markdown("**The real run's GradScaler**")
        items = F.monitor_items(mon)
        for col, (name, value) in zip(st.columns(len(items)), items.items(), strict=True):
            col.metric(name, value)
    _chart(F.training_figure(pre, mon), "training")


def plan_section(plan: PlanSection) -> None:
    n32 = sum(1 for d in plan.units.values() if d == "fp32")
    st.text(f"Target {plan.target}, low dtype {plan.dtype}: {n32} of {len(plan.units)} units stay fp32.")
    st.markdown("**Units kept in fp32, and why**")
    if plan.fp32_units:
        st.dataframe(_df([r.model_dump() for r in plan.fp32_units]), hide_index=True)
    else:
        st.text("none")
    st.markdown("**Cost**")
    st.dataframe(_df(F.plan_cost_rows(plan)), hide_index=True, width="content")
    _chart(F.plan_cost_figure(plan), "plan_cost")
    st.metric("Verified final-loss error", F.fmt(plan.verified_loss_rel_error, ".2e"),
              help=f"{plan.verification_passes} verification pass(es)")
    if plan.exports:
        st.markdown("**Exports**")
        cols = st.columns(max(1, len(plan.exports)))
        for col, (name, text) in zip(cols, plan.exports.items(), strict=False):
            fname, mime = F.export_file(name)
            col.download_button(f"Download {md(name.value)}", text, file_name=fname, mime=mime, key=f"export_{name.value}")


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


def render(report: Report) -> None:
    extras = report.extras
    plan, ls, pre, mon = extras.plan, extras.loss_scale, extras.preflight, extras.scaler_monitor

    st.title(f"precision-doctor: {md(report.model)}")
    (st.success if report else st.error)(md(report.verdict))
    with st.sidebar:
        dtypes = [d.value for d in LowDtype]
        choice = st.radio("Histogram range of", dtypes, index=dtypes.index(report.environment.dtype.value),
                          key="range_dtype", help="The format whose representable range the histograms show.")
        dtype = LowDtype(choice or report.environment.dtype.value)
        st.caption("This app only reads the saved report; it never reruns the analysis.")

    training = pre is not None or mon is not None
    names = ["Overview", "Layers", "Unit detail", "Depth", "Gradients", "Loss scale"] + (["Plan"] if plan else [])
    names += ["Training"] if training else []
    tabs = st.tabs(names)
    with tabs[0]:
        overview(report, plan)
    with tabs[1]:
        layer_table(report, plan)
    with tabs[2]:
        unit_detail(report, dtype)
    with tabs[3]:
        depth(report)
    with tabs[4]:
        gradients(report)
    with tabs[5]:
        loss_scale(report, ls)
    if plan is not None:
        with tabs[6]:
            plan_section(plan)
    if training:
        with tabs[-1]:
            training_section(pre, mon)


def main() -> None:
    st.set_page_config(page_title="precision-doctor", layout="wide")
    try:
        report = get_report()
    except PrecisionDoctorError as e:
        st.error(md(str(e)))
        st.stop()
    try:
        render(report)
    except Exception as e:  # a page, never a traceback, even on our own bug
        st.error(md(f"precision-doctor could not render this report (internal error, please report): "
                    f"{type(e).__name__}: {e}"))


main()
