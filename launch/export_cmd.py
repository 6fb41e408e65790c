"""`dtrain export`: turn a checkpoint into files the vanilla libraries load. Runs on any machine: no GPU, no
process group, no torchrun.

    dtrain export runs/tiny-lora --adapter out/adapter --merged out/merged
    dtrain export runs/tiny-full-zero3 --checkpoint step-00000040 --hf out/hf --dtype bf16

Every kind asked for is checked before anything is written; each is written into a temporary folder and renamed
when complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# dtrain.export.find_checkpoint reads it, for export and eval alike
CHECKPOINT_HELP = "step-XXXXXXXX, a step number, or a path (default: the newest complete one)"
KINDS = {
    "adapter": "lora/qlora: adapter in PEFT format",
    "merged": "lora/qlora: base + adapter merged (HF format)",
    "hf": "full: ZeRO shards consolidated (HF format)",
}


def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        help="export a checkpoint: PEFT adapter, merged model, or consolidated HF model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run", help="the run's output_dir, its checkpoints folder, its config YAML, or a checkpoint")
    parser.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    for kind, help_text in KINDS.items():
        parser.add_argument(f"--{kind}", type=Path, metavar="OUT", help=help_text)
    parser.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp16", "fp32"],
        default="auto",
        help="dtype of exported parameters (--merged, --hf); auto: the base model's dtype (buffers keep theirs)",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (--merged, --hf)")
    parser.add_argument("--model", default=None, metavar="PATH", help="base model directory, if it has moved")
    parser.set_defaults(handler=cmd_export)
    return parser


def cmd_export(args: argparse.Namespace) -> int:
    outputs = {kind: getattr(args, kind) for kind in KINDS if getattr(args, kind) is not None}
    if not outputs:
        print("dtrain export: nothing to do: pass --adapter, --merged and/or --hf", file=sys.stderr)
        return 2
    from dtrain.units import parse_size

    try:
        max_shard_bytes = parse_size(args.max_shard_size)
    except ValueError as e:
        print(f"dtrain export: --max-shard-size: {e}", file=sys.stderr)
        return 2
    from dtrain.dist import select_accelerator

    select_accelerator()  # before deepspeed is imported (its checkpoint reader is used, its engine is not)
    from dtrain import export
    from dtrain.config import ConfigError
    from dtrain.safe_load import UnsafeCheckpoint
    from dtrain.strategies.protocol import ExportOptions

    options = ExportOptions(args.dtype, max_shard_bytes, args.model)
    try:
        checkpoint = export.find_checkpoint(args.run, args.checkpoint)
        print(f"exporting {checkpoint}", flush=True)
        results = export.export_checkpoint(checkpoint, outputs, options)
    except (export.ExportError, ConfigError, UnsafeCheckpoint) as e:
        print(f"dtrain export: {e}", file=sys.stderr)
        return 2
    for result in results:
        print(result.summary(), flush=True)
    return 0
