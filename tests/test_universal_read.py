"""A resume through the universal checkpoint reads each rank's share of the optimizer state, not all of it
(dtrain.deepspeed_fixes.universal_load_reads_own_share; bench/universal_resume_io.py measures 1, 2 and 4 ranks)."""

from __future__ import annotations

import pytest
import torch

from bench.universal_resume_io import KEYS, converted_checkpoint, read_per_rank, state_files

pytestmark = pytest.mark.slow  # a 2-rank training, a conversion, a 2-rank load


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return converted_checkpoint(tmp_path_factory.mktemp("universal-read"), hidden=512, layers=2)


def _param(saved):
    return saved["param"] if isinstance(saved, dict) else saved  # some keys are saved as a bare tensor


def test_each_of_two_ranks_reads_about_half_of_the_state(checkpoint):
    model, universal = checkpoint
    total = sum(path.stat().st_size for path in state_files(universal))
    read = read_per_rank(model, universal, 2)
    # DeepSpeed 0.19.8 alone: each rank reads every file whole (~1.0 of total)
    assert all(0.4 * total < bytes_ < 0.6 * total for bytes_ in read), (read, total)


def test_the_share_read_is_the_share_deepspeed_would_keep(checkpoint):
    """The fix's slice equals DeepSpeed's own (whole-file load, zero padding, narrow) for every parameter file."""
    from dtrain.deepspeed_fixes import read_elements, unread_ahead

    _, universal = checkpoint
    for path in state_files(universal)[:12]:
        whole, file = _param(torch.load(path, weights_only=False)).view(-1), unread_ahead(path.open("rb", buffering=0))
        meta = _param(torch.load(file, weights_only=False, map_location="meta"))
        for world in (2, 3):
            share = -(-whole.numel() // world)
            padded = torch.cat([whole, torch.zeros(world * share - whole.numel(), dtype=whole.dtype)])
            for rank in range(world):
                start = min(rank * share, whole.numel())
                mine = torch.zeros(share, dtype=whole.dtype)
                read_elements(file, meta, start, mine[: min(share, whole.numel() - start)])
                assert torch.equal(mine, padded.narrow(0, rank * share, share)), (path, world, rank)
        file.close()
    assert {path.stem for path in state_files(universal)} == set(KEYS)
