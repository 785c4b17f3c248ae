"""Search vs grid on the demo's world: how close to the best setting, from how many images.

    python bench/bench_search.py                  # sweeps/search.yaml: 60 settings x 2 prompts x 2 seeds
    python bench/bench_search.py --repeats 3      # TPE and random with sampler seeds 0..2

Runs through the CLI (as a user would), in one temporary outputs folder, with tracking=none:
1. the full grid of sweeps/search.yaml's space (`sampler: grid`, every one of its 60 settings): the
   objective of every setting, the reference;
2. a grid at about the search's budget (strengths 0.2/0.6/1.0, guidance 3/7.5: 18 settings);
3. TPE (the default) and random search, 20 trials each.
Each is scored by the full grid's objective of the setting it picked (the same requests, so the same
images and scores), its rank among the 60 settings, the images it generated and its wall time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(outputs: Path, sweep: Path, *overrides: str) -> float:
    started = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner.cli",
            "run",
            f"sweep={sweep}",
            f"paths.outputs={outputs}",
            "tracking=none",
            "progress=false",
            *overrides,
        ],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"{sweep.name} {overrides} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def setting(row: pd.Series) -> tuple[str, float, float]:
    lora = row["param.lora_model"]
    return lora, round(float(row[f"param.lora_strength.{lora}"]), 6), float(row["param.guidance_scale"])


def picked(folder: Path) -> tuple[tuple, int]:
    trials = pd.read_csv(folder / "search" / "trials.csv")
    best = trials.loc[trials["objective"].idxmax()]
    images = len(pd.read_parquet(folder / "results.parquet"))
    return setting(best), images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="sampler seeds per search method")
    args = parser.parse_args()
    spec = yaml.safe_load((ROOT / "sweeps" / "search.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        outputs = tmp_path / "outputs"

        def write(name: str, **search) -> Path:
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump({**spec, "name": name, "search": {**spec["search"], **search}}))
            return path

        full_s = run(outputs, write("full", sampler="grid", trials=1000))
        full = pd.read_csv(outputs / "full" / "search" / "trials.csv")
        truth = {setting(r): float(r["objective"]) for _, r in full.iterrows()}
        ranked = sorted(truth.values(), reverse=True)
        best, worst = ranked[0], ranked[-1]
        full_images = len(pd.read_parquet(outputs / "full" / "results.parquet"))
        rows = [("full grid (60 settings)", best, 1, full_images, full_s)]

        coarse_space = {**spec["search"]["space"], "guidance_scale": {"choices": [3, 7.5]}}
        for lora in ("sunset", "stripes", "star"):
            coarse_space[f"lora_strength.{lora}"] = {"low": 0.2, "high": 1.0, "step": 0.4}
        seconds = run(outputs, write("coarse", sampler="grid", trials=1000, space=coarse_space))
        chosen, images = picked(outputs / "coarse")
        rows.append(("grid at the budget (18 settings)", truth[chosen], ranked.index(truth[chosen]) + 1, images, seconds))
        for sampler in ("tpe", "random"):
            for seed in range(args.repeats):
                seconds = run(outputs, write(f"{sampler}{seed}", sampler=sampler, sampler_seed=seed))
                chosen, images = picked(outputs / f"{sampler}{seed}")
                rows.append((f"{sampler} search, 20 trials, seed {seed}", truth[chosen], ranked.index(truth[chosen]) + 1, images, seconds))

    print(f"objective {spec['search']['objective']}; the full grid's settings span {worst:.3f} .. {best:.3f}")
    print(f"{'method':36s} {'objective':>9s} {'gap/spread':>10s} {'rank/60':>7s} {'images':>6s} {'of full':>7s} {'wall s':>7s}")
    for name, value, rank, images, seconds in rows:
        gap = (best - value) / (best - worst)
        print(f"{name:36s} {value:9.3f} {gap:10.1%} {rank:7d} {images:6d} {images / full_images:7.0%} {seconds:7.1f}")


if __name__ == "__main__":
    main()
