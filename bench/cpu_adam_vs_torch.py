"""CPU optimizer step: torch AdamW vs DeepSpeedCPUAdam, on ~100M fp32 parameters held in CPU RAM.

Under optimizer offload the optimizer step runs on the host over every fp32 master weight; this is what it costs
with each optimizer (one warm-up step, then the median of --steps timed steps, same threads for both).

    python bench/cpu_adam_vs_torch.py [--params 100_000_000] [--steps 3] [--threads N]

The ratio is quoted by `dtrain check` (launch warning for adamw_torch with optimizer offload).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed_steps(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: int) -> float:
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()  # warm-up: state allocation, first-touch page faults
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def make_params(total: int, tensors: int = 16) -> list[torch.Tensor]:
    """`total` fp32 elements in equal tensors (a model's weights are many tensors, not one)."""
    size = total // tensors
    return [torch.nn.Parameter(torch.randn(size) * 0.02) for _ in range(tensors)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=lambda s: int(float(s)), default=100_000_000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from dtrain.dist import select_accelerator

    select_accelerator()
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    kwargs = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    results = {}
    for name, make in (
        ("torch AdamW (foreach)", lambda ps: torch.optim.AdamW(ps, foreach=True, **kwargs)),
        ("torch AdamW (for loop)", lambda ps: torch.optim.AdamW(ps, foreach=False, **kwargs)),
        ("DeepSpeedCPUAdam", lambda ps: DeepSpeedCPUAdam(ps, adamw_mode=True, **kwargs)),
    ):
        params = make_params(args.params)
        results[name] = timed_steps(make(params), params, args.steps)
        del params
    fastest_torch = min(v for k, v in results.items() if k.startswith("torch"))
    print(f"{args.params:,} fp32 parameters, {args.threads} threads, median of {args.steps} steps")
    for name, seconds in results.items():
        print(f"  {name:<24} {seconds:7.3f} s/step")
    print(f"  torch AdamW / DeepSpeedCPUAdam: {fastest_torch / results['DeepSpeedCPUAdam']:.1f}x")


if __name__ == "__main__":
    main()
