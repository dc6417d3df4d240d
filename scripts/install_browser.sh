#!/usr/bin/env bash
# Install the headless browser the playground test drives: Debian's chromium and its matching chromedriver.
# Needs root (or passwordless sudo) and apt-get; anywhere else it says so and exits 0, and the browser test
# skips with that reason. Selenium itself comes from the "dev" extra in pyproject.toml.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "install_browser: chromium and chromedriver are installed already"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: no apt-get here; the browser test will be skipped" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
        echo "install_browser: not root and no passwordless sudo; the browser test will be skipped" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver; }; then
    echo "install_browser: apt-get could not install chromium; the browser test will be skipped" >&2
fi
exit 0
