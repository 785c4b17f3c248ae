"""Scores, ranking, grids, report.html and MLflow as a place to compare: through the CLI and the files written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import Workspace, fake_hub_cache, mlflow_runs, two_lora_sweep
from PIL import Image

pytestmark = pytest.mark.slow

SCORES = ["clip_score", "aesthetic", "lora_effect", "seed_spread"]
SCORED_SWEEP = two_lora_sweep(
    "scored", SCORES, "two LoRAs at two strengths, scored", width=128, height=128, num_inference_steps=8, scheduler="EulerDiscreteScheduler"
)


@pytest.fixture(scope="module")
def scored(tmp_path_factory, assets_dir):
    """One scored run (2 LoRAs x 2 strengths x 2 seeds + 2 baseline rows = 10 images), shared by the read-only tests."""
    ws = Workspace(tmp_path_factory.mktemp("scored"), assets_dir)
    result = ws.run(f"sweep={ws.sweep('scored', SCORED_SWEEP)}")
    result.assert_all_ok()
    folder = ws.outputs / "scored"
    return ws, result, folder, pd.read_parquet(folder / "results.parquet"), pd.read_parquet(folder / "plan.parquet")


def test_every_image_is_scored_in_results_and_mlflow(scored):
    ws, result, folder, results, plan = scored
    assert len(plan) == 10 and set(results["status"]) == {"ok"}
    assert "scored 10 images" in result.out
    table = plan.merge(results, on="id", suffixes=("", "_r"))
    for name in SCORES:
        assert table[name].notna().all(), name
    assert (table["clip_score"] >= 0).all() and (table["clip_score"] <= 100).all()
    baseline = table[table["lora_model"] == ""]
    with_lora = table[table["lora_model"] != ""]
    assert len(baseline) == 2 and (baseline["lora_effect"] == 0).all(), "the baseline is its own reference"
    assert (with_lora["lora_effect"] > 0).all()
    for _, cell in table.groupby("blend"):
        assert cell["seed_spread"].nunique() == 1 and cell["seed_spread"].iloc[0] > 0, "one spread per cell, across its seeds"
    _, children = mlflow_runs(ws.outputs, "scored")
    assert len(children) == 10
    by_id = children.set_index("tags.lora_sweep.id")
    for row in table.to_dict("records"):
        for name in SCORES:
            assert by_id.loc[row["id"], f"metrics.{name}"] == pytest.approx(row[name], rel=1e-5), name


def test_clip_score_is_transformers_clip_and_the_aesthetic_head_reads_its_embeddings(scored):
    import torch
    from safetensors.torch import load_file
    from transformers import CLIPModel, CLIPProcessor

    ws, _, folder, results, plan = scored
    clip_dir = ws.assets / "tiny-clip"
    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    row = results.iloc[3]
    with Image.open(folder / row["file"]) as image:
        inputs = processor(
            text=[plan.set_index("id").loc[row["id"], "prompt"]], images=image.convert("RGB"), return_tensors="pt", padding="max_length"
        )
    with torch.no_grad():
        image_emb = model.get_image_features(pixel_values=inputs["pixel_values"])
        text_emb = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    image_emb = getattr(image_emb, "pooler_output", image_emb)
    text_emb = getattr(text_emb, "pooler_output", text_emb)
    image_emb, text_emb = (torch.nn.functional.normalize(t, dim=-1) for t in (image_emb, text_emb))
    assert row["clip_score"] == pytest.approx(100 * max(0.0, float(image_emb @ text_emb.T)), abs=1e-3)
    head = load_file(str(ws.assets / "aesthetic.safetensors"))
    expected = float(image_emb @ head["layers.0.weight"].T + head["layers.0.bias"])
    assert row["aesthetic"] == pytest.approx(expected, abs=1e-3)


def test_ranking_orders_cells_by_mean_score_with_spread_and_interval(scored):
    _, result, folder, results, plan = scored
    ranking = pd.read_csv(folder / "ranking.csv")
    table = plan.merge(results, on="id", suffixes=("", "_r"))
    expected = table.groupby("blend")["clip_score"].agg(["mean", "std", "count"])
    assert len(ranking) == 5 and set(ranking["cell"]) == set(expected.index)
    assert list(ranking["rank"]) == [1, 2, 3, 4, 5]
    assert ranking["clip_score_mean"].is_monotonic_decreasing
    for row in ranking.to_dict("records"):
        assert row["clip_score_mean"] == pytest.approx(expected.loc[row["cell"], "mean"])
        assert row["clip_score_std"] == pytest.approx(expected.loc[row["cell"], "std"])
        assert row["images"] == expected.loc[row["cell"], "count"] == 2
        assert row["ci_low"] <= row["clip_score_mean"] <= row["ci_high"]
        assert "aesthetic_mean" in row and "lora_effect_mean" in row
    assert f"1. {ranking['cell'][0]}: " in result.out, "the run's closing lines name the best cell"
    assert (folder / "report" / "curves.png").exists()


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.ranking_cells: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("href", "src"):
            if attrs.get(key):
                self.links.append(attrs[key])
        if tag == "tr" and "data-cell" in attrs and self.ranking_cells is not None:
            self.ranking_cells.append(attrs["data-cell"])

    def handle_data(self, data):
        self.text.append(data)


def test_report_html_links_resolve_every_image_appears_and_ranking_matches_csv(scored):
    _, result, folder, results, _ = scored
    assert f"report:  {folder / 'report.html'}" in result.out
    page = (folder / "report.html").read_text()
    parser = Links()
    parser.feed(page)
    assert not [u for u in parser.links if u.startswith(("http:", "https:", "//"))], "no network resources"
    local = [u for u in parser.links if not u.startswith("#")]
    assert local and all((folder / u).is_file() for u in local), [u for u in local if not (folder / u).is_file()]
    for image_id in results.loc[results["status"] == "ok", "id"]:
        assert f"images/{image_id}.png" in local
    ranking = pd.read_csv(folder / "ranking.csv")
    assert parser.ranking_cells == list(ranking["cell"])
    text = "".join(parser.text)
    for mean in ranking["clip_score_mean"]:
        assert f"{mean:.3f}" in text
    assert "lora-sweep run" in text and "config.yaml" in text  # how to reproduce


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        if os.environ.get("LORA_SWEEP_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed (apt-get install -y chromium); .ci/run installs it")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return found


def test_report_renders_in_headless_chromium_without_broken_images(scored, tmp_path):
    ws, _, folder, _, _ = scored
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
    ]
    url = (folder / "report.html").as_uri()
    dom = subprocess.run([chromium(), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert 'data-loaded="yes"' in dom.stdout, dom.stderr[-2000:]
    assert 'data-broken-images="0"' in dom.stdout, "an image of the report did not load"
    shot = ws.outputs / "report-screenshot.png"
    subprocess.run([chromium(), *flags, "--window-size=1280,2000", f"--screenshot={shot}", url], capture_output=True, timeout=120)
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[:2] == (2000, 1280) and pixels.std() > 10, "the page rendered something"


def test_mlflow_experiment_opens_on_runs_with_readable_names_images_and_ranking(scored):
    from mlflow.tracking import MlflowClient

    ws, result, folder, _, _ = scored
    client = MlflowClient(f"sqlite:///{ws.outputs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("scored")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning" in result.out
    parent, children = mlflow_runs(ws.outputs, "scored")
    names = set(children["tags.mlflow.runName"])
    assert {"sunset 0.5 · seed 0", "star 1 · seed 1", "no LoRA · seed 0"} <= names
    child = children.iloc[0]
    files = [a.path for a in client.list_artifacts(child["run_id"])]
    assert f"{child['tags.lora_sweep.id']}.png" in files and "images" in files
    logged = [a.path for a in client.list_artifacts(child["run_id"], "images")]
    assert any(p.startswith("images/image+step+0") and p.endswith(".png") for p in logged), "log_image under the key 'image'"
    parent_files = {a.path for a in client.list_artifacts(parent["run_id"].iloc[0])}
    assert {"ranking.json", "report", "grids"} <= parent_files
    table = json.loads(Path(client.download_artifacts(parent["run_id"].iloc[0], "ranking.json", str(folder / ".dl"))).read_text())
    assert len(table["data"]) == 5


SCORER_MODULE = '''
import numpy as np


class Brightness:
    """A user's own learned scorer: the interface of runner/scores/learned.py."""

    def __init__(self, source, clip, device):
        self.scale = float(open(source).read())

    def score(self, images, prompts, image_embeddings):
        return np.array([self.scale * np.asarray(im, dtype=float).mean() for im in images])
'''


def test_score_command_adds_a_new_scorer_without_generating_and_logs_it(scored):
    ws, _, folder, results, _ = scored
    again = ws.cli("score", str(folder))
    assert again.code == 0, again.err
    assert "nothing to score" in again.out
    (ws.root / "my_scorer.py").write_text(SCORER_MODULE)
    (ws.root / "scale.txt").write_text("0.5")
    journal = (folder / "results.jsonl").read_text()
    scored_run = ws.cli(
        "score",
        str(folder),
        f"scorers.brightness={{source: {ws.root / 'scale.txt'}, kind: 'my_scorer:Brightness'}}",
        "sweep.scores=[clip_score,brightness]",
    )
    assert scored_run.code == 0, scored_run.err
    assert "scored 10 images (clip_score, brightness)" in scored_run.out
    assert (folder / "results.jsonl").read_text() == journal, "nothing was generated"
    after = pd.read_parquet(folder / "results.parquet").set_index("id")
    for _, row in after.iterrows():
        with Image.open(folder / row["file"]) as image:
            assert row["brightness"] == pytest.approx(0.5 * np.asarray(image.convert("RGB"), dtype=float).mean())
    assert after["clip_score"].equals(results.set_index("id").loc[after.index, "clip_score"]), "existing scores are kept"
    _, children = mlflow_runs(ws.outputs, "scored")
    assert children["metrics.brightness"].notna().all() and len(children) == 10


def test_grids_keep_aspect_stay_within_the_pixel_budget_and_report_works_midway(workspace):
    sweep = {
        "name": "wide",
        "base": {"prompt": "a red circle on a blue background", "width": 128, "height": 64, "num_inference_steps": 2},
        "grid": {"lora_model": {"each": ["sunset", "stripes", "star"]}, "lora_strength": [0.5, 1.0], "seed": [0, 1, 2, 3]},
        # at 64 px a page is 174x200 = 34,800 px; thumbnails shrink to 32x16, then each page splits into two parts
        "report": {"grid": {"x": "lora_strength", "y": "seed", "page": "lora_model"}, "cell_size": 64, "max_grid_pixels": 12000},
    }
    workspace.run(f"sweep={workspace.sweep('wide', sweep)}", "tracking=none").assert_all_ok()
    folder = workspace.outputs / "wide"
    grids = sorted((folder / "grids").glob("*.png"))
    assert [g.name for g in grids] == [f"lora_model={lora}_part{k}.png" for lora in ("star", "stripes", "sunset") for k in (1, 2)]
    for grid in grids:
        with Image.open(grid) as image:
            assert image.width * image.height <= 12000
            pixels = np.asarray(image.convert("RGB"))
        # the first thumbnail: 32x16, its 2:1 aspect kept (the image is blue around its red circle, the page white)
        cell = pixels[66 : 66 + 16, 40 : 40 + 32]
        assert (cell != 255).any(axis=2).all(), "a 32x16 thumbnail fills its cell"
        assert (pixels[66 + 16 : 66 + 17, 40 : 40 + 32] != pixels[66:67, 40 : 40 + 32]).any(), "the next row is another image"
    # a sweep still running or interrupted: most results are not there yet
    lines = (folder / "results.jsonl").read_text().splitlines()
    (folder / "results.jsonl").write_text("\n".join(lines[:5]) + "\n")
    (folder / "results.parquet").unlink()
    assert "report of 5 of 24 images" in workspace.folder_command("report", folder)
    assert "19 images not generated yet" in (folder / "report.html").read_text()


def test_a_clip_scorer_from_the_local_hub_cache_gives_the_same_scores(scored):
    """`scorers:` takes a hub id like models do, read from the local Hugging Face cache only."""
    ws, _, folder, results, _ = scored
    cache = ws.root / "hf-cache"
    fake_hub_cache(cache, "lora-sweep/tiny-clip", ws.assets / "tiny-clip")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    scored_again = ws.cli("score", str(folder), "scorers.hub={source: lora-sweep/tiny-clip}", "scores.clip=hub", env=env)
    assert scored_again.code == 0, scored_again.err
    assert "nothing to score" in scored_again.out  # the scores are there; now the same CLIP under another id, from a fresh folder:
    copy = ws.outputs / "scored-copy"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("scores.jsonl", "results.parquet", "mlflow*"))
    fresh = ws.cli("score", str(copy), "scorers.hub={source: lora-sweep/tiny-clip}", "scores.clip=hub", "tracking=none", env=env)
    assert fresh.code == 0, fresh.err
    again = pd.read_parquet(copy / "results.parquet").set_index("id")["clip_score"]
    assert np.allclose(again.loc[results["id"]].to_numpy(), results["clip_score"].to_numpy(), atol=1e-4)
    missing = ws.cli("score", str(copy), "scorers.hub={source: lora-sweep/not-there}", "scores.clip=hub", env=env)
    assert missing.code == 2 and missing.err_lines == [
        "error: scorers.hub.source: lora-sweep/not-there is neither a file or folder nor a hub id in the local cache; "
        "fix the path, or pre-download it with: huggingface-cli download lora-sweep/not-there"
    ]


def test_scores_made_without_mlflow_reach_the_runs_later(workspace, small_sweep):
    """Scored while MLflow was off; the next run back-fills the image runs, and `score` their missing metrics."""
    first = workspace.run(f"sweep={small_sweep}", "sweep.scores=[clip_score,seed_spread]", "tracking=none")
    first.assert_all_ok()
    assert "scored 8 images" in first.out
    again = workspace.run(f"sweep={small_sweep}", "sweep.scores=[clip_score,seed_spread]")
    again.assert_all_ok()
    assert "logged 8 earlier images to MLflow" in again.out and "scored" not in again.out
    _, children = mlflow_runs(workspace.outputs, "small")
    assert len(children) == 8 and "metrics.clip_score" not in children
    logged = workspace.folder_command("score", workspace.outputs / "small")
    assert "nothing to score" in logged and "logged the scores of 8 images to MLflow" in logged
    _, children = mlflow_runs(workspace.outputs, "small")
    results = pd.read_parquet(workspace.outputs / "small" / "results.parquet").set_index("id")
    for row in children.to_dict("records"):
        assert row["metrics.clip_score"] == pytest.approx(results.loc[row["tags.lora_sweep.id"], "clip_score"], rel=1e-5)


def test_the_ranking_sorts_from_the_keyboard(scored, tmp_path):
    from browser import browser
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    folder = scored[2]
    with browser(tmp_path / "profile") as page:
        page.get((folder / "report.html").as_uri())
        table = page.find_element(By.ID, "ranking-table")
        header = next(th for th in table.find_elements(By.CSS_SELECTOR, "th") if th.text == "clip_score_mean")
        column = [th.text for th in table.find_elements(By.CSS_SELECTOR, "th")].index("clip_score_mean")

        def values() -> list[float]:
            cells = table.find_elements(By.CSS_SELECTOR, f"tbody tr td:nth-child({column + 1})")
            return [float(c.text) for c in cells]

        page.execute_script("arguments[0].focus()", header)
        assert page.switch_to.active_element == header, "the header takes the keyboard focus"
        header.send_keys(Keys.ENTER)
        assert header.get_attribute("aria-sort") == "ascending" and values() == sorted(values())
        header.send_keys(Keys.SPACE)
        assert header.get_attribute("aria-sort") == "descending" and values() == sorted(values(), reverse=True)
