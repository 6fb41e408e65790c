"""Offline means offline: no process dtrain runs asks the Hub for code. bitsandbytes 0.50 asks for a CPU kernel while
being imported (dtrain/no_hub_kernels.py); with the Hub's address pointed at a closed local port, neither the import
nor a qlora check / train / eval attempts a connection or prints the failed lookup."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO, run_dtrain, write_config

CLOSED_PORT = "http://127.0.0.1:9"  # discard: nothing listens, so a Hub call fails at once (no real network)
LOOKUP_LINES = ("kernels-community", "Failed to load", "publisher trust")
IMPORT = """
import socket
real_connect = socket.socket.connect
def connect(self, address):
    print("CONNECT", address, flush=True)
    return real_connect(self, address)
socket.socket.connect = connect
import dtrain  # as every dtrain process does first: ranks, and the launcher through dtrain.config
import importlib.util
assert importlib.util.find_spec("bitsandbytes")  # how peft and accelerate probe for it, before importing it
import peft, bitsandbytes  # peft imports bitsandbytes whenever it is installed
print("imported bitsandbytes", bitsandbytes.__version__)
"""


@pytest.fixture
def hub_unreachable(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # online as far as huggingface_hub knows


def test_importing_bitsandbytes_connects_nowhere(hub_unreachable):
    proc = subprocess.run([sys.executable, "-c", IMPORT], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "imported bitsandbytes" in proc.stdout
    assert "CONNECT" not in proc.stdout, proc.stdout
    assert not [line for line in proc.stderr.splitlines() if any(s in line for s in LOOKUP_LINES)], proc.stderr


@pytest.mark.slow
def test_qlora_check_train_eval_print_no_hub_kernel_lookup(tmp_path, tiny_model, hub_unreachable):
    config = write_config(tmp_path / "cfg.yaml", tiny_model, base="configs/tiny-qlora.yaml")
    steps = ["train.max_steps=1", "train.warmup_steps=0", "eval.max_batches=1"]
    outputs = {
        "check": run_dtrain("check", str(config), *steps),
        "train": run_dtrain("train", str(config), *steps, "--nproc", "1"),
        "eval": run_dtrain("eval", str(tmp_path / "run"), "--data", str(config)),
    }
    for command, proc in outputs.items():
        printed = [line for line in (proc.stdout + proc.stderr).splitlines() if any(s in line for s in LOOKUP_LINES)]
        assert not printed, (command, printed)
    assert "dtrain: run finished at step 1 of 1" in outputs["train"].stdout
