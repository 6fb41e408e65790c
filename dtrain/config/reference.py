"""The config reference in README.md, generated from the field docstrings: `python -m dtrain.config.reference`."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap

import yaml

from dtrain.config.data import DatasetConfig
from dtrain.config.run import Config


def _field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring under it, for a dataclass."""
    node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    body = node.body
    return {
        field.target.id: " ".join(str(doc.value.value).split())
        for field, doc in zip(body, body[1:], strict=False)
        if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
    }


def _rows(cls: type, prefix: str) -> list[str]:
    docs, rows = _field_docs(cls), []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            rows += _rows(type(default), f"{prefix}{f.name}.")
            continue
        if isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
            default = []
        if isinstance(default, str):
            shown = json.dumps(default)
        else:
            shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        rows.append(f"| `{prefix}{f.name}` | `{shown}` | {docs.get(f.name, '')} |")
    return rows


def reference_markdown() -> str:
    """One table row per config key: dotted key, default, meaning (the docstring under the field)."""
    header = ["| key | default | meaning |", "| --- | --- | --- |"]
    entries = "Each entry of `data.datasets` / `data.eval_datasets` / `eval.retention.<name>`:"
    dataset = ["", entries, "", *header, *_rows(DatasetConfig, "")]
    return "\n".join(header + _rows(Config, "") + dataset) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
