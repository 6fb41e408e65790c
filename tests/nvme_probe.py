"""torchrun --standalone --nproc_per_node N -m tests.nvme_probe OUT --optimizer cpu|nvme [--param none|cpu|nvme]
    [--nvme DIR] [--steps 2] [--adam torch|deepspeed] [--precision bf16|fp32] [--unfixed]

A bare DeepSpeed ZeRO-3 run (no dtrain trainer) of a tiny Llama whose embedding and lm_head (8192 x 128) are the
only tensors above DeepSpeed's 1 MiB swap minimum, with the optimizer offloaded to CPU or to NVMe (a folder). Around
every optimizer step of every sub-group it records the fp32 master partition before and after, the gradient the
optimizer sees (after unscale and clipping) and the Adam moments after; rank r writes OUT/rank{r}.pt with those and
the loss of each step. `--unfixed` leaves out dtrain's fixes of NVMe optimizer offload (dtrain.nvme_optimizer).
Comparing a CPU run's files with an NVMe run's shows the first tensor that differs:

    python -m tests.nvme_probe compare OUT_A OUT_B
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


def ds_config(args) -> dict:
    zero = {
        "stage": 3,
        "reduce_bucket_size": 100_000,
        "stage3_prefetch_bucket_size": 100_000,
        "stage3_param_persistence_threshold": 0,
        "stage3_max_live_parameters": 1_000_000,
        "contiguous_gradients": True,
        "offload_optimizer": {"device": args.optimizer, "pin_memory": False},
    }
    if args.optimizer == "nvme":
        zero["offload_optimizer"]["nvme_path"] = str(args.nvme)
    if args.param != "none":
        zero["offload_param"] = {"device": args.param, "pin_memory": False}
        if args.param == "nvme":
            zero["offload_param"].update(nvme_path=str(args.nvme), buffer_size=8192 * 128, buffer_count=5)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": args.precision == "bf16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
    }
    if args.precision == "bf16":
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if "nvme" in (args.optimizer, args.param):
        config["aio"] = {"block_size": 1_048_576, "queue_depth": 8, "intra_op_parallelism": 1,
                         "single_submit": False, "overlap_events": True}  # fmt: skip
    if args.adam == "deepspeed":
        config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0}}
    return config


def record_steps(optimizer, records: dict, step: list[int]) -> None:
    """Wrap ZeRO-3's per-sub-group optimizer step so each call records what went in and what came out."""
    inner = optimizer._optimizer_step

    def recorded(sub_group_id):
        fp32 = optimizer.fp32_partitioned_groups_flat[sub_group_id]
        record = {"param_before": fp32.detach().clone(), "grad": fp32.grad.detach().clone()}
        inner(sub_group_id)
        record["param_after"] = fp32.detach().clone()
        for name, value in optimizer.optimizer.state[fp32].items():
            if torch.is_tensor(value) and value.numel() > 1:
                record[name] = value.detach().clone()
        records[(step[0], sub_group_id)] = record

    optimizer._optimizer_step = recorded


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--optimizer", choices=["cpu", "nvme"], required=True)
    parser.add_argument("--param", choices=["none", "cpu", "nvme"], default="none")
    parser.add_argument("--nvme", type=Path)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--adam", choices=["torch", "deepspeed"], default="torch")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--unfixed", action="store_true")
    parser.add_argument("--save", type=Path, help="checkpoint folder written after the last step")
    parser.add_argument("--load", type=Path, help="checkpoint folder loaded before the first step")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)

    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    from dtrain.nvme_optimizer import load_swapped_optimizer_state, read_swapped_gradients_whole

    if not args.unfixed:
        read_swapped_gradients_whole()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    config = LlamaConfig(vocab_size=8192, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
    # two parameter groups, as dtrain builds them (dtrain.optim: norms apart), so ZeRO makes two sub-groups
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    rest = [p for n, p in model.named_parameters() if "norm" not in n]
    groups = [{"params": rest, "weight_decay": 0.0}, {"params": norms, "weight_decay": 0.0}]
    client_optimizer = torch.optim.AdamW(groups, lr=1e-3) if args.adam == "torch" else None
    engine, *_ = deepspeed.initialize(model=model, optimizer=client_optimizer, config=ds_config(args))
    records: dict = {}
    step = [0]
    record_steps(engine.optimizer, records, step)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 8192, (world, 2, 64), generator=generator)[rank] for _ in range(args.steps)]
    losses = []
    first = 1
    if args.load:
        engine.load_checkpoint(str(args.load), tag="probe")
        first = engine.global_steps + 1
        if not args.unfixed:
            load_swapped_optimizer_state(engine, args.load, "probe")
        batches = batches[engine.global_steps :]
    for step[0], input_ids in enumerate(batches, start=first):
        loss = engine(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    if args.save:
        engine.save_checkpoint(str(args.save), tag="probe")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({"losses": losses, "steps": records}, args.out / f"rank{rank}.pt")
    if rank == 0:
        print(f"losses {losses}")
    engine.destroy()
    torch.distributed.destroy_process_group()


def differences(a: Path, b: Path) -> list[str]:
    """Per rank, step and sub-group: each recorded tensor's largest absolute difference between two runs, in the
    order they arise (master before the step, gradient, moments, master after)."""
    lines = []
    for path_a in sorted(a.glob("rank*.pt")):
        run_a, run_b = torch.load(path_a), torch.load(b / path_a.name)
        lines.append(f"{path_a.stem}: losses {run_a['losses']} vs {run_b['losses']}")
        for key in sorted(run_a["steps"]):
            rec_a, rec_b = run_a["steps"][key], run_b["steps"][key]
            for name in ("param_before", "grad", "exp_avg", "exp_avg_sq", "param_after"):
                if name not in rec_a:
                    continue
                x, y = rec_a[name].float(), rec_b[name].float()
                diff = (x - y).abs()
                where = diff.nonzero()
                first = (
                    f", first at {where[0].item()} of {x.numel()} ({int((diff > 0).sum())} differ)"
                    if len(where)
                    else ""
                )
                lines.append(f"  step {key[0]} sub-group {key[1]} {name:<12} max|diff| {diff.max().item():.3e}{first}")
    return lines


if __name__ == "__main__":
    import sys

    if sys.argv[1] == "compare":
        print("\n".join(differences(Path(sys.argv[2]), Path(sys.argv[3]))))
    else:
        main()
