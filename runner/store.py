"""The sweep folder: plan, results, images, config, lock. Knows nothing of MLflow or torch.

    outputs/<sweep>/
      config.yaml        the composed config, secrets removed
      identity.json      each file's sha256; loras.json: what each LoRA file says about itself, its trigger
      plan.parquet       the whole plan
      results.parquet    one row per finished or failed id (temp file + rename)
      results.jsonl      the journal: one line per image as it finishes (append + fsync)
      scores.jsonl       scores per image as the scoring stage computes them (merged into results.parquet)
      images/<id>.png    complete PNGs only (temp file + rename)
      grids/             comparison grids
      votes.jsonl        people's pairwise votes (append + fsync, never rewritten; an undo is a new line)
      .lock              the pid of the running sweep

An interrupted sweep loses at most the images in flight: every finished image is in the journal,
and the parquet snapshot is rebuilt from it. The latest record of an id wins.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from runner.errors import UserError

RESULT_COLUMNS = [
    "id",
    "status",
    "error",
    "file",
    "seed",
    "scheduler",
    "generation_s",
    "batch_size",
    "notes",
    "finished_at",
    "tracked",
]


class SweepLocked(RuntimeError):
    pass


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_parquet(path: Path, frame: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


class SweepStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.images = self.root / "images"
        self.grids = self.root / "grids"
        self.plan_path = self.root / "plan.parquet"
        self.results_path = self.root / "results.parquet"
        self.journal_path = self.root / "results.jsonl"
        self.config_path = self.root / "config.yaml"
        self.lock_path = self.root / ".lock"
        self.identity_path = self.root / "identity.json"
        self.scores_path = self.root / "scores.jsonl"
        self.votes_path = self.root / "votes.jsonl"
        self._journal = None
        self._last_snapshot = 0.0

    # ------------------------------------------------------------ lock

    def acquire(self) -> None:
        """Take the sweep's lock; a lock left by a dead process is taken over."""
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    owner = int(self.lock_path.read_text().strip() or 0)
                except (OSError, ValueError):
                    owner = 0
                if owner and owner != os.getpid() and pid_alive(owner):
                    raise SweepLocked(
                        f"sweep folder {self.root} is in use by process {owner}; wait for it to finish or stop it first"
                    ) from None
                with contextlib.suppress(FileNotFoundError):
                    self.lock_path.unlink()
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            self._remove_stale_temp_files()
            return
        raise SweepLocked(f"could not take the lock {self.lock_path}")

    def _remove_stale_temp_files(self) -> None:
        """Temp files of a writer killed mid-write (kill -9, power loss); ours alone now that we hold the lock."""
        for folder in (self.root, self.images, self.grids):
            for stale in folder.glob(".*.tmp") if folder.is_dir() else ():
                with contextlib.suppress(OSError):
                    stale.unlink()

    def release(self) -> None:
        self.close_journal()
        with contextlib.suppress(OSError, ValueError):
            if int(self.lock_path.read_text().strip()) == os.getpid():
                self.lock_path.unlink()

    # ------------------------------------------------------------ plan and config

    def write_plan(self, plan: pd.DataFrame) -> None:
        atomic_write_parquet(self.plan_path, plan)

    def read_plan(self) -> pd.DataFrame:
        return pd.read_parquet(self.plan_path)

    def write_config(self, text: str) -> None:
        atomic_write_bytes(self.config_path, text.encode())

    def read_identity(self) -> dict[str, dict[str, str]]:
        """The model and LoRA hashes of the last run (what its images were made from)."""
        try:
            return json.loads(self.identity_path.read_text())
        except (OSError, ValueError):
            return {}

    def write_identity(self, identity: dict[str, dict[str, str]]) -> None:
        atomic_write_bytes(self.identity_path, json.dumps(identity, indent=1, sort_keys=True).encode())

    def write_lora_files(self, files: dict[str, dict[str, str]]) -> None:
        """loras.json: what each LoRA file says about itself and its trigger (the report's files table)."""
        atomic_write_bytes(self.root / "loras.json", json.dumps(files, indent=1, sort_keys=True).encode())

    def read_lora_files(self) -> dict[str, dict[str, str]]:
        try:
            return json.loads((self.root / "loras.json").read_text())
        except (OSError, ValueError):
            return {}

    # ------------------------------------------------------------ images

    def image_path(self, image_id: str) -> Path:
        return self.images / f"{image_id}.png"

    def write_image(self, image_id: str, png: bytes) -> Path:
        path = self.image_path(image_id)
        atomic_write_bytes(path, png)
        return path

    # ------------------------------------------------------------ results

    def append_result(self, record: dict[str, Any]) -> None:
        """Journal one finished image at once; snapshot the parquet every few seconds."""
        if self._journal is None:
            self.root.mkdir(parents=True, exist_ok=True)
            self._journal = open(self.journal_path, "a", encoding="utf-8")
        self._journal.write(json.dumps(record, default=str) + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())
        if time.monotonic() - self._last_snapshot > 5:
            self.snapshot()

    def close_journal(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def append_scores(self, scores: pd.DataFrame) -> None:
        """Journal scores (`id` + one column per metric); a later value of an id's metric wins."""
        if scores.empty:
            return
        lines = []
        for record in scores.to_dict("records"):
            values = {k: float(v) for k, v in record.items() if k != "id" and not pd.isna(v)}
            if values:
                lines.append(json.dumps({"id": record["id"], **values}) + "\n")
        with open(self.scores_path, "a", encoding="utf-8") as fh:
            fh.writelines(lines)
            fh.flush()
            os.fsync(fh.fileno())

    def read_scores(self) -> pd.DataFrame:
        records = list(self._journal_records(self.scores_path))
        if not records:
            return pd.DataFrame({"id": pd.Series(dtype=str)})
        return pd.DataFrame(records).groupby("id", sort=False).last().reset_index()

    def _journal_records(self, path: Path | None = None) -> Iterable[dict[str, Any]]:
        path = path or self.journal_path
        if not path.exists():
            return []
        records = []
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue  # a line cut by a kill: that image was in flight
        return records

    def read_results(self) -> pd.DataFrame:
        """One row per id, the latest record winning (parquet snapshot + journal), with its scores."""
        frames = []
        if self.results_path.exists():
            frames.append(pd.read_parquet(self.results_path))
        journal = list(self._journal_records())
        if journal:
            frames.append(pd.DataFrame(journal))
        if not frames:
            return pd.DataFrame(columns=RESULT_COLUMNS)
        results = pd.concat(frames, ignore_index=True)
        results = results.drop_duplicates("id", keep="last").reset_index(drop=True)
        results = results.reindex(columns=[*RESULT_COLUMNS, *[c for c in results.columns if c not in RESULT_COLUMNS]])
        scores = self.read_scores()
        if len(scores.columns) > 1:  # the snapshot's score columns are replaced by the score journal's
            results = results.drop(columns=[c for c in scores.columns if c != "id" and c in results]).merge(scores, on="id", how="left")
        return results

    def snapshot(self) -> pd.DataFrame:
        results = self.read_results()
        atomic_write_parquet(self.results_path, results)
        self._last_snapshot = time.monotonic()
        return results

    def ok_ids(self) -> set[str]:
        results = self.read_results()
        ok = results[results["status"] == "ok"]
        return {i for i in ok["id"] if self.image_path(i).exists()}

    def failed_ids(self) -> set[str]:
        results = self.read_results()
        return set(results.loc[results["status"] == "failed", "id"])

    # ------------------------------------------------------------ votes

    def append_vote(self, record: dict[str, Any]) -> None:
        """One vote line, on disk (fsync) before the caller answers; several servers or threads may append at once."""
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.votes_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write of an O_APPEND file: lines of two writers never interleave
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_votes(self) -> pd.DataFrame:
        """The votes that stand: `vote` lines minus those an `undo` line names (see VOTE_COLUMNS)."""
        records = list(self._journal_records(self.votes_path))
        undone = {r.get("undoes") for r in records if r.get("kind") == "undo"}
        votes = [r for r in records if r.get("kind") == "vote" and r.get("vote") not in undone]
        return pd.DataFrame(votes).reindex(columns=VOTE_COLUMNS) if votes else pd.DataFrame(columns=VOTE_COLUMNS)


# A votes.jsonl line: {"kind": "vote" | "skip" | "undo", "vote": unique id of this line, "time": unix seconds,
# "voter": name, "left"/"right": the image ids shown, "choice": "left" | "right" | "tie" (votes only),
# "undoes": the `vote` id an undo takes back}. Images are named by id, so votes survive a re-planned sweep.
VOTE_COLUMNS = ["vote", "time", "voter", "left", "right", "choice"]


def locked_store(folder: str | os.PathLike, setting: str = "sweep.name") -> SweepStore:
    """The sweep folder's store, locked for this process (one run per folder at a time), or one line saying why not."""
    store = SweepStore(folder)
    try:
        store.acquire()
    except SweepLocked as exc:
        raise UserError(f"{setting}: {exc}") from None
    except OSError as exc:
        raise UserError(
            f"paths.outputs: cannot write {store.root} ({exc.strerror}); choose a writable folder with paths.outputs=DIR"
        ) from None
    return store
