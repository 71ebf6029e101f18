"""The built wheel works on its own: built from a copy of the sources, installed (`--no-deps`)
into a fresh virtual environment, and run from outside the repository - `analyze` writes a
report and `app` serves it.

The environment sees the running interpreter's site-packages (torch and streamlit are not
downloaded again) - those of the venv the suite runs in, if any, which `--system-site-packages`
would not give: it exposes the *base* interpreter's. They are listed in a `.pth` file, so
their own `.pth` files (an editable install of this checkout) are not run; the test asserts
that the package is imported from the environment's own site-packages, not from the source
tree."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

from .test_browser import free_port, stop, wait_healthy

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def version(python: Path, cwd: Path, env: dict[str, str]) -> str:
    return run([str(python), "-c", "import precision_doctor; print(precision_doctor.__version__)"], cwd, env).strip()


def test_wheel_installs_and_runs(tmp_path: Path) -> None:
    # Nothing of the source tree on any path: no PYTHONPATH, the cwd outside the repository.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1", STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    work = tmp_path / "work"
    work.mkdir()

    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(
        REPO / "precision_doctor", src / "precision_doctor", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    dist = tmp_path / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
        cwd=work,
        env=env,
    )
    (wheel,) = dist.glob("precision_doctor-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "precision_doctor/views/streamlit_app.py" in names
    assert "precision_doctor/py.typed" in names

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=work, env=env)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / "python"
    outer = [p for p in (*site.getsitepackages(), site.getusersitepackages()) if Path(p).is_dir()]
    own = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=work, env=env)
    (Path(own.strip()) / "_outer_site_packages.pth").write_text("\n".join(outer) + "\n", encoding="utf-8")
    # The outer pip installs into the venv it runs in; --ignore-installed: the editable
    # install of this checkout must not count as installed.
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(wheel)], cwd=work, env=env)
    where = run(
        [
            str(python),
            "-c",
            "import precision_doctor, sysconfig; "
            "print(precision_doctor.__file__); print(sysconfig.get_paths()['purelib'])",
        ],
        cwd=work,
        env=env,
    )
    module_file, purelib = (Path(line).resolve() for line in where.split())
    assert module_file.is_relative_to(purelib), f"imported from {module_file}, not the venv's {purelib}"
    assert purelib.is_relative_to(venv.resolve()) and not module_file.is_relative_to(REPO)

    cli = bindir / "precision-doctor"
    run(
        [str(cli), "analyze", str(REPO / "sample_models" / "tiny_transformer.py"), "--out", "r.json"], cwd=work, env=env
    )
    report = json.loads((work / "r.json").read_text(encoding="utf-8"))
    assert report["units"] and report["environment"]["tool_version"] == version(python, work, env)

    port = free_port()
    log = tmp_path / "app.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(cli), "app", "r.json", "--headless", "--port", str(port)],
            cwd=work,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        health = f"http://127.0.0.1:{port}/_stcore/health"
        wait_healthy(proc, health, log, timeout=60)
        with urllib.request.urlopen(health, timeout=5) as r:
            assert r.read().strip() == b"ok"
    finally:
        stop(proc)
