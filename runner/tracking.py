"""MLflow: experiment = sweep, one parent run per sweep (reused when it continues), one child run per image.

Uses `MlflowClient` with explicit run ids (no global active run), so the background writer can log
from its own thread. Child runs are keyed by the image id (tag `lora_sweep.id`): a sweep that is
continued reuses the run of an id instead of logging it twice.

MLflow itself is imported inside the methods that use it: `lora-sweep plan` and runs with
tracking=none never pay its import (about 2 s).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from runner.errors import UserError
from runner.request import FIELDS, optional, split_loras, split_strengths
from runner.tracking_sql import BulkRunWriter, RunRows

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


def seed_sqlite_store(uri: str) -> None:
    """A new sqlite store starts as a copy of an empty one made once per MLflow version.

    MLflow builds a new sqlite store by running its schema migrations one by one (3.4 s on the dev
    machine); every new outputs folder paid that before its first image. The copy takes milliseconds.
    Its Default experiment's artifact location is set to ./mlruns of this directory, as MLflow's own
    initialisation would.
    """
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///"))
    if path.exists() or str(path) == ":memory:":
        return
    import os
    import shutil
    import sqlite3

    import mlflow

    cache = Path(os.environ.get("LORA_SWEEP_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora-sweep")
    template = cache / f"mlflow-{mlflow.__version__}-empty.db"
    try:
        if not template.exists():
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            cache.mkdir(parents=True, exist_ok=True)
            building = template.with_name(f"{template.name}.{os.getpid()}.tmp")
            store = SqlAlchemyStore(f"sqlite:///{building}", str(cache / "mlruns"))
            store.engine.dispose()
            os.replace(building, template)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, path)
        with sqlite3.connect(path) as db:
            db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", ((Path.cwd() / "mlruns").as_uri(),))
        db.close()
    except (OSError, sqlite3.Error) as exc:  # no cache: MLflow builds the store itself, as before
        log.debug("no sqlite store template (%s)", exc)
        path.unlink(missing_ok=True)


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def request_params(row: Mapping[str, Any]) -> dict[str, str]:
    """Every request field as the API would take it, plus one `lora_strength.<id>` per LoRA."""
    params = {}
    for name, spec in FIELDS.items():
        value = optional(row.get(name))  # an unset field is "", not "nan"
        if spec.kind == "bool":
            value = "yes" if value else "no"
        params[name] = "" if value is None else str(value)
    for lora, strength in zip(split_loras(row.get("lora_model")), split_strengths(row.get("lora_strength"))):
        params[f"lora_strength.{lora}"] = str(strength)
    return params


def image_params(row: Mapping[str, Any]) -> dict[str, str]:
    """An image run's params: the request as the API takes it, per-LoRA strengths and the blend."""
    original = optional(row.get("prompt_original"))  # the prompt as written, where <lora:> tags were taken out
    extra = {"blend": row.get("blend", "")} | ({"prompt_original": original} if original else {})
    return {k: str(v)[:6000] for k, v in {**request_params(row), **extra}.items()}


def image_tags(result: Any) -> dict[str, str]:
    """An image run's tags from its result: what the engine used, its status and notes, the provider's meta."""
    tags = {
        "scheduler_used": result.scheduler,
        "seed_used": str(result.seed),
        "status": result.status,
        "notes": "; ".join(result.notes)[:5000],
    }
    if result.error:
        tags["error"] = result.error[:5000]
    tags.update({f"meta.{k}": str(v)[:5000] for k, v in result.meta.items()})  # e.g. the provider's seed, prompt
    return tags


def image_metrics(result: Any) -> dict[str, float]:
    return {"generation_s": float(result.generation_s), "batch_size": float(result.batch_size)}


def chart_source(result: Any, png: Path | None) -> Any:
    """The image for the chart view: the engine's own, else its PNG read back (Ray workers send PNG bytes only)."""
    if result.image is not None or png is None or result.status != "ok":
        return result.image
    from PIL import Image

    with Image.open(png) as image:
        return image.convert("RGB")


def _local_folder(uri: str) -> Path | None:
    from urllib.parse import unquote, urlparse

    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(uri) if parsed.scheme == "" and uri else None


def _link_or_copy(source: Path, target: Path) -> None:
    """The sweep's PNG as the run's artifact: a hard link (no second copy on disk), a copy across file systems."""
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except FileExistsError:
        pass
    except OSError:
        shutil.copyfile(source, target)


def _chart_image(image: Any, png: Path, folder: Path, timestamp: int) -> None:
    """What `MlflowClient.log_image(key="image")` writes, without encoding the PNG again: the PNG and a WebP of
    at most 256 px under images/.

    The WebP is made the fast way (reduce, then resample; libwebp's quickest method): a 256 px preview
    for the chart view, 4 ms instead of MLflow's 16 for a 512 px image (bench/RESULTS.md).
    """
    import uuid

    width, height = image.size
    scale = 256 / max(width, height)  # the size mlflow.tracking.multimedia.compress_image_size gives
    size = (256, int(height * scale)) if width > height else (int(width * scale), 256)
    stem = f"image+step+0+timestamp+{timestamp}+{uuid.uuid4()}"
    _link_or_copy(png, folder / "images" / f"{stem}.png")
    image.resize(size, reducing_gap=1.0).save(folder / "images" / f"{stem}+compressed.webp", method=0, quality=80)


class Tracker:
    """One sweep's MLflow experiment, its parent run and a child run per image; callers never touch the client.

    `name_axes` name the child runs (`sunset 0.5 · seed 3`); `chart_images` adds the chart view's copy of
    each image; `bulk=False` logs run by run through MLflow's client even where the bulk path could be used.
    """

    def __init__(
        self,
        uri: str,
        experiment: str | None = None,
        artifact_location: str | None = None,
        experiment_id: str | None = None,
        *,
        name_axes: list[str] | tuple[str, ...] = (),
        chart_images: bool = True,
        bulk: bool = True,
    ):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        seed_sqlite_store(uri)
        # with a tracking server MLflow's client prints two "View run" lines per finished run (and asks the server
        # for the run to do it): one per image would bury the progress bar; the run prints the experiment's view
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self._client = MlflowClient(tracking_uri=uri)
        if experiment_id is None:
            found = self._client.get_experiment_by_name(experiment)
            if found is None:
                experiment_id = self._client.create_experiment(
                    experiment, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: "custom_model_development"}
                )
            else:
                experiment_id = found.experiment_id
                if EXPERIMENT_KIND_TAG not in found.tags:
                    self._client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
        self.experiment_id = experiment_id
        self._artifact_location = self._client.get_experiment(experiment_id).artifact_location
        self._artifact_root = _local_folder(self._artifact_location)
        # None for a tracking server, or artifacts that are not local files: run by run through the client
        self._bulk = BulkRunWriter.for_client(self._client, experiment_id) if self._artifact_root and bulk else None
        self._artifact_pool: Any = None  # threads for the bulk path's artifacts, made on first use
        self._server = uri.startswith(("http://", "https://"))
        self._client_pool: Any = None  # threads for a tracking server's requests, made on first use
        self.name_axes = list(name_axes)  # the sweep's axes, for readable child run names
        self.chart_images = chart_images  # a copy of each image under a key for the chart view (tracking.chart_images)
        self.parent_id: str | None = None
        self._children: dict[str, tuple[str, str, str]] = {}  # image id -> (run id, status, artifact uri)
        self.child_metrics: dict[str, set[str]] = {}  # image id -> metric keys its run had when loaded

    @property
    def in_bulk(self) -> bool:
        """New child runs are written in one transaction per batch (a database store with local artifacts)."""
        return self._bulk is not None

    # ------------------------------------------------------------ parent

    def start_parent(self, sweep: str, tags: Mapping[str, str], params: Mapping[str, str]) -> str:
        """The sweep's parent run: the existing one if this sweep ran before, else a new one."""
        existing = self._client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'parent'", order_by=["attributes.start_time ASC"], max_results=1
        )
        if existing:
            self.parent_id = existing[0].info.run_id
            self._client.update_run(self.parent_id, status="RUNNING")
        else:
            run = self._client.create_run(self.experiment_id, run_name=sweep, tags={ROLE_TAG: "parent", **tags})
            self.parent_id = run.info.run_id
            self._log_params(self.parent_id, params)
        self._client.set_tag(self.parent_id, "lora_sweep.last_started", time.strftime("%Y-%m-%dT%H:%M:%S"))
        self._load_children()
        return self.parent_id

    def attach_parent(self) -> str | None:
        """The sweep's existing parent run and its children, for logging after the fact (`lora-sweep score`)."""
        existing = self._client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'parent'", order_by=["attributes.start_time ASC"], max_results=1
        )
        if not existing:
            return None
        self.parent_id = existing[0].info.run_id
        self._load_children()
        return self.parent_id

    def _load_children(self) -> None:
        runs = self._client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_id}'", max_results=50000)
        for run in runs:
            image_id = run.data.tags.get(ID_TAG)
            if image_id and (image_id not in self._children or run.info.status == "FINISHED"):
                self._children[image_id] = (run.info.run_id, run.info.status, run.info.artifact_uri)
                self.child_metrics[image_id] = set(run.data.metrics)

    def end_parent(self, status: str) -> None:
        """End the parent run without attaching files (a server's run: its jobs are its record)."""
        if self.parent_id is not None:
            self._client.set_terminated(self.parent_id, status)

    def log_parent_files(self, files: Mapping[str, Path]) -> None:
        """Files onto the parent run, by artifact folder (`lora-sweep score` refreshes the report there)."""
        if self.parent_id is None:
            return
        for artifact_path, file in files.items():
            if file and file.exists():
                self._client.log_artifact(self.parent_id, str(file), artifact_path or None)

    def finish_parent(self, status: str, files: Mapping[str, Path], folders: Mapping[str, Path], metrics: Mapping[str, float]) -> None:
        """Attach the sweep's plan, results, grids and config; end the parent run with `status`."""
        if self.parent_id is None:
            return
        for name, value in metrics.items():
            self._client.log_metric(self.parent_id, name, float(value))
        for artifact_path, file in files.items():
            if file.exists():
                self._client.log_artifact(self.parent_id, str(file), artifact_path or None)
        for artifact_path, folder in folders.items():
            if folder.exists() and any(folder.iterdir()):
                self._client.log_artifacts(self.parent_id, str(folder), artifact_path)
        self._client.set_terminated(self.parent_id, status)

    # ------------------------------------------------------------ children

    def is_logged(self, image_id: str) -> bool:
        """The image has a finished (or failed) child run; a run left RUNNING by a killed sweep is not logged."""
        return self._children.get(image_id, ("", "", ""))[1] in ("FINISHED", "FAILED")

    def image_run(self, run_id: str) -> tuple[dict[str, str], dict[str, str], str] | None:
        """(params, tags, experiment id) of a run by id, or None if there is no such run (`lora-sweep reproduce`)."""
        try:
            run = self._client.get_run(run_id)
        except Exception:
            return None
        return dict(run.data.params), dict(run.data.tags), run.info.experiment_id

    def find_image_run(self, experiment_id: str, image_id: str) -> tuple[str, dict[str, str], dict[str, str]] | None:
        """(run id, params, tags) of the child run of an image id in an experiment, or None."""
        found = self._client.search_runs([experiment_id], filter_string=f"tags.`{ID_TAG}` = '{image_id}'", max_results=1)
        if not found:
            return None
        return found[0].info.run_id, dict(found[0].data.params), dict(found[0].data.tags)

    def download_image(self, run_id: str, image_id: str, where: Path) -> Path | None:
        """The image's PNG from its run's artifacts, into `where`; None when it cannot be had."""
        try:
            return Path(self._client.download_artifacts(run_id, f"{image_id}.png", str(where)))
        except Exception:
            return None

    def log_image(self, row: Mapping[str, Any], result: Any, image_path: Path | None, tags: Mapping[str, str]) -> None:
        """One child run per image id through the client: params, tags, generation time and the PNG.

        Four store calls per image (create, one batch, artifact, end); `log_images` writes many new
        runs of a database store in one transaction instead, and uses this for the rest.
        """
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        now = int(time.time() * 1000)
        known = self._children.get(row["id"])
        params: list[Param] = []
        if known:
            run_id, _, artifact_uri = known
            self._client.update_run(run_id, status="RUNNING")
        else:
            run = self._client.create_run(
                self.experiment_id,
                start_time=now - int(result.generation_s * 1000),
                run_name=run_name(row, self.name_axes),
                tags={PARENT_TAG: self.parent_id, ID_TAG: row["id"], **tags},
            )
            run_id, artifact_uri = run.info.run_id, run.info.artifact_uri
            params = [Param(k, v) for k, v in image_params(row).items()]
            if len(params) > 100:  # MLflow's limit per batch (blends of many LoRAs)
                self._log_params(run_id, {p.key: p.value for p in params})
                params = []
        run_tags = image_tags(result)
        chart = chart_source(result, image_path) if self.chart_images and image_path is not None else None
        if chart is not None:
            run_tags["mlflow.loggedImages"] = "True"
        self._client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, 0) for k, v in image_metrics(result).items()],
            params=params,
            tags=[RunTag(k, v) for k, v in run_tags.items()],
        )
        if image_path is not None:
            # a local store: the repository directly, skipping the client's run lookup per file; mlflow-artifacts:/
            # and friends resolve through this client's server
            local = get_artifact_repository(artifact_uri) if artifact_uri.startswith("file:") else None
            if local is not None:
                local.log_artifact(str(image_path))
            else:
                self._client.log_artifact(run_id, str(image_path))
            if chart is not None:  # under a key, so the chart view shows the images of several runs side by side
                with tempfile.TemporaryDirectory() as folder:
                    _chart_image(chart, image_path, Path(folder), now)
                    if local is not None:
                        local.log_artifacts(str(Path(folder) / "images"), "images")
                    else:
                        self._client.log_artifacts(run_id, str(Path(folder) / "images"), "images")
        status = "FINISHED" if result.status == "ok" else "FAILED"
        self._client.set_terminated(run_id, status, end_time=int(time.time() * 1000))
        self._children[row["id"]] = (run_id, status, artifact_uri)

    def log_images(self, items: list[tuple[Mapping[str, Any], Any, Path | None]], tags: Mapping[str, str]) -> None:
        """Log (row, result, png path) items: new runs of a database store with local artifacts in one transaction
        (`runner.tracking_sql`), anything else run by run through the client. Raises if MLflow cannot take them."""
        if self._bulk is None:
            self._log_by_client(items, tags)
            return
        fresh = [item for item in items if item[0]["id"] not in self._children]
        self._log_by_client([item for item in items if item[0]["id"] in self._children], tags)  # re-logged after a resume
        if not fresh:
            return
        try:
            self._log_new_runs(fresh, tags)
        except Exception as exc:
            self._log_by_client(fresh, tags)  # raises if MLflow itself is down, not only its bulk path
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            log.warning("MLflow's tables took runs one by one but not in bulk (%s); logging run by run from now on", first)
            self._bulk = None

    def _log_by_client(self, items: list[tuple[Mapping[str, Any], Any, Path | None]], tags: Mapping[str, str]) -> None:
        if self._server and len(items) > 1:  # requests to a server overlap: its workers take them in parallel
            if self._client_pool is None:
                self._client_pool = ThreadPoolExecutor(8, thread_name_prefix="lora-sweep-mlflow")
            list(self._client_pool.map(lambda item: self.log_image(item[0], item[1], item[2], tags), items))
            return
        for row, result, path in items:
            self.log_image(row, result, path, tags)

    def _log_new_runs(self, items: list[tuple[Mapping[str, Any], Any, Path | None]], tags: Mapping[str, str]) -> None:
        """Artifacts first (hard links of the sweep's PNGs, chart previews on a few threads), then every run's rows
        in one transaction."""
        import shutil
        import uuid

        root = self._artifact_root
        assert self._bulk is not None and root is not None
        now = int(time.time() * 1000)
        runs = []
        for row, result, _ in items:
            run_id = uuid.uuid4().hex
            runs.append(
                RunRows(
                    run_id=run_id,
                    name=run_name(row, self.name_axes),
                    start_ms=now - int(result.generation_s * 1000),
                    end_ms=now,
                    status="FINISHED" if result.status == "ok" else "FAILED",
                    artifact_uri=f"{self._artifact_location.rstrip('/')}/{run_id}/artifacts",
                    tags={PARENT_TAG: self.parent_id, ID_TAG: row["id"], **tags, **image_tags(result)},
                    params=image_params(row),
                    metrics=image_metrics(result),
                )
            )

        def artifacts(run: RunRows, result: Any, path: Path | None) -> None:
            if path is None:
                return
            folder = root / run.run_id / "artifacts"
            _link_or_copy(path, folder / path.name)
            chart = chart_source(result, path) if self.chart_images else None
            if chart is not None:  # PNG decode, resize and WebP release the GIL: a few threads keep up with several GPUs
                _chart_image(chart, path, folder, now)
                run.tags["mlflow.loggedImages"] = "True"

        if self._artifact_pool is None:
            self._artifact_pool = ThreadPoolExecutor(4, thread_name_prefix="lora-sweep-artifacts")
        try:
            list(self._artifact_pool.map(artifacts, runs, [r for _, r, _ in items], [p for _, _, p in items]))
            self._bulk.add_runs(runs)
        except BaseException:
            for run in runs:  # no run points at them
                shutil.rmtree(root / run.run_id, ignore_errors=True)
            raise
        for (row, _, _), run in zip(items, runs):
            self._children[row["id"]] = (run.run_id, run.status, run.artifact_uri)

    def log_scores(self, scores: Any, only_missing: bool = False) -> int:
        """Each image's scores as metrics on its child run (so the chart view can rank blends); returns runs logged.

        `only_missing` logs only the metrics a run does not have yet (what a run could not log while MLflow was down).
        """
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        by_image: dict[str, dict[str, float]] = {}
        for record in scores.to_dict("records"):
            have = self.child_metrics.get(record["id"], set()) if only_missing else set()
            metrics = {k: float(v) for k, v in record.items() if k != "id" and v == v and k not in have}
            if record["id"] in self._children and metrics:
                by_image[record["id"]] = metrics
        if self._bulk is not None:  # one transaction for the whole sweep's scores
            self._bulk.add_metrics({self._children[i][0]: metrics for i, metrics in by_image.items()}, now)
        else:
            for image_id, metrics in by_image.items():
                self._client.log_batch(self._children[image_id][0], metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
        for image_id, metrics in by_image.items():
            self.child_metrics.setdefault(image_id, set()).update(metrics)
        return len(by_image)

    # ------------------------------------------------------------ search trials

    def trial_numbers(self) -> set[int]:
        """The search trials that already have their run under this parent (a continued search logs the others)."""
        runs = self._client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_id}' and tags.`{ROLE_TAG}` = 'trial'",
            max_results=50000,
        )
        return {int(run.data.tags["lora_sweep.trial"]) for run in runs if run.data.tags.get("lora_sweep.trial", "").isdigit()}

    def log_trial(self, number: int, state: str, params: Mapping[str, Any], metrics: Mapping[str, float], image_ids: list[str]) -> None:
        """One child run per search trial: its parameters, objective and mean scores; its images linked by id."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        run = self._client.create_run(
            self.experiment_id,
            run_name=f"trial {number}",
            tags={PARENT_TAG: self.parent_id, ROLE_TAG: "trial", "lora_sweep.trial": str(number)},
        )
        self._client.log_batch(
            run.info.run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v == v],
            params=[Param(k, str(v)[:6000]) for k, v in params.items()],
            tags=[RunTag("state", state), RunTag("lora_sweep.image_ids", " ".join(image_ids)[:8000])],
        )
        self._client.set_terminated(run.info.run_id, "FINISHED" if state == "COMPLETE" else "FAILED")

    def tag_parent(self, tags: Mapping[str, str]) -> None:
        """Tags on the parent run (the best checkpoint of each training run...)."""
        if self.parent_id is None:
            return
        for key, value in tags.items():
            self._client.set_tag(self.parent_id, key, str(value)[:5000])

    def tag_best(self, number: int, value: float, params: Mapping[str, Any]) -> None:
        """The best trial on the parent run: its number, objective and parameters as tags."""
        if self.parent_id is None:
            return
        self._client.set_tag(self.parent_id, "best_trial", str(number))
        self._client.set_tag(self.parent_id, "best_value", f"{value:.6g}")
        for key, item in params.items():
            self._client.set_tag(self.parent_id, f"best.{key}", str(item))

    def log_ranking(self, ranking: Any) -> None:
        """The ranking as an MLflow table on the parent run (artifact ranking.json)."""
        if self.parent_id is not None and not ranking.empty:
            self._client.log_table(self.parent_id, data=ranking, artifact_file="ranking.json")

    def log_human(self, ranking: Any, agreement: Any) -> None:
        """People's votes on the parent run: tables human_ranking.json and human_agreement.json, and per cell (by its
        place in the people's ranking, k = 1 best) metrics human.k, human.k.low, human.k.high, human.k.votes with tag
        human.k.cell naming it (cell labels are no valid metric names); human_tau.<score> for each score's agreement."""
        from mlflow.entities import Metric, RunTag

        if self.parent_id is None or ranking.empty:
            return
        self._client.log_table(self.parent_id, data=ranking, artifact_file="human_ranking.json")
        if not agreement.empty:
            self._client.log_table(self.parent_id, data=agreement, artifact_file="human_agreement.json")
        now = int(time.time() * 1000)
        metrics, tags = {"human.votes": float(ranking["human_votes"].sum()) / 2}, {}
        for k, row in enumerate(ranking.to_dict("records"), start=1):
            metrics |= {f"human.{k}": row["human"], f"human.{k}.low": row["human_low"], f"human.{k}.high": row["human_high"]}
            metrics[f"human.{k}.votes"] = row["human_votes"]
            tags[f"human.{k}.cell"] = str(row["cell"])[:5000]
        for row in agreement.to_dict("records"):
            metrics |= {f"human_tau.{row['score']}": row["tau"], f"human_tau.{row['score']}.low": row["tau_low"]}
            metrics[f"human_tau.{row['score']}.high"] = row["tau_high"]
        items = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v == v]
        for start in range(0, len(items), 1000):
            self._client.log_batch(self.parent_id, metrics=items[start : start + 1000])
        tag_items = [RunTag(k, v) for k, v in tags.items()]
        for start in range(0, len(tag_items), 100):
            self._client.log_batch(self.parent_id, tags=tag_items[start : start + 100])

    def _log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self._client.log_batch(run_id, params=items[start : start + 100])


def open_tracker(cfg: Any, experiment: str | None = None, name_axes: list[str] | tuple[str, ...] = ()) -> tuple[Tracker | None, str | None]:
    """(Tracker, uri) for the config's tracking.*, or (None, None) with tracking off; the experiment defaults to the sweep's name."""
    if not cfg.tracking.enabled:
        return None, None
    outputs = Path(cfg.paths.outputs)
    uri = cfg.tracking.uri or default_uri(outputs)
    artifacts = cfg.tracking.artifact_location
    if not artifacts and not uri.startswith(("http://", "https://", "databricks")):
        artifacts = (outputs.resolve() / "mlartifacts").as_uri()  # beside the sqlite store, not ./mlruns
    try:
        tracker = Tracker(
            uri,
            cfg.tracking.experiment or experiment or cfg.sweep.name,
            artifacts,
            name_axes=name_axes,
            chart_images=bool(cfg.tracking.get("chart_images", True)),
        )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"tracking.uri: cannot use MLflow at {uri} ({first[:200]}); start the server, fix the URI, or run with tracking=none"
        ) from None
    return tracker, uri
