"""Fused LoRA blends (the local engine's default), on the CPU: switching blends restores the base weights bit for
bit, a sweep runs fused and records it, and fused images equal peft's adapters' within rounding."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import torch
from helpers import SMALL_SWEEP, demo_engine, engine_rows, sweep_images

from runner.engines.local import LocalEngine

MODULE = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def base_weights(engine: LocalEngine) -> dict[str, torch.Tensor]:
    """Every weight of the UNet and text encoder that is not a LoRA's own, under its loaded name."""
    weights = {}
    for part in ("unet", "text_encoder"):
        for name, tensor in getattr(engine.pipe, part).state_dict().items():
            if ".lora_" not in name:
                weights[f"{part}.{name.replace('.base_layer', '')}"] = tensor.detach().clone()
    return weights


def test_fifty_blend_switches_leave_the_base_weights_bit_identical(assets_dir):
    engine = demo_engine(assets_dir, fuse_loras=True)
    engine.prepare(pd.DataFrame({"model_id": ["tiny-sd"]}))
    loaded = base_weights(engine)
    engine._load_adapters({"sunset", "stripes", "star"})
    layer = engine.pipe.unet.get_submodule(MODULE)
    blends = [("sunset", "1"), ("stripes", "0.5"), ("star", "0.75"), ("sunset,stripes", "0.4,0.9"), ("sunset,star", "1,0.25")]
    blends += [("sunset,stripes,star", "0.3,0.6,0.9"), ("", "")]
    rng = random.Random(0)
    for switch in range(50):
        names, strengths = rng.choice(blends)
        engine._set_adapters(names, strengths)
        fused = layer.get_base_layer().weight
        expected = loaded[f"unet.{MODULE}.weight"].clone()
        for name, strength in zip(names.split(",") if names else [], strengths.split(",")):
            expected += float(strength) * layer.get_delta_weight(name)  # peft's own delta (at strength 1: never set_adapters)
        assert torch.allclose(fused, expected, atol=1e-6), f"switch {switch}: the blend {names} @ {strengths} is fused"
        assert engine.adapters.mode == ("fused" if names else "none")
    engine._set_adapters("", "")
    after = base_weights(engine)
    assert after.keys() == loaded.keys()
    changed = [name for name in loaded if not torch.equal(after[name], loaded[name])]
    assert not changed, f"weights not restored bit for bit: {changed[:5]}"
    engine.close()


def test_a_sweep_runs_fused_by_default_and_records_how_it_ran(workspace):
    sweep = workspace.sweep("small", SMALL_SWEEP)
    workspace.run(f"sweep={sweep}", "tracking=none").assert_all_ok()
    images, pixels = sweep_images(workspace.outputs, "small")
    assert len(images) == 8 and set(images["meta.lora_mode"]) == {"fused"} and set(images["meta.compiled"]) == {False}
    assert set(images["batch_size"]) == {2}, "batch_size auto on a CPU: 4, here capped by the 2 seeds of a cell"
    weak, strong = (
        images[(images["lora_model"] == "sunset") & (images["seed"] == 1) & (images["lora_strength"] == s)]["id"].item()
        for s in ("0.5", "1")
    )
    assert np.abs(pixels(weak) - pixels(strong)).max() > 20, "each blend's strength reaches the pixels"


def test_fused_images_equal_unfused_within_tolerance_in_process(assets_dir):
    """The same rows through one engine with fusing on and one with it off (no CLI: the engine interface)."""
    rows = engine_rows([("sunset,stripes", "0.8,0.8")], [1, 2, 3])
    pixels = {}
    for fuse in (True, False):
        engine = demo_engine(assets_dir, fuse_loras=fuse)
        engine.prepare(rows)
        results = list(engine.generate(rows))
        engine.close()
        assert [r.status for r in results] == ["ok"] * 3
        assert {r.meta["lora_mode"] for r in results} == {"fused" if fuse else "unfused"}
        pixels[fuse] = np.stack([np.asarray(r.image, dtype=np.int16) for r in results])
    assert np.abs(pixels[True] - pixels[False]).max() <= 2
