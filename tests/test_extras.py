"""Typed report extras: each section round-trips through save/load, a section that does not fit
is one line naming the field, thresholds are stored typed, and the CLI and the pre-flight
write the same plan section (one writer: `planning.pipeline.plan_report`)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import precision_doctor as pd
from precision_doctor.cli import app
from precision_doctor.extras import (
    LossScaleSection,
    MonitorSection,
    PlanSection,
    PreflightSection,
    ReportExtras,
)
from precision_doctor.model.spec import load_model_file
from precision_doctor.options import ExportFormat, Thresholds
from precision_doctor.report import SCHEMA_VERSION, Report

from .fixtures import HEALTHY_FILE, build_mlp, trained_report

PACKAGE = Path(pd.__file__).resolve().parent


@pytest.fixture(scope="module")
def planned() -> Report:
    case = build_mlp()
    report = pd.analyze(case.model, case.batch, case.loss_fn)
    return pd.plan_report(case.model, case.batch, case.loss_fn, report, target="a100")


def _one_line_error(path: Path) -> str:
    with pytest.raises(pd.PrecisionDoctorError) as info:
        Report.load(path)
    msg = str(info.value)
    assert msg and "\n" not in msg and str(path) in msg
    return msg


def test_plan_report_fills_the_plan_and_loss_scale_sections(planned: Report) -> None:
    plan, ls = planned.extras.plan, planned.extras.loss_scale
    assert isinstance(plan, PlanSection) and isinstance(ls, LossScaleSection)
    assert plan.target == "a100" and set(plan.units) == {u.name for u in planned.units}
    assert set(plan.exports) == set(ExportFormat)
    # The json export is the plan document, whose loss scale is the section (computed once).
    doc = pd.Plan.from_json(plan.exports[ExportFormat.JSON])
    assert doc.loss_scale == ls and doc.units == plan.units
    assert planned.extras.preflight is None and planned.extras.scaler_monitor is None


def test_sections_round_trip_through_save_and_load(planned: Report, tmp_path: Path) -> None:
    trained = trained_report()  # a real pre-flight and a real GradScaler monitor
    assert isinstance(trained.extras.preflight, PreflightSection)
    assert isinstance(trained.extras.scaler_monitor, MonitorSection)
    both = planned.with_extras(preflight=trained.extras.preflight, scaler_monitor=trained.extras.scaler_monitor)
    for report in (planned, trained, both):
        path = tmp_path / "r.json"
        report.save(path)
        loaded = Report.load(path)
        assert loaded == report and loaded.extras == report.extras
        assert loaded.to_json() == report.to_json()
    raw = json.loads(both.to_json())
    assert raw["schema_version"] == SCHEMA_VERSION == 9
    assert set(raw["extras"]) == {"plan", "loss_scale", "preflight", "scaler_monitor"}
    assert raw["extras"]["plan"]["dtype"] == "fp16"  # one dtype spelling: LowDtype's value


@pytest.mark.parametrize(
    ("key", "section", "field"),
    [
        ("plan", [1, 2], "extras.plan"),
        ("loss_scale", "2^16", "extras.loss_scale"),
        ("loss_scale", {"recommended_scale_log2": "many"}, "extras.loss_scale.recommended_scale_log2"),
        ("preflight", {"go": True}, "extras.preflight."),
        ("scaler_monitor", {"steps": 3}, "extras.scaler_monitor."),
        ("surprise", {}, "extras.surprise"),
    ],
)
def test_a_malformed_section_is_one_line_naming_the_field(
    planned: Report, tmp_path: Path, key: str, section: Any, field: str
) -> None:
    raw = json.loads(planned.to_json())
    raw["extras"][key] = section
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    msg = _one_line_error(path)
    assert f"does not match the report schema at {field}" in msg, msg


def test_a_plan_in_another_dtype_spelling_does_not_load(planned: Report, tmp_path: Path) -> None:
    raw = json.loads(planned.to_json())
    unit = next(iter(raw["extras"]["plan"]["units"]))
    raw["extras"]["plan"]["units"][unit] = "float16"
    path = tmp_path / "float16.json"
    path.write_text(json.dumps(raw))
    assert "at extras.plan.units" in _one_line_error(path)


def test_with_extras_validates_each_section(planned: Report) -> None:
    ls = planned.extras.loss_scale
    assert ls is not None
    again = planned.with_extras(loss_scale=ls.model_dump())  # the JSON form is accepted
    assert again.extras.loss_scale == ls and again.extras.plan == planned.extras.plan
    assert planned.with_extras(plan=None).extras.plan is None
    with pytest.raises(pd.PrecisionDoctorError, match=re.escape("report extras at loss_scale.scaler_needed")):
        planned.with_extras(loss_scale={**ls.model_dump(), "scaler_needed": "perhaps"})
    with pytest.raises(pd.PrecisionDoctorError, match="report extras at monitor"):
        planned.with_extras(monitor={})


def test_thresholds_round_trip_typed(tmp_path: Path) -> None:
    case = build_mlp()
    th = Thresholds(divergence_rel_error=0.2, grad_scale_log2=12)
    report = pd.analyze(case.model, case.batch, case.loss_fn, thresholds=th)
    assert report.thresholds == th
    path = tmp_path / "r.json"
    report.save(path)
    loaded = Report.load(path)
    assert isinstance(loaded.thresholds, Thresholds) and loaded.thresholds == th
    assert json.loads(path.read_text())["thresholds"]["grad_scale_log2"] == 12
    assert Thresholds(grad_scale_log2=16.0).grad_scale_log2 == 16  # type: ignore[arg-type]
    raw = json.loads(path.read_text())
    for bad, phrase in [
        ({"grad_scale_log2": 30}, "grad_scale_log2=30 is not a whole number"),
        ({"underflow_fraction": 2.0}, "at most 1"),
        ({"mystery": 1.0}, "at thresholds.mystery"),
    ]:
        path.write_text(json.dumps({**raw, "thresholds": {**raw["thresholds"], **bad}}))
        assert phrase in _one_line_error(path)


def test_an_older_schema_is_one_line(planned: Report, tmp_path: Path) -> None:
    path = tmp_path / "v2.json"
    path.write_text(json.dumps({**json.loads(planned.to_json()), "schema_version": 2}))
    msg = _one_line_error(path)
    assert "schema_version 2" in msg and f"reads {SCHEMA_VERSION}" in msg


def test_cli_and_preflight_write_the_same_plan_section(tmp_path: Path) -> None:
    model_file = tmp_path / "healthy.py"
    model_file.write_text(HEALTHY_FILE)
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["analyze", str(model_file), "--quiet", "--out", str(out)])
    assert res.exit_code == 0, (res.output, res.exception)
    from_cli = Report.load(out).extras

    spec = load_model_file(model_file)
    result = pd.preflight(spec.model, spec.batch, spec.loss_fn, steps=2, name=spec.name)
    annotated = result.annotated_report()
    assert annotated is not None
    from_preflight = annotated.extras
    for extras in (from_cli, from_preflight):
        assert type(extras.plan) is PlanSection and type(extras.loss_scale) is LossScaleSection
    assert from_cli.plan is not None and from_preflight.plan is not None
    assert from_preflight.plan == from_cli.plan  # the same model, target and tolerance
    assert from_preflight.loss_scale == from_cli.loss_scale
    # The pre-flight's own JSON carries the same sections, and its section is the report's.
    doc = pd.PreflightResult.from_json(result.to_json())
    assert doc.plan == from_cli.plan and result.section() == from_preflight.preflight
    with pytest.raises(pd.PrecisionDoctorError, match="pre-flight schema at go"):
        pd.PreflightResult.from_json(result.to_json().replace('"go": true', '"go": "maybe"'))
    assert ReportExtras.model_validate_json(from_preflight.model_dump_json()) == from_preflight


def test_plan_report_checks_its_cost_options(planned: Report) -> None:
    case = build_mlp()
    with pytest.raises(pd.PrecisionDoctorError, match="take no target"):
        pd.plan_report(case.model, case.batch, case.loss_fn, planned, target="h100", cost_source="measured")
    with pytest.raises(pd.PrecisionDoctorError, match="unknown cost source"):
        pd.plan_report(case.model, case.batch, case.loss_fn, planned, cost_source="guess")


def test_plan_does_not_import_export() -> None:
    """The plan <-> export cycle stays broken: the plan module renders nothing."""
    tree = ast.parse((PACKAGE / "planning" / "plan.py").read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module} | {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    assert "precision_doctor.planning.export" not in imported
    assert "precision_doctor.planning.pipeline" not in imported


def test_monitor_file_is_the_monitor_section(tmp_path: Path) -> None:
    trained = trained_report()
    section = trained.extras.scaler_monitor
    assert section is not None and section.prediction is not None
    path = tmp_path / "scaler.json"
    path.write_text(section.model_dump_json())
    assert pd.ScalerMonitor.load(path) == section
    path.write_text(json.dumps({**json.loads(section.model_dump_json()), "steps": "many"}))
    with pytest.raises(pd.PrecisionDoctorError) as info:
        pd.ScalerMonitor.load(path)
    assert "\n" not in str(info.value) and "does not match the monitor schema at steps" in str(info.value)
