"""A tiny mixture of experts through dtrain, against a bare DeepSpeed loop on the same model and config, and against
a dense model of equal active parameters: steady tokens/s on N ranks.

    python bench/moe.py [--repeats 3 --steps 12 --nproc 2 --experts 8 --top-k 2]

Models (random init, the tiny tokenizer): a Qwen3-MoE of --layers layers, hidden --hidden, --experts experts of
width --expert-width, top---top-k routing; and a Qwen3 (dense) with intermediate size top-k x expert width, so
both run the same active MLP parameters per token (the MoE adds its router, E x hidden per layer). Both train with
the shipped tiny full config (ZeRO-3 + CPU offload), seq_len 512, micro batch 4, one micro batch per step per rank.

Runs per repeat, in an order that rotates every repeat (a noisy machine slows all alike):
- dtrain MoE with the balancing loss off (model.router_aux_loss_coef=0): the same work as the bare loop;
- the bare loop (bench/bare_loop.py: deepspeed.initialize with dtrain's generated DeepSpeed config, dtrain's very
  micro batches; library calls only) on the MoE;
- dtrain MoE with config.json's balancing loss (the default: router logits kept, the loss and expert counts);
- dtrain on the dense model.
Every figure is the median over repeats with its min-max; ratios are taken within a repeat before the median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import throughput  # noqa: E402  - its launch, measure and bare-loop helpers


def make_models(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from dtrain.tiny import make_tiny_model

    tokenizer_dir = make_tiny_model(root / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=args.hidden // 4,
                  max_position_embeddings=4096, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    configs = {
        "moe": AutoConfig.for_model("qwen3_moe", **common, num_experts=args.experts, num_experts_per_tok=args.top_k,
                                    moe_intermediate_size=args.expert_width, intermediate_size=args.expert_width),
        "dense": AutoConfig.for_model("qwen3", **common, intermediate_size=args.top_k * args.expert_width),
    }  # fmt: skip
    models = {}
    for name, config in configs.items():
        out = root / name
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(out)
        for file in tokenizer_dir.iterdir():
            if file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(file, out / file.name)
        models[name] = out
    return models


def active_params(model: Path) -> int:
    from dtrain.plan.shape import load_model_shape

    return load_model_shape(model).active_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the steady rate")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-width", type=int, default=256)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dtrain-bench-moe-") as tmp:
        root = Path(tmp)
        models = make_models(root, args)
        for name, model in models.items():
            print(f"{name}: {active_params(model) / 1e6:.2f}M active parameters per token")
        kinds = {  # name -> (model, extra dtrain overrides in the config)
            "dtrain-moe": ("moe", {"router_aux_loss_coef": 0.0}),
            "bare-moe": ("moe", None),
            "dtrain-moe-aux": ("moe", {}),
            "dtrain-dense": ("dense", {}),
        }
        prepared = {}
        for name in ("moe", "dense"):
            folder = root / f"prep-{name}"
            folder.mkdir()
            config = throughput.dtrain_config(folder, "full", models[name], args)
            subprocess.run([sys.executable, "-m", "dtrain_launch.cli", "prepare", str(config)], cwd=REPO, check=True,
                           capture_output=True)  # fmt: skip
            prepared[name] = throughput.prepare_bare(folder, config, args.nproc)
        results: list[dict[str, float]] = []
        for repeat in range(args.repeats):
            names = list(kinds)
            order = names[repeat % len(names) :] + names[: repeat % len(names)]
            run = {}
            for kind in order:
                model_name, model_keys = kinds[kind]
                spec, step_tokens = prepared[model_name]
                folder = root / f"{kind}-{repeat}"
                folder.mkdir()
                if model_keys is None:
                    here = {"save_dir": str(folder / "save"), "result": str(folder / "result-rank{rank}.json")}
                    (folder / "spec.json").write_text(json.dumps(json.loads(spec.read_text()) | here))
                    run[kind] = throughput.run_bare(folder, folder / "spec.json", step_tokens, args)["tokens_per_s"]
                    continue
                config = throughput.dtrain_config(folder, "full", models[model_name], args)
                raw = yaml.safe_load(config.read_text())
                raw["model"] |= model_keys
                config.write_text(yaml.safe_dump(raw, sort_keys=False))
                run[kind] = throughput.run_dtrain(folder, config, step_tokens, args)["tokens_per_s"]
            results.append(run)
            print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {run[k]:.0f}" for k in order) + " tokens/s", flush=True)
        print(f"\n{args.nproc} ranks, ZeRO-3 + CPU offload, seq_len {args.seq_len}, micro batch {args.micro_batch}, "
              f"median (min-max) of {args.repeats} interleaved repeats")  # fmt: skip
        for kind in kinds:
            values = [r[kind] for r in results]
            print(f"  {kind:<16}{statistics.median(values):>8.0f} tokens/s ({min(values):.0f}-{max(values):.0f})")
        for label, a, b in (("dtrain / bare (MoE, no aux loss)", "dtrain-moe", "bare-moe"),
                            ("dtrain with aux loss / without", "dtrain-moe-aux", "dtrain-moe"),
                            ("MoE / dense of equal active parameters", "dtrain-moe", "dtrain-dense")):  # fmt: skip
            ratios = [r[a] / r[b] for r in results]
            print(f"  {label:<40}{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
        load = os.getloadavg()
        print(f"load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
