"""The model families lora-sweep runs, as one table of plain data (no torch: `plan` reads it).

A family says how a model is recognised (model_index.json's `_class_name`, a single file's tensor
names, a LoRA's key names), which diffusers pipeline runs it, what its request fields mean there
(`guidance_scale` is classifier-free guidance for SD/SDXL/SD3/Chroma/Z-Image, a distilled guidance
embedding for Flux.1-dev and Flux.2, nothing for schnell; real CFG on Flux.1 and Qwen-Image is
`true_cfg_scale` with a negative prompt), its size multiple, defaults, schedulers and LoRA loader.
Validation and the engine look things up here instead of branching per family.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

FLOW = {"scheduler": "FlowMatchEulerDiscreteScheduler"}  # the flow families' own sampler, for requests that name none


@dataclass(frozen=True)
class TextEncoder:
    component: str  # the pipeline's attribute: text_encoder, text_encoder_2, ...
    kind: str  # clip | t5 | qwen | mistral
    max_tokens: int  # what one pass of the encoder takes (CLIP: 77; T5/LLMs: max_sequence_length's ceiling)


@dataclass(frozen=True)
class Family:
    name: str  # the registry's and the plan's word: sd, sdxl, flux, ...
    label: str  # how people call it
    pipeline: str  # the diffusers text-to-image pipeline class
    index_classes: tuple[str, ...]  # model_index.json `_class_name` values that are this family
    denoiser: str  # the pipeline component LoRAs and fusing patch: unet | transformer
    text_encoders: tuple[TextEncoder, ...]
    # guidance_scale's meaning: cfg (classifier-free, with the negative prompt), distilled (a guidance embedding,
    # one pass), none (ignored); true_cfg: whether `true_cfg_scale > 1` with a negative prompt gives real CFG
    guidance: str
    true_cfg: bool = False
    negative_prompt: bool = True  # a negative prompt string is used (with cfg, or with true_cfg_scale > 1)
    clip_skip: bool = False
    max_sequence_length: int | None = None  # the default of the pipeline's argument; None: not an argument
    size_multiple: int = 8
    # request fields the user left unset take these (sd/sdxl: none, the spec's own defaults stand)
    defaults: dict[str, Any] = field(default_factory=dict)
    true_cfg_default: float = 1.0  # the pipeline's own true_cfg_scale (Qwen-Image: 4), for the negative_prompt check
    flow_matching: bool = False  # takes FLOW_SCHEDULERS (and FLOW_SIGMA_SCHEDULERS with use_flow_sigmas)
    lora_loader: str = ""  # the diffusers LoRA loader mixin
    lora_formats: tuple[str, ...] = ("diffusers", "peft")  # third-party layouts its loader converts
    text_encoder_loras: bool = False  # the loader also patches (CLIP) text encoders
    fold_lora_alphas: bool = False  # kohya `.alpha`s folded into the up weights before loading (see engines/local.py)
    fuse: bool = True  # blends fuse exactly into the denoiser's base weights (fuse.py); False: peft's adapter path
    single_file: str | None = None  # how a single .safetensors loads: "pipeline" (SD/SDXL), "transformer" (the DiTs), None: not
    gguf_architectures: tuple[str, ...] = ()  # `general.architecture` of its GGUF transformers (city96's converter)
    # how (word:1.3) weights reach its encoders (runner/prompts/encode.py): "clip" chunked CLIP (SD, SDXL), "t5"
    # (Flux.1: T5 weighted, CLIP's pooled from the words), "sd3" (CLIP-L/G and T5 weighted), "t5-masked" (Chroma:
    # T5 with its attention masks); "": not applied (the LLM encoders)
    prompt_weights: str = ""
    tested: bool = False  # a tiny model of it runs in the test suite
    memory: str = ""  # rough weights at bf16 / GGUF Q8 / 4-bit, for README's table


CLIP_L = TextEncoder("text_encoder", "clip", 77)
CLIP_G = TextEncoder("text_encoder_2", "clip", 77)
FLUX_FORMATS = ("diffusers", "peft", "ai-toolkit", "kohya", "xlabs", "bfl")

FLUX = Family(
    "flux",
    "Flux.1",
    "FluxPipeline",
    ("FluxPipeline",),
    "transformer",
    (CLIP_L, TextEncoder("text_encoder_2", "t5", 512)),
    guidance="distilled",
    true_cfg=True,
    max_sequence_length=512,
    size_multiple=16,
    defaults={"num_inference_steps": 28, "guidance_scale": 3.5} | FLOW,
    flow_matching=True,
    lora_loader="FluxLoraLoaderMixin",
    lora_formats=FLUX_FORMATS,
    text_encoder_loras=True,
    single_file="transformer",
    gguf_architectures=("flux",),
    prompt_weights="t5",
    tested=True,
    memory="transformer 24 / 12.7 / 6.7 GB; T5 9.5 GB",
)
# schnell: a FluxPipeline folder whose transformer has no guidance embedding (VARIANTS); 4 steps, T5 at 256
FLUX_SCHNELL = replace(
    FLUX,
    name="flux-schnell",
    label="Flux.1 schnell",
    index_classes=(),
    text_encoders=(CLIP_L, TextEncoder("text_encoder_2", "t5", 256)),
    guidance="none",
    max_sequence_length=256,
    defaults={"num_inference_steps": 4} | FLOW,
)
FLUX2_KLEIN = Family(
    "flux2-klein",
    "Flux.2 Klein",
    "Flux2KleinPipeline",
    ("Flux2KleinPipeline",),
    "transformer",
    (TextEncoder("text_encoder", "qwen", 512),),
    guidance="cfg",
    negative_prompt=False,  # negatives only as embeddings in diffusers 0.42
    max_sequence_length=512,
    size_multiple=16,
    defaults={"num_inference_steps": 50, "guidance_scale": 4.0} | FLOW,
    flow_matching=True,
    lora_loader="Flux2LoraLoaderMixin",
    lora_formats=("diffusers", "peft", "ai-toolkit", "kohya"),
    tested=True,
    memory="transformer 8 / 4.3 / 2.3 GB (4B); Qwen3 encoder 8 GB",
)
# a Flux2KleinPipeline folder with is_distilled (VARIANTS): no guidance, 4 steps
FLUX2_KLEIN_DISTILLED = replace(
    FLUX2_KLEIN,
    name="flux2-klein-distilled",
    label="Flux.2 Klein (distilled)",
    index_classes=(),
    guidance="none",
    defaults={"num_inference_steps": 4} | FLOW,
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "sd",
            "SD 1.x/2.x",
            "StableDiffusionPipeline",
            ("StableDiffusionPipeline",),
            "unet",
            (CLIP_L,),
            guidance="cfg",
            clip_skip=True,
            lora_loader="StableDiffusionLoraLoaderMixin",
            lora_formats=("diffusers", "peft", "kohya"),
            text_encoder_loras=True,
            fold_lora_alphas=True,
            single_file="pipeline",
            prompt_weights="clip",
            tested=True,
            memory="2 GB (fp16 pipeline)",
        ),
        Family(
            "sdxl",
            "SDXL",
            "StableDiffusionXLPipeline",
            ("StableDiffusionXLPipeline",),
            "unet",
            (CLIP_L, CLIP_G),
            guidance="cfg",
            clip_skip=True,
            lora_loader="StableDiffusionXLLoraLoaderMixin",
            lora_formats=("diffusers", "peft", "kohya"),
            text_encoder_loras=True,
            fold_lora_alphas=True,
            single_file="pipeline",
            prompt_weights="clip",
            tested=True,
            memory="7 GB (fp16 pipeline)",
        ),
        Family(
            "sd3",
            "SD3 / SD3.5",
            "StableDiffusion3Pipeline",
            ("StableDiffusion3Pipeline",),
            "transformer",
            (CLIP_L, CLIP_G, TextEncoder("text_encoder_3", "t5", 512)),
            guidance="cfg",
            clip_skip=True,
            max_sequence_length=256,
            size_multiple=16,
            defaults={"num_inference_steps": 28, "guidance_scale": 7.0} | FLOW,
            flow_matching=True,
            lora_loader="SD3LoraLoaderMixin",
            lora_formats=("diffusers", "peft", "ai-toolkit"),
            text_encoder_loras=True,
            prompt_weights="sd3",
            tested=True,
            memory="transformer 16 / 8.5 / 4.5 GB (3.5 large); T5 9.5 GB",
        ),
        FLUX,
        FLUX_SCHNELL,
        Family(
            "flux2",
            "Flux.2",
            "Flux2Pipeline",
            ("Flux2Pipeline",),
            "transformer",
            (TextEncoder("text_encoder", "mistral", 512),),
            guidance="distilled",
            negative_prompt=False,
            max_sequence_length=512,
            size_multiple=16,
            defaults={"num_inference_steps": 50, "guidance_scale": 4.0} | FLOW,
            flow_matching=True,
            lora_loader="Flux2LoraLoaderMixin",
            lora_formats=("diffusers", "peft", "ai-toolkit", "kohya"),
            tested=True,
            memory="transformer 64 / 34 / 18 GB (dev); Mistral encoder 48 GB",
        ),
        FLUX2_KLEIN,
        FLUX2_KLEIN_DISTILLED,
        Family(
            "qwen-image",
            "Qwen-Image",
            "QwenImagePipeline",
            ("QwenImagePipeline",),
            "transformer",
            (TextEncoder("text_encoder", "qwen", 1024),),
            guidance="none",  # guidance_scale is for guidance-distilled transformers only
            true_cfg=True,
            true_cfg_default=4.0,
            max_sequence_length=512,
            size_multiple=16,
            defaults={"num_inference_steps": 50} | FLOW,
            flow_matching=True,
            lora_loader="QwenImageLoraLoaderMixin",
            lora_formats=("diffusers", "peft", "ai-toolkit", "kohya"),
            single_file="transformer",
            gguf_architectures=("qwen_image",),
            tested=True,
            memory="transformer 41 / 22 / 12 GB; Qwen2.5-VL encoder 16.6 GB",
        ),
        Family(
            "z-image",
            "Z-Image",
            "ZImagePipeline",
            ("ZImagePipeline",),
            "transformer",
            (TextEncoder("text_encoder", "qwen", 512),),
            guidance="cfg",
            max_sequence_length=512,
            size_multiple=16,
            defaults={"num_inference_steps": 50, "guidance_scale": 5.0} | FLOW,
            flow_matching=True,
            lora_loader="ZImageLoraLoaderMixin",
            lora_formats=("diffusers", "peft", "ai-toolkit"),
            single_file="transformer",
            gguf_architectures=("lumina2", "z_image"),
            tested=True,
            memory="transformer 12.3 / 6.7 / 3.6 GB; Qwen3 encoder 8 GB",
        ),
        Family(
            "chroma",
            "Chroma",
            "ChromaPipeline",
            ("ChromaPipeline",),
            "transformer",
            (TextEncoder("text_encoder", "t5", 512),),
            guidance="cfg",
            max_sequence_length=512,
            size_multiple=16,
            defaults={"num_inference_steps": 35, "guidance_scale": 5.0} | FLOW,
            flow_matching=True,
            lora_loader="FluxLoraLoaderMixin",
            lora_formats=("diffusers", "peft", "ai-toolkit"),
            single_file="transformer",
            gguf_architectures=("chroma",),
            prompt_weights="t5-masked",
            tested=True,
            memory="transformer 17.8 / 9.5 / 5 GB; T5 9.5 GB",
        ),
    )
}

# Folders of one pipeline class that are another family: (base family, file in the folder, key, value, family).
VARIANTS = (
    ("flux", "transformer/config.json", "guidance_embeds", False, "flux-schnell"),
    ("flux2-klein", "model_index.json", "is_distilled", True, "flux2-klein-distilled"),
)

# Single-file checkpoints, most specific first: (a tensor-name prefix, family, the hub repo of its configs).
# SD/SDXL files hold a whole pipeline; the others hold a transformer in its original layout, its other parts
# from the `config:` folder.
CHECKPOINTS = (
    ("conditioner.embedders.1.model.", "sdxl", "stabilityai/stable-diffusion-xl-base-1.0"),
    ("cond_stage_model.model.", "sd", "stabilityai/stable-diffusion-2-1"),
    ("cond_stage_model.transformer.", "sd", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ("joint_blocks.", "sd3", "stabilityai/stable-diffusion-3.5-large"),
    ("model.diffusion_model.joint_blocks.", "sd3", "stabilityai/stable-diffusion-3.5-large"),
    ("distilled_guidance_layer.", "chroma", "lodestones/Chroma"),
    ("double_blocks.0.img_attn.qkv.weight", "flux", "black-forest-labs/FLUX.1-dev"),
    ("model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "flux", "black-forest-labs/FLUX.1-dev"),
    ("txt_in.weight", "qwen-image", "Qwen/Qwen-Image"),
    ("noise_refiner.", "z-image", "Tongyi-MAI/Z-Image-Turbo"),
    ("model.diffusion_model.noise_refiner.", "z-image", "Tongyi-MAI/Z-Image-Turbo"),
)

# LoRA key fragments (`_` and `.` alike) that say which families a LoRA is for, most specific first; a LoRA with none
# of them is not checked (its load says what is wrong).
LORA_MARKERS = (
    # UNet names first: SD's attention blocks hold `transformer_blocks` too
    ("to_qkv_mlp_proj", ("flux2", "flux2-klein", "flux2-klein-distilled")),
    # BFL's layout (kohya's Flux files) before Qwen-Image's img_mlp, which BFL's double blocks hold too
    ("double_blocks", ("flux", "flux-schnell", "chroma", "flux2", "flux2-klein", "flux2-klein-distilled")),
    ("single_blocks", ("flux", "flux-schnell", "chroma", "flux2", "flux2-klein", "flux2-klein-distilled")),
    ("img_mlp", ("qwen-image",)),
    ("txt_mlp", ("qwen-image",)),
    ("down_blocks", ("sd", "sdxl")),
    ("up_blocks", ("sd", "sdxl")),
    ("mid_block", ("sd", "sdxl")),
    ("input_blocks", ("sd", "sdxl")),
    ("output_blocks", ("sd", "sdxl")),
    ("noise_refiner", ("z-image",)),
    ("context_refiner", ("z-image",)),
    ("feed_forward.w1", ("z-image",)),
    ("attention.to_q", ("z-image",)),
    ("distilled_guidance_layer", ("chroma",)),
    ("single_transformer_blocks", ("flux", "flux-schnell", "chroma", "flux2", "flux2-klein", "flux2-klein-distilled")),
    ("joint_blocks", ("sd3",)),
    ("transformer_blocks", ("sd3", "flux", "flux-schnell", "chroma", "qwen-image", "flux2", "flux2-klein", "flux2-klein-distilled")),
)
SDXL_LORA_MARKERS = ("lora_te2_", "text_encoder_2.", "te2.")  # SD LoRA keys for SDXL's second text encoder

FLUX_LIKE = ("flux", "flux-schnell", "chroma")
# LoRA keys diffusers 0.42's loaders drop without an error (the rest of the LoRA applies): the plan says so.
# (families, key fragments, what is dropped)
DROPPED_LORA_KEYS = (
    (
        FLUX_LIKE,
        (
            "lora_unet_img_in",
            "lora_unet_txt_in",
            "lora_unet_time_in",
            "lora_unet_vector_in",
            "lora_unet_guidance_in",
            "lora_unet_final_layer",
        ),
        "its input, embedding and final layers (kohya lora_unet_img_in/txt_in/time_in/vector_in/guidance_in/final_layer)",
    ),
    (FLUX_LIKE, ("lora_te2_",), "its T5 text-encoder layers (lora_te2_)"),
)


def family_of_pipeline(class_name: str) -> Family | None:
    """The family whose pipeline class model_index.json names (`StableDiffusionXLPipeline` -> sdxl)."""
    return next((f for f in FAMILIES.values() if class_name in f.index_classes), None)


def checkpoint_family(keys: list[str] | set[str]) -> tuple[str, str] | None:
    """(family, config repo) of a single-file checkpoint from its tensor names, or None."""
    for prefix, family, repo in CHECKPOINTS:
        if any(k.startswith(prefix) for k in keys):
            return family, repo
    return None


def lora_families(keys: list[str]) -> tuple[str, ...] | None:
    """The families a LoRA's keys fit (LORA_MARKERS, first match), or None when none of its keys say."""
    flat = {k.replace("_", ".") for k in keys}
    for marker, families in LORA_MARKERS:
        fragment = marker.replace("_", ".")
        if any(fragment in k for k in flat):
            if families == ("sd", "sdxl"):
                return ("sdxl",) if any(m in k for k in keys for m in SDXL_LORA_MARKERS) else ("sd", "sdxl")
            return families
    return None


def label(name: str) -> str:
    family = FAMILIES.get(name)
    return family.label if family else name
