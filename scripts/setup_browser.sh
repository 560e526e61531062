#!/usr/bin/env bash
# Headless Chromium (Debian's `chromium` package) for the tests that load the HTML replay report
# in a real browser (tests/report/report_page.py). Idempotent; exits non-zero with a reason when
# it cannot be installed.
set -uo pipefail
for exe in chromium chromium-browser google-chrome; do
  if command -v "$exe" >/dev/null; then
    exit 0
  fi
done
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null; then
  echo "need Debian's chromium package (apt, as root) to test the HTML report in a browser"
  exit 1
fi
echo "installing chromium (headless, for the HTML report tests)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends chromium >/dev/null \
  || { echo "apt-get could not install chromium"; exit 1; }
