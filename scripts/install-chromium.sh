#!/usr/bin/env bash
# Chromium, for the test that opens `clipstream eval`'s HTML report in a real
# browser (tests/eval.rs, the_html_report_renders_in_a_browser). Installs the
# Debian/Ubuntu package with apt-get when it is missing and this runs as
# root; else says what to do. Prints the browser's path.
#
#   scripts/install-chromium.sh
set -euo pipefail

find_browser() {
  for b in "${CLIPSTREAM_CHROMIUM:-}" chromium chromium-browser google-chrome; do
    [[ -n "$b" ]] && command -v "$b" 2>/dev/null && return 0
  done
  return 1
}

if find_browser; then exit 0; fi
if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  echo "installing chromium (headless, for the eval report test) ..." >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >&2
  find_browser && exit 0
fi
echo "error: no Chromium: install it (Debian/Ubuntu: apt-get install chromium) or set CLIPSTREAM_CHROMIUM" >&2
exit 1
