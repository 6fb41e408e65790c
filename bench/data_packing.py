"""Packing vs padding: fill ratio and training tokens/s on the bundled variable-length chat set.

    python bench/data_packing.py [--seq-len 512 --micro-batch 4 --hidden 128 --layers 4]

The same examples (data/sample/chat.jsonl, tokenized once) are trained for one pass each way with a bare
forward + backward + AdamW step of a tiny Llama: packed into seq_len blocks (block-diagonal attention from
position ids), padded per batch in random order, and padded per batch with length grouping. Throughput counts
real (non-padding) tokens. Printed as ratios from this one run; the numbers are CPU-bound and only the ratios carry
over to other machines.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from dtrain.config import Config, DataConfig, DatasetConfig, ModelConfig, TrainConfig
from dtrain.data import collate, group_by_length, prepare_data
from dtrain.tiny import SAMPLE_DIR, make_tiny_model


class Runner:
    """One training setup (fresh model, AdamW) stepping through its own batches; the time of each step is summed."""

    def __init__(self, model_dir: Path, samples, batches: list[list[int]], pad_id: int, seq_len: int, packing: bool):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.samples, self.batches, self.pad_id, self.seq_len, self.packing = samples, batches, pad_id, seq_len, packing
        self.done, self.tokens, self.slots, self.seconds = 0, 0, 0, 0.0
        self.step(batches[0])  # warm-up (allocator, kernels) outside the timing

    def step(self, indices: list[int]) -> None:
        rows = [self.samples[i] for i in indices]
        batch = collate(rows, self.pad_id, self.seq_len, self.packing)
        self.model(**batch, use_cache=False).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed_step(self) -> None:
        indices = self.batches[self.done]
        started = time.perf_counter()
        self.step(indices)
        self.seconds += time.perf_counter() - started
        self.tokens += sum(len(self.samples[i]["input_ids"]) for i in indices)
        self.slots += len(indices) * (self.seq_len if self.packing else max(self.samples.lengths[indices]))
        self.done += 1

    @property
    def progress(self) -> float:
        return self.done / len(self.batches)


def run_interleaved(runners: dict[str, Runner]) -> None:
    """Step whichever runner is least far through its pass, so load from other processes hits all alike."""
    while any(r.progress < 1 for r in runners.values()):
        min((r for r in runners.values() if r.progress < 1), key=lambda r: r.progress).timed_step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(
            Path(tmp) / "model", hidden_size=args.hidden, num_layers=args.layers, intermediate_size=4 * args.hidden
        )
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        runners, reports = {}, {}
        for packing in (True, False):
            cfg = Config(
                output_dir=str(Path(tmp) / "run"),
                model=ModelConfig(path=str(model_dir)),
                data=DataConfig(
                    datasets=[DatasetConfig(path=str(SAMPLE_DIR / "chat.jsonl"), format="chat")],
                    seq_len=args.seq_len,
                    packing=packing,
                ),
                train=TrainConfig(max_steps=1, gradient_accumulation_steps=1),
            )
            prepared = prepare_data(cfg, tokenizer, rank=0, world_size=1)
            reports[packing] = prepared.report
            samples, b = prepared.train, args.micro_batch
            order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
            orders = {"packed": order} if packing else {"padded": order}
            if not packing:
                orders["padded+grouped"] = group_by_length(samples.lengths, b, seed=0, epoch=0)
            for name, o in orders.items():
                batches = [o[i : i + b] for i in range(0, len(o), b)]
                runners[name] = Runner(model_dir, samples, batches, tokenizer.pad_token_id, args.seq_len, packing)
        run_interleaved(runners)
    assert reports[True].examples == reports[False].examples  # the same examples both ways
    print(
        f"chat.jsonl: {reports[True].examples} examples, {reports[True].tokens} tokens, seq_len {args.seq_len}, "
        f"micro batch {args.micro_batch}, model hidden {args.hidden} x {args.layers} layers, {args.threads} threads"
    )
    print(f"packing: {reports[True].packed_blocks} blocks, fill ratio {reports[True].fill_ratio:.3f}")
    for name, r in runners.items():
        line = f"{name:15s} steps {len(r.batches):4d}  fill {r.tokens / r.slots:.3f}  {r.seconds:6.2f} s"
        print(f"{line}  {r.tokens / r.seconds:8.0f} tokens/s")
    speed = {name: r.tokens / r.seconds for name, r in runners.items()}
    print(
        f"tokens/s ratio packed / padded: {speed['packed'] / speed['padded']:.2f}x; "
        f"padded+grouped / padded: {speed['padded+grouped'] / speed['padded']:.2f}x"
    )


if __name__ == "__main__":
    main()
