"""What a rank really holds under DeepSpeed, for tests/test_plan.py to compare with dtrain.plan's prediction.

    torchrun --standalone --nproc_per_node N tests/plan_measure_worker.py OUT_DIR CONFIG.yaml [CONFIG.yaml ...]

For each config (dtrain YAML; model.path holds only a config.json) this builds the model under ZeRO-3 the way dtrain
does (HfDeepSpeedConfig -> zero.Init partitions at construction; peft adapters on top for lora), with the DeepSpeed
config from dtrain.ds_config and torch AdamW as client optimizer, runs one step and writes
OUT_DIR/<config stem>-rank<R>.json: the bytes of the tensors this rank holds, by part.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

import torch

from dtrain.config import Config, load_config
from dtrain.ds_config import build_deepspeed_config
from dtrain.layout import BatchLayout


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def build_model(cfg: Config, ds_config: dict):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    keepalive = HfDeepSpeedConfig(ds_config)  # transformers wraps construction in zero.Init while this lives
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model.path), dtype=dtype)
    if cfg.strategy == "lora":
        from peft import get_peft_model

        from dtrain.strategies.peft_adapters import peft_config

        model = get_peft_model(model, peft_config(cfg.lora))
    return model, keepalive


def held_bytes(engine) -> dict[str, int]:
    """Tensor bytes of this rank's partitions after a step, by part (ZeRO-3)."""
    zero = engine.optimizer
    params = [p for p in engine.module.parameters()]
    master = zero.fp32_partitioned_groups_flat
    return {
        "params_trainable": nbytes(p.ds_tensor for p in params if p.requires_grad),
        "params_frozen": nbytes(p.ds_tensor for p in params if not p.requires_grad),
        "grads": nbytes([zero.grad_partitions_flat_buffer]),
        "grads_fp32": nbytes(m.grad for m in master),
        "master": nbytes(master),
        "optimizer_state": nbytes(v for state in zero.optimizer.state.values() for v in state.values()),
    }


def measure(cfg: Config, world_size: int) -> dict:
    import deepspeed

    ds_config = build_deepspeed_config(cfg, BatchLayout.from_config(cfg.train, world_size))
    model, keepalive = build_model(cfg, ds_config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    vocab = engine.module.config.vocab_size
    ids = torch.randint(0, vocab, (cfg.train.micro_batch_size, cfg.data.seq_len), generator=generator)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    result = held_bytes(engine) | {"loss": float(loss), "ds_numel": sum(p.ds_numel for p in engine.module.parameters())}
    engine.destroy()
    del keepalive
    return result


def main() -> None:
    import deepspeed

    torch.set_num_threads(1)  # ranks share two cores
    out_dir, config_paths = Path(sys.argv[1]), sys.argv[2:]
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    for path in config_paths:
        result = measure(load_config(path, check_paths=False), world_size)
        (out_dir / f"{Path(path).stem}-rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
