"""The request fields that need more than the base pipeline: vae, embeddings_model, panorama, self_attention, upscale.

Each is compared with what a diffusers user gets by hand from the same files and seed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import sweep_images
from safetensors.torch import save_file
from tiny_models import bare_diffusers_image, build_tiny_latent_upscaler

pytestmark = pytest.mark.slow

BASE = {"prompt": "a <fox-style> fox", "width": 64, "height": 64, "num_inference_steps": 4, "seed": 7}


@pytest.fixture(scope="module")
def extras(tmp_path_factory, assets_dir):
    """Another VAE (folder and original-layout single file), an A1111-style embedding, a 2x latent upscaler."""
    from diffusers import AutoencoderKL
    from ldm_layout import vae_to_ldm

    root = tmp_path_factory.mktemp("extras")
    torch.manual_seed(11)
    # other weights, the model's VAE config (as a real replacement VAE has: a single file takes its config from the model's vae/)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(assets_dir / "tiny-sd" / "vae"))
    vae.save_pretrained(root / "alt-vae")
    save_file(
        {k: v.contiguous() for k, v in vae_to_ldm(vae.state_dict(), vae.config, prefix="").items()}, str(root / "alt-vae.safetensors")
    )
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(3))}, str(root / "fox-style.safetensors"))
    build_tiny_latent_upscaler().save_pretrained(root / "upscaler")
    return root


def reference_pipeline(assets_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(assets_dir / "tiny-sd", safety_checker=None, requires_safety_checker=False)


def test_vae_and_embeddings_fields(workspace, extras, assets_dir):
    from diffusers import AutoencoderKL

    sweep = workspace.sweep(
        "fields", {"name": "fields", "base": BASE, "grid": {"vae": [None, "alt", "alt_file"], "embeddings_model": ["fox", None]}}
    )
    overrides = [
        f"+vaes.alt={{source: {extras / 'alt-vae'}}}",
        f"+vaes.alt_file={{source: {extras / 'alt-vae.safetensors'}}}",  # configs from the model's vae/ folder
        f"+embeddings.fox={{source: {extras / 'fox-style.safetensors'}, token: '<fox-style>'}}",
        "tracking=none",
    ]
    workspace.run(f"sweep={sweep}", *overrides).assert_all_ok()
    rows, pixels = sweep_images(workspace.outputs, "fields")
    assert len(rows) == 6 and set(rows["status"]) == {"ok"}
    by = {(r.vae, r.embeddings_model): pixels(r.id) for r in rows.itertuples()}

    pipe = reference_pipeline(assets_dir)
    plain = bare_diffusers_image(pipe, BASE["prompt"], 7)
    assert np.abs(by[(None, None)] - plain).max() <= 1, "rows without the embedding see the token as plain text"
    pipe.load_textual_inversion(str(extras / "fox-style.safetensors"), token="<fox-style>")
    with_embedding = bare_diffusers_image(pipe, BASE["prompt"], 7)
    assert np.abs(by[(None, "fox")] - with_embedding).max() <= 1
    assert np.abs(with_embedding - plain).mean() > 0.5, "the embedding changes the image"

    pipe.vae = AutoencoderKL.from_pretrained(extras / "alt-vae")
    assert np.abs(by[("alt", "fox")] - bare_diffusers_image(pipe, BASE["prompt"], 7)).max() <= 1
    from PIL import Image

    alt_fox = next(r for r in rows.to_dict("records") if r["vae"] == "alt" and r["embeddings_model"] == "fox")
    with Image.open(workspace.outputs / "fields" / "images" / f"{alt_fox['id']}.png") as png:
        parameters = png.text["parameters"]  # what the web UIs read back: the VAE and embeddings by name and hash
    assert "VAE: alt" in parameters and 'TI hashes: "fox: ' in parameters
    grids = sorted(path.name for path in (workspace.outputs / "fields" / "grids").glob("*.png"))
    assert "embeddings_model=fox_vae=none.png" in grids and len(grids) == 6, grids
    for embedding in ("fox", None):
        assert np.array_equal(by[("alt_file", embedding)], by[("alt", embedding)]), "the single-file VAE is the same VAE"
        assert not np.array_equal(by[("alt", embedding)], by[(None, embedding)])


def test_panorama_self_attention_and_upscale(workspace, extras, assets_dir):
    from diffusers import StableDiffusionLatentUpscalePipeline, StableDiffusionPanoramaPipeline, StableDiffusionSAGPipeline

    base = {**BASE, "prompt": "a red fox"}
    grid = {"zip": {"panorama": [False, True, False, True], "self_attention": [False, False, True, True]}, "upscale": [False, True]}
    sweep = workspace.sweep("modes", {"name": "modes", "base": base, "grid": grid})
    workspace.run(
        f"sweep={sweep}", f"upscaler.source={extras / 'upscaler'}", "upscaler.num_inference_steps=3", "tracking=none"
    ).assert_all_ok()
    rows, pixels = sweep_images(workspace.outputs, "modes")
    assert len(rows) == 8 and set(rows["status"]) == {"ok"}
    by = {(r["panorama"], r["self_attention"], r["upscale"]): r for r in rows.to_dict("records")}
    assert by[(True, False, False)]["meta.pipeline"] == "StableDiffusionPanoramaPipeline"
    assert by[(False, True, False)]["meta.pipeline"] == "StableDiffusionSAGPipeline"
    assert by[(True, True, False)]["meta.pipeline"] == "StableDiffusionPanoramaPipeline"
    assert "self_attention not applied: the panorama pipeline has no self-attention guidance" in by[(True, True, False)]["notes"]
    assert by[(False, False, True)]["meta.upscaled"] and not by[(False, False, False)]["meta.upscaled"]

    pipe = reference_pipeline(assets_dir)
    panorama = bare_diffusers_image(StableDiffusionPanoramaPipeline.from_pipe(pipe), "a red fox", 7)
    sag = bare_diffusers_image(StableDiffusionSAGPipeline.from_pipe(pipe), "a red fox", 7)
    assert np.abs(pixels(by[(True, False, False)]["id"]) - panorama).max() <= 1
    assert np.abs(pixels(by[(False, True, False)]["id"]) - sag).max() <= 1
    assert not np.array_equal(panorama, sag)

    for key, row in by.items():
        size = pixels(row["id"]).shape[:2]
        assert size == ((128, 128) if key[2] else (64, 64)), f"upscale=yes doubles the size ({key})"
    upscaler = StableDiffusionLatentUpscalePipeline.from_pretrained(extras / "upscaler")
    upscaler.set_progress_bar_config(disable=True)
    pipe.set_progress_bar_config(disable=True)
    from diffusers import UniPCMultistepScheduler

    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    generator = [torch.Generator().manual_seed(7)]
    image = pipe("a red fox", width=64, height=64, num_inference_steps=4, generator=generator, output_type="np").images
    up = upscaler(
        prompt=["a red fox"],
        image=image,
        num_inference_steps=3,
        guidance_scale=0.0,
        generator=[torch.Generator().manual_seed(7)],
        output_type="np",
    )
    expected = (np.clip(up.images[0], 0, 1) * 255).round().astype(np.int16)
    assert np.abs(pixels(by[(False, False, True)]["id"]) - expected).max() <= 1
