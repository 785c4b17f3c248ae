"""A sweep survives faults: each test causes the fault for real and checks nothing is lost or duplicated."""

from __future__ import annotations

import io
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import SLOW_SWEEP, Outage, assert_complete, free_port, mlflow_runs, start_mlflow_server, start_run, wait_for_results
from PIL import Image

from runner.errors import UserError
from runner.run import run_sweep

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupted_sweep_resumes_without_loss_or_duplicates(workspace, sig):
    path = workspace.sweep("long", SLOW_SWEEP)
    proc = start_run(workspace, f"sweep={path}", "engine.batch_size=1")
    wait_for_results(workspace.outputs / "long", 4, proc)
    proc.send_signal(sig)
    started = time.monotonic()
    out, err = proc.communicate(timeout=30)
    if sig == signal.SIGINT:
        assert time.monotonic() - started < 10, "Ctrl-C stops within a few seconds"
        assert proc.returncode == 130, err
        assert "interrupted:" in out and "continue where it stopped with the same command" in out
        assert "Traceback" not in err
        parent, _ = mlflow_runs(workspace.outputs, "long")
        assert parent["status"].iloc[0] == "KILLED"
        parent_id = parent["run_id"].iloc[0]
    else:
        assert proc.returncode == -signal.SIGKILL
        parent_id = mlflow_runs(workspace.outputs, "long")[0]["run_id"].iloc[0]
    done_before = len(pd.read_json(workspace.outputs / "long" / "results.jsonl", lines=True))
    assert 4 <= done_before < 12

    again = workspace.run(f"sweep={path}", "engine.batch_size=1")  # the same command again (in this process)
    again.assert_all_ok()
    assert f"{done_before} images already done" in again.out
    assert_complete(workspace, "long", 12)
    assert mlflow_runs(workspace.outputs, "long")[0]["run_id"].iloc[0] == parent_id, "the parent run is reused"


def write_nan_lora(source: Path, target: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(source)
    first = sorted(k for k in tensors if "lora" in k.lower())[0]
    tensors[first] = tensors[first] * float("nan")
    save_file(tensors, target)


def test_failed_images_are_recorded_and_the_sweep_goes_on(workspace):
    write_nan_lora(workspace.assets / "loras" / "sunset.safetensors", workspace.root / "diverged.safetensors")
    sweep = {
        "name": "faulty",
        "base": {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 4},
        "grid": {"lora_model": ["sunset", "diverged"], "seed": [1, 2]},
    }
    path = workspace.sweep("faulty", sweep)
    extra = f"+loras.diverged={{source: {workspace.root / 'diverged.safetensors'}}}"
    result = workspace.cli("run", f"sweep={path}", extra)
    assert result.code == 1, result.err  # finished, with failures
    assert "done: 2 ok, 2 failed, 0 skipped of 4 images" in result.out
    assert "retry_failed=true" in result.out
    results = pd.read_parquet(workspace.outputs / "faulty" / "results.parquet")
    plan = pd.read_parquet(workspace.outputs / "faulty" / "plan.parquet").set_index("id")
    failed = results[results["status"] == "failed"]
    assert set(plan.loc[failed["id"], "lora_model"]) == {"diverged"}
    assert failed["error"].str.contains("NaN in the output").all()
    _, children = mlflow_runs(workspace.outputs, "faulty")
    assert sorted(children["status"]) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]
    assert children.loc[children["status"] == "FAILED", "tags.error"].str.contains("NaN").all()
    for grid in (workspace.outputs / "faulty" / "grids").glob("*.png"):  # one per seed: one ok and one failed cell
        with Image.open(grid) as image:
            marked = (np.asarray(image.convert("RGB")) == (250, 225, 225)).all(axis=2).sum()
        assert marked > 32 * 32, "a failed image is a marked cell of its grid"
    report = (workspace.outputs / "faulty" / "report.html").read_text()
    assert report.count("NaN in the output") == 2, "the report lists each failure with its line"

    retry = workspace.run(f"sweep={path}", extra, "retry_failed=true")
    assert "done: 0 ok, 2 failed, 2 skipped of 4 images" in retry.out, retry.out
    _, children = mlflow_runs(workspace.outputs, "faulty")
    assert len(children) == 4, "a retried image reuses its MLflow run"


def test_changed_lora_file_is_detected_and_its_images_regenerated(workspace, tmp_path):
    import shutil

    own = tmp_path / "mine.safetensors"
    shutil.copy(workspace.assets / "loras" / "sunset.safetensors", own)
    sweep = {
        "name": "changing",
        "base": {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 4},
        "grid": {"lora_model": ["mine", "stripes"], "seed": [1, 2]},
    }
    path = workspace.sweep("changing", sweep)
    extra = f"+loras.mine={{source: {own}}}"
    workspace.run(f"sweep={path}", extra, "tracking=none").assert_all_ok()
    first_plan = pd.read_parquet(workspace.outputs / "changing" / "plan.parquet")
    shutil.copy(workspace.assets / "loras" / "star.safetensors", own)  # retrained: new weights
    result = workspace.run(f"sweep={path}", extra, "tracking=none")
    result.assert_all_ok()
    assert "LoRA 'mine' changed on disk since the last run" in result.out
    assert "done: 2 ok, 0 failed, 2 skipped of 4 images" in result.out
    second_plan = pd.read_parquet(workspace.outputs / "changing" / "plan.parquet")
    kept = set(first_plan["id"]) & set(second_plan["id"])
    assert set(second_plan.loc[second_plan["id"].isin(kept), "lora_model"]) == {"stripes"}
    grids = list((workspace.outputs / "changing" / "grids").glob("*.png"))
    assert grids, "grids are redrawn from the current plan only"


def test_second_run_on_the_same_sweep_refuses_and_stale_locks_are_taken_over(workspace):
    path = workspace.sweep("long", {**SLOW_SWEEP, "grid": {**SLOW_SWEEP["grid"], "seed": {"start": 0, "count": 16}}})  # outlasts a start
    first = start_run(workspace, f"sweep={path}", "tracking=none")
    try:
        wait_for_results(workspace.outputs / "long", 1, first)
        with pytest.raises(UserError) as second:  # the CLI prints it as its one `error:` line and exits with 2
            workspace.run(f"sweep={path}", "tracking=none")
        assert f"is in use by process {first.pid}" in str(second.value)
    finally:
        first.kill()
        first.wait()
    lock = workspace.outputs / "long" / ".lock"
    assert lock.read_text().strip() == str(first.pid)  # left behind by the killed run: stale now
    # the next run takes the stale lock over (two images of the sweep are enough to show it; all 32 took 15 s)
    workspace.run(f"sweep={path}", "tracking=none", "sweep.grid.seed=[0]").assert_all_ok()
    assert not lock.exists()


def test_mlflow_down_mid_sweep_keeps_writing_and_sync_backfills(workspace, tmp_path):
    server = start_mlflow_server(tmp_path, free_port())
    network = Outage(int(server.args[server.args.index("--port") + 1]))  # the run reaches the server through it
    try:
        path = workspace.sweep("long", {**SLOW_SWEEP, "grid": {"lora_model": ["sunset"], "seed": {"start": 0, "count": 8}}})
        env_overrides = ("engine.batch_size=1", f"tracking.uri=http://127.0.0.1:{network.port}")
        # no retries against the unreachable server: the same path, without waiting out urllib3's back-off
        proc = start_run(workspace, f"sweep={path}", *env_overrides, env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
        wait_for_results(workspace.outputs / "long", 3, proc)
        network.down()
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert "could not be logged to MLflow" in out
        results = pd.read_parquet(workspace.outputs / "long" / "results.parquet")
        assert len(results) == 8 and set(results["status"]) == {"ok"}, "images and results keep being written"
        assert not results["tracked"].all()

        network.up()  # the same server and store come back
        synced = io.StringIO()  # `lora-sweep sync`, in this process
        run_sweep(workspace.config(f"sweep={path}", *env_overrides), out=synced, generate=False)
        assert "earlier images to MLflow" in synced.getvalue(), synced.getvalue()
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"http://127.0.0.1:{network.port}")
        runs = client.search_runs([client.get_experiment_by_name("long").experiment_id])
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        ids = [r.data.tags["lora_sweep.id"] for r in children]
        assert len(ids) == 8 and len(set(ids)) == 8
        assert {r.info.status for r in children} == {"FINISHED"}
    finally:
        network.down()
        server.terminate()
        server.wait(timeout=30)


SECRET = "sk-lora-sweep-test-9f8e7d6c5b4a39281706"


def test_api_keys_never_reach_outputs_logs_or_mlflow(workspace, small_sweep):
    result = workspace.cli("run", f"sweep={small_sweep}", "sweep.grid.seed=[1]", env={"MODELSLAB_API_KEY": SECRET})
    assert result.code == 0, result.err
    refused = workspace.cli("plan", f"sweep={small_sweep}", f"sweep.base.key={SECRET}")
    assert refused.code == 2 and "API keys do not belong in sweep files" in refused.err
    for text in (result.out, result.err, refused.out, refused.err):
        assert SECRET not in text
    for file in workspace.outputs.rglob("*"):
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), f"key found in {file}"


def test_a_crash_after_the_images_releases_the_folder_and_ends_the_parent_failed(workspace, small_sweep, monkeypatch):
    """An error that escapes the sweep session (here: scoring blows up) must not leave MLflow showing a running sweep."""
    import runner.sweep.session as session

    def broken(*args, **kwargs):
        raise RuntimeError("scorer crashed")

    monkeypatch.setattr(session, "compute_scores", broken)
    with pytest.raises(RuntimeError, match="scorer crashed"):
        workspace.run(f"sweep={small_sweep}", "sweep.scores=[clip_score]")
    parent, children = mlflow_runs(workspace.outputs, "small")
    assert list(parent["status"]) == ["FAILED"]
    assert len(children) == 8 and set(children["status"]) == {"FINISHED"}, "the images were logged before the crash"
    monkeypatch.undo()
    again = workspace.run(f"sweep={small_sweep}", "sweep.scores=[clip_score]")  # the lock was released
    assert again.summary.skipped == 8 and again.summary.scored == 8
    parent, _ = mlflow_runs(workspace.outputs, "small")
    assert list(parent["status"]) == ["FINISHED"]
