#!/usr/bin/env bash
# Copy KaTeX's browser files into docs/javascripts/katex/ so the site renders maths offline
# (no CDN at build or view time). The copied files are committed; run this only to change the
# KaTeX version. Needs npm (it fetches the package tarball from the npm registry once).
set -euo pipefail
VERSION="${1:-0.19.1}"
here="$(cd "$(dirname "$0")/.." && pwd)"
dest="$here/javascripts/katex"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "katex@$VERSION" >/dev/null && tar xzf "katex-$VERSION.tgz")
rm -rf "$dest"
mkdir -p "$dest/contrib" "$dest/fonts"
cp "$tmp/package/dist/katex.min.js" "$tmp/package/dist/katex.min.css" "$dest/"
cp "$tmp/package/dist/contrib/auto-render.min.js" "$dest/contrib/"
cp "$tmp/package/dist/fonts/"*.woff2 "$dest/fonts/"   # every browser that runs KaTeX reads woff2
cp "$tmp/package/LICENSE" "$dest/LICENSE"
echo "KaTeX $VERSION -> $dest"
