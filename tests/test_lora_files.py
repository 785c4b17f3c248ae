"""LoRA files as trainers write them, on the demo's tiny SD (and the tiny SDXL): kohya's DoRA and LoCon, LyCORIS in
SDXL's SGM layout, each equal to the model with its weights merged by hand; and the check before image 1 that a file's
layers all exist in the model (a foreign file, a half-matching one, an SDXL LoRA on SD: one line each, exit 2)."""

from __future__ import annotations

import numpy as np
import torch
from helpers import demo_pipeline, render, sweep_images
from safetensors.torch import load_file, save_file

BASE = {"prompt": "a red circle on a blue background", "width": 64, "height": 64, "num_inference_steps": 4, "seed": 2}
ATTENTION = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"  # a 3x3 convolution: LoCon's extra layers
TE = "encoder.layers.0.self_attn.k_proj"


def kohya(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def lora_factors(weight: torch.Tensor, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's lora_down (rank x in [x kh x kw]) and lora_up (out x rank [x 1 x 1]) for a layer's weight."""
    out_f, in_f, *kernel = weight.shape
    down = torch.randn(rank, in_f, *kernel, generator=generator) * 0.2
    up = torch.randn(out_f, rank, *([1] * len(kernel)), generator=generator) * 0.2
    return down, up


def run_one(workspace, name: str, file, strength: float):
    """`lora-sweep run` (in this process) of one image with the file as LoRA `name` at `strength`: (its output, rows, pixels)."""
    path = workspace.sweep(name, {"base": {**BASE, "lora_model": name, "lora_strength": strength}})
    result = workspace.run(f"sweep={path}", f"sweep.name={name}", "tracking=none", f"+loras.{name}={{source: '{file}'}}")
    result.assert_all_ok()
    rows, pixels = sweep_images(workspace.outputs, name)
    return result, rows, pixels(rows["id"].item())


def render_merged(pipe, merged: dict) -> np.ndarray:
    """The reference: the base pipeline with the hand-merged weights written into its layers."""
    with torch.no_grad():
        for layer, weight in merged.items():
            layer.weight.copy_(weight)
    return render(pipe, BASE["prompt"], seed=2)


def test_a_kohya_dora_file_runs_fused_as_the_web_uis_merge_it(workspace, tmp_path):
    """dora_scale beside lora_down/lora_up: W' = m (W + dW) / ||W + dW|| per input column; strength s gives W + s (W' - W)."""
    torch.set_num_threads(1)
    pipe = demo_pipeline(workspace.assets)
    generator = torch.Generator().manual_seed(4)
    layers = {**{kohya(p): m for p, m in pipe.unet.named_modules() if p in (ATTENTION, CONV)}}
    layers |= {"lora_te_text_model_" + TE.replace(".", "_"): dict(pipe.text_encoder.named_modules())[TE]}
    tensors, merged = {}, {}
    for name, layer in layers.items():
        weight = layer.weight.detach().float()
        down, up = lora_factors(weight, 2, generator)
        delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (1.0 / 2)  # alpha 1, rank 2
        column_norm = (weight + delta).transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
        magnitude = column_norm * (1 + 0.3 * torch.rand(weight.shape[1], generator=generator))  # learned: not the norm itself
        shape = (1, -1, *[1] * (weight.dim() - 2))
        dora = (weight + delta) * (magnitude.reshape(shape) / column_norm.reshape(shape))
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)}
        tensors[f"{name}.dora_scale"] = magnitude.reshape(1, -1, *[1] * (weight.dim() - 2))
        merged[layer] = weight + 0.6 * (dora - weight)
    save_file(tensors, str(tmp_path / "dora.safetensors"), metadata={"ss_network_module": "lycoris.kohya", "ss_network_dim": "2"})
    result, rows, image = run_one(workspace, "kd", tmp_path / "dora.safetensors", 0.6)
    assert "lora kd: LyCORIS (kohya), DoRA rank 2" in result.out
    assert set(rows["meta.lora_mode"]) == {"fused"}
    assert np.abs(image - render_merged(pipe, merged)).max() <= 1


def test_a_kohya_locon_file_with_3x3_convolutions_equals_its_hand_merge(workspace, tmp_path):
    """LoCon: kohya's lora_down/lora_up on the ResNet convolutions too (a 3x3 down, a 1x1 up), through diffusers and peft."""
    torch.set_num_threads(1)
    pipe = demo_pipeline(workspace.assets)
    generator = torch.Generator().manual_seed(8)
    tensors, merged = {}, {}
    for path, layer in pipe.unet.named_modules():
        if path not in (ATTENTION, CONV):
            continue
        weight = layer.weight.detach().float()
        down, up = lora_factors(weight, 4, generator)
        delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (2.0 / 4)  # alpha 2, rank 4
        tensors |= {f"{kohya(path)}.lora_down.weight": down, f"{kohya(path)}.lora_up.weight": up, f"{kohya(path)}.alpha": torch.tensor(2.0)}
        merged[layer] = weight + 0.8 * delta
    save_file(
        tensors,
        str(tmp_path / "locon.safetensors"),
        metadata={"ss_network_module": "networks.lora", "ss_network_args": '{"conv_dim": "4"}'},
    )
    result, _, image = run_one(workspace, "lc", tmp_path / "locon.safetensors", 0.8)
    assert "lora lc: kohya, LoCon" in result.out
    assert np.abs(image - render_merged(pipe, merged)).max() <= 1


def test_a_lycoris_file_in_sdxl_sgm_layout_loads_as_in_diffusers_layout(workspace, sdxl_dir, tmp_path):
    """kohya trains SDXL on the SGM UNet: `lora_unet_input_blocks_4_1_...` names the same layers as diffusers' paths; both
    files of the same LoHa factors give the same pixels (the diffusers-named path is the one checked against a hand merge)."""
    from diffusers import StableDiffusionXLPipeline
    from ldm_layout import unet_to_ldm

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir / "tiny-xl")
    modules = dict(pipe.unet.named_modules())
    targets = [p for p in modules if p.endswith(("attn1.to_q", "attn2.to_v")) and p.startswith(("down_blocks", "up_blocks", "mid_block"))]
    targets += [p for p in modules if p.endswith("resnets.0.conv1")][:1]
    sgm = unet_to_ldm({f"{p}.weight": modules[p].weight for p in targets}, pipe.unet.config)
    sgm_name = {p: next(k for k, v in sgm.items() if v is modules[p].weight) for p in targets}
    generator = torch.Generator().manual_seed(9)
    diffusers_named, sgm_named = {}, {}
    for path in targets:
        out_f, *rest = modules[path].weight.shape
        in_f = int(np.prod(rest))
        factors = {
            "hada_w1_a": torch.randn(out_f, 2, generator=generator) * 0.3,
            "hada_w1_b": torch.randn(2, in_f, generator=generator) * 0.3,
            "hada_w2_a": torch.randn(out_f, 2, generator=generator) * 0.3,
            "hada_w2_b": torch.randn(2, in_f, generator=generator) * 0.3,
            "alpha": torch.tensor(1.0),
        }
        ldm = sgm_name[path].removeprefix("model.diffusion_model.").removesuffix(".weight")
        diffusers_named |= {f"{kohya(path)}.{k}": v for k, v in factors.items()}
        sgm_named |= {f"lora_unet_{ldm.replace('.', '_')}.{k}": v for k, v in factors.items()}
    assert any("input_blocks" in k for k in sgm_named) and any("output_blocks" in k for k in sgm_named)
    save_file(diffusers_named, str(tmp_path / "xl_loha.safetensors"))
    save_file(sgm_named, str(tmp_path / "xl_loha_sgm.safetensors"))
    images = []
    for name in ("xl_loha", "xl_loha_sgm"):
        path = workspace.sweep(name, {"base": {**BASE, "lora_model": "ly", "lora_strength": 0.9}})
        overrides = [f"+models.tiny-xl={{source: {sdxl_dir / 'tiny-xl'}}}", "model.id=tiny-xl", "tracking=none"]
        workspace.run(
            f"sweep={path}", f"sweep.name={name}", *overrides, f"+loras.ly={{source: '{tmp_path / name}.safetensors'}}"
        ).assert_all_ok()
        rows, pixels = sweep_images(workspace.outputs, name)
        images.append(pixels(rows["id"].item()))
    assert np.array_equal(images[0], images[1])


def test_files_whose_layers_the_model_lacks_are_one_line_each_and_nothing_is_generated(workspace, tmp_path):
    """Matched against the loaded model before image 1: a file of foreign keys, one whose text-encoder half names no
    layer (diffusers would drop it and generate with the rest), a LyCORIS file of unknown modules; then an SDXL LoRA on
    SD, refused at planning. Each names its file, its format and how many of its modules matched; exit 2, no image."""
    sunset = load_file(str(workspace.assets / "loras" / "sunset.safetensors"))
    unet_modules = len({k.split(".lora_")[0] for k in sunset})
    save_file(
        {"foo.bar.lora_A.weight": torch.zeros(4, 8), "foo.bar.lora_B.weight": torch.zeros(8, 4)}, str(tmp_path / "foreign.safetensors")
    )
    te = "lora_te_text_model_encoder_layers_9_self_attn_q_proj"  # the tiny text encoder has fewer layers
    half = {**sunset, f"{te}.lora_down.weight": torch.zeros(4, 32), f"{te}.lora_up.weight": torch.zeros(32, 4)}
    save_file(half, str(tmp_path / "halfway.safetensors"))
    loha = {f"lora_unet_no_such_block.{k}": torch.zeros(4, 2) for k in ("hada_w1_a", "hada_w2_a")}
    loha |= {f"lora_unet_no_such_block.{k}": torch.zeros(2, 4) for k in ("hada_w1_b", "hada_w2_b")}
    save_file(loha, str(tmp_path / "odd.safetensors"))
    path = workspace.sweep("bad", {"base": BASE, "grid": {"lora_model": ["sunset", "foreign", "halfway", "odd"]}})
    entries = [f"+loras.{n}={{source: '{tmp_path / n}.safetensors'}}" for n in ("foreign", "halfway", "odd")]
    result = workspace.cli("run", f"sweep={path}", "sweep.name=bad", "tracking=none", *entries)
    assert result.code == 2, result.err[-2000:]
    assert "Traceback" not in result.err
    errors = [line for line in result.err.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: loras.foreign: foreign.safetensors (diffusers/peft LoRA, 1 module: 1 unprefixed) matched 0 of its 1 modules "
        "on this SD 1.x/2.x model: none of its keys name a layer of it; use a LoRA made for SD 1.x/2.x or drop it from the blend",
        f"error: loras.halfway: halfway.safetensors (diffusers/peft LoRA, {unet_modules + 1} modules: {unet_modules} UNet/transformer, "
        f"1 text encoder) matched {unet_modules} of its {unet_modules + 1} modules on this SD 1.x/2.x model: its text encoder part "
        "(1 module) matches no layer; use a LoRA made for SD 1.x/2.x or drop it from the blend",
        "error: loras.odd: odd.safetensors (LyCORIS LoHa, 1 module) matched 0 of its 1 modules on this SD 1.x/2.x model: "
        "1 module name no layer (e.g. lora_unet_no_such_block); use a LoRA made for SD 1.x/2.x or drop it from the blend",
    ], errors
    assert not (workspace.outputs / "bad" / "images").exists() or not any((workspace.outputs / "bad" / "images").iterdir())


def test_an_sdxl_lora_on_the_sd_model_is_refused_before_loading(workspace, sdxl_dir):
    path = workspace.sweep("xl_on_sd", {"base": {**BASE, "lora_model": "xl"}})
    result = workspace.cli("run", f"sweep={path}", "tracking=none", f"+loras.xl={{source: {sdxl_dir / 'xl_lora.safetensors'}}}")
    assert result.code == 2
    errors = [line for line in result.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: loras.xl: is made for ") and "but model 'tiny-sd' is" in errors[0], errors
    assert not (workspace.outputs / "xl_on_sd" / "images").exists()
