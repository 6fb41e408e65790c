"""One training loop for every strategy: full, lora and qlora differ only in how the model is built."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dtrain import strategies
from dtrain.checkpoint import Checkpointer
from dtrain.checkpoint_layout import ENGINE_TAG, UNIVERSAL_TAG, Progress
from dtrain.config import Config
from dtrain.data import PreparedData, collate, prepare_data
from dtrain.dist import DistEnv
from dtrain.ds_config import build_deepspeed_config
from dtrain.metrics import MetricsLogger
from dtrain.optim import build_optimizer
from dtrain.order import DataOrder, rank_micro_batches
from dtrain.preemption import StopFlag
from dtrain.reshard import ensure_universal, unshare_step_counters
from dtrain.resume import plan_resume
from dtrain.schedule import lr_factor


@dataclass
class FitResult:
    progress: Progress
    preempted: bool


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv):
        import deepspeed
        from transformers import AutoTokenizer

        self.cfg, self.env = cfg, env
        self.resume = plan_resume(cfg, env.world_size)
        self.layout = self.resume.layout
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path)
        self.data: PreparedData = prepare_data(cfg, self.tokenizer, rank=env.rank, world_size=env.world_size)
        lengths = self.data.train.lengths if cfg.data.group_by_length else None
        self.order = DataOrder(len(self.data.train), self.layout.global_batch_size, cfg.train.seed, lengths)
        if self.order.steps_per_epoch == 0:
            raise ValueError(
                f"the training data has {len(self.data.train)} sequences, fewer than one global batch "
                f"({self.layout.global_batch_size}); add data or lower the batch size"
            )
        self.total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * self.order.steps_per_epoch)
        if self.resume.universal:
            ensure_universal(self.resume.checkpoint, env.rank, grace_s=cfg.deepspeed.timeout_minutes * 60)
        ds_config = build_deepspeed_config(cfg, self.layout, load_universal=self.resume.universal)
        torch.manual_seed(cfg.train.seed)
        strategy = strategies.get(cfg.strategy)
        built = strategy.build(cfg, env, ds_config)
        self._keepalive = built.keepalive
        optimizer = build_optimizer(cfg.train, built.module)
        self.engine, *_ = deepspeed.initialize(
            model=built.module,
            optimizer=optimizer,
            model_parameters=None if optimizer else [p for p in built.module.parameters() if p.requires_grad],
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg.train, self.total_steps)),
            config=ds_config,
        )
        self.checkpointer = Checkpointer(cfg, env.rank, env.device, strategy.checkpoint)
        self.stop_flag = StopFlag(env.device)

    # -- the loop ------------------------------------------------------------------------------------------------

    def fit(self) -> FitResult:
        progress = self._start()
        log = MetricsLogger(self.cfg, self.env.is_main, progress.step, self.total_steps)
        stopping = False
        while progress.step < self.total_steps and not stopping:
            started = time.perf_counter()
            loss, tokens = self.train_step(progress.samples_seen)
            progress.step += 1
            progress.samples_seen += self.layout.global_batch_size
            progress.tokens_seen += tokens
            elapsed = time.perf_counter() - started
            log.log(progress.step, self._scalars(loss, tokens, elapsed))
            log.advance()
            if self._should_eval(progress.step):
                log.log(progress.step, {"loss": self.evaluate()}, prefix="eval", force=True)
            stopping = self.stop_flag.stop_requested()
            finished = progress.step >= self.total_steps
            if self.checkpointer.should_save(progress.step, finished, stopping):
                saved = self.checkpointer.save(self.engine, progress)
                log.message(f"saved {saved}")
        log.close()
        return FitResult(progress, preempted=stopping and progress.step < self.total_steps)

    def train_step(self, samples_seen: int) -> tuple[float, int]:
        """One optimizer step over the global batch starting at `samples_seen`. Returns (mean loss, tokens)."""
        step_samples = self.order.step_samples(samples_seen)
        # Loss = sum over the global batch's label tokens / their count, whatever the split among ranks and micro
        # batches: every rank knows every sample, so the global count needs no communication. DeepSpeed divides
        # by accumulation steps and averages over ranks; `num_items_in_batch` undoes both.
        label_tokens = sum(self.data.train.num_label_tokens(i) for i in step_samples)
        scale = label_tokens / (self.layout.gradient_accumulation_steps * self.layout.world_size)
        loss_sum = torch.zeros((), device=self.env.device)
        micro_batches = rank_micro_batches(
            step_samples, self.env.rank, self.layout.world_size, self.layout.micro_batch_size
        )
        for indices in micro_batches:
            batch = self._batch(self.data.train, indices)
            loss = self.engine(**batch, num_items_in_batch=torch.tensor(scale, device=self.env.device)).loss
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += loss.detach().float() * scale
        dist.all_reduce(loss_sum)
        tokens = int(sum(self.data.train.lengths[i] for i in step_samples))
        return loss_sum.item() / max(1, label_tokens), tokens

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-mean loss over the held-out split; every rank runs the same number of batches (ZeRO-3 gathers
        parameters collectively, so a rank that stops early would hang the others)."""
        self.engine.eval()
        world, micro = self.layout.world_size, self.layout.micro_batch_size
        rounds = len(self.data.eval) // (world * micro)
        if self.cfg.eval.max_batches:
            rounds = min(rounds, self.cfg.eval.max_batches)
        totals = torch.zeros(2, device=self.env.device)
        for m in range(rounds):
            start = (m * world + self.env.rank) * micro
            batch = self._batch(self.data.eval, list(range(start, start + micro)))
            one = torch.tensor(1.0, device=self.env.device)
            totals[0] += self.engine(**batch, num_items_in_batch=one).loss.float()
            totals[1] += (batch["labels"][:, 1:] != -100).sum()
        dist.all_reduce(totals)
        self.engine.train()
        return (totals[0] / totals[1].clamp(min=1)).item()

    # -- helpers -------------------------------------------------------------------------------------------------

    def _start(self) -> Progress:
        checkpoint, universal = self.resume.checkpoint, self.resume.universal
        if checkpoint is None:
            return Progress(global_batch_size=self.layout.global_batch_size, world_size=self.env.world_size)
        progress = self.checkpointer.load(self.engine, checkpoint, UNIVERSAL_TAG if universal else ENGINE_TAG)
        if universal:
            unshare_step_counters(self.engine.optimizer)
        if self.env.is_main:
            print(f"resumed from {checkpoint} at step {progress.step}", flush=True)
            for change in self.resume.changes:
                print(f"  changed since the checkpoint: {change}", flush=True)
            if progress.world_size != self.env.world_size:
                print(
                    f"world size {progress.world_size} -> {self.env.world_size}: global batch "
                    f"{self.layout.global_batch_size} kept with {self.layout.gradient_accumulation_steps} "
                    f"accumulation steps{' (universal checkpoint)' if universal else ''}",
                    flush=True,
                )
        progress.world_size = self.env.world_size
        return progress

    def _batch(self, samples: Any, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [samples[i] for i in indices]
        batch = collate(rows, self.tokenizer.pad_token_id, self.cfg.data.seq_len, self.cfg.data.packing)
        # No KV cache in training: with one, transformers ignores packed position_ids and documents attend to
        # each other.
        return {**{k: v.to(self.env.device) for k, v in batch.items()}, "use_cache": False}

    def _scalars(self, loss: float, tokens: int, elapsed: float) -> dict[str, float]:
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "loss": loss,
            "lr": self.engine.get_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": tokens / elapsed,
            "step_time": elapsed,
        }

    def _should_eval(self, step: int) -> bool:
        if self.data.eval is None or len(self.data.eval) == 0:
            return False
        every = self.cfg.eval.every_steps
        return step == self.total_steps or (every > 0 and step % every == 0)
