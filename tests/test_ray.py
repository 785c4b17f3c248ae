"""`engine.workers=2`: the sweep on two Ray workers (a local Ray on this machine), the driver the only writer."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import (
    SLOW_SWEEP,
    SMALL_SWEEP,
    Workspace,
    assert_complete,
    journal_lines,
    mlflow_runs,
    start_run,
    sweep_images,
    wait_for_results,
)

pytestmark = pytest.mark.slow
pytest.importorskip("ray")


@contextmanager
def torch_threads(count: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_two_workers_give_the_ids_and_pixels_of_one_process(workspace):
    path = workspace.sweep("small", SMALL_SWEEP)
    pooled = workspace.cli("run", f"sweep={path}", "engine.workers=2", "engine.batch_size=1")
    assert pooled.code == 0, pooled.out + pooled.err
    single_ws = Workspace(workspace.root / "single", workspace.assets)
    single_ws.root.mkdir()
    # Ray gives each CPU actor one thread (OMP_NUM_THREADS=1), and CPU kernels round differently with
    # another thread count: the single-process run (in this process) uses one thread too
    with torch_threads(1):
        single_ws.run(f"sweep={single_ws.sweep('small', SMALL_SWEEP)}", "engine.batch_size=1", "tracking=none").assert_all_ok()

    pooled_rows, pooled_pixels = sweep_images(workspace.outputs, "small")
    single_rows, single_pixels = sweep_images(single_ws.outputs, "small")
    assert sorted(pooled_rows["id"]) == sorted(single_rows["id"]), "the same ids"
    for image_id in single_rows["id"]:
        assert np.array_equal(pooled_pixels(image_id), single_pixels(image_id)), image_id
    assert pooled_rows["meta.worker"].nunique() == 2, "both workers made images"
    parent, children = mlflow_runs(workspace.outputs, "small")
    assert len(parent) == 1 and len(children) == 8 and children["tags.lora_sweep.id"].is_unique
    assert set(children["tags.lib.workers"]) == {"2"}
    assert set(children["tags.mlflow.loggedImages"]) == {"True"}, "the chart view's copy, made from the workers' PNGs"


def worker_pids(driver: int) -> list[int]:
    """The Ray actor processes (named ray::EngineWorker...) of this driver's local Ray: its descendants, not another
    test run's workers on the same machine."""
    listing = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in listing.splitlines() if len(line.split(None, 2)) == 3]
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in rows:
        children.setdefault(int(ppid), []).append(int(pid))
    family, todo = set(), [driver]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in family:
                family.add(child)
                todo.append(child)
    return sorted(int(pid) for pid, _, args in rows if int(pid) in family and "ray::EngineWorker" in args)


def alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running (a zombie, dead but not yet reaped, is not)."""

    def state(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]  # after "pid (comm)"
        except (OSError, IndexError):
            return "gone"

    return [pid for pid in pids if state(pid) not in ("gone", "Z", "X")]


def test_killed_workers_and_drivers_lose_nothing_and_sigterm_stops_like_ctrl_c(workspace):
    """One sweep, three runs: kill -9 of the driver, SIGTERM of the next, a killed worker in the last, which completes."""
    path = workspace.sweep("long", SLOW_SWEEP)
    journal = workspace.outputs / "long" / "results.jsonl"

    def done() -> int:
        return journal_lines(workspace.outputs / "long")

    # kill -9 of the driver: its local Ray goes with it
    proc = start_run(workspace, f"sweep={path}", "engine.workers=2", "engine.batch_size=1")
    wait_for_results(workspace.outputs / "long", 2, proc, timeout=240)
    workers = worker_pids(proc.pid)
    assert len(workers) == 2, "the workers run"
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 60
    while alive(workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(workers), "no Ray worker outlives its killed driver"

    # SIGTERM (what SLURM and Kubernetes send) stops the continuing driver as Ctrl-C does
    proc = start_run(workspace, f"sweep={path}", "engine.workers=2", "engine.batch_size=1")
    wait_for_results(workspace.outputs / "long", done() + 2, proc, timeout=240)
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted:" in out, out + err
    assert time.monotonic() - started < 30
    parent, _ = mlflow_runs(workspace.outputs, "long")
    assert parent["status"].iloc[0] == "KILLED"
    kept = pd.read_json(journal, lines=True)
    assert len(kept) >= 4 and set(kept["status"]) == {"ok"}, "finished images are kept"

    # a worker killed mid-sweep: its groups go to the other, and the run completes the sweep
    proc = start_run(workspace, f"sweep={path}", "engine.workers=2", "engine.batch_size=1")
    wait_for_results(workspace.outputs / "long", done() + 1, proc, timeout=240)
    pids = worker_pids(proc.pid)
    assert len(pids) == 2, pids
    os.kill(pids[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    assert "a Ray worker died" in err, err  # and its images went to the other
    assert_complete(workspace, "long", 12)  # each id once, every PNG whole, one finished MLflow run per image
    made_by = set(pd.read_parquet(workspace.outputs / "long" / "results.parquet")["meta.worker"].astype(str))
    assert str(pids[1]) in made_by, "the surviving worker made images of this run"
