"""LyCORIS files (LoHa, LoKr) as weight deltas, for the exact fused path of runner/engines/fuse.py.

diffusers loads neither, and peft's LoHa/LoKr layers cannot take kohya's files, so the deltas are computed from
the factors as LyCORIS and ComfyUI compute them and written into the base weights by FusedBlends (restored bit for
bit afterwards). Strength scales the whole delta, as in the web UIs:

- LoHa: dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank (rank = w1_b's rows);
- LoKr: dW = kron(w1, w2) * scale, each w given whole or as a @ b; scale = alpha / rank where a factor is split
  (rank = its b's rows), else 1 (LyCORIS' convention for full factors).

Module names are kohya's: `lora_unet_<diffusers path with _>` and `lora_te_[text_model_]<path>` (SD 1.x/2.x;
`lora_te1_`/`lora_te2_` for SDXL's encoders). Tucker (CP) factors (`hada_t1`, `lokr_t2`) are refused in one line.
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


def module_delta(tensors: Mapping[str, torch.Tensor], module: str, shape: torch.Size) -> torch.Tensor:
    """One module's delta at strength 1, in float32, shaped like its weight (ValueError, saying both, when it is not)."""
    delta = _delta(tensors, module)
    if delta.numel() != shape.numel():
        raise ValueError(f"{module}'s factors make a {'x'.join(map(str, delta.shape))} delta for a {'x'.join(map(str, shape))} layer")
    return delta.reshape(shape)


def _delta(tensors: Mapping[str, torch.Tensor], module: str) -> torch.Tensor:
    alpha = tensors.get(f"{module}.alpha")
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


def lycoris_deltas(pipe: Any, tensors: Mapping[str, torch.Tensor]) -> tuple[dict[nn.Module, tuple[torch.Tensor, str]], list[str], int]:
    """(layer -> (delta at strength 1, its component), the file's modules that match no layer, the file's modules)."""
    names = kohya_names(pipe)
    modules = sorted({k.split(".", 1)[0] for k in tensors})
    deltas: dict[nn.Module, tuple[torch.Tensor, str]] = {}
    unmatched = []
    for module in modules:
        if module not in names:
            unmatched.append(module)
            continue
        component, layer = names[module]
        deltas[layer] = (module_delta(tensors, module, layer.weight.shape).to(layer.weight.device), component)
    return deltas, unmatched, len(modules)
