"""One training loop for every strategy: full, lora and qlora differ only in how the model is built."""

from __future__ import annotations

import functools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from dtrain import strategies
from dtrain.attention import attention_for
from dtrain.checkpoint import Checkpointer, tree_bytes
from dtrain.checkpoint_layout import ENGINE_TAG, UNIVERSAL_TAG, Progress
from dtrain.config import Config
from dtrain.data import Batcher, PreparedData, prefetched, prepare_data
from dtrain.dist import DistEnv, decided_by_main
from dtrain.ds_config import build_deepspeed_config
from dtrain.evaluation import eval_batches, token_mean_loss
from dtrain.loss import causal_lm_of, install_chunked_loss
from dtrain.metrics import MetricsLogger
from dtrain.moe import RouterLoss, experts_line
from dtrain.optim import build_optimizer, deepspeed_parameters
from dtrain.order import DataOrder, rank_micro_batches
from dtrain.preemption import StopFlag
from dtrain.reshard import ensure_universal, unshare_step_counters
from dtrain.resume import plan_resume
from dtrain.retention import retention_scalars, summary_lines
from dtrain.schedule import lr_factor
from dtrain.startup import StartupClock


@dataclass
class StepResult:
    loss: float
    tokens: int
    grad_norm: float
    stop: bool
    """All ranks agreed to stop after this step (a preemption or time-limit signal reached one of them)."""
    router: dict[str, float] = field(default_factory=dict)
    """Mixture-of-experts models: the balancing loss and expert load of the step (dtrain.moe)."""


@dataclass
class FitResult:
    progress: Progress
    preempted: bool


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv):
        self.startup = StartupClock()
        import deepspeed

        self.startup.mark("imports")
        self.cfg, self.env = cfg, env
        # Rank 0 picks the checkpoint for all: another node may not see the newest one yet.
        self.resume = decided_by_main(lambda: plan_resume(cfg, env.world_size))
        self.layout = self.resume.layout
        self.tokenizer = cfg.model.load_tokenizer()
        self.data: PreparedData = prepare_data(cfg, self.tokenizer, rank=env.rank, world_size=env.world_size)
        self.startup.mark("data load")
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
        ds_config = build_deepspeed_config(cfg, self.layout, self.resume.universal, env.device.type)
        torch.manual_seed(cfg.train.seed)
        strategy = strategies.get(cfg.strategy)
        built = strategy.build(cfg, env, ds_config)
        self.startup.mark("model load")
        self._keepalive = built.keepalive
        loraplus = cfg.lora.loraplus_lr_ratio if "lora" in strategy.sections else None
        optimizer = build_optimizer(cfg.train, built.module, loraplus)
        self.engine, *_ = deepspeed.initialize(
            model=built.module,
            optimizer=optimizer,
            model_parameters=None if optimizer else deepspeed_parameters(cfg.train, built.module, loraplus),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg.train, self.total_steps)),
            config=ds_config,
        )
        self.startup.mark("deepspeed.initialize")
        self.loss_chunks = install_chunked_loss(self.engine.module, self.layout.micro_batch_size * cfg.data.seq_len)
        self.router = RouterLoss.of(causal_lm_of(self.engine.module))
        self.attention = attention_for(cfg)
        self.batcher = Batcher(
            self.tokenizer.pad_token_id, cfg.data.seq_len, cfg.data.packing, self.attention.varlen, env.device
        )
        self.collator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collate")
        self.checkpointer = Checkpointer(cfg, env.rank, env.device, strategy.checkpoint)
        self.stop_flag = StopFlag(env.device)

    # -- the loop ------------------------------------------------------------------------------------------------

    def fit(self) -> FitResult:
        progress = self._start()
        if self.resume.checkpoint is not None:
            self.startup.mark("resume")
        log = MetricsLogger(self.cfg, self.env.is_main, progress.step, self.total_steps)
        self._retention_baseline(progress, log)
        first_step, stopping, last_eval = progress.step + 1, False, None
        while progress.step < self.total_steps and not stopping:
            started = time.perf_counter()
            result = self.train_step(progress.samples_seen)
            progress.step += 1
            progress.samples_seen += self.layout.global_batch_size
            progress.tokens_seen += result.tokens
            elapsed = time.perf_counter() - started
            log.log(progress.step, self._scalars(result, elapsed))
            log.advance()
            if progress.step == first_step:
                self._log_startup(progress.step, log)
            if self._should_eval(progress.step):
                last_eval = self._eval_and_log(progress, log)
            stopping = result.stop
            finished = progress.step >= self.total_steps
            if self.checkpointer.should_save(progress.step, finished, stopping):
                self._save(progress, log)
        if stopping:
            self.stop_flag.settle()
        if last_eval is not None:
            for line in summary_lines(*last_eval, progress.retention_baseline):
                log.message(line)
        log.close()
        self.collator.shutdown()
        return FitResult(progress, preempted=stopping and progress.step < self.total_steps)

    def train_step(self, samples_seen: int) -> StepResult:
        """One optimizer step over the global batch starting at `samples_seen`."""
        step_samples = self.order.step_samples(samples_seen)
        # Loss = sum over the global batch's label tokens / their count, whatever the split among ranks and micro
        # batches: every rank knows every sample, so the global count needs no communication. DeepSpeed divides
        # by accumulation steps and averages over ranks; `num_items_in_batch` undoes both.
        label_tokens = sum(self.data.train.num_label_tokens(i) for i in step_samples)
        scale = label_tokens / (self.layout.gradient_accumulation_steps * self.layout.world_size)
        num_items = torch.tensor(scale, device=self.env.device)
        loss_sum = torch.zeros((), device=self.env.device)
        router_stats = torch.zeros(self.router.stats_size if self.router else 0, device=self.env.device)
        forward_kwargs = self.router.forward_kwargs if self.router else {}
        micro_batches = rank_micro_batches(
            step_samples, self.env.rank, self.layout.world_size, self.layout.micro_batch_size
        )
        collate_train = functools.partial(self._host_batch, self.data.train)
        for host_batch in prefetched(collate_train, micro_batches, self.collator):
            output = self.engine(**self.batcher.to_device(host_batch), num_items_in_batch=num_items, **forward_kwargs)
            self.engine.backward(output.loss)  # with the router's balancing loss, where there is one
            self.engine.step()
            lm_loss = self.router.lm_loss(output) if self.router else output.loss.detach().float()
            loss_sum += lm_loss * scale
            if self.router:
                router_stats += self.router.step_stats(output)
        # The step's one collective and one host sync: the loss sum, the router statistics and every rank's stop
        # vote travel together.
        reduced = torch.cat([loss_sum.reshape(1), router_stats, self.stop_flag.votes()])
        dist.all_reduce(reduced)
        grad_norm = self.engine.get_global_grad_norm()  # the same on every rank: not reduced
        grad_norm = torch.as_tensor(float("nan") if grad_norm is None else grad_norm, device=self.env.device)
        loss_total, *values, norm = torch.cat([reduced, grad_norm.reshape(1).float()]).tolist()
        stats, votes = values[: router_stats.numel()], values[router_stats.numel() :]
        router = self.router.scalars(stats, len(micro_batches) * self.layout.world_size) if self.router else {}
        tokens = int(sum(self.data.train.lengths[i] for i in step_samples))
        return StepResult(loss_total / max(1, label_tokens), tokens, norm, self.stop_flag.agree(votes), router)

    def evaluate(self, samples: Any) -> float:
        """Token-mean loss over `samples` (the held-out split, a retention set); all ranks take part."""
        self.engine.eval()
        world, micro = self.layout.world_size, self.layout.micro_batch_size
        batches = eval_batches(len(samples), self.env.rank, world, micro, self.cfg.eval.max_batches)
        loss = token_mean_loss(self.engine, samples, batches, self.batcher, self.env.device)
        self.engine.train()
        return loss

    def _eval_and_log(self, progress: Progress, log: MetricsLogger) -> tuple[int, float | None, dict[str, float]]:
        """The task eval loss and the retention losses at this step; (step, eval loss, retention losses)."""
        eval_loss = None
        if self.data.eval is not None and len(self.data.eval) > 0:
            eval_loss = self.evaluate(self.data.eval)
            log.log(progress.step, {"loss": eval_loss}, prefix="eval", force=True)
        losses = {name: self.evaluate(samples) for name, samples in self.data.retention.items()}
        if losses:
            log.log(progress.step, retention_scalars(losses, progress.retention_baseline), "retention", True)
        return progress.step, eval_loss, losses

    def _retention_baseline(self, progress: Progress, log: MetricsLogger) -> None:
        """Measure eval.retention on the base before the first step, once per run: a resumed run brings its own."""
        missing = [name for name in self.data.retention if name not in progress.retention_baseline]
        if not missing:
            return
        if progress.step > 0:
            log.message(f"retention {', '.join(missing)}: added after step 0, no baseline; drift is not reported")
            return
        for name in missing:
            progress.retention_baseline[name] = self.evaluate(self.data.retention[name])
        log.log(0, retention_scalars(progress.retention_baseline, progress.retention_baseline), "retention", True)

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

    def _host_batch(self, samples: Any, indices: list[int]) -> dict[str, Any]:
        return self.batcher.host([samples[i] for i in indices])

    def _scalars(self, result: StepResult, elapsed: float) -> dict[str, float]:
        return {
            "loss": result.loss,
            "lr": self.engine.get_lr()[0],
            "grad_norm": result.grad_norm,
            "tokens_per_s": result.tokens / elapsed,
            "step_time": elapsed,
            **result.router,
        }

    def _log_startup(self, step: int, log: MetricsLogger) -> None:
        self.startup.mark("first step")
        log.message(self.startup.line())
        log.message(self.attention.line())
        experts = experts_line(causal_lm_of(self.engine.module))
        if experts:
            log.message(experts)
        log.log(step, self.startup.phases, prefix="startup", force=True)

    def _save(self, progress: Progress, log: MetricsLogger) -> None:
        """Save, and log its seconds (all ranks written, synced, renamed) and the bytes it wrote (rank 0 logs)."""
        started = time.perf_counter()
        saved = self.checkpointer.save(self.engine, progress)
        seconds = time.perf_counter() - started
        written = tree_bytes(saved) if self.env.is_main else 0
        log.log(progress.step, {"save_seconds": seconds, "bytes": written, "bytes_per_s": written / seconds},
                prefix="checkpoint", force=True)  # fmt: skip
        log.message(f"saved {saved}")

    def _should_eval(self, step: int) -> bool:
        if (self.data.eval is None or len(self.data.eval) == 0) and not self.data.retention:
            return False
        every = self.cfg.eval.every_steps
        return step == self.total_steps or (every > 0 and step % every == 0)
