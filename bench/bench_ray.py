"""engine.workers: scaling from 1 to 2 Ray workers here, what the driver can absorb, and a simulation of 8 GPUs.

    python bench/bench_ray.py                 # tiny model on this machine's CPU cores

1. Scaling: the same blend plan through RayPoolEngine with 1 and with 2 workers (a local Ray), timed from
   "workers loaded" to "last result back", and the single-process LocalEngine beside them.
2. The driver: pre-encoded 512x512 PNG results fed to the run's BackgroundWriter with full MLflow
   tracking (sqlite): the images/s one driver absorbs, through MLflow's client run by run and through the
   bulk writer (the default), against the 60-80 images/s 8 H100s would send.
3. Simulation: per-group costs measured on one LocalEngine here (pipeline load, blend switch, one batch)
   and the H100 figures of bench/RESULTS.md; groups assigned the way RayPoolEngine does (largest first,
   to whichever worker is free), for the demo-sized sweep and a 10,000-image blend sweep on 8 workers.
   Efficiency = (one worker's time: load + every group) / (8 x the time 8 workers take).
"""

from __future__ import annotations

import heapq
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from runner.engines.ray_pool import SHARES_PER_WORKER  # noqa: E402


def blend_rows(blends: int, seeds: int, size: int = 64, steps: int = 4) -> pd.DataFrame:
    from conftest import engine_rows

    loras = ["sunset", "stripes", "star"]
    pairs = [(loras[i % 3] if i < 3 else f"{loras[i % 3]},{loras[(i + 1) % 3]}", f"{0.3 + 0.1 * (i % 7):.1f}") for i in range(blends)]
    pairs = [(b, s if "," not in b else f"{s},{s}") for b, s in pairs]
    return engine_rows(pairs, list(range(seeds)), size=size, steps=steps)


def scaling(assets: Path) -> dict[str, float]:
    from conftest import demo_engine

    from runner.engines.ray_pool import RayPoolEngine
    from runner.registry import HashCache, Registry, resolve_lora, resolve_model

    rows = blend_rows(8, 6)
    out = {}
    single = demo_engine(assets, batch_size=2)
    single.prepare(rows)
    list(single.generate(rows.head(2)))  # warm
    started = time.perf_counter()
    list(single.generate(rows))
    out["single process"] = len(rows) / (time.perf_counter() - started)
    single.close()

    cache = HashCache(None)
    model, _ = resolve_model("tiny-sd", {"source": str(assets / "tiny-sd")}, cache)
    loras = {n: resolve_lora(n, str(assets / "loras" / f"{n}.safetensors"), None, cache)[0] for n in ("sunset", "stripes", "star")}
    registry = Registry(models={"tiny-sd": model}, loras=loras)
    for workers in (1, 2):
        engine = RayPoolEngine(workers=workers, registry=registry, device="cpu", dtype="float32", batch_size=2)
        list(engine.generate(rows.head(2 * workers)))  # each worker loads its pipeline and runs once
        started = time.perf_counter()
        results = list(engine.generate(rows))
        out[f"ray, {workers} worker{'s' if workers > 1 else ''}"] = len(results) / (time.perf_counter() - started)
        engine.close()
    return out


def driver_absorbs(count: int = 300, bulk: bool = True, uri: str | None = None) -> float:
    """Images/s the driver writes and logs (PNG file, journal, MLflow child run + artifacts), PNGs already encoded.

    bulk=False forces MLflow's client path (run by run, as before issue 13's bulk writer) for the ratio.
    """
    from PIL import Image

    from runner.engines.base import ImageResult
    from runner.image_file import png_bytes
    from runner.store import SweepStore
    from runner.tracking import Tracker
    from runner.writer import BackgroundWriter

    rows = blend_rows(10, count // 10)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8))
    records = rows.to_dict("records")
    pngs = [png_bytes(image, r, {}) for r in records[:1]] * len(records)
    with tempfile.TemporaryDirectory() as tmp:
        store = SweepStore(Path(tmp) / "bench")
        store.acquire()
        if uri:  # a tracking server: its own artifact store
            tracker = Tracker(uri, f"bench-{time.time_ns()}", bulk=bulk)
        else:
            tracker = Tracker(f"sqlite:///{tmp}/mlflow.db", "bench", (Path(tmp) / "mlartifacts").as_uri(), bulk=bulk)
        tracker.start_parent("bench", {}, {})
        writer = BackgroundWriter(store, tracker, {r["id"]: r for r in records}, {}, {})
        started = time.perf_counter()
        for record, png in zip(records, pngs):
            writer.put(ImageResult(id=record["id"], status="ok", png=png, seed=record["seed"], scheduler="EulerDiscreteScheduler"))
        writer.close()
        elapsed = time.perf_counter() - started
        store.release()
    return len(records) / elapsed


def group_costs(assets: Path) -> dict[str, float]:
    """Seconds, measured on one LocalEngine here: pipeline load, a blend switch, one batch of 4 (64x64, 4 steps)."""
    from conftest import demo_engine

    rows = blend_rows(6, 4)
    started = time.perf_counter()
    engine = demo_engine(assets, batch_size=4)
    engine.prepare(rows)
    load = time.perf_counter() - started
    cells = [g for _, g in rows.groupby("lora_model", sort=False)]
    list(engine.generate(cells[0]))
    batch_times, switch_times = [], []
    for cell in cells[1:]:
        started = time.perf_counter()
        engine._set_adapters(cell.iloc[0]["lora_model"], cell.iloc[0]["lora_strength"])
        switch_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        list(engine.generate(cell))
        batch_times.append(time.perf_counter() - started)
    engine.close()
    return {"load": load, "switch": float(np.median(switch_times)), "batch": float(np.median(batch_times)), "batch_images": 4}


def simulate(blends: int, seeds: int, workers: int, per_image: float, switch: float, load: float) -> float:
    """Efficiency of RayPoolEngine's plan: (one worker's time) / (N x the time N workers take).

    One worker switches once per blend; N workers get the groups of `plan_groups` (a blend split by seeds when
    it is over a fair share, each piece paying its own switch), largest first, each to the worker free first."""
    one = load + blends * (switch + seeds * per_image)
    free = [(load, w) for w in range(workers)]
    heapq.heapify(free)
    for size in sorted(group_sizes(blends, seeds, workers), reverse=True):
        at, w = heapq.heappop(free)
        heapq.heappush(free, (at + switch + size * per_image, w))
    return one / (workers * max(t for t, _ in free))


def group_sizes(blends: int, seeds: int, workers: int) -> list[int]:
    """The group sizes plan_groups makes of a blend sweep (the same fair-share rule)."""
    share = max(1, math.ceil(blends * seeds / (workers * SHARES_PER_WORKER)))
    sizes = []
    for _ in range(blends):
        sizes += [min(share, seeds - s) for s in range(0, seeds, share)]
    return sizes


def main() -> None:
    import torch

    from runner.world.assets import ensure_demo_assets

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    assets = ensure_demo_assets(Path(tempfile.gettempdir()) / "lora-sweep-bench-assets")
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}\n")

    print("1. scaling on this machine (tiny model, 48 images: 8 blends x 6 seeds, 64x64, 4 steps, batch 2)")
    measured = scaling(assets)
    base = measured["ray, 1 worker"]
    for name, rate in measured.items():
        print(f"   {name:<16} {rate:6.2f} images/s   {rate / base:4.2f}x one worker")

    print("\n2. the driver with full tracking (512x512 PNGs encoded by workers; file + journal + MLflow run + PNG + chart copy)")
    client = driver_absorbs(bulk=False)
    bulk = driver_absorbs(bulk=True)
    print(f"   MLflow client, run by run      {client:6.1f} images/s")
    print(f"   bulk, one transaction a batch  {bulk:6.1f} images/s   {bulk / client:4.1f}x the client path")
    print(f"   -> 8 H100s on the fast path send 60-80 images/s: {'the driver keeps up' if bulk >= 80 else 'the driver limits them'}")

    print("\n3. simulated efficiency on 8 workers (largest group first, as RayPoolEngine assigns)")
    costs = group_costs(assets)
    tiny_per_image = costs["batch"] / costs["batch_images"]
    print(
        f"   measured here: load {costs['load']:.2f} s, blend switch {costs['switch'] * 1000:.0f} ms, "
        f"{tiny_per_image * 1000:.0f} ms per image"
    )
    # SD1.5 on one H100 (bench/RESULTS.md, issue 11): 4.3 images/s untracked, a fused switch 0.14 s, load ~10 s
    profiles = {"tiny model, this CPU": (tiny_per_image, costs["switch"], costs["load"]), "SD1.5 on H100": (1 / 4.3, 0.14, 10.0)}
    sweeps = {"demo-sized (13 blends x 8 seeds)": (13, 8), "10,000 images (100 blends x 100 seeds)": (100, 100)}
    for profile, (per_image, switch, load) in profiles.items():
        for sweep, (blends, seeds) in sweeps.items():
            groups = len(group_sizes(blends, seeds, 8))
            efficiency = simulate(blends, seeds, 8, per_image, switch, load)
            steady = simulate(blends, seeds, 8, per_image, switch, 0.0)
            print(f"   {profile:<22} {sweep:<40} {groups:4d} groups  efficiency {efficiency:.2f} ({steady:.2f} once loaded)")


if __name__ == "__main__":
    main()
