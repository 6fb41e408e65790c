"""Peak resident memory of a bounded-memory LoRA merge (dtrain.merge) against the size of the model it writes.

    python bench/merged_export_rss.py [--hidden 768 --layers 12 --intermediate 3072 --vocab 32000] [--dtype bf16]

Writes a random Llama (152M parameters at the defaults) in --dtype as safetensors and a random r=16 adapter on
q/k/v/o, then merges them in a fresh process (the way `dtrain export --merged` does) with 100 MB output shards and
reports that process's RSS after imports, its peak RSS (which also counts the page cache of the memory-mapped base
files it read) and its anonymous memory while a shard is held, against the model's size. A whole-model merge holds
at least the model in fp32 (2x a bf16 model's size) on top of the imports.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def write_model(out: Path, args: argparse.Namespace) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 256 or 1, intermediate_size=args.intermediate,
                         vocab_size=args.vocab, tie_word_embeddings=False)  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.to(DTYPES[args.dtype]).save_pretrained(out, max_shard_size="200MB")
    return sum(p.numel() for p in model.parameters())


def write_adapter(path: Path, model_dir: Path, r: int) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    h, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = h // heads
    dims = {"q_proj": (h, h), "k_proj": (h, kv * head_dim), "v_proj": (h, kv * head_dim), "o_proj": (h, h)}
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for name, (fan_in, fan_out) in dims.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{prefix}.lora_A.default.weight"] = torch.randn(r, fan_in) * 0.01
            tensors[f"{prefix}.lora_B.default.weight"] = torch.randn(fan_out, r) * 0.01
    torch.save(tensors, path)


def merge_in_this_process(model_dir: Path, adapter: Path, out: Path) -> dict:
    import psutil

    from dtrain.export import anon_mb, export_dtype, write_sharded
    from dtrain.merge import Merger, merge_to

    before = psutil.Process().memory_info().rss / 2**20
    merger = Merger(model_dir, torch.load(adapter), 2.0, export_dtype("auto", str(model_dir)))
    out.mkdir()
    anon: list[float] = []
    files = merge_to(merger, out, 100_000_000, write_sharded, on_shard=lambda: anon.append(anon_mb()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"files": len(files), "rss_before_mib": before, "peak_rss_mib": peak, "anon_mib": max(anon)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(merge_in_this_process(*map(Path, args.child))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = write_model(tmp / "base", args)
        write_adapter(tmp / "adapter.pt", tmp / "base", r=16)
        child = [sys.executable, __file__, "--child", str(tmp / "base"), str(tmp / "adapter.pt"), str(tmp / "merged")]
        result = json.loads(subprocess.run(child, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        size_mib = sum(p.stat().st_size for p in (tmp / "merged").glob("*.safetensors")) / 2**20
    print(f"{params:,} parameters ({args.dtype}), merged model {size_mib:,.0f} MiB in {result['files']} shards")
    before, peak, anon = result["rss_before_mib"], result["peak_rss_mib"], result["anon_mib"]
    print(
        f"  merge process: RSS after imports {before:,.0f} MiB; peak RSS {peak:,.0f} MiB (imports included, "
        f"+{peak - before:,.0f} MiB); most anonymous memory while a shard was held {anon:,.0f} MiB"
    )


if __name__ == "__main__":
    main()
