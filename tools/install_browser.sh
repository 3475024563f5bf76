#!/usr/bin/env bash
# Debian's chromium and chromium-driver, for the fleet map's headless browser test
# (tests/cli/test_fleet_page_browser.py).  Idempotent: does nothing when both are on PATH.
# `make browser` runs it; the test's fixture runs it too when the browser is missing, and skips
# (saying why) only when it cannot install (not root and no sudo, no apt-get, no network).
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: apt-get not found (Debian's chromium and chromium-driver needed)" >&2
    exit 3
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_browser: need root (or passwordless sudo) to apt-get install chromium" >&2
        exit 3
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
$SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    chromium chromium-driver
command -v chromium >/dev/null && command -v chromedriver >/dev/null
