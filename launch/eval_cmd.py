"""`dtrain eval`: loss and perplexity of a checkpoint or an exported model, and of its base, on any data (the work
is dtrain.model_eval's). One process, one device, no process group: runs wherever export runs.

    dtrain eval runs/tiny-lora                      # what the run's own trainer evaluated (its config.yaml)
    dtrain eval runs/tiny-lora eval.max_batches=null # the same, every block of the eval split
    dtrain eval runs/tiny-lora --data configs/tiny-lora.yaml data.seq_len=128
    dtrain eval runs/tiny-lora --checkpoint step-00000020 --data data/sample/text.jsonl
    dtrain eval runs/tiny-lora/adapter --data data/sample/chat.jsonl --format chat
    dtrain eval out/merged --base runs/tiny-model --data data/sample/text.jsonl

It prints what it evaluated (seq_len, blocks, tokens). Everything named is checked before a model is loaded; a
problem is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from dtrain_launch.export_cmd import CHECKPOINT_HELP


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="loss / perplexity of a checkpoint or exported model and of its base, on any data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "run", help="a run's output_dir, checkpoints folder, config YAML or checkpoint; or an exported folder"
    )
    parser.add_argument(
        "overrides", nargs="*", help="key.sub=value overrides of the config evaluated (the run's, or --data's)"
    )
    parser.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    parser.add_argument(
        "--data",
        default=None,
        help="a run config YAML (its eval split and eval.retention sets), or a dataset; default: the run's own config",
    )
    parser.add_argument(
        "--format", choices=["text", "instruction", "chat"], default="text", help="format of a --data dataset"
    )
    parser.add_argument(
        "--base", default=None, metavar="PATH", help="base model folder: for an exported model, or if it has moved"
    )
    parser.set_defaults(handler=cmd_eval)
    return parser


def cmd_eval(args: argparse.Namespace) -> int:
    from dtrain.dist import select_accelerator

    select_accelerator()  # before deepspeed is imported (its checkpoint reader is used, its engine is not)
    import torch

    from dtrain import model_eval
    from dtrain.config import ConfigError
    from dtrain.data import DataError
    from dtrain.export import ExportError
    from dtrain.hub import HubError
    from dtrain.safe_load import UnsafeCheckpoint

    try:
        subject = model_eval.find_subject(args.run, args.checkpoint, args.base)
        plan = model_eval.eval_data(args.data, args.format, subject, args.overrides)
        tokenizer = subject.cfg.model.load_tokenizer()
        sets = model_eval.eval_sets(plan, tokenizer)
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        rows = model_eval.evaluate_subject(subject, plan, sets, tokenizer, device)
    except ConfigError as e:
        print(f"dtrain eval: {'; '.join(e.problems)}", file=sys.stderr)
        return 2
    except (ExportError, DataError, HubError, UnsafeCheckpoint) as e:
        print(f"dtrain eval: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(model_eval.table(subject, plan, rows), flush=True)
    return 0
