"""SDXL: the pipeline family is read from the model, and SDXL LoRAs (UNet + te1 + te2) and embeddings load into it."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import fake_hub_cache, sweep_images

from runner.prepare import prepare_sweep

pytestmark = pytest.mark.slow


def xl_overrides(sdxl_dir):
    return [
        f"+models.tiny-xl={{source: {sdxl_dir / 'tiny-xl'}}}",
        "model.id=tiny-xl",
        f"+loras.xl={{source: {sdxl_dir / 'xl_lora.safetensors'}}}",
        f"+loras.xl_te2={{source: {sdxl_dir / 'xl_te2_only.safetensors'}}}",
        f"+embeddings.xlemb={{source: {sdxl_dir / 'xl_emb.safetensors'}, token: '<xl-style>'}}",
        "tracking=none",
    ]


def test_sdxl_sweep_with_te1_te2_loras_clip_skip_and_embeddings(workspace, sdxl_dir):
    sweep = workspace.sweep(
        "xl",
        {
            "name": "xl",
            "base": {"prompt": "a <xl-style> fox", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 2},
            "grid": {"lora_model": ["", "xl", "xl_te2"], "clip_skip": [1, 2], "embeddings_model": [None, "xlemb"]},
        },
    )
    workspace.run(f"sweep={sweep}", *xl_overrides(sdxl_dir)).assert_all_ok()
    rows, pixels = sweep_images(workspace.outputs, "xl")
    assert len(rows) == 12 and set(rows["status"]) == {"ok"}
    assert set(rows["meta.pipeline"]) == {"StableDiffusionXLPipeline"}, "the SDXL pipeline is chosen from model_index.json"
    by = {(r.lora_model, r.clip_skip, r.embeddings_model): pixels(r.id) for r in rows.itertuples()}
    base = by[("", 1, None)]
    assert not np.array_equal(by[("xl", 1, None)], base), "the SDXL LoRA changes the image"
    assert not np.array_equal(by[("xl_te2", 1, None)], base), "a LoRA with only te2 keys reaches the second text encoder"
    assert not np.array_equal(by[("", 2, None)], base), "clip_skip=2 changes the SDXL text embeddings"
    assert not np.array_equal(by[("", 1, "xlemb")], base), "the clip_l/clip_g embeddings load into both text encoders"


def test_sdxl_only_fields_are_recorded_and_sd_loras_refused(workspace, sdxl_dir, small_sweep):
    import torch
    from safetensors.torch import save_file

    sd15 = workspace.root / "sd15.safetensors"  # the shapes of an SD 1.x LoRA: cross-attention keys 768 wide
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 768), f"{name}.lora_up.weight": torch.zeros(320, 4)}, str(sd15))

    def problems(*overrides) -> list[str]:  # what `lora-sweep plan` prints as error: lines
        return prepare_sweep(workspace.config(f"sweep={small_sweep}", *xl_overrides(sdxl_dir), *overrides)).problems

    assert problems(f"+loras.sd15={{source: {sd15}}}", "sweep.grid.lora_model=[sd15]") == [
        "loras.sd15: is made for SD 1.x but model 'tiny-xl' is text width 80; use it with a model of its family or drop it from the blend"
    ]
    sd_embedding = workspace.root / "sd-style.safetensors"  # one CLIP embedding: an SD 1.x textual inversion
    save_file({"emb_params": torch.zeros(1, 32)}, str(sd_embedding))
    assert problems(f"+embeddings.sd={{source: {sd_embedding}}}", "++sweep.base.embeddings_model=sd", "sweep.grid.lora_model=[xl]") == [
        "embeddings.sd: does not fit model 'tiny-xl', which needs clip_l and clip_g tensors (SDXL); use embeddings made for that model"
    ]
    planned = prepare_sweep(
        workspace.config(f"sweep={small_sweep}", *xl_overrides(sdxl_dir), "sweep.grid.lora_model=[xl]", "++sweep.base.panorama=yes")
    )
    assert planned.problems == [], planned.problems
    assert any("panorama not applied: diffusers has no SDXL panorama pipeline" in w for w in planned.warnings), planned.warnings


def test_sdxl_single_file_is_recognised_from_its_tensors_and_uses_the_cached_sdxl_configs(workspace, sdxl_dir):
    """No `config:`: the SDXL family is read from the checkpoint and the configs come from the cached SDXL base repo."""
    import shutil

    configs = workspace.root / "configs"
    shutil.copytree(sdxl_dir / "tiny-xl", configs, ignore=shutil.ignore_patterns("*.safetensors"))
    fake_hub_cache(workspace.root / "hf-cache", "stabilityai/stable-diffusion-xl-base-1.0", configs)
    sweep = workspace.sweep(
        "xlfile",
        {
            "name": "xlfile",
            "base": {"prompt": "a red fox", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 2},
            "grid": {"model_id": ["tiny-xl", "xl-file"], "lora_model": ["", "xl"]},
        },
    )
    overrides = [*xl_overrides(sdxl_dir), f"+models.xl-file={{source: {sdxl_dir / 'tiny-xl.safetensors'}}}"]
    result = workspace.cli("run", f"sweep={sweep}", *overrides, env={"HF_HUB_CACHE": str(workspace.root / "hf-cache")})
    assert result.code == 0, result.err
    rows, pixels = sweep_images(workspace.outputs, "xlfile")
    assert len(rows) == 4 and set(rows["status"]) == {"ok"} and set(rows["meta.pipeline"]) == {"StableDiffusionXLPipeline"}
    by = {(r["model_id"], r["lora_model"]): pixels(r["id"]) for r in rows.to_dict("records")}
    for blend in ("", "xl"):
        assert np.array_equal(by[("xl-file", blend)], by[("tiny-xl", blend)])
