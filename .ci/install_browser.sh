#!/usr/bin/env bash
# Installs the browser tests/test_browser.py drives, from nothing: Debian's chromium (no browser
# download from playwright's CDN, which CI cannot reach). The playwright driver is in the dev extra.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core
test -x /usr/bin/chromium
/usr/bin/chromium --version
