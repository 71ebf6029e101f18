"""The standalone HTML report and the figure builders it shares with the app."""

from __future__ import annotations

import html
import json
import math
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

import precision_doctor as pd
from precision_doctor.extras import MonitorSection, ReportExtras
from precision_doctor.formats import BF16, FP16
from precision_doctor.report import Report
from precision_doctor.views import figures
from precision_doctor.views.html_report import render_html, write_html

EVIL = '<img src=x onerror="__pwned=1">'


@pytest.fixture(scope="module")
def faulty() -> Report:
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            [
                ("inp", nn.Linear(16, 32)),
                ("act", nn.ReLU()),
                (EVIL, nn.Linear(32, 32)),
                ("out", nn.Linear(32, 4)),
            ]
        )
    )
    with torch.no_grad():
        model[2].weight.mul_(1e5)
    report = pd.analyze(model, torch.randn(8, 16), loss_fn=lambda o, b: o.pow(2).mean(), name="faulty<b>")
    return report.with_extras(
        **{
            "loss_scale": {
                "recommended_scale_log2": 9,
                "default_scale_log2": 16,
                "underflow_fraction_at_recommended": 0.0,
                "underflow_fraction_at_default": 0.0,
                "skipped_steps_from_default": 7,
                "scaler_needed": True,
            },
            "plan": {
                "target": "a100",
                "dtype": "fp16",
                "units": {u.name: "fp32" for u in report.units},
                "fp32_units": [{"unit": EVIL, "reason": "OVERFLOW at addmm"}],
                "estimated_step_time_s": {"fp32": 0.1, "autocast": 0.05, "plan": 0.08},
                "activation_bytes": {"fp32": 2048, "autocast": 1024, "plan": 1536},
                "verified_loss_rel_error": 1e-4,
                "verification_passes": 2,
                "exports": {"json": "{}", "python": "PLAN = {'<b>': 1}\n", "deepspeed": "{}", "hf": "{}"},
            },
        }
    )


@pytest.fixture(scope="module")
def healthy() -> Report:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    return pd.analyze(net, torch.randn(4, 8), loss_fn=lambda o, b: o.pow(2).mean())


def test_standalone_html(faulty: Report, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "report.html"
    write_html(faulty, path)
    text = path.read_text(encoding="utf-8")
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # atomic: no temp left behind
    assert text.startswith("<!DOCTYPE html>")
    # plotly.js embedded once, nothing loaded from elsewhere. (Plain booleans below: pytest
    # would otherwise diff the half megabyte of plotly.js on a failure.)
    external = re.search(r"<(script|link|img)[^>]*\b(src|href)=", text) is not None
    assert not external
    assert text.count('class="pd-fig"') >= 4 and text.count('id="pd-plotly"') == 1
    # The verdict, escaped; the recommended scale and the plan's exports.
    has_verdict = html.escape(faulty.verdict) in text
    assert has_verdict
    page = text.split('id="pd-plotly"')[0]  # all but plotly.js
    has_scale = "Recommended initial loss scale: 2^9" in page
    assert has_scale
    for name in ("precision_plan.json", "precision_plan.py", "ds_config.json", "hf_precision.json"):
        has_export = f'download="{name}"' in page
        assert has_export
    # Names and other report strings never become markup: not in the page's markup, and not in
    # the figures' data (plotly draws a subset of HTML in its text).
    markup = re.sub(r"<script[^>]*>.*?</script>", "", text, flags=re.S)
    figures = "".join(
        re.findall(r'<script type="application/json" class="pd-fig"[^>]*>(.*?)</script>', text, flags=re.S)
    )
    assert figures
    raw_in_markup = EVIL in markup or "<b>" in markup
    raw_in_figures = EVIL in figures or "<b>" in figures
    assert not raw_in_markup and not raw_in_figures
    assert html.escape(EVIL) in markup and "faulty&lt;b&gt;" in markup


def test_html_without_extras(healthy: Report) -> None:
    text = render_html(healthy)
    assert healthy.verdict in text
    assert "<h2>Plan</h2>" not in text and "Recommended initial loss scale" not in text


def test_malformed_extras_do_not_load(healthy: Report, tmp_path: Path) -> None:
    """Extras are typed: a section that does not fit is a one-line error naming the field,
    when a report is loaded and when a section is set; never a page half rendered."""
    raw = json.loads(healthy.to_json())
    run = {"mode": "low", "description": "d", "steps": [{"loss": None}]}
    for key, section in [
        ("plan", [1, 2]),
        ("preflight", {"go": True, "judge": "low", "steps": 1, "runs": {"low": run}}),
        ("scaler_monitor", {"steps": 3, "current_scale": 2.0, "prediction": {"skipped_steps": 4}}),
    ]:
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps({**raw, "extras": {key: section}}))
        with pytest.raises(pd.PrecisionDoctorError) as info:
            Report.load(path)
        assert "\n" not in str(info.value) and f"at extras.{key}" in str(info.value), str(info.value)
        with pytest.raises(pd.PrecisionDoctorError, match=f"report extras at {key}"):
            healthy.with_extras(**{key: section})
    odd = MonitorSection(
        enabled=True,
        init_scale=1.0,
        growth_factor=2.0,
        backoff_factor=0.5,
        growth_interval=2,
        steps=3,
        current_scale=-1.0,
        scale_history=[(0, -1.0)],
        skipped_steps=[1],
        skipped_count=1,
    )
    assert 'id="training"' in render_html(healthy.with_extras(scaler_monitor=odd))  # no log2 of a negative


def test_histogram_against_dtype_range(faulty: Report) -> None:
    unit = faulty.by_module()[EVIL]
    stats = unit.forward.stats
    assert stats is not None
    fig = figures.histogram_figure(stats, "fp16", unit.name)
    bar = fig.data[0]
    h = stats.histogram
    # counts[i] is floor(log2|x|) = log2_lo + i: bars sit on [lo+i, lo+i+1).
    assert list(bar.x) == [h.log2_lo + i + 0.5 for i in range(len(h.counts))]
    assert list(bar.y) == h.counts
    rects = [s for s in fig.layout.shapes if s.type == "rect"]
    assert any(math.isclose(s.x0, FP16.max_log2) for s in rects)  # overflow region
    assert any(
        math.isclose(s.x0, math.log2(FP16.smallest_subnormal)) and math.isclose(s.x1, math.log2(FP16.smallest_normal))
        for s in rects
    )  # subnormal band
    assert EVIL not in fig.layout.title.text
    bf = figures.histogram_figure(stats, pd.LowDtype.BF16, unit.name)
    assert any(math.isclose(s.x0, BF16.max_log2) for s in bf.layout.shapes if s.type == "rect")


def test_depth_view_marks_takeoff(faulty: Report, healthy: Report) -> None:
    start = figures.takeoff_unit(faulty)
    assert start is not None and start.name == EVIL
    fig = figures.depth_figure(faulty)
    order = sorted(faulty.units, key=lambda u: u.order)
    prop = fig.data[0]
    assert len(prop.x) == len(order)
    lines = [s for s in fig.layout.shapes if s.type == "line" and s.x0 == s.x1]
    assert {s.x0 for s in lines} == {order.index(start)}  # on both panels
    # Non-finite errors are drawn as markers at a cap, never dropped silently.
    nonfinite = next(t for t in fig.data if t.name == figures.NONFINITE)
    assert sum(v is not None for v in nonfinite.y) == sum(
        1 for u in order if u.forward.propagated and not math.isfinite(u.forward.propagated.rel_l2_error)
    )
    assert figures.takeoff_unit(healthy) is None


def test_loss_scale_curve_marks_default_and_recommended(faulty: Report) -> None:
    ls = faulty.extras.loss_scale
    assert ls is not None
    fig = figures.loss_scale_figure(faulty, ls)
    xs = sorted(s.x0 for s in fig.layout.shapes if s.type == "line")
    assert xs == [9, 16]
    assert list(fig.data[0].x) == [p.scale_log2 for p in faulty.loss_scale]
    assert [s.x0 for s in figures.loss_scale_figure(faulty).layout.shapes] == [16]


def test_overview_and_rows(faulty: Report) -> None:
    plan = faulty.extras.plan
    assert plan is not None and plan.speedup == pytest.approx(1.25) and plan.memory_saving == pytest.approx(0.25)
    items = dict(figures.overview_items(faulty, plan))
    assert items["capture path"] == faulty.environment.capture_path.value
    assert items["plan speed-up (est.)"] == "1.25x"
    counts = figures.flag_counts(faulty)
    assert sum(counts.values()) == sum(len({f.flag for f in u.flags}) for u in faulty.units)
    rows = figures.layer_rows(faulty, plan)
    assert [r["unit"] for r in rows] == [u.name for u in sorted(faulty.units, key=lambda u: u.order)]
    assert all(r["plan dtype"] == "fp32" for r in rows)


def test_training_section_shows_preflight_and_monitor(tmp_path: Path) -> None:
    """A report annotated by a real pre-flight and a real GradScaler monitor: the verdict,
    each run, and the real run's skipped steps against the prediction."""
    from .fixtures import trained_report

    report = trained_report()
    text = render_html(report)
    assert 'id="training"' in text and 'id="preflight"' in text
    pre = report.extras.preflight
    assert pre is not None
    assert ("Pre-flight: GO" if pre.go else "Pre-flight: NO-GO") in text
    for run in pre.runs.values():
        assert html.escape(run.description) in text
    # 5 real steps, 2 skipped, the scale halved twice from 2^16; the pre-flight predicted none
    assert "<tr><td>5</td><td>2</td><td>2^14</td><td>0 in 2 steps</td><td>go</td></tr>" in text
    plain = render_html(report.model_copy(update={"extras": ReportExtras()}))
    assert 'id="training"' not in plain


def test_a_distributed_jobs_ranks_section(faulty: Report, healthy: Report) -> None:
    from .fixtures import as_job_report

    job = as_job_report(faulty)
    text = render_html(job)
    section = text[text.index('<h2 id="ranks">') : text.index("<h2>Layers</h2>")]
    assert "2 ranks (gloo, ddp, mesh 2)" in section
    rows = re.findall(r"<tr>(.*?)</tr>", section.split("<tbody>")[1])
    assert len(rows) == 2  # one per rank
    assert ">none<" in rows[0] and "OVERFLOW at " + html.escape(EVIL) in rows[1]  # escaped, as data
    assert EVIL not in section
    assert dict(figures.overview_items(job))["distributed"] == "2 ranks (gloo, ddp, mesh 2)"
    assert 'id="ranks"' not in render_html(healthy)  # one process: no section


def test_gradient_fidelity_view(faulty: Report, healthy: Report) -> None:
    """The Gradients section: the model-wide line, a bar per unit with parameters (its
    relative L2 error, execution order) and its cosine, both thresholds drawn; non-finite
    errors as markers; per-parameter tables in the unit detail."""
    g = healthy.grad_fidelity
    assert g is not None
    line = figures.grad_fidelity_text(healthy)
    assert line is not None and f"loss scale 2^{g.scale_log2}" in line and figures.fmt(g.rel_l2_error) in line
    text = render_html(healthy)
    assert f'<p id="grad-fidelity">{html.escape(line)}.</p>' in text
    units = [u for u in sorted(healthy.units, key=lambda u: u.order) if u.backward.grad_fidelity is not None]
    fig = figures.grad_fidelity_figure(healthy)
    bars, _, cosines, _ = fig.data
    assert list(bars.y) == [u.backward.grad_fidelity.rel_l2_error for u in units]  # type: ignore[union-attr]
    assert list(cosines.y) == [u.backward.grad_fidelity.cosine for u in units]  # type: ignore[union-attr]
    assert sorted(s.y0 for s in fig.layout.shapes) == [
        healthy.thresholds.grad_rel_error,
        healthy.thresholds.grad_cosine_min,
    ]
    rows = figures.grad_fidelity_rows(units[0])
    assert [r["parameter"] for r in rows] == list(units[0].backward.param_grad_fidelity)
    assert "Parameter gradients in the low run against fp32" in text
    # The overflowing model's gradients are non-finite: marked at a cap, never dropped.
    marks = next(t for t in figures.grad_fidelity_figure(faulty).data if t.name == figures.NONFINITE)
    nonfinite = [
        u
        for u in sorted(faulty.units, key=lambda u: u.order)
        if u.backward.grad_fidelity is not None and not math.isfinite(u.backward.grad_fidelity.rel_l2_error)
    ]
    assert nonfinite and sum(v is not None for v in marks.y) == len(nonfinite)
    rows = figures.layer_rows(healthy)
    assert [r["grad rel err"] for r in rows] == [
        None if u.backward.grad_fidelity is None else u.backward.grad_fidelity.rel_l2_error
        for u in sorted(healthy.units, key=lambda u: u.order)
    ]


# --- size, width, theme --------------------------------------------------------------------
def plotly_inclusions(text: str) -> int:
    """How many copies of plotly.js the page holds: inline bundles (their banner) and the
    gzipped one (its element)."""
    return text.count("* plotly.js") + text.count('id="pd-plotly"')


def test_small_report_is_small_and_self_contained(healthy: Report, faulty: Report) -> None:
    """Under 1 MB: plotly.js once for the page (the basic bundle, gzipped), each figure its
    JSON; the shared template once, not in every figure."""
    from precision_doctor.views.html_report import PLOTLY_BASIC

    assert PLOTLY_BASIC.is_file()  # shipped with the package (pyproject's package-data)
    for report in (healthy, faulty):
        text = render_html(report)
        size = len(text.encode("utf-8"))
        figures = text.count('class="pd-fig"')
        assert size < 1_000_000, size
        assert figures >= 4 and plotly_inclusions(text) == 1
        assert text.count('"paper_bgcolor"') == 1  # the template, once
        assert "https://" not in text.split('id="pd-plotly"')[0]  # nothing fetched


def test_one_theme_for_app_and_html(faulty: Report) -> None:
    """Every figure is built on figures.TEMPLATE_LAYOUT (the app draws them with
    theme=None); the HTML page gets that same template, white like the app."""
    figs = [
        figures.depth_figure(faulty),
        figures.grad_fidelity_figure(faulty),
        figures.loss_scale_figure(faulty),
        figures.plan_cost_figure(faulty.extras.plan),  # type: ignore[arg-type]
        figures.training_figure(None, None),
    ]
    unit = faulty.units[0]
    assert unit.forward.stats is not None
    figs.append(figures.histogram_figure(unit.forward.stats, "fp16", unit.name))
    for fig in figs:
        assert fig.layout.template.layout.paper_bgcolor == "#ffffff"
        assert fig.layout.template.layout.font.family == figures.FONT
    text = render_html(faulty)
    template = json.loads(
        re.search(r'<script type="application/json" id="pd-template">(.*?)</script>', text, flags=re.S).group(1)
    )  # type: ignore[union-attr]
    assert template == json.loads(json.dumps(figures.TEMPLATE_LAYOUT))
    src = Path(figures.__file__).with_name("streamlit_app.py").read_text()
    assert "theme=None" in src


# --- exact against non-finite ----------------------------------------------------------------
@pytest.fixture(scope="module")
def exact_and_inf() -> Report:
    """A ReLU on small integers (exact in fp16: 0 error, +inf SQNR) before a Linear scaled to
    overflow fp16 (Inf error, -inf SQNR after it)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            [
                ("relu0", nn.ReLU()),
                ("inp", nn.Linear(16, 32)),
                ("big", nn.Linear(32, 32)),
                ("out", nn.Linear(32, 4)),
            ]
        )
    )
    with torch.no_grad():
        model.big.weight.mul_(1e5)
    batch = torch.randint(-4, 5, (8, 16)).float()
    return pd.analyze(model, batch, loss_fn=lambda o, b: o.pow(2).mean(), name="exact")


def _trace(fig: object, name: str) -> object:
    return next(t for t in fig.data if t.name == name)  # type: ignore[attr-defined]


def test_exact_units_are_not_non_finite(exact_and_inf: Report) -> None:
    """0 error is "exact" (a green marker at the floor, +inf SQNR at the top), never a red
    non-finite cross; Inf is non-finite, never exact."""
    units = figures.ordered_units(exact_and_inf)
    errs = {u.name: u.forward.propagated for u in units}
    assert errs["relu0"] is not None and errs["relu0"].rel_l2_error == 0 and errs["relu0"].sqnr_db == math.inf
    assert errs["big"] is not None and errs["big"].rel_l2_error == math.inf
    i, j = [u.name for u in units].index("relu0"), [u.name for u in units].index("big")
    fig = figures.depth_figure(exact_and_inf)
    exact, bad = _trace(fig, figures.EXACT), _trace(fig, figures.NONFINITE)
    assert exact.y[i] is not None and bad.y[i] is None  # type: ignore[attr-defined]
    assert bad.y[j] is not None and exact.y[j] is None  # type: ignore[attr-defined]
    assert exact.y[i] < min(v for v in _trace(fig, "propagated").y if v is not None)  # type: ignore[attr-defined]
    assert _trace(fig, "propagated").y[i] is None  # type: ignore[attr-defined]  # not at a made-up value
    # The SQNR row: +inf is exact (top), -inf non-finite (bottom).
    plus, minus = _trace(fig, "SQNR +inf"), _trace(fig, "SQNR -inf")
    assert plus.y[i] is not None and minus.y[i] is None  # type: ignore[attr-defined]
    assert minus.y[j] is not None and plus.y[j] is None  # type: ignore[attr-defined]
    assert plus.marker.color == exact.marker.color != bad.marker.color  # type: ignore[attr-defined]
    assert "exact (0 error)" in exact.hovertemplate  # type: ignore[attr-defined]
    # Every unit with exactly 0 error is exact; every Inf/NaN non-finite; nothing else either.
    for k, u in enumerate(units):
        e = u.forward.propagated
        assert (exact.y[k] is not None) == (e is not None and e.rel_l2_error == 0)  # type: ignore[attr-defined]
        assert (bad.y[k] is not None) == bool(  # type: ignore[attr-defined]
            (e is not None and not math.isfinite(e.rel_l2_error))
            or (u.forward.local is not None and not math.isfinite(u.forward.local.rel_l2_error))
        )


def test_per_unit_axis_stays_readable(exact_and_inf: Report) -> None:
    """Long names are cut to their tail on the axis, the full name stays in the hover; past
    MAX_UNIT_TICKS units every k-th is labelled; the legend sits beside the plot."""
    name = "model.decoder.layers.31.self_attention.query_key_value"
    short = figures.short_name(name)
    assert len(short) <= 28 and short.startswith("…") and name.endswith(short[1:])
    assert figures.short_name("fc1") == "fc1"
    fig = figures.depth_figure(exact_and_inf)
    assert fig.layout.legend.x >= 1 and fig.layout.legend.orientation == "v"
    assert list(fig.layout.xaxis2.ticktext) == [
        html.escape(figures.short_name(u.name)) for u in figures.ordered_units(exact_and_inf)
    ]
    names = [f"model.layers.{i}.mlp.down_projection" for i in range(200)]
    from plotly.subplots import make_subplots

    wide = figures._per_unit_layout(make_subplots(rows=2, cols=1, shared_xaxes=True), names, "dB")
    ticks = list(wide.layout.xaxis2.tickvals)
    assert 40 <= len(ticks) <= figures.MAX_UNIT_TICKS and ticks[0] == 0
    assert list(wide.layout.xaxis2.ticktext) == [figures.short_name(names[i]) for i in ticks]


def test_loss_scale_numbers_name_their_run(faulty: Report, healthy: Report) -> None:
    """With a plan, the recommendation is the planned run's and the curve the all-low run's:
    each number in its run's column, the curve's at 2^k read off the curve itself."""
    ls = faulty.extras.loss_scale
    assert ls is not None and faulty.extras.plan is not None
    assert figures.recommendation_run(faulty) == "planned run"
    rows = {r[""]: r for r in figures.loss_scale_rows(faulty, ls)}
    k = ls.recommended_scale_log2
    row = rows[f"underflow at the recommended scale 2^{k}"]
    point = figures.curve_point(faulty, k)
    assert point is not None
    assert row["planned run (the recommendation)"] == pd.options.percent(ls.underflow_fraction_at_recommended)
    assert row["all-low run (the curve)"] == pd.options.percent(point.underflow_fraction)
    fig = figures.loss_scale_figure(faulty, ls)
    curves = [t.name for t in fig.data if t.mode != "markers"]
    assert len(curves) == 3 and all("all-low run" in n for n in curves)
    (marker,) = [t for t in fig.data if t.mode == "markers"]
    assert marker.name == f"underflow, planned run, at 2^{k}" and list(marker.y) == [
        ls.underflow_fraction_at_recommended
    ]
    assert "planned run" in fig.layout.annotations[-1].text
    text = render_html(faulty)
    assert "all-low run (the curve)" in text and "planned run (the recommendation)" in text
    alone = healthy.with_extras(loss_scale=pd.recommend_loss_scale(healthy).to_extras())
    assert figures.recommendation_run(alone) == "all-low run"
    assert all(list(r) == ["", "all-low run"] for r in figures.loss_scale_rows(alone, alone.extras.loss_scale))  # type: ignore[arg-type]
