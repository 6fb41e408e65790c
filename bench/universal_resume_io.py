"""Bytes each rank reads from storage when a ZeRO-3 run resumes through a universal checkpoint, at 1, 2 and 4 ranks.

    python bench/universal_resume_io.py [--hidden 512 --layers 4 --nproc 1 2 4]

A tiny Llama is trained 2 steps by `dtrain train` (ZeRO-3, 2 ranks, a checkpoint at step 2) and converted by
`dtrain reshard`. Then N gloo ranks build the same ZeRO-3 engine and each loads its share of every parameter's
fp32 / exp_avg / exp_avg_sq through `load_hp_checkpoint_state`, the method DeepSpeed's universal load calls per
parameter. The ranks take turns (a barrier between them) and each first evicts the checkpoint's files from the
page cache (fsync, then posix_fadvise DONTNEED), so each rank's `read_bytes` (/proc/self/io: bytes fetched from
storage) is what it would read on a node of its own, as ranks on separate nodes of a shared file system do. Read
per rank should fall as ~1/N of the files' bytes (DeepSpeed 0.19.8 without dtrain's fix: the whole files at any N).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYS = ("fp32", "exp_avg", "exp_avg_sq")


def state_files(universal: Path) -> list[Path]:
    return sorted(path for key in KEYS for path in (universal / "zero").glob(f"*/{key}.pt"))


def _evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (a conversion just written) stay cached through DONTNEED
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no read_bytes")


def _rank(rank: int, world_size: int, port: int, model_dir: str, universal: str, out: str, alone: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), DS_ACCELERATOR="cpu")  # fmt: skip
    import torch
    from transformers import AutoModelForCausalLM

    from dtrain import dist

    dist.compute_init(timeout_minutes=10)  # applies dtrain's DeepSpeed fixes, as a rank of a run does
    import deepspeed
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    if alone:
        Stage3.load_hp_checkpoint_state = Stage3.load_hp_checkpoint_state.__wrapped__

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
    optimizer, folder, files = engine.optimizer, Path(universal) / "zero", state_files(Path(universal))
    for turn in range(world_size):
        if turn == rank:
            _evict(files)
            before = _read_bytes()
            for group in optimizer.fp16_groups:
                for param in group:
                    for key in KEYS:
                        optimizer.load_hp_checkpoint_state(str(folder / optimizer.param_names[param]), key, param)
            Path(out, f"rank{rank}").write_text(str(_read_bytes() - before))
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def read_per_rank(model_dir: Path, universal: Path, nproc: int, deepspeed_alone: bool = False) -> list[int]:
    """Bytes each of `nproc` ranks reads from storage to load its share of `universal`'s optimizer state (with
    DeepSpeed's own loader instead of dtrain's fix: `deepspeed_alone`)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(nproc, port, str(model_dir), str(universal), out, deepspeed_alone), nprocs=nproc)
        return [int(Path(out, f"rank{rank}").read_text()) for rank in range(nproc)]


def _dtrain(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "dtrain_launch.cli", *args], check=True, cwd=REPO)


def converted_checkpoint(folder: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    """A tiny Llama (`folder`/model) trained 2 steps by `dtrain train` on 2 ranks and converted by `dtrain reshard`:
    (model folder, universal checkpoint folder)."""
    model, run = folder / "model", folder / "run"
    tiny = ["--hidden", str(hidden), "--layers", str(layers), "--intermediate", str(4 * hidden)]
    subprocess.run([sys.executable, "-m", "dtrain.tiny", str(model), *tiny], check=True, cwd=REPO)
    common = ["configs/tiny-full-zero3.yaml", f"model.path={model}", f"output_dir={run}", "train.max_steps=2"]
    common += ["train.warmup_steps=0", "checkpoint.every_steps=2", "eval.every_steps=0", "train.optimizer=adamw_torch"]
    common += ["deepspeed.offload_optimizer.device=none", "deepspeed.offload_param.device=none"]
    _dtrain("train", *common, "--nproc", "2")
    _dtrain("reshard", *common)
    return model, next(run.glob("checkpoints/step-*/universal"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench/universal_resume_io.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model, universal = converted_checkpoint(Path(tmp), args.hidden, args.layers)
        total = sum(path.stat().st_size for path in state_files(universal))
        print(f"\noptimizer state files (fp32, exp_avg, exp_avg_sq): {total / 2**20:.1f} MiB", flush=True)
        print("ranks | loader          | read per rank, MiB (min-max) | per rank / files | ideal 1/N", flush=True)
        for nproc in args.nproc:
            for alone in (False, True):
                read = read_per_rank(model, universal, nproc, deepspeed_alone=alone)
                low, high, loader = min(read) / 2**20, max(read) / 2**20, "DeepSpeed alone" if alone else "dtrain"
                print(f"{nproc:5d} | {loader:<15} | {low:8.1f} - {high:8.1f}          | {max(read) / total:16.3f} | "
                      f"{1 / nproc:.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
