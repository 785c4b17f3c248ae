"""The server's job queue: which images each job still waits for, and which rows the engine makes next.

Pure bookkeeping (no engine, no HTTP, no MLflow, no files), safe to share between the request
threads, the generation worker and the writer's thread. A job is an id and its plan rows (each
with its image `id`); the queue knows the image ids already on disk, so a job whose images all
exist finishes as it is added. An image several jobs wait for is handed out once and finishes
all of them when written; a job left with nothing to wait for while still queued (another job
made its images) leaves the queue at once, so the worker never takes a finished job.

    add(job_id, rows, payload)  -> Finished | None   (None: queued)
    take()                      -> Batch             (blocks until work or stop)
    end_batch()                                      (the engine call is over)
    written(image_id, ok, error) -> [Finished, ...]  (the jobs this image finished)
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

FAILED = "generation failed"  # a failure that came without its own words


@dataclass(frozen=True)
class Finished:
    """A job with nothing left to wait for: `error` is the first failure of its images, "" when all were made."""

    job_id: int
    error: str = ""
    payload: Any = None  # what the caller gave `add` (the server: its Job and the event a request waits on)


@dataclass(frozen=True)
class Batch:
    """What `take` hands the worker: the jobs taken and the rows to generate for them (none already handed out)."""

    job_ids: list[int] = field(default_factory=list)
    rows: list[Mapping[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.job_ids)


@dataclass(frozen=True)
class Counts:
    """For /health: unfinished jobs, jobs of the engine call under way, images of the queued jobs still to make."""

    jobs_waiting: int
    jobs_running: int
    images_queued: int


class JobQueue:
    """First in, first out; `take` gives the oldest queued job and those after it up to `max_batch_images` images."""

    def __init__(self, done_ids: Iterable[str] = (), max_batch_images: int = 1):
        self.max_batch_images = int(max_batch_images)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopped = False
        self._done_ids: set[str] = set(done_ids)  # images on disk (status ok)
        self._queue: deque[int] = deque()  # job ids waiting to be taken
        self._running: list[int] = []  # the jobs of the engine call under way
        self._remaining: dict[int, set[str]] = {}  # unfinished job -> its image ids not written yet
        self._payloads: dict[int, Any] = {}  # unfinished job -> the caller's payload
        self._errors: dict[int, str] = {}  # job -> the first failure of its images
        self._waiting_on: dict[str, set[int]] = {}  # image id -> the jobs waiting for it
        self._rows: dict[str, Mapping[str, Any]] = {}  # image id -> its row (the first job's), until written
        self._started: set[str] = set()  # image ids handed out and not written yet

    # ------------------------------------------------------------ jobs in

    def add(self, job_id: int, rows: Sequence[Mapping[str, Any]], payload: Any = None) -> Finished | None:
        """Queue a job; a Finished at once when every one of its images is on disk (the same request before)."""
        with self._lock:
            if job_id in self._remaining:
                raise ValueError(f"job {job_id} is queued already")
            remaining = {row["id"] for row in rows if row["id"] not in self._done_ids}
            if not remaining:
                return Finished(job_id, "", payload)
            self._remaining[job_id] = remaining
            self._payloads[job_id] = payload
            for row in rows:
                image_id = row["id"]
                if image_id in remaining:
                    self._rows.setdefault(image_id, row)
                    self._waiting_on.setdefault(image_id, set()).add(job_id)
            self._queue.append(job_id)
            self._wake.notify()
        return None

    # ------------------------------------------------------------ work out

    def take(self, timeout: float | None = None) -> Batch:
        """The oldest queued job and those after it while the images stay within max_batch_images (one job of
        any size goes alone), marked running; their rows not handed out before, in image id order per job.
        Blocks while nothing is queued; an empty Batch once stopped (or after `timeout` seconds)."""
        with self._lock:
            if not self._wake.wait_for(lambda: self._queue or self._stopped, timeout=timeout) or self._stopped:
                return Batch()
            taken: list[int] = []
            images = 0
            while self._queue:
                job_id = self._queue[0]
                if job_id not in self._remaining:  # finished while queued (defensive: _finish_locked takes it off)
                    self._queue.popleft()
                    continue
                size = len(self._remaining[job_id])
                if taken and images + size > self.max_batch_images:
                    break
                self._queue.popleft()
                taken.append(job_id)
                images += size
            self._running = taken
            rows = []
            for job_id in taken:
                for image_id in sorted(self._remaining[job_id]):
                    if image_id not in self._started:
                        self._started.add(image_id)
                        rows.append(self._rows[image_id])
            return Batch(list(taken), rows)

    def end_batch(self) -> None:
        """The engine call for the last batch is over (its images may still be on their way to disk)."""
        with self._lock:
            self._running = []

    def is_pending(self, image_id: str) -> bool:
        """Whether a job still waits for this image (not written yet)."""
        with self._lock:
            return image_id in self._waiting_on

    # ------------------------------------------------------------ images in

    def written(self, image_id: str, ok: bool, error: str = "") -> list[Finished]:
        """An image (or its failure) is on disk: the jobs that were waiting only for it, in the order they were added."""
        finished: list[Finished] = []
        with self._lock:
            self._rows.pop(image_id, None)
            self._started.discard(image_id)
            if ok:
                self._done_ids.add(image_id)
            for job_id in sorted(self._waiting_on.pop(image_id, ())):
                remaining = self._remaining.get(job_id)
                if remaining is None:
                    continue
                remaining.discard(image_id)
                if not ok:
                    self._errors.setdefault(job_id, error or FAILED)
                if not remaining:
                    finished.append(self._finish_locked(job_id))
        return finished

    def _finish_locked(self, job_id: int) -> Finished:
        del self._remaining[job_id]
        if job_id in self._queue:  # finished while queued: its images were made for the jobs before it
            self._queue.remove(job_id)
        return Finished(job_id, self._errors.pop(job_id, ""), self._payloads.pop(job_id, None))

    # ------------------------------------------------------------ state

    def images_ahead(self, job_id: int) -> int:
        """Images still to make for the running jobs and the queued ones up to this job, its own included
        (all of them when it is neither running nor queued)."""
        with self._lock:
            ahead = 0
            for queued in [*self._running, *self._queue]:
                ahead += len(self._remaining.get(queued, ()))
                if queued == job_id:
                    break
            return ahead

    def counts(self) -> Counts:
        with self._lock:
            return Counts(
                jobs_waiting=len(self._remaining),
                jobs_running=len(self._running),
                images_queued=sum(len(self._remaining[j]) for j in self._queue),
            )

    def is_done(self, image_id: str) -> bool:
        """Whether this image is on disk (known at start or written ok since)."""
        with self._lock:
            return image_id in self._done_ids

    def stop(self) -> None:
        """No more batches: `take` returns an empty Batch now and from then on (what is queued stays queued)."""
        with self._lock:
            self._stopped = True
            self._wake.notify_all()

    @property
    def stopped(self) -> bool:
        return self._stopped
