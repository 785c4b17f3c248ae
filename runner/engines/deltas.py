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

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from runner.checkpoints import lora_module

# kohya's per-encoder prefixes (SD: lora_te_; SDXL, SD3, Flux: lora_te1_, lora_te2_ (Flux's T5), lora_te3_ (SD3's T5))
TEXT_ENCODER_PREFIXES = {"text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",), "text_encoder_3": ("lora_te3_",)}
# the denoiser's layers as underscore names: kohya's, diffusers' kohya mixture, and LyCORIS' own (wrapping the diffusers model)
DENOISER_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")
DENOISER_DOTTED = ("diffusion_model.", "")  # besides `<component>.`: ComfyUI's and ai-toolkit's dotted names, and bare ones

# BFL's module names (the original Flux.1 / Chroma / Flux.2 code, which kohya and ai-toolkit train on) -> the diffusers
# layers their output rows go to, in order. A name has a candidate per model generation; the first whose layers the
# loaded model has is used, so one table serves Flux.1 (ff.net.0.proj, split linear1) and Flux.2 (ff.linear_in, fused).
BFL_DOUBLE_BLOCK = {
    "img_mod.lin": (("norm1.linear",),),
    "txt_mod.lin": (("norm1_context.linear",),),
    "img_attn.qkv": (("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.to_qkv",)),
    "txt_attn.qkv": (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), ("attn.to_added_qkv",)),
    "img_attn.proj": (("attn.to_out.0",),),
    "txt_attn.proj": (("attn.to_add_out",),),
    "img_mlp.0": (("ff.net.0.proj",), ("ff.linear_in",)),
    "img_mlp.2": (("ff.net.2",), ("ff.linear_out",)),
    "txt_mlp.0": (("ff_context.net.0.proj",), ("ff_context.linear_in",)),
    "txt_mlp.2": (("ff_context.net.2",), ("ff_context.linear_out",)),
}
BFL_SINGLE_BLOCK = {
    "linear1": (("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), ("attn.to_qkv_mlp_proj",)),
    "linear2": (("proj_out",), ("attn.to_out",)),
    "modulation.lin": (("norm.linear",),),
}
BFL_OUTER = {
    "img_in": (("x_embedder",),),
    "txt_in": (("context_embedder",),),
    "time_in.in_layer": (("time_text_embed.timestep_embedder.linear_1",), ("time_guidance_embed.timestep_embedder.linear_1",)),
    "time_in.out_layer": (("time_text_embed.timestep_embedder.linear_2",), ("time_guidance_embed.timestep_embedder.linear_2",)),
    "guidance_in.in_layer": (("time_text_embed.guidance_embedder.linear_1",), ("time_guidance_embed.guidance_embedder.linear_1",)),
    "guidance_in.out_layer": (("time_text_embed.guidance_embedder.linear_2",), ("time_guidance_embed.guidance_embedder.linear_2",)),
    "vector_in.in_layer": (("time_text_embed.text_embedder.linear_1",),),
    "vector_in.out_layer": (("time_text_embed.text_embedder.linear_2",),),
    "double_stream_modulation_img.lin": (("double_stream_modulation_img.linear",),),
    "double_stream_modulation_txt.lin": (("double_stream_modulation_txt.linear",),),
    "single_stream_modulation.lin": (("single_stream_modulation.linear",),),
    "final_layer.linear": (("proj_out",),),
    "final_layer.adaLN_modulation.1": (("norm_out.linear",),),
}
SWAPPED_HALVES = {"final_layer.adaLN_modulation.1"}  # BFL's (shift, scale) rows are diffusers' norm_out (scale, shift)


WeightOf = Callable[[nn.Module], torch.Tensor]  # a layer's base weight (its loaded value, not a fused blend's)


@dataclass(frozen=True)
class Target:
    """Where a file's module goes: the layers (and row ranges of them) its delta's rows fill, in order."""

    component: str
    pieces: tuple[tuple[nn.Module, slice], ...]

    def base_weight(self, weight_of: WeightOf) -> torch.Tensor:
        """The weight the file's module stands for (a fused qkv: the three layers' rows stacked), for DoRA's norm."""
        return torch.cat([weight_of(layer)[rows] for layer, rows in self.pieces])


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's Linear/Conv2d layers by diffusers path; under a peft adapter its base layer (which takes the delta)."""
    layers = {}
    for path, module in model.named_modules():
        if hasattr(module, "base_layer") and not isinstance(module, (nn.Linear, nn.Conv2d)):
            module = module.get_base_layer()
        elif path.endswith(".base_layer"):
            continue
        if isinstance(module, (nn.Linear, nn.Conv2d)) and path:
            layers[path] = module
    return layers


def _whole(component: str, layer: nn.Module) -> Target:
    return Target(component, ((layer, slice(None)),))


def _bfl_names(layers: dict[str, nn.Module]) -> dict[str, tuple[str, ...]]:
    """BFL module name -> the diffusers layers it stands for, for each block the model has."""
    blocks = {p.split(".")[1] for p in layers if p.startswith("transformer_blocks.")}
    single = {p.split(".")[1] for p in layers if p.startswith("single_transformer_blocks.")}
    tables = [(f"double_blocks.{i}.", f"transformer_blocks.{i}.", BFL_DOUBLE_BLOCK) for i in blocks]
    tables += [(f"single_blocks.{i}.", f"single_transformer_blocks.{i}.", BFL_SINGLE_BLOCK) for i in single]
    tables.append(("", "", BFL_OUTER))
    names = {}
    for bfl_prefix, prefix, table in tables:
        for name, candidates in table.items():
            found = next((c for c in candidates if all(prefix + t in layers for t in c)), None)
            if found:
                names[bfl_prefix + name] = tuple(prefix + t for t in found)
    return names


def _split(component: str, layers: dict[str, nn.Module], paths: tuple[str, ...], swapped: bool) -> Target:
    if swapped:  # one layer, its two halves in the other order
        layer = layers[paths[0]]
        half = layer.weight.shape[0] // 2
        return Target(component, ((layer, slice(half, None)), (layer, slice(0, half))))
    return Target(component, tuple((layers[p], slice(None)) for p in paths))


def layer_names(pipe: Any, denoiser: str = "unet") -> dict[str, Target]:
    """Every name a LyCORIS/kohya file may give a layer of the pipeline's denoiser and text encoders -> its Target.

    kohya's `lora_unet_<path with _>` / `lora_te1_<path>`, `lora_transformer_` and `lycoris_` names, dotted
    `transformer.<path>` / `diffusion_model.<path>` ones, and BFL's layout for the Flux transformers
    (`lora_unet_double_blocks_0_img_attn_qkv`: one module for to_q, to_k and to_v)."""
    names: dict[str, Target] = {}
    for component, prefixes in TEXT_ENCODER_PREFIXES.items():
        model = getattr(pipe, component, None)
        if not isinstance(model, nn.Module):
            continue
        for path, layer in _layers(model).items():
            flat = path.replace(".", "_")
            for prefix in prefixes:
                names[prefix + flat] = names[prefix + "text_model_" + flat] = _whole(component, layer)  # + transformers 4's path
            names[f"{component}.{path}"] = _whole(component, layer)
    model = getattr(pipe, denoiser, None)
    if not isinstance(model, nn.Module):
        return names
    layers = _layers(model)
    for path, layer in layers.items():
        flat, target = path.replace(".", "_"), _whole(denoiser, layer)
        for prefix in DENOISER_PREFIXES:
            names[prefix + flat] = target
        for prefix in (f"{denoiser}.", *DENOISER_DOTTED):
            names[prefix + path] = target
    for bfl, paths in _bfl_names(layers).items():
        target = _split(denoiser, layers, paths, bfl in SWAPPED_HALVES)
        names.setdefault("lora_unet_" + bfl.replace(".", "_"), target)
        for prefix in DENOISER_DOTTED:
            names.setdefault(prefix + bfl, target)
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


@dataclass
class DeltaFile:
    """A LyCORIS / kohya DoRA file matched to the pipeline's layers. Only its factors are kept (on the layers' device):
    each blend computes the deltas again, so memory holds the factors, not a float32 copy of every layer it patches
    (a LoKr over all of SDXL's layers would be 10 GB of deltas)."""

    tensors: dict[str, torch.Tensor]
    targets: dict[str, Target]  # the file's module name -> where its delta goes
    denoiser: str
    _cached: tuple[str, torch.Tensor] | None = field(default=None, repr=False)  # the last module's delta (a qkv's three layers)

    def pieces(self) -> Iterator[tuple[nn.Module, str, int, bool]]:
        """(layer, module, piece, in a text encoder) for each layer row range the file writes."""
        for module, target in self.targets.items():
            for index, (layer, _) in enumerate(target.pieces):
                yield layer, module, index, target.component != self.denoiser

    def piece(self, module: str, index: int, weight_of: WeightOf) -> tuple[slice, torch.Tensor]:
        """One piece's rows of its layer and its delta at strength 1 (float32)."""
        target = self.targets[module]
        if self._cached is None or self._cached[0] != module:
            self._cached = (module, module_delta(self.tensors, module, target.base_weight(weight_of)))
        delta = self._cached[1]
        start = sum(weight_of(layer)[rows].shape[0] for layer, rows in target.pieces[:index])
        layer, rows = target.pieces[index]
        delta = delta[start : start + weight_of(layer)[rows].shape[0]]
        if index == len(target.pieces) - 1:
            self._cached = None
        return rows, delta


def match_file(pipe: Any, tensors: Mapping[str, torch.Tensor], denoiser: str = "unet") -> tuple[DeltaFile, list[str], int]:
    """(the file matched to the pipeline's layers, its modules that match no layer, its module count). Every module's
    delta is computed once here, so a factor that does not fit its layer is a ValueError before any image."""
    names = layer_names(pipe, denoiser)
    if denoiser == "unet" and getattr(pipe, "unet", None) is not None:
        if any(b in k for k in tensors if k.startswith("lora_unet_") for b in SGM_BLOCKS):
            tensors = sgm_to_diffusers(tensors, pipe.unet.config)
    modules = sorted({m for k in tensors if (m := lora_module(k))})
    targets = {m: names[m] for m in modules if m in names}
    unmatched = [m for m in modules if m not in names]
    device = next((t.pieces[0][0].weight.device for t in targets.values()), torch.device("cpu"))
    kept = {k: v.to(device) for k, v in tensors.items() if lora_module(k) in targets}
    file = DeltaFile(kept, targets, denoiser)
    for module, target in targets.items():
        module_delta(kept, module, target.base_weight(lambda layer: layer.weight.detach()))
    return file, unmatched, len(modules)
