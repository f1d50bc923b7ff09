#!/usr/bin/env bash
# Run the project's checks with the tools of .venv (scripts/bootstrap.sh test puts them there).
#
#   scripts/check.sh        ruff (lint and format), mypy, then the whole pytest suite (all markers)
#   scripts/check.sh lint   ruff and mypy only
#   extra arguments after the mode go to pytest:  scripts/check.sh all -k handshake
#
# Every step runs even when an earlier one failed, so one CI log shows all problems; the exit
# status is non-zero when any step failed. pytest's "no tests collected" (exit 5) is a failure.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bin=${VENV:-$repo/.venv}/bin
mode=${1:-all}
shift || true

failed=()
step() {
    local name=$1; shift
    echo "== $name: $*"
    local start=$SECONDS
    "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    if [[ $name == pytest && $rc -eq 5 ]]; then
        echo "== pytest collected no tests: that counts as a failure"
    fi
    ((rc == 0)) || failed+=("$name")
}

step ruff "$bin/ruff" check .
step ruff-format "$bin/ruff" format --check .
step mypy "$bin/mypy"
if [[ $mode == all ]]; then
    # the slowest tests in every log: the suite must stay under 15 minutes from a clean clone
    step pytest "$bin/python" -m pytest --durations=25 "$@"
fi

if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all checks passed"
