"""`engine.workers=N`: one plan over N Ray actors, each holding a LocalEngine; the driver alone writes.

Each worker builds its LocalEngine once (pipeline and LoRAs loaded once) and receives whole plan
groups: the rows of one blend (model, LoRAs, strengths), split by seeds only when a group is larger
than a fair share, so adapters switch as rarely as on one GPU. Workers encode PNGs (the driver's
writer would otherwise be the bottleneck) and send back results; the driver's writer, store and
tracker are the single-process run's. A worker that dies has its group queued again on the others.

No scheduler of our own: Ray places the actors (one GPU each on a cluster, one CPU each on a laptop)
and `ray.wait` hands back whichever group finishes first.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Iterator
from typing import Any

import pandas as pd

from runner.engines.base import ImageResult, QueueState

log = logging.getLogger(__name__)

GROUP_KEYS = ["model_id", "lora_model", "lora_strength"]  # one blend: what switching costs on a worker
SHARES_PER_WORKER = 2  # a blend larger than total / (workers * this) is split by seeds (bench/bench_ray.py chose 2)


def plan_groups(rows: pd.DataFrame, workers: int) -> list[pd.DataFrame]:
    """Rows -> groups of one blend each, largest first; groups over a fair share split into seed chunks."""
    share = max(1, math.ceil(len(rows) / max(1, workers * SHARES_PER_WORKER)))
    groups = []
    for _, group in rows.groupby(GROUP_KEYS, sort=False, dropna=False):
        group = group.sort_values(["prompt", "seed"], kind="stable")
        for start in range(0, len(group), share):
            groups.append(group.iloc[start : start + share])
    return sorted(groups, key=len, reverse=True)


def ray_module():
    try:
        import ray
    except ImportError:
        return None
    return ray


def start_ray(ray: Any) -> None:
    """Connect to RAY_ADDRESS when set (a cluster), else start a local Ray for this run."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False, configure_logging=True)
    if main and previous is not None:  # Ray's core installs a SIGTERM handler that aborts: ours stops like Ctrl-C
        signal.signal(signal.SIGTERM, previous)


class EngineWorker:
    """The Ray actor: a LocalEngine built once; `run` generates one group and returns plain results with PNG bytes."""

    def __init__(self, registry: Any, settings: dict[str, Any], hashes: dict[str, str]):
        from runner.engines.local import LocalEngine

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.engine = LocalEngine(registry=registry, **settings)
        self.hashes = hashes

    def pid(self) -> int:
        return os.getpid()

    def run(self, records: list[dict[str, Any]]) -> list[ImageResult]:
        from runner.image_file import png_bytes

        rows = pd.DataFrame(records)
        by_id = {r["id"]: r for r in records}
        self.engine.prepare(rows)
        out = []
        for result in self.engine.generate(rows):
            if result.status == "ok" and result.image is not None:
                row = {**by_id[result.id], "scheduler_used": result.scheduler or by_id[result.id].get("scheduler_used")}
                result.png = png_bytes(result.image, row, self.hashes)
                result.image = None  # the PNG travels; the driver decodes nothing
            result.meta = {**result.meta, "worker": os.getpid()}
            out.append(result)
        return out

    def describe(self) -> dict[str, str]:
        return self.engine.describe()

    def check_loras(self, records: list[dict[str, Any]]) -> list[str]:
        rows = pd.DataFrame(records)
        self.engine.prepare(rows)
        return self.engine.check_loras(rows)


class RayPoolEngine:
    kind = "local"
    state: QueueState | None = None  # no queue of its own to show (the remote engine has one)

    def __init__(self, *, workers: int, registry: Any, hashes: dict[str, str] | None = None, keep_adapters: bool = False, **settings: Any):
        ray = ray_module()
        if ray is None:
            raise RuntimeError("engine.workers needs Ray: pip install -e '.[ray]'")
        self.ray = ray
        start_ray(ray)
        settings = {k: v for k, v in settings.items() if k not in ("workers", "kind")} | {"keep_adapters": keep_adapters}
        gpus = 1 if (ray.cluster_resources().get("GPU", 0) >= 1 and str(settings.get("device", "auto")) != "cpu") else 0
        actor = ray.remote(num_gpus=gpus, num_cpus=0 if gpus else 1, max_restarts=0)(EngineWorker)
        self.workers = [actor.remote(registry, settings, dict(hashes or {})) for _ in range(max(1, int(workers)))]
        self.lost_workers = 0

    def prepare(self, plan: pd.DataFrame) -> None:
        """Each worker loads its pipeline in its constructor; nothing else to do up front."""

    def check_loras(self, plan: pd.DataFrame) -> list[str]:
        """One worker checks every LoRA of the plan against its model (all workers load the same files)."""
        records = plan[["model_id", "lora_model"]].drop_duplicates().to_dict("records")
        return self.ray.get(self.workers[0].check_loras.remote(records)) if self.workers else []

    def worker_pids(self) -> list[int]:
        return self.ray.get([w.pid.remote() for w in self.workers])

    def describe(self) -> dict[str, str]:
        described = dict(self.ray.get(self.workers[0].describe.remote())) if self.workers else {}
        return {**described, "workers": str(len(self.workers)), "ray": self.ray.__version__}

    def generate(self, rows: pd.DataFrame) -> Iterator[ImageResult]:
        """Groups to idle workers, results back as groups finish; a dead worker's group goes to another."""
        from ray.exceptions import RayActorError, WorkerCrashedError

        queue = deque(plan_groups(rows, len(self.workers)))
        idle = list(self.workers)
        running: dict[Any, tuple[Any, pd.DataFrame]] = {}
        try:
            while queue or running:
                while queue and idle:
                    worker, group = idle.pop(), queue.popleft()
                    running[worker.run.remote(group.to_dict("records"))] = (worker, group)
                if not running:  # every worker is gone: what is left fails, recorded, and a rerun resumes it
                    for group in queue:
                        for row in group.to_dict("records"):
                            yield ImageResult(id=row["id"], status="failed", error="every Ray worker died", seed=int(row["seed"]))
                    return
                done, _ = self.ray.wait(list(running), num_returns=1)
                worker, group = running.pop(done[0])
                try:
                    results = self.ray.get(done[0])
                except (RayActorError, WorkerCrashedError) as exc:
                    self.lost_workers += 1
                    self.workers.remove(worker)
                    log.warning("a Ray worker died (%s); its %d images go to the others", type(exc).__name__, len(group))
                    queue.appendleft(group)
                    continue
                idle.append(worker)
                yield from results
        finally:  # Ctrl-C: groups in flight are dropped with their workers; finished images are already written
            for ref in running:
                try:
                    self.ray.cancel(ref)
                except Exception:  # finished or its worker is gone
                    pass

    def close(self) -> None:
        for worker in self.workers:
            try:
                self.ray.kill(worker)
            except Exception:  # already gone
                pass
        self.workers = []
