"""The model families lora-sweep runs, as one table of plain data (no torch: `plan` reads it).

A family says how a model is recognised (model_index.json's `_class_name`, a single file's tensor
names, a LoRA's key names), which diffusers pipeline runs it, what its request fields mean there
(`guidance_scale` is classifier-free guidance for SD/SDXL/SD3/Chroma/Z-Image, a distilled guidance
embedding for Flux.1-dev and Flux.2, nothing for schnell; real CFG on Flux.1 and Qwen-Image is
`true_cfg_scale` with a negative prompt), its size multiple, defaults, schedulers and LoRA loader.
Validation and the engine look things up here instead of branching per family.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# the flow-matching samplers these pipelines take, and the spec's multistep solvers that run with flow sigmas
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
FLOW_SIGMA_SCHEDULERS = ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler")


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
    default_steps: int = 30
    default_guidance: float = 7.5
    flow_matching: bool = False  # takes FLOW_SCHEDULERS (and FLOW_SIGMA_SCHEDULERS with use_flow_sigmas)
    shift: bool = False  # the scheduler's `shift` can be set per request
    lora_loader: str = ""  # the diffusers LoRA loader mixin
    lora_formats: tuple[str, ...] = ("diffusers", "peft")  # third-party layouts its loader converts
    text_encoder_loras: bool = False  # the loader also patches (CLIP) text encoders
    checkpoint_keys: tuple[str, ...] = ()  # tensor-name prefixes of its single-file checkpoints
    lora_keys: tuple[str, ...] = ()  # key fragments only this family's LoRAs have
    tested: bool = False  # a tiny model of it runs in the test suite
    notes: tuple[str, ...] = field(default_factory=tuple)


CLIP_L = TextEncoder("text_encoder", "clip", 77)

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
            default_steps=30,
            default_guidance=7.5,
            lora_loader="StableDiffusionLoraLoaderMixin",
            lora_formats=("diffusers", "peft", "kohya"),
            text_encoder_loras=True,
            checkpoint_keys=("cond_stage_model.",),
            tested=True,
        ),
        Family(
            "sdxl",
            "SDXL",
            "StableDiffusionXLPipeline",
            ("StableDiffusionXLPipeline",),
            "unet",
            (CLIP_L, TextEncoder("text_encoder_2", "clip", 77)),
            guidance="cfg",
            clip_skip=True,
            default_steps=30,
            default_guidance=7.0,
            lora_loader="StableDiffusionXLLoraLoaderMixin",
            lora_formats=("diffusers", "peft", "kohya"),
            text_encoder_loras=True,
            checkpoint_keys=("conditioner.embedders.1.model.",),
            lora_keys=("lora_te2_", "text_encoder_2.", "te2."),
            tested=True,
        ),
        Family(
            "sd3",
            "SD3 / SD3.5",
            "StableDiffusion3Pipeline",
            ("StableDiffusion3Pipeline",),
            "transformer",
            (CLIP_L, TextEncoder("text_encoder_2", "clip", 77), TextEncoder("text_encoder_3", "t5", 512)),
            guidance="cfg",
            clip_skip=True,
            max_sequence_length=256,
            size_multiple=16,
            default_steps=28,
            default_guidance=7.0,
            flow_matching=True,
            shift=True,
            lora_loader="SD3LoraLoaderMixin",
            text_encoder_loras=True,
            checkpoint_keys=("text_encoders.t5xxl.", "model.diffusion_model.joint_blocks."),
            lora_keys=("joint_blocks.", "transformer_blocks.0.attn.add_k_proj"),
        ),
        Family(
            "flux",
            "Flux.1",
            "FluxPipeline",
            ("FluxPipeline",),
            "transformer",
            (CLIP_L, TextEncoder("text_encoder_2", "t5", 512)),
            guidance="distilled",  # dev; schnell's transformer has no guidance embedding: FLUX_SCHNELL below
            true_cfg=True,
            max_sequence_length=512,
            size_multiple=16,
            default_steps=28,
            default_guidance=3.5,
            flow_matching=True,
            lora_loader="FluxLoraLoaderMixin",
            lora_formats=("diffusers", "peft", "ai-toolkit", "kohya", "xlabs", "bfl"),
            text_encoder_loras=True,
            checkpoint_keys=("double_blocks.", "model.diffusion_model.double_blocks."),
            lora_keys=("double_blocks", "single_blocks", "single_transformer_blocks"),
        ),
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
            default_steps=50,
            default_guidance=4.0,
            flow_matching=True,
            lora_loader="Flux2LoraLoaderMixin",
            lora_formats=("diffusers", "peft", "ai-toolkit", "kohya"),
        ),
        Family(
            "flux2-klein",
            "Flux.2 Klein",
            "Flux2KleinPipeline",
            ("Flux2KleinPipeline",),
            "transformer",
            (TextEncoder("text_encoder", "qwen", 512),),
            guidance="cfg",  # the distilled Klein folders (is_distilled) ignore it
            negative_prompt=False,  # negatives only as embeddings in diffusers 0.42
            max_sequence_length=512,
            size_multiple=16,
            default_steps=50,
            default_guidance=4.0,
            flow_matching=True,
            lora_loader="Flux2LoraLoaderMixin",
            lora_formats=("diffusers", "peft", "ai-toolkit", "kohya"),
        ),
        Family(
            "qwen-image",
            "Qwen-Image",
            "QwenImagePipeline",
            ("QwenImagePipeline",),
            "transformer",
            (TextEncoder("text_encoder", "qwen", 1024),),
            guidance="none",  # guidance_scale is for guidance-distilled transformers only
            true_cfg=True,
            max_sequence_length=512,
            size_multiple=16,
            default_steps=50,
            default_guidance=4.0,
            flow_matching=True,
            lora_loader="QwenImageLoraLoaderMixin",
            lora_formats=("diffusers", "peft", "ai-toolkit", "kohya"),
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
            default_steps=50,
            default_guidance=5.0,
            flow_matching=True,
            shift=True,
            lora_loader="ZImageLoraLoaderMixin",
            lora_formats=("diffusers", "peft", "ai-toolkit"),
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
            default_steps=50,
            default_guidance=5.0,
            flow_matching=True,
            lora_loader="FluxLoraLoaderMixin",
            lora_formats=("diffusers", "peft", "ai-toolkit"),
            lora_keys=("distilled_guidance_layer",),
        ),
    )
}

# what the local engine runs today; the others are recognised (and refused with one line) until their engine path lands
RUNNABLE = ("sd", "sdxl")


def family_of_pipeline(class_name: str) -> Family | None:
    """The family whose pipeline class model_index.json names (`StableDiffusionXLPipeline` -> sdxl)."""
    return next((f for f in FAMILIES.values() if class_name in f.index_classes), None)


def family_of_checkpoint(keys: list[str] | set[str]) -> Family | None:
    """The family of a single-file checkpoint from its tensor names, the most specific prefix first."""
    prefixes = sorted(((p, f) for f in FAMILIES.values() for p in f.checkpoint_keys), key=lambda pf: -len(pf[0]))
    for prefix, family in prefixes:
        if any(k.startswith(prefix) for k in keys):
            return family
    return None


def label(name: str) -> str:
    family = FAMILIES.get(name)
    return family.label if family else name
