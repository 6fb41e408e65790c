"""Test-only fault injection for Slurm jobs: Python imports this at startup when this folder is on PYTHONPATH.

DTRAIN_TEST_CRASH=RANK:STEP makes rank RANK raise inside Trainer.train_step when it starts optimizer step STEP,
so a test can see what a real crash of one rank does to a job (the other ranks are then blocked in a collective).
Nothing happens without the variable.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys


class _PatchTrainerOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def find_spec(self, name, path=None, target=None):
        if name != "dtrain.trainer":
            return None
        sys.meta_path.remove(self)  # find the real spec, once
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module
        rank, step = self.rank, self.step

        def exec_and_patch(module):
            exec_module(module)
            train_step = module.Trainer.train_step

            def crashing_train_step(trainer, samples_seen):
                if trainer.env.rank == rank and samples_seen // trainer.layout.global_batch_size + 1 == step:
                    raise RuntimeError(f"injected crash on rank {rank} at step {step}")
                return train_step(trainer, samples_seen)

            module.Trainer.train_step = crashing_train_step

        spec.loader.exec_module = exec_and_patch
        return spec


if os.environ.get("DTRAIN_TEST_CRASH"):
    _rank, _step = (int(x) for x in os.environ["DTRAIN_TEST_CRASH"].split(":"))
    sys.meta_path.insert(0, _PatchTrainerOnImport(_rank, _step))
