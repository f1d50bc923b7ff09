#!/usr/bin/env bash
# Build the Debian package of this checkout and check it with lintian:
#   scripts/build-deb.sh [--in ROOTFS] [OUTDIR]   (OUTDIR default build/deb)
#
# Copies the source (tracked and untracked-but-not-ignored files, so work in progress builds too)
# into OUTDIR/xnbdd-<version>/ with packaging/debian as its debian/, runs dpkg-buildpackage for the
# binary package, then lintian. Prints the path of the .deb on the last line.
#
# The package is built for the release of the system that runs dpkg-buildpackage: debhelper puts
# the units where that release wants them. --in ROOTFS builds in another release's tree instead
# (for example the tests' Debian 13 tree, tests/e2e/rootfs.py): the copy is made here, the build
# and lintian run in a throwaway systemd-nspawn container on ROOTFS (--volatile=overlay, so the
# tree is not changed) with OUTDIR bound in. The tree needs debhelper, dh-python,
# pybuild-plugin-pyproject, python3-all, the Build-Depends of packaging/debian/control and lintian.
#
#   scripts/build-deb.sh --staged SRC   is the build step alone, in an already copied SRC (what
#                                       runs inside the container).
set -euo pipefail

# Debian's own interpreter and tools only: a pyenv or venv python3 earlier on PATH would build
# against the wrong Python.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset VIRTUAL_ENV PYTHONPATH PYTHONHOME

build_staged() {
    local src out version deb changes
    src=$(realpath "$1")
    out=$(dirname "$src")
    version=$(dpkg-parsechangelog -l "$src/debian/changelog" -S Version)
    # Build-Depends are checked, not the implicit build-essential: an architecture-independent
    # Python package needs no compiler, and the tests' Debian 13 tree has none.
    (cd "$src" && dpkg-checkbuilddeps -I && dpkg-buildpackage -us -uc -b -d \
        >"$out/build.log" 2>&1) || {
        tail -n 60 "$out/build.log" >&2
        echo "build-deb: dpkg-buildpackage failed, full log in $out/build.log" >&2
        exit 1
    }
    deb=$(ls "$out"/xnbdd_"$version"_all.deb)
    changes=$(ls "$out"/xnbdd_"$version"_*.changes)
    echo "== lintian $(basename "$changes") ($(. /etc/os-release && echo "$PRETTY_NAME"))"
    # Errors fail the build; warnings and info are shown for the record.
    lintian --fail-on error --info "$changes"
    echo "$deb"
}

if [[ ${1:-} == --staged ]]; then
    build_staged "$2"
    exit 0
fi

tree=
if [[ ${1:-} == --in ]]; then
    tree=$(realpath "$2")
    shift 2
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$(realpath -m "${1:-$repo/build/deb}")
version=$(sed -n '1s/^[^(]*(\([^)]*\)).*/\1/p' "$repo/packaging/debian/changelog")
src=$out/xnbdd-$version

rm -rf "$out"
mkdir -p "$src"
# Skip files that git lists but that are deleted in the work tree.
(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
    | grep -zv -e '^packaging/debian/' -e '^\.ci/' \
    | while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done \
    | xargs -0 -r cp --parents -t "$src")
cp -r "$repo/packaging/debian" "$src/debian"

if [[ -z $tree ]]; then
    build_staged "$src"
    exit 0
fi
# The container's last line names the .deb by its path inside, which is the same path here.
cp "$repo/scripts/build-deb.sh" "$out/build-deb.sh"
systemd-nspawn --quiet -D "$tree" --register=no --keep-unit --volatile=overlay --as-pid2 --console=pipe \
    --machine="xnbdd-deb-$$" --bind="$out" -- "$out/build-deb.sh" --staged "$src"
