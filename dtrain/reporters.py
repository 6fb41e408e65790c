"""Where rank 0 sends its scalars besides metrics.jsonl: `logging.report_to: [tensorboard, wandb, mlflow]`.

- tensorboard: events in <output_dir>/tensorboard.
- wandb: a run whose id is derived from the output folder, so a resumed or requeued job continues the same run;
  the mode (online / offline) and project come from wandb's own environment (WANDB_MODE, WANDB_PROJECT; project
  default "dtrain"); files under <output_dir>/wandb.
- mlflow: MLFLOW_TRACKING_URI when set (a team server), else the database backend MLflow 3 recommends for a local
  run, an SQLite file in the run folder (`sqlite:///<output_dir>/mlflow.db`: any MLflow client or
  `mlflow ui --backend-store-uri` reads it with that URI alone; MLflow 3 reads its older file store only with an
  opt-in variable set). The run id is kept in <output_dir>/mlflow_run_id, so a resumed or requeued job continues
  the same run.
wandb and mlflow are optional extras (`pip install 'dtrain[wandb]'`); `missing_packages` is what `check` reports.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import time
from pathlib import Path
from typing import Protocol

REPORTERS = ("tensorboard", "wandb", "mlflow")
EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}  # reporter -> the pip extra it needs
# What each extra installs, by import name: mlflow-skinny is the client; its SQLite store needs SQLAlchemy and alembic,
# which only the full `mlflow` package (its server, UI and their stack) would bring otherwise.
EXTRA_MODULES = {"wandb": ["wandb"], "mlflow": ["mlflow", "sqlalchemy", "alembic"]}


class Reporter(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def missing_packages(report_to: list[str]) -> list[str]:
    """One problem per reporter whose package is not installed, naming the extra to install."""
    return [
        f"logging.report_to: {name} needs its package: pip install 'dtrain[{EXTRAS[name]}]'"
        for name in report_to
        if name in EXTRAS and any(importlib.util.find_spec(module) is None for module in EXTRA_MODULES[EXTRAS[name]])
    ]


def mlflow_tracking_uri(output_dir: Path) -> str:
    """Where the run's MLflow history is: MLFLOW_TRACKING_URI, else the SQLite file in the run folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def open_reporters(cfg, report_to: list[str], start_step: int) -> list[Reporter]:
    openers = {"tensorboard": TensorBoardReporter, "wandb": WandbReporter, "mlflow": MlflowReporter}
    return [openers[name](cfg, start_step) for name in report_to]


class TensorBoardReporter:
    def __init__(self, cfg, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run logged after its last checkpoint, so the curve has no doubles.
        self.writer = SummaryWriter(str(cfg.tensorboard_dir), purge_step=start_step + 1 if start_step else None)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    def __init__(self, cfg, start_step: int):
        import wandb

        output = Path(cfg.output_dir).resolve()
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "dtrain"),
            name=output.name,
            id=hashlib.sha256(str(output).encode()).hexdigest()[:16],
            resume="allow",
            dir=str(output),
            config=cfg.to_dict(),
        )

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowReporter:
    def __init__(self, cfg, start_step: int):
        from mlflow.tracking import MlflowClient

        output = Path(cfg.output_dir).resolve()
        uri = mlflow_tracking_uri(output)
        self.client = MlflowClient(tracking_uri=uri)
        id_file = output / "mlflow_run_id"
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
        else:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "dtrain")
            found = self.client.get_experiment_by_name(experiment)
            # A local run keeps anything MLflow writes beside its database, not in the working directory.
            artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else (output / "mlartifacts").as_uri()
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment, artifacts)
            self.run_id = self.client.create_run(experiment_id, run_name=output.name).info.run_id
            id_file.write_text(self.run_id)
        where = uri if os.environ.get("MLFLOW_TRACKING_URI") else f"{uri} (mlflow ui --backend-store-uri {uri})"
        print(f"mlflow: run {self.run_id} in {where}", flush=True)

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
