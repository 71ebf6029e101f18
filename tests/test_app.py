"""The Streamlit app, driven by streamlit.testing.v1.AppTest on real reports (a sample model
and a planted fault), the bad-input pages, the launcher and the `app` command."""

from __future__ import annotations

import json
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import precision_doctor as pd
from precision_doctor.options import percent
from precision_doctor.report import Report
from precision_doctor.views import figures
from precision_doctor.views.launcher import APP_SCRIPT, launch_app, streamlit_command

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
EVIL = '<img src=x onerror="__pwned=1">'
MARKDOWN_NAME = "**md** [x](javascript:alert(1))"


def faulty_report() -> Report:
    """A hidden Linear scaled by 1e5 overflows fp16; names carry HTML and markdown."""
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            [
                ("inp", nn.Linear(16, 32)),
                ("act", nn.ReLU()),
                (EVIL, nn.Linear(32, 32)),
                (MARKDOWN_NAME, nn.ReLU()),
                ("out", nn.Linear(32, 4)),
            ]
        )
    )
    with torch.no_grad():
        model[2].weight.mul_(1e5)
    return pd.analyze(model, torch.randn(8, 16), loss_fn=lambda o, b: o.pow(2).mean(), name="faulty")


def sample_report() -> Report:
    from precision_doctor.model.spec import load_model_file

    spec = load_model_file(ROOT / "sample_models" / "tiny_transformer.py")
    return pd.analyze(spec.model, spec.batch, spec.loss_fn, name=spec.name)


def with_extras(report: Report, scale_log2: int = 9) -> Report:
    """The plan and loss-scale sections as the later stages write them."""
    units = {u.name: ("fp32" if u.flags else "fp16") for u in report.units}
    extras: dict[str, Any] = {
        "loss_scale": {
            "recommended_scale_log2": scale_log2,
            "default_scale_log2": 16,
            "underflow_fraction_at_recommended": 0.001,
            "underflow_fraction_at_default": 0.0,
            "skipped_steps_from_default": 7,
            "scaler_needed": True,
        },
        "plan": {
            "target": "a100",
            "dtype": "fp16",
            "units": units,
            "fp32_units": [
                {"unit": u.name, "reason": f"{u.flags[0].flag.value} at <b>op</b>"} for u in report.units if u.flags
            ],
            "estimated_step_time_s": {"fp32": 0.10, "autocast": 0.05, "plan": 0.0625},
            "activation_bytes": {"fp32": 1_000_000, "autocast": 500_000, "plan": 600_000},
            "verified_loss_rel_error": 1e-4,
            "verification_passes": 3,
            "exports": {"json": "{}", "python": "PLAN = {}\n", "deepspeed": '{"fp16": {}}', "hf": "{}"},
        },
    }
    return report.with_extras(**extras)


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Report, Path]]:
    d = tmp_path_factory.mktemp("reports")
    out = {}
    for name, report in {
        "sample": sample_report(),
        "faulty": with_extras(faulty_report()),
    }.items():
        path = d / f"{name}.json"
        report.save(path)
        out[name] = (report, path)
    return out


def unescape(text: str) -> str:
    """Undo the app's markdown escaping."""
    return re.sub(r"\\(.)", r"\1", text)


def run_app(monkeypatch: pytest.MonkeyPatch, path: Path | str | None, *, env: str | None = None) -> AppTest:
    # AppTest runs the script in this process: the "argv after --" is sys.argv[1:].
    monkeypatch.setattr(sys, "argv", ["streamlit_app.py", *([str(path)] if path is not None else [])])
    if env is None:
        monkeypatch.delenv("PRECISION_DOCTOR_REPORT", raising=False)
    else:
        monkeypatch.setenv("PRECISION_DOCTOR_REPORT", env)
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=120)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def all_frames(at: AppTest) -> list[Any]:
    return [d.value for d in at.dataframe]


def key_values(at: AppTest) -> dict[str, str]:
    """The label/value tables (the overview, the GradScaler monitor), unescaped."""
    out: dict[str, str] = {}
    for t in at.table:
        df = t.value
        if list(df.columns) == ["value"]:
            out.update({unescape(str(k)): unescape(str(v)) for k, v in zip(df.index, df["value"], strict=True)})
    return out


def test_sample_report_verdict_and_sections(
    reports: dict[str, tuple[Report, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    report, path = reports["sample"]
    at = run_app(monkeypatch, path)
    shown = [unescape(e.value) for e in (*at.success, *at.error)]
    assert report.verdict in shown
    assert [t.label for t in at.tabs] == ["Overview", "Layers", "Unit detail", "Depth", "Gradients", "Loss scale"]
    overview = key_values(at)
    assert overview["capture path"] == report.environment.capture_path.value
    assert overview["device"] == report.environment.device
    assert overview["units"] == str(len(report.units))
    assert overview["precision"] == report.environment.precision_text()  # in full, not cut short
    # The layer table lists every unit, in execution order.
    layers = next(df for df in all_frames(at) if "propagated rel err" in df.columns)
    assert list(layers["unit"]) == [u.name for u in sorted(report.units, key=lambda u: u.order)]
    # No recommendation in a plain report: the loss-scale tab says so instead of inventing one.
    assert any("No loss-scale recommendation" in i.value for i in at.info)


def test_faulty_report_flags_scale_and_plan(
    reports: dict[str, tuple[Report, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    report, path = reports["faulty"]
    assert not report
    at = run_app(monkeypatch, path)
    assert report.verdict in [unescape(e.value) for e in at.error]
    frames = all_frames(at)
    counts = next(df for df in frames if list(df.columns) == ["flag", "units"])
    assert dict(zip(counts["flag"], counts["units"], strict=True)) == {
        flag: sum(1 for u in report.units if any(f.flag.value == flag for f in u.flags)) for flag in counts["flag"]
    }
    worst = next(df for df in frames if "evidence" in df.columns)
    assert list(worst["unit"]) == [f.unit for f in report.flags()]
    assert list(worst["op"]) == [f.evidence.op or "-" for f in report.flags()]
    layers = next(df for df in frames if "propagated rel err" in df.columns)
    flagged = {n for n, fl in zip(layers["unit"], layers["flags"], strict=True) if fl}
    assert flagged == {u.name for u in report.flagged_units()}
    assert EVIL in flagged  # shown verbatim, as data

    ls = report.extras.loss_scale
    assert ls is not None
    metrics = {m.label: m.value for m in at.metric}
    # The report has a plan: the recommendation is the planned run's, and says so.
    assert metrics["Recommended initial scale (planned run)"] == f"2^{ls.recommended_scale_log2}"
    assert metrics["Default scale"] == "2^16"
    assert key_values(at)["plan speed-up (est.)"] == "1.60x"  # 0.10 s / 0.0625 s
    # Each loss-scale number sits in the column of the run it describes.
    numbers = next(t.value for t in at.table if "all-low run (the curve)" in t.value.columns)
    assert list(numbers.columns) == ["planned run (the recommendation)", "all-low run (the curve)"]
    by_label = {
        unescape(str(k)): [unescape(str(v)) for v in vals]
        for k, vals in zip(numbers.index, numbers.values.tolist(), strict=True)
    }
    point = figures.curve_point(report, ls.recommended_scale_log2)
    assert point is not None
    assert by_label[f"underflow at the recommended scale 2^{ls.recommended_scale_log2}"] == [
        percent(ls.underflow_fraction_at_recommended),
        percent(point.underflow_fraction),
    ]

    assert [t.label for t in at.tabs][-1] == "Plan"
    assert [unescape(b.label) for b in at.get("download_button")] == [
        "Download json",
        "Download python",
        "Download deepspeed",
        "Download hf",
    ]
    fp32 = next(df for df in frames if list(df.columns) == ["unit", "reason"])
    assert set(fp32["unit"]) == {u.name for u in report.flagged_units()}


def test_gradients_tab(reports: dict[str, tuple[Report, Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The low run's parameter gradients against fp32's: the model-wide line, the units worst
    first, the figure; the layer table's gradient columns."""
    report, path = reports["sample"]
    at = run_app(monkeypatch, path)
    line = figures.grad_fidelity_text(report)
    assert line is not None and line in [t.value for t in at.text]
    frames = all_frames(at)
    worst = next(df for df in frames if list(df.columns)[:3] == ["unit", "rel L2 error", "cosine"])
    expected = report.grad_fidelity_by_unit()
    assert list(worst["unit"]) == list(expected)
    assert list(worst["rel L2 error"]) == [f.rel_l2_error for f in expected.values()]
    layers = next(df for df in frames if "grad rel err" in df.columns)
    by_name = report.by_module()
    for name, err in zip(layers["unit"], layers["grad rel err"], strict=True):
        fid = by_name[name].backward.grad_fidelity
        assert (err != err) if fid is None else err == fid.rel_l2_error  # NaN where a unit has no parameters
    charts = [c for c in at.get("plotly_chart") if c.proto.id.endswith("-grad_fidelity")]
    assert len(charts) == 1 and '"rel L2 error"' in charts[0].proto.spec
    # Every chart on the shared template (the HTML report's), not restyled by Streamlit's theme.
    for chart in at.get("plotly_chart"):
        assert chart.proto.theme != "streamlit"
        assert json.loads(chart.proto.spec)["layout"]["template"]["layout"]["paper_bgcolor"] == "#ffffff"


def test_training_tab_shows_preflight_and_monitor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A report annotated by a real pre-flight and a real GradScaler monitor gets a Training
    tab: the verdict, each run, and the real run's skipped steps against the prediction."""
    from .fixtures import trained_report

    report = trained_report()
    path = tmp_path / "trained.json"
    report.save(path)
    at = run_app(monkeypatch, path)
    assert [t.label for t in at.tabs][-1] == "Training"
    pre = report.extras.preflight
    assert pre is not None
    shown = [unescape(e.value) for e in (*at.success, *at.error)]
    assert any(s.startswith("Pre-flight: GO" if pre.go else "Pre-flight: NO-GO") for s in shown)
    runs = next(df for df in all_frames(at) if "configuration" in df.columns)
    assert list(runs["run"]) == list(pre.runs)
    monitor = key_values(at)
    assert monitor["skipped steps"] == "2" and monitor["steps"] == "5" and monitor["current scale"] == "2^14"


def test_unit_detail_defaults_to_worst_and_switches(
    reports: dict[str, tuple[Report, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    report, path = reports["faulty"]
    at = run_app(monkeypatch, path)
    worst = report.flagged_units()[0]
    assert at.text[0].value.startswith(f"{worst.name}  ({worst.kind})")
    units = sorted(report.units, key=lambda u: u.order)
    i = next(i for i, u in enumerate(units) if u.name == EVIL)
    at.selectbox(key="unit_pick").set_value(i).run()
    assert not at.exception
    assert at.text[0].value.startswith(EVIL)  # st.text: plain text, never HTML
    errors = next(df for df in all_frames(at) if list(df.columns)[:2] == ["error", "rel L2 error"])
    assert list(errors["error"]) == ["local", "propagated"]
    ops = next(
        df
        for df in all_frames(at)
        if list(df.columns) == ["severity", "flag", "unit", "phase", "op", "evidence"] and set(df["unit"]) == {EVIL}
    )
    assert set(ops["op"]) == {f.evidence.op or "-" for f in units[i].flags}
    # Histograms against the other dtype's range still render.
    at.radio(key="range_dtype").set_value("bf16").run()
    assert not at.exception


def test_layer_filters(reports: dict[str, tuple[Report, Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    report, path = reports["faulty"]
    at = run_app(monkeypatch, path)
    at.multiselect(key="flag_filter").set_value(["OVERFLOW"]).run()
    layers = next(df for df in all_frames(at) if "propagated rel err" in df.columns)
    assert set(layers["unit"]) == {u.name for u in report.units if any(f.flag.value == "OVERFLOW" for f in u.flags)}
    at.multiselect(key="flag_filter").set_value([]).run()
    severities = {f.severity.value for f in report.flags()}
    assert severities
    for level in severities:
        at.multiselect(key="severity_filter").set_value([level]).run()
        layers = next(df for df in all_frames(at) if "propagated rel err" in df.columns)
        assert set(layers["unit"]) == {u.name for u in report.units if any(f.severity.value == level for f in u.flags)}
    at.multiselect(key="severity_filter").set_value([]).run()
    at.text_input(key="name_filter").set_value("IMG").run()
    layers = next(df for df in all_frames(at) if "propagated rel err" in df.columns)
    assert list(layers["unit"]) == [EVIL]


def test_names_never_rendered_as_markup(
    reports: dict[str, tuple[Report, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, path = reports["faulty"]
    at = run_app(monkeypatch, path)
    markdown_like = [*at.markdown, *at.title, *at.caption, *at.error, *at.success, *at.warning, *at.info]
    for el in markdown_like:
        # The verdict names units: escaped (`\<img`), it shows the name as text.
        assert "<img" not in el.value.replace("\\<img", "") and "**md**" not in el.value, el.value
    assert not [m for m in at.markdown if getattr(m.proto, "allow_html", False)]


def test_env_variable_names_the_report(
    reports: dict[str, tuple[Report, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    report, path = reports["sample"]
    at = run_app(monkeypatch, None, env=str(path))
    assert report.verdict in [unescape(e.value) for e in at.success]


def _bad_inputs(tmp: Path, good: Path) -> dict[str, tuple[Path, str]]:
    text = good.read_text()
    raw = json.loads(text)
    cases = {
        "missing": (tmp / "nope.json", "does not exist"),
        "directory": (tmp, "is a directory"),
        "empty": (tmp / "empty.json", "not valid JSON"),
        "truncated": (tmp / "truncated.json", "not valid JSON"),
        "corrupt": (tmp / "corrupt.json", "cannot be read"),
        "not a report": (tmp / "list.json", "not a precision-doctor report"),
        "future schema": (tmp / "v99.json", "schema_version 99"),
        "wrong schema": (tmp / "wrong.json", "does not match the report schema"),
    }
    (tmp / "empty.json").write_text("")
    (tmp / "truncated.json").write_text(text[: len(text) // 2])
    (tmp / "corrupt.json").write_bytes(b"\xff\xfe\x00garbage\x89PNG")
    (tmp / "list.json").write_text("[1, 2, 3]")
    (tmp / "v99.json").write_text(json.dumps({**raw, "schema_version": 99}))
    (tmp / "wrong.json").write_text(json.dumps({**raw, "units": [{"name": 3}]}))
    return cases


@pytest.mark.parametrize(
    "case", ["missing", "directory", "empty", "truncated", "corrupt", "not a report", "future schema", "wrong schema"]
)
def test_bad_report_shows_a_message(
    case: str, reports: dict[str, tuple[Report, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, phrase = _bad_inputs(tmp_path, reports["sample"][1])[case]
    at = run_app(monkeypatch, path)
    assert len(at.error) == 1
    assert phrase in unescape(at.error[0].value)
    assert "Traceback" not in unescape(at.error[0].value)
    assert not at.tabs  # nothing else rendered


def test_malformed_extras_show_one_message(
    reports: dict[str, tuple[Report, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Extras are validated with the report: a section that does not fit is one message
    naming the field, like any report that does not match the schema."""
    _, good = reports["sample"]
    raw = json.loads(good.read_text())
    path = tmp_path / "bad_extras.json"
    path.write_text(json.dumps({**raw, "extras": {"plan": {"target": "x"}, "loss_scale": "2^16"}}))
    at = run_app(monkeypatch, path)
    assert len(at.error) == 1
    assert "does not match the report schema at extras.plan" in unescape(at.error[0].value)
    assert not at.tabs


def test_no_report_offers_an_upload(monkeypatch: pytest.MonkeyPatch) -> None:
    at = run_app(monkeypatch, None)
    assert any("precision-doctor app report.json" in i.value for i in at.info)
    assert not at.tabs


# --- launcher and CLI --------------------------------------------------------------------------
def test_launcher_validates_before_starting(
    reports: dict[str, tuple[Report, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []

    def fake_call(cmd: list[str], env: dict[str, str]) -> int:
        calls.append(cmd)
        assert env["PRECISION_DOCTOR_REPORT"] == str(path.resolve())
        return 0

    monkeypatch.setattr("precision_doctor.views.launcher.run_streamlit", fake_call)
    for case, (bad, phrase) in _bad_inputs(tmp_path, reports["sample"][1]).items():
        with pytest.raises(pd.PrecisionDoctorError, match=re.escape(phrase)):
            launch_app(bad)
        assert not calls, case
    _, path = reports["sample"]
    assert launch_app(path, port=8765, headless=True) == 0
    (cmd,) = calls
    assert cmd[:5] == [sys.executable, "-m", "streamlit", "run", str(APP_SCRIPT)]
    assert cmd[cmd.index("--server.port") + 1] == "8765"
    assert cmd[cmd.index("--server.headless") + 1] == "true"
    assert cmd[-2:] == ["--", str(path.resolve())]
    assert streamlit_command(path)[-2:] == ["--", str(path)]


def test_cli_app_bad_report_is_one_line_exit_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from precision_doctor.cli import app

    bad = tmp_path / "truncated.json"
    bad.write_text('{"schema_version": 1, "mod')
    for path in (bad, tmp_path / "missing.json"):
        result = CliRunner().invoke(app, ["app", str(path)])
        assert result.exit_code == 2
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("precision-doctor: error:"), result.output
        assert "Traceback" not in result.output


def test_a_distributed_jobs_ranks(
    reports: dict[str, tuple[Report, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from .fixtures import as_job_report

    job = as_job_report(reports["faulty"][0])
    path = tmp_path / "job.json"
    job.save(path)
    at = run_app(monkeypatch, path)
    assert "Ranks" in [unescape(s.value) for s in at.subheader]
    ranks = next(df for df in all_frames(at) if "findings" in df.columns)
    assert list(ranks["rank"]) == [0, 1]
    assert list(ranks["flags"]) == [0, len(job.flags())]
    assert EVIL in ranks["findings"][1]  # shown verbatim, as data
    assert key_values(at)["distributed"] == "2 ranks (gloo, ddp, mesh 2)"
    sample = run_app(monkeypatch, reports["sample"][1])
    assert "Ranks" not in [unescape(s.value) for s in sample.subheader]


def test_a_report_from_another_version_is_shown_with_a_warning(
    reports: dict[str, tuple[Report, Path]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _, path = reports["sample"]
    assert not run_app(monkeypatch, path).warning  # this version's own report: no warning
    raw = json.loads(path.read_text())
    raw["environment"]["tool_version"] = "0.0.1"
    old = tmp_path / "old.json"
    old.write_text(json.dumps(raw))
    warnings = [unescape(w.value) for w in run_app(monkeypatch, old).warning]
    assert len(warnings) == 1 and "precision-doctor 0.0.1" in warnings[0], warnings


def test_the_bf16_check_is_shown_beside_the_verdict(
    reports: dict[str, tuple[Report, Path]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A report with the CLI's bf16 cross-check (`extras.bf16_check`) shows its verdict under
    the report's own; one without shows none."""
    from precision_doctor.cli import bf16_check_section

    report, _ = reports["faulty"]
    checked = report.with_extras(bf16_check=bf16_check_section(report))
    path = tmp_path / "checked.json"
    checked.save(path)
    at = run_app(monkeypatch, path)
    shown = [unescape(w.value) for w in (*at.warning, *at.info)]
    assert f"Checked in bf16 too: {report.verdict}" in shown
    _, plain = reports["faulty"]
    assert not any(
        s.startswith("Checked in bf16") for s in map(unescape, (w.value for w in run_app(monkeypatch, plain).warning))
    )
