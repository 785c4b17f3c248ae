"""Plan scale: `prepare_sweep` (expand, parse, validate, hash files, give ids) for 10^4, 10^5 and 10^6 rows,
then `lora-sweep plan` itself at 1,000,008 rows.

    python bench/bench_plan.py            # the three sizes, each in a fresh process, then the CLI twice
    python bench/bench_plan.py --rows 1000000
    python bench/bench_plan.py --cli [OVERRIDES...]   # one CLI run (default: the 1,000,008-row demo below)

The sweep: 4 prompts x 6 blends of the demo's LoRAs (each alone and in pairs) x 4 strengths x
2 guidance scales = 192 cells, times as many seeds as give the rows asked for. Prints seconds (wall
and CPU) for the whole of `prepare_sweep` (what `lora-sweep plan` and `run` do before the first
image) and the process's peak memory (resident set, imports included) beside the memory the plan
itself holds. On a shared machine the wall seconds grow with its load (printed); CPU seconds less so.

The CLI run is what users wait for: `lora-sweep plan` of the demo sweep with seeds 0..41666 and
without its baseline rows (2 prompts x 3 LoRAs x 4 strengths x 41,667 seeds = 1,000,008 rows), in a
child process: wall and CPU seconds and the child's peak RSS (getrusage RUSAGE_CHILDREN), with imports,
Hydra, the summary it prints and the plan-preview.parquet it writes. It runs the code of the tree
this file is in (PYTHONPATH), which is what the `lora-sweep` script of an editable install runs.
Target: 1,000,000 rows in under 10 s and 2 GB, for both.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CELLS = 192
CLI_OVERRIDES = ["sweep=demo", "sweep.grid.seed={range: [0, 41666]}", "sweep.report.baseline=false", "sweep.max_images=2000000"]


def measure(rows: int, outputs: Path) -> dict:
    import yaml

    from runner.cli import compose_config
    from runner.prepare import prepare_sweep
    from runner.run import prepare_with_assets

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
    prepare_with_assets(compose_config([f"paths.outputs={outputs}", "tracking=none"]))  # the demo files, once
    started, cpu_started = time.perf_counter(), time.process_time()
    prepared = prepare_sweep(cfg)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    assert prepared.ok, prepared.problems[:3]
    return {
        "rows": len(prepared.plan),
        "seconds": elapsed,
        "cpu_s": cpu,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_imports_mb": baseline_rss,
        "plan_mb": prepared.plan.memory_usage(deep=True).sum() / 2**20,
    }


def measure_cli(overrides: list[str], outputs: Path) -> dict:
    """One `lora-sweep plan` in a child process (the console script's `runner.cli:main`): wall and CPU seconds, peak RSS.

    Call it once per process: RUSAGE_CHILDREN is the largest of all the children waited for.
    """
    command = [sys.executable, "-c", "from runner.cli import main; main()", "plan", *overrides, "tracking=none", f"paths.outputs={outputs}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=outputs, env=env)  # cwd: no ./sweeps of the caller
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    summary = next(line for line in done.stdout.splitlines() if line.startswith("plan '"))  # plan 'demo': N images, ...
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "rows": int(summary.split(": ", 1)[1].split(" images")[0]),
        "wall_s": wall,
        "cpu_s": child.ru_utime + child.ru_stime,
        "peak_rss_mb": child.ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=0, help="one size, in this process (default: 10^4, 10^5, 10^6, one process each)")
    parser.add_argument("--cli", action="store_true", help="one `lora-sweep plan` run in a child process, as JSON")
    parser.add_argument("--cli-runs", type=int, default=2, help="CLI runs after the sizes (default 2)")
    parser.add_argument("overrides", nargs="*", help="with --cli: the plan's overrides (default: the 1,000,008-row demo)")
    args = parser.parse_args()
    if args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(measure(args.rows, Path(tmp))))
        return
    if args.cli:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(measure_cli(args.overrides or CLI_OVERRIDES, Path(tmp))))
        return
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (seconds are wall; CPU seconds beside them)")
    print(f"{'rows':>10}{'seconds':>9}{'CPU s':>7}{'peak RSS MB':>13}{'of it imports':>15}{'plan MB':>9}")
    for rows in (10_000, 100_000, 1_000_000):
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, __file__, "--rows", str(rows)], capture_output=True, text=True, env=env, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{r['rows']:>10}{r['seconds']:>9.2f}{r['cpu_s']:>7.2f}{r['peak_rss_mb']:>13.0f}{r['rss_after_imports_mb']:>15.0f}{r['plan_mb']:>9.0f}"
        )
    print(f"\nlora-sweep plan {' '.join(repr(o) if ' ' in o else o for o in CLI_OVERRIDES)} tracking=none  (a child process each)")
    print(f"{'rows':>10}{'wall s':>9}{'CPU s':>7}{'peak RSS MB':>13}")
    for _ in range(args.cli_runs):
        done = subprocess.run([sys.executable, __file__, "--cli"], capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{r['rows']:>10}{r['wall_s']:>9.2f}{r['cpu_s']:>7.2f}{r['peak_rss_mb']:>13.0f}")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
