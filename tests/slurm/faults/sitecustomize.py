"""Test-only instrumentation of Slurm jobs: Python imports this at startup when this folder is on PYTHONPATH.

DTRAIN_TEST_CRASH=RANK:STEP makes rank RANK raise inside Trainer.train_step when it starts optimizer step STEP,
so a test can see what a real crash of one rank does to a job (the other ranks are then blocked in a collective).

DTRAIN_TEST_TIMELINE=1 makes every rank print `dtrain-timeline: EVENT TIME` (wall clock, seconds) at each phase of
a stop: signal received, stop agreed at a step boundary, save begun, fsync of its own files, all shards written
(rank 0, after the barrier), folders synced and renamed, prune (in the step path), save done, requeue asked
(rank 0), and the checkpoint loaded after the requeue.

DTRAIN_TEST_STALE_VIEW=1 makes the ranks of every node but the first see the checkpoint folder without its newest
checkpoint, as a network file system's attribute cache can for seconds after a quick requeue.

Nothing happens without the variables.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys
import time


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs patch(module) right after `name` is first imported."""

    def __init__(self, name: str, patch):
        self.name, self.patch = name, patch

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        sys.meta_path.remove(self)  # find the real spec, once
        spec = importlib.util.find_spec(name)
        exec_module, patch = spec.loader.exec_module, self.patch

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def _crash(rank: int, step: int):
    def patch(module):
        train_step = module.Trainer.train_step

        def crashing_train_step(trainer, samples_seen):
            if trainer.env.rank == rank and samples_seen // trainer.layout.global_batch_size + 1 == step:
                raise RuntimeError(f"injected crash on rank {rank} at step {step}")
            return train_step(trainer, samples_seen)

        module.Trainer.train_step = crashing_train_step

    return patch


def _stale_view(module):
    complete_checkpoints = module.complete_checkpoints
    module.complete_checkpoints = lambda directory: complete_checkpoints(directory)[:-1]


def _mark(event: str) -> None:
    print(f"dtrain-timeline: {event} {time.time():.3f}", flush=True)


def _timed(owner, attribute: str, before: str | None, after: str | None, when=lambda result: True) -> None:
    original = getattr(owner, attribute)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if before:
            _mark(before)
        result = original(*args, **kwargs)
        if after and when(result):
            _mark(after)
        return result

    setattr(owner, attribute, wrapper)


def _timeline_checkpoint(module):
    _timed(module.Checkpointer, "save", "save-begin", "save-done")
    _timed(module.Checkpointer, "_publish", "shards-written", None)  # each rank wrote and synced its own files
    _timed(module, "_fsync_dir", None, "renamed")  # _publish: the folders, rename, then the parent
    _timed(module.Checkpointer, "_prune", "prune-begin", "prune-done")
    _timed(module.Checkpointer, "load", None, "resumed")


def _timeline_preemption(module):
    _timed(module.StopFlag, "_handle", "signal", None)
    _timed(module.StopFlag, "agree", None, "stop-agreed", when=bool)


def _timeline_submitit(module):
    _timed(module.SlurmJobEnvironment, "_requeue", "requeue-asked", "requeue-done")


if os.environ.get("DTRAIN_TEST_CRASH"):
    _rank, _step = (int(x) for x in os.environ["DTRAIN_TEST_CRASH"].split(":"))
    sys.meta_path.insert(0, _PatchOnImport("dtrain.trainer", _crash(_rank, _step)))
if os.environ.get("DTRAIN_TEST_STALE_VIEW") and os.environ.get("SLURM_NODEID", "0") != "0":
    sys.meta_path.insert(0, _PatchOnImport("dtrain.resume", _stale_view))
if os.environ.get("DTRAIN_TEST_TIMELINE"):
    for _name, _patch in [("dtrain.checkpoint", _timeline_checkpoint), ("dtrain.preemption", _timeline_preemption),
                          ("submitit.slurm.slurm", _timeline_submitit)]:  # fmt: skip
        sys.meta_path.insert(0, _PatchOnImport(_name, _patch))
