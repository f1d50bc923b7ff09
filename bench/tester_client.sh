#!/usr/bin/env bash
# Run the NBD reference project's nbd-tester-client against xnbd-server and peer servers.
#
# A report, like bench/run.py: each test gets a fresh zeroed image on /dev/shm and a fresh server
# on 127.0.0.1, runs under `timeout`, and lands in one row of the table
#     test | server | result (ok / fail / hang) | seconds | detail
# "hang" means the tester was still running when the per-test limit (default 60 s) ran out.
#
#   bench/tester_client.sh build [--git-dir DIR] [--src DIR] [--out DIR] [--no-deps]
#   bench/tester_client.sh [run] [--tester PATH] [--servers LIST] [--tests LIST] [--timeout S]
#                                [--size BYTES] [--xnbd-cmd CMD | --xnbd-rev REV] [--logs DIR]
#                                [--rounds N] [--build] [--strict]
#
# Build (one command, from the nbd repository's bare git dir as the search tool's `fetch
# github:NetworkBlockDevice/nbd` leaves it, or from an already unpacked source tree):
#     bench/tester_client.sh build --git-dir /work/.mirror/NetworkBlockDevice+nbd/repo
#     bench/tester_client.sh build --src /var/cache/xnbdd-test/nbd-src
# It apt-get installs the build deps when missing (--no-deps: don't), unpacks HEAD into --src
# (default /var/cache/xnbdd-test/nbd-src, outside the checkout), runs autogen + configure without
# man pages, libnl and GnuTLS, `make -C tests/run nbd-tester-client`, and copies the tester with
# the two traces it replays (integrity-test.tr, integrityhuge-test.tr) into --out (default
# /var/cache/xnbdd-test/nbd-tester). Nothing of nbd is committed here.
#
# Tests (all by default; --tests read,write picks some). The export is --size bytes, default
# 50 MiB like nbd's own integrity tests, so the throughput tests send one 1 KiB request per KiB:
#   read           nbd-tester-client -N export HOST PORT          51,200 pipelined 1 KiB reads
#   write          ... -w                                          the same as writes
#   flush          ... -w -f                                       writes, every 16th with FUA, a
#                                                                  FLUSH after every 16th (needs
#                                                                  the server to offer FLUSH+FUA)
#   integrity      ... -i -t integrity-test.tr                     replay of a real ext3+dbench
#                                                                  trace (~69,000 requests) with
#                                                                  every read checked
#   integrityhuge  ... -i -t integrityhuge-test.tr                 250 requests of up to 47.6 MiB
#                                                                  (the trace make-integrityhuge
#                                                                  makes; nbd ships it built,
#                                                                  and make-integrityhuge.c no
#                                                                  longer compiles at nbd HEAD).
#                  66 of them are over 32 MiB: a server whose maximum payload is the spec's
#                  32 MiB (xnbdd's MAX_PAYLOAD) answers those EINVAL and the test fails with
#                  "Server errored a transaction"; nbdkit (64 MiB) and nbd-server pass.
# The integrity tests expect a zeroed export: every test gets its own new image. --rounds N runs
# the whole set N times (one row each, "read#2"): stalls can be intermittent.
#
# Servers (--servers, default xnbd-server,nbdkit,nbd-server):
#   xnbd-server  $XNBD_CMD --target IMG --lport PORT --laddr 127.0.0.1
#                (--xnbd-cmd or $XNBD_CMD, default .venv/bin/xnbd-server of this checkout: the
#                work tree as it is now; --xnbd-rev REV serves xnbdd/ as committed at REV
#                instead, unpacked with git archive into a temporary dir and run from there as
#                `.venv/bin/python -m xnbdd`, so edits in progress do not leak into a baseline)
#   nbdkit       nbdkit --exit-with-parent -f -i 127.0.0.1 -p PORT file IMG
#   nbd-server   nbd-server -C CONF -d   (export "export", flush and fua on, 127.0.0.1:PORT)
#
# The tester's and the server's output go to --logs (default a new /tmp/xnbdd-tester.XXXXXX), with,
# for each test, `ss` of the server's end of the connection taken 0.5 s before the limit: a hang row
# says how many request bytes the server left unread and how many reply bytes sat in its socket.
# Exit status is 0 whatever the results unless --strict, then 1 when any row is not "ok".
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

SRC=/var/cache/xnbdd-test/nbd-src
OUT=/var/cache/xnbdd-test/nbd-tester
TESTER=$OUT/nbd-tester-client
SERVERS=xnbd-server,nbdkit,nbd-server
TESTS=read,write,flush,integrity,integrityhuge
LIMIT=60
SIZE=$((50 * 1024 * 1024))
XNBD_CMD=${XNBD_CMD:-$repo/.venv/bin/xnbd-server}
LOGS=
STRICT=0
ROUNDS=1
XNBD_REV=
REV_DIR=
SERVER_CWD=/
BUILD_DEPS=(autoconf automake autoconf-archive libtool pkg-config make gcc libglib2.0-dev bison flex)

die() {
    echo "tester_client.sh: $*" >&2
    exit 2
}

usage() {
    sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

# ---------------------------------------------------------------------------------------- build

build() {
    local gitdir="" deps=1
    while (($#)); do
        case $1 in
        --git-dir) gitdir=$2; shift 2 ;;
        --src) SRC=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --no-deps) deps=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "build: unknown argument $1" ;;
        esac
    done

    if ((deps)); then
        local missing=()
        local p
        for p in "${BUILD_DEPS[@]}"; do
            dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
                missing+=("$p")
        done
        if ((${#missing[@]})); then
            echo "== apt-get install ${missing[*]}"
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                "${missing[@]}"; } || die "build: could not install ${missing[*]}"
        fi
    fi

    if [[ -n $gitdir ]]; then
        echo "== unpacking HEAD of $gitdir into $SRC"
        # replace an earlier unpacked nbd tree, never anything else
        if [[ -e $SRC && -n $(ls -A "$SRC") && ! -f $SRC/nbd-server.c ]]; then
            die "build: $SRC exists and is not an nbd source tree; give another --src"
        fi
        rm -rf "$SRC"
        mkdir -p "$SRC" || die "build: cannot make $SRC"
        git --git-dir="$gitdir" archive HEAD | tar -x -C "$SRC" || die "build: git archive failed"
        git --git-dir="$gitdir" log -1 --format='%H %cs %s' HEAD >"$SRC/.nbd-commit"
    fi
    [[ -f $SRC/tests/run/nbd-tester-client.c ]] ||
        die "build: no nbd source in $SRC (give --git-dir of a fetched nbd repository)"

    (
        set -e
        cd "$SRC"
        if [[ ! -x configure ]]; then
            echo "== ./autogen.sh"
            ./autogen.sh >autogen.log 2>&1 || { tail -20 autogen.log; exit 1; }
        fi
        if [[ ! -f tests/run/Makefile ]]; then
            echo "== ./configure --disable-manpages --without-libnl --without-gnutls"
            ./configure --disable-manpages --without-libnl --without-gnutls >configure.log 2>&1 ||
                { tail -20 configure.log; exit 1; }
        fi
        echo "== make -C tests/run nbd-tester-client"
        make -s -C tests/run nbd-tester-client
    ) || die "build failed in $SRC"

    mkdir -p "$OUT"
    cp "$SRC/tests/run/nbd-tester-client" "$SRC/tests/run/integrity-test.tr" \
        "$SRC/tests/run/integrityhuge-test.tr" "$OUT/"
    [[ -f $SRC/.nbd-commit ]] && cp "$SRC/.nbd-commit" "$OUT/SOURCE"
    echo "built $OUT/nbd-tester-client from $SRC"
    [[ -f $OUT/SOURCE ]] && echo "nbd commit: $(cat "$OUT/SOURCE")"
    return 0
}

# ------------------------------------------------------------------------------------------ run

SERVER_PID=
IMAGE=
CONF=

free_port() {
    local port
    for _ in $(seq 50); do
        port=$((20000 + RANDOM % 40000))
        if [[ -z $(ss -Htan "sport = :$port" 2>/dev/null) ]]; then
            echo "$port"
            return 0
        fi
    done
    return 1
}

# start_server NAME PORT LOG: start NAME on 127.0.0.1:PORT serving $IMAGE, in its own process
# group (so stop_server reaches whatever it forks), and wait until it listens.
start_server() {
    local name=$1 port=$2 log=$3 cmd=()
    case $name in
    xnbd-server)
        eval "cmd=($XNBD_CMD)"
        cmd+=(--target "$IMAGE" --lport "$port" --laddr 127.0.0.1)
        ;;
    nbdkit)
        cmd=(nbdkit --exit-with-parent -f -i 127.0.0.1 -p "$port" file "$IMAGE")
        ;;
    nbd-server)
        CONF=${IMAGE%.img}.conf
        cat >"$CONF" <<EOF
[generic]
	port = $port
	listenaddr = 127.0.0.1
[export]
	exportname = $IMAGE
	flush = true
	fua = true
EOF
        cmd=(nbd-server -C "$CONF" -d)
        ;;
    *) die "unknown server $name" ;;
    esac
    echo "\$ (cd $SERVER_CWD && ${cmd[*]})" >"$log"
    # from a directory of its own: `python -m xnbdd` puts the cwd first on sys.path, and run from
    # the checkout it would import the work tree's xnbdd/ whatever PYTHONPATH says
    (cd "$SERVER_CWD" && exec setsid "${cmd[@]}") >>"$log" 2>&1 </dev/null &
    SERVER_PID=$!
    for _ in $(seq 150); do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            return 1
        fi
        if [[ -n $(ss -Hltn "sport = :$port" 2>/dev/null) ]]; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

stop_server() {
    [[ -n $SERVER_PID ]] || return 0
    kill -TERM -- "-$SERVER_PID" 2>/dev/null || kill -TERM "$SERVER_PID" 2>/dev/null
    for _ in $(seq 50); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL -- "-$SERVER_PID" 2>/dev/null || kill -KILL "$SERVER_PID" 2>/dev/null
    wait "$SERVER_PID" 2>/dev/null
    SERVER_PID=
}

cleanup() {
    stop_server
    [[ -n $IMAGE ]] && rm -f "$IMAGE"
    [[ -n $CONF ]] && rm -f "$CONF"
}

test_args() {
    case $1 in
    read) echo "" ;;
    write) echo "-w" ;;
    flush) echo "-w -f" ;;
    integrity) echo "-i -t $TRACES/integrity-test.tr" ;;
    integrityhuge) echo "-i -t $TRACES/integrityhuge-test.tr" ;;
    *) die "unknown test $1" ;;
    esac
}

# detail LOG RC SS: one short line out of the tester's output (and, for a hang, out of SS, the
# `ss` lines of the server's end of the connection taken just before the limit).
detail() {
    local log=$1 rc=$2 ss=$3 line
    if ((rc == 0)); then
        line=$(grep -o 'Took [0-9.]* seconds to complete, [0-9.]*[KMG]*ib/s' "$log" | tail -1)
        line=${line#Took }
        echo "${line/ seconds to complete,/ s,}"
    elif ((rc == 124 || rc == 137)); then
        if [[ -s $ss ]]; then
            # Recv-Q: request bytes the server has not read; Send-Q: reply bytes not yet acked
            awk '{ printf "at the limit the server had %s B of requests unread, %s B of replies" \
                " queued", $1, $2; exit }' "$ss"
        else
            echo "no connection left at the limit"
        fi
    else
        line=$(grep -E 'WARNING|CRITICAL|ERROR|error' "$log" | grep -v 'Could not run test: $' | tail -1)
        line=${line:-$(tail -1 "$log")}
        echo "exit $rc: ${line##*\*\*: [0-9:.]*: }"
    fi
}

run() {
    local build_first=0
    while (($#)); do
        case $1 in
        --tester) TESTER=$2; shift 2 ;;
        --servers) SERVERS=$2; shift 2 ;;
        --tests) TESTS=$2; shift 2 ;;
        --timeout) LIMIT=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --xnbd-cmd) XNBD_CMD=$2; shift 2 ;;
        --xnbd-rev) XNBD_REV=$2; shift 2 ;;
        --logs) LOGS=$2; shift 2 ;;
        --build) build_first=1; shift ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --strict) STRICT=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
        esac
    done
    ((build_first)) && build
    [[ -x $TESTER ]] || die "no tester at $TESTER: run '$0 build --git-dir DIR' first (see --help)"
    TRACES=$(dirname "$TESTER")
    [[ -f $TRACES/integrity-test.tr ]] || TRACES=$SRC/tests/run
    command -v ss >/dev/null || die "needs ss (iproute2)"
    LOGS=${LOGS:-$(mktemp -d /tmp/xnbdd-tester.XXXXXX)}
    mkdir -p "$LOGS"
    trap 'cleanup; [[ -n $REV_DIR ]] && rm -rf "$REV_DIR"' EXIT
    trap 'exit 130' INT TERM
    if [[ -n $XNBD_REV ]]; then
        local rev
        rev=$(git -C "$repo" rev-parse --short "$XNBD_REV^{commit}") || die "no commit $XNBD_REV"
        REV_DIR=$(mktemp -d "/tmp/xnbdd-rev-$rev.XXXXXX")
        git -C "$repo" archive "$rev" xnbdd | tar -x -C "$REV_DIR" || die "git archive $rev failed"
        XNBD_CMD="env PYTHONPATH=$REV_DIR $repo/.venv/bin/python -m xnbdd"
        XNBD_REV=$rev
        SERVER_CWD=$REV_DIR
        local imported
        imported=$(cd "$REV_DIR" && PYTHONPATH=$REV_DIR "$repo/.venv/bin/python" -c \
            'import xnbdd; print(xnbdd.__file__)')
        [[ $imported == "$REV_DIR"/* ]] || die "xnbdd of $rev not the one imported ($imported)"
    else
        SERVER_CWD=$LOGS
    fi

    local servers tests
    IFS=, read -r -a servers <<<"$SERVERS"
    IFS=, read -r -a tests <<<"$TESTS"
    echo "tester: $TESTER$([[ -f $TRACES/SOURCE ]] && echo " (nbd $(cut -c1-12 "$TRACES/SOURCE"))")"
    if [[ -n $XNBD_REV ]]; then
        echo "xnbd:   xnbdd/ as committed at $XNBD_REV: $XNBD_CMD"
    else
        echo "xnbd:   $XNBD_CMD (work tree of $(git -C "$repo" log -1 --format=%h 2>/dev/null)$(
            [[ -n $(git -C "$repo" status --porcelain -- xnbdd 2>/dev/null) ]] && echo ", xnbdd/ modified"))"
    fi
    echo "image:  $SIZE bytes on /dev/shm, fresh per test; limit ${LIMIT} s per test; logs in $LOGS"
    echo

    local rows=() t s port args log slog rc start secs result det round name watcher
    for round in $(seq "$ROUNDS"); do
        for t in "${tests[@]}"; do
            args=$(test_args "$t")
            name=$t
            ((ROUNDS > 1)) && name="$t#$round"
            for s in "${servers[@]}"; do
                log=$LOGS/$name-$s.tester.log
                slog=$LOGS/$name-$s.server.log
                IMAGE=$(mktemp -u "/dev/shm/xnbdd-tester.$t.$s.XXXXXX").img
                truncate -s "$SIZE" "$IMAGE"
                port=$(free_port) || die "no free port"
                if ! start_server "$s" "$port" "$slog"; then
                    det="server did not start: $(tail -1 "$slog")"
                    rows+=("$name|$s|fail|0.00|$det")
                    printf '%-16s %-12s %-5s %8s  %s\n' "$name" "$s" fail 0.00 "$det"
                    cleanup
                    continue
                fi
                echo "\$ NBD_TEST_SILENT=1 timeout $LIMIT $TESTER -N export $args 127.0.0.1 $port" >"$log"
                # just before the limit, note the connection's socket queues (bytes the server has
                # not read / replies it has not sent): what a hang row's detail is made of
                (
                    sleep "$(awk -v l="$LIMIT" 'BEGIN { print (l > 1 ? l - 0.5 : l / 2) }')"
                    ss -Htn state established "( sport = :$port )" >"$LOGS/$name-$s.ss"
                ) &
                watcher=$!
                start=$EPOCHREALTIME
                # NBD_TEST_SILENT: without it a stuck throughput test prints a progress line per
                # spin of its busy loop, hundreds of MB in a minute.
                # shellcheck disable=SC2086 # $args is a list of words
                NBD_TEST_SILENT=1 timeout -k 5 "$LIMIT" "$TESTER" -N export $args 127.0.0.1 "$port" \
                    >>"$log" 2>&1 </dev/null
                rc=$?
                kill "$watcher" 2>/dev/null
                wait "$watcher" 2>/dev/null
                secs=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')
                case $rc in
                0) result=ok ;;
                124 | 137) result=hang ;;
                *) result=fail ;;
                esac
                det=$(detail "$log" "$rc" "$LOGS/$name-$s.ss")
                # nbd-server -d serves one client and leaves: only a crash is worth a note there
                if ! kill -0 "$SERVER_PID" 2>/dev/null && [[ $s != nbd-server || $result != ok ]]; then
                    det="$det (server exited)"
                fi
                rows+=("$name|$s|$result|$secs|$det")
                printf '%-16s %-12s %-5s %8s  %s\n' "$name" "$s" "$result" "$secs" "$det"
                cleanup
            done
    done
    done

    echo
    echo "| test | server | result | seconds | detail |"
    echo "|---|---|---|---:|---|"
    local r bad=0
    for r in "${rows[@]}"; do
        IFS='|' read -r t s result secs det <<<"$r"
        echo "| $t | $s | $result | $secs | $det |"
        [[ $result == ok ]] || bad=1
    done
    echo
    echo "logs: $LOGS"
    ((STRICT && bad)) && exit 1
    exit 0
}

case ${1:-run} in
build) shift; build "$@" ;;
run) [[ $# -gt 0 ]] && shift; run "$@" ;;
-h | --help) usage ;;
*) run "$@" ;;
esac
