"""GPU benchmark: SD1.5- and SDXL-sized pipelines with random weights (no download), one blend sweep, four ways.

    python bench/bench_gpu.py                          # both families, about 8 minutes on one H100
    python bench/bench_gpu.py --family sd15 --compile  # also (e): the runner with engine.compile=true

The weights are random (normal, std 0.02) but the shapes are the real ones, so the compute is the real
models': SD1.5 (UNet 860M, CLIP-L, SD VAE) at 512x512, SDXL (UNet 2.6B, CLIP-L + bigG, SDXL VAE) at
1024x1024, 30 steps, classifier-free guidance. Two random rank-32 LoRAs on attention and feed-forward
layers; the sweep is 6 blends (a, b, a+b at strengths 0.5 and 1) x N seeds, measured as:

(a) bare:   a diffusers loop as a careful user writes it: fp16, pipeline and LoRAs loaded once,
            set_adapters per blend (adapters unfused), seeds batched by 4, no saving (bench_runner.bare_loop)
(b) naive:  what web-UI grid scripts do: LoRAs loaded before each image and unloaded after, batch 1
            (bench_runner.naive_loop), on the first images only
(c) runner: `lora-sweep run` with its defaults (bf16, blends fused, batch from free memory) and full
            tracking: PNG with text chunks, results journal, an MLflow child run + artifact per image
(d) runner with tracking=none
(e) --compile: (c) with engine.compile=true; its first batch pays the warm-up
(f) fused vs unfused at full size: the first seed of every blend again with engine.fuse_loras=false,
    and without LoRAs; the pixels of (c) and (f) may differ by rounding, at most 10% of what the
    blend itself changes (the CPU test, tests/test_fused_loras.py, checks the same on the tiny model)
Then tests/test_gpu.py (the CUDA-only tests; --skip-tests to leave them out). The exit status is 1
when (f) or a test fails.

images/s counts from "pipeline loaded" to "last image done" (for the runner: written and logged).
TFLOP/s = images/s x FLOPs per image (counted with torch's FlopCounterMode: 30 steps x UNet on the
guided batch of 2, plus one VAE decode); peak = 989 TFLOP/s (H100 SXM bf16 dense) and the bf16 matrix
product measured here. Writes a JSON of every figure with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_runner import bare_loop, naive_loop  # noqa: E402

H100_BF16_PEAK = 989e12
FUSE_TOLERANCE = 0.1  # fused vs unfused pixels, as a fraction of the blend's own effect on them

SD15 = {
    "size": 512,
    "unet": dict(
        sample_size=64,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    ),
    "vae": {},
}
SDXL = {
    "size": 1024,
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
    "vae": dict(scaling_factor=0.13025, force_upcast=True),
}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def randomize(module, std: float = 0.02) -> None:
    """Real shapes, random values that keep activations finite over 30 steps."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def build_pipeline(family: str, folder: Path, device: str = "cuda") -> None:
    """Write a full-size pipeline with random weights (fp16 files) and two rank-32 LoRAs beside it."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from runner.world.assets import byte_tokenizer, tiny_text_config

    spec = SD15 if family == "sd15" else SDXL
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=spec["size"],
            **spec["vae"],
        )
        clip_l = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
        text_encoder = CLIPTextModel(tiny_text_config(**clip_l))
        text_encoder_2 = None
        if family == "sdxl":
            big_g = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280)
            text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(**big_g, hidden_act="gelu"))
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
    pipe.to(torch.float16)
    pipe.save_pretrained(folder / "model")
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=32, lora_alpha=32, target_modules=LORA_TARGETS, init_lora_weights=False), adapter_name=name)
        with torch.no_grad():
            for key, p in unet.named_parameters():
                if f"lora_A.{name}." in key:
                    p.normal_(0, 1 / 32)
                elif f"lora_B.{name}." in key:
                    p.normal_(0, 0.002)
        layers = get_peft_model_state_dict(unet, adapter_name=name)
        type(pipe).save_lora_weights(save_directory=str(folder), unet_lora_layers=layers, weight_name=f"{name}.safetensors")
        unet.delete_adapters(name)
    del pipe, unet, vae, text_encoder, text_encoder_2
    torch.cuda.empty_cache()


def sweep_file(folder: Path, family: str, seeds: int, name: str, first_seed: int = 0, baseline: bool = False) -> Path:
    import yaml

    size = (SD15 if family == "sd15" else SDXL)["size"]
    sweep = {
        "name": name,
        "base": {
            "prompt": "a photo of a cat in a garden",
            "negative_prompt": "blurry",
            "width": size,
            "height": size,
            "num_inference_steps": 30,
            "guidance_scale": 7.5,
            "scheduler": "EulerDiscreteScheduler",
        },
        "grid": {"lora_model": ["a", "b", "a,b"], "lora_strength": [0.5, 1.0], "seed": {"start": first_seed, "count": seeds}},
        "max_images": 100000,
    }
    if baseline:  # and each cell's no-LoRA image
        sweep["report"] = {"baseline": True}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def compose(folder: Path, family: str, sweep: Path, outputs: Path, *overrides: str):
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
                "progress=false",
                "sweep.report.cell_size=64",
                *overrides,
            ],
        )


def flops_per_image(pipe, family: str) -> float:
    """30 steps x UNet on the guided batch of 2, plus one VAE decode, counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    size = (SD15 if family == "sd15" else SDXL)["size"]
    latents = torch.randn(2, 4, size // 8, size // 8, device="cuda", dtype=pipe.unet.dtype)
    context = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, device="cuda", dtype=pipe.unet.dtype)
    extra = {}
    if family == "sdxl":
        extra = {
            "added_cond_kwargs": {
                "text_embeds": torch.randn(2, 1280, device="cuda", dtype=pipe.unet.dtype),
                "time_ids": torch.randn(2, 6, device="cuda", dtype=pipe.unet.dtype),
            }
        }
    with torch.inference_mode():
        with FlopCounterMode(display=False) as unet_counter:
            pipe.unet(latents, torch.tensor([500], device="cuda"), encoder_hidden_states=context, **extra)
        with FlopCounterMode(display=False) as vae_counter:
            pipe.vae.decode(latents[:1].to(pipe.vae.dtype))
    return 30 * unet_counter.get_total_flops() + vae_counter.get_total_flops()


def measured_matmul_peak() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - start)


def run_runner(cfg) -> dict:
    """`lora-sweep run` in this process; images/s over its generation window, time to the first PNG, peak memory."""
    import pandas as pd
    import torch

    from runner.run import run_sweep

    torch.cuda.reset_peak_memory_stats()
    started = time.time()
    summary = run_sweep(cfg, out=open(os.devnull, "w"))
    pngs = list((Path(cfg.paths.outputs) / cfg.sweep.name / "images").glob("*.png"))
    results = pd.read_parquet(Path(cfg.paths.outputs) / cfg.sweep.name / "results.parquet")
    results = results[results["status"] == "ok"]
    batches = results.drop_duplicates("meta.batch")
    warm = batches.iloc[1:] if len(batches) > 1 else batches  # the batches after the first (warm-up, memory probe)
    warm_rate = warm["batch_size"].sum() / (warm["generation_s"] * warm["batch_size"]).sum()
    return {
        "images": summary.ok,
        "failed": summary.failed,
        "images_per_s": summary.images_per_s,
        "warm_images_per_s": float(warm_rate),
        "first_image_s": min(p.stat().st_mtime for p in pngs) - started if pngs else float("nan"),
        "peak_gb": torch.cuda.max_memory_allocated() / 2**30,
        "batch_sizes": sorted(set(int(b) for b in results["batch_size"])),
        "lora_mode": sorted(set(results["meta.lora_mode"])),
        "dtype": sorted(set(results["meta.dtype"])),
    }


def png_pixels(folder: Path, image_id: str):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(folder / "images" / f"{image_id}.png").convert("RGB"), dtype=np.int16)


def fused_vs_unfused(folder: Path, family: str, work: Path, fused: Path) -> dict:
    """(f) the first seed of every blend again, unfused (peft's adapters at every step), and without LoRAs.

    Fused and unfused images of a blend have the same id: their pixels differ by rounding (bf16 weights,
    other batch sizes), which must stay small beside what the blend itself does to the image (unfused
    blend vs no LoRA, same seed): at most TOLERANCE of it, on average over the pixels.
    """
    import numpy as np
    import pandas as pd

    sweep = sweep_file(folder, family, 1, f"bench-{family}", baseline=True)
    cfg = compose(folder, family, sweep, work / "out-f", "tracking=none", "engine.fuse_loras=false")
    run = run_runner(cfg)
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


def bench_family(family: str, args, work: Path, peak: float) -> dict:
    import torch
    from diffusers import AutoPipelineForText2Image

    from runner.prepare import prepare_sweep

    folder = work / family
    started = time.perf_counter()
    build_pipeline(family, folder)
    print(f"[{family}] built random-weight pipeline and LoRAs in {time.perf_counter() - started:.0f} s", flush=True)
    seeds = args.seeds or (16 if family == "sd15" else 4)
    sweep = sweep_file(folder, family, seeds, f"bench-{family}")
    cfg = compose(folder, family, sweep, work / "out-c", "tracking=sqlite")
    prepared = prepare_sweep(cfg)
    assert prepared.ok, prepared.problems
    plan, n = prepared.plan, len(prepared.plan)
    out: dict = {"family": family, "images": n, "size": (SD15 if family == "sd15" else SDXL)["size"], "steps": 30}

    # (a) and (b): the bare and naive loops on a float16 pipeline
    torch.cuda.reset_peak_memory_stats()
    pipe = AutoPipelineForText2Image.from_pretrained(str(folder / "model"), torch_dtype=torch.float16, local_files_only=True).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    out["flops_per_image"] = flops_per_image(pipe, family)
    size = out["size"]
    pipe(prompt="warm up", width=size, height=size, num_inference_steps=2)
    first = time.perf_counter()
    pipe(prompt="first", width=size, height=size, num_inference_steps=30)
    out["bare_first_image_s"] = time.perf_counter() - first  # after loading: one image, batch 1
    bare_s = bare_loop(pipe, prepared.registry.loras, plan, 4, "cuda")
    out["bare"] = {"images_per_s": n / bare_s, "peak_gb": torch.cuda.max_memory_allocated() / 2**30}
    print(f"[{family}] (a) bare: {n / bare_s:.2f} images/s", flush=True)
    if not args.skip_naive:
        naive_n = 6 if family == "sd15" else 3
        naive_s = naive_loop(pipe, prepared.registry.loras, plan.head(naive_n))
        out["naive"] = {"images_per_s": naive_n / naive_s, "images": naive_n}
        print(f"[{family}] (b) naive: {naive_n / naive_s:.2f} images/s ({naive_n} images)", flush=True)
    del pipe
    torch.cuda.empty_cache()

    # (c), (d) and (e): lora-sweep run in this process, each into a fresh outputs folder and MLflow store
    out["runner"] = run_runner(cfg)
    print(f"[{family}] (c) runner, full tracking: {out['runner']}", flush=True)
    cfg_none = compose(folder, family, sweep, work / "out-d", "tracking=none")
    out["runner_untracked"] = run_runner(cfg_none)
    print(f"[{family}] (d) runner, tracking=none: {out['runner_untracked']}", flush=True)
    if args.compile:
        cfg_compiled = compose(folder, family, sweep, work / "out-e", "tracking=sqlite", "engine.compile=true")
        out["runner_compiled"] = run_runner(cfg_compiled)
        print(f"[{family}] (e) runner, compiled: {out['runner_compiled']}", flush=True)
    out["fused_vs_unfused"] = fused_vs_unfused(folder, family, work, Path(cfg.paths.outputs) / cfg.sweep.name)
    print(f"[{family}] (f) fused vs unfused: {out['fused_vs_unfused']}", flush=True)
    for key in ("bare", "naive", "runner", "runner_untracked", "runner_compiled"):
        if key in out:
            tflops = out[key]["images_per_s"] * out["flops_per_image"]
            out[key] |= {"tflops": tflops / 1e12, "of_h100_peak": tflops / H100_BF16_PEAK, "of_measured_peak": tflops / peak}
    return out


def print_table(results: list[dict], peak: float) -> None:
    print(f"\nbf16 matrix product measured here: {peak / 1e12:.0f} TFLOP/s; H100 SXM datasheet 989")
    for r in results:
        per_image = r["flops_per_image"] / 1e12
        limit = H100_BF16_PEAK / r["flops_per_image"]
        print(
            f"\n{r['family']}: {r['images']} images {r['size']}x{r['size']}, 30 steps, "
            f"{per_image:.1f} TFLOP/image, limit {limit:.1f} images/s"
        )
        print(f"{'loop':<22}{'images/s':>9}{'warm':>7}{'x bare':>8}{'TFLOP/s':>9}{'of peak':>8}{'1st img s':>10}{'peak GB':>8}")
        bare = r["bare"]["images_per_s"]
        for key, label in (
            ("bare", "(a) bare fp16 unfused"),
            ("naive", "(b) naive per image"),
            ("runner", "(c) runner, tracked"),
            ("runner_untracked", "(d) runner, untracked"),
            ("runner_compiled", "(e) runner, compiled"),
        ):
            if key not in r:
                continue
            v = r[key]
            first = v.get("first_image_s", r.get("bare_first_image_s") if key == "bare" else float("nan"))
            print(
                f"{label:<22}{v['images_per_s']:>9.2f}{v.get('warm_images_per_s', float('nan')):>7.2f}{v['images_per_s'] / bare:>8.2f}"
                f"{v['tflops']:>9.0f}{v['of_h100_peak']:>8.1%}{first:>10.1f}{v.get('peak_gb', float('nan')):>8.1f}"
            )
        tracked, untracked = r["runner"]["images_per_s"], r["runner_untracked"]["images_per_s"]
        print(f"tracking cost: {1 - tracked / untracked:+.1%} (tracked vs tracking=none, same run)")
        f = r["fused_vs_unfused"]
        print(
            f"fused vs unfused ({f['blends']} blends, first seed): mean |diff| {f['mean_abs_diff']:.2f}, p99 {f['p99_abs_diff']:.0f}, "
            f"max {f['max_abs_diff']} of 255; the blends change the image by {f['mean_blend_effect']:.2f} on average: "
            f"{f['diff_of_effect']:.1%} of it, {'within' if f['within_tolerance'] else 'OUTSIDE'} the tolerance ({FUSE_TOLERANCE:.0%})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["sd15", "sdxl", "both"], default="both")
    parser.add_argument("--seeds", type=int, default=0, help="seeds per blend (default 16 for SD1.5, 4 for SDXL)")
    parser.add_argument("--compile", action="store_true", help="also run (e): engine.compile=true")
    parser.add_argument("--json", default=None, help="write every figure here")
    parser.add_argument("--skip-naive", action="store_true", help="leave out (b)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run tests/test_gpu.py after the benchmark")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU; bench/bench_runner.py is the CPU variant")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    peak = measured_matmul_peak()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("sd15", "sdxl") if args.family == "both" else (args.family,):
            results.append(bench_family(family, args, Path(tmp), peak))
            if args.json:
                Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "peak": peak, "results": results}, indent=1))
    print_table(results, peak)
    tests = {"ran": False} if args.skip_tests else run_gpu_tests()
    if args.json:
        figures = json.loads(Path(args.json).read_text())
        Path(args.json).write_text(json.dumps(figures | {"gpu_tests": tests}, indent=1))
    failed = [f"{r['family']}: fused vs unfused outside the tolerance" for r in results if not r["fused_vs_unfused"]["within_tolerance"]]
    if tests.get("exit_code"):
        failed.append("tests/test_gpu.py")
    if failed:
        sys.exit("failed: " + "; ".join(failed))


if __name__ == "__main__":
    main()
