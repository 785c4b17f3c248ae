"""Test tools for single-file and GGUF transformers: original-layout state dicts and city96-style GGUF files.

Users hold Flux.1 / Qwen-Image / Z-Image transformers as one ``.safetensors`` file in the original layout (BFL's
``double_blocks.N.img_attn.qkv.weight`` ... for Flux, as in flux1-dev.safetensors) or as a GGUF file (city96's
FLUX.1-dev-gguf, Qwen-Image GGUFs), the other components coming from a diffusers folder. The runner loads them as::

    transformer = TransformerClass.from_single_file(
        path, config=folder, subfolder="transformer", torch_dtype=dtype, local_files_only=True,
        quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),  # GGUF files only
    )
    pipe = PipelineClass.from_pretrained(folder, transformer=transformer)

These tools write such files from the tiny pipelines of `tests.tiny_families`:

- `flux_to_original(sd)`: a FluxTransformer2DModel state dict in BFL's layout (the exact inverse of diffusers'
  `convert_flux_transformer_checkpoint_to_diffusers`).
- `z_image_to_original(sd)`: a ZImageTransformer2DModel state dict in the original (Tongyi / ComfyUI) layout: fused
  ``attention.qkv``, ``attention.out``, ``q_norm``/``k_norm``, ``x_embedder``/``final_layer`` (inverse of
  `convert_z_image_transformer_checkpoint_to_diffusers`).
- Qwen-Image needs none: its single-file layout is diffusers' own (diffusers maps it with the identity), see
  `qwen_image_to_original`.
- `write_gguf(sd, path, arch, qtype)`: a GGUF file as city96's tools/convert.py + patched llama-quantize write them.
- `gguf_summary(path)`: architecture, file type and tensor types of a GGUF file, read from its header only.
- `dequantize_stray_gguf_params(model)`: the workaround for BF16 non-Linear tensors in a GGUF (see there).

What diffusers 0.42.1 does with them (checked on the tiny models, tests/test_single_file_tools.py):

- single files: FluxTransformer2DModel (BFL layout, optional ``model.diffusion_model.`` prefix), ZImageTransformer2DModel
  (original layout, prefix optional), QwenImageTransformer2DModel (diffusers names only; a prefixed file leaves every
  weight on the meta device: ``NotImplementedError: Cannot copy out of meta tensor`` from `dispatch_model` at the end of
  `FromOriginalModelMixin.from_single_file`, after a warning listing the "unused" weights). Missing weights fail
  the same way (no missing-key check).
- GGUF: quantized Linears become `GGUFLinear` -- a *subclass* of nn.Linear, weight a `GGUFParameter` (uint8 bytes,
  ``quant_type``, ``quant_shape``) dequantized in every forward; F32/F16 tensors load as plain tensors (plain
  nn.Linear, cast to torch_dtype). `load_lora_weights` + `set_adapters` work (peft wraps the GGUFLinear, unfused);
  `fuse_lora` raises ``RuntimeError: The size of tensor a (34) must match the size of tensor b (32)`` (peft adds the
  float delta to the packed bytes), after merging any unquantized LoRA targets it met first.
- tiny widths vs block size 32 (Q8_0/Q4_0/Q5_0): every 2-D weight of tiny Flux.1 / Qwen-Image has a last dim that is
  a multiple of 32 (32, 128, 160, 256) except the input projections (``img_in``, Qwen-Image's ``txt_in``: 16), which
  city96 keeps unquantized anyway; in tiny Z-Image ``layers.0.feed_forward.w2`` (last dim 85) falls back to F16.

diffusers 0.42.1 limitation (loaders/single_file_utils.py, `convert_flux_transformer_checkpoint_to_diffusers`): the
number of double/single blocks is inferred from the keys, but the width is hard-coded (``inner_dim = 3072``,
``mlp_ratio = 4.0``) to split each single block's fused ``linear1`` into q/k/v/mlp, so any Flux.1 whose width is not
3072 (the tiny ones here) fails with ``RuntimeError: split_with_sizes expects split_sizes to sum exactly to 224``.
`flux_width_patch()` swaps in a converter that takes the width from the model config and otherwise runs diffusers'
own converter; real Flux.1 dev/schnell (3072 wide) need no patch.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch

FLUX_WIDTH = 3072  # the inner_dim diffusers' Flux converter assumes
COMFY_PREFIX = "model.diffusion_model."


def _with_prefix(state_dict: dict, prefix: str) -> dict:
    return {prefix + key: value for key, value in state_dict.items()} if prefix else state_dict


# ---------------------------------------------------------------------------------------------------------
# Flux.1: diffusers -> BFL


def flux_to_original(state_dict: dict, prefix: str = "") -> dict:
    """A FluxTransformer2DModel state dict in BFL's original layout (flux1-dev.safetensors); `prefix` e.g. ``model.diffusion_model.``.

    The exact inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers`: q/k/v concatenated into
    ``img_attn.qkv`` / ``txt_attn.qkv``, a single block's q/k/v/mlp into ``linear1``, and ``final_layer``'s adaLN
    halves back in BFL's (shift, scale) order. Raises on a key it does not know (so nothing is silently dropped).
    """
    sd = dict(state_dict)
    out: dict[str, torch.Tensor] = {}

    def move(src: str, dst: str) -> None:
        for kind in ("weight", "bias"):
            if f"{src}.{kind}" in sd:
                out[f"{dst}.{kind}"] = sd.pop(f"{src}.{kind}")

    def fuse(srcs: list[str], dst: str) -> None:
        for kind in ("weight", "bias"):
            out[f"{dst}.{kind}"] = torch.cat([sd.pop(f"{src}.{kind}") for src in srcs], dim=0)

    for embedder, name in (("timestep_embedder", "time_in"), ("text_embedder", "vector_in"), ("guidance_embedder", "guidance_in")):
        move(f"time_text_embed.{embedder}.linear_1", f"{name}.in_layer")
        move(f"time_text_embed.{embedder}.linear_2", f"{name}.out_layer")
    move("context_embedder", "txt_in")
    move("x_embedder", "img_in")

    double = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    for i in double:
        src, dst = f"transformer_blocks.{i}", f"double_blocks.{i}"
        move(f"{src}.norm1.linear", f"{dst}.img_mod.lin")
        move(f"{src}.norm1_context.linear", f"{dst}.txt_mod.lin")
        fuse([f"{src}.attn.to_q", f"{src}.attn.to_k", f"{src}.attn.to_v"], f"{dst}.img_attn.qkv")
        fuse([f"{src}.attn.add_q_proj", f"{src}.attn.add_k_proj", f"{src}.attn.add_v_proj"], f"{dst}.txt_attn.qkv")
        out[f"{dst}.img_attn.norm.query_norm.scale"] = sd.pop(f"{src}.attn.norm_q.weight")
        out[f"{dst}.img_attn.norm.key_norm.scale"] = sd.pop(f"{src}.attn.norm_k.weight")
        out[f"{dst}.txt_attn.norm.query_norm.scale"] = sd.pop(f"{src}.attn.norm_added_q.weight")
        out[f"{dst}.txt_attn.norm.key_norm.scale"] = sd.pop(f"{src}.attn.norm_added_k.weight")
        move(f"{src}.ff.net.0.proj", f"{dst}.img_mlp.0")
        move(f"{src}.ff.net.2", f"{dst}.img_mlp.2")
        move(f"{src}.ff_context.net.0.proj", f"{dst}.txt_mlp.0")
        move(f"{src}.ff_context.net.2", f"{dst}.txt_mlp.2")
        move(f"{src}.attn.to_out.0", f"{dst}.img_attn.proj")
        move(f"{src}.attn.to_add_out", f"{dst}.txt_attn.proj")

    single = sorted({int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")})
    for i in single:
        src, dst = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        move(f"{src}.norm.linear", f"{dst}.modulation.lin")
        fuse([f"{src}.attn.to_q", f"{src}.attn.to_k", f"{src}.attn.to_v", f"{src}.proj_mlp"], f"{dst}.linear1")
        out[f"{dst}.norm.query_norm.scale"] = sd.pop(f"{src}.attn.norm_q.weight")
        out[f"{dst}.norm.key_norm.scale"] = sd.pop(f"{src}.attn.norm_k.weight")
        move(f"{src}.proj_out", f"{dst}.linear2")

    move("proj_out", "final_layer.linear")
    for kind in ("weight", "bias"):  # diffusers' AdaLayerNormContinuous: (scale, shift); BFL's LastLayer: (shift, scale)
        scale, shift = sd.pop(f"norm_out.linear.{kind}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{kind}"] = torch.cat([shift, scale], dim=0)

    if sd:
        raise KeyError(f"flux_to_original: keys it does not know: {sorted(sd)}")
    return _with_prefix(out, prefix)


def flux_width_aware_converter(checkpoint: dict, config=None, **kwargs) -> dict:
    """diffusers' Flux.1 converter, with each single block's ``linear1`` split by the model's width instead of 3072.

    The split is done here; diffusers' converter does the rest, handed a zero-width stand-in of the 3072-wide shape
    for each ``linear1`` (no memory). GGUF tensors (`GGUFParameter`) keep their quant type through `torch.split`.
    """
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers as convert

    width = config["num_attention_heads"] * config["attention_head_dim"] if config is not None else FLUX_WIDTH
    if width == FLUX_WIDTH:
        return convert(checkpoint, config=config, **kwargs)
    for key in list(checkpoint):
        if key.startswith(COMFY_PREFIX):
            checkpoint[key[len(COMFY_PREFIX) :]] = checkpoint.pop(key)
    fused = {}
    for key in list(checkpoint):
        if re.fullmatch(r"single_blocks\.\d+\.linear1\.(weight|bias)", key):
            fused[key] = checkpoint.pop(key)
            rows = FLUX_WIDTH * 7  # 3 x inner_dim + mlp_ratio 4 x inner_dim, as diffusers splits it
            checkpoint[key] = torch.empty((rows, 0) if key.endswith("weight") else (rows,))
    converted = convert(checkpoint, config=config, **kwargs)
    for key, tensor in fused.items():
        _, i, _, kind = key.split(".")
        q, k, v, mlp = torch.split(tensor, [width, width, width, tensor.shape[0] - 3 * width], dim=0)
        prefix = f"single_transformer_blocks.{i}."
        for name, part in (("attn.to_q", q), ("attn.to_k", k), ("attn.to_v", v), ("proj_mlp", mlp)):
            converted[f"{prefix}{name}.{kind}"] = part
    return converted


@contextlib.contextmanager
def flux_width_patch():
    """Within: `FluxTransformer2DModel.from_single_file` converts Flux.1 checkpoints of any width (see the module docstring)."""
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    entry = SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    original = entry["checkpoint_mapping_fn"]
    entry["checkpoint_mapping_fn"] = flux_width_aware_converter
    try:
        yield
    finally:
        entry["checkpoint_mapping_fn"] = original


# ---------------------------------------------------------------------------------------------------------
# Z-Image and Qwen-Image


def z_image_to_original(state_dict: dict, prefix: str = "") -> dict:
    """A ZImageTransformer2DModel state dict in the original (Tongyi / ComfyUI) layout: the inverse of diffusers' converter.

    ``attention.to_q/to_k/to_v`` -> ``attention.qkv`` (no biases), ``to_out.0`` -> ``out``, ``norm_q/norm_k`` ->
    ``q_norm/k_norm``, ``all_x_embedder.2-1`` -> ``x_embedder``, ``all_final_layer.2-1`` -> ``final_layer``; the rest
    (``layers``, ``noise_refiner``, ``context_refiner``, ``t_embedder``, ``cap_embedder``, pad tokens) keep their names.
    Only the released patch size (2, frame patch 1) has an original name.
    """
    sd = dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    for key in [k for k in sd if k.endswith(".attention.to_q.weight")]:
        base = key[: -len("to_q.weight")]
        out[base + "qkv.weight"] = torch.cat([sd.pop(base + f"{n}.weight") for n in ("to_q", "to_k", "to_v")], dim=0)
    renames = (
        (".attention.to_out.0.", ".attention.out."),
        (".attention.norm_q.", ".attention.q_norm."),
        (".attention.norm_k.", ".attention.k_norm."),
    )
    for key, value in sd.items():
        new = key
        for old, repl in renames:
            new = new.replace(old, repl)
        if new.startswith("all_x_embedder.") or new.startswith("all_final_layer."):
            head, patch, rest = new.split(".", 2)
            if patch != "2-1":
                raise KeyError(f"z_image_to_original: {key}: only patch size 2-1 has an original name")
            new = head[len("all_") :] + "." + rest
        out[new] = value
    return _with_prefix(out, prefix)


def qwen_image_to_original(state_dict: dict) -> dict:
    """Qwen-Image's single-file layout is diffusers' own: diffusers 0.42.1 maps QwenImageTransformer2DModel files with the identity.

    (ComfyUI's Qwen-Image model uses diffusers' names.) A ``model.diffusion_model.`` prefix is *not* stripped for this
    class, so the file must hold the bare names.
    """
    return dict(state_dict)


# ---------------------------------------------------------------------------------------------------------
# GGUF


# city96's lcpp.patch (llama-quantize for image models): per architecture, the tensors left unquantized
GGUF_KEEP = {
    "flux": ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer."),
    "lumina2": ("t_embedder.", "x_embedder.", "final_layer.", "cap_embedder.", "context_refiner.", "noise_refiner."),  # Z-Image
    "qwen_image": ("img_in.", "txt_in.", "time_text_embed.", "proj_out.", "norm_out."),
}
SMALL_TENSOR = 1024  # city96's QUANTIZATION_THRESHOLD: tensors of at most this many elements are written F32


def gguf_tensor_type(name: str, shape: tuple[int, ...], arch: str, qtype: str, small: int = SMALL_TENSOR, float_type: str = "F16") -> str:
    """The GGML type city96's tools (convert.py, then the patched llama-quantize) give tensor `name`.

    F32: 1-D tensors and those of at most `small` elements. `float_type` (F16 for an F32/F16 source, BF16 for a
    BF16 one): tensors llama-quantize leaves alone -- names not ending in ``weight``, not 2-D, in `GGUF_KEEP[arch]`,
    or whose last dim is not a multiple of the quant's block size (32 for Q8_0/Q4_0/Q5_0; its F16 fallback). Else `qtype`.
    """
    import gguf

    n = 1
    for d in shape:
        n *= d
    if len(shape) <= 1 or n <= small:
        return "F32"
    if qtype in ("F32", "F16", "BF16"):
        return qtype
    if not name.endswith("weight") or len(shape) != 2 or any(k in name for k in GGUF_KEEP.get(arch, ())):
        return float_type
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    return qtype if shape[-1] % block == 0 else "F16"


def write_gguf(
    state_dict: dict, path, arch: str = "flux", qtype: str = "Q8_0", small: int = SMALL_TENSOR, float_type: str = "F16"
) -> dict[str, str]:
    """Write `state_dict` (original layout, unprefixed) to a GGUF file at `path`, as city96's converter + quantizer do.

    `general.architecture` is `arch` (city96's names: ``flux``, ``qwen_image``, ``lumina2`` for Z-Image), with
    `general.file_type` and `general.quantization_version`. Each tensor gets `gguf_tensor_type` and is encoded with
    `gguf.quants.quantize` (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, BF16, F16, F32: the types gguf-py can quantize; K-quants it
    cannot). `small=0` quantizes every eligible 2-D weight of a tiny model. Returns {name: GGML type name}.
    """
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    file_type = {"F32": "ALL_F32"}.get(qtype, f"MOSTLY_{qtype}")
    if hasattr(gguf.LlamaFileType, file_type):
        writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    types = {}
    for name, tensor in state_dict.items():
        data = tensor.detach().to("cpu", torch.float32).numpy().astype(np.float32, copy=False)
        kind = gguf_tensor_type(name, tuple(data.shape), arch, qtype, small, float_type)
        ggml = gguf.GGMLQuantizationType[kind]
        writer.add_tensor(name, gguf.quants.quantize(data, ggml), raw_dtype=ggml)
        types[name] = kind
    writer.write_header_to_file(path=str(Path(path)))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def gguf_summary(path) -> dict:
    """A GGUF file's `general.architecture`, `general.file_type`, quantization version and tensor types, from the header.

    `gguf.GGUFReader` memory-maps the file and parses only the header (key/values and the tensor table): no tensor
    data is read, so this is cheap even for a 12 GB file.
    """
    import gguf

    reader = gguf.GGUFReader(str(path))

    def field(name):
        f = reader.get_field(name)
        if f is None:
            return None
        return f.contents()

    counts: dict[str, int] = {}
    types = {}
    for t in reader.tensors:
        types[t.name] = t.tensor_type.name
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    file_type = field("general.file_type")
    return {
        "architecture": field("general.architecture"),
        "file_type": gguf.LlamaFileType(file_type).name if file_type is not None else None,
        "quantization_version": field("general.quantization_version"),
        "type_counts": counts,
        "tensor_types": types,
    }


def dequantize_stray_gguf_params(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Dequantize GGUF tensors that diffusers left as raw bytes outside a `GGUFLinear` (returns their names).

    diffusers' `load_gguf_checkpoint` turns every tensor not stored F32/F16 -- BF16 included -- into a `GGUFParameter`
    of raw bytes, and `GGUFQuantizer.create_quantized_param` puts it into whatever parameter it names; only Linear
    weights are dequantized on the fly (`GGUFLinear`). A BF16 ``x_pad_token`` (Z-Image: a 2-D tensor llama-quantize
    leaves in the source dtype) then reaches `torch.where` as uint8 bytes of twice the width and the forward fails.
    """
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter, dequantize_gguf_tensor

    fixed = []
    for module_name, module in model.named_modules():
        if isinstance(module, GGUFLinear):
            continue
        for name, param in list(module._parameters.items()):
            if isinstance(param, GGUFParameter):
                module._parameters[name] = torch.nn.Parameter(dequantize_gguf_tensor(param).to(dtype), requires_grad=False)
                fixed.append(f"{module_name}.{name}" if module_name else name)
    return fixed
