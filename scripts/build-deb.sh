#!/usr/bin/env bash
# Build the Debian package of this checkout: scripts/build-deb.sh [OUTDIR]  (default build/deb)
#
# Copies the source (tracked and untracked-but-not-ignored files, so work in progress builds too)
# into OUTDIR/xnbdd-<version>/ with packaging/debian as its debian/, runs dpkg-buildpackage for the
# binary package, then lintian. Prints the path of the .deb on the last line.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$(realpath -m "${1:-$repo/build/deb}")
version=$(dpkg-parsechangelog -l "$repo/packaging/debian/changelog" -S Version)
src=$out/xnbdd-$version

rm -rf "$out"
mkdir -p "$src"
# Skip files that git lists but that are deleted in the work tree.
(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
    | grep -zv -e '^packaging/debian/' -e '^\.ci/' \
    | while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done \
    | xargs -0 -r cp --parents -t "$src")
cp -r "$repo/packaging/debian" "$src/debian"

# Debian's own interpreter and tools only: a pyenv or venv python3 earlier on PATH would build
# against the wrong Python.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset VIRTUAL_ENV PYTHONPATH PYTHONHOME
(cd "$src" && dpkg-buildpackage -us -uc -b >"$out/build.log" 2>&1) || {
    tail -n 60 "$out/build.log" >&2
    echo "build-deb: dpkg-buildpackage failed, full log in $out/build.log" >&2
    exit 1
}
deb=$(ls "$out"/xnbdd_"$version"_all.deb)
changes=$(ls "$out"/xnbdd_"$version"_*.changes)
echo "== lintian $(basename "$changes")"
# Errors fail the build; warnings and info are shown for the record.
lintian --fail-on error --info "$changes"
echo "$deb"
