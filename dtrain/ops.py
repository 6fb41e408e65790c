"""DeepSpeed's compiled ops: which ones a run loads, whether they are built for this machine type, and building them.

DeepSpeed from PyPI ships no compiled ops: each one is JIT-compiled with g++/ninja (nvcc for CUDA ops) the first
time a process loads it and cached in TORCH_EXTENSIONS_DIR (cpu_adam ~85 s, shm_comm ~60 s on a 2-core host). Left
to the ranks, every rank of every node of a production job compiles (or waits on the others' lock file) inside its
timed start-up. So the ops a config needs are built once, on a machine of the type the run will use:

    python -m dtrain.ops build CONFIG [key.sub=value ...]   # exactly the ops a run of CONFIG loads here
    python -m dtrain.ops build OP [OP ...]                  # by name: shm_comm cpu_adam fused_adam ...
    python -m dtrain.ops status CONFIG | OP ...

A build is only valid where it was made: cpu_adam is compiled with -march=native (the instruction sets of the CPU
that built it: SIGILL on an older CPU), CUDA ops for the GPUs that were visible, and everything against one torch,
CUDA and DeepSpeed install. torch's own cache key sees none of the CPU's part (same flags string, same folder), so
every process of dtrain uses a cache folder per machine type (`use_ops_cache`, called by dist.select_accelerator).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import MutableMapping
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
CACHE_ROOT_ENV = "DTRAIN_OPS_CACHE"
"""The folder holding one cache folder per machine type (default ~/.cache/dtrain-ops); it should be on storage the
nodes share, so that one build per machine type serves every node of that type."""
CPUINFO = Path("/proc/cpuinfo")
MACHINE_FILE = "machine.txt"  # in each cache folder: which machine type it is for, in words

# /proc/cpuinfo fields that say which CPU this is and which instruction sets it has (what gcc's -march=native
# compiles for): x86, then Arm. `bugs`, MHz and core counts do not change the code.
_CPU_FIELDS = ("vendor_id", "cpu family", "model", "model name", "flags",
               "CPU implementer", "CPU architecture", "CPU variant", "CPU part", "Features")  # fmt: skip
_SETS = ("flags", "Features")  # listed in any order


def needed_ops(cfg: Any, accelerator: str) -> list[str]:
    """The compiled ops a run of `cfg` loads on `accelerator` ("cpu" or "cuda"), in load order."""
    ds = cfg.deepspeed
    ops = []  # not shm_comm: only DeepSpeed's inference all-reduce loads it (dtrain.deepspeed_fixes)
    offloaded = ds.stage >= 1 and ds.offload_optimizer.device != "none"
    if OPTIMIZERS[cfg.train.optimizer].library == "deepspeed":
        # DeepSpeed's "AdamW" is DeepSpeedCPUAdam under optimizer offload, FusedAdam otherwise (engine.py,
        # get_optimizer_configuration).
        ops.append("cpu_adam" if offloaded else "fused_adam")
    if "nvme" in (ds.offload_optimizer.device, ds.offload_param.device):
        ops += ["pin_memory", "async_io"]
    return ops


# ---------------------------------------------------------------------------------------------------------------
# The machine type, and its cache folder


def cpu_type(cpuinfo: str) -> dict[str, str]:
    """The fields of /proc/cpuinfo's first processor that name the CPU and its instruction sets."""
    fields: dict[str, str] = {}
    for line in cpuinfo.strip().split("\n\n")[0].splitlines():
        key, sep, value = (part.strip() for part in line.partition(":"))
        if sep and key in _CPU_FIELDS:
            fields[key] = " ".join(sorted(value.split())) if key in _SETS else value
    return fields


def gpu_models(proc_gpus: Path = Path("/proc/driver/nvidia/gpus")) -> list[str]:
    """The NVIDIA GPUs the driver lists (CUDA ops are compiled for the visible GPUs' architecture). Read from /proc,
    not CUDA: initializing CUDA here would open a context on GPU 0 in every rank of the node."""
    models = []
    for info in sorted(proc_gpus.glob("*/information")):
        found = re.search(r"^Model:\s*(.+)$", info.read_text(errors="replace"), re.M)
        models.append(found.group(1).strip() if found else "unknown GPU")
    return models


@dataclass(frozen=True)
class MachineType:
    """What a compiled op depends on: CPU, GPUs, and the torch / CUDA / DeepSpeed install it is built against."""

    arch: str
    cpu: dict[str, str]
    gpus: tuple[str, ...]
    python: str
    torch: str
    cuda: str | None
    deepspeed: str
    """DeepSpeed's install folder: the op sources' path is in every compile command, so two venvs sharing one
    folder would rebuild each other's ops on every switch."""

    def key(self) -> str:
        """A folder name: the CPU model in words, then a hash of everything."""
        digest = hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:12]
        name = self.cpu.get("model name") or self.cpu.get("CPU part") or "cpu"
        return f"{self.arch}-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')[:40]}-{digest}"

    def describe(self) -> str:
        cpu = self.cpu.get("model name") or f"CPU part {self.cpu.get('CPU part', '?')}"
        gpus = f", {' + '.join(self.gpus)}" if self.gpus else ", no GPU"
        cuda = f"CUDA {self.cuda}" if self.cuda else "CPU build"
        return f"{self.arch} {cpu}{gpus}; python {self.python}, torch {self.torch} ({cuda}), deepspeed {self.deepspeed}"


def this_machine() -> MachineType:
    import torch

    cpuinfo = CPUINFO.read_text(errors="replace") if CPUINFO.exists() else ""
    spec = importlib.util.find_spec("deepspeed")
    return MachineType(
        arch=platform.machine(),
        cpu=cpu_type(cpuinfo),
        gpus=tuple(sorted(set(gpu_models()))),  # the models, not their count: a build serves any of them
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        deepspeed=str(Path(spec.origin).parent) if spec and spec.origin else "not installed",
    )


def cache_root(environ: MutableMapping[str, str] = os.environ) -> Path:
    return Path(environ.get(CACHE_ROOT_ENV) or Path.home() / ".cache" / "dtrain-ops")


def extensions_dir(environ: MutableMapping[str, str] = os.environ) -> Path:
    """Where this process builds and loads ops: TORCH_EXTENSIONS_DIR if the user set it, else this machine type's
    folder under the cache root."""
    if environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(environ["TORCH_EXTENSIONS_DIR"])
    return cache_root(environ) / this_machine().key()


def use_ops_cache(environ: MutableMapping[str, str] = os.environ) -> Path:
    """Point torch's extension cache (TORCH_EXTENSIONS_DIR) at this machine type's folder, unless the user set it.
    Every rank and `python -m dtrain.ops` call this before any op loads, so they agree on one folder per type."""
    environ["TORCH_EXTENSIONS_DIR"] = str(extensions_dir(environ))
    return Path(environ["TORCH_EXTENSIONS_DIR"])


# ---------------------------------------------------------------------------------------------------------------
# Status and build


@dataclass(frozen=True)
class OpStatus:
    name: str
    built: bool
    compatible: bool
    problem: str = ""
    """Why it cannot be built here (e.g. libaio-dev missing)."""
    lock: Path | None = None
    """torch's build lock, if one is there: a build in progress, or a killed one that every later load waits on."""
    elsewhere: tuple[str, ...] = ()
    """The other machine types (in words) whose cache folder holds this op."""

    def describe(self, needed_on: str | None = None) -> str:
        """One line; `needed_on`: the device kind of the ranks that load it, when that is not this machine's."""
        name = f"{self.name} ({needed_on} ranks)" if needed_on else self.name
        if self.built:
            return f"{name}: built for this machine type"
        if not self.compatible:
            return f"{name}: cannot be built here: {self.problem}"
        if self.lock is not None:
            return (
                f"{name}: NOT built, and {self.lock} exists: a build is running, or one was killed and every run "
                "would wait on that file forever (delete it if no build is running)"
            )
        line = (
            f"{name}: NOT built for this machine type: each rank would compile it at start (build it where the "
            "run runs: `python -m dtrain.ops build CONFIG`; on Slurm as a one-node job, slurm/README.md)"
        )
        return line + "".join(f"; built for {other}" for other in self.elsewhere)


def _builder(name: str):
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().create_op_builder(BUILDERS[name])


def op_status(name: str, folder: Path | None = None) -> OpStatus:
    """Is op `name` built in `folder` (default: this process's extensions_dir)?"""
    from deepspeed.git_version_info import installed_ops

    folder = extensions_dir() if folder is None else folder
    builder = _builder(name)
    if builder is None:
        return OpStatus(name, built=False, compatible=False, problem="no builder on this accelerator")
    if installed_ops.get(builder.NAME, False):  # precompiled into a DeepSpeed wheel (DS_BUILD_OPS=1)
        return OpStatus(name, built=True, compatible=True)
    if _built_in(folder, builder):
        return OpStatus(name, built=True, compatible=True)
    compatible = builder.is_compatible(verbose=False)
    problem = "" if compatible else _incompatible_reason(name)
    # torch's FileBaton: a plain file, no pid or flock; the builder waits while it exists
    lock = folder / builder.NAME / "lock"
    others = tuple(_machine_of(other) for other in _other_folders(folder) if _built_in(other, builder))
    return OpStatus(name, False, compatible, problem, lock if lock.exists() else None, others)


def _built_in(folder: Path, builder) -> bool:
    """The op's library is there and newer than its sources. A reinstalled DeepSpeed (same path, a new venv, an
    upgrade) has newer sources: ninja then rebuilds it in the first rank that loads it, so it is not built."""
    library = folder / builder.NAME / f"{builder.NAME}.so"
    if not library.is_file():
        return False
    sources = [Path(builder.deepspeed_src_path(source)) for source in builder.sources()]
    return all(library.stat().st_mtime >= source.stat().st_mtime for source in sources if source.exists())


def _other_folders(folder: Path) -> list[Path]:
    """The other machine types' folders next to this one (only when this one is under the cache root)."""
    if folder.parent != cache_root() or not folder.parent.is_dir():
        return []
    return sorted(p for p in folder.parent.iterdir() if p.is_dir() and p != folder)


def _machine_of(folder: Path) -> str:
    described = folder / MACHINE_FILE
    return described.read_text().strip() if described.is_file() else folder.name


def _incompatible_reason(name: str) -> str:
    if name == "async_io":
        return "libaio-dev is not installed (apt-get install libaio-dev; `make test-all` does it)"
    return "DeepSpeed reports it incompatible with this machine"


def build(names: list[str]) -> None:
    """Compile `names` into this machine type's folder (no-op for those already built)."""
    folder = extensions_dir()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MACHINE_FILE).write_text(this_machine().describe() + "\n")
    for name in names:
        _builder(name).load(verbose=False)
        print(f"{name}: built in {folder / _builder(name).NAME}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# CUDA toolkit versus torch's CUDA


def nvcc_release(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """The CUDA release of the nvcc that torch would compile with (CUDA_HOME's, else the one on PATH), e.g. "12.4"."""
    home = environ.get("CUDA_HOME") or environ.get("CUDA_PATH")
    nvcc = str(Path(home) / "bin" / "nvcc") if home else shutil.which("nvcc", path=environ.get("PATH"))
    if not nvcc or not Path(nvcc).is_file():
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else None


def cuda_mismatch(toolkit: str, torch_cuda: str) -> str | None:
    """Why CUDA `toolkit` cannot build ops for a torch built with CUDA `torch_cuda`; None when it can. DeepSpeed's
    op builder refuses another CUDA major (builder.py, assert_no_cuda_mismatch) and so does torch: every rank that
    compiles an op stops."""
    if toolkit.split(".")[0] == torch_cuda.split(".")[0]:
        return None
    return (
        f"CUDA {toolkit}, but torch was built for CUDA {torch_cuda}: DeepSpeed cannot compile its CUDA ops with it "
        f"and every rank that loads one stops; use CUDA {torch_cuda.split('.')[0]}.x or the torch wheel for CUDA "
        f"{toolkit.split('.')[0]}"
    )


# ---------------------------------------------------------------------------------------------------------------
# python -m dtrain.ops


def ops_of(targets: list[str], accelerator: str) -> list[str]:
    """Op names given as such, or the ops a run of CONFIG [overrides] loads on `accelerator`."""
    from dtrain.config import ConfigError, load_config

    if not targets:
        raise ConfigError(["give a run config (CONFIG [key.sub=value ...]) or op names: " + ", ".join(BUILDERS)])
    if targets[0] in BUILDERS:
        unknown = [t for t in targets if t not in BUILDERS]
        if unknown:
            raise ConfigError([f"{t}: not an op ({', '.join(BUILDERS)})" for t in unknown])
        return targets
    if not Path(targets[0]).is_file():
        raise ConfigError([f"{targets[0]}: neither an op ({', '.join(BUILDERS)}) nor a config file"])
    return needed_ops(load_config(targets[0], targets[1:], check_paths=False), accelerator)


def main(argv: list[str] | None = None) -> int:
    from dtrain.config import ConfigError
    from dtrain.dist import select_accelerator

    parser = argparse.ArgumentParser(prog="python -m dtrain.ops", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["build", "status"])
    parser.add_argument("targets", nargs="*", help=f"CONFIG [key.sub=value ...], or op names ({', '.join(BUILDERS)})")
    args = parser.parse_args(argv)
    accelerator = select_accelerator()  # also points TORCH_EXTENSIONS_DIR at this machine type's folder
    try:
        names = ops_of(args.targets, accelerator)
    except ConfigError as e:
        print(f"python -m dtrain.ops {args.action}: {e}", file=sys.stderr)
        return 2
    print(f"{accelerator} ops for {this_machine().describe()}: {extensions_dir()}", flush=True)
    statuses = [op_status(n) for n in names]
    if args.action == "status" or not names:
        print("\n".join(s.describe() for s in statuses) or "no compiled op needed")
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
