#!/usr/bin/env bash
# Installs what tests/test_browser.py needs, from nothing: Debian's chromium (no browser
# download from playwright's CDN, which CI cannot reach) and the playwright python driver.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core
python -m pip install "playwright>=1.40"
test -x /usr/bin/chromium
/usr/bin/chromium --version
