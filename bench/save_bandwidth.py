"""Checkpoint save bandwidth against a raw write of the same bytes to the same file system.

    python bench/save_bandwidth.py [--hidden 1024 --layers 9 --nproc 2 --saves 3 --repeats 3 --dir /path/on/the/fs]

A ~100M-parameter tiny Llama is trained by `dtrain train` (ZeRO-3 + CPU offload, the shipped tiny config) for
--saves steps with a checkpoint after every one; each save's seconds and bytes come from metrics.jsonl (the whole
save: every rank's shards and RNG state synced to disk, metadata, folder syncs, the atomic rename). Next to it the
same files, byte for byte in size, are written raw --saves times by --nproc processes at once (files dealt
round-robin), with an fsync per file (what a durable save must do at least) and without. Each repeat runs both, in
an order that flips every repeat; the save / raw ratio is taken within a repeat (medians of its saves and writes),
then printed as the median over repeats with min-max.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
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


def write_files(sizes: list[int], folder: Path, sync: bool, start: multiprocessing.Barrier) -> None:
    block = os.urandom(1 << 24)
    start.wait()
    for i, size in enumerate(sizes):
        with (folder / f"{os.getpid()}-{i}").open("wb") as f:
            left = size
            while left:
                left -= f.write(block[: min(left, len(block))])
            if sync:
                f.flush()
                os.fsync(f.fileno())


def raw_write_seconds(sizes: list[int], folder: Path, writers: int, sync: bool) -> float:
    folder.mkdir()
    ordered = sorted(sizes, reverse=True)
    start = multiprocessing.Barrier(writers + 1)
    procs = [multiprocessing.Process(target=write_files, args=(ordered[w::writers], folder, sync, start))
             for w in range(writers)]  # fmt: skip
    for p in procs:
        p.start()
    start.wait()
    started = time.perf_counter()
    for p in procs:
        p.join()
    if sync:
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return time.perf_counter() - started


def median_range(values: list[float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    from dtrain.tiny import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="dtrain-save-bench-", dir=args.dir) as tmp:
        root = Path(tmp)
        model = make_tiny_model(root / "model", hidden_size=args.hidden, num_layers=args.layers, num_heads=16,
                                num_kv_heads=8, intermediate_size=round(8 * args.hidden / 3 / 32) * 32)  # fmt: skip
        raw = yaml.safe_load((REPO / "configs/tiny-full-zero3.yaml").read_text())
        raw["model"]["path"] = str(model)
        for ds in raw["data"]["datasets"]:
            ds["path"] = str(REPO / ds["path"])
        raw["output_dir"] = str(root / "run")
        raw["data"]["seq_len"] = 64
        raw["train"] |= {
            "micro_batch_size": 1,
            "gradient_accumulation_steps": 1,
            "max_steps": args.saves,
            "warmup_steps": 0,
        }
        raw["checkpoint"] |= {"every_steps": 1, "keep_last": 0}
        raw["eval"] |= {"every_steps": 0, "max_batches": 1}
        raw["logging"] |= {"progress_bar": False, "report_to": []}
        config = root / "config.yaml"
        config.write_text(yaml.safe_dump(raw))
        env = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "dtrain_launch.cli", "train", str(config), "--nproc", str(args.nproc)]
        params = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 4
        saves, raw_rates, ratios = [], {"synced": [], "unsynced": []}, {"synced": [], "unsynced": []}
        for repeat in range(args.repeats):
            run = root / "run"
            order = ["dtrain", "raw"] if repeat % 2 == 0 else ["raw", "dtrain"]
            for what in order:
                if what == "dtrain":
                    shutil.rmtree(run, ignore_errors=True)
                    repeat_saves = train_and_save(cmd, env, run)
                    checkpoint = run / "checkpoints" / "step-00000001"
                    sizes = [f.stat().st_size for f in checkpoint.rglob("*") if f.is_file()]
                else:
                    repeat_raw = {kind: [] for kind in raw_rates}
                    for i in range(args.saves):
                        for kind in repeat_raw:
                            folder = root / f"raw-{kind}-{repeat}-{i}"
                            seconds = raw_write_seconds(sizes, folder, args.nproc, sync=kind == "synced")
                            repeat_raw[kind].append(sum(sizes) / seconds / 1e6)
                            shutil.rmtree(folder)
            saves += repeat_saves
            save_rate = statistics.median(
                r["checkpoint/bytes"] / r["checkpoint/save_seconds"] / 1e6 for r in repeat_saves
            )
            for kind, values in repeat_raw.items():
                raw_rates[kind] += values
                ratios[kind].append(save_rate / statistics.median(values))
        total = sum(sizes)
        print(f"model {params / 1e6:.0f}M parameters (fp32), {args.nproc} ranks; checkpoint {len(sizes)} files, "
              f"{total / 1e9:.2f} GB; file system of {root}; {args.repeats} repeats x {args.saves} saves")  # fmt: skip
        save_rates = [r["checkpoint/bytes"] / r["checkpoint/save_seconds"] / 1e6 for r in saves]
        print(f"dtrain save          {median_range(save_rates)} MB/s  "
              f"({median_range([r['checkpoint/save_seconds'] for r in saves], '{:.2f}')} s)")  # fmt: skip
        for kind, values in raw_rates.items():
            print(
                f"raw write, {kind:8s}  {median_range(values)} MB/s;  save / raw {median_range(ratios[kind], '{:.2f}')}"
            )
        print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")


def train_and_save(cmd: list[str], env: dict[str, str], run: Path) -> list[dict]:
    """One `dtrain train` with a save after every step: the metrics records of its saves."""
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-5000:])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "checkpoint/save_seconds" in r]


if __name__ == "__main__":
    main()
