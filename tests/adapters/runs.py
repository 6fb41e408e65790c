"""The tiny 2-rank lora / qlora / full runs that the adapter and export tests share, each made once per session.

Starting two ranks costs more than training the tiny model, so runs are few and reused: test modules call
`shared_runs(tmp_path_factory, tiny_model)` and ask for a run by name; it is trained on first use only.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from dtrain.checkpoint import complete_checkpoints
from tests.helpers import REPO, run_dtrain, start_dtrain, write_config

STEPS = 4
# Checkpoints at 2 and 4; eval at 2 (mid-training) and 4. seq_len 128 keeps the steps short.
COMMON = [
    f"train.max_steps={STEPS}", "train.warmup_steps=1", "checkpoint.every_steps=2", "checkpoint.keep_last=0",
    "eval.every_steps=2", "data.seq_len=128",
]  # fmt: skip
BASES = {"lora": "configs/tiny-lora.yaml", "qlora": "configs/tiny-qlora.yaml", "full": "configs/tiny-full-zero3.yaml"}
# name -> (shipped config, overrides). The PROBED runs share one probe_run launch, which also reports engine
# logits, frozen-weight checks and adapter changes; the "*-z2" runs go through the real `dtrain train` (the tests read
# what it printed, and resume or kill them with the same command).
RUNS = {
    "lora-z0": ("lora", ["deepspeed.stage=0"]),
    "lora-z2": ("lora", ["deepspeed.stage=2"]),
    "lora-z3": ("lora", ["deepspeed.stage=3"]),
    # The stage-0 run evaluates only after its last step: the runs that evaluate mid-training must still equal it.
    "qlora-z0": ("qlora", ["deepspeed.stage=0", "eval.every_steps=0"]),
    "qlora-z2": ("qlora", []),  # the shipped tiny QLoRA config (ZeRO-2, NF4, double quant, bf16 compute)
    "qlora-z3": ("qlora", ["deepspeed.stage=3"]),
    "full-z3": ("full", []),
}
PROBED = ("lora-z0", "qlora-z0", "lora-z3", "qlora-z3", "full-z3")
# The PEFT variants (lora.use_dora / use_rslora / init_lora_weights / loraplus_lr_ratio), probed in a launch of their
# own so that the tests above do not wait for them. Each on the most demanding stage it runs on.
VARIANTS = {
    "dora-z3": ("lora", ["deepspeed.stage=3", "lora.use_dora=true"]),
    "rslora-loraplus-z3": (
        "lora",
        ["deepspeed.stage=3", "lora.use_rslora=true", "lora.init_lora_weights=gaussian", "lora.loraplus_lr_ratio=16"],
    ),
    "pissa-z3": ("lora", ["deepspeed.stage=3", "lora.init_lora_weights=pissa"]),
    "olora-z2": ("lora", ["deepspeed.stage=2", "lora.init_lora_weights=olora"]),
    "qlora-dora-z2": ("qlora", ["lora.use_dora=true"]),
}
RUNS.update(VARIANTS)

_shared: SharedRuns | None = None


def shared_runs(tmp_path_factory, tiny_model: Path) -> SharedRuns:
    global _shared
    if _shared is None:
        _shared = SharedRuns(tmp_path_factory.mktemp("adapter-runs"), tiny_model)
    return _shared


class SharedRuns:
    def __init__(self, root: Path, tiny_model: Path):
        self.root = root
        self.tiny_model = tiny_model
        self.done: dict[str, subprocess.CompletedProcess | None] = {}

    def config(self, name: str, folder: Path | None = None) -> tuple[Path, list[str]]:
        """(config file, overrides) of a run; `folder` puts the run (output_dir) elsewhere."""
        strategy, overrides = RUNS[name]
        folder = folder or self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        config = write_config(folder / "cfg.yaml", self.tiny_model, base=BASES[strategy])
        return config, [*COMMON, *overrides]

    def run(self, name: str) -> Path:
        """The run folder (output_dir) of a finished run."""
        if name not in self.done:
            if name in PROBED:
                self._probe_all(PROBED)
            elif name in VARIANTS:
                self._probe_all(tuple(VARIANTS))
            else:
                config, overrides = self.config(name)
                self.done[name] = run_dtrain("train", str(config), *overrides, "--nproc", "2")
        return self.root / name / "run"

    def output(self, name: str) -> str:
        """What `dtrain train` printed (both streams)."""
        self.run(name)
        proc = self.done[name]
        return proc.stdout + proc.stderr

    def probe(self, name: str) -> Path:
        """The probe folder of a probed run: probe.json and logits.pt."""
        self.run(name)
        return self.root / name / "probe"

    def _probe_all(self, names: tuple[str, ...]) -> None:
        args: list[str] = []
        for name in names:
            config, overrides = self.config(name)
            args += ["--", str(self.root / name / "probe"), str(config), *overrides]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        proc = subprocess.run(
            [*cmd, "-m", "tests.adapters.probe_run", *args[1:]], cwd=REPO, capture_output=True, text=True, timeout=900
        )
        if proc.returncode != 0:
            raise AssertionError(f"probe run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}")
        self.done.update(dict.fromkeys(names, proc))


def kill9_and_resume(config: Path, overrides: list[str], folder: Path) -> str:
    """`dtrain train` in `folder`, one rank killed with SIGKILL right after the step-2 checkpoint, then the same
    command again: returns what the second launch printed (it must say it resumed from step 2)."""
    ckpts = folder / "run" / "checkpoints"
    log = folder / "first-launch.log"
    proc = start_dtrain("train", str(config), *overrides, "--nproc", "2", log=log)
    deadline = time.monotonic() + 300
    while not complete_checkpoints(ckpts):
        assert proc.poll() is None, f"run ended before its first checkpoint:\n{log.read_text()[-5000:]}"
        assert time.monotonic() < deadline, "no checkpoint in 300 s"
        time.sleep(0.02)
    psutil.Process(proc.pid).children()[-1].send_signal(signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step-00000002"], "the run finished before the kill"
    resumed = run_dtrain("train", str(config), *overrides, "--nproc", "2")
    output = resumed.stdout + resumed.stderr
    assert f"resumed from {ckpts / 'step-00000002'}" in output
    return output
