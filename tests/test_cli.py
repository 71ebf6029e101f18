"""The CLI: exit codes, one-line errors, --debug, --out and the golden output.

In-process through typer's CliRunner; a few runs as a real subprocess for the true exit code
and stderr. Model files are written to tmp_path."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from precision_doctor.cli import app
from precision_doctor.report import Report, check_writable

from .fixtures import HEALTHY_FILE

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "sample_models" / "tiny_transformer.py"
GOLDEN = Path(__file__).parent / "golden" / "analyze_tiny_transformer.txt"
ENV = {"COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"}

runner = CliRunner()


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["analyze", *args], env=ENV)


def cli_run(*args: str) -> subprocess.CompletedProcess[str]:
    """The real process, any subcommand."""
    env = {**os.environ, **ENV}
    return subprocess.run(
        [sys.executable, "-m", "precision_doctor.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )


def subprocess_run(*args: str) -> subprocess.CompletedProcess[str]:
    return cli_run("analyze", *args)


def write(tmp_path: Path, body: str, name: str = "model.py") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


# Numbers compared with an independent reference: CI runs these again at one thread (.ci/run).
pytestmark = pytest.mark.numerics

_MODEL_OK = """
import torch
from torch import nn
def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
def make_batch():
    return torch.randn(8, 4)
"""

BAD_FILES = {
    "syntax-error": ("def build_model(:\n    pass\n", "syntax error"),
    "no-build-model": ("import torch\ndef make_batch():\n    return torch.randn(2, 2)\n", "neither build_model"),
    "build-model-raises": (
        "def build_model():\n    raise RuntimeError('cannot build')\ndef make_batch():\n    return 1\n",
        "build_model() raised RuntimeError: cannot build",
    ),
    "make-batch-raises": (
        _MODEL_OK.replace("return torch.randn(8, 4)", "raise ValueError('no data')")
        + "def loss_fn(o, b):\n    return o.mean()\n",
        "make_batch() raised ValueError: no data",
    ),
    "forward-raises": (
        "import torch\nfrom torch import nn\n"
        "class M(nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.l = nn.Linear(4, 4)\n"
        "    def forward(self, x):\n        raise IndexError('bad index in forward')\n"
        "def build_model():\n    return M()\ndef make_batch():\n    return torch.randn(2, 4)\n"
        "def loss_fn(o, b):\n    return o.mean()\n",
        "forward raised IndexError: bad index in forward",
    ),
    "no-loss": (_MODEL_OK, "cannot find the loss"),
    "nonfinite-loss": (
        _MODEL_OK + "def loss_fn(o, b):\n    return (o * float('inf')).sum() * 0.0\n",
        "fp32 loss is nan",
    ),
    "make-batch-exits": (
        _MODEL_OK.replace("return torch.randn(8, 4)", "raise SystemExit(3)"),
        "make_batch() called sys.exit(3)",
    ),
    "loss-fn-exits": (
        _MODEL_OK + "import sys\ndef loss_fn(o, b):\n    sys.exit(0)\n",
        "loss_fn raised SystemExit",
    ),
    # A model already in bf16 would be its own reference: no error anywhere, silently.
    "bf16-model": (
        _MODEL_OK.replace("nn.Linear(8, 1))", "nn.Linear(8, 1)).to(torch.bfloat16)")
        + "def loss_fn(o, b):\n    return o.float().mean()\n",
        "parameter '0.weight' is bfloat16: the analysis needs the fp32 model",
    ),
}


def _assert_one_line_error(stderr: str, expected: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("precision-doctor: error: "), stderr
    assert expected in lines[0]
    assert "Traceback" not in stderr


def test_model_file_classes_are_named_by_the_file(tmp_path: Path) -> None:
    """Plan exports name module classes (DeepSpeed's lower_precision_safe_modules): as the
    user's code imports them (`my_blocks.Net`), not by a random name, and without putting the
    file in sys.modules, where it could shadow a module of the same name."""
    import sys

    from precision_doctor.model.spec import load_model_file

    body = "import torch\nclass Net(torch.nn.Linear):\n    pass\ndef build_model():\n    return Net(2, 1)\n"
    body += "def make_batch():\n    return torch.ones(1, 2)\n"
    spec = load_model_file(write(tmp_path, body, "my_blocks.py"))
    assert f"{type(spec.model).__module__}.{type(spec.model).__qualname__}" == "my_blocks.Net"
    assert "my_blocks" not in sys.modules
    odd = load_model_file(write(tmp_path, body, "my-blocks.py"))  # not an identifier
    assert type(odd.model).__module__.startswith("_precision_doctor_model_")


@pytest.mark.parametrize(
    ("name", "expected"),
    [("nope.py", "does not exist"), ("folder.py", "is a directory"), ("folder", "is a directory")],
)
def test_model_file_that_is_no_file(tmp_path: Path, name: str, expected: str) -> None:
    (tmp_path / "folder.py").mkdir()
    (tmp_path / "folder").mkdir()
    result = invoke(str(tmp_path / name), "--quiet")
    assert result.exit_code == 2
    _assert_one_line_error(result.stderr, f"model file {tmp_path / name} {expected}")
    assert result.stdout == ""


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_model_file_exit_2(tmp_path: Path, kind: str) -> None:
    body, expected = BAD_FILES[kind]
    path = write(tmp_path, body)
    result = invoke(str(path), "--quiet")
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    _assert_one_line_error(result.stderr, expected)


def test_bad_model_file_subprocess(tmp_path: Path) -> None:
    """The real process: exit code 2 and one line on stderr, no traceback."""
    body, expected = BAD_FILES["forward-raises"]
    path = write(tmp_path, body)
    proc = subprocess_run(str(path), "--quiet")
    assert proc.returncode == 2, proc.stderr
    _assert_one_line_error(proc.stderr, expected)
    assert proc.stdout == ""


def test_debug_shows_traceback_with_the_same_exit_code(tmp_path: Path) -> None:
    """`--debug` adds the traceback and keeps the exit code: bad input stays 2 (a raised
    exception would exit 1, which is `preflight`'s NO-GO)."""
    body, expected = BAD_FILES["forward-raises"]
    path = write(tmp_path, body)
    assert invoke(str(path), "--quiet", "--debug").exit_code == 2
    proc = subprocess_run(str(path), "--quiet", "--debug")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert expected in proc.stderr
    assert "IndexError" in proc.stderr
    for cmd in (["preflight", str(tmp_path / "missing.py")], ["app", str(path)]):
        proc = cli_run(*cmd, "--debug")
        assert proc.returncode == 2, (cmd, proc.stderr[-500:])
        assert "Traceback" in proc.stderr and "PrecisionDoctorError" in proc.stderr


def test_threshold_bogus(tmp_path: Path) -> None:
    path = write(tmp_path, HEALTHY_FILE)
    result = invoke(str(path), "--quiet", "--threshold", "bogus=1")
    assert result.exit_code == 2
    _assert_one_line_error(result.stderr, "unknown threshold 'bogus'")
    result = invoke(str(path), "--quiet", "--threshold", "underflow_fraction=lots")
    assert result.exit_code == 2
    _assert_one_line_error(result.stderr, "is not a number")
    result = invoke(str(path), "--quiet", "--threshold", "no_equals_sign")
    assert result.exit_code == 2
    _assert_one_line_error(result.stderr, "NAME=VALUE")
    # NaN compares false with everything: it would switch the flag off without a word.
    for bad, expected in (
        ("divergence_rel_error=nan", "finite number >= 0"),
        ("divergence_rel_error=-1", "finite number >= 0"),
        ("underflow_fraction=1.5", "at most 1"),
        ("grad_scale_log2=30", "not a whole number in 0..24"),
        ("grad_scale_log2=16.5", "not a whole number in 0..24"),
    ):
        result = invoke(str(path), "--quiet", "--threshold", bad)
        assert result.exit_code == 2, bad
        _assert_one_line_error(result.stderr, expected)


_healthy: list = []


def healthy_run():  # type: ignore[no-untyped-def]
    """One in-process run on the healthy sample, shared by the verdict and golden tests."""
    if not _healthy:
        _healthy.append(invoke(str(TINY), "--quiet"))
    return _healthy[0]


def test_healthy_sample_exit_0_and_verdict() -> None:
    result = healthy_run()
    assert result.exit_code == 0, result.stderr
    assert re.search(r"^fp16: no unit flagged; final-loss error \S+ against fp32\. Safe to train", result.stdout, re.M)
    assert result.stderr == ""


def test_out_writes_report_round_trip(tmp_path: Path) -> None:
    model = write(tmp_path, HEALTHY_FILE)
    out = tmp_path / "reports" / "r.json"
    umask = os.umask(0o022)  # where a 0600 temp file would show (under 077 the two agree)
    try:
        result = invoke(str(model), "--quiet", "--out", str(out))
    finally:
        os.umask(umask)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert f"report written to {out}" in result.stdout.replace("\n", "")
    saved = out.read_text()
    assert out.stat().st_mode & 0o777 == 0o644  # a plain open()'s mode under that umask
    loaded = Report.load(out)
    assert loaded.to_json() == saved  # what --out saved is exactly what loads
    again = tmp_path / "again.json"
    loaded.save(again)
    assert Report.load(again) == loaded
    # atomic: nothing but the report next to it
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]
    assert not list(tmp_path.glob("**/*.tmp"))


def test_out_to_unwritable_target_exit_2(tmp_path: Path) -> None:
    """--out under a path whose 'folder' is a regular file: a user error, not a crash.
    (The tests run as root in CI, so chmod cannot make a folder unwritable.)"""
    model = write(tmp_path, HEALTHY_FILE)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = invoke(str(model), "--quiet", "--out", str(blocker / "deeper" / "r.json"))
    assert result.exit_code == 2, (result.stderr, result.exception)
    _assert_one_line_error(result.stderr, "is not a directory")
    assert result.stdout == ""  # refused before the analysis ran
    assert blocker.read_text() == "x"
    # --out naming an existing folder: refused before the analysis runs
    result = invoke(str(model), "--quiet", "--out", str(tmp_path))
    assert result.exit_code == 2, (result.stderr, result.exception)
    _assert_one_line_error(result.stderr, "it is a directory")
    assert result.stdout == ""  # no report printed: nothing ran
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_out_on_a_file_system_that_takes_no_files_exit_2_before_the_analysis(tmp_path: Path) -> None:
    """--out /proc/r.json: /proc passes os.access (as root, every folder does), so the whole
    analysis ran before the write failed. A file made and removed at once tells first."""
    model = write(tmp_path, HEALTHY_FILE)
    result = invoke(str(model), "--quiet", "--out", "/proc/precision-doctor-r.json")
    assert result.exit_code == 2, (result.stderr, result.exception)
    _assert_one_line_error(result.stderr, "cannot write /proc/precision-doctor-r.json")
    assert result.stdout == ""  # refused before the analysis ran
    out = tmp_path / "sub" / "r.json"  # a writable folder leaves no probe behind
    check_writable(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [model.name]


def test_two_outputs_on_one_path_exit_2(tmp_path: Path) -> None:
    model = write(tmp_path, HEALTHY_FILE)
    same = tmp_path / "r.json"
    result = invoke(str(model), "--quiet", "--out", str(same), "--export", str(tmp_path / "." / "r.json"))
    assert result.exit_code == 2, (result.stderr, result.exception)
    _assert_one_line_error(result.stderr, "--out and --export both name")
    assert not same.exists()


def test_an_output_naming_the_model_file_exit_2(tmp_path: Path) -> None:
    """`--export model.py` on the model file itself: refused before the analysis, the model
    file as it was (it was replaced by the plan)."""
    model = write(tmp_path, HEALTHY_FILE)
    before = model.read_text()
    result = invoke(str(model), "--quiet", "--export", str(tmp_path / "." / model.name))
    assert result.exit_code == 2, (result.stderr, result.exception)
    _assert_one_line_error(result.stderr, "--export names the model file")
    assert model.read_text() == before


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes and symbolic links")
def test_outputs_write_through_a_link_and_refuse_a_pipe(tmp_path: Path) -> None:
    """A symbolic link is written through (the file it names gets the report, the link stays);
    a named pipe (or a device) is refused in one line rather than replaced by a file."""
    model = write(tmp_path, HEALTHY_FILE)
    target = tmp_path / "reports" / "r.json"
    target.parent.mkdir()
    link = tmp_path / "latest.json"
    link.symlink_to(target)
    result = invoke(str(model), "--quiet", "--out", str(link))
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert link.is_symlink() and Report.load(target).model
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    result = invoke(str(model), "--quiet", "--out", str(fifo))
    assert result.exit_code == 2, (result.stderr, result.exception)
    _assert_one_line_error(result.stderr, "not a regular file")
    assert not fifo.is_file()


# --- golden --------------------------------------------------------------------------------

# Measured numbers (a decimal point or an exponent); integers - unit and op counts, the
# loss scale's power of two, severities' counts - are what the code decides, held exactly.
_MEASURED = re.compile(r"(?<![\w.^])\d+\.\d+(?:e[-+]?\d+)?|(?<![\w.^])\d+e[-+]?\d+")


def _numbers_agree(got: float, want: float) -> bool:
    """Within what another CPU's kernels may change. fp32 losses: a sum over ~1e3 terms in
    another order moves the last digits (1e-4 relative is ~n * 2^-24). Errors against fp32
    (< 1e-2): statistics of fp16/bf16 rounding, where an fp32 result one ulp off rounds to
    the other low-precision neighbour - measured 0.000768 here against 0.000756 on an AVX2
    EPYC, so 25%. Cosines near 1: 1e-5 absolute."""
    if abs(want) < 1e-2:
        return math.isclose(got, want, rel_tol=0.25, abs_tol=1e-9)
    if 0.99 <= want <= 1.0:
        return abs(got - want) <= 1e-5
    return math.isclose(got, want, rel_tol=1e-4)


# What GradScaler's default scale flushes: a handful of this model's gradient elements (2e-6
# of them here) lie next to 2^-24, so another CPU's kernels move them across it and the note
# comes or goes; the recommended scale beside it is what the output decides and stays held.
_FLUSH_NOTE = re.compile(r" \(at the default 2\^\d+, [^)]*\)")


def _split(text: str) -> tuple[str, list[float]]:
    text = "\n".join(line.rstrip() for line in text.splitlines()) + "\n"
    text = _FLUSH_NOTE.sub("", text)
    return _MEASURED.sub("<n>", text), [float(m) for m in _MEASURED.findall(text)]


def test_golden_output_tiny_transformer() -> None:
    """The text is held exactly (flags, severities, verdict, structure, counts); each measured
    number within what another CPU's kernels may change (`_numbers_agree`)."""
    result = healthy_run()
    assert result.exit_code == 0, result.stderr
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text("\n".join(line.rstrip() for line in result.stdout.splitlines()) + "\n")
    assert GOLDEN.exists(), "run with UPDATE_GOLDEN=1 to create the golden file"
    got_text, got = _split(result.stdout)
    want_text, want = _split(GOLDEN.read_text())
    assert got_text == want_text
    off = [(g, w) for g, w in zip(got, want, strict=True) if not _numbers_agree(g, w)]
    assert not off, off


def test_golden_comparison_catches_a_changed_number() -> None:
    text = GOLDEN.read_text()
    assert _split(text)[0].count("<n>") >= 5  # the losses, errors and cosines are compared
    _, want = _split(text)
    assert not _numbers_agree(want[0] * 1.01, want[0])  # a loss 1% off
    assert _numbers_agree(0.000756, 0.000768) and not _numbers_agree(0.0015, 0.000768)


def test_next_steps_keep_the_options_that_shaped_the_plan() -> None:
    """The commands the next steps suggest carry --lr and --tolerance (and --target): without
    them the suggested run plans another model of training (a pure plan checked at lr 1e-3
    where the user trains at 1e-5 lost ~94% of its updates)."""
    sample = Path(__file__).resolve().parents[1] / "sample_models" / "reduction_overflow.py"
    result = invoke(
        str(sample),
        "--regime",
        "pure",
        "--lr",
        "1.2345678e-5",
        "--tolerance",
        "0.001",
        "--target",
        "a100",
        "--no-bf16-check",
    )
    assert result.exit_code == 0, (result.stderr, result.exception)
    suggested = [line for line in result.stdout.splitlines() if "precision-doctor analyze" in line]
    assert suggested
    for line in suggested:
        # Every digit kept: a rounded lr is another plan.
        assert "--lr 1.2345678e-05" in line and "--tolerance 0.001" in line and "--target a100" in line, line


def test_a_rank_failing_before_the_job_forms_names_itself(tmp_path: Path) -> None:
    """Under torchrun, a failure before the CLI joins the process group (a model file or a
    make_batch() that fails on one rank) names the rank torchrun gave the process; it did not,
    so a one-rank failure read as the job's."""
    missing = str(tmp_path / "nosuch.py")
    result = runner.invoke(app, ["analyze", missing], env={**ENV, "RANK": "1", "WORLD_SIZE": "2"})
    assert result.exit_code == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("precision-doctor: rank 1: error: model file"), result.stderr
    alone = runner.invoke(app, ["analyze", missing], env={**ENV, "RANK": "0", "WORLD_SIZE": "1"})
    assert alone.exit_code == 2 and "precision-doctor: rank" not in alone.stderr
