"""Activation peak of one forward + backward, plain vs chunked cross-entropy, on a vocabulary-heavy tiny Llama.

    python bench/chunked_loss_memory.py [--vocab 128256 --seq-len 2048 --hidden 256 --layers 2 --micro-batch 1]

Measured as in tests/test_plan.py: the allocation peak of a step above its start (parameters and gradients exist
already), from the CPU profiler's memory events; printed beside dtrain.plan's prediction for both paths.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dtrain.loss import install_chunked_loss  # noqa: E402
from dtrain.plan.memory import activation_bytes  # noqa: E402
from dtrain.plan.shape import ModelShape  # noqa: E402
from dtrain.tables import torch_dtype  # noqa: E402
from dtrain.units import format_bytes  # noqa: E402
from tests.test_plan import cpu_step_peak  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument(
        "--dtype", choices=["bf16", "fp32"], default="bf16", help="fp32 is much faster on CPUs without bf16"
    )
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    config = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=int(2.75 * args.hidden), vocab_size=args.vocab,
                         max_position_embeddings=args.seq_len, attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    dtype = torch_dtype(args.dtype)
    plain = LlamaForCausalLM(config).to(dtype).train()
    chunked = copy.deepcopy(plain)
    tokens = args.micro_batch * args.seq_len
    chunks = install_chunked_loss(chunked, tokens)
    ids = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len))
    shape = ModelShape.from_hf_config(config.to_dict())
    size = f"vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, {tokens} tokens, {args.dtype}"
    print(f"{size}, {chunks} slices")
    for name, model, chunked_run in (("plain", plain, False), ("chunked", chunked, True)):
        measured = cpu_step_peak(model, ids)
        predicted = activation_bytes(
            shape, args.seq_len, args.micro_batch, False, "sdpa", dtype.itemsize, chunked_loss=chunked_run
        )
        print(f"  {name:8s} measured {format_bytes(measured):>9s}  predicted {format_bytes(predicted):>9s} "
              f"({100 * (predicted / measured - 1):+.1f} %)")  # fmt: skip


if __name__ == "__main__":
    main()
