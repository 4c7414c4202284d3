#!/usr/bin/env bash
# Installs what the browser tests need from Debian (headless Chromium and its WebDriver), only when missing.
# Called by `make test`; nothing is downloaded at test time.
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "test_setup: /usr/bin/chromium or /usr/bin/chromedriver is missing and apt-get is not available;" \
         "install chromium and chromium-driver by hand" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver
