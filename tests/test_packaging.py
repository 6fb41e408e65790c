"""A regular (non-editable) install ships every package: pyproject.toml lists packages by name."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the check needs to run on one version only
REPO = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "dtrain").rglob("__init__.py")}
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert "dtrain_launch" in listed and (REPO / "launch" / "__init__.py").is_file()


def test_the_libraries_are_required_at_the_versions_tested_here():
    """What pip may install is what runs here: transformers 4.x (MoE under ZeRO-3 hangs) and a DeepSpeed outside
    the range dtrain/deepspeed_fixes.py was measured on are refused at install time."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    required = {Requirement(r).name: Requirement(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())[
        "project"]["dependencies"]}  # fmt: skip
    for name in ("torch", "deepspeed", "transformers", "peft", "bitsandbytes", "datasets", "submitit"):
        assert required[name].specifier.contains(version(name).split("+")[0]), (name, version(name))
    assert not required["transformers"].specifier.contains("4.57.1")
    assert not required["deepspeed"].specifier.contains("0.20.0") and not required["deepspeed"].specifier.contains(
        "0.18.9"
    )
