"""Fault injection: kill a rank with SIGKILL at a random moment, relaunch the same command, compare final weights.

    python bench/fault_injection.py --trials 20            # default: 2 ranks, tiny ZeRO-3 + CPU offload run

Each trial starts a fresh run, kills one random rank at a moment drawn uniformly over the run's duration (so saves
are hit too), relaunches the unchanged command until the run completes, and compares the final consolidated
weights and every step's loss with an uninterrupted run (bitwise: torch AdamW). Trials can also aim at a save
(`during-save`: kill as soon as a checkpoint folder is being written) or at the universal conversion of a resume on
another world size (`conversion`). It prints trials, kills during save, resumes, mismatches and unresumable states.
The trials are tests/fault_trials.py, which tests/test_faults.py runs once of each kind in the default suite.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fault_trials import run_trials  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--trials", type=int, default=20, help="random-moment trials (each redrawn until its kill lands)"
    )
    parser.add_argument("--during-save", type=int, default=2, help="extra trials that kill inside a save")
    parser.add_argument("--conversion", type=int, default=1, help="extra trials that kill inside a conversion")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    from dtrain.dist import select_accelerator
    from dtrain.tiny import make_tiny_model

    select_accelerator()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dtrain-faults-"))
    modes = ["random"] * args.trials + ["during-save"] * args.during_save + ["conversion"] * args.conversion
    started = time.monotonic()
    tally = run_trials(modes, workdir, make_tiny_model(workdir / "tiny-model"), args.seed)
    print(f"\n{tally.summary()}\nwall time {time.monotonic() - started:.0f}s, workdir {workdir}")
    for note in tally.notes:
        print("  " + note)
    return 1 if tally.mismatches or tally.unresumable else 0


if __name__ == "__main__":
    sys.exit(main())
