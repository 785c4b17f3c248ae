"""Train the demo's tiny world from pictures drawn by runner/world/draw.py, on a CPU, from scratch.

    python -m runner.world.train                      # the shipped files, into runner/world/files (about 45 min, 2 cores)
    python -m runner.world.train --out /tmp/w --quick # every stage for a few steps (the test that the script still runs)

Stages, each the usual recipe at toy size:
1. a tiny CLIP (text + vision towers, contrastive loss) on captioned pictures of every style;
2. a tiny AutoencoderKL (SD's 8x layout) on the same pictures;
3. the UNet of a Stable Diffusion pipeline on plain pictures (epsilon prediction, 10% empty captions
   for classifier-free guidance), with the CLIP's text tower as its frozen text encoder, as in SD;
4. three LoRAs (peft, saved with diffusers' `save_lora_weights`), each on the same captions with the
   pictures of its style: `sunset` (a colour cast), `stripes` (a texture), `star` (a change of shape);
5. an aesthetic head (ridge regression on CLIP image embeddings, LAION's layout) that likes clean, vivid pictures.
The files are deterministic for a seed and a torch build; `manifest.json` holds their sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np

from runner.world.draw import COLORS, SHAPES, STYLES, degrade, draw, random_scene, style_caption

HERE = Path(__file__).resolve().parent
SHIPPED = HERE / "files"
SIDE = 128
CLIP_SIDE = 64
LORA_STYLES = ("sunset", "stripes", "star")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out"]
LORA_RANK = 8


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def to_tensor(images, side: int | None = None):
    import torch

    arrays = [np.asarray(im.resize((side, side)) if side else im, dtype=np.float32) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def sample_pictures(rng: np.random.Generator, n: int, styles=STYLES):
    scenes = [random_scene(rng) for _ in range(n)]
    chosen = [str(rng.choice(styles)) for _ in range(n)]
    return scenes, chosen, [draw(s, st, SIDE) for s, st in zip(scenes, chosen)]


def warmup_cosine(optimizer, steps: int):
    """Linear warm-up over 5% of the steps, then a cosine decay to 10%."""
    import torch

    warm = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": CLIP_SIDE},
        crop_size={"height": CLIP_SIDE, "width": CLIP_SIDE},
        do_center_crop=True,
        do_resize=True,
        resample=3,
    )


CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def clip_pixels(images):
    """What CLIPProcessor gives the vision tower (square pictures: bicubic resize, rescale, normalise),
    computed here because the processor without torchvision is 20x slower; a test checks they agree."""
    import torch
    from PIL import Image

    arrays = [np.asarray(im.convert("RGB").resize((CLIP_SIDE, CLIP_SIDE), Image.BICUBIC), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(((np.stack(arrays) - CLIP_MEAN) / CLIP_STD).transpose(0, 3, 1, 2).copy())


def tokenize(tokenizer, captions):
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


def train_clip(steps: int, batch: int, seed: int):
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    from runner.world.assets import byte_tokenizer, tiny_text_config

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=CLIP_SIDE,
        patch_size=8,
        projection_dim=32,
    )
    model = CLIPModel(CLIPConfig(text_config=tiny_text_config().to_dict(), vision_config=vision.to_dict(), projection_dim=32))
    tokenizer = byte_tokenizer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, steps)
    model.train()
    for step in range(steps):
        scenes, styles, images = sample_pictures(rng, batch)
        captions = [style_caption(s, st) for s, st in zip(scenes, styles)]
        out = model(input_ids=tokenize(tokenizer, captions), pixel_values=clip_pixels(images), return_loss=True)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"clip step {step}/{steps} loss {out.loss.item():.3f}")
    model.eval()
    return model, tokenizer


def train_vae(steps: int, batch: int, seed: int):
    """Mostly on 64 px crops (4x cheaper; the autoencoder is convolutional), the last fifth on whole pictures."""
    import torch

    from runner.world.assets import tiny_vae

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    vae = tiny_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    schedule = warmup_cosine(optimizer, steps)
    vae.train()
    for step in range(steps):
        whole = step >= steps * 4 // 5
        _, _, images = sample_pictures(rng, batch // 2 if whole else batch)
        x = to_tensor(images)
        if not whole:
            top, left = (int(v) for v in rng.integers(0, SIDE - 64, 2) // 8 * 8)
            x = x[:, :, top : top + 64, left : left + 64]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} mse {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():  # latents of unit variance, as SD's scaling_factor makes them
        _, _, images = sample_pictures(rng, 64)
        std = vae.encode(to_tensor(images)).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    return vae


def encode_pool(vae, text_encoder, tokenizer, scenes, style: str):
    """Latents and caption embeddings of a pool of pictures, computed once (both models are frozen)."""
    import torch

    latents, embeddings = [], []
    with torch.no_grad():
        for start in range(0, len(scenes), 64):
            chunk = scenes[start : start + 64]
            x = to_tensor([draw(s, style, SIDE) for s in chunk])
            latents.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
            embeddings.append(text_encoder(tokenize(tokenizer, [s.caption for s in chunk]))[0])
        empty = text_encoder(tokenize(tokenizer, [""]))[0]
    return torch.cat(latents), torch.cat(embeddings), empty


def noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def denoise_steps(unet, params, latents, embeddings, empty, steps: int, batch: int, lr: float, seed: int, what: str) -> None:
    """The SD training loop: add noise at a random timestep, predict it, 10% of captions empty."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    scheduler = noise_scheduler()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps)
    unet.train()
    for step in range(steps):
        pick = torch.randint(0, len(latents), (batch,), generator=generator)
        x0, cond = latents[pick], embeddings[pick].clone()
        drop = torch.rand(batch, generator=generator) < 0.1
        cond[drop] = empty
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"{what} step {step}/{steps} loss {loss.item():.4f}")
    unet.eval()


def build_unet(seed: int):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(  # a tiny SD 1.x layout: 16x16 latents, cross-attention at 8x8, 32-wide text
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


def assemble_pipeline(unet, vae, text_encoder, tokenizer):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

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


def train_lora(pipe, style: str, pool, steps: int, batch: int, seed: int, path: Path, preview_dir: Path | None = None) -> None:
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    latents, embeddings, empty = pool
    torch.manual_seed(seed)
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=LORA_TARGETS, init_lora_weights="gaussian")
    pipe.unet.add_adapter(config, adapter_name=style)
    params = [p for n, p in pipe.unet.named_parameters() if "lora_" in n]
    for p in pipe.unet.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    denoise_steps(pipe.unet, params, latents, embeddings, empty, steps, batch, 3e-3, seed, f"lora {style}")
    layers = get_peft_model_state_dict(pipe.unet, adapter_name=style)
    type(pipe).save_lora_weights(save_directory=str(path.parent), unet_lora_layers=layers, weight_name=path.name)
    if preview_dir:
        preview(pipe, preview_dir / f"lora-{style}.png", adapter=style)
    pipe.unet.delete_adapters(style)


def image_features(clip, pixels):
    """Projected image embeddings (transformers 5 returns them as `pooler_output` of an output object)."""
    out = clip.get_image_features(pixel_values=pixels)
    return out if hasattr(out, "shape") else out.pooler_output


def train_aesthetic(clip, n: int, seed: int):
    """Ridge regression from normalised CLIP image embeddings to a 0..10 score (10 = clean and vivid)."""
    import torch

    rng = np.random.default_rng(seed + 7)
    _, _, images = sample_pictures(rng, n)
    amounts = rng.uniform(0, 1, n) ** 1.5
    images = [degrade(im, float(a), rng) for im, a in zip(images, amounts)]
    with torch.no_grad():
        feats = torch.cat([image_features(clip, clip_pixels(images[i : i + 128])) for i in range(0, n, 128)])
    feats = torch.nn.functional.normalize(feats, dim=-1).double()
    target = torch.as_tensor(10.0 * (1 - amounts)).double()
    x = torch.cat([feats, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    w = torch.linalg.solve(x.T @ x + 1e-3 * torch.eye(x.shape[1], dtype=torch.float64), x.T @ target)
    fit = x @ w
    log(f"aesthetic head r={np.corrcoef(fit.numpy(), target.numpy())[0, 1]:.3f}")
    return {"layers.0.weight": w[:-1].float().reshape(1, -1).contiguous(), "layers.0.bias": w[-1:].float().contiguous()}


def preview(pipe, path: Path, adapter: str | None = None) -> None:
    """A strip of demo prompts at strengths 0, 0.5, 1 (for the person training; not shipped)."""
    import torch
    from diffusers import EulerDiscreteScheduler
    from PIL import Image

    prompts = ["a red circle on a blue background", "a yellow triangle on a purple background", "a white square on a green background"]
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    strengths = [0.0, 0.5, 1.0] if adapter else [None]
    tiles = []
    for strength in strengths:
        if adapter:
            pipe.set_adapters([adapter], [strength])
        generators = [torch.Generator().manual_seed(k) for k in range(len(prompts))]
        with torch.no_grad():
            tiles += pipe(prompts, num_inference_steps=20, guidance_scale=7.5, generator=generators, height=SIDE, width=SIDE).images
    sheet = Image.new("RGB", (SIDE * len(prompts), SIDE * len(strengths)))
    for k, tile in enumerate(tiles):
        sheet.paste(tile, ((k % len(prompts)) * SIDE, (k // len(prompts)) * SIDE))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(out: Path) -> dict[str, str]:
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {str(p.relative_to(out)): sha256(p) for p in files}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SHIPPED, help="where the files go (default: the shipped runner/world/files)")
    parser.add_argument("--quick", action="store_true", help="a few steps of every stage: checks that the script runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preview", type=Path, default=None, help="write sample sheets of the model and each LoRA here")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)

    import torch
    from safetensors.torch import save_file
    from transformers import CLIPProcessor, CLIPTextModel

    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.quick
    steps = {
        "clip": 3 if q else 800,
        "vae": 5 if q else 1500,
        "unet": 3 if q else 3000,
        "lora": 3 if q else 600,
        "pool": 64 if q else 4096,
        "aesthetic": 64 if q else 2048,
    }
    staging = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    clip, tokenizer = train_clip(steps["clip"], 32 if q else 128, args.seed)
    CLIPProcessor(image_processor=clip_image_processor(), tokenizer=tokenizer).save_pretrained(staging / "tiny-clip")
    clip.save_pretrained(staging / "tiny-clip", safe_serialization=True)

    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())  # transformers 5: no .text_model level
    text_encoder.eval()
    vae = train_vae(steps["vae"], 8 if q else 16, args.seed)

    rng = np.random.default_rng(args.seed + 2)
    scenes = [random_scene(rng) for _ in range(steps["pool"])]
    unet = build_unet(args.seed)
    pool = encode_pool(vae, text_encoder, tokenizer, scenes, "plain")
    params = list(unet.parameters())
    denoise_steps(unet, params, *pool, steps["unet"], 8 if q else 64, 1.5e-3, args.seed, "unet")
    pipe = assemble_pipeline(unet, vae, text_encoder, tokenizer)
    pipe.save_pretrained(staging / "tiny-sd", safe_serialization=True)
    if args.preview:
        preview(pipe, args.preview / "base.png")

    for k, style in enumerate(LORA_STYLES):
        style_pool = encode_pool(vae, text_encoder, tokenizer, scenes[: max(64, len(scenes) // 2)], style)
        train_lora(
            pipe,
            style,
            style_pool,
            steps["lora"],
            8 if q else 32,
            args.seed + 10 + k,
            staging / "loras" / f"{style}.safetensors",
            args.preview,
        )

    save_file(train_aesthetic(clip, steps["aesthetic"], args.seed), str(staging / "aesthetic.safetensors"))
    (staging / "world.json").write_text(
        json.dumps(
            {"colors": list(COLORS), "shapes": list(SHAPES), "loras": list(LORA_STYLES), "steps": steps, "seed": args.seed}, indent=1
        )
    )
    write_manifest(staging)
    shutil.rmtree(args.out, ignore_errors=True)
    staging.rename(args.out)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
