"""GPU benchmark: SD1.5-, SDXL- and Flux.1-sized pipelines with random weights (no download), one blend sweep each.

    python bench/bench_gpu.py                                    # all three families on one GPU (RESULTS.md: the device command)
    python bench/bench_gpu.py --families sd15 --seeds 16 --compile   # one family, more images, also (e) engine.compile=true
    python bench/bench_gpu.py --tiny                             # the same code path with tiny models, on the CPU (a minute)

The weights are random (normal, std 0.02) but the shapes are the real ones, so the compute is the real
models', and each pipeline is saved as a diffusers folder that the runner loads as a user's model:

* sd15: SD1.5 (UNet 860M, CLIP-L, SD VAE), 512x512, 30 steps, Euler, classifier-free guidance 7.5;
* sdxl: SDXL (UNet 2.6B, CLIP-L + bigG, SDXL VAE), 1024x1024, 30 steps, Euler, guidance 7.5;
* flux: Flux.1-dev (FluxTransformer2DModel 11.9B from the released config: 19 double + 38 single blocks, 24 heads
  of 128, guidance embedding; CLIP-L; T5-XXL's width, by default 2 of its 24 layers (--t5-layers 24 for all of
  them: 4.7B more parameters, which the prompt passes through once per call, 0.2% of an image's FLOPs); Flux's
  VAE (16 latent channels, no quant convs); FlowMatchEulerDiscreteScheduler with dev's dynamic shifting), built in
  bf16 on the GPU, 1024x1024, 28 steps, distilled guidance 3.5 (one transformer pass per step), 512 T5 tokens.

LoRAs: two random ones per family: rank 32 on attention and feed-forward for SD1.5/SDXL, rank 16 on the Flux
transformer's attention (to_q/to_k/to_v/to_out.0 and add_q/k/v_proj/to_add_out), saved with the pipeline's own
save_lora_weights. Sweeps: SD1.5/SDXL a, b, a+b at strengths 0.5 and 1 (6 blends), Flux a, b at 0.5 and 1
(4 blends), x N seeds (--seeds: 8, 2 and 1 by default, sized for one 10-minute device call). Measured:

(a) bare:   a diffusers loop as a careful user writes it: pipeline and LoRAs loaded once, set_adapters per blend
            (adapters unfused), no saving; SD1.5/SDXL fp16 with seeds batched by 4 (bench_runner.bare_loop), Flux bf16
            with one image per call (its users' loop)
(b) naive:  what web-UI grid scripts do: LoRAs loaded before each image and unloaded after, batch 1
            (bench_runner.naive_loop), on the first images only (SD1.5 and SDXL; --naive)
(c) runner: `lora-sweep run` in this process, the model and LoRAs in its registry, local engine with its defaults
            (bf16, blends fused, batch from free memory) and full tracking: PNG with text chunks, results journal,
            an MLflow child run + artifact per image
(d) runner with tracking=none
(e) --compile: (c) with engine.compile=true; its first batch pays the warm-up
(f) fused vs unfused at full size (--fuse-check; SD1.5 and SDXL by default): the first seed of every blend again
    with engine.fuse_loras=false, and without LoRAs; the pixels of (c) and (f) may differ by rounding, at most 10%
    of what the blend itself changes (the CPU test, tests/test_fused_loras.py, checks the same on the tiny model)
Then tests/test_gpu.py (the CUDA-only tests; --skip-tests to leave them out). The exit status is 1 when (f) or a
test fails, a family raises, or the runner refuses a sweep for another reason than "cannot run yet" (a family
the runner does not run yet is reported in one line and the bench goes on).

images/s counts from "pipeline loaded" to "last image done" (for the runner: written and logged); "warm" leaves
out the runner's first batch. FLOPs per image are counted by torch's FlopCounterMode on a copy of the denoiser
and VAE on the meta device (no compute, the same count as on the GPU): steps x denoiser (SD: the guided batch
of 2; Flux: one pass) + one VAE decode; for Flux also the formula 2 x matmul parameters x the tokens they see
(4096 image + 512 text) + 4 L^2 d attention per block. Peak = 989 TFLOP/s (H100/H200 SXM bf16 dense) and the
bf16 matrix product measured here. Peak GB is torch.cuda.max_memory_allocated: over the bare loop's load and
images, and over the in-process run_sweep (the local engine runs in this process). Each family's table is printed
when it is done (a run cut by a time limit keeps them); --json writes every figure, with each part's wall time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_runner import bare_loop, naive_loop  # noqa: E402

H100_BF16_PEAK = 989e12  # H100 and H200 SXM, bf16 dense (datasheet)
FUSE_TOLERANCE = 0.1  # fused vs unfused pixels, as a fraction of the blend's own effect on them
FAMILY_NAMES = ("sd15", "sdxl", "flux")
DEFAULT_SEEDS = {"sd15": 8, "sdxl": 2, "flux": 1}
NAIVE_IMAGES = {"sd15": 6, "sdxl": 3, "flux": 2}
PROMPT = "a photo of a cat in a garden"
NOT_YET = "cannot run yet"  # the runner's one line for a family it does not run

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
)
SD_BLENDS = {"lora_model": ["a", "b", "a,b"], "lora_strength": [0.5, 1.0]}
SD_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
FLUX_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]

SD15 = {
    "size": 512,
    "steps": 30,
    "guidance": 7.5,
    "rank": 32,
    "blends": SD_BLENDS,
    "unet": dict(
        sample_size=64,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    ),
    "vae": SD_VAE | dict(sample_size=512),
    "clip": CLIP_L,
}
SDXL = {
    "size": 1024,
    "steps": 30,
    "guidance": 7.5,
    "rank": 32,
    "blends": SD_BLENDS,
    "unet": dict(
        sample_size=128,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
    "vae": SD_VAE | dict(sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    "clip": CLIP_L,
    "clip_2": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280),
}
FLUX = {  # Flux.1-dev's released configs (transformer, VAE, scheduler); T5-XXL's width
    "size": 1024,
    "steps": 28,
    "guidance": 3.5,
    "rank": 16,
    "text_tokens": 512,  # max_sequence_length: T5 pads the prompt to it
    "blends": {"lora_model": ["a", "b"], "lora_strength": [0.5, 1.0]},
    "transformer": dict(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
    "clip": CLIP_L,
    "t5": dict(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    ),
    "vae": SD_VAE
    | dict(
        latent_channels=16,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=True,
    ),
    "scheduler": dict(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ),
}
SPECS = {"sd15": SD15, "sdxl": SDXL, "flux": FLUX}

# --tiny: the same layouts a few channels wide, 64x64 pixels, 4 steps (seconds on a CPU)
TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
TINY_VAE = SD_VAE | dict(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64)
TINY_SD_UNET = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)
TINY = {
    "sd15": SD15
    | dict(size=64, steps=4, rank=4, vae=TINY_VAE, clip=TINY_CLIP, unet=TINY_SD_UNET | dict(cross_attention_dim=32, attention_head_dim=8)),
    "sdxl": SDXL
    | dict(
        size=64,
        steps=4,
        rank=4,
        vae=TINY_VAE | dict(scaling_factor=0.13025, force_upcast=True),
        clip=TINY_CLIP,
        clip_2=TINY_CLIP,
        unet=TINY_SD_UNET
        | dict(
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,  # 6 x 8 time ids + 32 pooled text
            cross_attention_dim=64,  # 32 + 32: both text encoders' hidden states side by side
        ),
    ),
    "flux": FLUX
    | dict(
        size=64,
        steps=4,
        rank=4,
        transformer=dict(
            patch_size=1,
            in_channels=16,  # 4 latent channels x 2x2 packing
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        ),
        clip=TINY_CLIP,
        t5=FLUX["t5"] | dict(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
        vae=TINY_VAE | dict(latent_channels=4, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
    ),
}


# ---------------------------------------------------------------------------------------------------------
# building the pipelines


def randomize(module, std: float = 0.02) -> None:
    """Real shapes, random values that keep activations finite over the steps."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def add_random_lora(model, name: str, rank: int, targets: list[str], seed: int) -> dict:
    """A random, non-zero rank-`rank` peft LoRA on `model`'s `targets`; returns its state dict and removes it again."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False), adapter_name=name)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if f"lora_A.{name}." in key:
                p.normal_(0, 1 / rank)
            elif f"lora_B.{name}." in key:
                p.normal_(0, 0.002)
    layers = get_peft_model_state_dict(model, adapter_name=name)
    model.delete_adapters(name)
    return layers


def build_sd(family: str, spec: dict, folder: Path, device: str) -> None:
    """Write an SD1.5/SDXL-sized pipeline with random weights (fp16 files on a GPU) and two LoRAs beside it."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from runner.world.assets import byte_tokenizer, tiny_text_config

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**spec["vae"])
        text_encoder = CLIPTextModel(tiny_text_config(**spec["clip"]))
        text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(**spec["clip_2"], hidden_act="gelu")) if family == "sdxl" else None
    for module in (unet, vae, text_encoder, text_encoder_2):
        if module is not None:
            randomize(module)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )
    tokenizer = byte_tokenizer()
    if family == "sd15":
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=byte_tokenizer(),
            unet=unet,
            scheduler=scheduler,
        )
    if device == "cuda":
        pipe.to(torch.float16)
    pipe.save_pretrained(folder / "model")
    for seed, name in ((1, "a"), (2, "b")):
        layers = add_random_lora(unet, name, spec["rank"], SD_LORA_TARGETS, seed)
        type(pipe).save_lora_weights(save_directory=str(folder), unet_lora_layers=layers, weight_name=f"{name}.safetensors")
    del pipe, unet, vae, text_encoder, text_encoder_2


def build_flux(spec: dict, folder: Path, device: str, dtype) -> None:
    """Write a Flux.1-dev-sized pipeline with random weights, built in `dtype` on `device` (bf16 on the GPU: 24 GB of
    transformer instead of 48 GB of float32, made in seconds), and two LoRAs."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from runner.world.assets import byte_tokenizer, tiny_text_config

    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**spec["transformer"])
            text_encoder = CLIPTextModel(tiny_text_config(**spec["clip"]))
            text_encoder_2 = T5EncoderModel(T5Config(**spec["t5"]))
            vae = AutoencoderKL(**spec["vae"])
    finally:
        torch.set_default_dtype(default_dtype)
    for module in (transformer, text_encoder, text_encoder_2, vae):
        randomize(module)
        module.eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**spec["scheduler"]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=byte_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer(model_max_length=spec["text_tokens"]),
        transformer=transformer,
    )
    pipe.save_pretrained(folder / "model")
    for seed, name in ((1, "a"), (2, "b")):
        layers = add_random_lora(transformer, name, spec["rank"], FLUX_LORA_TARGETS, seed)
        FluxPipeline.save_lora_weights(save_directory=str(folder), transformer_lora_layers=layers, weight_name=f"{name}.safetensors")
    del pipe, transformer, text_encoder, text_encoder_2, vae


def t5_tokenizer(model_max_length: int):
    """A T5TokenizerFast (Unigram) made in memory, as tests/tiny_families.py makes it: the prompt's words as whole
    pieces, single characters as the fallback (any text encodes). Its ids index the first rows of T5's vocabulary."""
    import string

    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    seen = {p for p, _ in pieces}
    for word in f"{PROMPT} warm up first blurry".split():
        if "\u2581" + word not in seen:
            seen.add("\u2581" + word)
            pieces.append(("\u2581" + word, -1.0 - 0.01 * len(pieces)))
    for ch in string.ascii_letters + string.digits + string.punctuation:
        for piece in (ch, "\u2581" + ch):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -10.0))
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def t5_note(spec: dict, tiny: bool) -> dict:
    """What the Flux T5 built here is, beside T5-XXL's 24 layers: its layers and the weights left out."""
    t5 = spec["t5"]
    layer = 4 * t5["d_model"] * t5["num_heads"] * t5["d_kv"] + 3 * t5["d_model"] * t5["d_ff"] + 2 * t5["d_model"]
    missing = 0 if tiny else (FLUX["t5"]["num_layers"] - t5["num_layers"]) * layer * 2  # bf16 bytes
    return {"layers": t5["num_layers"], "of": FLUX["t5"]["num_layers"], "missing_gb": missing / 2**30}


# ---------------------------------------------------------------------------------------------------------
# the sweep, the runner's config


def sweep_file(folder: Path, family: str, spec: dict, seeds: int, name: str, first_seed: int = 0, baseline: bool = False) -> Path:
    import yaml

    base = {
        "prompt": PROMPT,
        "width": spec["size"],
        "height": spec["size"],
        "num_inference_steps": spec["steps"],
        "guidance_scale": spec["guidance"],
    }
    if family == "flux":  # distilled guidance, no negative prompt
        base["scheduler"] = "FlowMatchEulerDiscreteScheduler"
    else:
        base |= {"negative_prompt": "blurry", "scheduler": "EulerDiscreteScheduler"}
    sweep = {"name": name, "base": base, "grid": {**spec["blends"], "seed": {"start": first_seed, "count": seeds}}, "max_images": 100000}
    if baseline:  # and each cell's no-LoRA image
        sweep["report"] = {"baseline": True}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def compose(folder: Path, family: str, sweep: Path, outputs: Path, device: str, *overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from runner.cli import register_sweeps
    from runner.config import CONF_DIR, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    selected, _ = register_sweeps([f"sweep={sweep}"])
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose(
            "config",
            overrides=[
                *selected,
                f"+models.{family}={{source: {folder / 'model'}}}",
                f"model.id={family}",
                f"+loras.a={{source: {folder / 'a.safetensors'}}}",
                f"+loras.b={{source: {folder / 'b.safetensors'}}}",
                f"paths.outputs={outputs}",
                f"engine.device={device}",
                "progress=false",
                "sweep.report.cell_size=64",
                *overrides,
            ],
        )


# ---------------------------------------------------------------------------------------------------------
# FLOPs and the device


def count_flops(fn) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def sd_flops_per_image(pipe, family: str, spec: dict) -> dict:
    """steps x UNet on the guided batch of 2, plus one VAE decode, counted by torch on meta copies (no compute)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(pipe.unet.config)
        vae = AutoencoderKL.from_config(pipe.vae.config)
    size = spec["size"]
    latents = torch.empty(2, unet.config.in_channels, size // 8, size // 8, device="meta")
    context = torch.empty(2, 77, unet.config.cross_attention_dim, device="meta")
    extra = {}
    if family == "sdxl":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.empty(2, pooled, device="meta"), "time_ids": torch.empty(2, 6, device="meta")}}
    step = count_flops(lambda: unet(latents, torch.tensor([500], device="meta"), encoder_hidden_states=context, **extra))
    decode = count_flops(lambda: vae.decode(latents[:1]))
    return {"step": step, "vae_decode": decode, "per_image": spec["steps"] * step + decode}


def flux_step_formula(config, image_tokens: int, text_tokens: int) -> float:
    """One transformer pass from the config: 2 x each matmul's parameters x the tokens it sees, + 4 L^2 d attention per block."""
    d = config.num_attention_heads * config.attention_head_dim
    mlp = 4 * d  # Flux's mlp_ratio
    n = image_tokens + text_tokens
    out = config.patch_size**2 * (config.out_channels or config.in_channels)
    double = 4 * d * d + 2 * d * mlp  # q, k, v, out and the feed-forward: the image stream on image tokens, the text stream on text
    single = 3 * d * d + d * mlp + (d + mlp) * d  # q, k, v, the MLP's input and the fused output projection, on all tokens
    matmuls = (config.num_layers * double + config.num_single_layers * single) * n
    matmuls += config.in_channels * d * image_tokens + config.joint_attention_dim * d * text_tokens + d * out * image_tokens
    # one token: the modulations (6d per stream per double block, 3d per single block, 2d at the end) and the embeddings
    embeddings = (256 * d + d * d) * (2 if config.guidance_embeds else 1) + config.pooled_projection_dim * d + d * d
    matmuls += config.num_layers * 2 * 6 * d * d + config.num_single_layers * 3 * d * d + 2 * d * d + embeddings
    attention = 4 * n * n * d * (config.num_layers + config.num_single_layers)
    return 2 * matmuls + attention


def flux_flops_per_image(pipe, spec: dict) -> dict:
    """steps x one transformer pass (distilled guidance: no second pass), plus one VAE decode: counted on meta copies, and by formula."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(pipe.transformer.config)
        vae = AutoencoderKL.from_config(pipe.vae.config)
    c = transformer.config
    size, text_tokens = spec["size"], spec["text_tokens"]
    image_tokens = (size // 16) ** 2  # 8x VAE, then 2x2 packing
    meta = dict(device="meta")
    inputs = dict(
        hidden_states=torch.empty(1, image_tokens, c.in_channels, **meta),
        encoder_hidden_states=torch.empty(1, text_tokens, c.joint_attention_dim, **meta),
        pooled_projections=torch.empty(1, c.pooled_projection_dim, **meta),
        timestep=torch.empty(1, **meta),
        guidance=torch.empty(1, **meta) if c.guidance_embeds else None,
        img_ids=torch.zeros(image_tokens, 3, **meta),
        txt_ids=torch.zeros(text_tokens, 3, **meta),
        return_dict=False,
    )
    step = count_flops(lambda: transformer(**inputs))
    latents = torch.empty(1, vae.config.latent_channels, size // 8, size // 8, **meta)
    decode = count_flops(lambda: vae.decode(latents))
    return {
        "step": step,
        "step_formula": flux_step_formula(c, image_tokens, text_tokens),
        "image_tokens": image_tokens,
        "text_tokens": text_tokens,
        "transformer_params": sum(p.numel() for p in transformer.parameters()),
        "vae_decode": decode,
        "per_image": spec["steps"] * step + decode,
    }


def measured_matmul_peak(device: str) -> float:
    """The bf16 matrix product's speed here (float32 and smaller on a CPU, for --tiny)."""
    import torch

    n, dtype, repeats = (8192, torch.bfloat16, 20) if device == "cuda" else (1024, torch.float32, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return repeats * 2 * n**3 / (time.perf_counter() - start)


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def free_memory(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# the loops


def bare_flux_loop(pipe, folder: Path, spec: dict, seeds: list[int], device: str) -> tuple[float, int]:
    """Flux as its users write the loop: both LoRAs loaded once, set_adapters per blend, one image per call."""
    import torch

    for name in ("a", "b"):
        pipe.load_lora_weights(str(folder), weight_name=f"{name}.safetensors", adapter_name=name)
    images = 0
    started = time.perf_counter()
    for blend in spec["blends"]["lora_model"]:
        names = blend.split(",")
        for strength in spec["blends"]["lora_strength"]:
            pipe.set_adapters(names, adapter_weights=[strength] * len(names))
            for seed in seeds:
                pipe(
                    prompt=PROMPT,
                    width=spec["size"],
                    height=spec["size"],
                    num_inference_steps=spec["steps"],
                    guidance_scale=spec["guidance"],
                    generator=torch.Generator("cpu").manual_seed(seed),
                )
                images += 1
    synchronize(device)
    elapsed = time.perf_counter() - started
    pipe.unload_lora_weights()
    return elapsed, images


def merge_hashes(source: Path, target: Path) -> None:
    """The runner's sha256 cache (outputs/.cache/hashes.json, by path, size and mtime): what `source` knows, added to `target`."""
    if not source.exists():
        return
    known = json.loads(target.read_text()) if target.exists() else {}
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(known | json.loads(source.read_text())))


def run_runner(cfg, device: str, hashes: Path) -> dict:
    """`lora-sweep run` in this process; images/s over its generation window, time to the first PNG, peak memory.

    Each run has a fresh outputs folder (and MLflow store); its hash cache starts with what the runs before hashed
    (`hashes`), as a user's second run would, so a 25 GB model is hashed once. A sweep the runner refuses (a
    UserError: one line per problem, nothing generated) comes back as {"refused": lines}.
    """
    import pandas as pd

    from runner.errors import UserError
    from runner.run import run_sweep

    outputs = Path(cfg.paths.outputs)
    cache = outputs / ".cache" / "hashes.json"
    merge_hashes(hashes, cache)
    reset_peak(device)
    started = time.time()
    try:
        with open(os.devnull, "w") as quiet:
            summary = run_sweep(cfg, out=quiet)
    except UserError as error:
        return {"refused": error.lines}
    finally:
        merge_hashes(cache, hashes)
    folder = outputs / cfg.sweep.name
    pngs = list((folder / "images").glob("*.png"))
    results = pd.read_parquet(folder / "results.parquet")
    results = results[results["status"] == "ok"]
    batches = results.drop_duplicates("meta.batch")
    warm = batches.iloc[1:] if len(batches) > 1 else batches  # the batches after the first (warm-up, memory probe)
    warm_rate = warm["batch_size"].sum() / (warm["generation_s"] * warm["batch_size"]).sum() if len(warm) else float("nan")
    return {
        "images": summary.ok,
        "failed": summary.failed,
        "images_per_s": summary.images_per_s,
        "warm_images_per_s": float(warm_rate),
        "first_image_s": min(p.stat().st_mtime for p in pngs) - started if pngs else float("nan"),
        "peak_gb": peak_gb(device),
        "batch_sizes": sorted(set(int(b) for b in results["batch_size"])),
        "lora_mode": sorted(set(results["meta.lora_mode"])),
        "dtype": sorted(set(results["meta.dtype"])),
    }


def png_pixels(folder: Path, image_id: str):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(folder / "images" / f"{image_id}.png").convert("RGB"), dtype=np.int16)


def fused_vs_unfused(folder: Path, family: str, spec: dict, work: Path, fused: Path, device: str, hashes: Path) -> dict:
    """(f) the first seed of every blend again, unfused (peft's adapters at every step), and without LoRAs.

    Fused and unfused images of a blend have the same id: their pixels differ by rounding (bf16 weights,
    other batch sizes), which must stay small beside what the blend itself does to the image (unfused
    blend vs no LoRA, same seed): at most TOLERANCE of it, on average over the pixels.
    """
    import numpy as np
    import pandas as pd

    sweep = sweep_file(folder, family, spec, 1, f"bench-{family}", baseline=True)
    cfg = compose(folder, family, sweep, work / "out-f", device, "tracking=none", "engine.fuse_loras=false")
    run = run_runner(cfg, device, hashes)
    if "refused" in run:
        return run
    unfused = Path(cfg.paths.outputs) / cfg.sweep.name
    results = pd.read_parquet(unfused / "results.parquet").merge(pd.read_parquet(unfused / "plan.parquet")[["id", "lora_model"]], on="id")
    assert set(results["status"]) == {"ok"}, results[results["status"] != "ok"][["id", "error"]]
    plain = results[results["lora_model"] == ""]["id"]
    assert len(plain) == 1, "one prompt, one seed: one image without LoRAs"
    reference = png_pixels(unfused, plain.item())
    differences, effects = [], []
    for image_id in results[results["lora_model"] != ""]["id"]:
        own = png_pixels(unfused, image_id)
        differences.append(np.abs(png_pixels(fused, image_id) - own))
        effects.append(np.abs(own - reference))
    difference, effect = np.stack(differences), np.stack(effects)
    ratio = float(difference.mean() / max(effect.mean(), 1e-9))
    return {
        "blends": len(differences),
        "mean_abs_diff": float(difference.mean()),
        "p99_abs_diff": float(np.percentile(difference, 99)),
        "max_abs_diff": int(difference.max()),
        "mean_blend_effect": float(effect.mean()),
        "diff_of_effect": ratio,
        "within_tolerance": ratio <= FUSE_TOLERANCE,
        "unfused_lora_mode": run["lora_mode"],
    }


def run_gpu_tests() -> dict:
    """tests/test_gpu.py (the CUDA-only checks: bf16 and fused defaults, the out-of-memory retry, compile) in a child."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("pytest") is None:
        print("\npytest is not installed here: tests/test_gpu.py was not run", flush=True)
        return {"ran": False}
    print("\ntests/test_gpu.py:", flush=True)
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    return {"ran": True, "exit_code": subprocess.run(command, cwd=root).returncode}


# ---------------------------------------------------------------------------------------------------------
# one family


def quiet() -> None:
    """No progress bars, no warnings the bench knows about (LoRAs without text-encoder keys, deprecations, second adapters)."""
    import warnings

    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated.*")
    warnings.filterwarnings("ignore", message=".*peft_config.*multiple adapters.*")


def attempt(fn, *args) -> dict:
    """fn(*args)'s figures, or {"error": its one line} after printing the traceback: one failing run leaves the others' figures."""
    try:
        return fn(*args)
    except Exception as error:
        traceback.print_exc()
        return {"error": one_line(error)}


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


class Clock:
    """The bench's own clock: each part's wall time, and --time-limit-s (no part starts after it)."""

    def __init__(self, limit_s: float):
        self.started = time.perf_counter()
        self.limit_s = limit_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def allows(self, what: str) -> bool:
        if self.limit_s and self.elapsed() > self.limit_s:
            print(f"skipped {what}: {self.elapsed():.0f} s elapsed, past --time-limit-s {self.limit_s:.0f}", flush=True)
            return False
        return True


def bench_family(family: str, args, work: Path, peak: float, clock: Clock) -> dict:
    import torch
    from diffusers import AutoPipelineForText2Image

    from runner.prepare import prepare_sweep

    device = args.device
    spec = dict(TINY[family] if args.tiny else SPECS[family])
    if family == "flux" and not args.tiny:
        spec["t5"] = spec["t5"] | {"num_layers": args.t5_layers}
    folder = work / family
    seeds = args.seeds[family]
    hashes = work / "hashes.json"
    wall: dict = {}
    out: dict = {"family": family, "size": spec["size"], "steps": spec["steps"], "guidance": spec["guidance"], "seeds": seeds}
    out["wall_s"] = wall
    if family == "flux":
        out["t5"] = t5_note(spec, args.tiny)

    part = time.perf_counter()
    dtype = torch.float32 if device != "cuda" else torch.bfloat16 if family == "flux" else torch.float16  # of the files and the bare loop
    if family == "flux":
        build_flux(spec, folder, device, dtype)
    else:
        build_sd(family, spec, folder, device)
    free_memory(device)
    wall["build"] = time.perf_counter() - part
    print(f"[{family}] built random-weight pipeline and LoRAs in {wall['build']:.0f} s", flush=True)
    sweep = sweep_file(folder, family, spec, seeds, f"bench-{family}")
    cfg = compose(folder, family, sweep, work / "out-c", device, "tracking=sqlite")
    blends = len(spec["blends"]["lora_model"]) * len(spec["blends"]["lora_strength"])
    out["images"] = n = blends * seeds

    # (a) and (b): the bare and naive loops, as users write them
    quiet()  # again: composing the runner's config may have reset the libraries' loggers
    part = time.perf_counter()
    out["bare_dtype"] = str(dtype).removeprefix("torch.")
    reset_peak(device)
    pipe = AutoPipelineForText2Image.from_pretrained(str(folder / "model"), torch_dtype=dtype, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    out["bare_load_s"] = time.perf_counter() - part
    out["flops"] = flux_flops_per_image(pipe, spec) if family == "flux" else sd_flops_per_image(pipe, family, spec)
    out["flops_per_image"] = out["flops"]["per_image"]
    size = spec["size"]
    pipe(prompt="warm up", width=size, height=size, num_inference_steps=2)
    first = time.perf_counter()
    pipe(prompt="first", width=size, height=size, num_inference_steps=spec["steps"])
    out["bare_first_image_s"] = time.perf_counter() - first  # after loading: one image, batch 1
    if family == "flux":
        bare_s, bare_n = bare_flux_loop(pipe, folder, spec, list(range(seeds)), device)
        assert bare_n == n, f"bare loop made {bare_n} of {n} images"
        loras, plan = None, None
    else:
        prepared = prepare_sweep(cfg)
        assert prepared.ok, prepared.problems
        loras, plan = prepared.registry.loras, prepared.plan
        assert len(plan) == n, f"plan of {len(plan)} rows, {n} expected"
        bare_s = bare_loop(pipe, loras, plan, 4, device)
    out["bare"] = {"images_per_s": n / bare_s, "peak_gb": peak_gb(device)}
    print(f"[{family}] (a) bare: {n / bare_s:.2f} images/s", flush=True)
    if family in args.naive and plan is not None and clock.allows(f"[{family}] (b) naive"):
        naive_n = min(NAIVE_IMAGES[family], n)
        naive_s = naive_loop(pipe, loras, plan.head(naive_n))
        out["naive"] = {"images_per_s": naive_n / naive_s, "images": naive_n}
        print(f"[{family}] (b) naive: {naive_n / naive_s:.2f} images/s ({naive_n} images)", flush=True)
    del pipe
    free_memory(device)
    wall["bare"] = time.perf_counter() - part

    # (c), (d) and (e): lora-sweep run in this process, each into a fresh outputs folder and MLflow store
    runs = [("runner", "(c) runner, full tracking", "out-c", ())]
    runs.append(("runner_untracked", "(d) runner, tracking=none", "out-d", ("tracking=none",)))
    if args.compile:
        runs.append(("runner_compiled", "(e) runner, compiled", "out-e", ("tracking=sqlite", "engine.compile=true")))
    for key, label, outputs, overrides in runs:
        if "refused" in out.get("runner", {}):  # every run of this sweep would be refused the same way
            print(f"[{family}] {label}: not run (the runner refused the sweep)", flush=True)
            continue
        if not clock.allows(f"[{family}] {label}"):
            continue
        part = time.perf_counter()
        run_cfg = cfg if key == "runner" else compose(folder, family, sweep, work / outputs, device, *overrides)
        out[key] = attempt(run_runner, run_cfg, device, hashes)
        free_memory(device)
        wall[key] = time.perf_counter() - part
        if "refused" in out[key]:
            print(f"[{family}] {label}: the runner refused the sweep: " + " | ".join(out[key]["refused"]), flush=True)
        else:
            print(f"[{family}] {label}: {out[key]}", flush=True)
    ran = "images_per_s" in out.get("runner", {})
    if ran and family in args.fuse_check and clock.allows(f"[{family}] (f) fused vs unfused"):
        part = time.perf_counter()
        fused = Path(cfg.paths.outputs) / cfg.sweep.name
        out["fused_vs_unfused"] = attempt(fused_vs_unfused, folder, family, spec, work, fused, device, hashes)
        free_memory(device)
        wall["fused_vs_unfused"] = time.perf_counter() - part
        print(f"[{family}] (f) fused vs unfused: {out['fused_vs_unfused']}", flush=True)
    for key in ("bare", "naive", "runner", "runner_untracked", "runner_compiled"):
        if key in out and "images_per_s" in out[key]:
            tflops = out[key]["images_per_s"] * out["flops_per_image"]
            out[key] |= {"tflops": tflops / 1e12, "of_h100_peak": tflops / H100_BF16_PEAK, "of_measured_peak": tflops / peak}
    shutil.rmtree(folder, ignore_errors=True)  # Flux's folder is 25 GB: the device's disk holds one family at a time
    wall["total"] = sum(wall.values())
    return out


# ---------------------------------------------------------------------------------------------------------
# the report


LOOPS = (
    ("bare", "(a) bare {dtype} unfused"),
    ("naive", "(b) naive per image"),
    ("runner", "(c) runner, tracked"),
    ("runner_untracked", "(d) runner, untracked"),
    ("runner_compiled", "(e) runner, compiled"),
)


def flops_text(flops: float) -> str:
    for scale, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:.0f} "


def params_text(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def print_family(r: dict, device: str) -> None:
    if "error" in r:
        print(f"\n{r['family']}: FAILED: {r['error']}")
        return
    f = r["flops"]
    seeds = f"{r['seeds']} seed{'s' if r['seeds'] != 1 else ''} per blend"
    limit = f", limit {H100_BF16_PEAK / r['flops_per_image']:.2f} images/s at 989 TFLOP/s" if device == "cuda" else ""
    print(
        f"\n{r['family']}: {r['images']} images {r['size']}x{r['size']} ({seeds}), {r['steps']} steps, guidance {r['guidance']}, "
        f"{flops_text(r['flops_per_image'])}FLOP/image{limit}"
    )
    if r["family"] == "flux":
        t5 = r["t5"]
        print(
            f"  FLOPs per step {flops_text(f['step'])} counted, {flops_text(f['step_formula'])} by formula "
            f"({params_text(f['transformer_params'])}-parameter transformer, {f['image_tokens']} image + {f['text_tokens']} text tokens), "
            f"VAE decode {flops_text(f['vae_decode'])}"
        )
        built = "all" if t5["layers"] == t5["of"] else f"{t5['layers']}"
        missing = f"; peak GB and load times lack the other layers' {t5['missing_gb']:.1f} GB" if t5["missing_gb"] else ""
        print(f"  T5: T5-XXL's width, {built} of its {t5['of']} layers (the prompt is encoded once per call, not per step){missing}")
    else:
        print(f"  FLOPs per step {flops_text(f['step'])} (the guided batch of 2), VAE decode {flops_text(f['vae_decode'])}")
    # on a GPU: TFLOP/s and the datasheet's peak; on a CPU (--tiny): GFLOP/s and the matrix product measured here
    unit, scale, of = ("TFLOP/s", 1e12, "of_h100_peak") if device == "cuda" else ("GFLOP/s", 1e9, "of_measured_peak")
    print(f"{'loop':<24}{'images/s':>9}{'warm':>7}{'x bare':>8}{unit:>9}{'of peak':>8}{'1st img s':>10}{'peak GB':>8}")
    bare = r["bare"]["images_per_s"]
    for key, label in LOOPS:
        if key not in r:
            continue
        label = label.format(dtype=r.get("bare_dtype", ""))
        v = r[key]
        if "refused" in v or "error" in v:
            print(f"{label:<24}" + (f"refused: {' | '.join(v['refused'])}" if "refused" in v else f"error: {v['error']}"))
            continue
        first = v.get("first_image_s", r.get("bare_first_image_s") if key == "bare" else float("nan"))
        print(
            f"{label:<24}{v['images_per_s']:>9.3f}{v.get('warm_images_per_s', float('nan')):>7.3f}{v['images_per_s'] / bare:>8.2f}"
            f"{v['tflops'] * 1e12 / scale:>9.1f}{v[of]:>8.1%}{first:>10.1f}{v.get('peak_gb', float('nan')):>8.1f}"
        )
    tracked, untracked = r.get("runner", {}), r.get("runner_untracked", {})
    if "images_per_s" in tracked:
        line = f"runner / bare: {tracked['images_per_s'] / bare:.2f}x tracked"
        if "images_per_s" in untracked:
            line += (
                f", {untracked['images_per_s'] / bare:.2f}x untracked; "
                f"tracking cost {1 - tracked['images_per_s'] / untracked['images_per_s']:+.1%} (tracked vs tracking=none, same run)"
            )
        print(line + f"; runner batches {tracked['batch_sizes']}, {'/'.join(tracked['dtype'])}, LoRAs {'/'.join(tracked['lora_mode'])}")
    for key in ("runner", "runner_untracked", "runner_compiled"):
        if r.get(key, {}).get("failed"):
            print(f"{key}: {r[key]['failed']} images failed")
    f = r.get("fused_vs_unfused")
    if f and ("refused" in f or "error" in f):
        print(f"fused vs unfused: {f.get('error') or 'refused: ' + ' | '.join(f['refused'])}")
    elif f:
        print(
            f"fused vs unfused ({f['blends']} blends, first seed): mean |diff| {f['mean_abs_diff']:.2f}, p99 {f['p99_abs_diff']:.0f}, "
            f"max {f['max_abs_diff']} of 255; the blends change the image by {f['mean_blend_effect']:.2f} on average: "
            f"{f['diff_of_effect']:.1%} of it, {'within' if f['within_tolerance'] else 'OUTSIDE'} the tolerance ({FUSE_TOLERANCE:.0%})"
        )
    wall = ", ".join(f"{k} {v:.0f}" for k, v in r["wall_s"].items() if k != "total")
    print(f"wall s: {r['wall_s']['total']:.0f} ({wall}; of the bare part, loading {r['bare_load_s']:.0f})")
    if device == "cuda":
        print("peak GB: torch.cuda.max_memory_allocated over the bare loop (load and images) and over each in-process run_sweep")


def failures(results: list[dict], tests: dict) -> list[str]:
    failed = []
    for r in results:
        if "error" in r:
            failed.append(f"{r['family']}: {r['error']}")
            continue
        f = r.get("fused_vs_unfused")
        if f and "within_tolerance" in f and not f["within_tolerance"]:
            failed.append(f"{r['family']}: fused vs unfused outside the tolerance")
        for key in ("runner", "runner_untracked", "runner_compiled", "fused_vs_unfused"):
            refused = r.get(key, {}).get("refused", [])
            if refused and not all(NOT_YET in line for line in refused):
                failed.append(f"{r['family']} {key}: the runner refused the sweep: " + " | ".join(refused))
            if "error" in r.get(key, {}):
                failed.append(f"{r['family']} {key}: {r[key]['error']}")
    if tests.get("exit_code"):
        failed.append("tests/test_gpu.py")
    return failed


def names(text: str, option: str) -> list[str]:
    chosen = [name.strip() for name in text.split(",") if name.strip()] if text not in ("", "none") else []
    unknown = [name for name in chosen if name not in FAMILY_NAMES]
    if unknown:
        raise SystemExit(f"{option}: unknown family {', '.join(unknown)}; choose from {', '.join(FAMILY_NAMES)}")
    return chosen


def seeds_per_family(text: str | None) -> dict[str, int]:
    """--seeds N (every family) or sd15=8,flux=2 (the others keep their default)."""
    seeds = dict(DEFAULT_SEEDS)
    for part in (text or "").split(","):
        if "=" in part:
            family, count = part.split("=", 1)
            names(family, "--seeds")
            seeds[family.strip()] = int(count)
        elif part.strip():
            seeds = dict.fromkeys(seeds, int(part))
    return seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILY_NAMES), help="comma-separated, in this order (default: sd15,sdxl,flux)")
    parser.add_argument("--family", choices=[*FAMILY_NAMES, "both"], default=None, help=argparse.SUPPRESS)  # before --families
    parser.add_argument("--seeds", default=None, help="seeds per blend: N for all, or sd15=8,sdxl=2,flux=1 (the defaults)")
    parser.add_argument("--tiny", action="store_true", help="tiny models, 64x64, 4 steps: the whole code path in a minute on a CPU")
    parser.add_argument("--device", default="auto", help="auto: cuda (required unless --tiny), else cpu")
    parser.add_argument("--t5-layers", type=int, default=2, help="Flux's T5-XXL layers built (24: all; default 2)")
    parser.add_argument("--naive", default="sd15,sdxl", help="families that run (b), the naive per-image loop (SD1.5/SDXL only)")
    parser.add_argument("--skip-naive", action="store_true", help="leave out (b) for every family")
    parser.add_argument("--fuse-check", default="sd15,sdxl", help="families that run (f), fused vs unfused pixels ('none': no family)")
    parser.add_argument("--compile", action="store_true", help="also run (e): engine.compile=true")
    parser.add_argument("--time-limit-s", type=float, default=0, help="start no part (family, loop, runner, tests) after this many seconds")
    parser.add_argument("--work-dir", default=None, help="where models and outputs go (default: the temp dir; Flux needs 25 GB)")
    parser.add_argument("--json", default=None, help="write every figure here")
    parser.add_argument("--skip-tests", action="store_true", help="do not run tests/test_gpu.py after the benchmark")
    args = parser.parse_args()
    families = names({"both": "sd15,sdxl"}.get(args.family, args.family) if args.family else args.families, "--families")
    args.naive = [] if args.skip_naive else names(args.naive, "--naive")
    args.fuse_check = names(args.fuse_check, "--fuse-check")
    args.seeds = seeds_per_family(args.seeds)
    clock = Clock(args.time_limit_s)
    import diffusers
    import torch

    quiet()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and steadier on a shared machine
    if args.device != "cuda" and not args.tiny:
        sys.exit("bench_gpu.py needs a CUDA GPU (or --tiny for the tiny models on the CPU); bench/bench_runner.py is the CPU variant")
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}, torch {torch.__version__}, diffusers {diffusers.__version__}{', tiny models' if args.tiny else ''}", flush=True)
    peak = measured_matmul_peak(args.device)
    results: list[dict] = []

    def write_json(**extra) -> None:
        if args.json:
            figures = {"device": where, "tiny": args.tiny, "peak": peak, "results": results, **extra}
            Path(args.json).write_text(json.dumps(figures, indent=1))

    with tempfile.TemporaryDirectory(dir=args.work_dir, prefix="bench-gpu-") as tmp:
        for family in families:
            if not clock.allows(f"family {family}"):
                continue
            try:
                results.append(bench_family(family, args, Path(tmp), peak, clock))
            except Exception as error:  # the next family still runs: one device call measures all of them
                traceback.print_exc()
                results.append({"family": family, "error": one_line(error)})
                shutil.rmtree(Path(tmp) / family, ignore_errors=True)
            free_memory(args.device)
            print_family(results[-1], args.device)
            write_json()
    print(f"\n=== all families ({clock.elapsed():.0f} s) ===")
    if args.device == "cuda":
        print(f"bf16 matrix product measured here: {peak / 1e12:.0f} TFLOP/s; H100/H200 SXM datasheet 989")
    else:
        print(f"float32 matrix product measured here: {peak / 1e9:.0f} GFLOP/s (--tiny: the code path, not the speeds)")
    for r in results:
        print_family(r, args.device)
    tests = {"ran": False} if args.skip_tests or not clock.allows("tests/test_gpu.py") else run_gpu_tests()
    write_json(gpu_tests=tests, wall_s=clock.elapsed())
    failed = failures(results, tests)
    if failed:
        sys.exit("failed: " + "; ".join(failed))


if __name__ == "__main__":
    main()
