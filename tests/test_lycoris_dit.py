"""LyCORIS (LoHa, LoKr) and kohya DoRA files on the DiT families, in the layouts trainers write them: kohya's BFL
names (`lora_unet_double_blocks_0_img_attn_qkv`: one module for to_q, to_k and to_v), ai-toolkit's dotted BFL names
(`diffusion_model.single_blocks.0.linear1`) and LyCORIS' own names over the diffusers model (`lycoris_layers_0_...`).

Each file is run through `lora-sweep run` on the family's tiny model; its pixels must equal the tiny model with the
deltas merged by hand, computed here from the factors and cut into the diffusers layers' rows by a table written
out below (not by the runner's). The real-size name map (19 + 38 blocks) is checked in test_flux_lora_formats.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from family_world import family_call, merged_render
from helpers import sweep_images
from safetensors.torch import save_file

STRENGTH = 0.8
BASE = {"prompt": "a red circle on a blue background", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 1}

# (file module name) -> the diffusers layers (in the family's tiny transformer) its delta's rows go to, in order;
# "swap": BFL's final modulation rows (shift, scale) are diffusers' norm_out rows (scale, shift)
LAYOUTS = {
    "flux": (
        "loha",
        {
            "lora_unet_double_blocks_0_img_attn_qkv": [
                "transformer_blocks.0.attn.to_q",
                "transformer_blocks.0.attn.to_k",
                "transformer_blocks.0.attn.to_v",
            ],
            "lora_unet_double_blocks_0_img_mlp_0": ["transformer_blocks.0.ff.net.0.proj"],
            "lora_unet_single_blocks_0_linear1": [
                "single_transformer_blocks.0.attn.to_q",
                "single_transformer_blocks.0.attn.to_k",
                "single_transformer_blocks.0.attn.to_v",
                "single_transformer_blocks.0.proj_mlp",
            ],
            "lora_unet_final_layer_adaLN_modulation_1": ["swap:norm_out.linear"],
            "lora_te1_text_model_encoder_layers_0_self_attn_k_proj": ["text_encoder:encoder.layers.0.self_attn.k_proj"],
        },
    ),
    "flux2": (
        "lokr",
        {
            "diffusion_model.double_blocks.0.txt_attn.qkv": [
                "transformer_blocks.0.attn.add_q_proj",
                "transformer_blocks.0.attn.add_k_proj",
                "transformer_blocks.0.attn.add_v_proj",
            ],
            "diffusion_model.single_blocks.0.linear1": ["single_transformer_blocks.0.attn.to_qkv_mlp_proj"],
            "diffusion_model.double_blocks.0.img_mlp.0": ["transformer_blocks.0.ff.linear_in"],
        },
    ),
    "z-image": (
        "loha",
        {"lycoris_layers_0_attention_to_q": ["layers.0.attention.to_q"], "lycoris_layers_0_feed_forward_w1": ["layers.0.feed_forward.w1"]},
    ),
    "chroma": (
        "dora",
        {
            "lora_unet_double_blocks_0_img_attn_qkv": [
                "transformer_blocks.0.attn.to_q",
                "transformer_blocks.0.attn.to_k",
                "transformer_blocks.0.attn.to_v",
            ],
            "lora_unet_single_blocks_0_linear2": ["single_transformer_blocks.0.proj_out"],
        },
    ),
}


def parse(target: str) -> tuple[str, str, bool]:
    """'text_encoder:encoder...' / 'swap:norm_out.linear' / 'transformer_blocks...' -> (component, layer, swapped)."""
    swapped = target.startswith("swap:")
    target = target.removeprefix("swap:")
    component, _, layer = target.rpartition(":")
    return component or "transformer", layer, swapped


def factors(kind: str, weight: torch.Tensor, generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A module's factors (rank 2, alpha 1) for a layer of `weight`'s shape and its delta, by hand."""
    out_f, in_f = weight.shape
    r = lambda *s: torch.randn(*s, generator=generator) * 0.6  # noqa: E731
    if kind == "loha":
        t = {"hada_w1_a": r(out_f, 2), "hada_w1_b": r(2, in_f), "hada_w2_a": r(out_f, 2), "hada_w2_b": r(2, in_f)}
        return t | {"alpha": torch.tensor(1.0)}, (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) / 2
    if kind == "lokr":  # both factors whole: no alpha scaling
        t = {"lokr_w1": r(4, 4), "lokr_w2": r(out_f // 4, in_f // 4)}
        return t | {"alpha": torch.tensor(1.0)}, torch.kron(t["lokr_w1"], t["lokr_w2"])
    # kohya DoRA: W' = m (W + dW) / ||W + dW|| per input column, the delta W' - W
    t = {"lora_down.weight": r(2, in_f), "lora_up.weight": r(out_f, 2), "alpha": torch.tensor(1.0)}
    merged = weight + t["lora_up.weight"] @ t["lora_down.weight"] / 2
    t["dora_scale"] = (weight.norm(dim=0) * 1.2).reshape(1, -1)
    return t, t["dora_scale"] * merged / merged.norm(dim=0, keepdim=True) - weight


def layout_file(family: str, model, path) -> list[tuple[str, str, slice, torch.Tensor]]:
    """Write the family's LyCORIS file; return the hand merge's edits at STRENGTH."""
    import diffusers

    kind, modules = LAYOUTS[family]
    pipe = diffusers.DiffusionPipeline.from_pretrained(model.folder)
    generator = torch.Generator().manual_seed(5)
    tensors, edits = {}, []
    for module, targets in modules.items():
        parsed = [parse(t) for t in targets]
        weights = [getattr(pipe, c).get_submodule(layer).weight.detach().float() for c, layer, _ in parsed]
        if parsed[0][2]:  # swapped halves: the file's rows are (second half, first half)
            half = weights[0].shape[0] // 2
            weights = [torch.cat([weights[0][half:], weights[0][:half]])]
        found, delta = factors(kind, torch.cat(weights), generator)
        tensors |= {f"{module}.{k}": v.contiguous() for k, v in found.items()}
        start = 0
        for (component, layer, swapped), weight in zip(parsed, weights):
            rows = weight.shape[0]
            piece = delta[start : start + rows]
            if swapped:
                half = rows // 2
                edits += [
                    (component, layer, slice(half, None), STRENGTH * piece[:half]),
                    (component, layer, slice(0, half), STRENGTH * piece[half:]),
                ]
            else:
                edits.append((component, layer, slice(None), STRENGTH * piece))
            start += rows
    save_file(tensors, str(path))
    return edits


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_a_lycoris_file_on_a_dit_family_equals_its_deltas_merged_by_hand(family, family_world, workspace, tmp_path):
    torch.set_num_threads(1)
    model = family_world.get(family)
    file = tmp_path / f"{family}-ly.safetensors"
    edits = layout_file(family, model, file)
    path = workspace.sweep("lydit", {"base": {**BASE, "lora_model": "ly", "lora_strength": STRENGTH}})
    result = workspace.run(f"sweep={path}", "sweep.name=lydit", "tracking=none", *model.overrides, f"+loras.ly={{source: '{file}'}}")
    result.assert_all_ok()
    rows, pixels = sweep_images(workspace.outputs, "lydit")
    row = rows.iloc[0]
    assert row["meta.lora_mode"] == "fused"
    reference = merged_render(model, edits, family_call(family, row), seed=1)
    assert np.abs(pixels(row["id"]) - reference).max() <= 1, family
    plain = merged_render(model, [], family_call(family, row), seed=1)
    assert np.abs(pixels(row["id"]) - plain).max() > 2, "the deltas change the image"


def test_a_lycoris_file_naming_layers_a_dit_model_lacks_is_one_line_before_any_image(family_world, workspace, tmp_path):
    """A Flux file with one block more than the model: the check before image 1 names the file, its format, how many
    of its modules matched and one that did not; nothing is generated."""
    from safetensors.torch import load_file

    from runner.errors import UserError

    model = family_world.get("flux")
    file = tmp_path / "deeper.safetensors"
    layout_file("flux", model, file)
    tensors = load_file(str(file))
    tensors |= {
        k.replace("double_blocks_0", "double_blocks_7"): v.clone() for k, v in tensors.items() if "double_blocks_0_img_attn_qkv" in k
    }
    save_file(tensors, str(file))
    path = workspace.sweep("lywrong", {"base": {**BASE, "lora_model": "ly", "lora_strength": STRENGTH}})
    with pytest.raises(UserError) as refused:
        workspace.run(f"sweep={path}", "sweep.name=lywrong", "tracking=none", *model.overrides, f"+loras.ly={{source: '{file}'}}")
    assert str(refused.value) == (
        "loras.ly: deeper.safetensors (LyCORIS LoHa, 6 modules) matched 5 of its 6 modules on this Flux.1 model: 1 module name no "
        "layer (e.g. lora_unet_double_blocks_7_img_attn_qkv); use a LoRA made for Flux.1 or drop it from the blend"
    )
    images = workspace.outputs / "lywrong" / "images"
    assert not images.exists() or not any(images.iterdir())


def test_a_lycoris_file_on_a_quantized_model_is_one_line(family_world, workspace, tmp_path):
    """A GGUF transformer's weights are packed bytes a delta cannot be added to exactly: refused, naming both."""
    import diffusers
    from single_file_tools import write_gguf

    from runner.errors import UserError

    pytest.importorskip("gguf")
    model = family_world.get("qwen-image")
    gguf = tmp_path / "qwen-image-tiny-Q8_0.gguf"
    write_gguf(diffusers.DiffusionPipeline.from_pretrained(model.folder).transformer.state_dict(), gguf, arch="qwen_image", small=0)
    file = tmp_path / "qwen-ly.safetensors"
    weight = torch.zeros(32, 32)
    tensors, _ = factors("loha", weight, torch.Generator().manual_seed(0))
    save_file({f"lycoris_transformer_blocks_0_attn_to_q.{k}": v for k, v in tensors.items()}, str(file))
    path = workspace.sweep("lygguf", {"base": {**BASE, "lora_model": "ly", "lora_strength": STRENGTH}})
    entries = [f"+models.m={{source: '{gguf}', config: '{model.folder}'}}", "model.id=m", f"+loras.ly={{source: '{file}'}}"]
    with pytest.raises(UserError) as refused:
        workspace.run(f"sweep={path}", "sweep.name=lygguf", "tracking=none", *entries)
    assert str(refused.value) == (
        "loras.ly: qwen-ly.safetensors is a LyCORIS LoHa, whose deltas are written into the weights, and this model's weights "
        "are quantized (gguf:Q8_0); use a LoRA export of it or the unquantized model"
    )
