"""dtrain against a bare DeepSpeed loop: steady tokens/s, startup, peak RSS per rank, checkpoint save speed.

    python bench/throughput.py [--strategies full lora qlora --repeats 3 --steps 16 --nproc 2]

For each strategy (the shipped configs/tiny-*.yaml: full = ZeRO-3 + CPU offload of optimizer and parameters, lora,
qlora) on a ~2M-parameter tiny Llama, seq_len 512, micro batch 4, one micro batch per step per rank:
- dtrain runs through its real CLI (`dtrain train --nproc N`: launcher checks, torchrun, ranks), twice: on the data
  cache `dtrain prepare` filled beforehand ("dtrain"), and on an empty cache of its own ("fresh": rank 0 tokenizes
  and packs the data inside the run, what a user's first launch costs);
- bench/bare_loop.py runs under plain torchrun: `deepspeed.initialize` with the DeepSpeed config dtrain generates
  for the same run, and the very micro batches dtrain's ranks collate (built here with dtrain's own data code).
Runs interleave dtrain / fresh / bare (the order rotates every repeat) so a noisy machine slows all alike; every
figure is the median over repeats with its min-max, and each ratio is taken within a repeat before the median. The
machine may be shared: every repeat prints the 1-minute load average before its runs, the table their range.

- steady tokens/s: real tokens of the steps after --warmup, over the wall time from the end of the warm-up to the
  end of the last step (dtrain: the wall-clock time of its metrics.jsonl records; bare: its own step-end times);
- startup: from starting the launch command (python ... dtrain_launch.cli train / torchrun) to the end of the first
  optimizer step; for dtrain it includes the launcher's checks and, fresh, the data preparation;
- peak RSS: the largest high-water mark (VmHWM) of any rank process, polled every 50 ms (the launcher and torchrun's
  agent are not ranks: "peak RSS agent MB" is theirs, the same for both);
- save: one checkpoint after the last step (dtrain: its atomic, fsynced save; bare: engine.save_checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
WHO = ("dtrain", "fresh", "bare")  # dtrain on the prepared cache, dtrain on an empty one, the bare loop
CONFIGS = {"full": "configs/tiny-full-zero3.yaml", "lora": "configs/tiny-lora.yaml", "qlora": "configs/tiny-qlora.yaml"}


def dtrain_config(root: Path, strategy: str, model: Path, args: argparse.Namespace, cache: Path) -> Path:
    raw = yaml.safe_load((REPO / CONFIGS[strategy]).read_text())
    raw["model"]["path"] = str(model)
    for ds in raw["data"]["datasets"]:
        ds["path"] = str(REPO / ds["path"])
    raw["data"] |= {"seq_len": args.seq_len, "cache_dir": str(cache)}
    raw["train"] |= {"micro_batch_size": args.micro_batch, "gradient_accumulation_steps": 1, "max_steps": args.steps}
    raw["checkpoint"] |= {"every_steps": 10**6, "keep_last": 0, "resume": "never"}  # one save, after the last step
    raw["eval"] |= {"every_steps": 0, "max_batches": 1}  # eval runs after the measured steps
    raw["logging"]["progress_bar"] = False
    raw["output_dir"] = str(root / "run")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def prepare_bare(root: Path, config: Path, nproc: int) -> tuple[Path, list[int]]:
    """The bare loop's spec and the micro batches of each rank, made with dtrain's own data code; returns the spec
    path and the real tokens of each step."""
    from transformers import AutoTokenizer

    from dtrain.config import load_config
    from dtrain.data import collate, prepare_data
    from dtrain.ds_config import build_deepspeed_config
    from dtrain.layout import BatchLayout
    from dtrain.order import DataOrder, rank_micro_batches

    cfg = load_config(str(config))
    layout = BatchLayout.from_config(cfg.train, nproc)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path)
    step_tokens = []
    for rank in range(nproc):
        data = prepare_data(cfg, tokenizer, rank=rank, world_size=nproc).train
        order = DataOrder(len(data), layout.global_batch_size, cfg.train.seed, None)
        steps = []
        for step in range(cfg.train.max_steps):
            samples = order.step_samples(step * layout.global_batch_size)
            micro = rank_micro_batches(samples, rank, nproc, layout.micro_batch_size)
            rows = [[data[i] for i in indices] for indices in micro]
            steps.append([collate(r, tokenizer.pad_token_id, cfg.data.seq_len, cfg.data.packing) for r in rows])
            if rank == 0:
                step_tokens.append(int(sum(data.lengths[i] for i in samples)))
        torch.save(steps, root / f"rank{rank}.pt")
    lora = cfg.lora
    spec = {
        "model": str(cfg.model.path),
        "strategy": cfg.strategy,
        "lora": {"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
                 "target_modules": lora.target_modules, "bias": lora.bias},
        "ds_config": build_deepspeed_config(cfg, layout),
        "lr": cfg.train.lr,
        "batches": str(root),
        "save_dir": str(root / "save"),
        "result": str(root / "result-rank{rank}.json"),
    }  # fmt: skip
    path = root / "spec.json"
    path.write_text(json.dumps(spec))
    return path, step_tokens


def rank_processes(launcher: psutil.Process, marker: str) -> list[psutil.Process]:
    try:
        children = launcher.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    ranks = []
    for child in children:
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if marker in cmdline and "torch.distributed.run" not in cmdline:
            ranks.append(child)
    return ranks


def high_water_mark(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def launch(cmd: list[str], marker: str, log: Path, timeout: float = 900) -> tuple[float, int, int]:
    """Run to the end, polling peak RSS; returns (start time, largest rank peak RSS, the launch process's peak: the
    launcher, then the torchrun agent it becomes)."""
    env = os.environ | {"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    started = time.time()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        launcher, peaks, agent = psutil.Process(proc.pid), {}, 0
        while proc.poll() is None:
            agent = max(agent, high_water_mark(proc.pid))
            for rank in rank_processes(launcher, marker):
                peaks[rank.pid] = max(peaks.get(rank.pid, 0), high_water_mark(rank.pid))
            time.sleep(0.05)
            if time.time() - started > timeout:
                proc.kill()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{log.read_text()[-4000:]}")
    return started, max(peaks.values(), default=0), agent


def steady(step_ends: list[float], step_tokens: list[int], warmup: int) -> float:
    return sum(step_tokens[warmup:]) / (step_ends[-1] - step_ends[warmup - 1])


def run_dtrain(root: Path, config: Path, step_tokens: list[int], args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, "-m", "dtrain_launch.cli", "train", str(config), "--nproc", str(args.nproc)]
    started, peak, agent = launch(cmd, "dtrain.train", root / "dtrain.log")
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    ends = {r["step"]: r["time"] for r in records if "train/loss" in r}
    step_ends = [ends[s] for s in sorted(ends)]
    save = next(r for r in records if "checkpoint/save_seconds" in r)
    phases = next(r for r in records if any(k.startswith("startup/") for k in r))
    return {
        "tokens_per_s": steady(step_ends, step_tokens, args.warmup),
        "startup_s": step_ends[0] - started,
        "peak_rss": peak,
        "agent_rss": agent,
        "save_s": save["checkpoint/save_seconds"],
        "save_bytes_per_s": save["checkpoint/bytes_per_s"],
        **{k: v for k, v in phases.items() if k.startswith("startup/")},
    }


def run_bare(root: Path, spec: Path, step_tokens: list[int], args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           str(REPO / "bench/bare_loop.py"), str(spec)]  # fmt: skip
    started, peak, agent = launch(cmd, "bare_loop.py", root / "bare.log")
    result = json.loads((root / "result-rank0.json").read_text())
    return {
        "tokens_per_s": steady(result["step_ends"], step_tokens, args.warmup),
        "startup_s": result["step_ends"][0] - started,
        "peak_rss": peak,
        "agent_rss": agent,
        "save_s": result["save_seconds"],
        "save_bytes_per_s": result["save_bytes"] / result["save_seconds"],
    }


def median_range(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def report(strategy: str, runs: list[dict[str, dict[str, float]]]) -> None:
    def col(who: str, key: str, scale: float = 1.0) -> list[float]:
        return [r[who][key] / scale for r in runs]

    def ratio(who: str, key: str) -> list[float]:
        return [r[who][key] / r["bare"][key] for r in runs]

    loads = [r["load"] for r in runs]
    print(f"\n{strategy}  ({len(runs)} repeats; median (min-max); load average {min(loads):.1f}-{max(loads):.1f})")
    rows = [
        ("steady tokens/s", "tokens_per_s", 1.0, "{:.0f}"),
        ("startup s", "startup_s", 1.0, "{:.2f}"),
        ("peak RSS/rank MB", "peak_rss", 1e6, "{:.0f}"),
        ("peak RSS agent MB", "agent_rss", 1e6, "{:.0f}"),
        ("save s", "save_s", 1.0, "{:.3f}"),
        ("save MB/s", "save_bytes_per_s", 1e6, "{:.1f}"),
    ]
    heads = ["dtrain", "fresh", "bare", "dtrain/bare", "fresh/bare"]
    print(f"  {'':18s} " + " ".join(f"{h:>20s}" for h in heads))
    for label, key, scale, fmt in rows:
        cells = [median_range(col(who, key, scale), fmt) for who in WHO]
        cells += [median_range(ratio(who, key), "{:.3f}") for who in ("dtrain", "fresh")]
        print(f"  {label:18s} " + " ".join(f"{c:>20s}" for c in cells))
    for who in ("dtrain", "fresh"):
        gap = [r[who]["startup_s"] - r["bare"]["startup_s"] for r in runs]
        print(f"  startup {who} - bare: {median_range(gap)} s")
    for who in ("dtrain", "fresh"):
        phases = sorted({k for r in runs for k in r[who] if k.startswith("startup/")}, key=list(runs[0][who]).index)
        print(f"  {who} rank-0 phases: " + ", ".join(f"{k[8:]} {median_range(col(who, k))} s" for k in phases))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=["full", "lora", "qlora"], choices=sorted(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the steady rate")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    from safetensors.torch import load_file

    from dtrain.tiny import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="dtrain-bench-") as tmp:
        root = Path(tmp)
        model = make_tiny_model(root / "model", hidden_size=args.hidden, num_layers=args.layers,
                                intermediate_size=round(8 * args.hidden / 3 / 32) * 32)  # fmt: skip
        params = sum(t.numel() for t in load_file(model / "model.safetensors").values())
        print(f"tiny Llama {params / 1e6:.2f}M parameters, {args.nproc} ranks, seq_len {args.seq_len}, micro batch "
              f"{args.micro_batch}, {args.steps} steps ({args.warmup} warm-up), {args.repeats} repeats")  # fmt: skip
        prepared = {}
        for strategy in args.strategies:
            folder = root / strategy
            folder.mkdir()
            config = dtrain_config(folder, strategy, model, args, cache=root / "data-cache")
            subprocess.run([sys.executable, "-m", "dtrain_launch.cli", "prepare", str(config)], cwd=REPO, check=True,
                           capture_output=True)  # fmt: skip  # the data cache the "dtrain" runs read
            prepared[strategy] = (config, *prepare_bare(folder, config, args.nproc))
        results: dict[str, list[dict]] = {s: [] for s in args.strategies}
        for repeat in range(args.repeats):
            for strategy in args.strategies:
                config, spec, step_tokens = prepared[strategy]
                order = WHO[repeat % 3 :] + WHO[: repeat % 3]
                run: dict = {"load": os.getloadavg()[0]}
                for who in order:
                    folder = root / strategy / f"{who}-{repeat}"
                    folder.mkdir()
                    if who == "bare":
                        here = {"save_dir": str(folder / "save"), "result": str(folder / "result-rank{rank}.json")}
                        spec_here = json.loads(spec.read_text()) | here
                        (folder / "spec.json").write_text(json.dumps(spec_here))
                        run[who] = run_bare(folder, folder / "spec.json", step_tokens, args)
                    else:
                        cache = root / "data-cache" if who == "dtrain" else folder / "data-cache"
                        run_config = dtrain_config(folder, strategy, model, args, cache)
                        run[who] = run_dtrain(folder, run_config, step_tokens, args)
                results[strategy].append(run)
                print(f"repeat {repeat + 1} {strategy} (load {run['load']:.1f}): " + ", ".join(
                    f"{w} {run[w]['tokens_per_s']:.0f} tok/s startup {run[w]['startup_s']:.1f} s" for w in order),
                    flush=True)  # fmt: skip
        load = os.getloadavg()
        for strategy in args.strategies:
            report(strategy, results[strategy])
        print(f"\nload average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
