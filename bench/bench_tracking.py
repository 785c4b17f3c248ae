"""MLflow's cost per image, measured side by side: one child run with its PNG through MLflow's client,
without and with the chart-view copy (`log_image` under a key, tracking.chart_images) and the score
metrics added afterwards; and all of it through the bulk writer the runner uses for a database store
(runner/tracking_sql.py: a batch of runs in one transaction, PNGs hard-linked).

    python bench/bench_tracking.py --images 60

Each variant logs the same images into its own fresh sqlite store, interleaved over --repeats rounds;
prints milliseconds per image (median over rounds) and the ratio with/without.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rows_and_images(n: int, size: int):
    import numpy as np
    from PIL import Image

    from runner.engines.base import ImageResult
    from runner.request import parse_request

    rng = np.random.default_rng(0)
    items = []
    for k in range(n):
        request, _ = parse_request(
            {"prompt": "a red circle on a blue background", "model_id": "tiny-sd", "seed": k, "lora_model": "sunset", "lora_strength": 0.5}
        )
        row = {**request, "id": f"{k:016x}", "blend": "sunset 0.5"}
        image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        items.append((row, ImageResult(row["id"], "ok", image=image, seed=k, scheduler="EulerDiscreteScheduler", generation_s=0.1)))
    return items


def log_all(items, folder: Path, chart_images: bool, scores: bool, bulk: bool = False) -> float:
    import pandas as pd

    from runner.image_file import png_bytes
    from runner.tracking import Tracker

    # bulk=False: MLflow's client, run by run (and the scores image by image)
    tracker = Tracker(
        f"sqlite:///{folder / 'mlflow.db'}",
        "bench",
        (folder / "artifacts").as_uri(),
        name_axes=["lora_strength", "seed"],
        chart_images=chart_images,
        bulk=bulk,
    )
    tracker.start_parent("bench", {}, {})
    paths = []
    for row, result in items:  # the PNGs exist before logging, as in the writer
        path = folder / f"{row['id']}.png"
        path.write_bytes(png_bytes(result.image, row, {}))
        paths.append(path)
    started = time.perf_counter()
    if bulk:  # as the writer hands them over: whatever is queued, at most 32 at a time
        logged = [(row, result, path) for (row, result), path in zip(items, paths)]
        for start in range(0, len(logged), 32):
            tracker.log_images(logged[start : start + 32], {})
    else:
        for (row, result), path in zip(items, paths):
            tracker.log_image(row, result, path, {})
    if scores:
        frame = pd.DataFrame({"id": [r["id"] for r, _ in items], "clip_score": 25.0, "aesthetic": 6.0, "lora_effect": 0.1})
        tracker.log_scores(frame)
    return (time.perf_counter() - started) / len(items) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    items = rows_and_images(args.images, args.size)
    variants = {
        "client: run + PNG": (False, False, False),
        "client: + chart copy": (True, False, False),
        "client: + score metrics": (True, True, False),
        "bulk: all of it, batches of 32": (True, True, True),
    }
    timings: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, (chart, scores, bulk) in variants.items():
            with tempfile.TemporaryDirectory() as tmp:
                timings[name].append(log_all(items, Path(tmp), chart, scores, bulk))
    base = statistics.median(timings["client: run + PNG"])
    print(f"{args.images} images of {args.size}x{args.size}, {args.repeats} interleaved rounds, sqlite store")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"  {name:32s} {median:6.1f} ms/image  ({median / base:.2f}x)")


if __name__ == "__main__":
    main()
