"""The grid page at 10,000 images: writing it (thumbnails, index) and opening and scrolling it in headless Chromium.

    python bench/bench_grid_page.py                 # 10,000 images in a temp folder
    python bench/bench_grid_page.py --images 2500 --keep /tmp/grid-bench
    python bench/bench_grid_page.py --keep /tmp/grid-bench --slowdown 4   # the same, the page's CPU 4x slower (DevTools)
    python bench/bench_grid_page.py --keep /tmp/grid-bench --busy 4       # with 4 busy processes beside the browser

A synthetic sweep folder: 25 LoRAs x 4 strengths x 10 seeds x 10 schedulers = 10,000 rows (plan.parquet with the
plan's columns, results with two scores, a 128x128 PNG per image, a ranking). Measured:
  - write_grid_page: once from nothing (every thumbnail made) and again (thumbnails kept: what each later report costs);
  - grid.html's size and its index's share; a running sweep's live index (LiveGridPage: grid-live.js from the
    folder's results), and how often it is rewritten at that cost;
  - open: navigation start to the first drawn grid (`ready`), and to every cell in view built and its thumbnails
    loaded, median of 3 loads;
  - scroll: the scroller moved 60 px per animation frame for 240 frames, down and then right, --reps times;
    frame intervals of all of them together (median, p95, p99, max, frames over 50 ms), for each view (all 10,000
    on one page; one scheduler per page) and each way of building cells: `chunked` (the page's: a few images per
    frame) and `sync` (the page's old way, `#build=sync`: a whole cell in one go), alternating, in the same browser.
Targets (issue 24): 10,000 images open in under 2 s; no scroll frame over 50 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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
    results.to_parquet(root / "results.parquet", index=False)
    from runner.report.ranking import rank_cells

    ranking = rank_cells(plan, results, ["clip_score", "aesthetic"])
    return plan, results, ranking


def live_write(root: Path, plan) -> tuple[float, float]:
    """One write of grid-live.js as a running sweep makes it (results read from the folder); seconds, and the
    interval it sets before the next one."""
    from runner.report.grid_page import LIVE_EVERY_S, LIVE_SHARE, LiveGridPage
    from runner.store import SweepStore

    live = LiveGridPage(SweepStore(root), ["clip_score", "aesthetic"], "bench", {"x": "lora_strength", "y": "lora_model"})
    live.plan = plan
    live.page_ids = plan["id"].tolist()  # grid.html is there already: the tick's cost alone
    started = time.perf_counter()
    live.write()
    spent = time.perf_counter() - started
    (root / "grid-live.js").unlink()
    return spent, max(LIVE_EVERY_S, spent / LIVE_SHARE)


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """`count` processes spinning on the CPU beside the browser (as other work on the machine), stopped after."""
    spinning = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in spinning:
            proc.kill()
            proc.wait()


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
const cellsInView = () => Array.from(document.querySelectorAll('.gcell:not(.absent)')).filter(c => {
  const r = c.getBoundingClientRect(); return r.bottom > 0 && r.top < innerHeight && r.right > 0 && r.left < innerWidth; });
(function poll() {
  const imgs = inView();
  if (document.body.dataset.ready === 'yes' && imgs.length && cellsInView().every(c => c.dataset.complete)
      && imgs.every(i => i.complete && i.naturalWidth > 0))
    done([performance.now(), imgs.length, document.querySelectorAll('.slot').length]);
  else setTimeout(poll, 5);
})();
"""
BUILDS = {"sync": "&build=sync", "chunked": ""}  # the old way of building cells, then the page's

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


def scroll_gaps(driver, dx: int, dy: int, count: int = 240) -> list[float]:
    """The intervals between `count` animation frames while the scroller moves (dx, dy) px a frame, from the top left."""
    driver.execute_script("document.getElementById('scroller').scrollTo(0, 0)")
    return driver.execute_async_script(SCROLL, dx, dy, count)


def distribution(gaps: list[float]) -> dict:
    gaps = sorted(gaps)

    def quantile(q: float) -> float:
        return round(gaps[int(q * (len(gaps) - 1))], 1)

    return {
        "median_ms": round(statistics.median(gaps), 1),
        "p95_ms": quantile(0.95),
        "p99_ms": quantile(0.99),
        "max_ms": round(gaps[-1], 1),
        "over_50ms": sum(g > 50 for g in gaps),
        "frames": len(gaps),
    }


def scroll_both_builds(driver, url: str, reps: int) -> dict:
    """Frame intervals scrolling down and right, for each way of building cells, alternating `reps` times."""
    gaps = {(build, way): [] for build in BUILDS for way in ("down", "right")}
    for _ in range(reps):
        for build, flag in BUILDS.items():
            driver.get("about:blank")
            driver.get(url + flag)
            driver.execute_async_script(OPEN)
            gaps[(build, "down")] += scroll_gaps(driver, 0, 60)
            gaps[(build, "right")] += scroll_gaps(driver, 60, 0)
    return {f"{build} {way}": distribution(g) for (build, way), g in gaps.items()}


def describe(f: dict) -> str:
    spread = f"median {f['median_ms']}, p95 {f['p95_ms']}, p99 {f['p99_ms']}, max {f['max_ms']} ms"
    return f"{spread}; {f['over_50ms']} of {f['frames']} over 50 ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--keep", type=Path, help="write the folder here (kept) instead of a temp folder")
    parser.add_argument("--reps", type=int, default=3, help="scrolls per view, build and direction")
    parser.add_argument("--slowdown", type=float, default=1, help="the page's CPU this many times slower (DevTools CPU throttling)")
    parser.add_argument("--busy", type=int, default=0, help="processes spinning on the CPU while the browser runs")
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
    live_s, live_every_s = live_write(root, plan)
    print(f"grid-live.js while a sweep runs: {live_s:.2f} s a write, so one every {live_every_s:.0f} s at this size")
    from browser import browser

    with busy_processes(args.busy), browser(root / ".profile", width=1280, height=900) as driver:
        driver.execute_cdp_cmd("Emulation.setCPUThrottlingRate", {"rate": args.slowdown})
        report = {}
        for view, fragment in ((f"all {len(plan):,} on one page", "#size=128"), ("one scheduler per page", "#page=scheduler&size=128")):
            url = (root / "grid.html").as_uri() + fragment
            opens = [open_page(driver, url) for _ in range(3)]
            drawn = statistics.median(o[0] for o in opens)
            loaded = statistics.median(o[1] for o in opens)
            report[view] = {"drawn_ms": round(drawn), "thumbs_in_view_ms": round(loaded), "in_view": opens[0][2], "slots": opens[0][3]}
            print(f"{view}: drawn {drawn:.0f} ms, thumbnails in view ({opens[0][2]}) loaded {loaded:.0f} ms after navigation start")
            report[view]["scroll"] = scroll_both_builds(driver, url, args.reps)
            for name, f in report[view]["scroll"].items():
                print(f"  scroll {name:13s} {describe(f)}")
            print(f"  (load {os.getloadavg()[0]:.1f})")
    summary = {"images": len(plan), "write_first_s": round(first, 2), "write_again_s": round(again, 2), "live_write_s": round(live_s, 2)}
    summary |= {"slowdown": args.slowdown, "busy": args.busy}
    print(json.dumps(summary | {"views": report}))


if __name__ == "__main__":
    main()
