#!/usr/bin/env bash
# Install what a profile needs, and nothing that is already there (warm runs take about a second).
#
#   scripts/bootstrap.sh run    the daemon in a project-local virtual environment (.venv)
#   scripts/bootstrap.sh test   everything the whole test suite uses: real NBD clients and peers,
#                               systemd tools, nspawn, debootstrap, QEMU, the Debian packaging tools
#   scripts/bootstrap.sh deb    what `make deb` needs to build the Debian package
#
# Debian packages come from apt-get (one `apt-get update` first, only when something is missing);
# Python packages go into .venv with pip. The venv uses whatever `python3` is on PATH and can also
# import Debian's python3-libnbd: a .pth file APPENDS /usr/lib/python3/dist-packages, so the venv's
# own packages keep priority. Safe to run any number of times.
set -euo pipefail

profile=${1:-run}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$repo/.venv}

# Building systemd-python from source (PyPI has no wheels) needs these, so every profile has them.
apt_run=(python3 python3-venv python3-dev libsystemd-dev pkg-config gcc)
apt_deb=(build-essential debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools
         python3-trio python3-systemd fakeroot lintian)
apt_test=("${apt_run[@]}" "${apt_deb[@]}"
          libnbd-bin python3-libnbd qemu-utils fio nbdkit nbd-server nbd-client openssl
          systemd systemd-container debootstrap debian-archive-keyring fuse3 iperf3
          xfsprogs btrfs-progs e2fsprogs util-linux iproute2 procps kmod psmisc
          qemu-system-x86
          ceph-mon ceph-osd ceph-common python3-rbd python3-rados qemu-block-extra)

case $profile in
    run)  apt_pkgs=("${apt_run[@]}"); want_venv=1 ;;
    test) apt_pkgs=("${apt_test[@]}"); want_venv=1 ;;
    deb)  apt_pkgs=("${apt_deb[@]}"); want_venv=0 ;;
    *)    echo "usage: $0 run|test|deb" >&2; exit 2 ;;
esac

missing_apt() {
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null | grep -qx installed || echo "$pkg"
    done
}

mapfile -t missing < <(missing_apt "${apt_pkgs[@]}")
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "bootstrap: missing Debian packages (install them as root): ${missing[*]}" >&2
        exit 1
    fi
    echo "bootstrap: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    log=$(mktemp)
    # No recommends: QEMU alone would pull in a desktop's worth of them. The log is shown only
    # when apt fails.
    if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } \
            >"$log" 2>&1; then
        cat "$log" >&2; rm -f "$log"
        echo "bootstrap: apt-get failed" >&2
        exit 1
    fi
    rm -f "$log"
fi

((want_venv)) || exit 0

# The venv is rebuilt when the interpreter changes, reinstalled when pyproject.toml changes.
python=${PYTHON:-python3}
py_id=$("$python" -c 'import sys; print(sys.executable, sys.version)')
want_stamp=$(printf '%s\n' "$py_id" "$(sha256sum "$repo/pyproject.toml")" | sha256sum | cut -c1-16)
up_to_date() { [[ -f $venv/.xnbdd-$1 && $(<"$venv/.xnbdd-$1") == "$want_stamp" ]]; }
# A test venv also has everything the run profile needs.
if up_to_date "$profile" || up_to_date test; then
    exit 0
fi
if [[ ! -x $venv/bin/python ]] || ! grep -qxF "$py_id" "$venv/.xnbdd-python" 2>/dev/null; then
    echo "bootstrap: creating $venv with $("$python" -c 'import sys; print(sys.executable)')"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    printf '%s\n' "$py_id" > "$venv/.xnbdd-python"
fi
purelib=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pth=$purelib/xnbdd-debian-dist-packages.pth
extras=.
[[ $profile == test ]] && extras=".[test]"
echo "bootstrap: pip install -e '$extras'"
# Without the .pth while pip runs: otherwise Debian's python3-trio/-systemd would count as
# installed and the venv would silently run on them instead of its own copies.
rm -f "$pth"
(cd "$repo" && "$venv/bin/python" -m pip install -q -e "$extras" 2>&1) \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
echo /usr/lib/python3/dist-packages > "$pth"
echo "$want_stamp" > "$venv/.xnbdd-$profile"
