"""torchrun ... -m tests.production.worker JOBS.json

Runs a list of jobs in one launch (starting two ranks costs more than a tiny run), in order:
  {"kind": "train", "out": DIR, "config": YAML, "overrides": [...]}
      trains with the real Trainer (what `dtrain train` runs on each rank); rank 0 writes DIR/logits.pt (the trained
      engine's logits on a fixed batch) and DIR/weights.pt (the engine's parameters, gathered, in their dtype)
  {"kind": "load", "out": DIR, "config": YAML, "overrides": [...], "buffer_size": N or null}
      only loads the model the way a run does (partitioned at load under ZeRO-3, NVMe parameter offload) with the
      generated DeepSpeed config, its param buffer_size replaced by N if given; rank 0 writes DIR/load.json
      {"ok": bool, "error": str, "buffer_size": the value used}
A job's optional "unchecked_stage": N sets deepspeed.stage after the config is validated: how the bf16 stage-0
setup the config now refuses ran before, for the comparison that shows why it is refused.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from dtrain.config import load_config
from dtrain.dist import compute_init
from tests.adapters.probe_run import _gathered, fixed_batch


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    env = compute_init()
    for job in jobs:
        cfg = load_config(job["config"], job.get("overrides", []))
        if "unchecked_stage" in job:
            cfg.deepspeed.stage = job["unchecked_stage"]
        Path(job["out"]).mkdir(parents=True, exist_ok=True)
        (train if job["kind"] == "train" else load)(job, cfg, env)
        dist.barrier()
    dist.destroy_process_group()


def train(job: dict, cfg, env) -> None:
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from dtrain.trainer import Trainer

    trainer = Trainer(cfg, env)
    trainer.fit()
    engine = trainer.engine
    weights = {n: t.cpu() for n, t in _gathered(engine, trainable=True).items()}
    engine.eval()
    input_ids = fixed_batch(trainer.tokenizer)
    with torch.no_grad():
        logits = engine(input_ids=input_ids.to(env.device), use_cache=False).logits.float().cpu()
    if env.is_main:
        torch.save({"input_ids": input_ids, "logits": logits}, Path(job["out"]) / "logits.pt")
        torch.save(weights, Path(job["out"]) / "weights.pt")
    dist.barrier()
    engine.destroy()
    unset_hf_deepspeed_config()


def load(job: dict, cfg, env) -> None:
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from dtrain.ds_config import build_deepspeed_config
    from dtrain.layout import BatchLayout
    from dtrain.strategies.loading import load_pretrained

    ds_config = build_deepspeed_config(cfg, BatchLayout.from_config(cfg.train, env.world_size), False, "cpu")
    if job.get("buffer_size") is not None:
        ds_config["zero_optimization"]["offload_param"]["buffer_size"] = job["buffer_size"]
    result = {"ok": True, "error": "", "buffer_size": ds_config["zero_optimization"]["offload_param"]["buffer_size"]}
    try:
        load_pretrained(cfg, ds_config, env.device)
    except AssertionError as e:
        result.update(ok=False, error=f"{e}\n{traceback.format_exc(limit=-3)}")
    unset_hf_deepspeed_config()
    if env.is_main:
        (Path(job["out"]) / "load.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
