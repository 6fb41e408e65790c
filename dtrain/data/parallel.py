"""Tokenizing rows in several processes with exactly the result of one.

Rows are cut into consecutive chunks in reading order; forked workers (they inherit the tokenizer, the chat template
and the row function, so nothing is pickled but rows and results) tokenize a chunk each, and `Pool.imap` hands the
results back in chunk order. Everything that depends on order (skip counts, the mixture, packing) then runs in the
parent exactly as with one process, so the samples are identical for any `data.num_proc`.
"""

from __future__ import annotations

import gc
import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

CHUNK_ROWS = 256  # large enough that pickling overhead stays small, small enough to keep both workers busy

_row_fn: Callable[[Any], Any] | None = None  # set in the parent right before the fork; workers inherit it


def default_num_proc() -> int:
    """The cores this process may run on (its affinity mask, e.g. a Slurm allocation), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def ordered_map(fn: Callable[[Any], Any], rows: Iterable[tuple[str, Any]], num_proc: int) -> Iterator[tuple[str, Any]]:
    """(where, fn(row)) for each (where, row), in input order, computed by `num_proc` processes."""
    if num_proc <= 1 or "fork" not in multiprocessing.get_all_start_methods() or _in_process_group():
        for where, row in rows:
            yield where, fn(row)
        return
    global _row_fn
    _row_fn = fn
    wheres: deque[list[str]] = deque()  # filled by imap's feeder thread; results come back in the same order

    def row_chunks() -> Iterator[list[Any]]:
        iterator = iter(rows)
        while chunk := list(itertools.islice(iterator, CHUNK_ROWS)):
            wheres.append([where for where, _ in chunk])
            yield [row for _, row in chunk]

    # Freeze the parent's objects out of the garbage collector's reach: a collection in a worker would otherwise
    # write to every inherited object and copy the whole parent heap, page by page (copy-on-write).
    gc.freeze()
    try:
        with multiprocessing.get_context("fork").Pool(num_proc, initializer=_one_thread_per_worker) as pool:
            for results in pool.imap(_apply_chunk, row_chunks()):
                yield from zip(wheres.popleft(), results, strict=True)
    finally:
        gc.unfreeze()


def _in_process_group() -> bool:
    """Inside a training rank (gloo/NCCL threads, the cache heartbeat, allocator background threads), a fork can copy
    a lock some other thread holds, and the worker waits on it forever: seen as a hung rank here. Ranks therefore
    tokenize in one process; `dtrain prepare` (no process group) fills the cache with `num_proc` workers ahead of a
    run, which is the way to tokenize a large corpus in parallel."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _one_thread_per_worker() -> None:
    # Each worker tokenizes one row at a time: the tokenizers library's own thread pool would only make the
    # workers compete for the same cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _apply_chunk(rows: list[Any]) -> list[Any]:
    return [_row_fn(row) for row in rows]
