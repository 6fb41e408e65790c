"""logging.report_to: the scalars rank 0 logs are read back with TensorBoard's, W&B's and MLflow's own readers.

MLflow's history is read by a fresh client in a process of its own, given only the tracking URI the README documents
(what `mlflow ui --backend-store-uri` takes), after a resume (a second logger on the same run folder). Cost: ~10-20 s
(wandb's service start and mlflow's imports dominate), no training.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from dtrain.config import Config, LoggingConfig
from dtrain.metrics import MetricsLogger, read_metrics
from dtrain.reporters import missing_packages
from tests.helpers import REPO

STEPS = {1: 2.5, 2: 2.0, 3: 1.75}
RESUMED = {4: 1.5, 5: 1.25}  # logged by a second MetricsLogger, as a resumed or requeued run does
MLFLOW_READER = """
import sys
from mlflow.tracking import MlflowClient
uri, run_id, key = sys.argv[1:]
for metric in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key):
    print(metric.step, repr(metric.value))
"""


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_scalars_read_back_with_each_librarys_reader(tmp_path, offline_env):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    reporters = ["tensorboard", "wandb", "mlflow"]
    cfg = Config(output_dir=str(tmp_path / "run"), logging=LoggingConfig(progress_bar=False, report_to=reporters))
    log = MetricsLogger(cfg, is_main=True, start_step=0, total_steps=3)
    for step, loss in STEPS.items():
        log.log(step, {"loss": loss, "lr": 1e-3})
    log.close()
    run = Path(cfg.output_dir)
    assert tensorboard_scalars(run / "tensorboard", "train/loss") == STEPS
    assert wandb_scalars(run, "train/loss") == STEPS
    assert mlflow_scalars(run, "train/loss") == STEPS


def test_mlflow_keeps_one_run_in_the_run_folders_database(tmp_path, offline_env):
    pytest.importorskip("mlflow")
    cfg = Config(output_dir=str(tmp_path / "run"), logging=LoggingConfig(progress_bar=False, report_to=["mlflow"]))
    for start, steps in ((0, STEPS), (max(STEPS), RESUMED)):
        log = MetricsLogger(cfg, is_main=True, start_step=start, total_steps=max(RESUMED))
        for step, loss in steps.items():
            log.log(step, {"loss": loss, "lr": 1e-3})
        log.close()
    run = Path(cfg.output_dir)
    assert mlflow_scalars(run, "train/loss") == read_metrics(run) == {**STEPS, **RESUMED}


def test_a_missing_reporter_package_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    assert missing_packages(["tensorboard", "mlflow"]) == [
        "logging.report_to: mlflow needs its package: pip install 'dtrain[mlflow]'"
    ]


def tensorboard_scalars(folder: Path, key: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {e.step: pytest.approx(e.value) for e in events.Scalars(key)}


def mlflow_scalars(run: Path, key: str) -> dict[int, float]:
    """The history as a fresh MLflow client reads it, in a process with no MLFLOW_* variable, from the documented
    local store of the run: sqlite:///<output_dir>/mlflow.db."""
    import os
    import subprocess
    import sys

    uri = f"sqlite:///{run.resolve() / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    args = [sys.executable, "-c", MLFLOW_READER, uri, (run / "mlflow_run_id").read_text(), key]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {int(step): float(value) for step, value in (line.split() for line in proc.stdout.splitlines())}


def wandb_scalars(folder: Path, key: str) -> dict[int, float]:
    """History rows of an offline run, parsed with wandb's own protobuf Record from its transaction log (LevelDB
    log framing: 32 KiB blocks of records with a 7-byte header); wandb ships no Python reader of that file."""
    import json

    from wandb.proto import wandb_internal_pb2

    (path,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    data, block, pos, pending, values = path.read_bytes(), 32768, 7, b"", {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
                }
                if key in items:
                    values[items["_step"]] = items[key]
    return values
