"""`dtrain plan`'s report, and the fit check `dtrain check` / `dtrain submit` run."""

from __future__ import annotations

from dtrain import strategies
from dtrain.config import Config, ConfigError
from dtrain.layout import BatchLayout
from dtrain.plan.choices import Choice, Estimate, cheapest_fit, estimate, plan_alternatives
from dtrain.plan.hardware import Hardware
from dtrain.plan.shape import ModelShape, load_model_shape
from dtrain.units import format_bytes


def render_breakdown(est: Estimate, hw: Hardware) -> str:
    """Parts x places table of one configuration, with the capacity and the verdict."""
    mem = est.memory
    rows = [
        (label, getattr(mem.gpu, part), getattr(mem.cpu, part), getattr(mem.nvme, part))
        for label, part in (
            ("parameters", "params"),
            ("gradients", "grads"),
            ("optimizer states", "optimizer"),
            ("activations", "activations"),
            ("buffers", "buffers"),
        )
    ]
    nvme_have = format_bytes(hw.nvme_bytes) if hw.nvme_bytes is not None else "not given"
    lines = [f"  {'':<18}{'per GPU':>12}{'CPU RAM/node':>15}{'NVMe/node':>12}"]
    lines += [
        f"  {label:<18}{format_bytes(g):>12}{format_bytes(c):>15}{format_bytes(n):>12}" for label, g, c, n in rows
    ]
    lines.append(
        f"  {'total':<18}{format_bytes(mem.gpu.total):>12}{format_bytes(mem.cpu.total):>15}"
        f"{format_bytes(mem.nvme.total):>12}"
    )
    lines.append(
        f"  {'available':<18}{format_bytes(hw.gpu_mem_bytes):>12}{format_bytes(hw.cpu_mem_bytes):>15}{nvme_have:>12}"
    )
    return "\n".join(lines)


def verdict(est: Estimate, hw: Hardware) -> str:
    problems = est.problems(hw)
    if problems:
        return "does not fit — " + "; ".join(problems)
    spare = (
        f"{format_bytes(hw.gpu_mem_bytes - est.memory.gpu.total)} spare per GPU, "
        f"{format_bytes(hw.cpu_mem_bytes - est.memory.cpu.total)} spare CPU RAM per node"
    )
    unchecked = "; NVMe use not checked (no NVMe size given)" if est.memory.nvme.total and hw.nvme_bytes is None else ""
    return f"fits — {spare}{unchecked}"


def render_alternatives(estimates: list[Estimate], configured: Choice, best: Estimate | None, hw: Hardware) -> str:
    header = (
        f"    {'strategy':<9}{'ZeRO':>4}  {'opt.offload':<12}{'param.offload':<14}{'ckpt':<5}{'cost':>5}"
        f"{'per GPU':>11}{'CPU/node':>11}{'NVMe/node':>11}  verdict"
    )
    lines = [header]
    for est in estimates:
        c, mem = est.choice, est.memory
        mark = ("*" if c == configured else " ") + (">" if best is not None and est is best else " ")
        lines.append(
            f"  {mark}{c.strategy:<9}{c.stage:>4}  {c.offload_optimizer:<12}{c.offload_param:<14}"
            f"{'on' if c.checkpointing else 'off':<5}{c.cost:>5}{format_bytes(mem.gpu.total):>11}"
            f"{format_bytes(mem.cpu.total):>11}{format_bytes(mem.nvme.total):>11}  {est.shortfall(hw)}"
        )
    lines.append("  * as configured   > cheapest that fits   cost: rough % slowdown (docs/plan.md)")
    return "\n".join(lines)


def render_plan(shape: ModelShape, cfg: Config, hw: Hardware) -> str:
    """The full `dtrain plan` report."""
    configured = Choice.from_config(cfg)
    estimates = plan_alternatives(shape, cfg, hw)
    own = next(e for e in estimates if e.choice == configured)
    best = cheapest_fit(estimates, hw)
    trained = strategies.get(cfg.strategy).plan_terms(shape, cfg).counts.trainable
    nvme = f", {format_bytes(hw.nvme_bytes)} NVMe per node" if hw.nvme_bytes is not None else ", NVMe not given"
    lines = [
        f"model      {cfg.model.path}: {shape.describe()}",
        f"trainable  {trained:,} ({100 * trained / shape.total_params:.3g} % of the base) with {cfg.strategy}",
        f"hardware   {hw.nodes} node(s) x {hw.gpus_per_node} GPU(s) = {hw.world_size} ranks; "
        f"{format_bytes(hw.gpu_mem_bytes)} per GPU, {format_bytes(hw.cpu_mem_bytes)} CPU RAM per node{nvme}",
        f"batch      {_batch_line(cfg, hw)}",
        "",
        f"as configured: {configured.describe()} (cost {configured.cost}, optimizer {own.optimizer})",
        render_breakdown(own, hw),
        f"verdict: {verdict(own, hw)}",
        f"cheapest that fits: {_best_line(best, configured)}",
        "",
        "alternatives (configured strategy first, then cheapest first):",
        render_alternatives(estimates, configured, best, hw),
    ]
    return "\n".join(lines)


def _batch_line(cfg: Config, hw: Hardware) -> str:
    micro = f"micro batch {cfg.train.micro_batch_size} x seq_len {cfg.data.seq_len} per GPU"
    try:
        layout = BatchLayout.from_config(cfg.train, hw.world_size)
    except ConfigError as e:
        return f"{micro}; {e.problems[0]}"
    return f"{micro}; global batch {layout.global_batch_size} (accumulation {layout.gradient_accumulation_steps})"


def _best_line(best: Estimate | None, configured: Choice) -> str:
    if best is None:
        return "none of the alternatives below fits this hardware"
    if best.choice == configured:
        return "the configuration as it is"
    return f"{best.choice.describe()} (cost {best.choice.cost} vs {configured.cost} as configured)"


# ---------------------------------------------------------------------------------------------------------------
# Entry points for the CLI (dtrain plan / check / submit)


def plan_command(
    cfg: Config,
    nodes: int,
    gpus_per_node: int,
    gpu_mem_bytes: int,
    cpu_mem_bytes: int,
    nvme_bytes: int | None = None,
) -> str:
    """Text printed by `dtrain plan CONFIG --nodes --gpus-per-node --gpu-mem --cpu-mem [--nvme]`."""
    hw = Hardware(nodes, gpus_per_node, gpu_mem_bytes, cpu_mem_bytes, nvme_bytes)
    return render_plan(load_model_shape(cfg.model.path), cfg, hw)


def fit_problems(cfg: Config, layout: BatchLayout, hardware: Hardware) -> list[str]:
    """Why the configured run cannot fit `hardware`; empty if it fits. For `dtrain check` / `dtrain submit`."""
    if layout.world_size != hardware.world_size:
        return [f"layout: {layout.world_size} ranks but the hardware has {hardware.world_size} GPUs"]
    try:
        shape = load_model_shape(cfg.model.path)
    except (OSError, ValueError, KeyError) as e:
        return [f"model.path: cannot estimate memory from {cfg.model.path}/config.json: {e}"]
    own = estimate(shape, cfg, Choice.from_config(cfg), hardware)
    problems = own.problems(hardware)
    if problems:
        best = cheapest_fit(plan_alternatives(shape, cfg, hardware), hardware)
        hint = best.choice.describe() if best else "nothing in the alternatives of `dtrain plan` fits"
        problems.append(f"cheapest configuration that fits: {hint} (see `dtrain plan`)")
    return problems
