"""Where from_pretrained puts a rank's weights (dtrain.strategies.loading.load_device_map)."""

from __future__ import annotations

import torch

from dtrain.strategies.loading import load_device_map


def test_below_zero3_a_gpu_rank_loads_onto_its_own_gpu():
    """Not into host RAM first: 8 ranks x an 8B model would hold 128 GB of host memory until DeepSpeed moved it."""
    assert [load_device_map(stage, torch.device("cuda", 3)) for stage in (0, 1, 2)] == [{"": 3}] * 3


def test_zero3_partitions_while_loading_and_cpu_ranks_load_on_the_host():
    assert load_device_map(3, torch.device("cuda", 1)) is None  # HfDeepSpeedConfig's zero.Init refuses a device_map
    assert load_device_map(0, torch.device("cpu")) is None
