"""Start the Streamlit app (the packaged `streamlit_app.py` beside this module) on a saved report. The report is validated
here first, so a bad file is one line and exit code 2 rather than a page that fails later.

On POSIX the launcher then becomes Streamlit (`os.execve`): one process, the launcher's pid,
so a supervisor's SIGTERM, a container stop or Ctrl-C reaches the server itself and nothing is
left serving the port. (A child process would outlive a launcher killed before it.)"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.report import Report

APP_SCRIPT = Path(__file__).resolve().parent / "streamlit_app.py"
ENV_VAR = "PRECISION_DOCTOR_REPORT"


def streamlit_command(report_path: Path, *, port: int | None = None, headless: bool = False) -> list[str]:
    """The `streamlit run` command line for a report (already validated)."""
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP_SCRIPT),
        # No usage telemetry and no file watcher: the app only reads one report.
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
        "--server.address",
        "127.0.0.1",
    ]  # never listen beyond this machine
    if port is not None:
        cmd += ["--server.port", str(port)]
    if headless:
        cmd += ["--server.headless", "true"]
    return [*cmd, "--", str(report_path)]


def launch_app(report_path: str | os.PathLike[str], *, port: int | None = None, headless: bool = False) -> int:
    """Validate the report, then run the app until it exits: on POSIX this process becomes
    Streamlit and never returns; elsewhere, returns its exit code. A report another version of
    precision-doctor wrote is served with a one-line warning on stderr."""
    path = Path(report_path).resolve()
    if path.is_dir():
        raise PrecisionDoctorError(f"report {path} is a directory, not a JSON report")
    report = Report.load(path)  # raises PrecisionDoctorError with a one-line message
    if port is not None and not 0 < port < 65536:
        raise PrecisionDoctorError(f"--port must be in 1..65535, got {port}")
    if importlib.util.find_spec("streamlit") is None:
        raise PrecisionDoctorError("the app needs streamlit: pip install 'precision-doctor[app]'")
    if not APP_SCRIPT.is_file():
        raise PrecisionDoctorError(f"the app script is missing from the installed package (no {APP_SCRIPT})")
    warning = report.version_warning(str(path))
    if warning is not None:
        print(f"precision-doctor: warning: {warning}", file=sys.stderr)
    env = {**os.environ, ENV_VAR: str(path)}
    return run_streamlit(streamlit_command(path, port=port, headless=headless), env)


def run_streamlit(cmd: Sequence[str], env: Mapping[str, str]) -> int:
    """POSIX: replace this process with `cmd` (`os.execve`; returns only by raising OSError).
    Elsewhere (no exec that keeps the process): run it as a child and return its exit code."""
    if os.name != "posix":
        return subprocess.call(list(cmd), env=dict(env))
    sys.stdout.flush()  # what was printed before the exec, or it is lost with the buffers
    sys.stderr.flush()
    try:
        os.execve(cmd[0], list(cmd), dict(env))
    except OSError as e:
        raise PrecisionDoctorError(f"cannot start streamlit ({cmd[0]}): {e.strerror or e}") from None
