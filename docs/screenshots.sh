#!/usr/bin/env bash
# Look at the built site as a reader would: serve site/ on 127.0.0.1 and take screenshots with
# headless Chromium (Debian package `chromium`) of the home page, a tutorial, an API page, a
# page with maths, and the search results for "likelihood". Output: docs/screenshots/*.png
# (git-ignored). Build first: `make docs` (or `mkdocs build --strict`).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
site="$root/site"
out="$root/docs/screenshots"
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
[ -n "$browser" ] || { echo "screenshots.sh: no chromium: apt-get install -y chromium" >&2; exit 2; }
[ -f "$site/index.html" ] || { echo "screenshots.sh: no built site in $site: run make docs" >&2; exit 2; }
mkdir -p "$out"
port="${PORT:-8765}"
python3 -m http.server "$port" --bind 127.0.0.1 --directory "$site" >/dev/null 2>&1 &
server=$!
trap 'kill "$server"' EXIT
for _ in $(seq 50); do  # wait until it serves
  python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" 2>/dev/null && break
  sleep 0.1
done
shot() {  # name, path (relative to the site root)
  "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,1000 \
    --virtual-time-budget="${BUDGET:-8000}" --run-all-compositor-stages-before-draw --screenshot="$out/$1.png" "http://127.0.0.1:$port/$2" \
    >/dev/null 2>&1
  echo "$out/$1.png"
}
shot home ""
shot tutorial "tutorials/toy-2d/"
shot api "reference/api/likelihood/"
shot maths "concepts/bits-per-dim/"
BUDGET=30000 shot search "concepts/notation/?q=likelihood"
