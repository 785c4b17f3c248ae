"""The server's jobs in one small sqlite file (outputs/<serve.name>/jobs.db): nothing is lost on a restart.

A job is one text2img request: its checked plan rows (the request after parsing; never the key),
the image ids they make, its owner (a prefix of the key's hash) and its state:
queued -> processing -> success | failed. A restarted server answers fetches for finished jobs
and queues the unfinished ones again.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    rows TEXT NOT NULL,
    image_ids TEXT NOT NULL,
    options TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    generation_s REAL,
    webhook_status TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, owner);
"""
UNFINISHED = ("queued", "processing")


@dataclass
class Job:
    id: int
    owner: str
    status: str
    rows: list[dict[str, Any]]
    image_ids: list[str]
    options: dict[str, Any] = field(default_factory=dict)  # webhook, track_id, base64, temp, notes
    error: str = ""
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    generation_s: float | None = None
    webhook_status: str = ""

    @property
    def done(self) -> bool:
        return self.status not in UNFINISHED


class JobStore:
    """Thread-safe: the API's request threads and the generation worker share one connection under a lock."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, owner: str, rows: list[dict[str, Any]], options: dict[str, Any], limit: int | None = None) -> Job | None:
        """Queue a job; None when `owner` already has `limit` unfinished jobs (checked and added atomically)."""
        now = time.time()
        image_ids = list(dict.fromkeys(r["id"] for r in rows))
        with self._lock:
            if limit is not None:
                (waiting,) = self._db.execute(
                    "SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN ('queued', 'processing')", (owner,)
                ).fetchone()
                if waiting >= limit:
                    return None
            cursor = self._db.execute(
                "INSERT INTO jobs (owner, status, rows, image_ids, options, created) VALUES (?, 'queued', ?, ?, ?, ?)",
                (owner, json.dumps(rows, default=str), json.dumps(image_ids), json.dumps(options), now),
            )
            return Job(int(cursor.lastrowid), owner, "queued", rows, image_ids, options, created=now)

    def get(self, job_id: int) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(row) if row else None

    def unfinished(self) -> list[Job]:
        """Queued and interrupted jobs, oldest first (a restart runs them again)."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE status IN ('queued', 'processing') ORDER BY id").fetchall()
        return [self._job(r) for r in rows]

    def mark_processing(self, job_ids: list[int]) -> None:
        now = time.time()
        with self._lock:
            self._db.executemany(
                "UPDATE jobs SET status = 'processing', started = COALESCE(started, ?) WHERE id = ? AND status = 'queued'",
                [(now, i) for i in job_ids],
            )

    def finish(self, job_id: int, status: str, error: str = "", generation_s: float | None = None) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status = ?, error = ?, finished = ?, generation_s = ? WHERE id = ?",
                (status, error, time.time(), generation_s, job_id),
            )

    def set_webhook_status(self, job_id: int, text: str) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET webhook_status = ? WHERE id = ?", (text, job_id))

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())

    @staticmethod
    def _job(row: tuple) -> Job:
        (job_id, owner, status, rows, image_ids, options, error, created, started, finished, generation_s, webhook_status) = row
        return Job(
            int(job_id),
            owner,
            status,
            json.loads(rows),
            json.loads(image_ids),
            json.loads(options),
            error,
            created,
            started,
            finished,
            generation_s,
            webhook_status,
        )
