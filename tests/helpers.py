"""Shared by the tests (and by bench/fault_injection.py through tests/fault_trials.py): write a run config for the
tiny model, run the real `dtrain` CLI, read what a run left behind."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import yaml

from dtrain.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]

FULL_STEPS = 12
FULL_OVERRIDES = [
    f"train.max_steps={FULL_STEPS}", "checkpoint.every_steps=4", "checkpoint.keep_last=0", "eval.every_steps=6",
    # the same global batch (8) on any number of ranks, so runs on 1 and 2 ranks read the same samples per step
    "train.gradient_accumulation_steps=null", "train.global_batch_size=8",
]  # fmt: skip


def set_key(raw: dict, dotted: str, value) -> None:
    """raw["a"]["b"]["c"] = value for dotted "a.b.c", creating missing sections (a YAML config before loading)."""
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def tiny_config(tiny_model: Path, output_dir: Path, base: str = "configs/tiny-full-zero3.yaml") -> dict:
    """The shipped `base` config (as the YAML's dict) pointed at `tiny_model` and the bundled data, output in
    `output_dir`, no progress bar."""
    raw = yaml.safe_load((REPO / base).read_text())
    raw["model"]["path"] = str(tiny_model)
    for ds in raw["data"]["datasets"]:
        ds["path"] = str(REPO / ds["path"])
    raw["output_dir"] = str(output_dir)
    raw["logging"]["progress_bar"] = False
    return raw


def write_config(path: Path, tiny_model: Path, base: str = "configs/tiny-full-zero3.yaml", **keys) -> Path:
    """tiny_config() with output in path.parent / "run" and `keys` set (dotted: `**{"train.lr": 1e-3}`), written to
    `path`."""
    raw = tiny_config(tiny_model, path.parent / "run", base)
    for dotted, value in keys.items():
        set_key(raw, dotted, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_dtrain(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600, check: bool = True, in_process: bool = False
) -> subprocess.CompletedProcess:
    """`dtrain ARGS`: its exit code and output. `env` is added to this process's environment; `check` fails the test
    on a non-zero exit. `in_process` calls the CLI's main() here instead of in a fresh interpreter (no start-up cost:
    for commands that launch nothing, or must not) and fails the test if it tries to start torchrun."""
    if in_process:
        assert env is None, "in_process runs in this process's environment"
        proc = _run_in_process(args)
    else:
        proc = subprocess.run(
            dtrain_command(*args), capture_output=True, text=True, timeout=timeout, cwd=REPO,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(
            f"dtrain {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def start_dtrain(*args: str, log: Path | None = None) -> subprocess.Popen:
    """`dtrain ARGS` in the background (a run to kill): both output streams go to `log`, or nowhere."""
    sink = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - the child holds its own copy
    try:
        return subprocess.Popen(dtrain_command(*args), cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
    finally:
        if log:
            sink.close()


def dtrain_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dtrain_launch.cli", *args]


def _run_in_process(args: tuple[str, ...]) -> subprocess.CompletedProcess:
    from dtrain_launch.cli import main

    out, err = io.StringIO(), io.StringIO()
    # `dtrain train` replaces its process with torchrun: here that would replace pytest.
    launched = AssertionError(f"dtrain {' '.join(args)} tried to launch torchrun inside the test process")
    with redirect_stdout(out), redirect_stderr(err), mock.patch("os.execvpe", side_effect=launched):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse usage errors
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(["dtrain", *args], code, out.getvalue(), err.getvalue())


def last_logged_step(run_dir: Path) -> int:
    """The newest step in a (possibly live) run's metrics.jsonl; 0 before the first."""
    return max(read_metrics(run_dir), default=0)


def consolidated(checkpoint: Path) -> dict:
    """fp32 weights of a full-strategy checkpoint, gathered from its ZeRO shards."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="ds")
