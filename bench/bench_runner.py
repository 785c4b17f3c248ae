"""Runner vs a bare diffusers loop vs a naive per-image loop: same plan, same machine, one process.

    python bench/bench_runner.py                      # CPU defaults: 36 images, 192x192, 12 steps
    python bench/bench_runner.py --size 512 --steps 30 --seeds 8 --device cuda   # on a GPU with a real model: --model DIR

* naive:  what web-UI grid scripts do: the LoRAs of each image loaded before it and unloaded after,
          one image per call, the scheduler rebuilt per image.
* bare:   a diffusers loop written the plain way: pipeline and LoRAs loaded once, set_adapters per
          blend, the seeds of a cell batched with one generator each; no saving, no tracking.
* runner: `run_sweep` with everything on: PNGs with text chunks, results journal, MLflow sqlite
          child run + artifact per image, parent run, grids.

Each is timed from "pipeline loaded" to "last image done" (for the runner: written and logged), so
imports and model loading are outside all three. Prints images/s and the ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_dir  # noqa: E402

from runner.config import (
    CONF_DIR,  # noqa: E402
    register_configs,  # noqa: E402
)
from runner.request import split_loras, split_strengths  # noqa: E402
from runner.run import prepare_with_assets, run_sweep  # noqa: E402
from runner.schedulers import load_scheduler  # noqa: E402

# torch and the engine are imported in the functions that use them: the runner's writer process
# is spawned and re-imports this module, which should stay light.


def compose_config(args, outputs: Path, tracking: str | None = None):
    from hydra.core.config_store import ConfigStore

    register_configs()
    sweep = {
        "name": "bench",
        "base": {
            "prompt": "a red circle on a blue background",
            "width": args.size,
            "height": args.size,
            "num_inference_steps": args.steps,
        },
        "grid": {
            "lora_model": {"each": ["sunset", "stripes", "star"]},
            "lora_strength": [0.5, 1.0],
            "scheduler": ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"],
            "seed": {"start": 0, "count": args.seeds},
        },
    }
    ConfigStore.instance().store(group="sweep", name="bench", node=sweep)
    overrides = [
        "sweep=bench",
        f"paths.outputs={outputs}",
        f"paths.assets={args.assets}",
        f"engine.batch_size={args.batch_size}",
        f"engine.device={args.device}",
        f"tracking={tracking or args.tracking}",
        "progress=false",
    ]
    if args.model:
        overrides += [f"models.tiny-sd.source={args.model}", "models.tiny-sd.builtin=false"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def load_pipeline(prepared, device, dtype):
    from runner.engines.local import LocalEngine

    engine = LocalEngine(registry=prepared.registry, device=device, dtype=dtype)
    engine._load_model(prepared.plan["model_id"].iloc[0])
    return engine.pipe, engine


def bare_loop(pipe, loras, plan, batch_size, device) -> float:
    import torch

    for lora_id, lora in loras.items():
        pipe.load_lora_weights(str(lora.path.parent), weight_name=lora.path.name, adapter_name=lora_id)
    base_config = pipe.scheduler.config
    started = time.perf_counter()
    for (blend, strength, scheduler), cell in plan.groupby(["lora_model", "lora_strength", "scheduler_used"], sort=False):
        pipe.set_adapters(split_loras(blend), adapter_weights=split_strengths(strength))
        pipe.scheduler = load_scheduler(scheduler, base_config)
        row = cell.iloc[0]
        seeds = list(cell["seed"])
        for i in range(0, len(seeds), batch_size):
            chunk = seeds[i : i + batch_size]
            pipe(
                prompt=[row["prompt"]] * len(chunk),
                negative_prompt=[row["negative_prompt"]] * len(chunk),
                width=int(row["width"]),
                height=int(row["height"]),
                num_inference_steps=int(row["num_inference_steps"]),
                guidance_scale=float(row["guidance_scale"]),
                generator=[torch.Generator("cpu").manual_seed(int(s)) for s in chunk],
                output_type="pil",
            )
    elapsed = time.perf_counter() - started
    pipe.unload_lora_weights()
    return elapsed


def naive_loop(pipe, loras, plan) -> float:
    import torch

    base_config = pipe.scheduler.config
    started = time.perf_counter()
    for row in plan.to_dict("records"):
        names = split_loras(row["lora_model"])
        for name in names:
            pipe.load_lora_weights(str(loras[name].path.parent), weight_name=loras[name].path.name, adapter_name=name)
        pipe.set_adapters(names, adapter_weights=split_strengths(row["lora_strength"]))
        pipe.scheduler = load_scheduler(row["scheduler_used"], base_config)
        pipe(
            prompt=row["prompt"],
            negative_prompt=row["negative_prompt"],
            width=int(row["width"]),
            height=int(row["height"]),
            num_inference_steps=int(row["num_inference_steps"]),
            guidance_scale=float(row["guidance_scale"]),
            generator=torch.Generator("cpu").manual_seed(int(row["seed"])),
        )
        pipe.unload_lora_weights()
    return time.perf_counter() - started


def main() -> None:
    import torch

    from runner.engines.local import pick_device, pick_dtype

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per cell (images = 12 cells x seeds)")
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--assets", default=str(Path(tempfile.gettempdir()) / "lora-sweep-bench-assets"))
    parser.add_argument("--model", default=None, help="a diffusers folder to use instead of the tiny model")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument(
        "--tracking", default="sqlite", choices=["sqlite", "none", "both"], help="none: the runner without MLflow; both: each, interleaved"
    )
    parser.add_argument("--repeats", type=int, default=2, help="bare and runner are interleaved this many times; best of each")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(args, Path(tmp) / "outputs", "none" if args.tracking == "none" else "sqlite")
        prepared = prepare_with_assets(cfg)  # the demo's files copied first if the plan uses them
        plan = prepared.plan
        device = pick_device(args.device)
        dtype = pick_dtype("auto", device)
        print(
            f"plan: {len(plan)} images, {args.size}x{args.size}, {args.steps} steps, batch {args.batch_size}, {device} {dtype}, "
            f"torch threads {torch.get_num_threads()}, best of {args.repeats}"
        )

        pipe, engine = load_pipeline(prepared, str(device), str(dtype).removeprefix("torch."))
        pipe(prompt="warm up", width=args.size, height=args.size, num_inference_steps=2)  # first-call allocations
        naive_s = None if args.skip_naive else naive_loop(pipe, prepared.registry.loras, plan)
        modes = ["sqlite", "none"] if args.tracking == "both" else [args.tracking]
        configs = {mode: compose_config(args, Path(tmp) / "outputs", mode) for mode in modes}
        bare_runs, runner_runs = [], {mode: [] for mode in modes}
        for repeat in range(args.repeats):
            bare_runs.append(bare_loop(pipe, prepared.registry.loras, plan, args.batch_size, device))
            for mode, config in configs.items():
                config.paths.outputs = str(Path(tmp) / f"outputs-{mode}-{repeat}")  # a fresh sweep folder and MLflow store
                summary = run_sweep(config, out=open(os.devnull, "w"))
                assert summary.ok == len(plan), f"runner made {summary.ok} of {len(plan)} images"
                runner_runs[mode].append(summary.generate_s)
        engine.close()
        bare_s = min(bare_runs)
        print("bare runs:   " + " ".join(f"{t:.2f}" for t in bare_runs))
        for mode, runs in runner_runs.items():
            print(f"runner runs ({mode}): " + " ".join(f"{t:.2f}" for t in runs))

    n = len(plan)
    runner_s = min(runner_runs[modes[0]])
    print(f"{'loop':<8}{'seconds':>10}{'images/s':>10}")
    for mode in modes:
        what = "MLflow child run + artifacts per image" if mode == "sqlite" else "no MLflow"
        best = min(runner_runs[mode])
        print(f"{'runner':<8}{best:>10.2f}{n / best:>10.2f}   (with PNGs, results journal, {what})")
    print(f"{'bare':<8}{bare_s:>10.2f}{n / bare_s:>10.2f}")
    if naive_s is not None:
        print(f"{'naive':<8}{naive_s:>10.2f}{n / naive_s:>10.2f}")
    print(f"runner / bare  = {bare_s / runner_s:.2f}x  (target >= 0.9x)")
    if len(modes) == 2:
        tracked, untracked = min(runner_runs["sqlite"]), min(runner_runs["none"])
        print(f"tracking cost  = {tracked / untracked - 1:+.1%}  (tracked vs tracking=none, best of {args.repeats} each)")
    if naive_s is not None:
        print(f"runner / naive = {naive_s / runner_s:.2f}x  (target > 1x)")


if __name__ == "__main__":
    main()
