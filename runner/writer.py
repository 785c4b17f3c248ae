"""The background writer: PNG encoding, image files, results journal and MLflow, off the generation path.

The engine hands each finished image to a bounded queue and goes on denoising; one thread
encodes, writes and logs. When the queue is full the engine waits (memory stays bounded);
`close()` drains and joins it, at the end and on Ctrl-C, so what finished is never lost.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from runner.engines.base import ImageResult
from runner.image_file import png_bytes
from runner.store import SweepStore

log = logging.getLogger(__name__)
_STOP = object()
MAX_TRACKING_FAILURES = 3


class BackgroundWriter:
    def __init__(
        self,
        store: SweepStore,
        tracker: Any,
        rows: Mapping[str, Mapping[str, Any]],
        hashes: Mapping[str, str],
        tags: Mapping[str, str],
        maxsize: int = 64,
        encode_workers: int = 2,
        on_written: Callable[[dict[str, Any]], None] | None = None,
        max_batch: int = 32,
    ):
        from concurrent.futures import ThreadPoolExecutor

        self.store = store
        self.tracker = tracker
        # PNG encoding (zlib, which releases the GIL) on a few threads: one cannot keep up with a fast GPU
        self._encoder = ThreadPoolExecutor(max(1, encode_workers), thread_name_prefix="lora-sweep-png")
        self.rows = rows
        self.hashes = hashes
        self.tags = dict(tags)
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, maxsize))
        self.written = 0
        self.tracking_errors = 0
        self.tracking_down = False  # after MAX_TRACKING_FAILURES in a row: the next run back-fills
        self._failures_in_a_row = 0
        self.busy_s = 0.0
        self.max_batch = max(1, max_batch)  # images logged to MLflow in one transaction at most
        self.on_written = on_written  # told each final record once it is on disk (the server finishes its jobs with it)
        self._thread = threading.Thread(target=self._loop, name="lora-sweep-writer", daemon=True)
        self._thread.start()

    def put(self, result: ImageResult) -> None:
        """Queue a finished image; its PNG starts encoding at once (in order of arrival, written in order)."""
        png = None
        if result.status == "ok" and result.png is not None:  # encoded by a worker
            self.queue.put((result, None))
            return
        if result.status == "ok" and result.image is not None:
            row = {**self.rows[result.id], "scheduler_used": result.scheduler or self.rows[result.id].get("scheduler_used")}
            png = self._encoder.submit(png_bytes, result.image, row, self.hashes)
        self.queue.put((result, png))

    def close(self) -> None:
        """Write everything queued, then stop the thread."""
        if self._thread.is_alive():
            self.queue.put(_STOP)
            self._thread.join()
        self._encoder.shutdown()
        self.store.snapshot()

    def _loop(self) -> None:
        """Take whatever is queued (at least one image) and write it as one batch: MLflow logs a batch in one go."""
        while True:
            items = [self.queue.get()]
            while items[-1] is not _STOP and len(items) < self.max_batch:
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            stop = items[-1] is _STOP
            try:
                self._handle([item for item in items if item is not _STOP])
            finally:
                for _ in items:
                    self.queue.task_done()
            if stop:
                return

    def drain(self) -> None:
        """Wait until every image queued so far is written (a search scores each batch of trials before the next)."""
        if self._thread.is_alive():
            self.queue.join()

    def _handle(self, items: list[tuple[ImageResult, Any]]) -> None:
        """Files first, then MLflow for the batch, then the journal: a journal line means the image is on disk."""
        started = time.perf_counter()
        written: list[tuple[dict[str, Any], ImageResult, Any]] = []
        records: list[dict[str, Any]] = []
        for result, png in items:
            try:
                if result.status == "submitted":  # only the remote id, so a killed run can fetch instead of resubmitting
                    self.store.append_result(
                        {"id": result.id, "status": "submitted", "seed": result.seed, "meta.remote_id": result.meta["remote_id"]}
                    )
                    continue
                row = {**self.rows[result.id], "scheduler_used": result.scheduler or self.rows[result.id].get("scheduler_used")}
                path = None
                if result.status == "ok":
                    data = png.result() if png is not None else result.png
                    path = self.store.write_image(result.id, data if data is not None else png_bytes(result.image, row, self.hashes))
                written.append((row, result, path))
            except Exception as exc:  # a write error must not kill the thread and stall the engine
                log.exception("could not write image %s", result.id)
                records.append({"id": result.id, "status": "failed", "error": f"could not write the image ({exc})"})
        tracked = self._track(written)
        for _, result, path in written:
            record = self._record(result, path, tracked)
            try:
                self.store.append_result(record)
                self.written += 1
            except Exception as exc:  # a full disk must not kill the thread and stall the engine
                log.exception("could not write the result of image %s", result.id)
                record = {"id": result.id, "status": "failed", "error": f"could not write the image ({exc})"}
            records.append(record)
        if self.on_written is not None:
            for record in records:
                try:
                    self.on_written(record)
                except Exception:
                    log.exception("on_written failed for %s", record["id"])
        self.busy_s += time.perf_counter() - started

    def _record(self, result: ImageResult, path: Any, tracked: bool) -> dict[str, Any]:
        """The journal's line for one image."""
        return {
            "id": result.id,
            "status": result.status,
            "error": result.error,
            "file": str(path.relative_to(self.store.root)) if path else "",
            "seed": result.seed,
            "scheduler": result.scheduler,
            "generation_s": round(result.generation_s, 4),
            "batch_size": result.batch_size,
            "notes": "; ".join(result.notes),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "tracked": tracked,
            **{f"meta.{k}": v for k, v in result.meta.items()},
        }

    def _track(self, written: list[tuple[dict[str, Any], ImageResult, Any]]) -> bool:
        """Log a batch to MLflow if it is up; a store that keeps failing is left alone until the next run."""
        if not written or self.tracker is None or self.tracking_down:
            if self.tracker is not None:
                self.tracking_errors += len(written)
            return False
        try:
            self.tracker.log_images(written, self.tags)
            self._failures_in_a_row = 0
            return True
        except Exception as exc:
            self.tracking_errors += len(written)
            self._failures_in_a_row += 1
            ids = ", ".join(result.id for _, result, _ in written[:3]) + (" ..." if len(written) > 3 else "")
            log.warning("MLflow logging failed for %s (%s); the images and their results are written", ids, str(exc).splitlines()[0][:200])
            if self._failures_in_a_row >= MAX_TRACKING_FAILURES:
                self.tracking_down = True
                log.warning("MLflow is unreachable; not logging the rest of this run (the next run or `lora-sweep sync` back-fills it)")
            return False
