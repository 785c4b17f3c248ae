"""LyCORIS files (LoHa, LoKr) as weight deltas, for the exact fused path of runner/engines/fuse.py.

diffusers loads neither, and peft's LoHa/LoKr layers cannot take kohya's files, so the deltas are computed from
the factors as LyCORIS and ComfyUI compute them and written into the base weights by FusedBlends (restored bit for
bit afterwards). Strength scales the whole delta, as in the web UIs:

- LoHa: dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank (rank = w1_b's rows);
- LoKr: dW = kron(w1, w2) * scale, each w given whole or as a @ b; scale = alpha / rank where a factor is split
  (rank = its b's rows), else 1 (LyCORIS' convention for full factors).

- DoRA (`dora_scale` beside lora_down/lora_up, or LoHa/LoKr factors): W' = dora_scale * (W + dW) / ||W + dW||, the
  norm per input column (dora_scale 1 x in, kohya/LyCORIS' default) or per output row (out x 1); the delta is W' - W,
  so strength s gives W + s (W' - W), as ComfyUI and A1111 apply it (peft's DoRA scales inside the norm instead).

Module names are kohya's: `lora_unet_<diffusers path with _>` and `lora_te_[text_model_]<path>` (SD 1.x/2.x;
`lora_te1_`/`lora_te2_` for SDXL's encoders), or SDXL's in the SGM layout kohya trains it in (`input_blocks_4_1_...`,
mapped with diffusers' own block map). Tucker (CP) factors (`hada_t1`, `lokr_t2`) are refused in one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

PREFIXES = {"unet": ("lora_unet_",), "text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}


def kohya_names(pipe: Any) -> dict[str, tuple[str, nn.Module]]:
    """kohya module name -> (component, module) for the pipeline's UNet and CLIP text encoders."""
    names: dict[str, tuple[str, nn.Module]] = {}
    for component, prefixes in PREFIXES.items():
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for path, module in model.named_modules():
            if hasattr(module, "base_layer") and not isinstance(module, (nn.Linear, nn.Conv2d)):
                module = module.get_base_layer()  # a peft adapter wraps this layer: its base weight takes the delta
            elif path.endswith(".base_layer"):
                continue
            if isinstance(module, (nn.Linear, nn.Conv2d)) and path:
                flat = path.replace(".", "_")
                for prefix in prefixes:
                    names[prefix + flat] = (component, module)
                    if component != "unet":
                        names[prefix + "text_model_" + flat] = (component, module)  # transformers 4's CLIPTextModel path
    return names


def _factor(tensors: Mapping[str, torch.Tensor], module: str, name: str) -> tuple[torch.Tensor, int | None]:
    """A LoKr factor whole (`lokr_w1`) or as a @ b (`lokr_w1_a`, `lokr_w1_b`): (matrix, rank if split)."""
    whole = tensors.get(f"{module}.lokr_{name}")
    if whole is not None:
        return whole.float(), None
    a, b = tensors[f"{module}.lokr_{name}_a"].float(), tensors[f"{module}.lokr_{name}_b"].float()
    return a @ b, b.shape[0]


def module_delta(tensors: Mapping[str, torch.Tensor], module: str, weight: torch.Tensor) -> torch.Tensor:
    """One module's delta at strength 1, in float32, shaped like its weight (ValueError, saying both, when it is not)."""
    shape = weight.shape
    delta = _delta(tensors, module)
    if delta.numel() != shape.numel():
        raise ValueError(f"{module}'s factors make a {'x'.join(map(str, delta.shape))} delta for a {'x'.join(map(str, shape))} layer")
    delta = delta.reshape(shape)
    scale = tensors.get(f"{module}.dora_scale")
    return delta if scale is None else _dora_delta(weight.detach().float(), delta, scale.float())


def _dora_delta(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """W' - W for DoRA's W' = magnitude * (W + dW) / ||W + dW|| (per input column, or per output row)."""
    merged = weight + delta
    if magnitude.shape[0] == weight.shape[0] and magnitude.numel() == weight.shape[0]:  # out x 1: per output row
        norm = merged.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
        magnitude = magnitude.reshape(norm.shape)
    else:  # 1 x in: per input column (kohya and LyCORIS' default)
        norm = merged.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1).reshape(1, -1, *[1] * (weight.dim() - 2))
        magnitude = magnitude.reshape(norm.shape)
    return merged * (magnitude / norm) - weight


def _delta(tensors: Mapping[str, torch.Tensor], module: str) -> torch.Tensor:
    alpha = tensors.get(f"{module}.alpha")
    if f"{module}.lora_down.weight" in tensors:  # a LoRA (DoRA's direction): up @ down * alpha / rank
        down, up = tensors[f"{module}.lora_down.weight"].float(), tensors[f"{module}.lora_up.weight"].float()
        rank = down.shape[0]
        product = up.flatten(1) @ down.flatten(1)
        return product * (float(alpha) / rank if alpha is not None else 1.0)
    if f"{module}.hada_t1" in tensors or f"{module}.lokr_t2" in tensors:
        raise ValueError(f"{module} uses LyCORIS' Tucker (CP) factors, which this version does not load")
    if f"{module}.hada_w1_a" in tensors:
        w1 = tensors[f"{module}.hada_w1_a"].float() @ tensors[f"{module}.hada_w1_b"].float().flatten(1)
        w2 = tensors[f"{module}.hada_w2_a"].float() @ tensors[f"{module}.hada_w2_b"].float().flatten(1)
        rank = tensors[f"{module}.hada_w1_b"].shape[0]
        scale = float(alpha) / rank if alpha is not None else 1.0
        return w1 * w2 * scale
    w1, rank1 = _factor(tensors, module, "w1")
    w2, rank2 = _factor(tensors, module, "w2")
    rank = rank2 or rank1
    scale = float(alpha) / rank if alpha is not None and rank else 1.0
    return torch.kron(w1, w2.flatten(1) if w2.dim() > 2 else w2) * scale


SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
# SGM (LDM) layer names -> diffusers', once the blocks are mapped (kohya trains SDXL on the SGM UNet)
SGM_LAYERS = (
    ("lora_unet_input_blocks_0_0", "lora_unet_conv_in"),
    ("lora_unet_out_2", "lora_unet_conv_out"),
    ("lora_unet_input_blocks_", "lora_unet_down_blocks_"),  # diffusers' block map keeps the SGM block names
    ("lora_unet_middle_block_", "lora_unet_mid_block_"),
    ("lora_unet_output_blocks_", "lora_unet_up_blocks_"),
    ("lora_unet_time_embed_0", "lora_unet_time_embedding_linear_1"),
    ("lora_unet_time_embed_2", "lora_unet_time_embedding_linear_2"),
    ("lora_unet_label_emb_0_0", "lora_unet_add_embedding_linear_1"),
    ("lora_unet_label_emb_0_2", "lora_unet_add_embedding_linear_2"),
    ("_in_layers_2", "_conv1"),
    ("_out_layers_3", "_conv2"),
    ("_emb_layers_1", "_time_emb_proj"),
    ("_skip_connection", "_conv_shortcut"),
    ("_downsamplers_0_op", "_downsamplers_0_conv"),
)


def sgm_to_diffusers(tensors: Mapping[str, torch.Tensor], unet_config: Any) -> dict[str, torch.Tensor]:
    """kohya's SGM-layout UNet names (`lora_unet_input_blocks_4_1_...`) as diffusers' (`lora_unet_down_blocks_1_attentions_0_...`),
    the blocks mapped by diffusers' own function (as its LoRA loader does), the layers inside them by SGM_LAYERS."""
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(tensors), unet_config)
    renamed = {}
    for key, value in mapped.items():
        module, _, rest = key.partition(".")
        if module.startswith("lora_unet_"):
            for old, new in SGM_LAYERS:
                module = module.replace(old, new)
        renamed[f"{module}.{rest}"] = value
    return renamed


def lycoris_deltas(pipe: Any, tensors: Mapping[str, torch.Tensor]) -> tuple[dict[nn.Module, tuple[torch.Tensor, str]], list[str], int]:
    """(layer -> (delta at strength 1, its component), the file's modules that match no layer, the file's modules)."""
    names = kohya_names(pipe)
    if getattr(pipe, "unet", None) is not None and any(b in k for k in tensors if k.startswith("lora_unet_") for b in SGM_BLOCKS):
        tensors = sgm_to_diffusers(tensors, pipe.unet.config)
    modules = sorted({k.split(".", 1)[0] for k in tensors})
    deltas: dict[nn.Module, tuple[torch.Tensor, str]] = {}
    unmatched = []
    for module in modules:
        if module not in names:
            unmatched.append(module)
            continue
        component, layer = names[module]
        deltas[layer] = (module_delta(tensors, module, layer.weight).to(layer.weight.device), component)
    return deltas, unmatched, len(modules)
