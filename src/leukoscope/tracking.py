"""Optional experiment tracking: each training run's options, validation metrics and files, logged to a
local MLflow file store (``train --track DIR``; ``pip install 'leukoscope[track]'``).

Only training and validation numbers are logged, never a test split's: a tracking UI that lists
test accuracy per run invites choosing recipes on it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import LeukoscopeError

ARTIFACTS = ("config.yaml", "splits.csv", "history.csv", "report.html", "cv.json", "run.json")


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def require_mlflow():
    try:
        import mlflow
    except ImportError:
        raise LeukoscopeError("--track needs MLflow: pip install 'leukoscope[track]' (or mlflow-skinny)") from None
    return mlflow


def log_run(track: str | os.PathLike, out: Path, data: str | os.PathLike, config: dict[str, Any], metrics: dict[str, Any],
            history: list[dict] | None = None) -> str:
    """Log one finished run under the experiment named after the data folder; returns the MLflow run id."""
    mlflow = require_mlflow()
    # A plain folder needs no database server or driver; MLflow 3 keeps file stores working on request.
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(Path(track).resolve().as_uri())
    mlflow.set_experiment(Path(str(data)).resolve().name)
    with mlflow.start_run(run_name=Path(out).name) as run:
        mlflow.log_params(_flat(config))
        for split in ("train", "val"):
            for key, value in metrics.get(split, {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    mlflow.log_metric(f"{split}_{key}", float(value))
        if "cv" in metrics:
            for key, stats in metrics["cv"]["summary"].items():
                mlflow.log_metrics({f"cv_{key}_mean": stats["mean"], f"cv_{key}_std": stats["std"]})
        for row in history or []:
            mlflow.log_metrics({k: float(row[k]) for k in ("train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy")
                                if isinstance(row.get(k), (int, float))}, step=int(row["epoch"]))
        for name in ARTIFACTS:
            if (Path(out) / name).is_file():
                mlflow.log_artifact(str(Path(out) / name))
        return run.info.run_id
