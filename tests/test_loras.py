"""LoRA files in the formats users hold, loaded through the engine the runner uses."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from runner.engines.local import LocalEngine
from runner.registry import HashCache, resolve_lora, resolve_model

pytestmark = pytest.mark.slow

MODULE = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def kohya_file(path, rank=4, alpha=2.0, seed=0):
    """A kohya-format LoRA written by hand: lora_down / lora_up / alpha on one UNet attention projection."""
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, 64, generator=generator)
    up = torch.randn(64, rank, generator=generator)
    prefix = "lora_unet_" + MODULE.replace(".", "_")
    save_file({f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up, f"{prefix}.alpha": torch.tensor(alpha)}, str(path))
    return up @ down * (alpha / rank)


def engine_for(assets, loras):
    cache = HashCache(None)
    model, problem = resolve_model("tiny-sd", str(assets / "tiny-sd"), cache)
    assert problem is None
    resolved = {}
    for name, path in loras.items():
        resolved[name], problem = resolve_lora(name, str(path), None, cache)
        assert problem is None, problem
    return LocalEngine(models={"tiny-sd": model}, loras=resolved, device="cpu", dtype="float32")


def test_kohya_lora_reproduces_the_expected_weight_delta(assets_dir, tmp_path):
    expected = kohya_file(tmp_path / "kohya.safetensors")
    engine = engine_for(assets_dir, {"kohya": tmp_path / "kohya.safetensors"})
    engine.prepare(pd.DataFrame({"model_id": ["tiny-sd"]}))
    engine._set_adapters("kohya", "0.8")
    layer = engine.pipe.unet.get_submodule(MODULE)
    delta = layer.get_delta_weight("kohya")
    assert torch.allclose(delta, 0.8 * expected, atol=1e-5), "alpha/rank scaling times the strength"
    engine._set_adapters("kohya", "0.4")
    assert torch.allclose(layer.get_delta_weight("kohya"), 0.4 * expected, atol=1e-5)
    engine.close()


def test_many_loras_are_loaded_per_group_and_unloaded_after_their_last_group(workspace):
    loras = {}
    for i in range(6):
        source = ["ganyu", "more_details", "watercolor"][i % 3]
        loras[f"lora{i}"] = shutil.copy(workspace.assets / "loras" / f"{source}.safetensors", workspace.root / f"lora{i}.safetensors")
    sweep = {
        "name": "many",
        "base": {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 2},
        "grid": {"lora_model": {"each": list(loras)}, "seed": [1, 2]},
    }
    extra = [f"+loras.{name}={{source: {path}}}" for name, path in loras.items()]
    result = workspace.cli("run", f"sweep={workspace.sweep('many', sweep)}", "tracking=none", *extra)
    assert result.code == 0, result.err
    results = pd.read_parquet(workspace.outputs / "many" / "results.parquet")
    assert len(results) == 12 and set(results["status"]) == {"ok"}
    assert results["meta.adapters_loaded"].max() == 1, "never more adapters than the current blend needs"
