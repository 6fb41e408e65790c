"""Rank-0 reporting: a metrics.jsonl line per logged step (with its wall-clock time, so step rates can be measured
from outside), the reporters of logging.report_to (dtrain.reporters: TensorBoard, W&B, MLflow), and a tqdm bar."""

from __future__ import annotations

import json
import time
from pathlib import Path

from dtrain.config import Config
from dtrain.reporters import open_reporters


class MetricsLogger:
    def __init__(self, cfg: Config, is_main: bool, start_step: int, total_steps: int):
        self.enabled = is_main
        self.every = cfg.logging.every_steps
        self.reporters = []
        self.bar = None
        if not is_main:
            return
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        self.jsonl = open(Path(cfg.output_dir) / "metrics.jsonl", "a")  # noqa: SIM115 - lives as long as the run
        self.reporters = open_reporters(cfg, cfg.logging.report_to, start_step)
        if cfg.logging.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, step: int, scalars: dict[str, float], prefix: str = "train", force: bool = False) -> None:
        if not self.enabled or not (force or step % self.every == 0):
            return
        record = {"step": step, "time": time.time(), **{f"{prefix}/{k}": v for k, v in scalars.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for reporter in self.reporters:
            reporter.log({f"{prefix}/{k}": v for k, v in scalars.items()}, step)
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
        for reporter in self.reporters:
            reporter.close()
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
