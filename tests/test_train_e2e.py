"""The spine end to end, on 2 real gloo ranks through the real CLI: ZeRO-3 + CPU offload, sharded atomic
checkpoints, kill -9 and resume with an identical loss curve, TensorBoard events."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from dtrain.checkpoint import complete_checkpoints
from dtrain.metrics import read_metrics
from tests.helpers import FULL_OVERRIDES as OVERRIDES
from tests.helpers import FULL_STEPS as STEPS
from tests.helpers import consolidated, last_logged_step, run_dtrain, start_dtrain, write_config

pytestmark = pytest.mark.slow  # 2-rank trainings through the CLI


@pytest.fixture(scope="module")
def reference(full_reference):
    """An uninterrupted 2-rank run: its losses and checkpoints are what every interrupted run must reproduce."""
    return full_reference(2)


def test_reference_run_writes_checkpoints_metrics_and_tensorboard(reference):
    steps = [p.name for p in complete_checkpoints(reference / "checkpoints")]
    assert steps == ["step-00000004", "step-00000008", "step-00000012"]
    for ckpt in steps:
        folder = reference / "checkpoints" / ckpt
        assert sorted(p.name for p in (folder / "rng").iterdir()) == [
            "rank-00000.safetensors",
            "rank-00001.safetensors",
        ]
        assert (folder / "config.yaml").is_file()
    losses = read_metrics(reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1]  # it learns

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(reference / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/step_time", "eval/loss"} <= tags
    tb_losses = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(tb_losses) == list(range(1, STEPS + 1))
    assert all(abs(tb_losses[s] - losses[s]) < 1e-6 * max(1.0, abs(losses[s])) for s in tb_losses)
    assert [e.step for e in events.Scalars("eval/loss")] == [6, 12]
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert max(lrs) == pytest.approx(1e-3, rel=0.05) and lrs[-1] < lrs[5]  # warmup, then decay


def test_zero3_shards_hold_a_part_of_every_parameter_on_each_rank(reference):
    """Each rank's optimizer shard holds about half of the fp32 weights, and together they are the whole model."""
    folder = reference / "checkpoints" / "step-00000012" / "ds"
    total = sum(t.numel() for t in consolidated(folder.parent).values())
    per_rank = []
    for rank in (0, 1):
        state = torch.load(folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False)
        flat = state["optimizer_state_dict"]["fp32_flat_groups"]
        per_rank.append(sum(t.numel() for t in flat))
    assert all(0.45 * total <= n <= 0.55 * total for n in per_rank), (per_rank, total)
    assert sum(per_rank) >= total


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while last_logged_step(run_dir) < step:
        assert proc.poll() is None, f"run ended before step {step}:\n{log.read_text()[-5000:]}"
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout}s"
        time.sleep(0.05)


def test_kill9_of_a_rank_then_same_command_resumes_exactly(tmp_path, tiny_model, reference):
    config = write_config(tmp_path / "cfg.yaml", tiny_model)
    kill_after = random.Random(os.environ.get("DTRAIN_TEST_SEED")).randint(5, STEPS - 2)
    log = tmp_path / "first-launch.log"
    proc = start_dtrain("train", str(config), *OVERRIDES, "--nproc", "2", log=log)
    _wait_for_step(tmp_path / "run", kill_after, proc, log)
    victim = random.choice(psutil.Process(proc.pid).children())
    victim.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    killed_at = max(read_metrics(tmp_path / "run"))
    assert killed_at < STEPS, "the run finished before the kill landed"

    # A crashed save of a later step must never be resumed from.
    ckpts = tmp_path / "run" / "checkpoints"
    newest = complete_checkpoints(ckpts)[-1]
    shutil.copytree(newest, ckpts / ".tmp-step-00000011")
    shutil.copytree(newest, ckpts / "step-00000011", ignore=shutil.ignore_patterns("trainer_state.json"))

    resumed = run_dtrain("train", str(config), *OVERRIDES, "--nproc", "2")
    assert f"resumed from {newest}" in resumed.stdout + resumed.stderr
    expected, got = read_metrics(reference), read_metrics(tmp_path / "run")
    assert sorted(got) == sorted(expected)
    assert [got[s] for s in sorted(got)] == [expected[s] for s in sorted(expected)]  # bitwise, every step
    want, have = consolidated(reference / "checkpoints/step-00000012"), consolidated(ckpts / "step-00000012")
    assert want and want.keys() == have.keys()
    assert all(torch.equal(want[k], have[k]) for k in want)
