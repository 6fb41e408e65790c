"""Which rank syncs which file of a checkpoint: each rank the files it wrote (on a network file system only the
writer's node can make them durable), every file exactly once. Pure: file names as DeepSpeed 0.19 writes them."""

from __future__ import annotations

from dtrain.checkpoint import _written_by

WRITTEN = {
    0: ["ds/zero_pp_rank_0_mp_rank_00_model_states.pt", "ds/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "ds/mp_rank_00_model_states.pt", "rng/rank-00000.safetensors"],  # mp_rank_00_model_states: stage 0-2, rank 0's
    1: ["ds/zero_pp_rank_1_mp_rank_00_model_states.pt", "ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "rng/rank-00001.safetensors"],
    12: ["ds/zero_pp_rank_12_mp_rank_00_optim_states.pt", "rng/rank-00012.safetensors"],
}  # fmt: skip


def test_each_rank_syncs_exactly_the_files_it_wrote(tmp_path):
    busy = ["rng/rank-00002.partial", "rng/.tmp8MRO3I"]  # another rank's RNG file being written (ours, safetensors')
    for name in [*(n for names in WRITTEN.values() for n in names), *busy]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    for rank, names in WRITTEN.items():
        assert sorted(str(p.relative_to(tmp_path)) for p in _written_by(tmp_path, rank)) == sorted(names), rank
