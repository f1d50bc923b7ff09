#!/bin/sh
# Build (once) and print the path of a cached Debian tree for the tests:
#   bookworm  Debian 12 with a kernel, systemd and the NBD tools: the systemd-nspawn tests and the
#             QEMU VM test.
#   trixie    Debian 13: today's clients and peers (libnbd 1.22, qemu 10, nbdkit 1.42), run with
#             chroot/nspawn against the server on the host, and systemd 257 plus the Debian
#             tool chain (debhelper, lintian) to build and boot the package as Debian 13 would.
# The cache key hashes this script and the suite, so changing a package list or the build steps
# makes a fresh tree; an existing tree is never modified (nspawn runs it with --volatile=overlay,
# chroot users bind-mount what they need read-only). Concurrent callers are serialised by a lock;
# a half-built tree is never visible because it is built under a temporary name and renamed.
#
# Usage: tests/e2e/build-rootfs.sh [bookworm|trixie]   (default bookworm; prints the tree's path
#        on the last line of stdout)
# Environment: XNBDD_TEST_CACHE (default /var/cache/xnbdd-test), MIRROR (default: apt's own).
set -eu

SUITE=${1:-bookworm}
case $SUITE in
bookworm)
    PKGS=systemd,systemd-sysv,dbus,udev,kmod,e2fsprogs,iproute2,procps,linux-image-amd64,nbd-client,nbd-server,python3,python3-systemd,python3-trio,python3-sdnotify
    ;;
trixie)
    # perl-openssl-defaults: debootstrap does not resolve the virtual perl-openssl-abi-3 that
    # lintian needs through libnet-ssleay-perl.
    PKGS=systemd,systemd-sysv,dbus,iproute2,procps,python3,python3-systemd,python3-trio,python3-sdnotify,libnbd-bin,python3-libnbd,nbdkit,qemu-utils,debhelper,dh-python,pybuild-plugin-pyproject,python3-all,python3-setuptools,dpkg-dev,lintian,perl-openssl-defaults
    ;;
*)
    echo "build-rootfs.sh: unknown suite '$SUITE' (bookworm or trixie)" >&2
    exit 2
    ;;
esac

CACHE_DIR=${XNBDD_TEST_CACHE:-/var/cache/xnbdd-test}
if [ -z "${MIRROR:-}" ]; then
    MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi

KEY=$( (cat "$0"; echo "$SUITE") | sha256sum | cut -c1-16)
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
