"""bitsandbytes, imported without reaching for the Hugging Face Hub.

bitsandbytes 0.50 (`backends/cpu/ops.py`), on a CPU with AVX512-BF16, calls
`kernels.get_kernel("kernels-community/quantization-bitsandbytes", version=1)` while it is being imported, to load a
compiled 4-bit CPU GEMM from the Hub. There is no setting to turn that off. Online it is a Hub request (the
publisher's trust status, then a download of code it would load into the process); offline (HF_HUB_OFFLINE=1, as
dtrain's ranks run) a cache miss; on a node without network and without HF_HUB_OFFLINE, a connection attempt. Each
ends in "Failed to load CPU gemm_4bit_forward from kernels-community ..." and bitsandbytes' own CPU kernel, which is
what dtrain runs anyway. peft imports bitsandbytes whenever it is installed, so every lora/qlora rank, `dtrain eval`
and `dtrain export` did this.

So while bitsandbytes is imported, and only then, `kernels` is unimportable (a None entry in sys.modules: the
ImportError comes before any network code runs), and bitsandbytes' warning about it is dropped. `install()` (from
dtrain/__init__.py) hooks the import itself, so it holds whoever imports bitsandbytes first in a process: peft,
transformers or dtrain. Only below FIXED_IN, the first bitsandbytes version not checked; the repro and the upstream
write-up are in docs/bitsandbytes-hub-kernel.md, and tests/test_offline.py fails when a version does it unguarded.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import logging
import sys
from collections.abc import Iterator
from types import ModuleType

FIXED_IN = (0, 51)  # bitsandbytes before this (0.50.2 checked) may call kernels.get_kernel at import: guarded
_WARNING_LOGGER = "bitsandbytes.backends.cpu.ops"  # where bitsandbytes logs the failed lookup


def install() -> None:
    """Guard the process's first `import bitsandbytes`, if an affected version is installed (cheap: no import)."""
    if "bitsandbytes" in sys.modules or any(isinstance(f, _GuardedImport) for f in sys.meta_path):
        return
    try:
        version = tuple(int(part) for part in importlib.metadata.version("bitsandbytes").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return
    if version < FIXED_IN:
        sys.meta_path.insert(0, _GuardedImport())


@contextlib.contextmanager
def without_kernels() -> Iterator[None]:
    """`import kernels` fails inside (whether or not it was imported before); the failure's warning is dropped."""
    before = sys.modules.get("kernels")
    had = "kernels" in sys.modules
    sys.modules["kernels"] = None  # type: ignore[assignment]
    quiet = logging.getLogger(_WARNING_LOGGER)
    quiet.addFilter(_not_the_kernel_warning)
    try:
        yield
    finally:
        quiet.removeFilter(_not_the_kernel_warning)
        if had:
            sys.modules["kernels"] = before  # type: ignore[assignment]
        else:
            sys.modules.pop("kernels", None)


def _not_the_kernel_warning(record: logging.LogRecord) -> bool:
    return "from kernels-community" not in record.getMessage()


class _GuardedImport(importlib.abc.MetaPathFinder):
    """Finds bitsandbytes as Python would, with a loader that runs its module code inside without_kernels(). It stays
    in place: `importlib.util.find_spec("bitsandbytes")` (how peft and accelerate probe for it) asks it too, and the
    import may come later."""

    def find_spec(self, name: str, path, target=None) -> importlib.machinery.ModuleSpec | None:
        if name != "bitsandbytes":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _GuardedLoader(spec.loader)
        return spec


class _GuardedLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with without_kernels():
            self.loader.exec_module(module)

    def __getattr__(self, name: str):  # get_resource_reader, is_package, ... stay the real loader's
        return getattr(self.loader, name)
