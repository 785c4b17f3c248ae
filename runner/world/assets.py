"""The embedded default: the demo's tiny world, shipped with the package and put into `paths.assets`.

runner/world/files holds a tiny Stable Diffusion pipeline, three LoRAs (`sunset`: a colour cast,
`stripes`: a texture, `star`: a change of shape), a tiny CLIP and an aesthetic head, all trained on
pictures of coloured shapes by `python -m runner.world.train` (see that script; `manifest.json`
holds their sha256). The pipeline is a real `StableDiffusionPipeline` in the diffusers folder
layout and the LoRAs are real peft LoRAs saved with `save_lora_weights`, so the engine loads them
through exactly the code path it uses for a user's files. Nothing touches a hub.

The small builders below (tokenizer, VAE and text configs, random LoRAs) are what the tests use to
make other tiny models in the same layout.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

RECIPE_VERSION = 3  # bump when what ensure_demo_assets writes changes (3: the trained tiny world of runner/world)
DEMO_MODEL_DIR = "tiny-sd"
DEMO_LORAS = ("sunset", "stripes", "star")
DEMO_FILES = ("tiny-sd", "loras", "tiny-clip", "aesthetic.safetensors", "manifest.json", "world.json")
SHIPPED = Path(__file__).resolve().parent / "files"
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
    """Put there completely, by this recipe version (an older build is replaced, so its identity stays true)."""
    assets_dir = Path(assets_dir)
    try:
        built = json.loads((assets_dir / RECIPE_FILE).read_text()).get("version")
    except (OSError, ValueError):
        return False
    return built == RECIPE_VERSION and all((assets_dir / name).exists() for name in DEMO_FILES)


def shipped_manifest() -> dict[str, str]:
    """Relative path -> sha256 of every shipped file of the tiny world."""
    return json.loads((SHIPPED / "manifest.json").read_text())


def ensure_demo_assets(assets_dir: str | os.PathLike) -> Path:
    """Copy the tiny world into `assets_dir` unless it is already there (a few MB, well under a second).

    Copied into a temporary folder and moved into place, so an interrupted copy never leaves a
    half-written model that a later run would trust.
    """
    assets_dir = Path(assets_dir)
    if demo_assets_ready(assets_dir):
        return assets_dir
    assets_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".assets-", dir=assets_dir.parent))
    try:
        for name in DEMO_FILES:
            source = SHIPPED / name
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, staging / name)
        (staging / RECIPE_FILE).write_text(json.dumps({"version": RECIPE_VERSION}))
        assets_dir.mkdir(parents=True, exist_ok=True)
        (assets_dir / RECIPE_FILE).unlink(missing_ok=True)  # not trusted while the files are replaced
        for child in staging.iterdir():
            if child.name == RECIPE_FILE:
                continue
            target = assets_dir / child.name
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            os.replace(child, target)
        os.replace(staging / RECIPE_FILE, assets_dir / RECIPE_FILE)  # last: marks the copy complete
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return assets_dir


def copy_demo_world_if(needed: bool, assets_dir: str | os.PathLike) -> bool:
    """Copy the demo's world into `assets_dir` when something uses it and it is not there (or older); True if copied."""
    if not needed or demo_assets_ready(Path(assets_dir)):
        return False
    print(f"copying the demo's tiny world (model, LoRAs, scorers) into {assets_dir} (once) ...", flush=True)
    ensure_demo_assets(assets_dir)
    return True
