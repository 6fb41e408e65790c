"""DeepSpeed's compiled ops: one cache folder per machine type, `python -m dtrain.ops build CONFIG` builds exactly
what a run loads, and `dtrain check` / `dtrain submit` say what is built where and refuse a CUDA that cannot build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import _get_build_directory

from dtrain import ops
from dtrain.dist import select_accelerator
from tests.helpers import REPO, run_dtrain, write_config

# /proc/cpuinfo of one processor, shortened (a Sapphire Rapids Xeon)
XEON_8480 = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
cpu MHz\t\t: 2000.000
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_tile amx_bf16
bugs\t\t: spectre_v1

processor\t: 1
vendor_id\t: GenuineIntel
"""
# the previous generation (Ice Lake): no AMX, no AVX512-BF16
XEON_8380 = (
    XEON_8480.replace("model\t\t: 143", "model\t\t: 106")
    .replace("Platinum 8480+", "Platinum 8380")
    .replace(" avx512_bf16 amx_tile amx_bf16", "")
)
# the same CPU model in a VM that hides AMX
XEON_8480_NO_AMX = XEON_8480.replace(" amx_tile amx_bf16", "")
# the same CPU, another clock and flag order, another bug list: the same code compiles
XEON_8480_AGAIN = (
    XEON_8480.replace("2000.000", "3800.000")
    .replace("fpu sse sse2", "sse2 fpu sse")
    .replace("spectre_v1", "spectre_v1 spectre_v2")
)


def extensions_dir_on(cpuinfo: str, tmp_path, monkeypatch):
    """Where a rank (dist.select_accelerator) on a machine with this /proc/cpuinfo has torch build its ops."""
    path = tmp_path / f"cpuinfo-{abs(hash(cpuinfo))}"
    path.write_text(cpuinfo)
    monkeypatch.setattr(ops, "CPUINFO", path, raising=False)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("DTRAIN_OPS_CACHE", str(tmp_path / "cache"))
    select_accelerator()
    return Path(_get_build_directory("", verbose=False))  # torch's own answer, as its JIT loader asks it


def test_ops_cache_is_per_cpu_type(tmp_path, monkeypatch):
    """cpu_adam is compiled with -march=native: one built on a newer CPU dies of SIGILL on an older one, so the
    folder torch builds and loads ops in must differ with the CPU model and its instruction sets."""
    sapphire = extensions_dir_on(XEON_8480, tmp_path, monkeypatch)
    assert extensions_dir_on(XEON_8380, tmp_path, monkeypatch) != sapphire
    assert extensions_dir_on(XEON_8480_NO_AMX, tmp_path, monkeypatch) != sapphire
    assert extensions_dir_on(XEON_8480_AGAIN, tmp_path, monkeypatch) == sapphire  # a second node of the same type
    assert sapphire.parent == tmp_path / "cache" and sapphire.name.startswith("x86_64-intel-r-xeon-r-platinum-8480-")


def test_a_torch_extensions_dir_the_user_set_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    select_accelerator()
    assert Path(_get_build_directory("", verbose=False)) == tmp_path / "mine"


def test_cache_key_reads_cpu_and_gpus_from_the_kernel(tmp_path):
    assert ops.cpu_type(XEON_8480)["flags"] == "amx_bf16 amx_tile avx avx2 avx512_bf16 avx512bw avx512f fpu sse sse2"
    assert "bugs" not in ops.cpu_type(XEON_8480) and "cpu MHz" not in ops.cpu_type(XEON_8480)
    gpu = tmp_path / "0000:18:00.0"
    gpu.mkdir()
    (gpu / "information").write_text("Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   123\n")
    assert ops.gpu_models(tmp_path) == ["NVIDIA H100 80GB HBM3"]


def built_shm_comm(tmp_path):
    """A fresh extensions folder holding only a copy of this machine's built shm_comm (built here if needed)."""
    builder = ops._builder("shm_comm")
    if not ops.op_status("shm_comm").built:
        ops.build(["shm_comm"])
    folder = tmp_path / "extensions"
    shutil.copytree(ops.extensions_dir() / builder.NAME, folder / builder.NAME)  # mtimes kept: ninja sees it built
    return folder


def run_ops(*args: str, extensions) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dtrain.ops", *args], capture_output=True, text=True, cwd=REPO, timeout=600,
        env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)},
    )  # fmt: skip


def test_build_config_builds_exactly_the_ops_it_loads(tmp_path, tiny_model):
    """The demo config loads no op (torch AdamW on CPU, and shm_comm is skipped): `build CONFIG` leaves cpu_adam,
    async_io and pin_memory unbuilt; `status CONFIG override` reports those an override adds."""
    extensions = built_shm_comm(tmp_path)
    config = write_config(tmp_path / "cfg.yaml", tiny_model)
    built = run_ops("build", str(config), extensions=extensions)
    assert built.returncode == 0, built.stderr[-3000:]
    assert sorted(p.name for p in extensions.iterdir() if p.is_dir()) == [ops._builder("shm_comm").NAME]
    status = run_ops("status", str(config), "train.optimizer=adamw_deepspeed", extensions=extensions)
    assert status.returncode == 1, status.stderr[-3000:]
    lines = status.stdout.splitlines()[1:]
    assert lines[0].startswith("cpu_adam: NOT built for this machine type") and len(lines) == 1
    wrong = run_ops("build", str(tmp_path / "missing.yaml"), extensions=extensions)
    assert wrong.returncode == 2 and "missing.yaml: neither an op" in wrong.stderr and "Traceback" not in wrong.stderr


def test_a_build_older_than_the_installed_sources_is_not_built(tmp_path):
    """A venv recreated at the same path (a fresh clone's second `make demo`) has the same cache folder but newer
    DeepSpeed sources: ninja rebuilds the op in the ranks, so status and build must not take it as built."""
    extensions = built_shm_comm(tmp_path)
    builder = ops._builder("shm_comm")
    assert ops.op_status("shm_comm", extensions).built
    library = extensions / builder.NAME / f"{builder.NAME}.so"
    os.utime(library, (0, 0))  # built before the sources were installed
    assert not ops.op_status("shm_comm", extensions).built


def check_lines(*args: str) -> list[str]:
    out = run_dtrain("check", *args, in_process=True).stdout.splitlines()
    start = next(i for i, line in enumerate(out) if line.startswith("  ds ops"))
    return [line[15:] for line in out[start:] if line.startswith(("  ds ops", "               "))][:3]


def test_check_says_which_ops_the_gpu_ranks_need_and_for_which_machine_types_they_are_built(
    tmp_path, tiny_model, monkeypatch
):
    """On a login node: cpu_adam for the GPU ranks is not built for this machine type, but the shared cache
    holds a build for the compute nodes' type, and check names it."""
    root = tmp_path / "cache"
    compute_nodes = root / "x86_64-intel-r-xeon-r-platinum-8480-0123456789ab"
    (compute_nodes / "cpu_adam").mkdir(parents=True)
    (compute_nodes / "cpu_adam" / "cpu_adam.so").write_bytes(b"")
    (compute_nodes / ops.MACHINE_FILE).write_text("x86_64 Intel(R) Xeon(R) Platinum 8480+, 8 x NVIDIA H100\n")
    monkeypatch.setenv("DTRAIN_OPS_CACHE", str(root))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    config = write_config(tmp_path / "cfg.yaml", tiny_model, **{"train.optimizer": "adamw_deepspeed"})
    cpu_adam, machine = check_lines(str(config), "--gpus-per-node", "8", "--gpu-mem", "80GB", "--cpu-mem", "1TB")[:2]
    assert cpu_adam.startswith("cpu_adam (cuda ranks): NOT built for this machine type"), cpu_adam
    assert cpu_adam.endswith("; built for x86_64 Intel(R) Xeon(R) Platinum 8480+, 8 x NVIDIA H100"), cpu_adam
    assert machine.startswith(f"this machine type: {ops.this_machine().describe()}; cache {root}"), machine


@pytest.fixture
def nvcc(tmp_path, monkeypatch):
    """nvcc(release): an nvcc of that CUDA release first on PATH, and a torch built for CUDA 12.4."""
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)

    def install(release: str) -> None:
        bin_dir = tmp_path / "cuda" / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        fake = bin_dir / "nvcc"
        fake.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.89'\n")
        fake.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")

    return install


def test_check_refuses_an_nvcc_of_another_cuda_major(tmp_path, tiny_model, nvcc):
    config = write_config(tmp_path / "cfg.yaml", tiny_model)
    nvcc("11.8")
    refused = run_dtrain("check", str(config), in_process=True, check=False)
    assert refused.returncode == 2, refused.stdout
    assert "nvcc on this machine: CUDA 11.8, but torch was built for CUDA 12.4" in refused.stderr, refused.stderr
    nvcc("12.2")  # another minor of the same major builds (DeepSpeed accepts 12.x with 12.y)
    assert run_dtrain("check", str(config), in_process=True, check=False).returncode == 0


def test_submit_refuses_a_profile_that_loads_another_cuda_major(tmp_path, tiny_model, nvcc, monkeypatch):
    config = write_config(tmp_path / "cfg.yaml", tiny_model, **{"train.optimizer": "adamw_deepspeed"})
    h100 = (REPO / "slurm" / "clusters" / "h100.yaml").read_text()
    assert "module load cuda/12.4" in h100
    profile = tmp_path / "old-cuda.yaml"
    profile.write_text(h100.replace("module load cuda/12.4", "module load gcc/12 cuda/11.8"))
    refused = run_dtrain("submit", str(config), "--cluster", str(profile), "--dry-run", in_process=True, check=False)
    assert refused.returncode == 2, refused.stdout
    assert f"in {profile}" in refused.stderr and "torch was built for CUDA 12.4" in refused.stderr
    assert "setup: `module load gcc/12 cuda/11.8`: CUDA 11.8" in refused.stderr, refused.stderr
    # sbatch exports the submitting environment to the job: the login node's op cache and accelerator must stay out
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    shipped = run_dtrain("submit", str(config), "--cluster", str(REPO / "slurm" / "clusters" / "h100.yaml"),
                         "--dry-run", in_process=True, check=False)  # fmt: skip
    assert shipped.returncode == 0, shipped.stderr
    assert "  ds ops        cpu_adam (cuda ranks): " in shipped.stdout, shipped.stdout
    assert "TORCH_EXTENSIONS_DIR" not in os.environ and "DS_ACCELERATOR" not in os.environ
