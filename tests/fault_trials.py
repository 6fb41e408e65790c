"""Fault injection: kill a rank with SIGKILL at a random moment, relaunch the same command, compare final weights.

The engine of bench/fault_injection.py (many trials) and of tests/test_faults.py (one of each kind). Each trial
starts a fresh run, kills one random rank at a moment drawn uniformly over the run's duration (so saves are hit
too), relaunches the unchanged command until the run completes, and compares the final consolidated weights and
every step's loss with an uninterrupted run (bitwise: torch AdamW). Trials can also aim at a save (`during-save`:
kill as soon as a checkpoint folder is being written) or at the universal conversion of a resume on another world
size (`conversion`).
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from dtrain.checkpoint import complete_checkpoints
from dtrain.metrics import read_metrics
from tests.helpers import FULL_OVERRIDES, FULL_STEPS, consolidated, run_dtrain, start_dtrain, write_config

MODES = ("random", "during-save", "conversion")


@dataclass
class Tally:
    trials: int = 0
    kills: int = 0
    kills_during_save: int = 0
    kills_during_conversion: int = 0
    resumes: int = 0
    mismatches: int = 0
    unresumable: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"trials {self.trials}, kills {self.kills} (during save {self.kills_during_save}, during universal "
            f"conversion {self.kills_during_conversion}), resumes {self.resumes}, mismatches {self.mismatches}, "
            f"unresumable {self.unresumable}"
        )


def launch(config: Path, nproc: int) -> subprocess.Popen:
    return start_dtrain("train", str(config), *FULL_OVERRIDES, "--nproc", str(nproc))


def kill_a_rank(proc: subprocess.Popen, rng: random.Random) -> bool:
    """SIGKILL one rank; a moment before the ranks exist (the launcher is still starting) becomes their start."""
    ranks: list[psutil.Process] = []
    while not ranks and proc.poll() is None:
        try:
            ranks = psutil.Process(proc.pid).children()
        except psutil.NoSuchProcess:
            return False
        time.sleep(0.01)
    if not ranks:
        return False
    rng.choice(ranks).send_signal(signal.SIGKILL)
    return True


def saving(ckpts: Path) -> bool:
    return ckpts.is_dir() and any(ckpts.glob(".tmp-step-*"))


def converting(ckpts: Path) -> bool:
    return ckpts.is_dir() and any(ckpts.glob("step-*/.tmp-universal-*"))


def wait_until(predicate, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def run_trial(
    mode: str, root: Path, tiny_model: Path, reference: dict[int, Path], run_seconds: list[float], rng, tally
) -> None:
    """`run_seconds`: [how long a run lasts]; shortened when a run ends before its kill, so later kills land."""
    config = write_config(root / "cfg.yaml", tiny_model)
    ckpts = root / "run" / "checkpoints"
    nproc = 2
    if mode == "conversion":  # a 2-rank checkpoint resumed on 1 rank: kill while it is being converted
        shutil.copytree(reference[2] / "checkpoints" / "step-00000004", ckpts / "step-00000004")
        nproc = 1
    proc, started = launch(config, nproc), time.monotonic()
    if mode == "random":
        killed = wait_until(lambda: False, proc, rng.uniform(0, run_seconds[0])) or proc.poll() is None
        if not killed:
            run_seconds[0] = time.monotonic() - started
        in_save = saving(ckpts)
        killed = killed and kill_a_rank(proc, rng)
    elif mode == "during-save":
        killed = wait_until(lambda: saving(ckpts), proc, 300) and kill_a_rank(proc, rng)
        in_save = killed
    else:
        killed = wait_until(lambda: converting(ckpts), proc, 300) and kill_a_rank(proc, rng)
        in_save = False
        tally.kills_during_conversion += killed
    proc.wait(timeout=300)
    tally.trials += 1
    tally.kills += killed
    tally.kills_during_save += killed and in_save
    for attempt in range(3):  # the same command again, until the run completes
        if complete_checkpoints(ckpts) and complete_checkpoints(ckpts)[-1].name == f"step-{FULL_STEPS:08d}":
            break
        tally.resumes += 1
        if launch(config, nproc).wait(timeout=600) != 0 and attempt == 2:
            tally.unresumable += 1
            tally.notes.append(f"{mode}: relaunch failed 3 times in {root}")
            return
    expected = reference[nproc]
    same_loss = read_metrics(root / "run") == read_metrics(expected) if mode != "conversion" else True
    want = consolidated(expected / "checkpoints" / f"step-{FULL_STEPS:08d}")
    have = consolidated(ckpts / f"step-{FULL_STEPS:08d}")
    # After a change of world size results match to rounding, not bitwise (see tests/test_resume_world_size.py).
    close = torch.equal if mode != "conversion" else (lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-6))
    if not (same_loss and all(close(want[k], have[k]) for k in want)):
        tally.mismatches += 1
        tally.notes.append(f"{mode}: final state differs from the uninterrupted run in {root}")


def reference_runs(root: Path, tiny_model: Path) -> tuple[dict[int, Path], float]:
    runs, seconds = {}, 0.0
    for nproc in (2, 1):
        config = write_config(root / f"ref{nproc}" / "cfg.yaml", tiny_model)
        started = time.monotonic()
        run_dtrain("train", str(config), *FULL_OVERRIDES, "--nproc", str(nproc))
        if nproc == 2:
            seconds = time.monotonic() - started
        runs[nproc] = config.parent / "run"
    return runs, seconds


def run_trials(
    modes: list[str],
    workdir: Path,
    tiny_model: Path,
    seed: int,
    reference: dict[int, Path] | None = None,
    run_seconds: float = 20.0,
) -> Tally:
    """`reference`: uninterrupted runs by rank count ({1: dir, 2: dir}); made here when not given."""
    rng = random.Random(seed)
    if reference is None:
        reference, run_seconds = reference_runs(workdir, tiny_model)
    tally = Tally()
    window = [run_seconds]
    for i, mode in enumerate(modes):
        for attempt in range(3):  # a random moment after the run ended kills nothing: draw again, inside it
            kills_before = tally.kills
            trial_root = workdir / f"trial-{i:03d}-{mode}-{attempt}"
            trial_root.mkdir(parents=True)
            run_trial(mode, trial_root, tiny_model, reference, window, rng, tally)
            print(f"trial {tally.trials} ({mode}): {tally.summary()}", flush=True)
            if tally.kills > kills_before:
                break
    return tally
