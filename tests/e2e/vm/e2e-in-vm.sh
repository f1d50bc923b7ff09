#!/bin/bash
# Runs inside the test VM (tests/e2e/test_vm_kernel.py) as a oneshot unit, as root, with the
# xnbdd Debian package installed. Every step prints "STEP <name> ok" or "STEP <name> FAIL"; the
# host reads /mnt/share/result.log and asserts on those lines. The unit powers the VM off after.
#
# /opt/xnbdd-e2e/config (written by the host) sets: UNIT (systemd unit of the export), EXPORT (its
# instance and export name), IMAGE (the file it serves), PORT, PROXY_PORT.
set -u
exec > >(tee /mnt/share/result.log) 2>&1
# shellcheck source=/dev/null
. /opt/xnbdd-e2e/config
echo "VM_UP kernel=$(uname -r)"

step() {  # step NAME COMMAND...: run it, print the marker, return its status
    local name=$1; shift
    if "$@"; then echo "STEP $name ok"; return 0; fi
    echo "STEP $name FAIL"; return 1
}
finish() {
    echo "--- systemctl status"; systemctl --no-pager status "$UNIT" 2>&1 | head -n 30
    echo "--- journal of $UNIT"; journalctl --no-pager -u "$UNIT" | tail -n 40
    if systemctl cat xnbd-proxy.service >/dev/null 2>&1; then
        echo "--- journal of xnbd-proxy"; journalctl --no-pager -u xnbd-proxy | tail -n 40
    fi
    echo "E2E_DONE"
    sync
    exit 0
}
attach() {  # attach DEVICE PORT: kernel client to xnbdd on 127.0.0.1 (-N only if EXPORT is set)
    nbd-client 127.0.0.1 "$2" "$1" ${EXPORT:+-N "$EXPORT"} && [ "$(blockdev --getsize64 "$1")" -gt 0 ]
}

step modprobe modprobe nbd nbds_max=4 || finish

# Reference: Debian's nbd-server with the same kernel client, so a failure below is xnbdd's.
truncate -s 64M /var/tmp/ref.img
printf '[generic]\n[ref]\nexportname = /var/tmp/ref.img\n' > /run/nbd-ref.conf
step reference sh -c 'nbd-server 127.0.0.1@10811 -C /run/nbd-ref.conf && sleep 0.5 &&
    nbd-client 127.0.0.1 10811 /dev/nbd0 -N ref &&
    dd if=/dev/nbd0 of=/dev/null bs=1M count=4 status=none && nbd-client -d /dev/nbd0'

# xnbdd under systemd (Type=notify: start returns once the daemon said READY=1), configured the
# way the package documents: the shipped example copied to /etc/xnbd/NAME.conf.
[ -e "/etc/xnbd/$EXPORT.conf" ] || cp /etc/xnbd/example.conf "/etc/xnbd/$EXPORT.conf"
mkdir -p "$(dirname "$IMAGE")"
truncate -s 256M "$IMAGE"
step unit_start systemctl start "$UNIT" || finish
systemctl show -p ActiveState -p SubState -p StatusText -p MainPID "$UNIT"

mkdir -p /mnt/t
step attach attach /dev/nbd1 "$PORT" || finish
step mkfs mkfs.ext4 -q -F /dev/nbd1 || finish
step write sh -c 'mount /dev/nbd1 /mnt/t &&
    dd if=/dev/urandom of=/mnt/t/blob bs=1M count=16 status=none &&
    for i in 1 2 3 4 5 6 7 8; do head -c $((i * 37 * 1024)) /dev/urandom > /mnt/t/small$i; done &&
    mkdir /mnt/t/dir && cp /etc/os-release /mnt/t/dir/ &&
    (cd /mnt/t && sha256sum blob small* dir/os-release > /run/sums) && sync && umount /mnt/t' \
    || finish
# A restart with the filesystem mounted: the daemon hands the kernel client's socket to
# systemd's fd store and the next process goes on serving it (docs/handover.md). Files written
# before and after the restart must both be intact, and the filesystem clean (fsck below).
step restart_mounted sh -c 'mount /dev/nbd1 /mnt/t &&
    head -c 3M /dev/urandom > /mnt/t/before-restart && sync &&
    pid=$(systemctl show -p MainPID --value "$0") && systemctl restart "$0" &&
    [ "$(systemctl show -p MainPID --value "$0")" != "$pid" ] &&
    head -c 5M /dev/urandom > /mnt/t/after-restart && sync &&
    (cd /mnt/t && sha256sum before-restart after-restart >> /run/sums) && umount /mnt/t' "$UNIT" \
    || finish
# A package upgrade (the same package installed again) restarts the running export the same
# way, from the package's postinst.
step upgrade_mounted sh -c 'mount /dev/nbd1 /mnt/t &&
    pid=$(systemctl show -p MainPID --value "$0") &&
    dpkg -i /opt/xnbdd-e2e/xnbdd_*.deb >/dev/null &&
    [ "$(systemctl show -p MainPID --value "$0")" != "$pid" ] &&
    head -c 2M /dev/urandom > /mnt/t/after-upgrade && sync &&
    (cd /mnt/t && sha256sum after-upgrade >> /run/sums) && umount /mnt/t' "$UNIT" || finish
step detach nbd-client -d /dev/nbd1
# A fresh connection (and a fresh page cache on the device) must read the same bytes back.
sleep 0.5
step reattach attach /dev/nbd1 "$PORT" || finish
step fsck e2fsck -fn /dev/nbd1
step readback sh -c 'mount -o ro /dev/nbd1 /mnt/t && (cd /mnt/t && sha256sum -c --quiet /run/sums) &&
    umount /mnt/t'
# The data really lives in the served image: the filesystem's checksums from the file itself.
step image_has_data sh -c 'nbd-client -d /dev/nbd1 && mount -o ro,loop "$0" /mnt/t &&
    (cd /mnt/t && sha256sum -c --quiet /run/sums) && umount /mnt/t' "$IMAGE"

# Both kernel-client connections are in the unit's journal (entries printed for the record).
journal_connections() {
    journalctl --no-pager -u "$UNIT" -o json | python3 -c '
import json, re, sys
hits = [e for e in map(json.loads, sys.stdin)
        if re.search(r"(?<!dis)connect", str(e.get("MESSAGE", "")), re.I)]
for e in hits:
    print({k: v for k, v in e.items() if not k.startswith("__")})
sys.exit(0 if len(hits) >= 2 else 1)'
}
step journal_connection journal_connections

# Proxy switch with a mounted filesystem: needs the proxy backend and xnbd-bgctl in the package
# (the --proxy option is parsed before the backend exists, so the option alone proves nothing).
if python3 -c 'import xnbdd.backends.proxy' 2>/dev/null && command -v xnbd-bgctl >/dev/null; then
    ctl=/run/xnbd-proxy.ctl
    rm -f /var/tmp/cache.img /var/tmp/cache.bitmap "$ctl"
    step proxy_start systemd-run --unit=xnbd-proxy -p Type=notify \
        xnbd-server --proxy --lport "$PROXY_PORT" 127.0.0.1 "$PORT" \
        /var/tmp/cache.img /var/tmp/cache.bitmap "$ctl" || finish
    step proxy_attach attach /dev/nbd2 "$PROXY_PORT" || finish
    step proxy_mount sh -c 'mount /dev/nbd2 /mnt/t && (cd /mnt/t && sha256sum -c --quiet /run/sums) &&
        echo written-through-proxy > /mnt/t/proxy-file && sync' || finish
    step proxy_cache_all xnbd-bgctl --cache-all "$ctl"
    step proxy_usr2 sh -c 'kill -USR2 "$(systemctl show -p MainPID --value xnbd-proxy)"'
    # After the switch the proxy serves its cache as a target: the origin can go away.
    sleep 2
    step origin_stop systemctl stop "$UNIT"
    step proxy_after_switch sh -c 'echo 3 > /proc/sys/vm/drop_caches &&
        (cd /mnt/t && sha256sum -c --quiet /run/sums) &&
        grep -q written-through-proxy /mnt/t/proxy-file && umount /mnt/t && nbd-client -d /dev/nbd2'
    journalctl --no-pager -u xnbd-proxy -o cat | tail -n 20
else
    echo "PROXY_UNAVAILABLE (this build has no xnbdd.backends.proxy or no xnbd-bgctl)"
fi

finish
