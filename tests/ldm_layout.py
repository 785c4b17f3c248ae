"""Write a diffusers SD 1.x pipeline (or its VAE) in the original single-file layout.

The layout of A1111/ComfyUI checkpoints (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.transformer.text_model.*`): the exact inverse of the renaming diffusers'
`from_single_file` does, written for any `layers_per_block`, so tests can save a tiny pipeline
as a real single-file checkpoint and load it back.
"""

from __future__ import annotations

import re
from typing import Any

import torch

UNET_STATIC = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _swap_head(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def unet_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    per = config["layers_per_block"] + 1
    up_has_attention = ["Attn" in t for t in config["up_block_types"]]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head = next((k for k in UNET_STATIC if key.startswith(k + ".")), None)
        if head:
            out[UNET_STATIC[head] + key[len(head) :]] = value
            continue
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
        if m:
            side, block, kind, layer, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            if side == "down":
                if kind == "downsamplers":
                    name = f"input_blocks.{(block + 1) * per}.0.op.{rest.removeprefix('conv.')}"
                elif kind == "resnets":
                    name = f"input_blocks.{block * per + layer + 1}.0.{_swap_head(rest, UNET_RESNET)}"
                else:
                    name = f"input_blocks.{block * per + layer + 1}.1.{rest}"
            else:
                if kind == "upsamplers":
                    name = f"output_blocks.{block * per + per - 1}.{2 if up_has_attention[block] else 1}.{rest}"
                elif kind == "resnets":
                    name = f"output_blocks.{block * per + layer}.0.{_swap_head(rest, UNET_RESNET)}"
                else:
                    name = f"output_blocks.{block * per + layer}.1.{rest}"
            out[name] = value
            continue
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        if m is None:
            raise KeyError(f"no original-layout name for UNet key {key}")
        if m[1] == "resnets":
            out[f"middle_block.{2 * int(m[2])}.{_swap_head(m[3], UNET_RESNET)}"] = value
        else:
            out[f"middle_block.1.{m[3]}"] = value
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def vae_to_ldm(state: dict[str, torch.Tensor], config: Any, prefix: str = "first_stage_model.") -> dict[str, torch.Tensor]:
    blocks = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key.replace("conv_norm_out", "norm_out")
        m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
        if m:
            part, side, block, kind, layer, rest = m[1], m[2], int(m[3]), m[4], m[5], m[6]
            ldm_block = block if side == "down" else blocks - 1 - block
            if kind == "resnets":
                name = f"{part}.{side}.{ldm_block}.block.{layer}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                name = f"{part}.{side}.{ldm_block}.{'downsample' if side == 'down' else 'upsample'}.{rest}"
        m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        if m:
            part, kind, layer, rest = m[1], m[2], int(m[3]), m[4]
            if kind == "resnets":
                name = f"{part}.mid.block_{layer + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                name = f"{part}.mid.attn_1.{_swap_head(rest, VAE_ATTENTION)}"
                if value.ndim == 2:  # linear -> 1x1 conv, as the original checkpoints store it
                    value = value[:, :, None, None]
        out[prefix + name] = value
    return out


def text_encoder_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in state.items()}


def pipeline_to_ldm(pipe: Any) -> dict[str, torch.Tensor]:
    """The whole SD 1.x checkpoint: UNet + VAE + CLIP text encoder, contiguous for safetensors."""
    state = {
        **unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config),
        **vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config),
        **text_encoder_to_ldm(pipe.text_encoder.state_dict()),
    }
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection -> OpenCLIP names (SDXL's second text encoder): q/k/v fused into in_proj."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
        "text_projection": state.pop("text_projection.weight").T,
    }
    state.pop("embeddings.position_ids", None)
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        old, new = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{new}attn.in_proj_{kind}"] = torch.cat([state.pop(f"{old}self_attn.{p}_proj.{kind}") for p in "qkv"])
        for key in [k for k in state if k.startswith(old)]:
            rest = _swap_head(key[len(old) :], OPEN_CLIP_LAYER)
            out[new + rest] = state.pop(key)
    if state:
        raise KeyError(f"no OpenCLIP names for {sorted(state)}")
    return {prefix + k: v for k, v in out.items()}


def sdxl_pipeline_to_ldm(pipe: Any) -> dict[str, torch.Tensor]:
    """The whole SDXL checkpoint: UNet + VAE + CLIP-L (`embedders.0`) + OpenCLIP-G (`embedders.1`)."""
    state = {
        **unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config),
        **vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config),
        **{
            "conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v
            for k, v in pipe.text_encoder.state_dict().items()
        },
        **open_clip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."),
    }
    return {k: v.detach().contiguous().clone() for k, v in state.items()}
