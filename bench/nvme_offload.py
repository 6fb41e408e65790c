"""Step time and bytes swapped per step: optimizer in CPU RAM (fp32 and bf16 states) vs on NVMe, against the raw
read+write bandwidth of the same file system (bf16 states on NVMe fail in DeepSpeed 0.19.8, see
dtrain.config.deepspeed.optimizer_states_problems).

    python bench/nvme_offload.py [--hidden 1024 --layers 9 --nproc 2 --steps 6 --repeats 3 --dir /path/on/nvme]

A ~100M-parameter tiny Llama (the defaults) is trained by `dtrain train` (ZeRO-3, bf16, DeepSpeed's CPU Adam,
parameters on the GPUs) for --steps steps with the optimizer offloaded to cpu with fp32 and with bf16 states
(train.optimizer_states), and to nvme. Step times come from metrics.jsonl, the first step left out (it creates the
moments). Every step the NVMe optimizer reads and writes each swappable sub-group's master weights and moments and
writes and reads its gradient files: the bytes per step are twice the swap folder's size after the run. The raw
bandwidth is the same files written and read back once with DeepSpeed's own aio handle (O_DIRECT, locked buffers)
in the same folder. Each repeat runs the layouts and the raw copy in an order that rotates; figures are medians over
repeats with min-max, ratios taken within a repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "cpu": {"offload_optimizer": "cpu", "optimizer_states": "fp32"},
    "nvme fp32": {"offload_optimizer": "nvme", "optimizer_states": "fp32"},
    "cpu bf16": {"offload_optimizer": "cpu", "optimizer_states": "bf16"},
}


def median_range(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def write_config(root: Path, model: Path, steps: int, layout: dict, swap: Path) -> Path:
    raw = yaml.safe_load((REPO / "configs/tiny-full-zero3.yaml").read_text())
    raw["model"]["path"] = str(model)
    for ds in raw["data"]["datasets"]:
        ds["path"] = str(REPO / ds["path"])
    raw["output_dir"] = str(root / "run")
    raw["data"]["seq_len"] = 128
    raw["train"] |= {"micro_batch_size": 1, "gradient_accumulation_steps": 1, "max_steps": steps, "warmup_steps": 0,
                     "precision": "bf16", "optimizer": "adamw_deepspeed",
                     "optimizer_states": layout["optimizer_states"]}  # fmt: skip
    raw["deepspeed"]["offload_param"] = {"device": "none"}
    raw["deepspeed"]["offload_optimizer"] = {"device": layout["offload_optimizer"]}
    if layout["offload_optimizer"] == "nvme":
        raw["deepspeed"]["offload_optimizer"]["nvme_path"] = str(swap)
    raw["checkpoint"] |= {"every_steps": 10**6, "keep_last": 0}
    raw["eval"] |= {"every_steps": 0, "max_batches": 1}
    raw["logging"] |= {"progress_bar": False, "report_to": []}
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config


def train(config: Path, nproc: int, run: Path) -> list[float]:
    """Seconds of every step after the first."""
    env = os.environ | {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    cmd = [sys.executable, "-m", "dtrain_launch.cli", "train", str(config), "--nproc", str(nproc)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-5000:])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train/step_time"] for r in records if "train/step_time" in r and r["step"] > 1]


def raw_read_write_seconds(sizes: list[int], folder: Path) -> float:
    """Write then read back `sizes` bytes, one file each, through DeepSpeed's aio handle (what the swapper uses)."""
    import torch
    from deepspeed.ops.op_builder import AsyncIOBuilder

    handle = AsyncIOBuilder().load().aio_handle(1 << 20, 8, False, True, 1)
    folder.mkdir(parents=True, exist_ok=True)
    buffers = [handle.new_cpu_locked_tensor(size // 4, torch.zeros(1)) for size in sizes]
    paths = [str(folder / f"raw-{i}.swp") for i in range(len(sizes))]
    started = time.perf_counter()
    for buffer, path in zip(buffers, paths, strict=True):
        handle.async_pwrite(buffer, path, 0)
    handle.wait()
    for buffer, path in zip(buffers, paths, strict=True):
        handle.async_pread(buffer, path, 0)
    handle.wait()
    seconds = time.perf_counter() - started
    for buffer in buffers:
        handle.free_cpu_locked_tensor(buffer)
    shutil.rmtree(folder)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="folder on the file system to swap to (default: a temporary one)")
    args = parser.parse_args()
    from dtrain.tiny import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="dtrain-nvme-bench-", dir=args.dir) as tmp:
        root = Path(tmp)
        model = make_tiny_model(root / "model", hidden_size=args.hidden, num_layers=args.layers, num_heads=16,
                                num_kv_heads=8, intermediate_size=round(8 * args.hidden / 3 / 32) * 32)  # fmt: skip
        params = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 4
        steps = {name: [] for name in LAYOUTS}
        swapped = {name: [] for name in LAYOUTS if LAYOUTS[name]["offload_optimizer"] == "nvme"}
        raw, ratios = [], {name: [] for name in swapped}
        sizes = {name: [] for name in swapped}
        for repeat in range(args.repeats):
            order = [*LAYOUTS, "raw"]
            order = order[repeat % len(order) :] + order[: repeat % len(order)]
            medians = {}
            for what in order:
                if what == "raw":  # the swap files of the latest fp32 NVMe run (an earlier repeat's in the first)
                    if not sizes["nvme fp32"]:
                        continue
                    raw_rate = 2 * sum(sizes["nvme fp32"]) / raw_read_write_seconds(sizes["nvme fp32"], root / "raw")
                    raw.append(raw_rate / 1e6)
                    continue
                swap = root / "swap"
                shutil.rmtree(swap, ignore_errors=True)
                shutil.rmtree(root / "run", ignore_errors=True)
                seconds = train(write_config(root, model, args.steps, LAYOUTS[what], swap), args.nproc, root / "run")
                steps[what] += seconds
                medians[what] = statistics.median(seconds)
                if what in swapped:
                    sizes[what] = [f.stat().st_size for f in swap.rglob("*.swp")]
                    swapped[what].append(2 * sum(sizes[what]))
            if not raw:
                raw_rate = 2 * sum(sizes["nvme fp32"]) / raw_read_write_seconds(sizes["nvme fp32"], root / "raw")
                raw.append(raw_rate / 1e6)
            for name in swapped:
                extra = medians[name] - medians["cpu"]  # what the swapping adds to a step
                ratios[name].append((swapped[name][-1] / extra) / (raw[-1] * 1e6) if extra > 0 else float("inf"))
        print(f"model {params / 1e6:.0f}M parameters, {args.nproc} ranks, {args.steps} steps (first left out), "
              f"{args.repeats} repeats; swap folder on the file system of {root}")  # fmt: skip
        print(f"raw aio write+read       {median_range(raw, '{:.0f}')} MB/s")
        for name, values in steps.items():
            line = f"{name:10s} step time  {median_range(values)} s"
            if name in swapped:
                line += (f";  swapped {statistics.median(swapped[name]) / 1e6:.0f} MB/step; swap throughput / raw "
                         f"{median_range(ratios[name])}")  # fmt: skip
            print(line)
        print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
