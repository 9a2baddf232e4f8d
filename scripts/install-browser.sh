#!/usr/bin/env bash
# Make a Chrome/Chromium available for static figure export (`mechcliff plot`: PDF / SVG / PNG through kaleido).
# Idempotent: does nothing when a browser is already there. Installing Debian's `chromium` needs root; `make setup`
# never runs this. Usage: scripts/install-browser.sh [--soft]   (--soft: warn instead of failing; used by .ci/run)
set -u
soft=0
[ "${1:-}" = "--soft" ] && soft=1

fail() {
    echo "install-browser: $*" >&2
    if [ "$soft" = 1 ]; then
        echo "install-browser: warning: continuing without a browser; PDF/SVG/PNG export tests will be skipped" >&2
        exit 0
    fi
    exit 1
}

for b in "${BROWSER_PATH:-}" /usr/bin/chromium; do
    if [ -n "$b" ] && [ -x "$b" ]; then echo "browser: $b"; exit 0; fi
done
for name in chromium chromium-browser google-chrome google-chrome-stable; do
    if p=$(command -v "$name" 2>/dev/null); then echo "browser: $p"; exit 0; fi
done
if [ "$(id -u)" != 0 ]; then
    fail "no Chrome/Chromium found and not root: run 'sudo make browser' (apt-get install -y chromium), or, without root, '.venv/bin/kaleido_get_chrome'"
fi
command -v apt-get >/dev/null 2>&1 \
    || fail "no Chrome/Chromium found and apt-get is not available: install Chrome or Chromium with the system's package manager, or run '.venv/bin/kaleido_get_chrome'"
export DEBIAN_FRONTEND=noninteractive
{ apt-get update && apt-get install -y chromium; } || fail "'apt-get install -y chromium' failed"
[ -x /usr/bin/chromium ] || fail "chromium was installed but /usr/bin/chromium is missing"
echo "browser: /usr/bin/chromium"
