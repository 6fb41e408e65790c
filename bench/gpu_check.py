"""The production path on one CUDA GPU, measured against `dtrain plan` (< 8 minutes on an H100-class GPU).

    python bench/gpu_check.py [--steps 20] [--tolerance 0.15] [--skip-tests] [--peak-tflops N]

Prints one table and exits non-zero if any measured peak GPU memory is off from the plan's prediction by more than
--tolerance (either way: an over-prediction wastes GPUs as surely as an under-prediction crashes a job):
  (a) Llama-3-8B-shaped QLoRA (configs/llama3-8b-qlora.yaml, the shape of configs/models/llama-3-8b/config.json with
      random weights — nothing is downloaded), seq 2048, the configured micro batch, --steps steps;
  (b) a ~1.2B Llama (Llama-3.2-1B's shape), full fine-tune, bf16 ZeRO-3, without and with CPU offload of the
      optimizer and parameters;
  (c) the CUDA tests (pytest -m cuda).
Each case: peak GPU memory (allocator peak + the CUDA context, as the plan counts it) vs the plan, tokens/s and MFU
(6 x parameters x tokens + attention FLOPs, over the GPU's dense bf16 peak). The model is built on the meta device
and materialized one module at a time on the GPU; the step is DeepSpeed's engine with dtrain's generated config
and optimizer, on random token batches (the data pipeline is not what is measured).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QLORA_CONFIG = REPO / "configs/llama3-8b-qlora.yaml"
# Llama-3.2-1B: 16 layers, hidden 2048, tied embeddings, 1.24B parameters.
ONE_B_SHAPE = {
    "model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192, "vocab_size": 128256,
    "tie_word_embeddings": True, "max_position_embeddings": 8192, "rope_theta": 500000.0,
}  # fmt: skip
# Dense bf16 peak, FLOP/s, by device-name fragment (vendor datasheets, without sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
             "4090": 165e12, "3090": 71e12}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    config: str
    """Run config YAML (relative to the repository)."""
    overrides: tuple[str, ...]
    shape: dict | None = None
    """config.json of the model when it is not the config's model.path."""


def cases(seq_len: int, steps: int) -> list[Case]:
    common = (f"train.max_steps={steps}", "train.warmup_steps=0", f"data.seq_len={seq_len}")
    full = (*common, "strategy=full", "train.precision=bf16", "model.gradient_checkpointing=true",
            "train.optimizer=adamw_deepspeed", "deepspeed.stage=3", "train.micro_batch_size=1",
            "train.gradient_accumulation_steps=1", "train.global_batch_size=null")  # fmt: skip
    offload = ("deepspeed.offload_optimizer.device=cpu", "deepspeed.offload_param.device=cpu")
    none = ("deepspeed.offload_optimizer.device=none", "deepspeed.offload_param.device=none")
    return [
        Case("8B QLoRA", str(QLORA_CONFIG.relative_to(REPO)), common),
        Case("1.2B full ZeRO-3", "configs/llama3-70b-full-zero3-offload.yaml", (*full, *none), ONE_B_SHAPE),
        Case(
            "1.2B full ZeRO-3 + CPU offload",
            "configs/llama3-70b-full-zero3-offload.yaml",
            (*full, *offload),
            ONE_B_SHAPE,
        ),  # fmt: skip
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per case (the first 2 are warm-up)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--tolerance", type=float, default=0.15, help="largest relative gap to the plan")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU dense bf16 peak (default: by name)")
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the CUDA tests (part c)")
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps: at least 3 (2 warm-up steps are not timed)")
    return args


def load_case(case: Case, model_dir: Path):
    """(validated config, ModelShape) with the case's model shape written to `model_dir`/config.json."""
    from dtrain.config import load_config
    from dtrain.plan.shape import ModelShape

    shape = case.shape or json.loads((REPO / load_config(REPO / case.config, check_paths=False).model.path /
                                      "config.json").read_text())  # fmt: skip
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **shape}))
    overrides = [*case.overrides, f"model.path={model_dir}", f"output_dir={model_dir.parent / 'run'}"]
    cfg = load_config(REPO / case.config, overrides, check_paths=False)
    return cfg, ModelShape.from_hf_config(shape)


def planned_gpu_bytes(cfg, shape, gpu_mem_bytes: int, cpu_mem_bytes: int) -> float:
    """`dtrain plan`'s per-GPU total for this config on one GPU."""
    from dtrain.plan.choices import Choice, estimate
    from dtrain.plan.hardware import Hardware

    hw = Hardware(1, 1, gpu_mem_bytes, cpu_mem_bytes)
    return estimate(shape, cfg, Choice.from_config(cfg), hw).memory.gpu.total


def model_flops_per_token(shape, seq_len: int) -> float:
    """6 x parameters (forward + backward) + causal attention's 6 x layers x seq x hidden (half of 12, causal)."""
    return 6 * shape.total_params + 6 * shape.num_layers * seq_len * shape.num_heads * shape.head_dim


def materialize(model, cfg, device):
    """Random weights, one module at a time on the GPU; qlora's decoder linears become NF4 `Linear4bit`."""
    import torch

    def fill(module):
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":  # quantized already
                continue
            data = torch.empty(param.shape, dtype=torch.bfloat16, device=device).normal_(0, 0.02)
            setattr(module, name, torch.nn.Parameter(data, requires_grad=param.requires_grad))
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.device.type == "meta":
                module._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)

    if cfg.strategy == "qlora":
        _quantize_linears(model, cfg, device)
    for module in model.modules():
        fill(module)
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(model.config).to(device)  # inv_freq from the config, not zeros
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model


def _quantize_linears(model, cfg, device):
    import bitsandbytes as bnb
    import torch

    from dtrain.plan.shape import DECODER_LINEARS

    q = cfg.quantization
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if name not in DECODER_LINEARS:
                    continue
                weight = torch.empty(linear.weight.shape, dtype=torch.bfloat16, device=device).normal_(0, 0.02)
                new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                        compute_dtype=torch.bfloat16, quant_type=q.quant_type,
                                        compress_statistics=q.double_quant, device="meta")  # fmt: skip
                new.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type=q.quant_type,
                                               compress_statistics=q.double_quant).to(device)  # fmt: skip
                setattr(parent, name, new)


def run_case(case: Case, work: Path, args) -> dict:
    import deepspeed
    import torch

    from dtrain.ds_config import build_deepspeed_config
    from dtrain.layout import BatchLayout
    from dtrain.optim import build_optimizer
    from dtrain.strategies.loading import meta_model

    cfg, shape = load_case(case, work / case.name.replace(" ", "_"))
    device = torch.device("cuda", 0)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    context = torch.cuda.mem_get_info()[1] - torch.cuda.mem_get_info()[0] - torch.cuda.memory_reserved()
    model = materialize(meta_model(Path(cfg.model.path)), cfg, device)  # dtrain.strategies.loading
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if cfg.strategy != "full":
        from peft import get_peft_model, prepare_model_for_kbit_training

        from dtrain.strategies.peft_adapters import peft_config

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})  # fmt: skip
        model = get_peft_model(model, peft_config(cfg.lora))
    model.train()
    layout = BatchLayout.from_config(cfg.train, 1)
    ds_config = build_deepspeed_config(cfg, layout, accelerator="cuda")
    optimizer = build_optimizer(cfg.train, model)
    params = None if optimizer else [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params, config=ds_config)
    tokens_per_step = layout.global_batch_size * cfg.data.seq_len
    times = []
    for step in range(args.steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(layout.gradient_accumulation_steps):
            ids = torch.randint(0, shape.vocab_size, (layout.micro_batch_size, cfg.data.seq_len), device=device)
            engine.backward(engine(input_ids=ids, labels=ids, use_cache=False).loss)
            engine.step()
        torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - started)
    measured = torch.cuda.max_memory_reserved() + context
    gpu_total = torch.cuda.get_device_properties(0).total_memory
    import psutil

    planned = planned_gpu_bytes(cfg, shape, gpu_total, psutil.virtual_memory().total)
    tokens_per_s = tokens_per_step / (sum(times) / len(times))
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(torch.cuda.get_device_name(0))
    mfu = tokens_per_s * model_flops_per_token(shape, cfg.data.seq_len) / peak if peak else float("nan")
    engine.destroy()
    del engine, model, optimizer
    torch.cuda.empty_cache()
    return {"case": case.name, "measured": measured, "planned": planned, "tokens_per_s": tokens_per_s, "mfu": mfu}


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def off_by(row: dict) -> float:
    return abs(row["measured"] - row["planned"]) / row["planned"]


def render(rows: list[dict], tolerance: float) -> str:
    gib = 2**30
    lines = [f"{'case':<34}{'peak GPU':>10}{'plan':>10}{'off':>7}{'tokens/s':>11}{'MFU':>7}  verdict"]
    for r in rows:
        verdict = "ok" if off_by(r) <= tolerance else f"OFF BY > {tolerance:.0%}"
        lines.append(
            f"{r['case']:<34}{r['measured'] / gib:>8.1f}Gi{r['planned'] / gib:>8.1f}Gi{off_by(r):>7.0%}"
            f"{r['tokens_per_s']:>11,.0f}{r['mfu']:>7.1%}  {verdict}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import os
    import tempfile

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine", file=sys.stderr)
        return 2
    os.environ.update(DS_ACCELERATOR="cuda", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))  # fmt: skip
    import deepspeed

    deepspeed.init_distributed("nccl")
    print(f"{torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB",
          flush=True)  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for case in cases(args.seq_len, args.steps):
            if args.only and args.only not in case.name:
                continue
            rows.append(run_case(case, Path(work), args))
            print(render(rows[-1:], args.tolerance).splitlines()[-1], flush=True)
    print("\n" + render(rows, args.tolerance))
    failed = [r["case"] for r in rows if off_by(r) > args.tolerance]
    tests = 0
    if not args.skip_tests:
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/"]
        tests = subprocess.run(cmd, cwd=REPO).returncode
    if failed:
        print(f"\nFAILED: peak GPU memory off the plan by more than {args.tolerance:.0%}: {', '.join(failed)}",
              file=sys.stderr)  # fmt: skip
    if tests:
        print(f"\nFAILED: the CUDA tests (pytest exit {tests})", file=sys.stderr)
    return 1 if failed or tests else 0


if __name__ == "__main__":
    sys.exit(main())
