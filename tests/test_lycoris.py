"""LyCORIS LoHa and LoKr files (kohya's key layout) on the demo's SD model: loaded as weight deltas and fused, their
pixels equal to the model with the same deltas merged by hand (a file of foreign keys: tests/test_lora_files.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import demo_pipeline, render, sweep_images
from safetensors.torch import save_file

BASE = {"prompt": "a red circle on a blue background", "width": 64, "height": 64, "num_inference_steps": 4, "seed": 2}
TARGETS = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"]
TE_TARGET = "encoder.layers.0.self_attn.q_proj"


def factors(kind: str, shape: tuple[int, int], generator) -> dict[str, torch.Tensor]:
    """A module's LyCORIS factors (rank 2, alpha 1) and the delta they stand for, computed here by hand."""
    out_f, in_f = shape
    r = lambda *s: torch.randn(*s, generator=generator) * 0.3  # noqa: E731
    if kind == "loha":
        t = {"hada_w1_a": r(out_f, 2), "hada_w1_b": r(2, in_f), "hada_w2_a": r(out_f, 2), "hada_w2_b": r(2, in_f)}
        delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (1 / 2)
    elif kind == "lokr-full":  # both factors whole: scale 1
        t = {"lokr_w1": r(4, 4), "lokr_w2": r(out_f // 4, in_f // 4)}
        delta = torch.kron(t["lokr_w1"], t["lokr_w2"])
    else:  # lokr, w2 factorised: scale alpha / rank
        t = {"lokr_w1": r(4, 4), "lokr_w2_a": r(out_f // 4, 2), "lokr_w2_b": r(2, in_f // 4)}
        delta = torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * (1 / 2)
    return t | {"alpha": torch.tensor(1.0)}, delta


@pytest.mark.parametrize("kind", ["loha", "lokr", "lokr-full"])
def test_a_lycoris_blend_equals_its_deltas_merged_by_hand(kind, workspace, tmp_path):
    torch.set_num_threads(1)
    pipe = demo_pipeline(workspace.assets)
    generator = torch.Generator().manual_seed(3)
    tensors, deltas = {}, {}
    unet, te = dict(pipe.unet.named_modules()), dict(pipe.text_encoder.named_modules())
    for path, prefix, modules in [*[(t, "lora_unet_", unet) for t in TARGETS], (TE_TARGET, "lora_te_text_model_", te)]:
        layer = modules[path]
        found, delta = factors(kind, tuple(layer.weight.shape), generator)
        tensors |= {f"{prefix}{path.replace('.', '_')}.{k}": v for k, v in found.items()}
        deltas[layer] = delta
    save_file(tensors, str(tmp_path / f"{kind}.safetensors"))
    path = workspace.sweep("ly", {"base": {**BASE, "lora_model": "ly", "lora_strength": 0.7}})
    entry = f"+loras.ly={{source: '{tmp_path / f'{kind}.safetensors'}'}}"
    workspace.run(f"sweep={path}", "sweep.name=ly", "tracking=none", entry).assert_all_ok()
    rows, pixels = sweep_images(workspace.outputs, "ly")
    assert set(rows["meta.lora_mode"]) == {"fused"}

    with torch.no_grad():
        for layer, delta in deltas.items():
            layer.weight += 0.7 * delta
    reference = render(pipe, BASE["prompt"], seed=2)
    assert np.abs(pixels(rows["id"].item()) - reference).max() <= 1
    again = workspace.run(f"sweep={path}", "sweep.name=plain", "tracking=none", "sweep.base.lora_model=", "~sweep.base.lora_strength")
    again.assert_all_ok()
    plain_rows, plain_pixels = sweep_images(workspace.outputs, "plain")
    assert not np.array_equal(plain_pixels(plain_rows["id"].item()), reference), "the deltas change the image"


def test_a_lycoris_file_blends_with_a_lora_fused_or_beside_peft(workspace, tmp_path):
    """LoKr + the demo's sunset LoRA: fused together, and with engine.fuse_loras=false (the LoKr still as a fused delta,
    sunset through peft), within a pixel level of each other."""
    pipe = demo_pipeline(workspace.assets)
    generator = torch.Generator().manual_seed(5)
    layer = dict(pipe.unet.named_modules())[TARGETS[0]]
    found, _ = factors("lokr", tuple(layer.weight.shape), generator)
    save_file({f"lora_unet_{TARGETS[0].replace('.', '_')}.{k}": v for k, v in found.items()}, str(tmp_path / "kr.safetensors"))
    path = workspace.sweep("mix", {"base": {**BASE, "lora_model": "kr,sunset", "lora_strength": "0.8,0.5"}})
    entry = f"+loras.kr={{source: '{tmp_path / 'kr.safetensors'}'}}"
    workspace.run(f"sweep={path}", "sweep.name=fused", "tracking=none", entry).assert_all_ok()
    workspace.run(f"sweep={path}", "sweep.name=peft", "tracking=none", "engine.fuse_loras=false", entry).assert_all_ok()
    (fused, fused_px), (peft, peft_px) = sweep_images(workspace.outputs, "fused"), sweep_images(workspace.outputs, "peft")
    assert set(peft["meta.lora_mode"]) == {"unfused"}
    assert np.abs(fused_px(fused["id"].item()) - peft_px(peft["id"].item())).max() <= 1


def test_a_dora_lora_runs_as_peft_computes_it(workspace, tmp_path):
    """DoRA (a magnitude vector per layer): not a plain weight delta, so it runs through peft's DoRA layers, unfused,
    and equals the same adapter on the model as peft itself applies it."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = demo_pipeline(workspace.assets)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False, use_dora=True)
    pipe.unet.add_adapter(config, adapter_name="d")
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path), unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="d"), weight_name="dora.safetensors"
    )
    path = workspace.sweep("dora", {"base": {**BASE, "lora_model": "dora", "lora_strength": 1}})
    workspace.run(
        f"sweep={path}", "sweep.name=dora", "tracking=none", f"+loras.dora={{source: '{tmp_path / 'dora.safetensors'}'}}"
    ).assert_all_ok()
    rows, pixels = sweep_images(workspace.outputs, "dora")
    assert set(rows["meta.lora_mode"]) == {"unfused"}
    assert np.abs(pixels(rows["id"].item()) - render(pipe, BASE["prompt"], seed=2)).max() <= 1
