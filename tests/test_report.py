"""Report: exact save/load round trip, clean errors on bad files, and the query helpers."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from torch import nn

import precision_doctor as pd
from precision_doctor.capture.lowrun import EMULATE_BF16_ENV, EmulateLowMode
from precision_doctor.options import Flag, Phase, Severity
from precision_doctor.report import SCHEMA_VERSION, Evidence, FlagRecord, Report
from precision_doctor.views.figures import overview_items
from precision_doctor.views.html_report import render_html
from precision_doctor.views.terminal import render_report


@pytest.fixture(scope="module")
def report() -> Report:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    batch = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    return pd.analyze(net, batch, lambda out, b: out.pow(2).mean())


WARNINGS = {Flag.GRAD_UNDERFLOW, Flag.UNDERFLOW, Flag.ERROR_GROWTH, Flag.GRAD_OVERFLOW}


def flag(kind: Flag, unit: str, severity: Severity | None = None, **values: float) -> FlagRecord:
    """A hand-made finding; its severity by default the flag's usual one (warnings for the
    flags that can be warnings)."""
    severity = severity or (Severity.WARNING if kind in WARNINGS else Severity.ERROR)
    evidence = Evidence(op="mm", phase=Phase.FORWARD, message=f"{kind} here", values=values)
    return FlagRecord(flag=kind, unit=unit, severity=severity, evidence=evidence)


def with_flags(report: Report, flags_by_unit: dict[str, list[FlagRecord]]) -> Report:
    units = [u.model_copy(update={"flags": flags_by_unit.get(u.name, [])}) for u in report.units]
    return report.model_copy(update={"units": units})


def with_infinities(report: Report) -> Report:
    losses = report.losses.model_copy(update={"low": math.inf, "rel_error": math.inf})
    units = list(report.units)
    u0 = units[0]
    local = u0.forward.local
    assert local is not None
    fwd = u0.forward.model_copy(
        update={"local": local.model_copy(update={"rel_l2_error": math.inf, "sqnr_db": -math.inf})}
    )
    units[0] = u0.model_copy(
        update={"forward": fwd, "flags": [flag(Flag.OVERFLOW, u0.name, overflow_fraction=math.inf)]}
    )
    return report.model_copy(update={"losses": losses, "units": units})


# --- what is emulated ------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "emulated"), [("fp16", True), ("bf16", False), ("bf16", True)])
def test_emulated_says_whether_the_low_run_emulated_its_arithmetic(
    dtype: str, emulated: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU fp16's kernels are emulated (fp32 kernels, results rounded); bf16 runs the
    CPU's own kernels where they are fast, and is emulated where not (forced here both ways:
    `cpu_bf16_emulated`). Watched in the run itself: the ops the emulation computed."""
    monkeypatch.setenv(EMULATE_BF16_ENV, "1" if emulated else "0")
    computed: list[str] = []
    real = EmulateLowMode._emulated

    def spy(self: EmulateLowMode, func: Any, *args: Any) -> Any:
        computed.append(str(func))
        return real(self, func, *args)

    monkeypatch.setattr(EmulateLowMode, "_emulated", spy)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    batch = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    report = pd.analyze(net, batch, lambda out, b: out.pow(2).mean(), dtype=dtype)
    assert report.environment.emulated is emulated
    assert bool(computed) is emulated, computed[:5]
    assert Report.model_validate_json(report.model_dump_json()).environment.emulated is emulated
    # The views say what is emulated, and nothing of the kind for bf16.
    console = Console(record=True, width=200)
    render_report(report, console)
    first = console.export_text().splitlines()[0]
    precision = dict(overview_items(report))["precision"]
    html = render_html(report)
    if emulated and dtype == "fp16":
        assert "fp16 (emulated: fp32 kernels, results rounded to fp16) on cpu" in first
        assert precision == "emulated: fp32 kernels, results rounded to fp16"
    elif emulated:
        text = "emulated: fp32 kernels, results rounded to bf16; the CPU has no fast bf16 kernels"
        assert f"bf16 ({text}) on cpu" in first
        assert precision == text
    else:
        assert "bf16 (native bf16 kernels) on cpu" in first and "emulated" not in first
        assert precision == "native bf16 kernels"
    assert precision in html


# --- round trip --------------------------------------------------------------------------


def test_save_load_round_trip_exact(report: Report, tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    report.save(path)
    loaded = Report.load(path)
    assert loaded == report
    assert loaded.to_json() == report.to_json()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes and symbolic links")
def test_save_writes_through_a_link_and_refuses_what_is_no_file(report: Report, tmp_path: Path) -> None:
    """`Report.save` (as every writer: plans, HTML) replaces the file a link names and keeps the
    link; a named pipe (a device likewise: /dev/null became a regular file) and a loop of links
    are refused in one line, the pipe left as it was."""
    target = tmp_path / "r.json"
    link = tmp_path / "latest.json"
    link.symlink_to(target)
    report.save(link)
    assert link.is_symlink() and Report.load(target) == report
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    with pytest.raises(pd.PrecisionDoctorError, match="not a regular file"):
        report.save(fifo)
    assert not fifo.is_file() and fifo.exists()
    loop = tmp_path / "loop.json"
    loop.symlink_to(loop)
    with pytest.raises(pd.PrecisionDoctorError, match="cannot write"):
        report.save(loop)


def test_round_trip_with_infinite_values(report: Report, tmp_path: Path) -> None:
    r = with_infinities(report)
    path = tmp_path / "inf.json"
    r.save(path)
    text = path.read_text()

    def no_constants(name: str) -> float:
        raise AssertionError(f"non-standard JSON literal {name}")

    raw = json.loads(text, parse_constant=no_constants)  # strict JSON: no bare Infinity
    assert raw["losses"]["low"] == "Infinity"
    loaded = Report.load(path)
    assert loaded == r
    assert loaded.losses.low == math.inf
    local = loaded.units[0].forward.local
    assert local is not None and local.sqnr_db == -math.inf
    assert loaded.units[0].flags[0].evidence.values["overflow_fraction"] == math.inf


def test_nan_survives_round_trip(report: Report, tmp_path: Path) -> None:
    r = report.model_copy(update={"losses": report.losses.model_copy(update={"low": math.nan})})
    path = tmp_path / "nan.json"
    r.save(path)
    assert math.isnan(Report.load(path).losses.low)


def test_save_leaves_no_temp_file(report: Report, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "r.json"
    report.save(path)
    report.save(path)  # overwrite
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]


def test_save_to_an_unwritable_place_is_a_user_error(report: Report, tmp_path: Path) -> None:
    """The write itself (what `check_writable` cannot foresee, or a caller that skipped it)
    fails with one line, leaves no temp file and does not touch what is there."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(pd.PrecisionDoctorError, match="cannot write"):
        report.save(blocker / "r.json")
    with pytest.raises(pd.PrecisionDoctorError, match="cannot write"):
        report.save(tmp_path)  # a folder: the rename fails after the temp file was written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"] and blocker.read_text() == "x"


# --- bad files ---------------------------------------------------------------------------


def _bad_files(report: Report) -> dict[str, bytes]:
    good = report.to_json()
    raw = json.loads(good)
    wrong_version = dict(raw, schema_version=SCHEMA_VERSION + 1)
    missing = {k: v for k, v in raw.items() if k != "losses"}
    extra = dict(raw, surprise=1)
    bad_type = dict(raw, op_count_forward="many")
    return {
        "truncated": good[: len(good) // 2].encode(),
        "empty": b"",
        "garbage": b"\x00\x01not json at all",
        "not-utf8": b"\xff\xfe\x00{",
        "list": b"[1, 2, 3]",
        "no-schema-version": json.dumps({"model": "x"}).encode(),
        "wrong-schema-version": json.dumps(wrong_version).encode(),
        "string-schema-version": json.dumps(dict(raw, schema_version="1")).encode(),
        "missing-field": json.dumps(missing).encode(),
        "extra-field": json.dumps(extra).encode(),
        "bad-type": json.dumps(bad_type).encode(),
    }


@pytest.mark.parametrize(
    "kind",
    [
        "truncated",
        "empty",
        "garbage",
        "not-utf8",
        "list",
        "no-schema-version",
        "wrong-schema-version",
        "string-schema-version",
        "missing-field",
        "extra-field",
        "bad-type",
    ],
)
def test_bad_report_raises_one_line_error(report: Report, tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.json"
    path.write_bytes(_bad_files(report)[kind])
    with pytest.raises(pd.PrecisionDoctorError) as info:
        Report.load(path)
    msg = str(info.value)
    assert msg and "\n" not in msg
    assert str(path) in msg
    if kind == "wrong-schema-version":
        assert str(SCHEMA_VERSION + 1) in msg


def test_missing_report_file(tmp_path: Path) -> None:
    with pytest.raises(pd.PrecisionDoctorError, match="does not exist"):
        Report.load(tmp_path / "nope.json")


def test_directory_is_not_a_report(tmp_path: Path) -> None:
    with pytest.raises(pd.PrecisionDoctorError) as info:
        Report.load(tmp_path)
    assert "\n" not in str(info.value)


# --- queries -----------------------------------------------------------------------------


def test_by_module(report: Report) -> None:
    units = report.by_module()
    assert list(units) == [u.name for u in report.units]
    assert {"0", "1", "2", "<loss>"} <= set(units)
    assert units["0"].kind == "Linear" and units["1"].kind == "ReLU"
    assert set(units["0"].backward.param_grads) == {"0.weight", "0.bias"}


def test_by_op_merges_units(report: Report) -> None:
    merged = report.by_op()
    expected_calls: dict[str, int] = {}
    for u in report.units:
        for o in u.ops:
            key = f"{o.op}/{o.phase}"
            expected_calls[key] = expected_calls.get(key, 0) + o.calls
    assert {k: v.calls for k, v in merged.items()} == expected_calls
    # two Linear layers, one addmm each
    assert merged["addmm.default/forward"].calls == 2
    assert merged["addmm.default/forward"].flops == sum(
        o.flops for u in report.units for o in u.ops if o.op == "addmm.default" and o.phase == "forward"
    )
    assert merged["addmm.default/forward"].flops == 2 * 6 * 4 * 8 + 2 * 6 * 8 * 2
    assert sum(v.calls for v in merged.values()) == report.op_count_forward + report.op_count_backward
    # The largest |x| of both Linear layers' outputs, from a plain run; none for the
    # weight transposes (views) or backward ops, which are not summarized.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    batch = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = net[0](batch)
        expected = max(float(hidden.abs().max()), float(net[2](net[1](hidden)).abs().max()))
    assert merged["addmm.default/forward"].max_abs == pytest.approx(expected)
    assert merged["t.default/forward"].max_abs is None and merged["mm.default/backward"].max_abs is None


def test_flags_worst_first(report: Report) -> None:
    r = with_flags(
        report,
        {
            "0": [flag(Flag.UNDERFLOW, "0", underflow_fraction=0.5), flag(Flag.OVERFLOW, "0", overflow_fraction=0.01)],
            "1": [flag(Flag.DIVERGENCE, "1", rel_l2_error=0.2), flag(Flag.OVERFLOW, "1", overflow_fraction=0.3)],
            "2": [flag(Flag.NONFINITE_FP32, "2"), flag(Flag.GRAD_UNDERFLOW, "2", norm_fraction_lost=0.9)],
        },
    )
    got = [(f.flag, f.unit) for f in r.flags()]
    assert got == [
        (Flag.NONFINITE_FP32, "2"),
        (Flag.OVERFLOW, "1"),  # larger overflow fraction first
        (Flag.OVERFLOW, "0"),
        (Flag.DIVERGENCE, "1"),
        (Flag.GRAD_UNDERFLOW, "2"),
        (Flag.UNDERFLOW, "0"),
    ]
    assert [u.name for u in r.flagged_units()] == ["2", "1", "0"]
    assert not r
    assert "3 unit(s) flagged" in r.verdict


def test_bool_true_without_flags(report: Report) -> None:
    clean = with_flags(report, {})
    assert bool(clean) is True
    assert clean.flags() == []
    assert "Safe to train" in clean.verdict
    # A warning alone is safe, with the warning counted; an error is not.
    one = with_flags(report, {"1": [flag(Flag.UNDERFLOW, "1", underflow_fraction=0.5)]})
    assert bool(one) is True
    assert one.verdict.endswith("Safe to train in this dtype with 1 warning(s).")
    # Info findings are counted in the findings part, not called warnings ("with 0 warning(s)").
    info = with_flags(report, {"1": [flag(Flag.UNDERFLOW, "1", Severity.INFO, underflow_fraction=0.5)]})
    assert bool(info) is True
    assert "1 info(s) (1 UNDERFLOW)" in info.verdict
    assert info.verdict.endswith("within tolerance 0.01. Safe to train in this dtype."), info.verdict
    bad = with_flags(report, {"1": [flag(Flag.UNDERFLOW, "1", Severity.ERROR, underflow_fraction=0.5)]})
    assert bool(bad) is False
    assert "1 error(s) (1 UNDERFLOW)" in bad.verdict and bad.verdict.endswith("Not safe as-is.")
