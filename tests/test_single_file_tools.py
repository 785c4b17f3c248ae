"""Single-file and GGUF transformers (tests/single_file_tools.py) load as the runner loads them, on tiny pipelines.

The runner's call: ``TransformerClass.from_single_file(path, config=folder, subfolder="transformer", torch_dtype=...,
[quantization_config=GGUFQuantizationConfig(compute_dtype=...)], local_files_only=True)``, then
``PipelineClass.from_pretrained(folder, transformer=transformer)``.

Tolerances (max abs pixel difference, pixels in [0, 1], 64x64, 2 steps, tiny Flux.1 dev/schnell, seeds 0-3, every
2-D weight quantized that may be): Q8_0 measured 0.6-1.1e-3 -> 5e-3; Q4_0 0.7-1.9e-2 -> 0.06; a LoRA at 0.7 moves
pixels by ~0.5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from tests.single_file_tools import (  # noqa: E402
    dequantize_stray_gguf_params,
    flux_to_original,
    flux_width_patch,
    gguf_summary,
    write_gguf,
    z_image_to_original,
)
from tests.tiny_families import FAMILIES, build_tiny_family, generate  # noqa: E402

TOLERANCE = {"Q8_0": 5e-3, "Q4_0": 0.06}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("single-file")
    return {name: build_tiny_family(name, root / name) for name in ("flux-dev", "flux-schnell", "z-image", "qwen-image")}


def load_pipe(family: str, folder, transformer=None):
    import diffusers

    cls = getattr(diffusers, FAMILIES[family].class_name)
    pipe = cls.from_pretrained(folder, **({"transformer": transformer} if transformer is not None else {}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def from_file(cls, path, folder, gguf: bool = False):
    from diffusers import GGUFQuantizationConfig

    options = {"config": str(folder), "subfolder": "transformer", "torch_dtype": torch.float32, "local_files_only": True}
    if gguf:
        options["quantization_config"] = GGUFQuantizationConfig(compute_dtype=torch.float32)
    return cls.from_single_file(str(path), **options)


def assert_same_state(model, expected: dict):
    got = model.state_dict()
    assert got.keys() == expected.keys()
    differ = [k for k in expected if got[k].dtype != expected[k].dtype or not torch.equal(got[k], expected[k])]
    assert not differ, differ


# ---------------------------------------------------------------------------------------------------------
# Flux.1 in BFL's layout


@pytest.mark.parametrize("family, prefix", [("flux-dev", ""), ("flux-dev", "model.diffusion_model."), ("flux-schnell", "")])
def test_a_flux_transformer_in_bfl_layout_loads_back_exactly(family, prefix, folders, tmp_path):
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    expected = FluxTransformer2DModel.from_pretrained(folders[family], subfolder="transformer").state_dict()
    original = flux_to_original(expected, prefix=prefix)
    names = {k[len(prefix) :] for k in original}
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "final_layer.adaLN_modulation.1.weight"} <= names
    assert ("guidance_in.in_layer.weight" in names) == (family == "flux-dev")
    assert not any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in names)
    path = tmp_path / "flux1.safetensors"
    save_file(original, str(path))
    with flux_width_patch():
        assert_same_state(from_file(FluxTransformer2DModel, path, folders[family]), expected)


def test_diffusers_flux_converter_assumes_the_released_width(folders, tmp_path):
    """diffusers 0.42.1 hard-codes inner_dim 3072 for the single blocks' linear1 split: tiny Flux needs flux_width_patch.

    When this starts passing without the patch, flux_width_patch can go.
    """
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    sd = FluxTransformer2DModel.from_pretrained(folders["flux-dev"], subfolder="transformer").state_dict()
    save_file(flux_to_original(sd), str(tmp_path / "flux1.safetensors"))
    with pytest.raises(RuntimeError, match=r"split_with_sizes.*\[3072, 3072, 3072, 12288\]"):
        from_file(FluxTransformer2DModel, tmp_path / "flux1.safetensors", folders["flux-dev"])
    with pytest.raises(KeyError, match="does not know"):
        flux_to_original(sd | {"extra.weight": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------------------
# GGUF


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_a_flux_gguf_loads_quantized_and_draws_the_image_within_tolerance(qtype, folders, tmp_path):
    from diffusers import FluxTransformer2DModel
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    folder, family = folders["flux-dev"], FAMILIES["flux-dev"]
    pipe = load_pipe("flux-dev", folder)
    base = generate(pipe, family)
    path = tmp_path / f"flux1-{qtype}.gguf"
    types = write_gguf(flux_to_original(pipe.transformer.state_dict()), path, "flux", qtype, small=0)
    summary = gguf_summary(path)
    assert summary["architecture"] == "flux" and summary["file_type"] == f"MOSTLY_{qtype}"
    assert summary["tensor_types"] == types
    assert types["double_blocks.0.img_attn.qkv.weight"] == qtype and types["single_blocks.0.linear1.weight"] == qtype
    assert types["img_in.weight"] == "F16" and types["double_blocks.0.img_attn.qkv.bias"] == "F32"  # city96's kept tensors

    with flux_width_patch():
        transformer = from_file(FluxTransformer2DModel, path, folder, gguf=True)
    assert transformer.is_quantized
    to_q = transformer.transformer_blocks[0].attn.to_q
    assert type(to_q) is GGUFLinear and isinstance(to_q, torch.nn.Linear)  # a subclass: a type check must not pass it as plain
    assert isinstance(to_q.weight, GGUFParameter) and to_q.weight.dtype == torch.uint8 and tuple(to_q.weight.quant_shape) == (32, 32)
    assert type(transformer.context_embedder) is torch.nn.Linear  # txt_in: kept F16, loaded as a plain float32 Linear

    image = generate(load_pipe("flux-dev", folder, transformer), family)
    error = float(np.abs(image - base).max())
    assert 0 < error < TOLERANCE[qtype], error
    assert np.abs(generate(pipe, family, seed=1) - base).max() > 20 * TOLERANCE["Q8_0"]  # the tolerance is well below a change


def test_a_lora_runs_on_a_gguf_transformer_unfused_and_fuse_lora_refuses(folders, tmp_path):
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    folder, family = folders["flux-dev"], FAMILIES["flux-dev"]
    pipe = load_pipe("flux-dev", folder)
    path = tmp_path / "flux1-Q8_0.gguf"
    write_gguf(flux_to_original(pipe.transformer.state_dict()), path, "flux", "Q8_0", small=0)
    torch.manual_seed(1)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(family.lora_targets), init_lora_weights=False), "a")
    layers = get_peft_model_state_dict(pipe.transformer, adapter_name="a")
    pipe.transformer.set_adapters(["a"], [0.7])
    expected = generate(pipe, family)
    FluxPipeline.save_lora_weights(save_directory=str(tmp_path), transformer_lora_layers=layers, weight_name="lora.safetensors")

    with flux_width_patch():
        quantized = load_pipe("flux-dev", folder, from_file(FluxTransformer2DModel, path, folder, gguf=True))
    base = generate(quantized, family)
    quantized.load_lora_weights(str(tmp_path / "lora.safetensors"), adapter_name="a")
    quantized.set_adapters(["a"], [0.7])
    with_lora = generate(quantized, family)
    assert np.abs(with_lora - base).max() > 0.02  # an attention-only LoRA: ~0.05
    assert np.abs(with_lora - expected).max() < TOLERANCE["Q8_0"]
    with pytest.raises(RuntimeError, match="must match the size"):  # peft's merge adds a float delta to the packed bytes
        quantized.fuse_lora()
    assert np.abs(generate(quantized, family) - with_lora).max() < 1e-5  # nothing was merged: every target is quantized
    quantized.unload_lora_weights()
    assert np.array_equal(generate(quantized, family), base)


# ---------------------------------------------------------------------------------------------------------
# Z-Image and Qwen-Image


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_a_z_image_transformer_in_the_original_layout_loads_back_exactly(prefix, folders, tmp_path):
    from diffusers import ZImageTransformer2DModel
    from safetensors.torch import save_file

    expected = ZImageTransformer2DModel.from_pretrained(folders["z-image"], subfolder="transformer").state_dict()
    original = z_image_to_original(expected, prefix=prefix)
    assert {prefix + k for k in ("layers.0.attention.qkv.weight", "x_embedder.weight", "final_layer.linear.weight")} <= original.keys()
    save_file(original, str(tmp_path / "z.safetensors"))
    assert_same_state(from_file(ZImageTransformer2DModel, tmp_path / "z.safetensors", folders["z-image"]), expected)


def test_a_qwen_image_single_file_is_diffusers_layout_without_prefix(folders, tmp_path):
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import save_file

    expected = QwenImageTransformer2DModel.from_pretrained(folders["qwen-image"], subfolder="transformer").state_dict()
    save_file(expected, str(tmp_path / "q.safetensors"))
    assert_same_state(from_file(QwenImageTransformer2DModel, tmp_path / "q.safetensors", folders["qwen-image"]), expected)
    save_file({"model.diffusion_model." + k: v for k, v in expected.items()}, str(tmp_path / "prefixed.safetensors"))
    with pytest.raises(NotImplementedError, match="meta tensor"):  # identity mapping: every weight "unexpected", the model left empty
        from_file(QwenImageTransformer2DModel, tmp_path / "prefixed.safetensors", folders["qwen-image"])


@pytest.mark.parametrize("family, arch", [("z-image", "lumina2"), ("qwen-image", "qwen_image")])
def test_z_image_and_qwen_image_ggufs_load_and_draw_within_tolerance(family, arch, folders, tmp_path):
    import diffusers

    folder = folders[family]
    pipe = load_pipe(family, folder)
    base = generate(pipe, FAMILIES[family])
    sd = pipe.transformer.state_dict()
    original = z_image_to_original(sd) if family == "z-image" else sd
    cls = type(pipe.transformer)
    write_gguf(original, tmp_path / "t.gguf", arch, "Q8_0", small=0)
    assert gguf_summary(tmp_path / "t.gguf")["architecture"] == arch
    transformer = from_file(cls, tmp_path / "t.gguf", folder, gguf=True)
    assert any(isinstance(m, diffusers.quantizers.gguf.utils.GGUFLinear) for m in transformer.modules())
    error = float(np.abs(generate(load_pipe(family, folder, transformer), FAMILIES[family]) - base).max())
    assert 0 < error < 0.05, error  # Z-Image's CFG at 5 amplifies: 1e-2 measured (Qwen-Image 1e-4)


def test_a_z_image_gguf_with_bf16_pad_tokens_needs_them_dequantized(folders, tmp_path):
    folder = folders["z-image"]
    pipe = load_pipe("z-image", folder)
    base = generate(pipe, FAMILIES["z-image"])
    types = write_gguf(
        z_image_to_original(pipe.transformer.state_dict()), tmp_path / "z.gguf", "lumina2", "Q8_0", small=0, float_type="BF16"
    )
    assert types["x_pad_token"] == "BF16"  # as from the BF16 release: llama-quantize leaves non-`weight` tensors alone
    transformer = from_file(type(pipe.transformer), tmp_path / "z.gguf", folder, gguf=True)
    assert transformer.x_pad_token.dtype == torch.uint8  # diffusers kept the raw bytes
    quantized = load_pipe("z-image", folder, transformer)
    with pytest.raises(RuntimeError, match="must match the size"):
        generate(quantized, FAMILIES["z-image"])
    assert dequantize_stray_gguf_params(transformer) == ["x_pad_token", "cap_pad_token"]
    assert np.abs(generate(quantized, FAMILIES["z-image"]) - base).max() < 0.05
