#!/bin/sh
# Build (once) and print the path of a cached Debian bookworm tree for the systemd-nspawn tests
# and the QEMU VM test. The cache key hashes this script, so changing the package list or the
# build steps below makes a fresh tree; an existing tree is never modified (nspawn runs it with
# --volatile=overlay). Concurrent callers are serialised by a lock; a half-built tree is never
# visible because it is built under a temporary name and renamed into place.
#
# Usage: tests/e2e/build-rootfs.sh            (prints the rootfs path on the last line of stdout)
# Environment: XNBDD_TEST_CACHE (default /var/cache/xnbdd-test), MIRROR (default: apt's own).
set -eu

SUITE=bookworm
PKGS=systemd,systemd-sysv,dbus,udev,kmod,e2fsprogs,iproute2,procps,linux-image-amd64,nbd-client,nbd-server,python3,python3-systemd,python3-trio,python3-sdnotify

CACHE_DIR=${XNBDD_TEST_CACHE:-/var/cache/xnbdd-test}
if [ -z "${MIRROR:-}" ]; then
    MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi

KEY=$(sha256sum "$0" | cut -c1-16)
ROOTFS=$CACHE_DIR/$KEY/rootfs

mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/.lock"
flock 9
if [ ! -d "$ROOTFS" ]; then
    rm -rf "$CACHE_DIR/$KEY.tmp"
    mkdir -p "$CACHE_DIR/$KEY.tmp"
    debootstrap --variant=minbase --include="$PKGS" "$SUITE" "$CACHE_DIR/$KEY.tmp/rootfs" "$MIRROR" >&2
    rm -f "$CACHE_DIR/$KEY.tmp/rootfs"/var/cache/apt/archives/*.deb
    mv "$CACHE_DIR/$KEY.tmp" "$CACHE_DIR/$KEY"
fi
exec 9>&-
echo "$ROOTFS"
