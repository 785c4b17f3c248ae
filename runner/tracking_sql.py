"""Many MLflow runs in one database transaction, written through MLflow's own ORM models.

MLflow's client writes one finished run with params, metrics and tags in about 14 sessions and 7
commits (create, log_batch, set_terminated): 35-40 ms of Python per image on the dev machine, so one
writer thread logged about 32 images/s, fewer than 8 GPUs make (bench/RESULTS.md, issue 13). The
rows written here are the ones the client writes for the same run (`tests/test_tracking_bulk.py`
reads both back through `MlflowClient` and compares them), in one transaction per batch of images:
a batch is in MLflow whole or not at all.

Only for SQLAlchemy stores (sqlite, postgresql, mysql, mssql URIs); an `http(s)://` tracking server
keeps the client path, since its own database is out of reach.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class RunRows:
    """One finished run as its rows: what create_run + log_batch + set_terminated would have written."""

    run_id: str
    name: str
    start_ms: int
    end_ms: int
    status: str  # FINISHED or FAILED
    artifact_uri: str
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class BulkRunWriter:
    """Inserts finished runs and metrics of one experiment into a SQLAlchemy-backed MLflow store."""

    def __init__(self, store: Any, experiment_id: str):
        self.store = store
        self.experiment_id = experiment_id
        takes_read_only = "read_only" in inspect.signature(store.ManagedSessionMaker).parameters
        self._session = (lambda: store.ManagedSessionMaker(read_only=False)) if takes_read_only else store.ManagedSessionMaker

    @classmethod
    def for_client(cls, client: Any, experiment_id: str) -> BulkRunWriter | None:
        """A writer for the client's store if it is a database MLflow can reach directly, else None."""
        try:
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            store = client._tracking_client.store
        except (ImportError, AttributeError):  # another MLflow layout: the client path
            return None
        return cls(store, experiment_id) if isinstance(store, SqlAlchemyStore) else None

    def add_runs(self, runs: list[RunRows]) -> None:
        """Insert finished runs with their tags, params and metrics, all in one transaction."""
        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag
        from sqlalchemy import insert

        if not runs:
            return
        run_rows, tag_rows, param_rows, metric_rows = [], [], [], []
        for run in runs:
            run_rows.append(
                {
                    "run_uuid": run.run_id,
                    "name": run.name,
                    "artifact_uri": run.artifact_uri,
                    "experiment_id": int(self.experiment_id),
                    "source_type": "UNKNOWN",
                    "source_name": "",
                    "entry_point_name": "",
                    "user_id": run.tags.get("mlflow.user", "unknown"),
                    "status": run.status,
                    "start_time": run.start_ms,
                    "end_time": run.end_ms,
                    "deleted_time": None,
                    "source_version": "",
                    "lifecycle_stage": "active",
                }
            )
            tags = {**run.tags, "mlflow.runName": run.name}
            tag_rows += [{"run_uuid": run.run_id, "key": k, "value": v} for k, v in tags.items()]
            param_rows += [{"run_uuid": run.run_id, "key": k, "value": v} for k, v in run.params.items()]
            metric_rows += _metric_rows(run.run_id, run.metrics, run.end_ms)
        with self._session() as session:
            session.execute(insert(SqlRun), run_rows)
            for model, rows in ((SqlTag, tag_rows), (SqlParam, param_rows), (SqlMetric, metric_rows), (SqlLatestMetric, metric_rows)):
                if rows:
                    session.execute(insert(model), rows)

    def add_metrics(self, metrics: Mapping[str, Mapping[str, float]], timestamp_ms: int) -> None:
        """Metrics (step 0) for existing runs, by run id, in one transaction; they become the runs' latest values."""
        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric
        from sqlalchemy import and_, delete, insert, or_

        rows = [row for run_id, values in metrics.items() for row in _metric_rows(run_id, values, timestamp_ms)]
        if not rows:
            return
        with self._session() as session:
            session.execute(insert(SqlMetric), rows)
            for start in range(0, len(rows), 400):  # a logged key's older latest value gives way to this one
                chunk = rows[start : start + 400]
                pairs = [and_(SqlLatestMetric.run_uuid == r["run_uuid"], SqlLatestMetric.key == r["key"]) for r in chunk]
                session.execute(delete(SqlLatestMetric).where(or_(*pairs)))
            session.execute(insert(SqlLatestMetric), rows)


def _metric_rows(run_id: str, metrics: Mapping[str, float], timestamp_ms: int) -> list[dict[str, Any]]:
    """MLflow stores NaN as 0 with is_nan set, and +-inf as the float's extremes (as `sanitize_metric_value` does)."""
    rows = []
    for key, value in metrics.items():
        value = float(value)
        is_nan = math.isnan(value)
        if is_nan:
            value = 0.0
        elif math.isinf(value):
            value = 1.7976931348623157e308 if value > 0 else -1.7976931348623157e308
        rows.append({"run_uuid": run_id, "key": key, "value": value, "timestamp": timestamp_ms, "step": 0, "is_nan": is_nan})
    return rows
