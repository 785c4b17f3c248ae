"""MLflow: experiment = sweep, one parent run per sweep (reused when it continues), one child run per image.

Uses `MlflowClient` with explicit run ids (no global active run), so the background writer can log
from its own thread. Child runs are keyed by the image id (tag `lora_sweep.id`): a sweep that is
continued reuses the run of an id instead of logging it twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runner.request import FIELDS, split_loras, split_strengths

log = logging.getLogger(__name__)

ROLE_TAG = "lora_sweep.role"
ID_TAG = "lora_sweep.id"
PARENT_TAG = "mlflow.parentRunId"


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow 3's UI opens classic-ML experiments on their runs, not the GenAI overview
SHORT_SCHEDULERS = {  # the names the web UIs use, for readable run names
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverSinglestepScheduler": "DPM++ SDE",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "HeunDiscreteScheduler": "Heun",
    "LMSDiscreteScheduler": "LMS",
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS",
    "UniPCMultistepScheduler": "UniPC",
    "LCMScheduler": "LCM",
}


def run_name(row: Mapping[str, Any], axes: list[str]) -> str:
    """A child run's name from the sweep's axes, e.g. 'sunset 0.7 · Euler · seed 3' (the id stays a tag)."""
    parts = []
    if {"lora_model", "lora_strength"} & set(axes):
        parts.append(str(row.get("blend") or "no LoRA"))
    for axis in axes:
        if axis in ("lora_model", "lora_strength", "seed"):
            continue
        value = row.get(axis)
        if axis == "scheduler":
            value = SHORT_SCHEDULERS.get(str(value), str(value).removesuffix("Scheduler"))
        elif axis in ("prompt", "negative_prompt"):
            value = str(value)[:32] + ("…" if len(str(value)) > 32 else "")
        else:
            value = f"{axis} {value}"
        parts.append(str(value))
    parts.append(f"seed {row.get('seed')}")
    return " · ".join(parts)[:250]


def runs_view_url(experiment_id: str, host: str = "http://127.0.0.1:5000") -> str:
    """The experiment's runs in the UI's classic-ML mode: MLflow 3.17 opens every experiment in its GenAI mode
    (a global switch, `workflowType`, remembered by the browser) whatever the experiment's kind tag says."""
    return f"{host}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def default_uri(outputs: Path) -> str:
    return f"sqlite:///{outputs.resolve() / 'mlflow.db'}"


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def request_params(row: Mapping[str, Any]) -> dict[str, str]:
    """Every request field as the API would take it, plus one `lora_strength.<id>` per LoRA."""
    params = {}
    for name, spec in FIELDS.items():
        value = row.get(name)
        if spec.kind == "bool":
            value = "yes" if value else "no"
        params[name] = "" if value is None else str(value)
    for lora, strength in zip(split_loras(row.get("lora_model")), split_strengths(row.get("lora_strength"))):
        params[f"lora_strength.{lora}"] = str(strength)
    return params


class Tracker:
    def __init__(self, uri: str, experiment: str | None = None, artifact_location: str | None = None, experiment_id: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        if experiment_id is None:
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                experiment_id = self.client.create_experiment(
                    experiment, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: "custom_model_development"}
                )
            else:
                experiment_id = found.experiment_id
                if EXPERIMENT_KIND_TAG not in found.tags:
                    self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
        self.experiment_id = experiment_id
        self.name_axes: list[str] = []  # the sweep's axes, for readable child run names
        self.chart_images = True  # log_image under a key for the chart view (tracking.chart_images)
        self.parent_id: str | None = None
        self.children: dict[str, tuple[str, str, str]] = {}  # image id -> (run id, status, artifact uri)
        self.child_metrics: dict[str, set[str]] = {}  # image id -> metric keys its run had when loaded

    # ------------------------------------------------------------ parent

    def start_parent(self, sweep: str, tags: Mapping[str, str], params: Mapping[str, str]) -> str:
        """The sweep's parent run: the existing one if this sweep ran before, else a new one."""
        existing = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'parent'", order_by=["attributes.start_time ASC"], max_results=1
        )
        if existing:
            self.parent_id = existing[0].info.run_id
            self.client.update_run(self.parent_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=sweep, tags={ROLE_TAG: "parent", **tags})
            self.parent_id = run.info.run_id
            self._log_params(self.parent_id, params)
        self.client.set_tag(self.parent_id, "lora_sweep.last_started", time.strftime("%Y-%m-%dT%H:%M:%S"))
        self._load_children()
        return self.parent_id

    def attach_parent(self) -> str | None:
        """The sweep's existing parent run and its children, for logging after the fact (`lora-sweep score`)."""
        existing = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'parent'", order_by=["attributes.start_time ASC"], max_results=1
        )
        if not existing:
            return None
        self.parent_id = existing[0].info.run_id
        self._load_children()
        return self.parent_id

    def _load_children(self) -> None:
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_id}'", max_results=50000)
        for run in runs:
            image_id = run.data.tags.get(ID_TAG)
            if image_id and (image_id not in self.children or run.info.status == "FINISHED"):
                self.children[image_id] = (run.info.run_id, run.info.status, run.info.artifact_uri)
                self.child_metrics[image_id] = set(run.data.metrics)

    def finish_parent(self, status: str, files: Mapping[str, Path], folders: Mapping[str, Path], metrics: Mapping[str, float]) -> None:
        """Attach the sweep's plan, results, grids and config; end the parent run with `status`."""
        if self.parent_id is None:
            return
        for name, value in metrics.items():
            self.client.log_metric(self.parent_id, name, float(value))
        for artifact_path, file in files.items():
            if file.exists():
                self.client.log_artifact(self.parent_id, str(file), artifact_path or None)
        for artifact_path, folder in folders.items():
            if folder.exists() and any(folder.iterdir()):
                self.client.log_artifacts(self.parent_id, str(folder), artifact_path)
        self.client.set_terminated(self.parent_id, status)

    # ------------------------------------------------------------ children

    def log_image(self, row: Mapping[str, Any], result: Any, image_path: Path | None, tags: Mapping[str, str]) -> None:
        """One child run per image id: params, tags, generation time and the PNG.

        Four store calls per image (create, one batch, artifact, end): this runs for every image,
        and on a small machine its CPU time is taken from generation.
        """
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        now = int(time.time() * 1000)
        run_tags = {
            "scheduler_used": result.scheduler,
            "seed_used": str(result.seed),
            "status": result.status,
            "notes": "; ".join(result.notes)[:5000],
        }
        if result.error:
            run_tags["error"] = result.error[:5000]
        run_tags.update({f"meta.{k}": str(v)[:5000] for k, v in result.meta.items()})  # e.g. the provider's seed, prompt
        known = self.children.get(row["id"])
        params: list[Param] = []
        if known:
            run_id, _, artifact_uri = known
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=run_name(row, self.name_axes),
                tags={PARENT_TAG: self.parent_id, ID_TAG: row["id"], **tags},
            )
            run_id, artifact_uri = run.info.run_id, run.info.artifact_uri
            params = [Param(k, str(v)[:6000]) for k, v in {**request_params(row), "blend": row.get("blend", "")}.items()]
            if len(params) > 100:  # MLflow's limit per batch (blends of many LoRAs)
                self._log_params(run_id, {p.key: p.value for p in params})
                params = []
        self.client.log_batch(
            run_id,
            metrics=[Metric("generation_s", result.generation_s, now, 0), Metric("batch_size", float(result.batch_size), now, 0)],
            params=params,
            tags=[RunTag(k, v) for k, v in run_tags.items()],
        )
        if result.image is not None and self.chart_images:  # under a key, so the chart view shows the images of several runs side by side
            self.client.log_image(run_id, result.image, key="image", step=0, timestamp=now)
        if image_path is not None:
            if artifact_uri.startswith("file:"):  # a local store: skip the client's run lookup per image
                get_artifact_repository(artifact_uri).log_artifact(str(image_path))
            else:  # mlflow-artifacts:/ and friends resolve through this client's server
                self.client.log_artifact(run_id, str(image_path))
        status = "FINISHED" if result.status == "ok" else "FAILED"
        self.client.set_terminated(run_id, status)
        self.children[row["id"]] = (run_id, status, artifact_uri)

    def log_scores(self, scores: Any, only_missing: bool = False) -> int:
        """Each image's scores as metrics on its child run (so the chart view can rank blends); returns runs logged.

        `only_missing` logs only the metrics a run does not have yet (what a run could not log while MLflow was down).
        """
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        logged = 0
        for record in scores.to_dict("records"):
            known = self.children.get(record["id"])
            have = self.child_metrics.get(record["id"], set()) if only_missing else set()
            metrics = [Metric(k, float(v), now, 0) for k, v in record.items() if k != "id" and v == v and k not in have]
            if known and metrics:
                self.client.log_batch(known[0], metrics=metrics)
                self.child_metrics.setdefault(record["id"], set()).update(m.key for m in metrics)
                logged += 1
        return logged

    def log_ranking(self, ranking: Any) -> None:
        """The ranking as an MLflow table on the parent run (artifact ranking.json)."""
        if self.parent_id is not None and not ranking.empty:
            self.client.log_table(self.parent_id, data=ranking, artifact_file="ranking.json")

    def _log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])


class TrackingProcess:
    """The per-image MLflow logging of a `Tracker`, done in a child process.

    MLflow's client is Python-heavy (about 60 ms of CPU per image run with its PNG). In a thread of
    the generating process it competes for the GIL with the thread that launches CUDA kernels (a GPU
    sweep measured 22-40% slower tracked than untracked). Moving it here was meant to remove that, but
    the one H100 run measured it slower still (bench/RESULTS.md), so it is opt-in (tracking.process=true)
    until a profile says why. Same contract as `Tracker.log_image`; results come back on `close()`:
    the child runs made (so scores find them) and the ids that could not be logged.
    """

    def __init__(self, tracker: Tracker, queue_size: int = 256):
        import multiprocessing

        self.tracker = tracker
        context = multiprocessing.get_context("spawn")  # no fork of a process holding CUDA and threads
        self._in = context.Queue(maxsize=max(1, queue_size))
        self._out = context.Queue()
        self._process = context.Process(
            target=_tracking_main,
            args=(tracker.uri, tracker.experiment_id, tracker.parent_id, tracker.children, tracker.name_axes, tracker.chart_images),
            kwargs={"inbox": self._in, "outbox": self._out},
            name="lora-sweep-tracking",
            daemon=True,
        )
        self._process.start()
        self.failed_ids: list[str] = []
        self.errors = 0

    def log_image(self, row: Mapping[str, Any], result: Any, image_path: Path | None, tags: Mapping[str, str]) -> None:
        import dataclasses

        light = dataclasses.replace(result, image=None)  # the child reads the PNG from disk
        self._in.put((dict(row), light, str(image_path) if image_path else None, dict(tags)))

    def close(self) -> None:
        """Wait for every queued image to be logged; update the tracker's child runs."""
        if not self._process.is_alive():
            return
        self._in.put(None)
        children, self.failed_ids, self.errors = self._out.get()
        self._process.join()
        self.tracker.children.update(children)


def _tracking_main(uri, experiment_id, parent_id, children, name_axes, chart_images, *, inbox, outbox) -> None:
    """The child process: a Tracker on the same run, logging what arrives until None."""
    from PIL import Image

    from runner.run import run_environment_defaults

    run_environment_defaults()
    tracker = Tracker(uri, experiment_id=experiment_id)
    tracker.parent_id, tracker.children, tracker.name_axes, tracker.chart_images = parent_id, dict(children), name_axes, chart_images
    made: dict[str, tuple[str, str, str]] = {}
    failed: list[str] = []
    errors = in_a_row = 0
    while (item := inbox.get()) is not None:
        row, result, path, tags = item
        if in_a_row >= 3:  # MLflow is down: the next run or `lora-sweep sync` back-fills the rest
            failed.append(row["id"])
            errors += 1
            continue
        try:
            if path and chart_images and result.status == "ok":
                with Image.open(path) as image:
                    result.image = image.convert("RGB")
            tracker.log_image(row, result, Path(path) if path else None, tags)
            made[row["id"]] = tracker.children[row["id"]]
            in_a_row = 0
        except Exception as exc:
            failed.append(row["id"])
            errors += 1
            in_a_row += 1
            log.warning("MLflow logging failed for %s (%s)", row["id"], str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
    outbox.put((made, failed, errors))
