"""The embedded default: a tiny Stable Diffusion pipeline and three tiny LoRAs, built offline.

Everything is made from small configs with fixed seeds, so two builds give the same weights and
the demo and the tests never touch a hub. The pipeline is a real `StableDiffusionPipeline` saved
in the diffusers folder layout, and the LoRAs are real peft LoRAs saved with `save_lora_weights`,
so the engine loads them through exactly the code path it uses for real models.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

RECIPE_VERSION = 2  # bump when the builders below change what they write (2: the tokenizer really holds its vocabulary)
DEMO_MODEL_DIR = "tiny-sd"
DEMO_LORAS = {"ganyu": 1, "more_details": 2, "watercolor": 3}  # LoRA id -> build seed
TEXT_ENCODER_LAYERS = 8  # enough for clip_skip up to 8


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable symbol table of GPT-2/CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tokenizer_files(folder: Path) -> None:
    """A CLIP tokenizer vocabulary of byte symbols only (no merges): every prompt tokenizes."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def byte_tokenizer():
    """A CLIPTokenizer over the byte vocabulary (transformers 5 takes the files as `vocab`/`merges`; it
    silently ignores the old `vocab_file`/`merges_file` names and would leave only the special tokens)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer(vocab=str(Path(tmp) / "vocab.json"), merges=str(Path(tmp) / "merges.txt"), model_max_length=77)
    if len(tokenizer) != 514:
        raise RuntimeError(f"the tiny tokenizer has {len(tokenizer)} tokens instead of 514")
    return tokenizer


def tiny_vae(**overrides):
    """An AutoencoderKL with SD's 8x downsampling and tiny channels."""
    from diffusers import AutoencoderKL

    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=128,
    )
    return AutoencoderKL(**(config | overrides))


def tiny_text_config(**overrides):
    """A CLIP text config over the byte vocabulary (514 tokens), 32 wide."""
    from transformers import CLIPTextConfig

    config = dict(
        vocab_size=514,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=TEXT_ENCODER_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        projection_dim=32,
    )
    return CLIPTextConfig(**(config | overrides))


def build_tiny_pipeline(seed: int = 0):
    """A real StableDiffusionPipeline with tiny random weights (about 2 MB)."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = tiny_vae()
    text_encoder = CLIPTextModel(tiny_text_config())
    tokenizer = byte_tokenizer()
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_lora(pipe, path: Path, seed: int, rank: int = 4, text_encoder: bool = False) -> None:
    """A random, non-zero peft LoRA on the UNet attention (and optionally the text encoder)."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet_config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
    pipe.unet.add_adapter(unet_config, adapter_name="build")
    unet_layers = get_peft_model_state_dict(pipe.unet, adapter_name="build")
    te_layers = None
    if text_encoder:
        te_config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        pipe.text_encoder.add_adapter(te_config, adapter_name="build")
        te_layers = get_peft_model_state_dict(pipe.text_encoder, adapter_name="build")
    path.parent.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(
        save_directory=str(path.parent),
        unet_lora_layers=unet_layers,
        text_encoder_lora_layers=te_layers,
        weight_name=path.name,
    )
    pipe.unet.delete_adapters("build")
    if text_encoder:
        pipe.text_encoder.delete_adapter("build")  # transformers' name


RECIPE_FILE = "recipe.json"


def demo_assets_ready(assets_dir: Path) -> bool:
    """Built, completely, by this recipe version (an older build is rebuilt, so its identity stays true)."""
    assets_dir = Path(assets_dir)
    try:
        built = json.loads((assets_dir / RECIPE_FILE).read_text()).get("version")
    except (OSError, ValueError):
        return False
    marker = assets_dir / DEMO_MODEL_DIR / "model_index.json"
    return built == RECIPE_VERSION and marker.exists() and all((assets_dir / "loras" / f"{n}.safetensors").exists() for n in DEMO_LORAS)


def ensure_demo_assets(assets_dir: str | os.PathLike) -> Path:
    """Build the tiny model and LoRAs into `assets_dir` unless they are already there.

    Built in a temporary folder and moved into place, so an interrupted build never leaves a
    half-written model that a later run would trust.
    """
    assets_dir = Path(assets_dir)
    if demo_assets_ready(assets_dir):
        return assets_dir
    assets_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".assets-", dir=assets_dir.parent))
    try:
        pipe = build_tiny_pipeline()
        pipe.save_pretrained(staging / DEMO_MODEL_DIR, safe_serialization=True)
        for name, seed in DEMO_LORAS.items():
            save_tiny_lora(pipe, staging / "loras" / f"{name}.safetensors", seed=seed)
        (staging / RECIPE_FILE).write_text(json.dumps({"version": RECIPE_VERSION}))
        assets_dir.mkdir(parents=True, exist_ok=True)
        (assets_dir / RECIPE_FILE).unlink(missing_ok=True)  # not trusted while the folders are replaced
        for child in staging.iterdir():
            if child.is_dir():
                shutil.rmtree(assets_dir / child.name, ignore_errors=True)
                os.replace(child, assets_dir / child.name)
        os.replace(staging / RECIPE_FILE, assets_dir / RECIPE_FILE)  # last: marks the build complete
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return assets_dir
