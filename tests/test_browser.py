"""End to end in a real browser: `precision-doctor app report.json` served on a loopback port
and opened in headless Chromium (Debian's package, driven by playwright; no browser download),
and the standalone HTML report opened from disk with the network blocked.

Needs `.ci/install_browser.sh`; skipped only when /usr/bin/chromium is absent."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import precision_doctor as pd
from precision_doctor.report import Report
from precision_doctor.views.html_report import write_html

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: run .ci/install_browser.sh")
EVIL = '<img src=x onerror="__pwned=1">'
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def report() -> Report:
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            [("inp", nn.Linear(16, 32)), ("act", nn.ReLU()), (EVIL, nn.Linear(32, 32)), ("out", nn.Linear(32, 4))]
        )
    )
    with torch.no_grad():
        model[2].weight.mul_(1e5)
    r = pd.analyze(model, torch.randn(8, 16), loss_fn=lambda o, b: o.pow(2).mean(), name="faulty")
    return r.with_extras(
        loss_scale={
            "recommended_scale_log2": 9,
            "default_scale_log2": 16,
            "underflow_fraction_at_recommended": 0.0,
            "underflow_fraction_at_default": 0.0,
            "skipped_steps_from_default": 7,
            "scaler_needed": True,
        }
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    w, h = struct.unpack(">II", data[16:24])
    return int(w), int(h)


@contextmanager
def browser(tmp_path: Path, width: int = 1280, height: int = 900) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh --user-data-dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=FLAGS,
            viewport={"width": width, "height": height},
        )
        try:
            yield ctx
        finally:
            ctx.close()


def wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the app exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"the app did not answer {url} in {timeout}s:\n{log.read_text(errors='replace')}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """The CLI runs streamlit as a child: signal the whole session we started."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextmanager
def serve_app(report: Report, tmp_path: Path) -> Iterator[str]:
    """`precision-doctor app report.json` on a free loopback port: yields its URL."""
    path = tmp_path / "report.json"
    report.save(path)
    port = free_port()
    log = tmp_path / "app.log"
    env = {**os.environ, "STREAMLIT_SERVER_ADDRESS": "127.0.0.1", "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from precision_doctor.cli import main; main()",
                "app",
                str(path),
                "--port",
                str(port),
                "--headless",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(proc, f"{base}/_stcore/health", log)
        yield base
    finally:
        stop(proc)


def test_app_in_chromium(report: Report, tmp_path: Path) -> None:
    with serve_app(report, tmp_path) as base, browser(tmp_path) as ctx:
        page = ctx.new_page()
        page.goto(base, wait_until="domcontentloaded")
        page.get_by_text(report.verdict).wait_for(timeout=90_000)
        assert report.verdict in page.inner_text("body")
        page.get_by_role("tab", name="Loss scale").click()
        page.get_by_text("Recommended initial scale").wait_for(timeout=30_000)
        page.locator(".js-plotly-plot .main-svg >> visible=true").first.wait_for(timeout=30_000)
        page.get_by_role("tab", name="Overview").click()
        shot = tmp_path / "app.png"
        page.screenshot(path=str(shot), full_page=True)
        assert page.evaluate("typeof window.__pwned") == "undefined"
    w, h = png_size(shot)
    assert w >= 800 and h >= 400 and shot.stat().st_size > 10_000


# --- a 60-unit model on a 1400 px screen -------------------------------------------------------
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.feed_forward_projection = nn.Linear(16, 16)
        self.activation_function = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation_function(self.feed_forward_projection(x))


class Deep(nn.Module):
    """A ReLU on integer inputs (exact in fp16: 0 error), then 29 Linear+ReLU blocks with long
    names, one scaled to overflow fp16: 60 units, flagged ones, Inf after the overflow."""

    def __init__(self, blocks: int = 29) -> None:
        super().__init__()
        self.input_rectifier = nn.ReLU()
        self.encoder_stack = nn.Sequential(*[Block() for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder_stack(self.input_rectifier(x))


@pytest.fixture(scope="module")
def deep() -> Report:
    torch.manual_seed(0)
    model = Deep()
    with torch.no_grad():
        model.encoder_stack[20].feed_forward_projection.weight.mul_(1e7)
    batch = torch.randint(-4, 5, (8, 16)).float()
    r = pd.analyze(model, batch, loss_fn=lambda o, b: o.pow(2).mean(), name="deep")
    assert len(r.units) == 60 and r.flagged_units()
    return r.with_extras(loss_scale=pd.recommend_loss_scale(r).to_extras())


SHOTS = os.environ.get("PRECISION_DOCTOR_SHOTS")
"""A folder to keep the screenshots in (they go to the test's tmp_path otherwise)."""

# Every per-unit figure: its tick labels drawn, none under the legend.
_AXIS_CHECK = """
el => {
  const ticks = [...el.querySelectorAll('.xaxislayer-above text')].filter(t => t.textContent.length);
  const legend = el.querySelector('.legend');
  const box = legend ? legend.getBoundingClientRect() : null;
  const hit = r => box && r.left < box.right && r.right > box.left && r.top < box.bottom && r.bottom > box.top;
  return {labels: ticks.map(t => t.textContent), under_legend: ticks.filter(t => hit(t.getBoundingClientRect())).length};
}
"""


def test_app_at_1400px_with_60_units(deep: Report, tmp_path: Path) -> None:
    """The wide app as a person sees it: no tab raises; the layer table shows every column
    (all headers drawn, nothing scrolled out of view); the overview's values are whole; the
    per-unit figures label their unit axis, clear of the legend."""
    from precision_doctor.views import figures
    from precision_doctor.views.streamlit_app import LAYER_COLUMNS

    shots = Path(SHOTS) if SHOTS else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    with serve_app(deep, tmp_path) as base, browser(tmp_path, width=1400, height=1800) as ctx:
        page = ctx.new_page()
        page.goto(base, wait_until="domcontentloaded")
        page.get_by_role("tab", name="Overview").wait_for(timeout=90_000)
        for tab in ["Overview", "Layers", "Unit detail", "Depth", "Gradients", "Loss scale"]:
            page.get_by_role("tab", name=tab).click()
            panel = page.locator('[role="tabpanel"] >> visible=true')
            if tab in ("Unit detail", "Depth", "Gradients", "Loss scale"):
                panel.locator(".js-plotly-plot .main-svg").first.wait_for(timeout=60_000)
            else:
                panel.locator('[data-testid="stDataFrame"], [data-testid="stTable"]').first.wait_for(timeout=60_000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(shots / f"app_1400_{tab.replace(' ', '_').lower()}.png"))
            assert page.locator('[data-testid="stException"]').count() == 0, tab
            assert page.locator('[data-testid="stAlertContentError"]').count() == 1, tab  # the verdict only

            if tab == "Overview":
                cells = panel.locator('[data-testid="stTable"] td')
                texts = cells.all_inner_texts()
                assert deep.environment.precision_text() in texts
                clipped = cells.evaluate_all("cs => cs.filter(c => c.scrollWidth > c.clientWidth + 1).length")
                assert clipped == 0
            if tab == "Layers":
                grid = panel.locator('[data-testid="stDataFrame"]').first
                headers = grid.locator('th[role="columnheader"]').all_inner_texts()
                expected = [LAYER_COLUMNS[c][0] if c in LAYER_COLUMNS else c for c in figures.layer_rows(deep)[0]]
                assert headers == expected  # every column drawn: the grid renders only those in view
                overflow = grid.locator(".dvn-scroller").evaluate("el => el.scrollWidth - el.clientWidth")
                assert overflow <= 1  # nothing to scroll to sideways
                flagged = grid.locator('td[aria-colindex="4"]').all_inner_texts()
                assert "GRAD_OVERFLOW" in flagged
            if tab in ("Depth", "Gradients"):
                plot = panel.locator(".js-plotly-plot").first
                axis = plot.evaluate(_AXIS_CHECK)
                units = [
                    u for u in figures.ordered_units(deep) if tab == "Depth" or u.backward.grad_fidelity is not None
                ]
                assert axis["labels"] == [figures.short_name(u.name) for u in units]
                assert axis["under_legend"] == 0
            if tab == "Loss scale":
                assert "all-low run" in panel.inner_text()


def test_standalone_html_in_chromium(report: Report, deep: Report, tmp_path: Path) -> None:
    """The HTML report opened from disk with every request refused: plotly.js (embedded once,
    under 1 MB in all for a small model) draws every figure; the page is never wider than
    the window, for a 4-unit and a 60-unit model, on a 1400 and a 900 px screen."""
    path = tmp_path / "report.html"
    write_html(report, path)
    text = path.read_text(encoding="utf-8")
    assert len(text.encode()) < 1_000_000
    assert text.count('id="pd-plotly"') == 1 and "* plotly.js" not in text  # one, gzipped copy
    expected = text.count('class="pd-plot"')
    assert expected >= 4
    deep_path = tmp_path / "deep.html"
    write_html(deep, deep_path)
    shots = Path(SHOTS) if SHOTS else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    fetched: list[str] = []
    with browser(tmp_path, width=1400, height=900) as ctx:

        def block(route: Any) -> None:
            # Standalone means no network at all: record and refuse anything but the file.
            url = route.request.url
            if url.startswith(("file:", "data:", "blob:")):
                route.continue_()
            else:
                fetched.append(url)
                route.abort()

        ctx.route("**/*", block)
        page = ctx.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(path.as_uri())
        page.wait_for_function(
            f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {expected}", timeout=60_000
        )
        plots = page.locator(".js-plotly-plot")
        assert plots.count() == expected
        assert page.locator("#verdict").inner_text() == report.verdict
        assert page.locator(".js-plotly-plot .bars").count() >= 1  # histograms drew their bars
        assert EVIL in page.inner_text("#layers")  # the name shown as text
        assert page.evaluate("typeof window.__pwned") == "undefined"
        assert page.locator("#pd-plotly-error").is_hidden()
        # The page's own white, as the app's (the shared template's paper colour).
        bg = page.locator(".js-plotly-plot .main-svg").first.evaluate("el => getComputedStyle(el).backgroundColor")
        assert bg in ("rgb(255, 255, 255)", "rgba(0, 0, 0, 0)")
        shot = tmp_path / "html.png"
        page.screenshot(path=str(shot), full_page=True)
        for width in (1400, 900):
            page.set_viewport_size({"width": width, "height": 900})
            for p in (path, deep_path):
                page.goto(p.as_uri())
                page.wait_for_function(
                    "document.querySelectorAll('.js-plotly-plot .main-svg').length"
                    " >= document.querySelectorAll('.pd-plot').length",
                    timeout=60_000,
                )
                page.wait_for_timeout(300)
                wide = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
                assert wide <= 0, (p.name, width, wide)
                if p == deep_path and width == 1400:
                    page.screenshot(path=str(shots / "html_1400_deep.png"), full_page=True)
        assert not errors, errors
    assert not fetched, fetched
    w, h = png_size(shot)
    assert w >= 800 and h >= 2000 and shot.stat().st_size > 10_000
