"""LoRA files in the formats users hold, loaded through the engine the runner uses."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import demo_engine, sweep_images
from safetensors.torch import save_file

pytestmark = pytest.mark.slow

MODULE = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


TE_MODULES = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.out_proj"]


def kohya_file(path, rank=4, alphas=(2.0, 1.0, 3.0), seed=0):
    """A kohya-format LoRA written by hand: lora_down / lora_up / alpha on a UNet attention projection and
    two text encoder projections (`lora_te_text_model_...`, as kohya names them), each with its own alpha.
    Returns module -> expected delta."""
    generator = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}
    modules = [(MODULE, 64, "lora_unet_")] + [(m, 32, "lora_te_text_model_") for m in TE_MODULES]
    for (module, width, prefix), alpha in zip(modules, alphas):
        down, up = torch.randn(rank, width, generator=generator), torch.randn(width, rank, generator=generator)
        name = prefix + module.replace(".", "_")
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}
        expected[module] = up @ down * (alpha / rank)
    save_file(tensors, str(path))
    return expected


def test_kohya_lora_reproduces_the_expected_weight_delta(assets_dir, tmp_path):
    expected = kohya_file(tmp_path / "kohya.safetensors")
    # unfused: the test reads the adapter's delta as peft scales it per blend
    engine = demo_engine(assets_dir, loras={"kohya": tmp_path / "kohya.safetensors"}, fuse_loras=False)
    engine.prepare(pd.DataFrame({"model_id": ["tiny-sd"]}))
    engine._set_adapters("kohya", "0.8")
    layers = {MODULE: engine.pipe.unet.get_submodule(MODULE)} | {m: engine.pipe.text_encoder.get_submodule(m) for m in TE_MODULES}
    for module, layer in layers.items():
        delta = layer.get_delta_weight("kohya")
        assert torch.allclose(delta, 0.8 * expected[module], atol=1e-5), f"alpha/rank scaling times the strength ({module})"
    engine._set_adapters("kohya", "0.4")
    for module, layer in layers.items():
        assert torch.allclose(layer.get_delta_weight("kohya"), 0.4 * expected[module], atol=1e-5)
    assert engine.adapters.in_text_encoder == {"kohya"}, "prompt embeddings are then computed per blend"
    engine.close()


def test_many_loras_are_loaded_per_group_and_unloaded_after_their_last_group(workspace):
    loras = {}
    for i in range(6):
        source = ["sunset", "stripes", "star"][i % 3]
        loras[f"lora{i}"] = shutil.copy(workspace.assets / "loras" / f"{source}.safetensors", workspace.root / f"lora{i}.safetensors")
    sweep = {
        "name": "many",
        "base": {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 2},
        "grid": {"lora_model": {"each": list(loras)}, "seed": [1, 2]},
    }
    extra = [f"+loras.{name}={{source: {path}}}" for name, path in loras.items()]
    workspace.run(f"sweep={workspace.sweep('many', sweep)}", "tracking=none", *extra).assert_all_ok()
    results = pd.read_parquet(workspace.outputs / "many" / "results.parquet")
    assert len(results) == 12 and set(results["status"]) == {"ok"}
    assert results["meta.adapters_loaded"].max() == 1, "never more adapters than the current blend needs"


def test_text_encoder_loras_get_prompt_embeddings_per_blend(workspace):
    """A LoRA that touches the text encoder: each strength's image is diffusers' own (embeddings are not reused)."""
    from diffusers import StableDiffusionPipeline
    from tiny_models import bare_diffusers_image

    from runner.world.assets import save_tiny_lora

    pipe = StableDiffusionPipeline.from_pretrained(workspace.assets / "tiny-sd", safety_checker=None, requires_safety_checker=False)
    save_tiny_lora(pipe, workspace.root / "te.safetensors", seed=21, text_encoder=True)
    sweep = {
        "name": "te",
        "base": {"prompt": "a red fox", "width": 64, "height": 64, "num_inference_steps": 4, "seed": 4, "lora_model": "te"},
        "grid": {"lora_strength": [0.3, 1.0]},
    }
    workspace.run(
        f"sweep={workspace.sweep('te', sweep)}", f"+loras.te={{source: {workspace.root / 'te.safetensors'}}}", "tracking=none"
    ).assert_all_ok()
    rows, pixels = sweep_images(workspace.outputs, "te")
    pipe.load_lora_weights(str(workspace.root), weight_name="te.safetensors", adapter_name="te")
    assert "te" in pipe.text_encoder.peft_config
    for row in rows.to_dict("records"):
        pipe.set_adapters(["te"], adapter_weights=[float(row["lora_strength"])])
        assert np.abs(pixels(row["id"]) - bare_diffusers_image(pipe, "a red fox", 4)).max() <= 1, row["lora_strength"]
