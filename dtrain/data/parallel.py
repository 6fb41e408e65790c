"""Tokenizing rows in several processes with exactly the result of one.

Rows are cut into consecutive chunks in reading order; worker processes tokenize a chunk each, and `Pool.imap` hands
the results back in chunk order. Everything that depends on order (skip counts, the mixture, packing) then runs in the
parent exactly as with one process, so the samples are identical for any `data.num_proc`.

Workers are forked from the caller where that is safe (`dtrain prepare`: one thread), so they inherit the tokenizer
and the row function. Inside a training rank they are forked from a forkserver instead: a rank has other threads
(gloo/NCCL, the cache heartbeat, allocator background threads), and a fork can copy a lock one of them holds, leaving
the worker waiting on it forever (seen as a hung rank here). The forkserver is a fresh single-threaded interpreter;
the row function (tokenizer included) is pickled to each worker once.
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
# Tokenized in the calling process before workers start from a forkserver: that costs ~2 s (each worker imports
# transformers to unpickle the tokenizer), which pays off only beyond about this many rows (~1 ms each). Forked
# workers start in milliseconds and take every row.
SERIAL_ROWS = 2000

_row_fn: Callable[[Any], Any] | None = None  # each worker's, set by _start_worker


def default_num_proc() -> int:
    """The cores this process may run on (its affinity mask, e.g. a Slurm allocation), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def ordered_map(fn: Callable[[Any], Any], rows: Iterable[tuple[str, Any]], num_proc: int) -> Iterator[tuple[str, Any]]:
    """(where, fn(row)) for each (where, row), in input order, computed by `num_proc` processes."""
    context = _context() if num_proc > 1 else None
    if context is None:
        serial = None  # every row here
    else:
        serial = SERIAL_ROWS if context.get_start_method() == "forkserver" else 0
    iterator = iter(rows)
    for where, row in itertools.islice(iterator, serial):
        yield where, fn(row)
    first = next(iterator, None)
    if first is None:
        return
    rest = itertools.chain([first], iterator)
    wheres: deque[list[str]] = deque()  # filled by imap's feeder thread; results come back in the same order

    def row_chunks() -> Iterator[list[Any]]:
        while chunk := list(itertools.islice(rest, CHUNK_ROWS)):
            wheres.append([where for where, _ in chunk])
            yield [row for _, row in chunk]

    # Freeze the parent's objects out of the garbage collector's reach: a collection in a forked worker would
    # otherwise write to every inherited object and copy the whole parent heap, page by page (copy-on-write).
    gc.freeze()
    try:
        with context.Pool(num_proc, initializer=_start_worker, initargs=(fn,)) as pool:
            for results in pool.imap(_apply_chunk, row_chunks()):
                yield from zip(wheres.popleft(), results, strict=True)
    finally:
        gc.unfreeze()


def _context() -> multiprocessing.context.BaseContext | None:
    """fork where this process has one thread, a forkserver in a rank; None where neither exists (one process)."""
    import torch.distributed as dist

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return multiprocessing.get_context("fork")
    context = multiprocessing.get_context("forkserver")
    # Not the default ["__main__"]: a rank's main module need not be importable a second time.
    context.set_forkserver_preload(["dtrain.data.prepare"])
    return context


def _start_worker(fn: Callable[[Any], Any]) -> None:
    global _row_fn
    _row_fn = fn
    # Each worker tokenizes one row at a time: the tokenizers library's own thread pool would only make the
    # workers compete for the same cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _apply_chunk(rows: list[Any]) -> list[Any]:
    return [_row_fn(row) for row in rows]
