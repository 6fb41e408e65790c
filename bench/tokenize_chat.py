"""Chat tokenization throughput: dtrain with 1 and N processes vs `datasets.map(num_proc=N)`.

    python bench/tokenize_chat.py [--rows 20000 --procs 2 --repeats 4]

20,000 chat rows (the bundled sample conversations, each made unique by its row number so the tokenizer's word
cache does not flatter repeats) are written to a .jsonl file, then read and tokenized four ways with the same row
function and chat template (the tiny model's ChatML): dtrain's `tokenize_dataset` with num_proc 1 and N (forked
workers, as `dtrain prepare` runs), N inside a process group (workers from a forkserver, as rank 0 of a run), and the
reference `datasets.Dataset.from_json(...).map(fn, num_proc=N)`. The four alternate within each repeat (the order
rotates every repeat, so a noisy machine slows all alike); printed per variant: median rows/s, the ratios to dtrain
on one process and to the reference (each taken within a repeat, then the median, with min-max), and the CPU time
per row of all processes (parent and workers), which shows the overhead of going parallel.

Scaling: the parent reads rows, sends chunks and collects results, ~0.1 ms of CPU per row against ~1.1 ms of
tokenizing in a worker (measured here), so N workers scale until the parent is busy: about 10 workers' worth,
~10,000 rows/s on this kind of core. On 32 cores the parent is the limit; reading in the workers (each its own range
of rows or files) would lift it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

from dtrain.config import DataConfig, DatasetConfig
from dtrain.data.chat import chat_example
from dtrain.data.prepare import tokenize_dataset
from dtrain.tiny import CHAT_TEMPLATE, SAMPLE_DIR, make_tiny_model


def write_rows(path: Path, count: int) -> None:
    conversations = [json.loads(line) for line in (SAMPLE_DIR / "chat.jsonl").read_text().splitlines()]
    with open(path, "w") as f:
        for i in range(count):
            messages = conversations[i % len(conversations)]["messages"]
            unique = [{**m, "content": f"{m['content']} ({i})"} for m in messages]
            f.write(json.dumps({"messages": unique}) + "\n")


class Clock:
    """Wall time and CPU time of this process and its finished children: on a busy machine wall-clock ratios
    mislead, CPU per row does not."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), _cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, _cpu() - self.cpu


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def dtrain_run(path: Path, model: Path, procs: int) -> Clock:
    tokenizer = fresh_tokenizer(model)
    ds = DatasetConfig(path=str(path), format="chat")
    data = DataConfig(datasets=[ds], seq_len=2048, num_proc=procs)
    with Clock() as clock:
        examples, report = tokenize_dataset(ds, data, tokenizer, CHAT_TEMPLATE)
    assert report.rows == len(examples), report
    return clock


def datasets_run(path: Path, model: Path, procs: int, cache: Path) -> Clock:
    import datasets

    tokenizer = fresh_tokenizer(model)
    ds = DatasetConfig(format="chat")

    def tokenize(row):
        example = chat_example(row, ds, tokenizer, CHAT_TEMPLATE)
        return {"input_ids": example.input_ids, "labels": example.labels}

    with Clock() as clock:
        table = datasets.Dataset.from_json(str(path), cache_dir=str(cache))
        table.map(tokenize, num_proc=procs, remove_columns=table.column_names, load_from_cache_file=False)
    return clock


def fresh_tokenizer(model: Path):
    """A newly loaded tokenizer for every run: the tokenizers library caches the words it has seen, so a tokenizer
    that already went through the rows (and workers forked from its process) would be flattered."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def in_process_group(run):
    """`run` inside a one-rank gloo group: what rank 0 of a training run tokenizes in."""
    import torch.distributed as dist

    def wrapped(*args):
        with tempfile.TemporaryDirectory() as tmp:
            dist.init_process_group("gloo", store=dist.FileStore(f"{tmp}/store", 1), rank=0, world_size=1)
            try:
                return run(*args)
            finally:
                dist.destroy_process_group()

    return wrapped


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    n = args.procs
    one, reference = "dtrain, 1 process", f"datasets.map(num_proc={n})"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny_model(root / "tiny")
        path = root / "chats.jsonl"
        write_rows(path, args.rows)
        variants = {
            one: lambda: dtrain_run(path, model, 1),
            f"dtrain, {n} processes (fork)": lambda: dtrain_run(path, model, n),
            f"dtrain, {n} in a rank (forkserver)": lambda: in_process_group(dtrain_run)(path, model, n),
            reference: lambda: datasets_run(path, model, n, root / "cache"),
        }
        names = list(variants)
        clocks: dict[str, list[Clock]] = {name: [] for name in names}
        for repeat in range(args.repeats):
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                clocks[name].append(variants[name]())
    load = os.getloadavg()[0]
    print(f"{args.rows} chat rows, {args.repeats} repeats, load average {load:.1f} on {os.cpu_count()} cores")
    print(f"{'':36} {'rows/s':>8} {'vs 1 process':>20} {'vs datasets.map':>20} {'CPU ms/row':>11}")
    for name in names:
        walls = [c.wall for c in clocks[name]]
        vs_one = [a.wall / b for a, b in zip(clocks[one], walls, strict=True)]
        vs_ref = [a.wall / b for a, b in zip(clocks[reference], walls, strict=True)]
        # a forkserver's workers are its children, not ours: their CPU time is not in our rusage
        cpu = (
            "-" if "forkserver" in name else f"{1000 * statistics.median(c.cpu for c in clocks[name]) / args.rows:.2f}"
        )
        print(
            f"{name:36} {args.rows / statistics.median(walls):8.0f} {spread(vs_one):>20} {spread(vs_ref):>20} {cpu:>11}"
        )


if __name__ == "__main__":
    main()
