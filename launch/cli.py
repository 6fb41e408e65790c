"""The `dtrain` command."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from dtrain_launch.eval_cmd import add_eval_parser
from dtrain_launch.export_cmd import add_export_parser
from dtrain_launch.submit_cmd import add_submit_parsers
from dtrain_launch.validate import cuda_problems, fit_report, launch_warnings, ops_report

from dtrain.config import ConfigError
from dtrain.preflight import Launch, Preflight, preflight


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dtrain", description="Distributed full / LoRA / QLoRA fine-tuning.")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="validate a config and print the resolved plan; launches nothing")
    _config_args(check)
    check.add_argument("--nproc", type=int, default=None, help="ranks per node (default: --gpus-per-node, or 1)")
    _hardware_args(check, required=False)
    check.add_argument("--allow-no-fit", action="store_true", help="report a run that cannot fit, but pass")
    check.add_argument("--show-deepspeed", action="store_true", help="also print the DeepSpeed JSON the ranks get")
    check.set_defaults(handler=cmd_check)

    plan = commands.add_parser("plan", help="memory per GPU / node / NVMe for this run and its alternatives")
    _config_args(plan)
    _hardware_args(plan, required=True)
    plan.set_defaults(handler=cmd_plan)

    prepare = commands.add_parser("prepare", help="tokenize and pack the data into the cache ahead of time")
    _config_args(prepare)
    prepare.set_defaults(handler=cmd_prepare)

    reshard = commands.add_parser(
        "reshard", help="convert the checkpoint a resume would start from to DeepSpeed's universal format, now"
    )
    _config_args(reshard)
    reshard.set_defaults(handler=cmd_reshard)

    train = commands.add_parser("train", help="validate, then run torchrun on this machine")
    _config_args(train)
    train.add_argument("--nproc", type=int, default=1, help="ranks (processes) on this machine")
    train.set_defaults(handler=cmd_train)

    add_export_parser(commands)
    add_eval_parser(commands)
    add_submit_parsers(commands)

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


def _hardware_args(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--nodes", type=int, default=1, help="nodes")
    parser.add_argument("--gpus-per-node", type=int, required=required, help="GPUs (ranks) per node")
    parser.add_argument("--gpu-mem", required=required, help="memory of one GPU, e.g. 80GB")
    parser.add_argument("--cpu-mem", required=required, help="CPU RAM of one node, e.g. 1TB")
    parser.add_argument("--nvme", default=None, help="local NVMe per node, e.g. 3.5TB (enables NVMe offload options)")


def _hardware(args: argparse.Namespace):
    from dtrain.plan.hardware import Hardware
    from dtrain.units import parse_size

    if args.gpus_per_node is None:
        return None
    missing = [flag for flag in ("gpu_mem", "cpu_mem") if getattr(args, flag) is None]
    if missing:
        raise ConfigError([f"--{m.replace('_', '-')}: required with --gpus-per-node" for m in missing])
    try:
        nvme = parse_size(args.nvme) if args.nvme else None
        return Hardware(args.nodes, args.gpus_per_node, parse_size(args.gpu_mem), parse_size(args.cpu_mem), nvme)
    except ValueError as e:
        raise ConfigError([f"hardware: {e}"]) from e


def _preflight(args: argparse.Namespace, nproc_per_node: int = 1) -> Preflight:
    return preflight(args.config, args.overrides, Launch(getattr(args, "nodes", 1), nproc_per_node))


def adapter_report(cfg) -> list[str]:
    """What an adapter run adapts (modules, expert parameters, trainable count); nothing for full fine-tuning."""
    from dtrain import strategies

    if "adapter" not in strategies.get(cfg.strategy).export_kinds:
        return []
    from dtrain.strategies.peft_adapters import adapted_lines

    return adapted_lines(cfg)


def cmd_check(args: argparse.Namespace) -> int:
    from dtrain.attention import attention_for
    from dtrain.dist import select_accelerator
    from dtrain.ds_config import build_deepspeed_config

    hardware = _hardware(args)
    per_node = args.nproc if args.nproc is not None else (hardware.gpus_per_node if hardware else 1)
    checked = _preflight(args, per_node)
    cfg, layout = checked.cfg, checked.resume.layout
    problems = cuda_problems()
    if problems:
        raise ConfigError(problems)
    fit = fit_report(cfg, layout, hardware)
    ds = cfg.deepspeed
    print(f"{args.config}: OK")
    print(f"  strategy     {cfg.strategy}; model {model_line(cfg)}; precision {cfg.train.precision}")
    print(
        f"  batch        micro {layout.micro_batch_size} x accumulation {layout.gradient_accumulation_steps} x "
        f"{layout.world_size} ranks = {layout.global_batch_size} sequences of {cfg.data.seq_len} tokens"
    )
    print(
        f"  deepspeed    ZeRO-{ds.stage}, optimizer offload {ds.offload_optimizer.device}, "
        f"parameter offload {ds.offload_param.device}, optimizer {cfg.train.optimizer}"
    )
    print(f"  checkpoints  {cfg.checkpoint_dir} every {cfg.checkpoint.every_steps} steps; {checked.resume.describe()}")
    for change in checked.resume.changes:
        print(f"               changed since the checkpoint: {change}")
    print(f"  logging      {', '.join(cfg.logging.report_to) or 'metrics.jsonl only'}; export on finish: "
          f"{cfg.export.on_finish}")  # fmt: skip
    print(f"  attention    {attention_for(cfg).line().removeprefix('attention: ')} on this machine")
    for i, line in enumerate(adapter_report(cfg)):
        print(f"  {'adapted' if i == 0 else '':<13}{line}")
    print(f"  memory       {fit[0] if fit else 'not checked (give --gpus-per-node --gpu-mem --cpu-mem)'}")
    for line in fit[1:]:
        print(f"               {line}")
    ops = ops_report(cfg, "cuda" if args.gpus_per_node else select_accelerator())
    print(f"  ds ops       {ops[0] if ops else 'none compiled'}")
    for line in ops[1:]:
        print(f"               {line}")
    for warning in launch_warnings(cfg):
        print(f"  WARNING      {warning}")
    if args.show_deepspeed:
        print("  deepspeed config:")
        print("    " + json.dumps(build_deepspeed_config(cfg, layout), indent=2).replace("\n", "\n    "))
    if fit and fit[0] == "does NOT fit" and not args.allow_no_fit:
        print(f"dtrain check: the run cannot fit: {'; '.join(fit[1:])} (--allow-no-fit to pass)", file=sys.stderr)
        return 2
    return 0


def model_line(cfg) -> str:
    """The model as given, the Hub commit it resolved to, and trust_remote_code when on (it runs the repo's code)."""
    from dtrain.hub import resolve

    commit = resolve(cfg.model.path, cfg.model.revision).commit
    line = cfg.model.path + (f" (Hub commit {commit})" if commit else "")
    return line + (
        "; trust_remote_code ON: runs the model repo's own Python code" if cfg.model.trust_remote_code else ""
    )


def cmd_plan(args: argparse.Namespace) -> int:
    from dtrain.plan.report import plan_command

    hw = _hardware(args)
    cfg = _preflight(args, hw.gpus_per_node).cfg
    print(plan_command(cfg, hw.nodes, hw.gpus_per_node, hw.gpu_mem_bytes, hw.cpu_mem_bytes, hw.nvme_bytes))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from dtrain.data import DataError, prepare_command

    try:
        print(prepare_command(_preflight(args).cfg))
    except DataError as e:
        print(f"dtrain prepare: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_reshard(args: argparse.Namespace) -> int:
    from dtrain.reshard import reshard_command

    print(reshard_command(_preflight(args).cfg))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dtrain_launch.torchrun import run, torchrun_command

    _preflight(args, args.nproc)  # everything `dtrain check` checks, before any process starts
    cmd, env = torchrun_command(args.config, args.overrides, args.nproc)
    print("+ " + shlex.join(cmd), flush=True)
    run(cmd, env)
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from pathlib import Path

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError([f"{out}: exists and is not empty; choose a new folder"])
    import os
    import shutil

    from dtrain.tiny import make_tiny_model

    staging = out.absolute().with_name(f".tmp-{out.name}-{os.getpid()}")
    try:
        make_tiny_model(staging)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
