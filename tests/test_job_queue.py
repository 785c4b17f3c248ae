"""The server's job queue alone (runner/server/queue.py): no engine, no server, no files."""

from __future__ import annotations

import random
import threading
import time

import pytest

from runner.server.queue import Batch, Counts, Finished, JobQueue


def rows(*image_ids: str, prompt: str = "p") -> list[dict]:
    return [{"id": image_id, "prompt": prompt} for image_id in image_ids]


def ids(batch: Batch) -> list[str]:
    return [row["id"] for row in batch.rows]


def test_jobs_are_taken_first_in_first_out_with_their_rows_in_image_id_order():
    queue = JobQueue(max_batch_images=2)
    assert queue.add(1, rows("c", "a")) is None
    assert queue.add(2, rows("d", "b")) is None
    assert queue.add(3, rows("e")) is None

    first = queue.take()
    assert first.job_ids == [1] and ids(first) == ["a", "c"]
    queue.end_batch()
    second = queue.take()
    assert second.job_ids == [2] and ids(second) == ["b", "d"]
    queue.end_batch()
    third = queue.take()
    assert third.job_ids == [3] and ids(third) == ["e"]
    assert not queue.take(timeout=0.05)  # nothing left


def test_a_batch_holds_jobs_up_to_max_images_and_never_jumps_the_line():
    queue = JobQueue(max_batch_images=4)
    queue.add(1, rows("a1", "a2"))
    queue.add(2, rows("b1", "b2"))
    queue.add(3, rows("c1", "c2"))
    queue.add(4, rows("d1"))

    batch = queue.take()
    assert batch.job_ids == [1, 2] and len(batch.rows) == 4
    queue.end_batch()
    batch = queue.take()
    assert batch.job_ids == [3, 4] and ids(batch) == ["c1", "c2", "d1"]

    queue = JobQueue(max_batch_images=4)
    queue.add(1, rows("a1", "a2", "a3"))
    queue.add(2, rows("b1", "b2"))
    queue.add(3, rows("c1"))  # would fit beside job 1, but job 2 is before it
    assert queue.take().job_ids == [1]
    queue.end_batch()
    assert queue.take().job_ids == [2, 3]


def test_a_job_larger_than_max_images_goes_alone():
    queue = JobQueue(max_batch_images=4)
    queue.add(1, rows(*[f"big{i:02d}" for i in range(10)]))
    queue.add(2, rows("small"))
    batch = queue.take()
    assert batch.job_ids == [1] and len(batch.rows) == 10
    queue.end_batch()
    assert queue.take().job_ids == [2]


def test_an_image_two_jobs_wait_for_is_generated_once_and_finishes_both():
    queue = JobQueue(max_batch_images=10)
    queue.add(1, rows("a", "shared", prompt="first"), payload="job 1")
    queue.add(2, rows("shared", "c", prompt="second"), payload="job 2")
    batch = queue.take()
    assert batch.job_ids == [1, 2]
    assert sorted(ids(batch)) == ["a", "c", "shared"]  # `shared` once
    assert next(r for r in batch.rows if r["id"] == "shared")["prompt"] == "first"  # the first job's row

    assert queue.written("a", ok=True) == []
    assert queue.written("shared", ok=True) == [Finished(1, "", "job 1")]
    assert queue.written("c", ok=True) == [Finished(2, "", "job 2")]
    assert queue.counts() == Counts(jobs_waiting=0, jobs_running=2, images_queued=0)
    queue.end_batch()
    assert queue.counts() == Counts(0, 0, 0)


def test_an_image_in_flight_is_not_handed_out_again_for_a_later_job():
    queue = JobQueue(max_batch_images=10)
    queue.add(1, rows("x"))
    assert ids(queue.take()) == ["x"]
    queue.end_batch()
    queue.add(2, rows("x", "y"))  # x is on the engine or the writer's queue, not on disk yet
    batch = queue.take()
    assert batch.job_ids == [2] and ids(batch) == ["y"]
    assert queue.written("y", ok=True) == []  # job 2 still waits for x
    assert [f.job_id for f in queue.written("x", ok=True)] == [1, 2]


def test_a_job_whose_images_are_on_disk_finishes_at_once_and_is_never_queued():
    queue = JobQueue(done_ids={"a", "b"}, max_batch_images=10)
    assert queue.is_done("a") and not queue.is_done("c")
    assert queue.add(1, rows("a", "b"), payload="mine") == Finished(1, "", "mine")
    assert queue.counts() == Counts(0, 0, 0)
    assert queue.images_ahead(1) == 0
    assert not queue.take(timeout=0.05)

    assert queue.add(2, rows("a", "c")) is None  # only the missing image is made
    assert ids(queue.take()) == ["c"]
    assert queue.written("c", ok=True) == [Finished(2)]
    queue.end_batch()
    assert queue.add(3, rows("c")) == Finished(3)  # written ok since: known as on disk


def test_a_job_finished_while_queued_leaves_the_queue_and_the_next_take_does_not_stall():
    """Job 2 waits for the image job 1 makes; when it is written both finish, and job 2 (still queued) must
    leave the queue: the worker used to take the finished job, die, and stall every later job."""
    queue = JobQueue(max_batch_images=1)
    queue.add(1, rows("x"), payload="one")
    queue.add(2, rows("x"), payload="two")
    batch = queue.take()
    assert batch.job_ids == [1] and ids(batch) == ["x"]  # 1 + 1 images > 1: job 2 stays queued
    assert queue.counts() == Counts(jobs_waiting=2, jobs_running=1, images_queued=1)

    finished = queue.written("x", ok=True)
    assert finished == [Finished(1, "", "one"), Finished(2, "", "two")]
    queue.end_batch()
    assert queue.counts() == Counts(0, 0, 0)
    assert not queue.take(timeout=0.05)  # job 2 is not handed out again

    queue.add(3, rows("y"))
    started = time.monotonic()
    batch = queue.take(timeout=5)
    assert batch.job_ids == [3] and ids(batch) == ["y"]
    assert time.monotonic() - started < 1
    assert queue.written("y", ok=True) == [Finished(3)]


def test_failures_give_the_job_its_first_error_and_every_waiting_job_fails():
    queue = JobQueue(max_batch_images=10)
    queue.add(1, rows("a", "b", "c"))
    queue.add(2, rows("b"))
    queue.take()
    assert queue.written("a", ok=False, error="CUDA out of memory") == []
    assert queue.written("b", ok=False, error="a later failure") == [Finished(2, "a later failure")]
    assert queue.written("c", ok=True) == [Finished(1, "CUDA out of memory")]

    queue.add(3, rows("d"))
    queue.take()
    assert queue.written("d", ok=False) == [Finished(3, "generation failed")]  # a failure without words


def test_a_failed_image_is_not_on_disk_and_a_later_job_makes_it_again():
    queue = JobQueue(max_batch_images=10)
    queue.add(1, rows("a"))
    queue.take()
    assert queue.written("a", ok=False, error="boom") == [Finished(1, "boom")]
    queue.end_batch()
    assert not queue.is_done("a") and not queue.is_pending("a")
    assert queue.add(2, rows("a")) is None
    assert ids(queue.take()) == ["a"]
    assert queue.is_pending("a")
    assert queue.written("a", ok=True) == [Finished(2)]


def test_eta_counts_the_images_ahead_and_health_counts_jobs_and_images():
    queue = JobQueue(max_batch_images=2)
    queue.add(1, rows("a1", "a2"))
    queue.add(2, rows("b1", "b2", "b3"))
    queue.add(3, rows("c1"))
    assert queue.counts() == Counts(jobs_waiting=3, jobs_running=0, images_queued=6)
    assert [queue.images_ahead(j) for j in (1, 2, 3)] == [2, 5, 6]

    assert queue.take().job_ids == [1]
    assert queue.counts() == Counts(jobs_waiting=3, jobs_running=1, images_queued=4)
    assert [queue.images_ahead(j) for j in (1, 2, 3)] == [2, 5, 6]  # the running job first
    assert queue.images_ahead(99) == 6  # not queued: everything ahead

    queue.written("a1", ok=True)
    assert [queue.images_ahead(j) for j in (1, 2, 3)] == [1, 4, 5]
    queue.written("a2", ok=True)
    queue.end_batch()
    assert queue.counts() == Counts(jobs_waiting=2, jobs_running=0, images_queued=4)
    assert queue.images_ahead(3) == 4


def test_take_blocks_until_a_job_comes_and_returns_empty_on_stop():
    queue = JobQueue(max_batch_images=10)
    got: list[Batch] = []
    worker = threading.Thread(target=lambda: got.append(queue.take()))
    worker.start()
    time.sleep(0.2)
    assert worker.is_alive()  # blocks while nothing is queued
    queue.add(1, rows("a"))
    worker.join(timeout=5)
    assert not worker.is_alive() and got[0].job_ids == [1]

    got.clear()
    worker = threading.Thread(target=lambda: got.append(queue.take()))
    worker.start()
    time.sleep(0.2)
    assert worker.is_alive()
    queue.stop()
    worker.join(timeout=5)
    assert not worker.is_alive() and got == [Batch()] and not got[0]
    assert queue.stopped

    queue.add(2, rows("b"))  # what is queued after a stop stays queued (jobs.db runs it at the next start)
    assert not queue.take()
    assert queue.counts().images_queued == 1


def test_a_restart_queues_unfinished_jobs_again_and_makes_only_what_is_not_on_disk():
    before = JobQueue(max_batch_images=10)
    before.add(7, rows("a", "b", "c"))
    before.take()
    before.written("a", ok=True)
    before.written("b", ok=False, error="interrupted")
    before.stop()  # the server stops with job 7 unfinished; a is on disk

    after = JobQueue(done_ids={"a"}, max_batch_images=10)  # the store's ok ids at the next start
    assert after.add(7, rows("a", "b", "c"), payload="again") is None
    batch = after.take()
    assert batch.job_ids == [7] and ids(batch) == ["b", "c"]
    after.written("b", ok=True)
    assert after.written("c", ok=True) == [Finished(7, "", "again")]  # the earlier failure is forgotten

    assert after.add(8, rows("x")) is None
    with pytest.raises(ValueError):  # one job id, queued once
        after.add(8, rows("x"))


def test_many_threads_adding_while_a_worker_takes_and_writes_finish_every_job_once():
    queue = JobQueue(max_batch_images=5)
    finished: list[Finished] = []
    lock = threading.Lock()
    n_jobs = 200
    images: dict[int, set[str]] = {}

    def record(done: list[Finished]) -> None:
        with lock:
            finished.extend(done)

    def work() -> None:
        while True:
            batch = queue.take()
            if not batch:
                return
            for row in batch.rows:
                record(queue.written(row["id"], ok=row["id"] != "img-13", error="bad seed"))
            queue.end_batch()

    def submit(first: int) -> None:
        rng = random.Random(first)
        for job_id in range(first, n_jobs, 4):
            images[job_id] = {f"img-{rng.randrange(30)}" for _ in range(rng.randint(1, 4))}
            done = queue.add(job_id, rows(*images[job_id]), payload=job_id)
            if done is not None:
                record([done])

    worker = threading.Thread(target=work)
    worker.start()
    submitters = [threading.Thread(target=submit, args=(i,)) for i in range(4)]
    for thread in submitters:
        thread.start()
    for thread in submitters:
        thread.join(timeout=10)
    deadline = time.monotonic() + 10
    while len(finished) < n_jobs and time.monotonic() < deadline:
        time.sleep(0.01)
    queue.stop()
    worker.join(timeout=5)

    assert sorted(f.job_id for f in finished) == list(range(n_jobs))  # each exactly once, none stalled
    assert all(f.payload == f.job_id for f in finished)
    assert all(f.error == ("bad seed" if "img-13" in images[f.job_id] else "") for f in finished)  # img-13 always fails
    assert queue.counts() == Counts(0, 0, 0)
