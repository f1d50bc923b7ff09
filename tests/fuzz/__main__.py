"""Command line: ``python -m tests.fuzz --mode MODE --inputs N --seed S [--seconds T]``.

Exit status 0 when nothing was found, 1 with the findings on standard error.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tests.fuzz.harness import MODES
from tests.fuzz.runner import fuzz


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    p.add_argument("--mode", choices=[*MODES, "all"], default="all")
    p.add_argument("--inputs", type=int, default=10_000, help="inputs per mode")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--seconds", type=float, default=0.0, help="stop a mode after this long")
    p.add_argument("--probe-every", type=int, default=2000, help="inputs between probes")
    p.add_argument("--workdir", type=Path, help="keep images and logs here (default: temporary)")
    args = p.parse_args(argv)
    modes = MODES if args.mode == "all" else (args.mode,)
    failed = False
    for mode in modes:
        with tempfile.TemporaryDirectory(prefix=f"xnbdd-fuzz-{mode}-") as tmp:
            work = args.workdir / mode if args.workdir else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            try:
                stats = fuzz(
                    mode,
                    work,
                    inputs=args.inputs,
                    seed=args.seed,
                    probe_every=args.probe_every,
                    seconds=args.seconds,
                    report=lambda line: print(line, flush=True),
                )
            except AssertionError as exc:  # the rig's clean stop (exit status 0) failed
                print(f"mode={mode}: {exc}", file=sys.stderr)
                failed = True
                continue
        print(stats.line(), flush=True)
        for finding in stats.findings:
            print(finding, file=sys.stderr)
        failed |= bool(stats.findings)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
