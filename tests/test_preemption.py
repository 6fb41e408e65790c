"""The stop signal: each rank records what it received, and at a step boundary all ranks agree on the strongest one,
even the ranks that received nothing; a SIGUSR2 that follows an agreed SIGTERM within the grace still wins (a
preemption's two signals straddling a step boundary). Two real gloo ranks, each signalling itself (~8 s)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO

# Per round, the signals each rank sends itself, in order; then every rank asks stop_requested() (a collective).
ROUNDS = [
    {0: [], 1: []},
    {0: ["SIGUSR2", "SIGTERM"], 1: ["SIGTERM"]},  # USR2 (save and requeue) outranks TERM (the end), in any order
    {0: ["SIGTERM", "SIGUSR2"], 1: []},
    {0: [], 1: ["SIGTERM"]},
]
RANK = """
import json, os, signal, sys, threading
import torch, torch.distributed as dist
from dtrain.preemption import StopFlag, stopped_by
rank, store, rounds = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
seen = []
for signals in rounds:
    flag = StopFlag(torch.device("cpu"))
    for name in signals[str(rank)]:
        os.kill(os.getpid(), getattr(signal, name))
    stop = flag.stop_requested()
    seen.append([stop, stopped_by().name if stopped_by() else None])
for late in (0.5, None):  # rank 1: SIGTERM, agreed on; then SIGUSR2 0.5 s later, or nothing
    flag = StopFlag(torch.device("cpu"))
    if rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)
        if late:
            threading.Timer(late, os.kill, (os.getpid(), signal.SIGUSR2)).start()
    agreed = stopped_by().name if flag.stop_requested() else None
    flag.settle()
    seen.append([agreed, stopped_by().name])
dist.destroy_process_group()
print(json.dumps(seen))
"""


def test_ranks_agree_on_the_strongest_stop_signal(tmp_path):
    args = [str(tmp_path / "store"), json.dumps(ROUNDS)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK, str(rank), *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err[-3000:] for _, err in outputs]
    expected = [[False, None], [True, "SIGUSR2"], [True, "SIGUSR2"], [True, "SIGTERM"]]
    expected += [["SIGTERM", "SIGUSR2"], ["SIGTERM", "SIGTERM"]]
    for rank, (out, _) in enumerate(outputs):
        assert json.loads(out.strip().splitlines()[-1]) == expected, f"rank {rank}"
