"""torchrun ... -m tests.adapters.probe_run OUT CONFIG [key=value ...] [-- OUT CONFIG [key=value ...] ...]

For each run in turn: trains with the real `Trainer` (exactly what `dtrain train` runs on each rank), then asks the
trained processes what only they can answer, and writes it to OUT (rank 0). Several runs share one launch because
starting two ranks costs more than training a tiny model.
  probe.json  frozen base tensors that differ from a fresh load of the base (must be none), adapter tensors that
              changed from their initial values, the ZeRO stage
  logits.pt   {"input_ids", "logits"}: the trained engine's logits on a fixed batch, in eval mode
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch

from dtrain.config import load_config
from dtrain.dist import compute_init


def main() -> None:
    runs, current = [], []
    for arg in sys.argv[1:] + ["--"]:
        if arg == "--":
            runs.append(current)
            current = []
        else:
            current.append(arg)
    env = compute_init()
    for out, config, *overrides in runs:
        probe(out, load_config(config, overrides), env)
    import torch.distributed as dist

    dist.destroy_process_group()


def probe(out: str, cfg, env) -> None:
    from dtrain.trainer import Trainer

    trainer = Trainer(cfg, env)
    engine = trainer.engine
    initial = {n: t.clone() for n, t in _gathered(engine, trainable=True).items()}
    trainer.fit()
    trained = _gathered(engine, trainable=True)
    frozen = _gathered(engine, trainable=False)
    input_ids = fixed_batch(trainer.tokenizer)
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=input_ids, use_cache=False).logits.float()
    if env.is_main:
        Path(out).mkdir(parents=True, exist_ok=True)
        torch.save({"input_ids": input_ids, "logits": logits}, Path(out) / "logits.pt")
        report = {
            "stage": cfg.deepspeed.stage,
            "changed": sorted(n for n in trained if not torch.equal(trained[n], initial[n])),
            "trainable": sorted(trained),
            "base_differs": base_differences(cfg, frozen) if cfg.strategy != "full" else [],
            "frozen": len(frozen),
        }
        (Path(out) / "probe.json").write_text(json.dumps(report, indent=2))
    import torch.distributed as dist
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    dist.barrier()
    trainer.engine.destroy()
    unset_hf_deepspeed_config()


def fixed_batch(tokenizer) -> torch.Tensor:
    text = "The museum guide eagerly tested the temperature of the lake so that the children could learn it."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:48]
    return torch.tensor([ids, list(reversed(ids))])


def _gathered(engine, trainable: bool) -> dict[str, torch.Tensor]:
    """Whole copies of the trainable (or frozen) parameters, gathered from their ZeRO-3 partitions if need be."""
    params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad == trainable]
    partitioned = [p for _, p in params if hasattr(p, "ds_id")]
    gather = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    with gather:
        return {n: p.detach().clone() for n, p in params}


def base_differences(cfg, frozen: dict[str, torch.Tensor]) -> list[str]:
    """Frozen tensors of the trained model that are not bit-for-bit those of a fresh load of the base."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from dtrain.strategies.qlora import bnb_config
    from dtrain.tables import torch_dtype

    unset_hf_deepspeed_config()  # else this one-rank load would partition collectively under ZeRO-3 and hang
    kwargs = {"quantization_config": bnb_config(cfg)} if cfg.strategy == "qlora" else {}
    fresh = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch_dtype(cfg.train.precision), **kwargs)
    fresh_params = dict(fresh.named_parameters())
    differs = []
    for name, tensor in frozen.items():
        base_name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        want = fresh_params.get(base_name)
        if want is None:
            differs.append(f"{name}: no such tensor in the base")
        elif not torch.equal(want.detach().to(tensor.dtype).reshape(tensor.shape), tensor):
            differs.append(name)
    return differs


if __name__ == "__main__":
    main()
