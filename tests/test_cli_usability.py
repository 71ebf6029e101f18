"""The CLI's everyday edges (issue 22): one-line errors for bad option values, torch's dtype
names, `--help` without placeholders on switches, output that does not wrap when piped, the
warning for a report another version wrote, the app launcher's signals, and the next steps
after the verdict (from real analyses of the sample models)."""

from __future__ import annotations

import html
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner, Result

import precision_doctor as pd
from precision_doctor.cli import app
from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.model.spec import ModelSpec, load_model_file
from precision_doctor.options import LowDtype, parse_enum
from precision_doctor.report import Report
from precision_doctor.version import __version__

from .fixtures import HEALTHY_FILE

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_models"
ENV = {"NO_COLOR": "1", "TERM": "dumb"}

runner = CliRunner()


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The real process, stdout and stderr pipes (not a terminal), no COLUMNS."""
    full = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    full.update(ENV | (env or {}))
    return subprocess.run(
        [sys.executable, "-m", "precision_doctor.cli", *args],
        capture_output=True,
        text=True,
        env=full,
        cwd=REPO,
        timeout=timeout,
    )


# --- bad option values: one line, the option, the accepted values, before any work ---------

BAD_OPTIONS = {
    ("analyze", "--dtype", "fp4"): "fp16, bf16, fp8",
    ("analyze", "--regime", "wrong"): "autocast, pure",
    ("analyze", "--policy", "tpu"): "cuda, cpu",
    ("analyze", "--target", "v100"): "h100, h200, b200, a100, 4090, cpu",
    ("analyze", "--export-format", "xml"): "json, python, deepspeed, hf, torchao, te",
    ("analyze", "--cost", "guess"): "roofline, measured",
    ("analyze", "--driver", "fx"): "auto, dispatch, graph",
    ("preflight", "--dtype", "float4"): "fp16, bf16, fp8",
    ("preflight", "--regime", "wrong"): "autocast, pure",
    ("preflight", "--policy", "tpu"): "cuda, cpu",
    ("preflight", "--driver", "eager"): "auto, dispatch, graph",
}


def _marked_model(tmp_path: Path) -> tuple[Path, Path]:
    """A model file that leaves a marker when it is built: a bad option must stop the run first."""
    marker = tmp_path / "built"
    body = HEALTHY_FILE.replace("def build_model():\n", f"def build_model():\n    open({str(marker)!r}, 'w').close()\n")
    path = tmp_path / "model.py"
    path.write_text(body)
    return path, marker


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "╭" not in stderr and "Value error" not in stderr, stderr
    assert lines[0].startswith("precision-doctor: error: "), stderr
    return lines[0]


@pytest.mark.parametrize("case", list(BAD_OPTIONS), ids=lambda c: f"{c[0]}{c[1]}")
def test_bad_option_value_is_one_line(tmp_path: Path, case: tuple[str, str, str]) -> None:
    command, option, value = case
    model, marker = _marked_model(tmp_path)
    result = runner.invoke(app, [command, str(model), option, value, "--quiet"], env=ENV)
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    line = _one_line(result.stderr)
    assert f"unknown {option} {value!r}" in line
    assert f"choose one of: {BAD_OPTIONS[case]}" in line
    assert result.stdout == ""
    assert not marker.exists()  # validated before the model file ran


def test_bad_option_value_real_process(tmp_path: Path) -> None:
    model, marker = _marked_model(tmp_path)
    proc = cli("analyze", str(model), "--dtype", "fp4")
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr)
    assert "--dtype 'fp4'" in line and "fp16, bf16, fp8" in line and "float16" in line
    assert proc.stdout == "" and not marker.exists()


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["analyze", "{model}", "--export-format", "json"], "--export-format needs --export"),
        (["analyze", "{model}", "--app"], "--app needs --out"),
        (["preflight", "{model}", "--fail-on", "BOGUS"], "unknown risk 'BOGUS' in --fail-on"),
        (["preflight", "{model}", "--fail-on", ","], "--fail-on is empty"),
        (["analyze", "{model}", "--bogus"], "No such option: --bogus"),
        (["preflight", "{model}", "--steps", "many"], "--steps"),
        (["analyze"], "Missing argument"),
        (["nonsense"], "No such command"),
    ],
)
def test_usage_errors_are_one_line(tmp_path: Path, args: list[str], phrase: str) -> None:
    model, marker = _marked_model(tmp_path)
    result = runner.invoke(app, [a.format(model=model) for a in args], env=ENV)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert phrase in _one_line(result.stderr)
    assert not marker.exists()


# --- torch's dtype names --------------------------------------------------------------------


def test_dtype_aliases_in_the_api() -> None:
    for name in ("float16", "half", "torch.float16", "FP16", torch.float16, torch.half):
        assert LowDtype(name) is LowDtype.FP16, name
    for name in ("bfloat16", "torch.bfloat16", torch.bfloat16):
        assert LowDtype(name) is LowDtype.BF16, name
    for bad in ("float32", "fp4", torch.float32, "torch.float64"):
        with pytest.raises(ValueError):
            LowDtype(bad)
    with pytest.raises(PrecisionDoctorError, match=r"unknown dtype 'float32'; choose one of: fp16, bf16"):
        parse_enum(LowDtype, "float32", "dtype")
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    report = pd.analyze(net, torch.randn(8, 4), loss_fn=lambda out, b: out.pow(2).mean(), dtype="bfloat16")
    assert report.environment.dtype is LowDtype.BF16


@pytest.mark.parametrize(("alias", "dtype"), [("float16", "fp16"), ("torch.bfloat16", "bf16"), ("half", "fp16")])
def test_dtype_aliases_on_the_command_line(tmp_path: Path, alias: str, dtype: str) -> None:
    model = tmp_path / "model.py"
    model.write_text(HEALTHY_FILE)
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["analyze", str(model), "--dtype", alias, "--quiet", "--out", str(out)], env=ENV)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert Report.load(out).environment.dtype.value == dtype
    assert f"\n{dtype}: " in result.stdout  # the verdict names the canonical dtype


# --- --help ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["analyze"], ["app"], ["preflight"]])
def test_help_has_no_bool_placeholder(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"], env={**ENV, "COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    assert "--help" in result.output
    if command == ["analyze"]:
        assert "--quiet" in result.output and "--no-bf16-check" in result.output
        assert "<fp16|bf16|fp8>" in result.output and "<autocast|pure>" in result.output  # values keep theirs
        assert "'precision-doctor[fp8]'" in result.output  # the extra's brackets are no markup
    if command == ["preflight"]:
        assert "--no-plan" in result.output and "<int>" in result.output


# --- output through a pipe ------------------------------------------------------------------

_overflow: list[subprocess.CompletedProcess[str]] = []


def overflow_run() -> subprocess.CompletedProcess[str]:
    """`analyze sample_models/ffn_overflow.py` in fp16 as a real process writing to pipes:
    not safe (an fp16 overflow), so it checks bf16 too. Shared by the tests below."""
    if not _overflow:
        _overflow.append(cli("analyze", "sample_models/ffn_overflow.py"))
    return _overflow[0]


def test_piped_output_does_not_wrap() -> None:
    proc = overflow_run()
    assert proc.returncode == 0, proc.stderr
    header = proc.stdout.splitlines()[0]
    # 130+ characters on one line: at 80 columns it broke after "results" and before "cpu"
    assert header.startswith("ffn_overflow: ") and header.endswith("capture: dispatch"), proc.stdout
    assert "rounded to fp16) on cpu, autocast (cuda op lists)" in header
    assert len(header) > 80
    verdict = next(ln for ln in proc.stdout.splitlines() if ln.startswith("fp16: "))
    assert verdict.endswith("Not safe as-is."), proc.stdout
    # the progress note on stderr is whole too
    assert (
        "fp16 is not safe as-is: analyzing the same model in bf16 too (--no-bf16-check skips it)"
        in proc.stderr.splitlines()
    )


# --- next steps after the verdict -------------------------------------------------------------


def _next_steps(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    assert "Next steps:" in lines, stdout
    steps = lines[lines.index("Next steps:") + 1 :]
    assert steps and all(s.startswith("  - ") for s in steps), stdout  # the output ends with them
    return [s[4:] for s in steps]


def test_fp16_overflow_next_steps_check_bf16() -> None:
    """ffn_overflow overflows fp16 (65504) and fits bf16: not safe, the plan's export command,
    and "bf16 is clean" from the bf16 analysis the CLI ran (it says so on stderr)."""
    proc = overflow_run()
    steps = _next_steps(proc.stdout)
    assert steps[0].startswith("plan which units stay in fp32"), steps
    assert "precision-doctor analyze sample_models/ffn_overflow.py --export plan.py;" in steps[0]
    bf16 = [s for s in steps if s.startswith("bf16")]
    assert len(bf16) == 1 and bf16[0].startswith("bf16 is clean for this model (checked: no unit flagged"), steps
    assert bf16[0].endswith("precision-doctor analyze sample_models/ffn_overflow.py --dtype bf16")
    assert "analyzing the same model in bf16 too" in proc.stderr
    # not safe as-is: every unit's loss scale is the scale of a failing configuration; the
    # plan export carries the scale for its low units instead
    assert not any(s.startswith("start the loss scale") for s in steps)


def test_bf16_claim_is_checked_not_guessed() -> None:
    """deep_narrow_underflow loses gradients in fp16 and its final loss drifts over the
    tolerance in bf16: the bf16 line says bf16 is not safe either, from its own verdict."""
    proc = cli("analyze", "sample_models/deep_narrow_underflow.py", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # --quiet: no progress note
    (line,) = [s for s in _next_steps(proc.stdout) if s.startswith("bf16")]
    assert line.startswith("bf16 is not safe either (checked): bf16: ")
    assert line.endswith("Not safe as-is.") and "clean" not in line
    direct = cli("analyze", "sample_models/deep_narrow_underflow.py", "--dtype", "bf16", "--quiet")
    verdict = next(ln for ln in direct.stdout.splitlines() if ln.startswith("bf16: "))
    assert line.endswith(verdict)


def test_the_bf16_check_is_kept_in_the_saved_report(tmp_path: Path) -> None:
    """The bf16 cross-check's verdict was on the terminal only: `--out` keeps it
    (`extras.bf16_check`), equal to a bf16 analysis of its own, and the app shows it; a
    report without the check has no such section in its JSON."""
    out = tmp_path / "r.json"
    proc = cli("analyze", "sample_models/deep_narrow_underflow.py", "--quiet", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    check = Report.load(out).extras.bf16_check
    direct = cli("analyze", "sample_models/deep_narrow_underflow.py", "--dtype", "bf16", "--quiet")
    verdict = next(ln for ln in direct.stdout.splitlines() if ln.startswith("bf16: "))
    assert check is not None and check.verdict == verdict and check.safe is False
    spec = load_model_file(SAMPLES / "deep_narrow_underflow.py")
    api = pd.analyze(spec.model, spec.batch, spec.loss_fn, dtype="bf16")
    assert check.flagged_units == sorted({f.unit for f in api.flags()})
    assert check.severity_counts == api.severity_counts()
    assert check.final_loss_rel_error == pytest.approx(api.losses.rel_error, rel=1e-3)
    plain = tmp_path / "p.json"
    proc = cli("analyze", "sample_models/deep_narrow_underflow.py", "--quiet", "--no-bf16-check", "--out", str(plain))
    assert proc.returncode == 0 and "bf16_check" not in json.loads(plain.read_text())["extras"]


def test_no_bf16_check_skips_the_second_analysis() -> None:
    result = runner.invoke(app, ["analyze", str(SAMPLES / "ffn_overflow.py"), "--no-bf16-check"], env=ENV)
    assert result.exit_code == 0, result.stderr
    steps = _next_steps(result.stdout)
    assert any(s.startswith("bf16 not checked (--no-bf16-check): ") for s in steps), steps
    assert not any("bf16 is" in s for s in steps)
    assert "analyzing the same model in bf16" not in result.stderr


def test_healthy_model_next_step_is_the_loss_scale_without_bf16() -> None:
    result = runner.invoke(app, ["analyze", str(SAMPLES / "tiny_transformer.py")], env=ENV)
    assert result.exit_code == 0, result.stderr
    assert "Safe to train in this dtype." in result.stdout
    steps = _next_steps(result.stdout)
    assert not any("bf16" in s for s in steps) and "bf16" not in result.stderr
    assert not any("--export" in s for s in steps)
    (scale,) = steps
    spec = _spec("tiny_transformer")
    report = pd.analyze(spec.model, spec.batch, spec.loss_fn, dtype="fp16")
    k = pd.recommend_loss_scale(report).recommended_scale_log2
    assert scale.startswith(f"start the loss scale at 2^{k}: torch.amp.GradScaler(init_scale=2**{k})")


def test_export_written_is_the_next_step(tmp_path: Path) -> None:
    plan = tmp_path / "plan.py"
    result = runner.invoke(
        app,
        ["analyze", str(SAMPLES / "attention_unscaled.py"), "--quiet", "--no-bf16-check", "--export", str(plan)],
        env=ENV,
    )
    assert result.exit_code == 0, result.stderr
    steps = _next_steps(result.stdout)
    assert steps[0].startswith(f"apply the plan written to {plan}: it keeps ")
    assert plan.is_file()
    # with a plan, the scale is the plan's low units' (extras.loss_scale), as the export has it
    spec = _spec("attention_unscaled")
    report = pd.plan_report(spec.model, spec.batch, spec.loss_fn, pd.analyze(spec.model, spec.batch, spec.loss_fn))
    assert report.extras.loss_scale is not None
    k = report.extras.loss_scale.recommended_scale_log2
    assert any(s.startswith(f"start the loss scale at 2^{k}:") for s in steps), steps
    assert f"\ninitial loss scale 2^{k} " in result.stdout  # the plan's advice line says the same


def test_a_planned_report_is_not_told_to_plan_again(tmp_path: Path) -> None:
    """--out plans the report: the next step writes that plan, with the plan's own count, and
    the loss scale is the plan's."""
    out = tmp_path / "report.json"
    result = runner.invoke(
        app,
        ["analyze", str(SAMPLES / "attention_unscaled.py"), "--quiet", "--no-bf16-check", "--out", str(out)],
        env=ENV,
    )
    assert result.exit_code == 0, result.stderr
    steps = _next_steps(result.stdout)
    plan = pd.Plan.from_report(Report.load(out))
    kept = sum(d == "fp32" for d in plan.units.values())
    assert steps[0].startswith(f"write the plan above (it keeps {kept} of {len(plan.units)} units in fp32)"), steps
    assert steps[0].endswith("--export plan.py") and not any(s.startswith("plan which units") for s in steps)
    assert plan.loss_scale is not None
    assert any(s.startswith(f"start the loss scale at 2^{plan.loss_scale.recommended_scale_log2}:") for s in steps)


def test_bf16_analysis_has_no_bf16_or_scale_step() -> None:
    result = runner.invoke(app, ["analyze", str(SAMPLES / "ffn_overflow.py"), "--dtype", "bf16", "--quiet"], env=ENV)
    assert result.exit_code == 0, result.stderr
    assert "Next steps:" not in result.stdout  # safe in bf16: nothing to do
    assert result.stdout.rstrip().endswith("Safe to train in this dtype.")


def _spec(name: str) -> ModelSpec:
    return load_model_file(SAMPLES / f"{name}.py")


# --- a report another version wrote ---------------------------------------------------------


@pytest.fixture(scope="module")
def saved_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("report")
    model = folder / "model.py"
    model.write_text(HEALTHY_FILE)
    out = folder / "r.json"
    result = runner.invoke(app, ["analyze", str(model), "--quiet", "--out", str(out)], env=ENV)
    assert result.exit_code == 0, result.stderr
    return out


def _with_version(saved: Path, tmp_path: Path, version: str, schema: int | None = None) -> Path:
    raw = json.loads(saved.read_text())
    raw["environment"]["tool_version"] = version
    if schema is not None:
        raw["schema_version"] = schema
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(raw))
    return path


def _app(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Result, list[list[str]]]:
    started: list[list[str]] = []

    def fake(cmd: list[str], env: dict[str, str]) -> int:
        started.append(cmd)
        return 0

    monkeypatch.setattr("precision_doctor.views.launcher.run_streamlit", fake)
    return runner.invoke(app, ["app", str(path), "--headless"], env=ENV), started


def test_report_from_another_version_warns(saved_report: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Report.load(saved_report).environment.tool_version == __version__
    assert Report.load(saved_report).version_warning() is None
    result, started = _app(saved_report, monkeypatch)
    assert result.exit_code == 0 and started and result.stderr == ""

    old = _with_version(saved_report, tmp_path, "0.0.1")
    result, started = _app(old, monkeypatch)
    assert result.exit_code == 0, result.stderr
    assert len(started) == 1  # served all the same
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("precision-doctor: warning: "), lines
    assert "precision-doctor 0.0.1" in lines[0] and f"this is {__version__}" in lines[0]
    assert Report.load(old).version_warning() is not None


def test_unreadable_schema_is_an_error_naming_the_writer(
    saved_report: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    future = _with_version(saved_report, tmp_path, "9.0.0", schema=99)
    result, started = _app(future, monkeypatch)
    assert result.exit_code == 2 and not started
    line = _one_line(result.stderr)
    assert "schema_version 99 (written by precision-doctor 9.0.0)" in line and __version__ in line


# --- the app launcher and signals -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serving(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _processes_naming(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(
    importlib.util.find_spec("streamlit") is None or not Path("/proc").is_dir(), reason="needs streamlit and /proc"
)
def test_sigterm_to_the_launcher_stops_the_server(saved_report: Path, tmp_path: Path) -> None:
    """A supervisor stops `precision-doctor app` with one SIGTERM to the pid it started: the
    port stops serving and no streamlit process is left (the launcher became streamlit)."""
    path = tmp_path / "served.json"
    path.write_text(saved_report.read_text())
    port = _free_port()
    url = f"http://127.0.0.1:{port}/_stcore/health"
    proc = subprocess.Popen(
        [sys.executable, "-m", "precision_doctor.cli", "app", str(path), "--port", str(port), "--headless"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not _serving(url):
            assert proc.poll() is None, "the app exited before serving"
            assert time.monotonic() < deadline, "the app did not serve within 120 s"
            time.sleep(0.5)
        assert _processes_naming(str(path)) == [proc.pid]  # one process: the launcher is streamlit
        os.kill(proc.pid, signal.SIGTERM)  # the launcher's pid only, not its process group
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _processes_naming(str(path)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_naming(str(path)) == []
        assert not _serving(url)
    finally:
        for pid in _processes_naming(str(path)):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_pure_fp16_next_steps_keep_the_regime_and_no_scaler() -> None:
    """Pure fp16 trains without GradScaler (its gradients are fp16): no loss-scale step, and
    the commands it suggests keep --regime pure."""
    result = runner.invoke(app, ["analyze", str(SAMPLES / "ffn_overflow.py"), "--regime", "pure", "--quiet"], env=ENV)
    assert result.exit_code == 0, result.stderr
    steps = _next_steps(result.stdout)
    assert not any("loss scale" in s for s in steps), steps
    assert f"analyze {SAMPLES / 'ffn_overflow.py'} --regime pure --export plan.py" in steps[0]
    (bf16,) = [s for s in steps if s.startswith("bf16")]
    # Its verdict (AdamW's default step, measured in the pure regime, loses updates of the
    # sample's large weights in bf16 too) or the command to check it, in the pure regime.
    assert bf16.startswith("bf16 is not safe either") or bf16.endswith("--regime pure --dtype bf16"), bf16
    assert "precision-doctor" not in bf16 or "--regime pure" in bf16, bf16


def test_a_deepspeed_export_without_per_module_dtypes_points_at_the_python_export(tmp_path: Path) -> None:
    """DeepSpeed without torch autocast runs every module low: the next step says so and
    names the python export, which carries the plan's fp32 units."""
    from precision_doctor.planning.export import carries_module_dtypes

    if carries_module_dtypes("deepspeed"):
        pytest.skip("the installed DeepSpeed applies per-module dtypes itself")
    config = tmp_path / "ds.json"
    args = ["analyze", str(SAMPLES / "attention_unscaled.py"), "--quiet", "--no-bf16-check"]
    result = runner.invoke(app, [*args, "--export", str(config), "--export-format", "deepspeed"], env=ENV)
    assert result.exit_code == 0, result.stderr
    steps = _next_steps(result.stdout)
    assert steps[0].startswith(f"{config} runs every module in fp16; apply the plan's "), steps
    assert steps[0].endswith("--export plan.py") and not steps[0].startswith("apply the plan written")
    # The count is of the modules the note names (the loss unit is fp32 under autocast anyway).
    flat = " ".join(result.stdout.split())
    named = re.search(r"the plan keeps (.+?) in fp32", flat)
    assert named is not None, flat
    assert f"apply the plan's {len(named.group(1).split(', '))} fp32 module(s)" in steps[0], (named.group(1), steps)


def test_an_hf_export_points_at_the_python_export_for_its_fp32_modules(tmp_path: Path) -> None:
    """The hf export is TrainingArguments (every module in the low dtype): its next step
    names the python export for the plan's fp32 modules, as its note does ("apply the plan
    written to hf.py" sent the user to a file that holds no plan)."""
    export = tmp_path / "hf.py"
    args = ["analyze", str(SAMPLES / "attention_unscaled.py"), "--quiet", "--no-bf16-check"]
    result = runner.invoke(app, [*args, "--export", str(export), "--export-format", "hf"], env=ENV)
    assert result.exit_code == 0, result.stderr
    flat = " ".join(result.stdout.split())
    named = re.search(r"these TrainingArguments run every module in fp16; the plan keeps (.+?) in fp32", flat)
    assert named is not None, flat
    (step,) = [s for s in _next_steps(result.stdout) if "fp32 module(s)" in s]
    assert step.startswith(f"{export} runs every module in fp16; apply the plan's {len(named.group(1).split(', '))} ")
    assert step.endswith("--export plan.py")
    assert not any(s.startswith("apply the plan written") for s in _next_steps(result.stdout))


def test_app_writes_a_saved_report_as_html(saved_report: Path, tmp_path: Path) -> None:
    """`app REPORT --html OUT`: the saved report as standalone HTML, nothing served (a report
    with a ScalerMonitor's run had no other way to its HTML Training section); a report that
    cannot be read writes nothing."""
    out = tmp_path / "r.html"
    result = runner.invoke(app, ["app", str(saved_report), "--html", str(out)], env=ENV)
    assert result.exit_code == 0, result.stderr
    report = Report.load(saved_report)
    text = out.read_text()
    assert all(html.escape(u.name) in text for u in report.units) and html.escape(report.verdict.split(";")[0]) in text
    bad = tmp_path / "bad.html"
    result = runner.invoke(app, ["app", str(tmp_path / "missing.json"), "--html", str(bad)], env=ENV)
    assert result.exit_code == 2 and "does not exist" in result.stderr and not bad.exists()


BN_CNN = """
import torch
from torch import nn

_g = torch.Generator().manual_seed(0)
X = torch.randn(8, 3, 16, 16, generator=_g)
Y = torch.randint(0, 10, (8,), generator=_g)


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def make_batch():
    return X


def loss_fn(out, batch):
    return nn.functional.cross_entropy(out, Y)
"""


def test_pure_fp16_analyze_checks_the_optimizer_step_by_default(tmp_path: Path) -> None:
    """A new user's `analyze --regime pure` of a CNN said "Safe to train" while pure fp16
    AdamW makes weights NaN in its first step (eps is 0 in fp16): the pure regime holds the
    weights low, so the CLI measures the step by default (AdamW at the default lr), and says
    which optimizer it stepped."""
    from precision_doctor.analysis.optimizer_step import DEFAULT_LR

    model = tmp_path / "cnn.py"
    model.write_text(BN_CNN)
    out = tmp_path / "r.json"
    args = ["analyze", str(model), "--regime", "pure", "--quiet", "--no-bf16-check"]
    result = runner.invoke(app, [*args, "--out", str(out)], env=ENV)
    assert result.exit_code == 0, result.stderr
    report = Report.load(out)
    step = report.optimizer_step
    assert step is not None and step.optimizer == "AdamW" and step.lr == DEFAULT_LR
    lost = [f for f in report.flags() if f.flag.value == "LOST_UPDATE" and f.severity.value == "error"]
    assert lost and "Not safe as-is" in report.verdict and "Safe to train" not in result.stdout
    # The commands it suggests carry no --lr the user did not give.
    assert "--lr" not in "\n".join(_next_steps(result.stdout))


def test_a_pure_verdict_without_an_optimizer_step_says_it_was_not_checked(tmp_path: Path) -> None:
    """Through the API (no lr, no build_optimizer) a pure report has no step: its verdict
    says so rather than a bare "Safe to train"."""
    path = tmp_path / "healthy.py"
    path.write_text(HEALTHY_FILE)
    spec = load_model_file(path)
    report = pd.analyze(spec.model, spec.batch, spec.loss_fn, dtype="bf16", regime="pure")
    assert report.optimizer_step is None and report.safe  # the precondition: a clean model
    assert report.verdict.endswith(
        "its optimizer step on low weights was not checked (--lr or analyze(lr=...), or build_optimizer)."
    )
    autocast = pd.analyze(spec.model, spec.batch, spec.loss_fn, dtype="bf16")
    assert autocast.verdict.endswith("Safe to train in this dtype."), autocast.verdict


def test_the_app_names_a_preflight_result_or_a_monitor_file_for_what_it_is(tmp_path: Path) -> None:
    """`app pf.json` on `preflight --json`'s output said "has schema_version 2; precision-doctor
    reads 9", which reads as a version mismatch: it names the file's kind and the command that
    writes a report instead. The same for a GradScaler monitor file."""
    from precision_doctor.training.monitor import ScalerMonitor

    pf = tmp_path / "pf.json"
    result = runner.invoke(
        app, ["preflight", str(SAMPLES / "tiny_transformer.py"), "--json", "--steps", "1", "--no-plan"], env=ENV
    )
    assert result.exit_code in (0, 1), result.stderr
    pf.write_text(result.stdout)
    assert json.loads(pf.read_text())["schema_version"] != Report.model_fields["schema_version"].default
    monitor = tmp_path / "scaler.json"
    ScalerMonitor(torch.amp.GradScaler("cpu", enabled=False), path=monitor).save()
    for path, kind in ((pf, "a pre-flight result"), (monitor, "a GradScaler monitor file")):
        shown = runner.invoke(app, ["app", str(path), "--html", str(tmp_path / "r.html")], env=ENV)
        assert shown.exit_code == 2, shown.stdout
        (line,) = shown.stderr.strip().splitlines()
        assert f"{path} is {kind}" in line and "schema_version" not in line, line
        assert not (tmp_path / "r.html").exists()
