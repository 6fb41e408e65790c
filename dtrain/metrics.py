"""Rank-0 reporting: TensorBoard scalars, a metrics.jsonl line per logged step (with its wall-clock time, so step
rates can be measured from outside), and a tqdm progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path

from dtrain.config import Config


class MetricsLogger:
    def __init__(self, cfg: Config, is_main: bool, start_step: int, total_steps: int):
        self.enabled = is_main
        self.every = cfg.logging.every_steps
        self.writer = None
        self.bar = None
        if not is_main:
            return
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        self.jsonl = open(Path(cfg.output_dir) / "metrics.jsonl", "a")  # noqa: SIM115 - lives as long as the run
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run logged after its last checkpoint, so the curve has no doubles.
            self.writer = SummaryWriter(str(cfg.tensorboard_dir), purge_step=start_step + 1 if start_step else None)
        if cfg.logging.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, step: int, scalars: dict[str, float], prefix: str = "train", force: bool = False) -> None:
        if not self.enabled or not (force or step % self.every == 0):
            return
        record = {"step": step, "time": time.time(), **{f"{prefix}/{k}": v for k, v in scalars.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer:
            for key, value in scalars.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        if self.bar and prefix == "train":
            self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}")

    def advance(self) -> None:
        if self.bar:
            self.bar.update(1)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.writer:
            self.writer.close()
        if self.bar:
            self.bar.close()
        self.jsonl.close()


def read_metrics(output_dir: str | Path, key: str = "train/loss") -> dict[int, float]:
    """step -> value from metrics.jsonl; a step logged twice (killed and resumed) keeps its last value.
    Safe on a live run: a line still being written is skipped."""
    values: dict[int, float] = {}
    path = Path(output_dir) / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if key in record:
                values[record["step"]] = record[key]
    return values
