"""Remake docs/images/app.png: the app on a real report, captured in headless Chromium.

    PYTHONPATH=. python scripts/docs_screenshot.py [sample_models/ffn_overflow.py]

Needs `.ci/install_browser.sh` (Debian's /usr/bin/chromium and playwright), as
tests/test_browser.py does. The report is written by `precision-doctor analyze --out`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "images" / "app.png"
CLI = [sys.executable, "-c", "from precision_doctor.cli import main; main()"]


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "sample_models/ffn_overflow.py"
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([*CLI, "analyze", model, "--out", str(report), "--quiet"], check=True, cwd=ROOT)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        env = {**os.environ, "STREAMLIT_SERVER_ADDRESS": "127.0.0.1", "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
        proc = subprocess.Popen(
            [*CLI, "app", str(report), "--port", str(port), "--headless"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(400):
                try:
                    with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2):
                        break
                except OSError:
                    time.sleep(0.3)
            from playwright.sync_api import sync_playwright

            with sync_playwright() as p:
                browser = p.chromium.launch(
                    executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox", "--disable-gpu"]
                )
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                page.goto(base, wait_until="domcontentloaded")
                page.get_by_text("Not safe as-is").first.wait_for(timeout=90_000)
                time.sleep(5)  # let the page finish drawing
                OUT.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(OUT))
                browser.close()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
    print(f"{OUT}: {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
