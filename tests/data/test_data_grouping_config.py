"""Length-grouped order (packing off), and the data section's config validation."""

from __future__ import annotations

import numpy as np

from dtrain.config import ConfigError, config_from_dict
from dtrain.data import group_by_length


def test_group_by_length_is_a_seeded_permutation_with_little_padding():
    lengths = np.random.default_rng(0).integers(1, 500, 1003)
    order = group_by_length(lengths, 8, seed=0, epoch=0)
    assert sorted(order) == list(range(1003))
    assert order == group_by_length(lengths, 8, seed=0, epoch=0)
    assert order != group_by_length(lengths, 8, seed=0, epoch=1)
    batches = np.array(order[:1000]).reshape(-1, 8)
    padded = (lengths[batches].max(axis=1) * 8).sum() / lengths[batches].sum()
    assert padded < 1.05  # random batches of this distribution pad ~1.7x
    assert lengths[order[:8]].max() == lengths.max()  # the longest batch runs first: out-of-memory shows at once


def _problems(data: dict) -> list[str]:
    raw = {
        "output_dir": "runs/x",
        "model": {"path": "m"},
        "train": {"max_steps": 1, "gradient_accumulation_steps": 1},
        "data": data,
    }
    try:
        config_from_dict(raw, check_paths=False)
    except ConfigError as e:
        return e.problems
    return []


def test_data_config_problems_are_listed_with_their_keys():
    problems = _problems(
        {
            "datasets": [
                {"path": "a.jsonl", "format": "instruction"},
                {"path": "b.jsonl", "format": "chat", "role_map": {"gpt": "bot"}},
            ],
            "overlong": "split",
            "instruction_template": "{question} {input}",
            "group_by_length": True,
        }
    )
    assert "data.datasets[1].role_map.gpt: must map to system, user, assistant or tool" in problems
    assert "data.overlong: split applies to format text only; data.datasets[0] is instruction" in problems
    assert any(p.startswith("data.instruction_template: unknown placeholder {question}") for p in problems)
    assert "data.instruction_template: must contain {instruction}" in problems
    assert any(p.startswith("data.group_by_length: only with data.packing false") for p in problems)
    assert _problems({"datasets": [{"path": "a.jsonl", "format": "instruction"}]}) == []
