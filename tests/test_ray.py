"""`engine.workers=2`: the sweep on two Ray workers (a local Ray on this machine), the driver the only writer; killed
workers and drivers lose nothing. (Two workers give one process's ids and pixels: tests/test_family_services.py, on Flux.)"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import (
    SLOW_SWEEP,
    assert_complete,
    journal_lines,
    mlflow_runs,
    start_run,
    wait_for_results,
)

pytestmark = pytest.mark.slow
pytest.importorskip("ray")


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
