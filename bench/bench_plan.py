"""Plan scale: `prepare_sweep` (expand, parse, validate, hash files, give ids) for 10^4, 10^5 and 10^6 rows.

    python bench/bench_plan.py            # the three sizes, each in a fresh process
    python bench/bench_plan.py --rows 1000000

The sweep: 4 prompts x 6 blends of the demo's LoRAs (each alone and in pairs) x 4 strengths x
2 guidance scales = 192 cells, times as many seeds as give the rows asked for. Prints seconds
for the whole of `prepare_sweep` (what `lora-sweep plan` and `run` do before the first image) and
the process's peak memory (resident set, imports included) beside the memory the plan itself holds.
Target: 1,000,000 rows in under 10 s and 2 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
CELLS = 192


def measure(rows: int, outputs: Path) -> dict:
    import yaml

    from runner.cli import compose_config
    from runner.prepare import prepare_sweep
    from runner.run import ensure_builtin_assets

    seeds = max(1, round(rows / CELLS))
    sweep = {
        "name": "scale",
        "base": {"width": 512, "height": 512, "num_inference_steps": 30},
        "grid": {
            "prompt": ["a red circle", "a blue square", "a green triangle", "a white star"],
            "lora_model": {"each": ["sunset", "stripes", "star"], "pairs": ["sunset", "stripes", "star"]},
            "lora_strength": [0.25, 0.5, 0.75, 1.0],
            "guidance_scale": [5, 7.5],
            "seed": {"start": 0, "count": seeds},
        },
        "max_images": 10_000_000,
    }
    path = outputs / "scale.yaml"
    path.write_text(yaml.safe_dump(sweep))
    cfg = compose_config([f"sweep={path}", f"paths.outputs={outputs}", "tracking=none"])
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ensure_builtin_assets(cfg, prepare_sweep(compose_config([f"paths.outputs={outputs}", "tracking=none"])))  # the demo files, once
    started = time.perf_counter()
    prepared = prepare_sweep(cfg)
    elapsed = time.perf_counter() - started
    assert prepared.ok, prepared.problems[:3]
    return {
        "rows": len(prepared.plan),
        "seconds": elapsed,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_imports_mb": baseline_rss,
        "plan_mb": prepared.plan.memory_usage(deep=True).sum() / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=0, help="one size, in this process (default: 10^4, 10^5, 10^6, one process each)")
    args = parser.parse_args()
    if args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(measure(args.rows, Path(tmp))))
        return
    print(f"{'rows':>10}{'seconds':>9}{'peak RSS MB':>13}{'of it imports':>15}{'plan MB':>9}")
    for rows in (10_000, 100_000, 1_000_000):
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, __file__, "--rows", str(rows)], capture_output=True, text=True, env=env, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{r['rows']:>10}{r['seconds']:>9.2f}{r['peak_rss_mb']:>13.0f}{r['rss_after_imports_mb']:>15.0f}{r['plan_mb']:>9.0f}")


if __name__ == "__main__":
    main()
