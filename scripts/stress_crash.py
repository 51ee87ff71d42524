"""Crash stress test (not run in CI): K trials each of a writer SIGKILL, a trainer SIGKILL + resume, and a
2-rank re-save SIGKILL.

Usage: ``.venv/bin/python scripts/stress_crash.py --trials 50 [--seed 0] [--kinds writer,trainer,resave]
[--keep DIR] [-v]``

Each writer trial kills the writer subprocess at a random instant of a write and saves again; each trainer trial
kills a training process at a random step while async saves are in flight and resumes from the newest committed
checkpoint; each resave trial has two ranks (sync or async, real processes) re-save one checkpoint directory and
SIGKILLs a trainer or writer at a random instant, or rank 0's committing process right after its k-th rename
(with ``RENAME_EXCHANGE``, or with the two-rename fallback), then runs the next writer's cleanup and saves again.
The last line is ``trials N, torn T, lost L, resumed-identical R``: torn counts final paths that fail to
load/verify or hold the wrong content, lost counts trials where a committed checkpoint was missing, damaged or
replaced by an older one (for resave trials: after the next writer's cleanup), and resumed-identical counts
trials whose recovery (the next save; the resumed run) is bit-identical to an uninterrupted run. The line before
it counts the resave trials whose final path was empty right after the kill (only possible on the fallback,
between its renames; the cleanup restores it). The exit status is 0 only when T = L = 0, R = N and no trial broke
another promise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.faults._resave_trials import resave_kill_trial  # noqa: E402
from tests.faults._trials import Reference, trainer_kill_trial, writer_kill_trial  # noqa: E402

import lightning_ckpt as lc  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50, help="trials of each kind (total 2x this)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=24, help="training steps of each trainer trial")
    parser.add_argument("--kinds", default="writer,trainer,resave", help="comma-separated trial kinds")
    parser.add_argument("--keep", help="write trial directories here and keep failing ones")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()

    root = args.keep or tempfile.mkdtemp(prefix="lckpt-stress-")
    os.makedirs(root, exist_ok=True)
    start = time.monotonic()
    totals = {"trials": 0, "torn": 0, "lost": 0, "identical": 0, "problems": 0, "gaps": 0}
    kinds = [k for k in ("writer", "trainer", "resave") if k in args.kinds.split(",")]
    ref = Reference.run(args.steps, seed=args.seed + 3)
    try:
        with lc.make_async_checkpointer() as resume_ck:  # one writer for every resumed run
            for i in range(args.trials):
                for kind in kinds:
                    directory = os.path.join(root, f"{kind}-{i:04d}")
                    os.makedirs(directory)
                    seed = args.seed * 100_000 + i
                    if kind == "writer":
                        result = writer_kill_trial(directory, seed)
                    elif kind == "resave":
                        result = resave_kill_trial(directory, seed)
                        totals["gaps"] += int(result.notes.get("gap", False))
                    else:
                        result = trainer_kill_trial(directory, ref, seed, checkpointer=resume_ck)
                    totals["trials"] += 1
                    totals["torn"] += len(result.torn)
                    totals["lost"] += int(bool(result.lost))
                    totals["identical"] += int(result.identical)
                    totals["problems"] += len(result.problems)
                    if args.verbose or not result.ok:
                        print(f"{kind} trial {i}: {'ok' if result.ok else 'FAILED'} {result}", flush=True)
                    if result.ok or not args.keep:
                        shutil.rmtree(directory, ignore_errors=True)
                        for suffix in (".progress", ".progress.log"):
                            if os.path.exists(directory + suffix):
                                os.remove(directory + suffix)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"# {time.monotonic() - start:.0f}s, {totals['problems']} other problems, {totals['gaps']} resave trials "
          "with no checkpoint at the final path right after the kill (restored by the next writer)", flush=True)
    print(f"trials {totals['trials']}, torn {totals['torn']}, lost {totals['lost']}, "
          f"resumed-identical {totals['identical']}")
    clean = totals["torn"] == totals["lost"] == totals["problems"] == 0
    return 0 if clean and totals["identical"] == totals["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
