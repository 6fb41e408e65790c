"""Chunked vs plain loss under real ZeRO-3 partitioning, for tests/test_loss.py.

    torchrun --standalone --nproc_per_node 2 tests/loss_zero3_worker.py OUT_DIR

For untied and tied embeddings: a tiny Llama built under zero.Init (every parameter partitioned), one forward +
backward of the same packed batch per rank with the plain and with the chunked loss; writes OUT_DIR/rank<R>.pt with
both losses and the full gradients that DeepSpeed assembled from the partitions.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

import torch

from tests.test_loss import TOKENS, packed_batch

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 10_000,
                          "stage3_prefetch_bucket_size": 10_000, "stage3_max_live_parameters": 100_000},
    "zero_allow_untested_optimizer": True,
    "zero_force_ds_cpu_optimizer": False,
}  # fmt: skip


def loss_and_grads(tied: bool, chunked: bool) -> tuple[float, dict[str, torch.Tensor]]:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from transformers.integrations import HfDeepSpeedConfig

    from dtrain.loss import install_chunked_loss
    from tests.test_loss import tiny_llama

    keepalive = HfDeepSpeedConfig(DS_CONFIG)  # noqa: F841 - transformers builds under zero.Init while this lives
    model = tiny_llama(tie_word_embeddings=tied)
    if chunked:
        assert install_chunked_loss(model, TOKENS) > 1
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=DS_CONFIG)
    assert all(p.ds_tensor.numel() < p.ds_numel for p in engine.module.parameters() if p.ds_numel > 64)
    batch = packed_batch()
    loss = engine(**batch, num_items_in_batch=torch.tensor(77.0)).loss
    engine.backward(loss)
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    engine.destroy()
    return loss.item(), grads


def main() -> None:
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    result = {}
    for tied in (False, True):
        for chunked in (False, True):
            result[(tied, chunked)] = loss_and_grads(tied, chunked)
    torch.save(result, Path(sys.argv[1]) / f"rank{torch.distributed.get_rank()}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
