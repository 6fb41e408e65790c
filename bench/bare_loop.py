"""The bare DeepSpeed loop bench/throughput.py measures dtrain against: library calls only, no dtrain import.

    torchrun --standalone --nproc_per_node N bench/bare_loop.py SPEC.json

SPEC (written by bench/throughput.py): model path, strategy (full | lora | qlora) with its LoRA settings, the
DeepSpeed config dtrain generated for the same run, lr, steps, the folder holding rank<R>.pt (this rank's collated
micro batches, step by step, exactly as dtrain feeds them), and where to write the result.

Per step: forward, backward and step over the rank's micro batches, then one all-reduce of the loss (the minimum a
loop needs to report it). After the last step one `engine.save_checkpoint`. Rank R writes result-rank<R>.json:
the wall time at the end of each step, the save's seconds and bytes, and its peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def build_model(spec: dict, ds_config: dict):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.integrations import HfDeepSpeedConfig

    keepalive = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None
    kwargs = {}
    if spec["strategy"] == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, **kwargs)
    if spec["strategy"] == "qlora":
        from bitsandbytes.nn import Linear4bit
        from peft import prepare_model_for_kbit_training

        for layer in model.modules():  # PLATFORM.md: without this, CPU 4-bit training is wrong
            if isinstance(layer, Linear4bit):
                layer.support_avx512bf16_for_cpu = False
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if spec["strategy"] != "full":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(**spec["lora"], task_type="CAUSAL_LM"))
    model.train()
    return model, keepalive


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    ds_config = spec["ds_config"]
    model, keepalive = build_model(spec, ds_config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"])
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    steps = torch.load(Path(spec["batches"]) / f"rank{rank}.pt")
    step_ends = []
    for micro_batches in steps:
        loss_sum = torch.zeros(())
        for batch in micro_batches:
            loss = engine(**batch, use_cache=False).loss
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach()
        dist.all_reduce(loss_sum)
        loss_sum.item()
        step_ends.append(time.time())
    out = Path(spec["save_dir"])
    dist.barrier()
    started = time.time()
    engine.save_checkpoint(str(out), tag="ds", save_latest=False, exclude_frozen_parameters=spec["strategy"] != "full")
    dist.barrier()
    save_seconds = time.time() - started
    saved = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    result = {
        "step_ends": step_ends,
        "save_seconds": save_seconds,
        "save_bytes": saved,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    Path(spec["result"].format(rank=rank)).write_text(json.dumps(result))
    del keepalive
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
