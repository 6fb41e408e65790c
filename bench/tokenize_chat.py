"""Chat tokenization throughput: dtrain with 1 and N processes vs `datasets.map(num_proc=N)`.

    python bench/tokenize_chat.py [--rows 20000 --procs 2]

20,000 chat rows (the bundled sample conversations, each made unique by its row number so the tokenizer's word
cache does not flatter repeats) are written to a .jsonl file, then read and tokenized three ways with the same row
function and chat template (the tiny model's ChatML): dtrain's `tokenize_dataset` with num_proc 1 and N, and the
reference `datasets.Dataset.from_json(...).map(fn, num_proc=N)`. Rows/s are printed with ratios to dtrain on one
process and to the reference, and the CPU time per row of all processes (parent and workers): on a machine shared
with other work the wall-clock ratios drift, the CPU per row shows the overhead of going parallel.

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


def dtrain_run(path: Path, tokenizer, procs: int) -> Clock:
    ds = DatasetConfig(path=str(path), format="chat")
    data = DataConfig(datasets=[ds], seq_len=2048, num_proc=procs)
    with Clock() as clock:
        examples, report = tokenize_dataset(ds, data, tokenizer, CHAT_TEMPLATE)
    assert report.rows == len(examples), report
    return clock


def datasets_run(path: Path, tokenizer, procs: int, cache: Path) -> Clock:
    import datasets

    ds = DatasetConfig(format="chat")

    def tokenize(row):
        example = chat_example(row, ds, tokenizer, CHAT_TEMPLATE)
        return {"input_ids": example.input_ids, "labels": example.labels}

    with Clock() as clock:
        table = datasets.Dataset.from_json(str(path), cache_dir=str(cache))
        table.map(tokenize, num_proc=procs, remove_columns=table.column_names, load_from_cache_file=False)
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--procs", type=int, default=2)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = AutoTokenizer.from_pretrained(make_tiny_model(root / "tiny"))
        path = root / "chats.jsonl"
        write_rows(path, args.rows)
        results = {
            "dtrain, 1 process": dtrain_run(path, tokenizer, 1),
            f"dtrain, {args.procs} processes": dtrain_run(path, tokenizer, args.procs),
            f"datasets.map(num_proc={args.procs})": datasets_run(path, tokenizer, args.procs, root / "cache"),
        }
    base = results["dtrain, 1 process"].wall
    reference = results[f"datasets.map(num_proc={args.procs})"].wall
    print(f"{args.rows} chat rows, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'':30} {'rows/s':>8} {'vs 1 process':>13} {'vs datasets.map':>16} {'CPU ms/row':>11}")
    for name, clock in results.items():
        print(
            f"{name:30} {args.rows / clock.wall:8.0f} {base / clock.wall:12.2f}x {reference / clock.wall:15.2f}x"
            f" {1000 * clock.cpu / args.rows:11.2f}"
        )


if __name__ == "__main__":
    main()
