"""Tiny, real pipelines of the flow-matching families (Flux.1, Flux.2, Flux.2 Klein, Qwen-Image, Z-Image, SD3, Chroma).

Each `tiny_<family>()` returns a real pipeline of that diffusers class, built from configs with
seeded random weights and tokenizers made in memory (nothing is downloaded); `build_tiny_<family>(path)`
saves it with `save_pretrained` and returns the folder. Shapes follow diffusers' own pipeline tests,
except that the VAEs downsample 8x as the released ones do (64x64 pixels are 8x8 latents) and the
text encoders are deep enough for the pipelines' default arguments (Flux.2's hidden-state layers).
`python -m tests.tiny_families [name ...]` builds them (all of `FAMILIES` by default), checks each (load with
DiffusionPipeline and the class, two identical 64x64 2-step images, prompt and seed matter, LoRA, fuse) and
prints a table: about 0.1-0.3 s to build and save each (the first ~1.7 s, importing), 0.05-0.3 s an image,
1.2-2.4 MB. Torch runs on one thread there: on the shared 2-core machines two threads were 20-30x slower.
Same seed, byte-identical folders. The scheduler settings are recalled from the released folders, not copied.

What the families look like in diffusers 0.42.1 (``__call__`` defaults; "CFG" = a second transformer pass on a
negative). LoRA targets are the transformer's Linear names (peft matches them as name suffixes); all these
families' loaders take peft/diffusers state dicts saved by their own `save_lora_weights`, and `fuse_lora` /
`unfuse_lora` work for all of them (checked below).

- Flux.1 (`FluxPipeline`; dev and schnell are the same class): CLIPTextModel (pooled output only;
  `tokenizer`: CLIPTokenizer, 77) + T5EncoderModel (`tokenizer_2`: T5TokenizerFast; `max_sequence_length` 512,
  at most 512, schnell is used with 256; padded to it). `guidance_scale` (3.5) is *distilled* guidance fed to
  the guidance embedding (dev: `guidance_embeds=True`; schnell has none and ignores it); real CFG only with
  `true_cfg_scale > 1` plus `negative_prompt`/`negative_prompt_2`. Size multiple 16 (VAE 8x * 2x2 packing; other
  sizes are rounded down with a warning). FlowMatchEulerDiscreteScheduler (dev: dynamic shifting; schnell:
  shift 1, none). FluxLoraLoaderMixin: `transformer` + `text_encoder` (CLIP: q_proj/k_proj/v_proj/out_proj);
  also kohya, xlabs, BFL-control, fal-kontext state dicts. Targets: double blocks `attn.to_q/to_k/to_v/to_out.0`,
  `attn.add_q_proj/add_k_proj/add_v_proj/to_add_out`, `ff(_context).net.0.proj/net.2`; single blocks
  `attn.to_q/to_k/to_v`, `proj_mlp`, `proj_out` (no `to_out`).
- Flux.2 (`Flux2Pipeline`): Mistral3ForConditionalGeneration; hidden states of layers (10, 20, 30) are stacked
  (`text_encoder_out_layers`), so the tiny encoder has 31 layers to run with the defaults; a system message is
  prepended through the chat template; `max_sequence_length` 512, padded to it. The real `tokenizer` is a
  PixtralProcessor, which needs torchvision (not installed here: transformers only gives a placeholder), so the
  tiny one is a byte-level BPE tokenizer (class Qwen2Tokenizer) with Mistral's special tokens and a
  Mistral-style chat template: the pipeline only calls `tokenizer.apply_chat_template`, which both have.
  `guidance_scale` (4.0) is distilled guidance only; no negative prompt, no CFG. Size multiple 16 (warning +
  round down). AutoencoderKLFlux2 (2x2 latent patchify + batch-norm statistics). FlowMatchEulerDiscreteScheduler,
  `mu` from an empirical formula. Flux2LoraLoaderMixin: `transformer` only (also kohya, ai-toolkit
  `diffusion_model.`, LoKr/lycoris). Targets: double blocks as Flux, `ff(_context).linear_in/linear_out`;
  single blocks `attn.to_qkv_mlp_proj` (fused) and `attn.to_out` -- a bare `to_out` target fails (it also
  hits the double blocks' `to_out` ModuleList), so use `to_out.0` + `to_qkv_mlp_proj` or full names.
- Flux.2 Klein (`Flux2KleinPipeline`): Qwen3ForCausalLM, layers (9, 18, 27) (so >= 27 layers); Qwen2TokenizerFast,
  chat template called with `enable_thinking=False`; `max_sequence_length` 512, padded. Real CFG when
  `guidance_scale > 1` (4.0) against an empty negative, unless the folder's `is_distilled=True` (then guidance is
  ignored with a warning); a negative only as `negative_prompt_embeds`, no `negative_prompt` string. No guidance
  embedding. Size multiple 16 (warning). Same VAE, scheduler, LoRA mixin and targets as Flux.2.
- Qwen-Image (`QwenImagePipeline`): Qwen2_5_VLForConditionalGeneration (last hidden state; tiny vision tower
  unused) with a Qwen2Tokenizer; the prompt goes into a system template whose first 34 tokens are dropped (the
  tiny tokenizer is built so that the template is 34 tokens, as with the real one). `max_sequence_length` 512
  (at most 1024; not padded). Real CFG needs `true_cfg_scale > 1` (default 4.0) *and* a `negative_prompt` (even
  " "); without one: no CFG, a warning. `guidance_scale` (None) is only for guidance-distilled transformers.
  Size multiple 16 (warning). AutoencoderKLQwenImage (3D causal VAE, one frame, `latents_mean/std`, output
  clamped). FlowMatchEulerDiscreteScheduler (dynamic, exponential shift). QwenImageLoraLoaderMixin: `transformer`
  only (also `diffusion_model.`/`lora_unet_` state dicts). Targets: `attn.to_q/to_k/to_v/to_out.0`,
  `attn.add_q_proj/add_k_proj/add_v_proj/to_add_out`, `img_mlp/txt_mlp.net.0.proj/net.2`, `img_mod.1/txt_mod.1`.
- Z-Image (`ZImagePipeline`): Qwen3Model (second-to-last hidden state, padding dropped; Qwen2Tokenizer, chat
  template with `enable_thinking=True`; `max_sequence_length` 512). `guidance_scale` (5.0) is real CFG and on as
  soon as it is > 0 (`pos + g * (pos - neg)`: g=1 already extrapolates; Turbo runs at 0), `negative_prompt`
  (default ""), `cfg_normalization`, `cfg_truncation`. Size multiple 16, others *raise*. Flux's AutoencoderKL.
  FlowMatchEulerDiscreteScheduler (shift 3). It rewrites a `prompt` *list* in place with the chat template (pass
  a copy). ZImageLoraLoaderMixin: `transformer` only (also `diffusion_model.`, LoKr). Targets (in `layers`,
  `noise_refiner`, `context_refiner`): `attention.to_q/to_k/to_v/to_out.0`, `feed_forward.w1/w2/w3`,
  `adaLN_modulation.0`.
- SD3 / 3.5 (`StableDiffusion3Pipeline`): two CLIPTextModelWithProjection (penultimate hidden state, `clip_skip`,
  projected pooled; CLIPTokenizer, 77) + T5EncoderModel (`tokenizer_3`: T5TokenizerFast; `max_sequence_length`
  256, at most 512); CLIP states are zero-padded (or cut) to T5's width. Real CFG when `guidance_scale > 1` (7.0),
  `negative_prompt/_2/_3`. Size multiple 16 (VAE 8x * patch 2), others *raise*. FlowMatchEulerDiscreteScheduler
  (shift 3). SD3LoraLoaderMixin: `transformer` + `text_encoder` + `text_encoder_2` (not T5). Targets:
  `attn.to_q/to_k/to_v/to_out.0`, `attn.add_q_proj/add_k_proj/add_v_proj`, `attn.to_add_out` (not in the last,
  context-pre-only block), `attn2.*` (3.5 medium's dual attention), `ff.net.0.proj/net.2`. 3.5 large adds
  `qk_norm="rms_norm"`, 3.5 medium also `dual_attention_layers`.
- Chroma (`ChromaPipeline`): T5EncoderModel only (T5TokenizerFast; attention mask used, all but one padding token
  masked; `max_sequence_length` 512, padded). Real CFG when `guidance_scale > 1` (5.0) with `negative_prompt`; no
  pooled text: a "distilled guidance layer" computes the modulations. Size multiple 16 (warning). Flux's VAE.
  FlowMatchEulerDiscreteScheduler. It uses FluxLoraLoaderMixin, so transformer LoRAs load (Flux's names, plus
  `distilled_guidance_layer.*`), but a `text_encoder` LoRA on T5 (`q/k/v/o`) does not: diffusers' text-encoder
  path only recognises CLIP-style names ("Could not automatically infer state dict type").
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `runner` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner.world.assets import byte_tokenizer, tiny_text_config, tiny_vae  # noqa: E402

PROMPT = "a red circle on a blue background"
# the demo world's words and a few common ones, each one token in the tiny T5 / BPE tokenizers
WORLD_TEXT = (
    "a an the of on in with and or red yellow green blue purple white black orange circle square triangle star "
    "background picture photo image painting of shapes stripes sunset bad quality ugly blurry, dog is dancing"
)


# ---------------------------------------------------------------------------------------------------------
# tokenizers


def clip_tokenizer():
    """The demo's CLIPTokenizer: one token per byte (514 tokens), 77 positions."""
    return byte_tokenizer()


def t5_tokenizer(model_max_length: int = 512):
    """A T5TokenizerFast (Unigram): the world's words as whole pieces, single characters as the fallback."""
    import string

    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    seen = {p for p, _ in pieces}
    for word in WORLD_TEXT.replace(",", " ,").split():
        if "▁" + word not in seen:
            seen.add("▁" + word)
            pieces.append(("▁" + word, -1.0 - 0.01 * len(pieces)))
    for ch in string.ascii_letters + string.digits + string.punctuation:
        for piece in (ch, "▁" + ch):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -10.0))
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def _bytes_to_unicode() -> dict[int, str]:
    from runner.world.assets import _bytes_to_unicode as table

    return table()


def byte_bpe(texts: list[str], specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary (Qwen2's pre-tokenizer) in which every word of `texts` is one token.

    Every byte is a token, so any text encodes; each word is merged left to right, the words that start
    with a space (``Ġ``) ranked first so that merges of other words never cut into them. `specials` come
    last in the vocabulary.
    """
    from tokenizers import Regex, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    split = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    words: dict[str, None] = {}
    for text in texts:
        for special in specials:
            text = text.replace(special, "\x00")
        for part in text.split("\x00"):
            for piece, _ in split.pre_tokenize_str(part):
                if len(piece) > 1:
                    words[piece] = None
    vocab = {symbol: i for i, symbol in enumerate(_bytes_to_unicode().values())}
    merges: list[tuple[str, str]] = []
    for word in sorted(words, key=lambda w: not w.startswith("Ġ")):  # stable: first-seen order within each group
        for i in range(2, len(word) + 1):
            if word[:i] not in vocab:
                merges.append((word[: i - 1], word[i - 1]))
                vocab[word[:i]] = len(vocab)
    for special in specials:
        vocab[special] = len(vocab)
    return vocab, merges


QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
]
# Qwen3's template, reduced to what the pipelines use (string contents, generation prompt, enable_thinking)
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
QWEN_IMAGE_TEMPLATE_PREFIX = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
)


def qwen_tokenizer(model_max_length: int = 32768):
    """A Qwen2Tokenizer (fast, byte-level BPE) with Qwen's special tokens and a Qwen3-style chat template."""
    from transformers import Qwen2Tokenizer

    texts = [WORLD_TEXT, QWEN_IMAGE_TEMPLATE_PREFIX, "<|im_end|>\n<|im_start|>assistant\nuser system"]
    vocab, merges = byte_bpe(texts, QWEN_SPECIALS)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
        extra_special_tokens=QWEN_SPECIALS[1:],
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    prefix = len(tokenizer(QWEN_IMAGE_TEMPLATE_PREFIX).input_ids)
    if prefix != 34:  # QwenImagePipeline drops the first 34 tokens: the system prompt of the real tokenizer
        raise RuntimeError(f"the tiny Qwen tokenizer gives the Qwen-Image system prompt {prefix} tokens instead of 34")
    return tokenizer


MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<pad>", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
MISTRAL_SPECIALS += ["[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
# Mistral Small 3.1's layout; content may be a string or a list of {"type": "text", "text": ...} parts
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{%- endif %}"
    "{%- if message['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{ '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{ text + eos_token }}{%- endif %}{%- endfor %}"
)


def mistral_tokenizer(model_max_length: int = 131072):
    """A byte-level BPE tokenizer with Mistral's special tokens and chat layout (stands in for PixtralProcessor)."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import Qwen2Tokenizer

    vocab, merges = byte_bpe([WORLD_TEXT, SYSTEM_MESSAGE], MISTRAL_SPECIALS)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=[t for t in MISTRAL_SPECIALS if t not in ("<unk>", "<s>", "</s>", "<pad>")],
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )


# ---------------------------------------------------------------------------------------------------------
# shared components


def tiny_t5(tokenizer, d_model: int = 32, num_layers: int = 2):
    """A T5 v1.1-style encoder (gated-gelu), no dropout."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )
    return T5EncoderModel(config).eval()


def flux_vae(latent_channels: int = 4):
    """Flux's AutoencoderKL layout (8x, no quant convs, scaling/shift of the released one), tiny channels."""
    return tiny_vae(
        latent_channels=latent_channels, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159
    )


def flux2_vae(latent_channels: int = 4):
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        patch_size=(2, 2),
    )


def flow_scheduler(**config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**config)


# the released folders' scheduler settings as far as they differ from the defaults (from memory: not checked against the hub)
DYNAMIC_SHIFT = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)


def _eval(pipe):
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------------
# the families


def tiny_flux(seed: int = 0, variant: str = "dev"):
    """FluxPipeline: CLIP (pooled) + T5, FluxTransformer2DModel; dev has the guidance embedding, schnell not."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    if variant not in ("dev", "schnell"):
        raise ValueError(f"Flux variant {variant!r}: dev or schnell")
    tokenizer_2 = t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x 2x2 packing
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=variant == "dev",
        axes_dims_rope=(4, 4, 8),
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(tiny_text_config(num_hidden_layers=2, intermediate_size=37))
    torch.manual_seed(seed + 2)
    text_encoder_2 = tiny_t5(tokenizer_2, d_model=32)
    torch.manual_seed(seed + 3)
    vae = flux_vae()
    scheduler = flow_scheduler(**DYNAMIC_SHIFT) if variant == "dev" else flow_scheduler(shift=1.0)
    return _eval(
        FluxPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=clip_tokenizer(),
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
        )
    )


def tiny_flux2(seed: int = 0):
    """Flux2Pipeline: Mistral3 text encoder (31 layers, so (10, 20, 30) exist), Flux2Transformer2DModel, AutoencoderKLFlux2."""
    from diffusers import Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = mistral_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    hidden = 16
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x the VAE's 2x2 patchify
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * hidden,  # three text layers stacked
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=True,
    )
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 32,
            "max_position_embeddings": 1024,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "num_hidden_layers": 31,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1e9,
            "sliding_window": None,
            "bos_token_id": ids("<s>"),
            "eos_token_id": ids("</s>"),
            "pad_token_id": ids("<pad>"),
            "tie_word_embeddings": True,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 16,
            "image_size": 32,
            "patch_size": 8,
            "num_channels": 3,
        },
        image_token_index=ids("[IMG]"),
        spatial_merge_size=1,
        vision_feature_layer=-1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed + 1)
    text_encoder = Mistral3ForConditionalGeneration(config)
    torch.manual_seed(seed + 2)
    vae = flux2_vae()
    scheduler = flow_scheduler(**DYNAMIC_SHIFT)
    return _eval(Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer))


def tiny_flux2_klein(seed: int = 0, distilled: bool = False):
    """Flux2KleinPipeline: Qwen3ForCausalLM (27 layers, so (9, 18, 27) exist), no guidance embedding, CFG unless distilled."""
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = qwen_tokenizer()
    hidden = 16
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * hidden,
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=27,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed + 1)
    text_encoder = Qwen3ForCausalLM(config)
    torch.manual_seed(seed + 2)
    vae = flux2_vae()
    scheduler = flow_scheduler(**DYNAMIC_SHIFT)
    return _eval(
        Flux2KleinPipeline(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, is_distilled=distilled
        )
    )


def tiny_qwen_image(seed: int = 0):
    """QwenImagePipeline: Qwen2.5-VL text encoder (tiny vision tower), QwenImageTransformer2DModel, AutoencoderKLQwenImage."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    hidden, z_dim = 16, 4
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z_dim,  # packed 2x2
        out_channels=z_dim,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=hidden,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # 8x spatially, as released
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1e6,
            "tie_word_embeddings": True,
            "eos_token_id": ids("<|im_end|>"),
            "bos_token_id": None,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": hidden},
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed + 2)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    scheduler = flow_scheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift=1.0,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    return _eval(QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer))


def tiny_z_image(seed: int = 0):
    """ZImagePipeline: Qwen3Model text encoder, ZImageTransformer2DModel (patch 2 inside), Flux's AutoencoderKL."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = qwen_tokenizer()
    hidden = 16
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=hidden,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[1024, 64, 64],
    )
    with torch.no_grad():  # created empty/zero: give them values so padding is not a degenerate constant
        transformer.x_pad_token.normal_(0, 0.02)
        transformer.cap_pad_token.normal_(0, 0.02)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed + 1)
    text_encoder = Qwen3Model(config)
    torch.manual_seed(seed + 2)
    vae = flux_vae()
    return _eval(
        ZImagePipeline(
            scheduler=flow_scheduler(shift=3.0), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
        )
    )


def tiny_sd3(seed: int = 0, variant: str = "3"):
    """StableDiffusion3Pipeline: two CLIPs with projection + T5, SD3Transformer2DModel (patch 2); 3.5 large/medium layouts too."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    layouts = {"3": {}, "3.5-large": {"qk_norm": "rms_norm"}, "3.5-medium": {"qk_norm": "rms_norm", "dual_attention_layers": (0,)}}
    if variant not in layouts:
        raise ValueError(f"SD3 variant {variant!r}: one of {sorted(layouts)}")
    tokenizer_3 = t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,  # the default size: 8 latents = 64 pixels
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,  # T5's width; the two CLIPs' 32 + 32 are padded to it
        caption_projection_dim=32,
        pooled_projection_dim=64,  # both CLIPs' projections side by side
        out_channels=4,
        pos_embed_max_size=32,
        **layouts[variant],
    )
    clip = tiny_text_config(num_hidden_layers=5, intermediate_size=37)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModelWithProjection(clip)
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModelWithProjection(clip)
    torch.manual_seed(seed + 3)
    text_encoder_3 = tiny_t5(tokenizer_3, d_model=64)
    torch.manual_seed(seed + 4)
    vae = tiny_vae(use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
    return _eval(
        StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=flow_scheduler(shift=3.0),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=clip_tokenizer(),
            text_encoder_2=text_encoder_2,
            tokenizer_2=clip_tokenizer(),
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )
    )


def tiny_chroma(seed: int = 0):
    """ChromaPipeline: T5 only, ChromaTransformer2DModel (Flux-like, with the distilled guidance layer), Flux's VAE."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    tokenizer = t5_tokenizer()
    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 4, 8),
        approximator_hidden_dim=32,
        approximator_layers=1,
        approximator_num_channels=16,
    )
    torch.manual_seed(seed + 1)
    text_encoder = tiny_t5(tokenizer, d_model=32)
    torch.manual_seed(seed + 2)
    vae = flux_vae()
    return _eval(
        ChromaPipeline(
            scheduler=flow_scheduler(**DYNAMIC_SHIFT), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
        )
    )


# ---------------------------------------------------------------------------------------------------------
# the registry: builder, class, how to call it, where a LoRA goes


FLUX_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")  # both streams
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(frozen=True)
class Family:
    name: str
    make: object  # (seed) -> pipeline
    class_name: str
    call: dict = field(default_factory=dict)  # __call__ arguments beyond prompt/size/steps/generator
    lora_targets: tuple[str, ...] = FLUX_TARGETS
    text_encoder_targets: dict = field(default_factory=dict)  # component -> targets, for the mixins that load text-encoder LoRAs


FAMILIES = {
    f.name: f
    for f in (
        Family(
            "flux-dev",
            lambda seed=0: tiny_flux(seed, "dev"),
            "FluxPipeline",
            {"guidance_scale": 3.5},
            text_encoder_targets={"text_encoder": CLIP_TARGETS},
        ),
        Family(
            "flux-schnell",
            lambda seed=0: tiny_flux(seed, "schnell"),
            "FluxPipeline",
            {"guidance_scale": 0.0, "max_sequence_length": 256},
            text_encoder_targets={"text_encoder": CLIP_TARGETS},
        ),
        Family("flux2", tiny_flux2, "Flux2Pipeline", {"guidance_scale": 4.0}, FLUX_TARGETS + ("to_qkv_mlp_proj",)),
        Family("flux2-klein", tiny_flux2_klein, "Flux2KleinPipeline", {"guidance_scale": 4.0}, FLUX_TARGETS + ("to_qkv_mlp_proj",)),
        Family(
            "flux2-klein-dist",
            lambda seed=0: tiny_flux2_klein(seed, distilled=True),
            "Flux2KleinPipeline",
            {"guidance_scale": 1.0},
            FLUX_TARGETS + ("to_qkv_mlp_proj",),
        ),
        Family("qwen-image", tiny_qwen_image, "QwenImagePipeline", {"true_cfg_scale": 4.0, "negative_prompt": " "}),
        Family(
            "z-image", tiny_z_image, "ZImagePipeline", {"guidance_scale": 5.0, "negative_prompt": ""}, ("to_q", "to_k", "to_v", "to_out.0")
        ),
        Family(
            "sd3",
            lambda seed=0: tiny_sd3(seed, "3"),
            "StableDiffusion3Pipeline",
            {"guidance_scale": 7.0, "negative_prompt": ""},
            text_encoder_targets={"text_encoder": CLIP_TARGETS, "text_encoder_2": CLIP_TARGETS},
        ),
        Family(
            "sd3.5-medium",
            lambda seed=0: tiny_sd3(seed, "3.5-medium"),
            "StableDiffusion3Pipeline",
            {"guidance_scale": 7.0},
            text_encoder_targets={"text_encoder": CLIP_TARGETS, "text_encoder_2": CLIP_TARGETS},
        ),
        Family(
            "chroma",
            tiny_chroma,
            "ChromaPipeline",
            {"guidance_scale": 5.0, "negative_prompt": ""},
            text_encoder_targets={"text_encoder": ("q", "k", "v", "o")},  # T5's names: diffusers cannot load these (see the docstring)
        ),
    )
}


def build_tiny_family(name: str, path: str | Path, seed: int = 0) -> Path:
    """Build family `name`'s tiny pipeline and save it as a diffusers folder at `path`."""
    path = Path(path)
    FAMILIES[name].make(seed).save_pretrained(path)
    return path


def build_tiny_flux(path, seed: int = 0, variant: str = "dev") -> Path:
    return _save(tiny_flux(seed, variant), path)


def build_tiny_flux2(path, seed: int = 0) -> Path:
    return _save(tiny_flux2(seed), path)


def build_tiny_flux2_klein(path, seed: int = 0, distilled: bool = False) -> Path:
    return _save(tiny_flux2_klein(seed, distilled), path)


def build_tiny_qwen_image(path, seed: int = 0) -> Path:
    return _save(tiny_qwen_image(seed), path)


def build_tiny_z_image(path, seed: int = 0) -> Path:
    return _save(tiny_z_image(seed), path)


def build_tiny_sd3(path, seed: int = 0, variant: str = "3") -> Path:
    return _save(tiny_sd3(seed, variant), path)


def build_tiny_chroma(path, seed: int = 0) -> Path:
    return _save(tiny_chroma(seed), path)


def _save(pipe, path) -> Path:
    path = Path(path)
    pipe.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------
# the checks (python -m tests.tiny_families)


def generate(pipe, family: Family, seed: int = 0, size: int = 64, steps: int = 2, **overrides):
    """One image as float pixels in [0, 1] (numpy, HWC), with a CPU generator."""
    kwargs = dict(prompt=PROMPT, height=size, width=size, num_inference_steps=steps, output_type="np") | family.call | overrides
    with torch.inference_mode():
        return pipe(generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images[0]


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def check_family(name: str, root: Path) -> dict:
    """Build, save, reload (generic and specific class), generate twice, then a peft LoRA: add, save/load, fuse, unfuse."""
    import diffusers
    import numpy as np
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    family = FAMILIES[name]
    row = {"family": name, "class": family.class_name}
    t0 = time.perf_counter()
    folder = build_tiny_family(name, root / name)
    row["build_s"] = time.perf_counter() - t0
    row["mb"] = folder_mb(folder)

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    cls = getattr(diffusers, family.class_name)
    assert type(pipe) is cls, f"{name}: loaded as {type(pipe).__name__}"
    assert type(cls.from_pretrained(folder)) is cls
    pipe.set_progress_bar_config(disable=True)

    first = generate(pipe, family)
    t0 = time.perf_counter()
    base = generate(pipe, family)
    row["image_s"] = time.perf_counter() - t0
    assert base.shape == (64, 64, 3), f"{name}: image of shape {base.shape}"
    assert np.isfinite(base).all(), f"{name}: non-finite pixels"
    assert np.array_equal(first, base), f"{name}: two calls with the same seed differ"
    assert base.std() > 0, f"{name}: a flat image"
    assert not np.array_equal(generate(pipe, family, prompt="a green square on a white background"), base), f"{name}: the prompt is ignored"
    assert not np.array_equal(generate(pipe, family, seed=1), base), f"{name}: the seed is ignored"

    # a random peft LoRA on the transformer: add_adapter -> pixels change
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=list(family.lora_targets), init_lora_weights=False)
    pipe.transformer.add_adapter(config, adapter_name="probe")
    with_lora = generate(pipe, family)
    row["lora_delta"] = float(np.abs(with_lora - base).max())
    layers = get_peft_model_state_dict(pipe.transformer, adapter_name="probe")
    pipe.transformer.delete_adapters("probe")
    assert np.allclose(generate(pipe, family), base, atol=1e-6), f"{name}: deleting the adapter did not restore the image"

    # the pipeline's own format: save_lora_weights -> load_lora_weights -> same pixels as the peft adapter
    lora_file = root / f"{name}-lora" / "lora.safetensors"
    cls.save_lora_weights(save_directory=str(lora_file.parent), transformer_lora_layers=layers, weight_name=lora_file.name)
    pipe.load_lora_weights(str(lora_file), adapter_name="probe")
    loaded = generate(pipe, family)
    row["lora_ok"] = row["lora_delta"] > 1e-3 and bool(np.allclose(loaded, with_lora, atol=1e-5))

    pipe.fuse_lora(lora_scale=1.0)
    fused = generate(pipe, family)
    pipe.unfuse_lora()
    unfused = generate(pipe, family)
    pipe.unload_lora_weights()
    after = generate(pipe, family)
    errors = (np.abs(fused - with_lora).max(), np.abs(unfused - with_lora).max(), np.abs(after - base).max())
    row["fuse_err"] = float(max(errors))
    row["fuse_ok"] = row["fuse_err"] < 1e-4
    row["te_lora"] = check_text_encoder_lora(pipe, family, base, root) if family.text_encoder_targets else "n/a"
    return row


def check_text_encoder_lora(pipe, family: Family, base, root: Path) -> str:
    """A LoRA on the text encoder(s), through save_lora_weights / load_lora_weights / fuse_lora: 'ok' or why not."""
    import numpy as np
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    layers = {}
    for attr, targets in family.text_encoder_targets.items():
        torch.manual_seed(2)
        module = getattr(pipe, attr)
        module.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(targets), init_lora_weights=False), adapter_name="te")
        layers[f"{attr}_lora_layers"] = get_peft_model_state_dict(module, adapter_name="te")
    with_te = generate(pipe, family)
    for attr in family.text_encoder_targets:
        getattr(pipe, attr).delete_adapter("te")
    folder = root / f"{family.name}-te-lora"
    type(pipe).save_lora_weights(save_directory=str(folder), weight_name="te.safetensors", **layers)
    try:
        pipe.load_lora_weights(str(folder), weight_name="te.safetensors", adapter_name="te")
    except Exception as error:
        return f"load fails: {type(error).__name__}: {error}"
    loaded = generate(pipe, family)
    pipe.fuse_lora(components=list(family.text_encoder_targets))
    fused = generate(pipe, family)
    pipe.unfuse_lora(components=list(family.text_encoder_targets))
    pipe.unload_lora_weights()
    after = generate(pipe, family)
    if np.abs(with_te - base).max() < 1e-3:
        return "no effect"
    if not (np.allclose(loaded, with_te, atol=1e-5) and np.allclose(fused, with_te, atol=1e-4) and np.allclose(after, base, atol=1e-5)):
        return "differs after load/fuse/unload"
    return "ok"


def main(names: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and the machines are shared
    root = Path(tempfile.mkdtemp(prefix="tiny-families-"))
    rows, failed = [], []
    try:
        for name in names or list(FAMILIES):
            try:
                rows.append(check_family(name, root))
            except Exception as error:  # report every family, not just the first failure
                failed.append(name)
                rows.append({"family": name, "class": FAMILIES[name].class_name, "error": f"{type(error).__name__}: {error}"})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    header = f"{'family':<18}{'class':<27}{'build s':>8}{'image s':>8}{'MB':>6}  {'LoRA ok':<8}{'fuse ok':<8}{'LoRA delta':>11}"
    print(header + "  text-encoder LoRA")
    for r in rows:
        if "error" in r:
            print(f"{r['family']:<18}{r['class']:<27} FAILED {r['error'][:400]}")
            continue
        print(
            f"{r['family']:<18}{r['class']:<27}{r['build_s']:>8.2f}{r['image_s']:>8.2f}{r['mb']:>6.2f}  "
            f"{str(r['lora_ok']):<8}{str(r['fuse_ok']):<8}{r['lora_delta']:>11.3f}  {r['te_lora'][:110]}"
        )
    return 1 if failed or not all(r.get("lora_ok") and r.get("fuse_ok") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or None))
