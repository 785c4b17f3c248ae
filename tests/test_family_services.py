"""The services around the local engine on a flow-matching DiT family (Flux.1 dev's tiny model, tests/family_world.py):
`serve` answers text2img with the pixels `run` makes, `engine.workers=2` on Ray gives a single process's ids and
pixels, and a search runs its trials on the Flux model. The model and its LoRAs reach the subprocesses (the server,
Ray's workers) as registry overrides."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pandas as pd
import pytest
from helpers import Workspace, free_port, mlflow_runs, sweep_images, wait_until_healthy
from PIL import Image

pytestmark = pytest.mark.slow

PROMPT = "a red circle on a blue background"
BASE = {"prompt": PROMPT, "width": 64, "height": 64, "num_inference_steps": 2}
KEY = "sk-family-services-5e6f7a8b9c0d"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # as this process's torch (family_world): CPU kernels round per thread count


@contextmanager
def torch_threads(count: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_image_sweep(ws: Workspace, name: str, request: dict) -> str:
    """The `sweep=` override of a sweep file holding this one request (no grid)."""
    return f"sweep={ws.sweep(name, {'name': name, 'base': request})}"


def test_serve_answers_a_flux_request_with_the_pixels_run_makes(family_world, workspace):
    """`lora-sweep serve` on the Flux model: a text2img request with a LoRA blend is answered with a 64x64 PNG whose id
    is the one `lora-sweep run` gives the same request, with identical pixels, made by the fused Flux pipeline."""
    model = family_world.get("flux")
    request = {**BASE, "model_id": "m", "seed": 3, "guidance_scale": 3.5, "lora_model": "a,b", "lora_strength": "0.5,1"}
    port = free_port()
    log = workspace.root / "serve.log"
    command = [sys.executable, "-m", "runner.cli", "serve", *workspace.paths, f"serve.port={port}", "tracking=none", *model.overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORA_SWEEP_API_KEYS": KEY, **ONE_THREAD}
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, cwd=workspace.root, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(f"{url}/health", proc, 120, "serve", log=log.read_text)
        reply = httpx.post(f"{url}/api/v6/images/text2img", json={"key": KEY, **request}, timeout=60).json()
        deadline = time.monotonic() + 60
        while reply["status"] == "processing" and time.monotonic() < deadline:
            time.sleep(0.1)
            reply = httpx.post(f"{url}/api/v6/images/fetch/{reply['id']}", json={"key": KEY}, timeout=60).json()
        assert reply["status"] == "success", reply
        response = httpx.get(reply["output"][0], timeout=30)
    finally:
        proc.terminate()  # SIGTERM: the clean stop of Ctrl-C
        proc.wait(timeout=60)
    assert proc.returncode == 0, log.read_text()
    assert response.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(response.content)) as image:
        served = np.asarray(image.convert("RGB"), dtype=np.int16)
    meta = reply["meta"]
    assert served.shape == (64, 64, 3) and (meta["W"], meta["H"], meta["steps"]) == (64, 64, 2)
    assert meta["model_id"] == "m" and meta["lora"] == "a,b" and meta["lora_strength"] == "0.5,1"
    made = pd.read_json(workspace.outputs / "served" / "results.jsonl", lines=True)
    record = made[made["id"] == meta["lora_sweep_id"]].iloc[0]
    assert record["meta.family"] == "flux" and record["meta.lora_mode"] == "fused", record

    with torch_threads(1):  # the server's one thread (ONE_THREAD)
        local = workspace.run(one_image_sweep(workspace, "local", request), "tracking=none", *model.overrides)
    local.assert_all_ok()
    rows, pixels = sweep_images(workspace.outputs, "local")
    assert list(rows["id"]) == [meta["lora_sweep_id"]], "the server keys the image by the id `run` gives it"
    assert np.array_equal(pixels(meta["lora_sweep_id"]), served)


RAY_SWEEP = {"name": "pooled", "base": BASE, "grid": {"lora_model": ["a", "b"], "lora_strength": [0.5], "seed": [1, 2]}}


def test_two_ray_workers_make_every_flux_image_once_with_one_process_pixels(family_world, workspace):
    """`engine.workers=2` on the Flux model: every planned id once, made by both Ray workers (the model reaching them as
    registry overrides), with the ids and exact pixels of the same sweep run in one process (batch size 1 and one
    thread on both sides, so no image is made in another batch or with another thread count), and one MLflow run per
    image from the driver. (SD on Ray: tests/test_ray.py's killed workers and drivers.)"""
    pytest.importorskip("ray")
    model = family_world.get("flux")
    path = workspace.sweep("pooled", RAY_SWEEP)
    pooled = workspace.cli("run", f"sweep={path}", "engine.workers=2", "engine.batch_size=1", *model.overrides, env=ONE_THREAD)
    assert pooled.code == 0, pooled.out + pooled.err
    assert "done: 4 ok, 0 failed" in pooled.out
    plan = pd.read_parquet(workspace.outputs / "pooled" / "plan.parquet")
    pooled_rows, pooled_pixels = sweep_images(workspace.outputs, "pooled")
    assert len(plan) == 4 and pooled_rows["id"].is_unique and sorted(pooled_rows["id"]) == sorted(plan["id"]), "every id once"
    assert pooled_rows["meta.worker"].nunique() == 2, "both workers made images"
    assert set(pooled_rows["meta.family"]) == {"flux"} and set(pooled_rows["meta.lora_mode"]) == {"fused"}
    parent, children = mlflow_runs(workspace.outputs, "pooled")
    assert len(parent) == 1 and len(children) == 4 and children["tags.lora_sweep.id"].is_unique
    assert set(children["tags.lib.workers"]) == {"2"}
    assert set(children["tags.mlflow.loggedImages"]) == {"True"}, "the chart view's copy, made from the workers' PNGs"

    with torch_threads(1):  # Ray gives each CPU actor one thread
        single = workspace.run(f"sweep={path}", "sweep.name=single", "engine.batch_size=1", "tracking=none", *model.overrides)
    single.assert_all_ok()
    single_rows, single_pixels = sweep_images(workspace.outputs, "single")
    assert sorted(pooled_rows["id"]) == sorted(single_rows["id"]), "the same ids"
    for image_id in single_rows["id"]:
        assert np.array_equal(pooled_pixels(image_id), single_pixels(image_id)), image_id


SEARCH = {
    "name": "found",
    "base": BASE,
    "search": {
        "space": {"lora_model": ["a", "b"], "lora_strength.a": [0.5, 1.0], "lora_strength.b": 0.8},
        "objective": "clip_score",
        "seeds": [0],
        "trials": 3,
        "batch": 3,
        "sampler": "random",
        "sampler_seed": 0,
    },
    "scores": ["clip_score"],
}


def test_a_search_runs_its_trials_on_the_flux_model_and_reports_the_best(family_world, workspace):
    """A 3-trial search over the Flux LoRAs: each trial's images are Flux images on disk, each trial an MLflow run, and
    the best trial (the highest objective) is in search.json, the output and the parent run's tags."""
    model = family_world.get("flux")
    result = workspace.run(f"sweep={workspace.sweep('found', SEARCH)}", "progress=false", *model.overrides)
    result.assert_all_ok()
    folder = workspace.outputs / "found"
    trials = pd.read_csv(folder / "search" / "trials.csv")
    assert sorted(trials["trial"]) == [0, 1, 2]
    assert set(trials["state"]) == {"COMPLETE"} and trials["objective"].notna().all(), result.out
    results = pd.read_parquet(folder / "results.parquet").set_index("id")
    for ids in trials["ids"]:
        for image_id in ids.split():
            assert (folder / "images" / f"{image_id}.png").exists()
            assert results.loc[image_id, "meta.family"] == "flux" and results.loc[image_id, "status"] == "ok"

    best = json.loads((folder / "search" / "search.json").read_text())["best"]
    assert best["value"] == trials["objective"].max()
    assert best["params"]["lora_model"] in ("a", "b")
    assert f"best trial {best['trial']}: clip_score = {best['value']:.4f}" in result.out
    parent, children = mlflow_runs(workspace.outputs, "found")
    assert (children["tags.lora_sweep.role"] == "trial").sum() == 3
    assert parent["tags.best_trial"].iloc[0] == str(best["trial"])
