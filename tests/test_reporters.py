"""logging.report_to: the scalars rank 0 logs are read back with TensorBoard's, W&B's and MLflow's own readers.

Cost: ~6-10 s (wandb's service start and mlflow's import dominate), no training.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from dtrain.config import Config, LoggingConfig
from dtrain.metrics import MetricsLogger
from dtrain.reporters import missing_packages, mlflow_file_store

STEPS = {1: 2.5, 2: 2.0, 3: 1.75}


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
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_file_store(run))
    return {m.step: m.value for m in client.get_metric_history((run / "mlflow_run_id").read_text(), key)}


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
