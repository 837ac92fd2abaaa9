#!/usr/bin/env bash
# Installs Debian's Chromium and its WebDriver when missing: the browser test of the chat page
# (tests/test_server_page.py) drives the real browser through Selenium, offline. Called by
# run_tests.sh; safe to re-run (nothing happens when both are there). Needs apt-get and root,
# as CI has; elsewhere it says once what to install and the browser test says it again.
set -euo pipefail

say() { echo "[setup] $*" >&2; }

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
    say "chromium + chromium-driver are missing and this is not root on Debian: install them (apt-get install chromium chromium-driver) for the browser test"
    exit 0
fi
say "installing Debian's chromium and chromium-driver (browser test of the chat page)"
export DEBIAN_FRONTEND=noninteractive
log="$(mktemp)"
if ! { apt-get update -q && apt-get install -y -q --no-install-recommends chromium chromium-driver; } >"$log" 2>&1; then
    say "apt-get could not install chromium chromium-driver ($(tail -n 1 "$log")): the browser test will fail until they are installed"
    rm -f "$log"
    exit 0
fi
rm -f "$log"
