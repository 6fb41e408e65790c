"""Token-mean loss of a model over prepared samples: the one eval computation, used by the trainer (the task eval
split and eval.retention's sets) and by `dtrain eval` (one process, no process group).

The loss is the sum of every labelled token's cross-entropy divided by their count over the whole set, whatever the
split among ranks and micro batches: the model is called with `num_items_in_batch=1` so it returns the sum (the
same forward as training, chunked where dtrain.loss installed it), and the sums and counts are added up across
ranks once at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from dtrain.data.formats import IGNORE

Rows = list[dict[str, list[int]]]


def eval_batches(num_samples: int, rank: int, world_size: int, micro_batch_size: int,
                 max_batches: int | None = None) -> list[list[int]]:  # fmt: skip
    """The sample indices of each of this rank's eval micro batches. Every rank gets the same number of batches,
    even when the last round does not reach all of them: under ZeRO-3 a forward gathers parameters collectively, so
    a rank that stopped early would hang the others. A rank with nothing left in a round gets an empty list (it runs
    a forward with no labels). `max_batches` caps the batches per rank."""
    rounds = math.ceil(num_samples / (world_size * micro_batch_size))
    if max_batches:
        rounds = min(rounds, max_batches)
    batches = []
    for round_index in range(rounds):
        start = (round_index * world_size + rank) * micro_batch_size
        batches.append(list(range(start, min(start + micro_batch_size, num_samples))))
    return batches


def one_process_batches(num_samples: int, micro_batch_size: int, max_batches: int | None,
                        world_size: int) -> list[list[int]]:  # fmt: skip
    """The samples that `world_size` ranks evaluate under `eval_batches` (the first max_batches rounds of
    world_size x micro_batch_size), as one process's micro batches: the same set, so the same token-mean loss."""
    return eval_batches(num_samples, 0, 1, micro_batch_size, max_batches * world_size if max_batches else None)


@torch.no_grad()
def token_mean_loss(
    model: torch.nn.Module,
    samples: Any,
    batches: list[list[int]],
    to_batch: Callable[[Rows], dict[str, Any]],
    device: torch.device,
) -> float:
    """Mean loss per labelled token over `batches` of `samples` (indices from `eval_batches`), summed over every
    rank of the process group when there is one; `to_batch` collates rows into the model's keyword arguments on
    `device`. The caller puts the model in eval mode."""
    totals = torch.zeros(2, device=device)
    one = torch.tensor(1.0, device=device)
    for indices in batches:
        rows = [samples[i] for i in indices] or [_unlabelled(samples[0])]
        batch = to_batch(rows)
        totals[0] += model(**batch, num_items_in_batch=one).loss.float()
        totals[1] += (batch["labels"][:, 1:] != IGNORE).sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


def _unlabelled(row: dict[str, list[int]]) -> dict[str, list[int]]:
    return {**row, "labels": [IGNORE] * len(row["labels"])}
