"""What `dtrain check` and `dtrain submit` add to dtrain.preflight: the memory fit when the hardware is known, the
DeepSpeed ops the run loads and whether they are built, and a CUDA toolkit that could not build them."""

from __future__ import annotations

import re

from dtrain.config import Config
from dtrain.layout import BatchLayout
from dtrain.plan.hardware import Hardware


def fit_report(cfg: Config, layout: BatchLayout, hardware: Hardware | None) -> list[str]:
    """["fits"], ["does NOT fit", problem, ...], or ["not estimated (why)"] for a model family plan has no formulas
    for (never a reason to refuse a run); [] when the hardware is not known."""
    if hardware is None:
        return []
    from dtrain.plan.meta import not_estimated
    from dtrain.plan.report import fit_problems

    reason = not_estimated(cfg)
    if reason:
        return [f"not estimated ({reason})"]

    problems = fit_problems(cfg, layout, hardware)
    return ["fits"] if not problems else ["does NOT fit", *problems]


# bench/cpu_adam_vs_torch.py: one optimizer step over 100M fp32 parameters on the CPU, 1 thread, on the 2-core CI
# host under load (December 2026): torch AdamW 4.18 s (its default for-loop; foreach 9.9 s), DeepSpeedCPUAdam
# 1.92 s. CPU Adam's AVX-512 + OpenMP kernel gains more with more cores; the figure is a lower bound.
TORCH_ADAMW_CPU_SLOWDOWN = 2.2


def launch_warnings(cfg: Config) -> list[str]:
    """What runs correctly but not as a user would want. A warning, not a refusal: torch AdamW under offload is
    right, only slow, and it is the optimizer whose resume is bitwise exact (the tiny test configs use it so)."""
    warnings = []
    offload = cfg.deepspeed.offload_optimizer.device
    if offload != "none" and cfg.train.optimizer == "adamw_torch":
        warnings.append(
            f"train.optimizer adamw_torch with deepspeed.offload_optimizer.device {offload}: the optimizer step runs "
            f"on the CPU, where torch AdamW is {TORCH_ADAMW_CPU_SLOWDOWN}x slower than DeepSpeed's CPU Adam or more "
            "(bench/cpu_adam_vs_torch.py, 100M parameters); use adamw_deepspeed unless you need bitwise-exact resume"
        )
    return warnings + tool_warnings(cfg)


def tool_warnings(cfg: Config) -> list[str]:
    """A chat template that shows no tool definitions or no tool calls: rows that have them are refused while
    preparing (or skipped with data.on_bad_row: skip), which check says before any data is read."""
    from dtrain.data.chat_template import cannot_render
    from dtrain.preflight import chat_template

    key, template = chat_template(cfg)
    missing = cannot_render(template) if template else []
    if not missing:
        return []
    return [
        f"{key}: the chat template renders no {' and no '.join(missing)}: chat rows that have them will be refused "
        "(data.on_bad_row: skip skips them)"
    ]


def ops_report(cfg: Config, device: str) -> list[str]:
    """The compiled DeepSpeed ops a run of `cfg` loads on `device` ("cpu"/"cuda") ranks, each built for this machine
    type or not, then which type this machine is. Changes nothing: `dtrain submit` must not hand its environment
    (which sbatch exports) a login node's cache folder."""
    from dtrain.ops import extensions_dir, needed_ops, op_status, this_machine

    folder = extensions_dir()
    lines = [op_status(name, folder).describe(needed_on=device) for name in needed_ops(cfg, device)]
    return [*lines, f"this machine type: {this_machine().describe()}; cache {folder}"] if lines else []


# `module load cuda/12.4`, `module add cuda/11.8` (Lmod and environment modules)
_MODULE_CUDA = re.compile(r"\bmodule\s+(?:load|add)\b.*?\bcuda/(\d+(?:\.\d+)*)")


def cuda_problems(setup: list[str] | None = None) -> list[str]:
    """A CUDA toolkit that cannot build ops for this torch (another CUDA major): the cluster profile's
    `module load cuda/X` lines when given (the compute nodes' CUDA), else the nvcc of this machine."""
    import torch

    from dtrain.ops import cuda_mismatch, nvcc_release

    if torch.version.cuda is None:  # a CPU build compiles no CUDA op
        return []
    if setup is None:
        found = [("nvcc on this machine", nvcc_release())]
    else:
        found = [(f"setup: `{line.strip()}`", m.group(1)) for line in setup if (m := _MODULE_CUDA.search(line))]
    mismatches = [(where, cuda_mismatch(toolkit, torch.version.cuda)) for where, toolkit in found if toolkit]
    return [f"{where}: {problem}" for where, problem in mismatches if problem]
