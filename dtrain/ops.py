"""DeepSpeed's compiled ops: which ones a run loads, whether they are built, and building them once.

DeepSpeed from PyPI ships no compiled ops: each one is JIT-compiled with g++/ninja the first time a process loads it
and cached in TORCH_EXTENSIONS_DIR (cpu_adam ~85 s, shm_comm ~60 s on a 2-core host). Left to the ranks, every rank
of every node of a production job compiles (or waits on the others' lock file) inside its timed start-up. So the
setup builds them once (`python -m dtrain.ops build`, run by `make setup`), and `dtrain check` reports which ops a
run needs and whether they are built.

    python -m dtrain.ops build [OP ...]     # default: every op a run on this machine can need
    python -m dtrain.ops status
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtrain.tables import OPTIMIZERS

# op name -> DeepSpeed builder class name, looked up through the accelerator (CPU and CUDA builders differ).
BUILDERS = {
    "shm_comm": "ShareMemCommBuilder",
    "cpu_adam": "CPUAdamBuilder",
    "fused_adam": "FusedAdamBuilder",
    "pin_memory": "PinMemoryBuilder",
    "async_io": "AsyncIOBuilder",
}


def needed_ops(cfg: Any, accelerator: str) -> list[str]:
    """The compiled ops a run of `cfg` loads on `accelerator` ("cpu" or "cuda"), in load order."""
    ds = cfg.deepspeed
    ops = ["shm_comm"] if accelerator == "cpu" else []
    offloaded = ds.stage >= 1 and ds.offload_optimizer.device != "none"
    if OPTIMIZERS[cfg.train.optimizer].library == "deepspeed":
        # DeepSpeed's "AdamW" is DeepSpeedCPUAdam under optimizer offload, FusedAdam otherwise (engine.py,
        # get_optimizer_configuration).
        ops.append("cpu_adam" if offloaded else "fused_adam")
    if "nvme" in (ds.offload_optimizer.device, ds.offload_param.device):
        ops += ["pin_memory", "async_io"]
    return ops


@dataclass(frozen=True)
class OpStatus:
    name: str
    built: bool
    compatible: bool
    problem: str = ""
    """Why it cannot be built here (e.g. libaio-dev missing)."""
    lock: Path | None = None
    """torch's build lock, if one is there: a build in progress, or a killed one that every later load waits on."""

    def describe(self) -> str:
        if self.built:
            return f"{self.name}: built"
        if not self.compatible:
            return f"{self.name}: cannot be built here: {self.problem}"
        if self.lock is not None:
            return (
                f"{self.name}: NOT built, and {self.lock} exists: a build is running, or one was killed and every run "
                "would wait on that file forever (delete it if no build is running)"
            )
        return f"{self.name}: NOT built: each rank would compile it at start (run `make setup`)"


def extensions_dir() -> Path:
    """Where torch caches JIT-built extensions (TORCH_EXTENSIONS_DIR or its per-python/per-CUDA default)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory("", verbose=False))


def _builder(name: str):
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().create_op_builder(BUILDERS[name])


def default_ops(accelerator: str) -> list[str]:
    """What `make setup` builds: the ops of the production configs (CPU Adam under offload, NVMe offload), plus
    shm_comm on CPU. fused_adam (adamw_deepspeed without offload) is built on demand: `build fused_adam`."""
    return (["shm_comm"] if accelerator == "cpu" else []) + ["cpu_adam", "pin_memory", "async_io"]


def op_status(name: str) -> OpStatus:
    from deepspeed.git_version_info import installed_ops

    builder = _builder(name)
    if builder is None:
        return OpStatus(name, built=False, compatible=False, problem="no builder on this accelerator")
    if installed_ops.get(builder.NAME, False):  # precompiled into a DeepSpeed wheel (DS_BUILD_OPS=1)
        return OpStatus(name, built=True, compatible=True)
    folder = extensions_dir() / builder.NAME
    if (folder / f"{builder.NAME}.so").is_file():
        return OpStatus(name, built=True, compatible=True)
    compatible = builder.is_compatible(verbose=False)
    problem = "" if compatible else _incompatible_reason(name)
    # torch's FileBaton: a plain file, no pid or flock; the builder waits while it exists
    lock = folder / "lock"
    return OpStatus(name, built=False, compatible=compatible, problem=problem, lock=lock if lock.exists() else None)


def _incompatible_reason(name: str) -> str:
    if name == "async_io":
        return "libaio-dev is not installed (apt-get install libaio-dev; `make setup` does it)"
    return "DeepSpeed reports it incompatible with this machine"


def build(names: list[str]) -> None:
    """Compile `names` into the extensions cache (no-op for those already built)."""
    for name in names:
        _builder(name).load(verbose=False)
        print(f"{name}: built in {extensions_dir() / _builder(name).NAME}", flush=True)


def main(argv: list[str] | None = None) -> int:
    from dtrain.dist import select_accelerator

    parser = argparse.ArgumentParser(prog="python -m dtrain.ops", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["build", "status"])
    parser.add_argument("ops", nargs="*", help=f"ops (default: every op a run here may need: {', '.join(BUILDERS)})")
    args = parser.parse_args(argv)
    accelerator = select_accelerator()
    names = args.ops or default_ops(accelerator)
    statuses = [op_status(n) for n in names]
    if args.action == "status":
        print("\n".join(s.describe() for s in statuses))
        return 0 if all(s.built for s in statuses) else 1
    missing = [s for s in statuses if not s.compatible]
    if missing:
        print("\n".join(s.describe() for s in missing), file=sys.stderr)
        return 1
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))  # ninja's parallel compile jobs
    for locked in (s for s in statuses if s.lock is not None):
        print(locked.describe(), file=sys.stderr, flush=True)  # before build() waits on it
    build([s.name for s in statuses if not s.built])
    return 0


if __name__ == "__main__":
    sys.exit(main())
