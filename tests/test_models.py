"""Where models come from: a diffusers folder, or a hub id already in the local cache (never downloaded)."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from helpers import fake_hub_cache, sweep_images

from runner.prepare import prepare_sweep

pytestmark = pytest.mark.slow


def test_hub_id_in_the_local_cache_loads_offline(workspace, small_sweep):
    cache = workspace.root / "hf-cache"
    fake_hub_cache(cache, "lora-sweep/tiny-sd", workspace.assets / "tiny-sd")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    overrides = ["+models.hub-tiny={source: lora-sweep/tiny-sd}", "model.id=hub-tiny", "sweep.grid.seed=[1]", "tracking=none"]
    result = workspace.cli("run", f"sweep={small_sweep}", *overrides, env=env)
    assert result.code == 0, result.err
    results = pd.read_parquet(workspace.outputs / "small" / "results.parquet")
    assert len(results) == 4 and set(results["status"]) == {"ok"}


def test_hub_id_not_in_the_cache_is_one_line_with_the_download_command(workspace, small_sweep):
    env = {"HF_HUB_CACHE": str(workspace.root / "empty-cache"), "HF_HUB_OFFLINE": "1"}
    result = workspace.cli("plan", f"sweep={small_sweep}", "+models.sd15={source: someone/not-cached}", "model.id=sd15", env=env)
    assert result.code == 2
    assert result.err_lines == [
        "error: models.sd15.source: hub model 'someone/not-cached' is not in the local Hugging Face cache "
        "(nothing is downloaded at run time); pre-download it with: huggingface-cli download someone/not-cached"
    ]


def test_file_hashes_are_cached_by_path_size_and_mtime(workspace, small_sweep):
    import os

    own = workspace.root / "mine.safetensors"
    shutil.copy(workspace.assets / "loras" / "sunset.safetensors", own)
    overrides = [f"+loras.mine={{source: {own}}}", "sweep.grid.lora_model=[mine]", "sweep.grid.seed=[1]"]

    def ids():  # the plan's ids as `lora-sweep plan` gives them
        prepared = prepare_sweep(workspace.config(f"sweep={small_sweep}", *overrides))
        assert prepared.problems == [], prepared.problems
        return sorted(prepared.plan["id"])

    first = ids()
    stat = own.stat()
    replacement = (workspace.assets / "loras" / "star.safetensors").read_bytes()
    assert len(replacement) == stat.st_size
    own.write_bytes(replacement)
    os.utime(own, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same path, size and mtime: the cached hash is used
    assert ids() == first, "a 2 GB checkpoint is not re-hashed on every run"
    os.utime(own)  # a new mtime: hashed again, and the new content gives new ids
    assert ids() != first


@pytest.fixture(scope="module")
def single_files(assets_dir, tmp_path_factory):
    """The demo model saved as original-layout single files (.safetensors and .ckpt) plus a folder of its configs only."""
    import torch
    from diffusers import StableDiffusionPipeline
    from ldm_layout import pipeline_to_ldm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("single")
    state = pipeline_to_ldm(StableDiffusionPipeline.from_pretrained(assets_dir / "tiny-sd"))
    save_file(state, str(root / "tiny.safetensors"))
    torch.save({"state_dict": state}, root / "tiny.ckpt")
    shutil.copytree(assets_dir / "tiny-sd", root / "configs", ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return root


def test_single_file_checkpoints_give_the_pixels_of_their_diffusers_folder(workspace, single_files):
    """Original-layout .safetensors and .ckpt load through from_single_file (configs from a weight-less folder), LoRAs too."""
    sweep = workspace.sweep(
        "single",
        {
            "name": "single",
            "base": {"prompt": "a red fox", "width": 64, "height": 64, "num_inference_steps": 4, "seed": 5},
            "grid": {"model_id": ["tiny-sd", "st", "ckpt"], "lora_model": ["", "sunset"]},
        },
    )
    configs = single_files / "configs"
    overrides = [
        f"+models.st={{source: {single_files / 'tiny.safetensors'}, config: {configs}}}",
        f"+models.ckpt={{source: {single_files / 'tiny.ckpt'}, config: {configs}}}",
        "tracking=none",
    ]
    workspace.run(f"sweep={sweep}", *overrides).assert_all_ok()
    rows, pixels = sweep_images(workspace.outputs, "single")
    assert set(rows["status"]) == {"ok"} and len(rows) == 6
    by = {(r.model_id, r.lora_model): pixels(r.id) for r in rows.itertuples()}
    for blend in ("", "sunset"):
        assert np.array_equal(by[("st", blend)], by[("tiny-sd", blend)])
        assert np.array_equal(by[("ckpt", blend)], by[("tiny-sd", blend)])
    assert not np.array_equal(by[("st", "sunset")], by[("st", "")]), "the LoRA applies to a single-file model too"
    assert len(set(rows["id"])) == 6, "each model's own hash enters the ids"


def test_single_file_without_its_configs_on_disk_says_what_to_download(workspace, small_sweep, single_files):
    env = {"HF_HUB_CACHE": str(workspace.root / "empty-cache")}
    result = workspace.cli(
        "plan", f"sweep={small_sweep}", f"+models.st={{source: {single_files / 'tiny.safetensors'}}}", "model.id=st", env=env
    )
    assert result.code == 2
    assert result.err_lines == [
        "error: models.st.config: the single-file checkpoint needs the configs of 'stable-diffusion-v1-5/stable-diffusion-v1-5', "
        "which are not on disk (nothing is downloaded); pre-download its configs: "
        "huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --include '*.json' '*.txt'"
    ]


def test_a_folder_of_fp16_variant_weights_loads_as_diffusers_would(workspace, assets_dir):
    """Only *.fp16.safetensors present: the variant is picked by itself and gives diffusers' own pixels."""
    import torch
    from diffusers import StableDiffusionPipeline
    from tiny_models import bare_diffusers_image

    folder = workspace.root / "tiny-fp16"
    StableDiffusionPipeline.from_pretrained(assets_dir / "tiny-sd").to(torch.float16).save_pretrained(folder, variant="fp16")
    assert list(folder.glob("unet/*.fp16.safetensors")) and not list(folder.glob("unet/diffusion_pytorch_model.safetensors"))
    sweep = workspace.sweep(
        "fp16", {"name": "fp16", "base": {"prompt": "a red fox", "width": 64, "height": 64, "num_inference_steps": 4, "seed": 5}}
    )
    workspace.run(f"sweep={sweep}", f"+models.half={{source: {folder}}}", "model.id=half", "tracking=none").assert_all_ok()
    rows, pixels = sweep_images(workspace.outputs, "fp16")
    reference = StableDiffusionPipeline.from_pretrained(folder, variant="fp16", torch_dtype=torch.float32)
    expected = bare_diffusers_image(reference, "a red fox", 5)
    assert np.abs(pixels(rows["id"][0]) - expected).max() <= 1

    missing = prepare_sweep(workspace.config(f"sweep={sweep}", f"+models.half={{source: {folder}, variant: bf16}}", "model.id=half"))
    assert missing.problems == [
        f"models.half.variant: {folder} has no 'bf16' weights (found: fp16); remove variant or download that variant"
    ]


def test_float16_runs_prefer_the_fp16_files_where_both_are_present(workspace, assets_dir):
    import torch
    from diffusers import StableDiffusionPipeline

    folder = workspace.root / "tiny-both"
    pipe = StableDiffusionPipeline.from_pretrained(assets_dir / "tiny-sd")
    pipe.save_pretrained(folder)
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
    sweep = workspace.sweep(
        "both", {"name": "both", "base": {"prompt": "a red fox", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 5}}
    )
    workspace.run(
        f"sweep={sweep}", f"+models.both={{source: {folder}}}", "model.id=both", "engine.dtype=float16", "tracking=none"
    ).assert_all_ok()
    rows, _ = sweep_images(workspace.outputs, "both")
    assert list(rows["meta.variant"]) == ["fp16"] and list(rows["status"]) == ["ok"]
