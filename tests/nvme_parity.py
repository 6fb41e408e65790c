"""python -m tests.nvme_parity ROOT adamw_torch|adamw_deepspeed RUN...   (RUN: cpu | nvme-opt | nvme-both, each
optionally +resume: resumed from that layout's step-10 checkpoint)

The 20-step comparison of docs/nvme-optimizer.md through the real CLI (`dtrain train --nproc 2`): the production
tests' model (8192 x 128 embedding and lm_head, the only tensors above DeepSpeed's 1 MiB swap minimum), bf16,
recomputation, with the optimizer (and parameters) on CPU or on NVMe (a folder under ROOT). Prints each run's losses.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from dtrain.metrics import read_metrics
from dtrain.tiny import make_tiny_model
from tests.helpers import run_dtrain, write_config
from tests.production.runs import production_model

COMMON = [
    "train.precision=bf16", "model.gradient_checkpointing=true", "train.max_steps=20", "train.warmup_steps=1",
    "checkpoint.every_steps=10", "checkpoint.keep_last=0", "eval.every_steps=0", "data.seq_len=128",
    "train.gradient_accumulation_steps=null", "train.global_batch_size=8",
]  # fmt: skip


def layouts(root: Path, optimizer: str) -> dict[str, list[str]]:
    opt, both = root / f"swap-opt-{optimizer}", root / f"swap-both-{optimizer}"
    return {
        "cpu": ["deepspeed.offload_optimizer.device=cpu", "deepspeed.offload_param.device=cpu"],
        "nvme-opt": ["deepspeed.offload_optimizer.device=nvme", f"deepspeed.offload_optimizer.nvme_path={opt}",
                     "deepspeed.offload_param.device=cpu"],
        "nvme-both": ["deepspeed.offload_optimizer.device=nvme", f"deepspeed.offload_optimizer.nvme_path={both}",
                      "deepspeed.offload_param.device=nvme", f"deepspeed.offload_param.nvme_path={both}"],
    }  # fmt: skip


def main(root: Path, optimizer: str, runs: list[str]) -> None:
    tiny, model = root / "tiny", root / "model"
    if not (tiny / "config.json").exists():
        make_tiny_model(tiny)
    if not (model / "config.json").exists():
        production_model(root, tiny)
    for name in runs:
        base, resume, _ = name.partition("+resume")
        folder = root / f"{optimizer}-{name}"
        extra = [f"checkpoint.resume={root}/{optimizer}-{base}/run/checkpoints/step-00000010"] if resume else []
        started = time.monotonic()
        run_dtrain("train", str(write_config(folder / "cfg.yaml", model)), *COMMON, f"train.optimizer={optimizer}",
                   *layouts(root, optimizer)[base], *extra, "--nproc", "2", timeout=1500)  # fmt: skip
        losses = read_metrics(folder / "run")
        print(
            name, f"{time.monotonic() - started:.0f}s", json.dumps({s: losses[s] for s in sorted(losses)}), flush=True
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
