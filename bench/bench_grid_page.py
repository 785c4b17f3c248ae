"""The grid page at 10,000 images: writing it (thumbnails, index) and opening and scrolling it in headless Chromium.

    python bench/bench_grid_page.py                 # 10,000 images in a temp folder
    python bench/bench_grid_page.py --images 2500 --keep /tmp/grid-bench

A synthetic sweep folder: 25 LoRAs x 4 strengths x 10 seeds x 10 schedulers = 10,000 rows (plan.parquet with the
plan's columns, results with two scores, a 128x128 PNG per image, a ranking). Measured:
  - write_grid_page: once from nothing (every thumbnail made) and again (thumbnails kept: what each later report costs);
  - grid.html's size and its index's share;
  - open: navigation start to the first drawn grid (`ready`), and to every thumbnail in view loaded, median of 3 loads;
  - scroll: the scroller moved 60 px per animation frame for 240 frames, down and then right; frame intervals
    (median, p95, max, frames over 50 ms), with every view: all 10,000 on one page, and one scheduler per page.
Target (issue 24): 10,000 images open in under 2 s and scroll smoothly in Chromium on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SCHEDULERS = ["Euler", "Euler a", "DDIM", "DPM++ 2M", "DPM++ SDE", "UniPC", "LMS", "Heun", "PLMS", "LCM"]


def synthetic_folder(root: Path, images: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """plan.parquet, results and images/ of a LoRA x strength x seed x scheduler sweep of `images` rows."""
    from PIL import Image

    loras = max(1, images // 400)
    rows = [
        {"lora_model": f"lora{m:02d}", "lora_strength": s, "seed": seed, "scheduler": sched}
        for m in range(loras)
        for s in ("0.25", "0.5", "0.75", "1")
        for seed in range(10)
        for sched in SCHEDULERS
    ][:images]
    plan = pd.DataFrame(rows)
    plan.insert(0, "id", [f"{k:016x}" for k in range(len(plan))])
    plan["blend"] = plan["lora_model"] + " " + plan["lora_strength"]
    plan = plan.assign(model_id="tiny-sd", prompt="a red circle on a blue background", width=128, height=128, guidance_scale=7.5)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for image_id in plan["id"]:
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        Image.new("RGB", (128, 128), colour).save(root / "images" / f"{image_id}.png", compress_level=1)
    results = pd.DataFrame({"id": plan["id"], "status": "ok", "file": "images/" + plan["id"] + ".png", "seed": plan["seed"]})
    results["clip_score"] = rng.normal(70, 8, len(plan))
    results["aesthetic"] = rng.normal(6, 1, len(plan))
    plan.to_parquet(root / "plan.parquet", index=False)
    from runner.report.ranking import rank_cells

    ranking = rank_cells(plan, results, ["clip_score", "aesthetic"])
    return plan, results, ranking


def write(root: Path, plan, results, ranking) -> float:
    from runner.report.grid_page import write_grid_page

    started = time.perf_counter()
    axes = {"x": "lora_strength", "y": "lora_model"}
    write_grid_page(root, plan, results, ranking, ["clip_score", "aesthetic"], name="bench", defaults=axes)
    return time.perf_counter() - started


OPEN = """
const done = arguments[arguments.length - 1];
const inView = () => Array.from(document.querySelectorAll('.slot img')).filter(i => {
  const r = i.getBoundingClientRect(); return r.bottom > 0 && r.top < innerHeight && r.right > 0 && r.left < innerWidth; });
(function poll() {
  const imgs = inView();
  if (document.body.dataset.ready === 'yes' && imgs.length && imgs.every(i => i.complete && i.naturalWidth > 0))
    done([performance.now(), imgs.length, document.querySelectorAll('.slot').length]);
  else setTimeout(poll, 5);
})();
"""

SCROLL = """
const [dx, dy, frames] = [arguments[0], arguments[1], arguments[2]];
const done = arguments[arguments.length - 1];
const s = document.getElementById('scroller');
const times = [];
function step(t) {
  times.push(t);
  if (times.length > frames) { done(times.slice(1).map((v, k) => v - times[k])); return; }
  s.scrollBy(dx, dy);
  requestAnimationFrame(step);
}
requestAnimationFrame(step);
"""


def open_page(driver, url: str) -> tuple[float, float, int, int]:
    driver.get("about:blank")
    driver.get(url)
    loaded, in_view, slots = driver.execute_async_script(OPEN)
    drawn = float(driver.execute_script("return document.body.dataset.readyAt"))
    return drawn, loaded, in_view, slots


def frames(driver, dx: int, dy: int, count: int = 240) -> dict:
    driver.execute_script("document.getElementById('scroller').scrollTo(0, 0)")
    gaps = driver.execute_async_script(SCROLL, dx, dy, count)
    gaps = sorted(gaps)
    return {
        "median_ms": round(statistics.median(gaps), 1),
        "p95_ms": round(gaps[int(0.95 * (len(gaps) - 1))], 1),
        "max_ms": round(gaps[-1], 1),
        "over_50ms": sum(g > 50 for g in gaps),
        "frames": len(gaps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--keep", type=Path, help="write the folder here (kept) instead of a temp folder")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="grid-bench-"))
    started = time.perf_counter()
    plan, results, ranking = synthetic_folder(root, args.images)
    print(f"{len(plan)} images in {root} ({time.perf_counter() - started:.1f} s to make); load {os.getloadavg()[0]:.1f}")
    first, again = write(root, plan, results, ranking), write(root, plan, results, ranking)
    html = (root / "grid.html").read_text()
    index = html[html.index("id='grid-index'>") : html.index("</script>")]
    thumbs = sum(p.stat().st_size for p in (root / "thumbs").glob("*.webp"))
    print(f"write_grid_page: {first:.1f} s with every thumbnail, {again:.2f} s with them kept")
    print(f"grid.html {len(html) / 1e6:.2f} MB (index {len(index) / 1e6:.2f} MB); thumbnails {thumbs / 1e6:.1f} MB in all")
    from browser import browser

    with browser(root / ".profile", width=1280, height=900) as driver:
        report = {}
        for view, fragment in ((f"all {len(plan):,} on one page", "#size=128"), ("one scheduler per page", "#page=scheduler&size=128")):
            url = (root / "grid.html").as_uri() + fragment
            opens = [open_page(driver, url) for _ in range(3)]
            drawn = statistics.median(o[0] for o in opens)
            loaded = statistics.median(o[1] for o in opens)
            down, right = frames(driver, 0, 60), frames(driver, 60, 0)
            report[view] = {"drawn_ms": round(drawn), "thumbs_in_view_ms": round(loaded), "in_view": opens[0][2], "slots": opens[0][3]}
            report[view] |= {"scroll_down": down, "scroll_right": right}
            print(f"{view}: drawn {drawn:.0f} ms, thumbnails in view ({opens[0][2]}) loaded {loaded:.0f} ms after navigation start")
            for name, f in (("down", down), ("right", right)):
                print(
                    f"  scroll {name}: frames median {f['median_ms']}, p95 {f['p95_ms']}, max {f['max_ms']} ms; {f['over_50ms']} over 50 ms"
                )
    print(json.dumps({"images": len(plan), "write_first_s": round(first, 2), "write_again_s": round(again, 2), "views": report}))


if __name__ == "__main__":
    main()
