"""The demo's tiny world: the shipped files are what the manifest says, the script that trained them still
runs, and a person can read the images: the model draws what the prompt says, and each LoRA's effect is
visible and grows with its strength."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import Workspace
from PIL import Image

from runner.world.assets import SHIPPED, shipped_manifest

WORLD_PROMPT = "a red circle on a blue background"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shipped_files_match_their_manifest_and_are_copied_unchanged(assets_dir):
    manifest = shipped_manifest()
    assert {"tiny-sd/unet/diffusion_pytorch_model.safetensors", "loras/sunset.safetensors", "tiny-clip/model.safetensors"} <= set(manifest)
    for relative, digest in manifest.items():
        assert sha256(SHIPPED / relative) == digest, relative
        assert sha256(assets_dir / relative) == digest, f"{relative} copied into paths.assets"
    total = sum((SHIPPED / r).stat().st_size for r in manifest)
    assert total < 12 * 2**20, "a few MB"


def test_the_training_script_still_runs_and_writes_every_shipped_file(tmp_path):
    out = tmp_path / "world"
    proc = subprocess.run(
        [sys.executable, "-m", "runner.world.train", "--quick", "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert written == set(shipped_manifest())


def test_clip_pixels_used_in_training_equal_the_clip_processor():
    from runner.world.draw import draw, random_scene
    from runner.world.train import clip_image_processor, clip_pixels

    rng = np.random.default_rng(3)
    images = [draw(random_scene(rng), style) for style in ("plain", "sunset", "stripes", "star")]
    expected = clip_image_processor()(images=images, return_tensors="np")["pixel_values"]
    assert np.abs(clip_pixels(images).numpy() - expected).max() < 1e-5


@pytest.fixture(scope="module")
def strengths_sweep(tmp_path_factory, assets_dir):
    ws = Workspace(tmp_path_factory.mktemp("world"), assets_dir)
    sweep = {
        "name": "world",
        "base": {"prompt": WORLD_PROMPT, "width": 128, "height": 128, "num_inference_steps": 20, "scheduler": "EulerDiscreteScheduler"},
        "grid": {"lora_model": {"each": ["sunset", "stripes", "star"], "baseline": True}, "lora_strength": [0.5, 1.0], "seed": [0, 1, 2]},
    }
    ws.run(f"sweep={ws.sweep('world', sweep)}", "tracking=none").assert_all_ok()
    folder = ws.outputs / "world"
    table = pd.read_parquet(folder / "plan.parquet")

    def images(lora: str, strength: float | None) -> list[np.ndarray]:
        if strength is None:
            rows = table[table["lora_model"] == ""]
        else:
            rows = table[table["lora_model"] == lora]
            rows = rows[rows["lora_strength"].astype(float) == strength]
        out = []
        for image_id in rows.sort_values("seed")["id"]:
            with Image.open(folder / "images" / f"{image_id}.png") as im:
                out.append(np.asarray(im.convert("RGB"), dtype=float))
        assert len(out) == 3
        return out

    return images


def test_the_model_draws_what_the_prompt_says(strengths_sweep):
    for image in strengths_sweep("", None):
        centre = image[48:80, 48:80].reshape(-1, 3).mean(axis=0)
        corners = np.concatenate([image[:16, :16], image[:16, -16:], image[-16:, :16], image[-16:, -16:]]).reshape(-1, 3).mean(axis=0)
        assert centre[0] > centre[2] + 60, f"a red shape in the middle, got {centre}"
        assert corners[2] > corners[0] + 60, f"a blue background, got {corners}"


def warmth(image: np.ndarray) -> float:
    return float((image[..., 0] - image[..., 2]).mean())


def banding(image: np.ndarray) -> float:
    """How much the brightness of the middle changes between neighbouring 8-pixel bands (the stripes LoRA)."""
    rows = image[40:88, 48:80].mean(axis=(1, 2))
    bands = rows.reshape(-1, 8).mean(axis=1)
    return float(np.abs(np.diff(bands)).mean())


def star_likeness(images: list[np.ndarray], clip_dir: Path) -> float:
    """The tiny CLIP's preference for 'star' over 'circle' in the same colours."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    texts = ["a red star on a blue background", WORLD_PROMPT]
    inputs = processor(text=texts, images=[Image.fromarray(i.astype(np.uint8)) for i in images], return_tensors="pt", padding="max_length")
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    return float((logits[:, 0] - logits[:, 1]).mean())


@pytest.mark.parametrize(
    "lora, measure",
    [
        ("sunset", lambda ims, _: np.mean([warmth(i) for i in ims])),
        ("stripes", lambda ims, _: np.mean([banding(i) for i in ims])),
        ("star", star_likeness),
    ],
)
def test_each_lora_effect_is_visible_and_grows_with_strength(strengths_sweep, assets_dir, lora, measure):
    clip = assets_dir / "tiny-clip"
    values = [measure(strengths_sweep(lora, s), clip) for s in (None, 0.5, 1.0)]
    assert values[0] < values[1] < values[2], f"{lora}: {values} at strengths 0, 0.5, 1"
