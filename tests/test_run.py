"""`lora-sweep run` end to end on the tiny model: files, results, MLflow runs, grids, resume."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import SMALL_SWEEP, Workspace, mlflow_runs
from PIL import Image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, assets_dir):
    """One full run of the small sweep, shared by the read-only assertions below."""
    ws = Workspace(tmp_path_factory.mktemp("run"), assets_dir)
    path = ws.sweep("small", SMALL_SWEEP)
    result = ws.cli("run", f"sweep={path}", "engine.batch_size=2")  # the command line itself, end to end
    assert result.code == 0, result.err
    return ws, result


def test_run_writes_images_results_plan_config_and_grids(finished_sweep):
    ws, result = finished_sweep
    folder = ws.outputs / "small"
    plan = pd.read_parquet(folder / "plan.parquet")
    results = pd.read_parquet(folder / "results.parquet")
    assert len(plan) == 8
    assert sorted(results["id"]) == sorted(plan["id"])
    assert set(results["status"]) == {"ok"}
    assert set(results["scheduler"]) == {"UniPCMultistepScheduler"}
    assert (results["generation_s"] > 0).all()
    for image_id in plan["id"]:
        with Image.open(folder / "images" / f"{image_id}.png") as image:
            image.load()
            assert image.size == (64, 64)
            params = image.text["parameters"]
            assert "Negative prompt: blurry" in params and "Seed: " in params and "Lora hashes:" in params
            assert json.loads(image.text["lora_sweep"])["id"] == image_id
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved["sweep"]["name"] == "small" and saved["engine"]["batch_size"] == 2
    grids = sorted((folder / "grids").glob("*.png"))
    assert len(grids) == 2  # one per seed: x = strength, y = blend
    with Image.open(grids[0]) as grid:
        assert grid.width > 2 * 128 and grid.height > 2 * 128
    assert "done: 8 ok, 0 failed, 0 skipped of 8 images" in result.out
    assert "mlflow ui --backend-store-uri sqlite:///" in result.out


def test_mlflow_has_parent_and_one_child_per_image(finished_sweep):
    ws, _ = finished_sweep
    parent, children = mlflow_runs(ws.outputs, "small")
    assert len(parent) == 1 and parent["status"].iloc[0] == "FINISHED"
    plan = pd.read_parquet(ws.outputs / "small" / "plan.parquet")
    assert sorted(children["tags.lora_sweep.id"]) == sorted(plan["id"])
    assert set(children["tags.mlflow.parentRunId"]) == {parent["run_id"].iloc[0]}
    assert set(children["status"]) == {"FINISHED"}
    blend = children[children["params.lora_model"] == "sunset,stripes"].iloc[0]
    assert blend["params.lora_strength"] in ("0.5,0.5", "1,1")
    assert blend["params.lora_strength.sunset"] in ("0.5", "1.0")
    assert blend["params.width"] == "64" and blend["params.prompt"] == "a red fox"
    assert len(blend["tags.lora.sunset.sha256"]) == 64 and len(blend["tags.model.tiny-sd.sha256"]) == 64
    assert blend["tags.lib.diffusers"] and blend["tags.lib.torch"] and blend["tags.device"] == "cpu"
    assert blend["metrics.generation_s"] > 0

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{ws.outputs / 'mlflow.db'}")
    child_files = [a.path for a in client.list_artifacts(blend["run_id"])]
    assert set(child_files) == {f"{blend['tags.lora_sweep.id']}.png", "images"}  # the PNG, and the chart view's copy under a key
    parent_files = {a.path for a in client.list_artifacts(parent["run_id"].iloc[0])}
    assert {"plan.parquet", "results", "config", "grids", "report"} <= parent_files


def test_rerun_generates_nothing_new(finished_sweep):
    ws, _ = finished_sweep
    before = (ws.outputs / "small" / "results.jsonl").read_text()
    again = ws.run(f"sweep={ws.root / 'sweeps' / 'small.yaml'}", "engine.batch_size=2")
    again.assert_all_ok()
    assert "done: 0 ok, 0 failed, 8 skipped of 8 images" in again.out
    assert (ws.outputs / "small" / "results.jsonl").read_text() == before
    parent, children = mlflow_runs(ws.outputs, "small")
    assert len(parent) == 1 and len(children) == 8


def test_adding_seeds_generates_only_the_new_images(finished_sweep):
    ws, _ = finished_sweep
    more = ws.run(f"sweep={ws.root / 'sweeps' / 'small.yaml'}", "sweep.grid.seed=[1,2,3]", "engine.batch_size=2")
    more.assert_all_ok()
    assert "done: 4 ok, 0 failed, 8 skipped of 12 images" in more.out
    parent, children = mlflow_runs(ws.outputs, "small")
    assert len(parent) == 1 and len(children) == 12


def pixels(folder, image_id):
    with Image.open(folder / "images" / f"{image_id}.png") as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_loras_and_strengths_change_pixels_and_reruns_reproduce_them(workspace):
    sweep = {
        "name": "pixels",
        "base": {"prompt": "a red fox", "width": 64, "height": 64, "num_inference_steps": 4, "seed": 3},
        "grid": {"lora_model": {"each": ["sunset"], "baseline": True}, "lora_strength": [0.1, 1.0]},
    }
    path = workspace.sweep("pixels", sweep)
    workspace.run(f"sweep={path}", "tracking=none", "paths.outputs=" + str(workspace.root / "a")).assert_all_ok()
    workspace.run(f"sweep={path}", "tracking=none", "paths.outputs=" + str(workspace.root / "b"), "engine.batch_size=1").assert_all_ok()
    plan = pd.read_parquet(workspace.root / "a" / "pixels" / "plan.parquet").set_index("blend")
    assert list(plan.index) == ["no LoRA", "sunset 0.1", "sunset 1"]
    a, b = workspace.root / "a" / "pixels", workspace.root / "b" / "pixels"
    base, weak, strong = (pixels(a, plan.loc[k, "id"]) for k in ("no LoRA", "sunset 0.1", "sunset 1"))
    assert np.abs(strong - base).mean() > 1.0, "a LoRA at strength 1 must change the image"
    assert np.abs(strong - weak).mean() > 0.5, "strength 0.1 and 1.0 must differ"
    assert np.abs(weak - base).mean() < np.abs(strong - base).mean(), "a weaker LoRA moves the image less"
    for image_id in plan["id"]:
        assert np.array_equal(pixels(a, image_id), pixels(b, image_id)), "the same row must give the same pixels"


def test_the_prompt_decides_the_image(workspace):
    """Every prompt tokenizes into its own tokens on the tiny model, so a prompt axis compares real images."""
    sweep = {
        "name": "prompts",
        "base": {"width": 64, "height": 64, "num_inference_steps": 4, "seed": 3},
        "grid": {"prompt": ["a red fox", "a blue whale", "a red fox, star"]},
    }
    workspace.run(f"sweep={workspace.sweep('prompts', sweep)}", "tracking=none").assert_all_ok()
    plan = pd.read_parquet(workspace.outputs / "prompts" / "plan.parquet")
    images = [pixels(workspace.outputs / "prompts", image_id) for image_id in plan["id"]]
    assert np.abs(images[0] - images[1]).mean() > 1.0 and np.abs(images[0] - images[2]).mean() > 0.5
