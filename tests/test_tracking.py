"""The MLflow tracker on its own: runs written in bulk (one transaction per batch, runner/tracking_sql.py) read back
through MLflow's own client exactly like runs the client writes one call at a time; new sqlite stores start from a
template."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from runner.engines.base import ImageResult
from runner.image_file import png_bytes
from runner.request import parse_request
from runner.tracking import Tracker

TAGS = {"lora_sweep.sweep": "bulk", "lora_sweep.model_sha256": "ab" * 32}


def images(folder: Path) -> list[tuple[dict, ImageResult, Path | None]]:
    """Six images as the writer hands them over: a two-LoRA blend, a provider's meta, a failure, a wide image."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    items = []
    for k in range(6):
        body = {"prompt": "a red circle", "model_id": "tiny-sd", "seed": k, "lora_model": "sunset,stripes", "lora_strength": f"0.{k},0.5"}
        if k == 5:
            body.update(width=96, height=64)
        request, _ = parse_request(body)
        row = {**request, "id": f"{k:016x}", "blend": f"sunset 0.{k} + stripes 0.5"}
        if k == 3:  # a failed image has no PNG
            items.append((row, ImageResult(row["id"], "failed", error="CUDA out of memory", seed=k, generation_s=0.2), None))
            continue
        image = Image.fromarray(rng.integers(0, 255, (row["height"], row["width"], 3), dtype=np.uint8))
        result = ImageResult(
            row["id"], "ok", image=image, seed=k, scheduler="EulerDiscreteScheduler", generation_s=2.5, batch_size=2,
            notes=["clip_skip not applied"] if k == 1 else [], meta={"remote_id": "77"} if k == 2 else {},
        )  # fmt: skip
        path = folder / f"{row['id']}.png"
        path.write_bytes(png_bytes(image, row, {}))
        items.append((row, result, path))
    return items


def tracker(folder: Path, bulk: bool) -> Tracker:
    # bulk=False: the client path, run by run
    made = Tracker(
        f"sqlite:///{folder / 'mlflow.db'}", "bulk", (folder / "artifacts").as_uri(), name_axes=["lora_strength", "seed"], bulk=bulk
    )
    made.start_parent("bulk", TAGS, {"sweep": "bulk"})
    return made


def children(client: MlflowClient, made: Tracker) -> dict:
    runs = client.search_runs([made.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{made.parent_id}'")
    return {run.data.tags["lora_sweep.id"]: run for run in runs}


def artifact_files(client: MlflowClient, run_id: str, where: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, where):
        found += artifact_files(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def shape(path: str) -> str:
    """A chart image's name without its timestamp and uuid."""
    return path.split("+timestamp+")[0] + ("+compressed.webp" if path.endswith("+compressed.webp") else Path(path).suffix)


def test_bulk_written_runs_equal_the_clients_runs(tmp_path):
    items = images(tmp_path / "pngs")
    by_client, in_bulk = tracker(tmp_path / "client", bulk=False), tracker(tmp_path / "bulk", bulk=True)
    assert in_bulk.in_bulk, "a sqlite store with local artifacts takes the bulk path"
    by_client.log_images(items, TAGS)
    in_bulk.log_images(items[:4], TAGS)  # two batches, as the writer sends them
    in_bulk.log_images(items[4:], TAGS)
    scores = pd.DataFrame({"id": [r["id"] for r, _, _ in items], "clip_score": np.linspace(20, 25, 6), "aesthetic": 5.0})
    scores.loc[3, ["clip_score", "aesthetic"]] = np.nan  # a failed image has no scores
    assert by_client.log_scores(scores) == in_bulk.log_scores(scores) == 5

    client_a, client_b = MlflowClient(by_client.uri), MlflowClient(in_bulk.uri)
    expected, got = children(client_a, by_client), children(client_b, in_bulk)
    assert sorted(got) == sorted(expected) == sorted(r["id"] for r, _, _ in items)
    for image_id, want in expected.items():
        run = got[image_id]
        assert run.info.run_name == want.info.run_name and run.info.status == want.info.status, image_id
        assert run.info.lifecycle_stage == want.info.lifecycle_stage == "active"
        assert run.info.user_id == want.info.user_id
        assert run.data.params == want.data.params
        assert run.data.metrics == want.data.metrics
        other_tags = {k: v for k, v in want.data.tags.items() if k != "mlflow.parentRunId"}
        assert {k: v for k, v in run.data.tags.items() if k != "mlflow.parentRunId"} == other_tags
        assert run.data.tags["mlflow.parentRunId"] == in_bulk.parent_id
        duration = run.info.end_time - run.info.start_time
        assert abs(duration - (want.info.end_time - want.info.start_time)) < 1000 and duration >= 200
        files, wanted = artifact_files(client_b, run.info.run_id), artifact_files(client_a, want.info.run_id)
        assert sorted(map(shape, files)) == sorted(map(shape, wanted)), image_id
        if want.info.status == "FINISHED":
            png = client_b.download_artifacts(run.info.run_id, f"{image_id}.png", str(tmp_path / "down" / image_id))
            assert Path(png).read_bytes() == Path(tmp_path / "pngs" / f"{image_id}.png").read_bytes()
            webp = next(f for f in files if f.endswith(".webp"))
            thumb = Image.open(client_b.download_artifacts(run.info.run_id, webp, str(tmp_path / "down" / image_id)))
            want_webp = next(f for f in wanted if f.endswith(".webp"))
            assert thumb.size == Image.open(client_a.download_artifacts(want.info.run_id, want_webp, str(tmp_path / "want"))).size
    assert got["0000000000000005"].data.params["width"] == "96" and got["0000000000000001"].data.params["lora_strength.sunset"] == "0.1"
    for query in ("params.blend = 'sunset 0.2 + stripes 0.5'", "metrics.clip_score > 22", "tags.status = 'failed'"):
        found = client_b.search_runs([in_bulk.experiment_id], filter_string=query)
        assert sorted(r.data.tags["lora_sweep.id"] for r in found) == sorted(
            r.data.tags["lora_sweep.id"] for r in client_a.search_runs([by_client.experiment_id], filter_string=query)
        )
        assert found, query

    rescored = scores.assign(clip_score=scores["clip_score"] + 1)  # a second scoring: the latest value wins, history kept
    in_bulk.log_scores(rescored[["id", "clip_score"]])
    run = MlflowClient(in_bulk.uri).get_run(got["0000000000000000"].info.run_id)
    assert run.data.metrics["clip_score"] == pytest.approx(21.0)
    assert len(MlflowClient(in_bulk.uri).get_metric_history(run.info.run_id, "clip_score")) == 2


def test_a_store_that_refuses_bulk_inserts_is_logged_run_by_run(tmp_path, monkeypatch, caplog):
    """MLflow's tables are MLflow's: if a future schema refuses the bulk rows, the batch goes through the client."""
    from sqlalchemy.exc import IntegrityError

    import runner.tracking_sql

    def refuse(self, runs):
        raise IntegrityError("INSERT INTO runs", {}, Exception("NOT NULL constraint failed: runs.workspace"))

    items = images(tmp_path / "pngs")
    made = tracker(tmp_path / "store", bulk=True)
    monkeypatch.setattr(runner.tracking_sql.BulkRunWriter, "add_runs", refuse)
    with caplog.at_level(logging.WARNING, logger="runner.tracking"):
        made.log_images(items, TAGS)
    assert not made.in_bulk and "logging run by run from now on" in caplog.text
    runs = children(MlflowClient(made.uri), made)
    assert sorted(runs) == sorted(r["id"] for r, _, _ in items) and len(runs) == len(items)
    run_folders = {p.parent.name for p in (tmp_path / "store" / "artifacts").glob("*/artifacts")}
    with_png = {run.info.run_id for run in runs.values() if run.info.status == "FINISHED"}
    assert run_folders == with_png, "the refused batch left no artifact folders behind"


def test_new_sqlite_stores_start_from_an_empty_template(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_SWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    first = Tracker(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}", "one")
    second = Tracker(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}", "two")
    assert list((tmp_path / "cache").glob("mlflow-*-empty.db")), "the template is kept for the next store"
    for tracker, name in ((first, "one"), (second, "two")):
        client = MlflowClient(tracker.uri)
        assert sorted(e.name for e in client.search_experiments()) == sorted(["Default", name]), "each store has only its own"
        assert client.get_experiment("0").artifact_location == (tmp_path / "mlruns").as_uri()
        run = client.create_run(tracker.experiment_id)
        client.log_param(run.info.run_id, "seed", "3")
        assert client.get_run(run.info.run_id).data.params == {"seed": "3"}
