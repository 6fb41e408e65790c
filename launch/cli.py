"""The `dtrain` command."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from dtrain.config import Config, ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dtrain", description="Distributed full / LoRA / QLoRA fine-tuning.")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="validate a config and print the resolved plan; launches nothing")
    _config_args(check)
    check.add_argument("--nproc", type=int, default=1, help="ranks the run will have (for batch arithmetic)")
    check.set_defaults(handler=cmd_check)

    train = commands.add_parser("train", help="validate, then run torchrun on this machine")
    _config_args(train)
    train.add_argument("--nproc", type=int, default=1, help="ranks (processes) on this machine")
    train.set_defaults(handler=cmd_train)

    tiny = commands.add_parser("tiny-model", help="write a tiny random Llama model + tokenizer (for smoke tests)")
    tiny.add_argument("out", help="output directory")
    tiny.set_defaults(handler=cmd_tiny)

    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as e:
        print(f"dtrain {args.command}: {e}", file=sys.stderr)
        return 2


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config YAML")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def cmd_check(args: argparse.Namespace) -> int:
    from dtrain.checkpoint import resolve_resume
    from dtrain.ds_config import build_deepspeed_config
    from dtrain.layout import BatchLayout

    cfg = _load(args)
    layout = BatchLayout.from_config(cfg.train, args.nproc)
    ds = cfg.deepspeed
    print(f"{args.config}: OK")
    print(f"  strategy     {cfg.strategy}; model {cfg.model.path}; precision {cfg.train.precision}")
    print(
        f"  batch        micro {layout.micro_batch_size} x accumulation {layout.gradient_accumulation_steps} x "
        f"{layout.world_size} ranks = {layout.global_batch_size} sequences of {cfg.data.seq_len} tokens"
    )
    print(
        f"  deepspeed    ZeRO-{ds.stage}, optimizer offload {ds.offload_optimizer.device}, "
        f"parameter offload {ds.offload_param.device}, optimizer {cfg.train.optimizer}"
    )
    try:
        resume = resolve_resume(cfg)
        start = f"resume from {resume}" if resume else "start from scratch"
    except (FileExistsError, FileNotFoundError) as e:
        start = f"REFUSED: {e}"
    print(f"  checkpoints  {cfg.checkpoint_dir} every {cfg.checkpoint.every_steps} steps; {start}")
    print(f"  tensorboard  {cfg.tensorboard_dir}")
    print("  deepspeed config:")
    print("    " + json.dumps(build_deepspeed_config(cfg, layout), indent=2).replace("\n", "\n    "))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dtrain_launch.torchrun import run, torchrun_command

    cfg = _load(args)
    from dtrain.layout import BatchLayout

    BatchLayout.from_config(cfg.train, args.nproc)  # batch arithmetic errors before any process starts
    cmd, env = torchrun_command(args.config, args.overrides, args.nproc)
    print("+ " + shlex.join(cmd), flush=True)
    run(cmd, env)
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from dtrain.tiny import make_tiny_model

    print(make_tiny_model(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
