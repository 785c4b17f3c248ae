"""Tiny models of the other families users bring (SDXL, a 2x latent upscaler), built offline for tests.

Shapes follow diffusers' own pipeline tests, so these are the real pipeline classes with the real
component wiring, only small. The tokenizers are the byte-level one the demo model uses.
"""

from __future__ import annotations

from pathlib import Path

import torch

from runner.world.assets import byte_tokenizer, tiny_text_config, tiny_vae


def text_config(**overrides):
    """The demo's CLIP text config, shallower (as in diffusers' own tests)."""
    return tiny_text_config(**({"intermediate_size": 37, "num_hidden_layers": 5} | overrides))


def build_tiny_sdxl(seed: int = 0):
    """A real StableDiffusionXLPipeline: two CLIP text encoders (the second with a projection), text_time UNet."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled text
        cross_attention_dim=80,  # 32 + 48: both text encoders' hidden states side by side
        norm_num_groups=1,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(text_config()),
        # wider than the first, as in SDXL (768 vs 1280): single-file loading tells them apart by width
        text_encoder_2=CLIPTextModelWithProjection(text_config(hidden_size=48, intermediate_size=64)),
        tokenizer=byte_tokenizer(),
        tokenizer_2=byte_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )


def save_sdxl_lora(pipe, path: Path, seed: int, rank: int = 4) -> None:
    """A peft LoRA on the UNet and both text encoders, saved the way SDXL trainers save it (te1 + te2 keys)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    layers = {}
    for attr, targets, key in (
        ("unet", ["to_q", "to_k", "to_v", "to_out.0"], "unet_lora_layers"),
        ("text_encoder", ["q_proj", "v_proj"], "text_encoder_lora_layers"),
        ("text_encoder_2", ["q_proj", "v_proj"], "text_encoder_2_lora_layers"),
    ):
        module = getattr(pipe, attr)
        module.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False), adapter_name="build")
        layers[key] = get_peft_model_state_dict(module, adapter_name="build")
    type(pipe).save_lora_weights(save_directory=str(path.parent), weight_name=path.name, **layers)
    for attr in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, attr)
        (module.delete_adapters if hasattr(module, "delete_adapters") else module.delete_adapter)("build")  # diffusers / transformers


def build_tiny_latent_upscaler(seed: int = 0):
    """A real StableDiffusionLatentUpscalePipeline (2x in latent space), shaped like diffusers' test one."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionLatentUpscalePipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        act_fn="gelu",
        attention_head_dim=8,
        norm_num_groups=None,
        block_out_channels=[32, 32, 64, 64],
        time_cond_proj_dim=160,
        conv_in_kernel=1,
        conv_out_kernel=1,
        cross_attention_dim=32,
        down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"),
        in_channels=8,
        mid_block_type=None,
        only_cross_attention=False,
        out_channels=5,
        resnet_time_scale_shift="scale_shift",
        time_embedding_type="fourier",
        timestep_post_act="gelu",
        up_block_types=("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"),
    )
    return StableDiffusionLatentUpscalePipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(text_config(hidden_act="quick_gelu", projection_dim=512)),
        tokenizer=byte_tokenizer(),
        unet=unet.eval(),
        scheduler=EulerDiscreteScheduler(prediction_type="sample"),
    )


def bare_diffusers_image(pipe, prompt: str, seed: int, *, size: int = 64, steps: int = 4, guidance: float = 7.5, **kwargs):
    """One image the way a diffusers user would make it by hand, with the runner's defaults (UniPC, CPU generator)."""
    import numpy as np
    from diffusers import UniPCMultistepScheduler

    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        out = pipe(
            prompt=prompt,
            width=kwargs.pop("width", size),
            height=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator("cpu").manual_seed(seed)],
            output_type="np",
            **kwargs,
        ).images[0]
    return (np.clip(out, 0, 1) * 255).round().astype(np.int16)
