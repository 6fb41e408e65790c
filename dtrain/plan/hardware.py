"""The hardware a run is planned for: nodes, GPUs per node and the memory of each."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    nodes: int
    gpus_per_node: int
    gpu_mem_bytes: int
    """Memory of one GPU."""
    cpu_mem_bytes: int
    """CPU RAM of one node."""
    nvme_bytes: int | None = None
    """Local NVMe of one node; None: not given, NVMe offload is neither checked nor proposed."""

    def __post_init__(self):
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"hardware: need >= 1 node and GPU per node, got {self.nodes} x {self.gpus_per_node}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node
