"""One sweep folder's voting state: its finished images, what was shown, the votes that stand, the ranking so far.

Votes go to votes.jsonl through SweepStore.append_vote (one O_APPEND write + fsync each, before the reply), so
a server killed at any moment keeps every vote it acknowledged, and a restarted one reads them back. The
Bradley-Terry fit behind the pair choice runs in a background thread: a vote's reply never waits for it.
"""

from __future__ import annotations

import random
import re
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from runner.compare.pairs import Candidate, Shown, candidate_pairs, choose_pair, image_groups, pair_key
from runner.errors import UserError
from runner.report.human import human_ranking, vote_cells
from runner.store import SweepStore

IMAGE_ID = re.compile(r"[0-9a-f]{16}")
CHOICES = ("left", "right", "tie", "skip")
VOTER = re.compile(r"[^\x00-\x1f\x7f]{1,64}")  # a printable name, 64 characters at most
SWEEP_FILES = ("plan.parquet", "results.parquet", "results.jsonl")


class Refused(ValueError):
    """A request the page (or a script) got wrong: one line, answered with 400."""


@dataclass
class Image:
    cell: str
    group: tuple
    path: Path


@dataclass
class Standing:
    """The votes that stand (undone ones removed) and how often each pair was voted on or skipped."""

    votes: dict[str, dict[str, Any]] = field(default_factory=dict)  # vote id -> votes.jsonl line (kind vote or skip)
    shown: Counter = field(default_factory=Counter)  # pair_key -> times voted on or skipped


def open_folder(folder: str | Path) -> SweepStore:
    """The sweep folder's store, or one line saying why it is not one."""
    store = SweepStore(folder)
    if not store.plan_path.is_file() or not store.images.is_dir():
        raise UserError(f"{store.root} is not a sweep folder (no plan.parquet and images/); give one lora-sweep run wrote (outputs/NAME)")
    return store


class Board:
    """Everything the routes ask of the folder; every method is safe to call from several threads at once."""

    def __init__(self, store: SweepStore, default_voter: str = "anonymous", bootstrap: int = 50, refresh_s: float = 2.0):
        self.store = store
        self.default_voter = default_voter
        self.bootstrap = bootstrap
        self.refresh_s = refresh_s
        self.lock = threading.RLock()
        self.rng = random.Random()
        self.plan = pd.DataFrame()
        self.images: dict[str, Image] = {}
        self.candidates: list[Candidate] = []
        self.by_key: dict[tuple[str, str], Candidate] = {}
        self.standing = Standing()
        self.pending: dict[str, Shown] = {}  # voter -> the pair handed out and not voted on yet
        self.ranking = pd.DataFrame()
        self._version = 0  # one more at every change of the votes that stand
        self._fitted = -1  # the version the ranking was fitted on
        self._fitting = False
        self._stamp: tuple = ()
        self._checked = 0.0
        self.load_sweep()
        self.load_votes()

    # ------------------------------------------------------------ the folder

    def _sweep_stamp(self) -> tuple:
        return tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.exists() else None for p in (self.store.root / n for n in SWEEP_FILES))

    def load_sweep(self) -> None:
        """The plan and the finished images (read again by `refresh` while the sweep still runs)."""
        stamp = self._sweep_stamp()
        plan = self.store.read_plan()
        ok = self.store.ok_ids()
        cells, groups = vote_cells(plan), image_groups(plan)
        images = {i: Image(cells[i], groups[i], self.store.image_path(i)) for i in plan["id"] if i in ok}
        candidates = candidate_pairs({i: im.cell for i, im in images.items()}, {i: im.group for i, im in images.items()})
        with self.lock:
            self.plan, self.images, self.candidates, self._stamp = plan, images, candidates, stamp
            self.by_key = {c.key: c for c in candidates}

    def refresh(self) -> None:
        """Pick up images a running sweep finished since (a stat of three files, every few seconds at most)."""
        now = time.monotonic()
        if now - self._checked < self.refresh_s:
            return
        self._checked = now
        if self._sweep_stamp() != self._stamp:
            self.load_sweep()

    def load_votes(self) -> None:
        """The votes that stand in votes.jsonl (a restarted server goes on from them)."""
        standing = Standing()
        for record in self.store.read_votes().to_dict("records"):
            standing.votes[record["vote"]] = {"kind": "vote", **record}
            standing.shown[pair_key(record["left"], record["right"])] += 1
        with self.lock:
            self.standing = standing
            self._version += 1
        self.refit()

    def image_file(self, image_id: str) -> Path | None:
        """The PNG of a finished image this board knows, or None: the name is looked up, never joined to a path."""
        image = self.images.get(image_id) if IMAGE_ID.fullmatch(image_id) else None
        if image is None:
            return None
        try:
            if image.path.is_symlink() or not image.path.is_file() or image.path.resolve().parent != self.store.images.resolve():
                return None
        except OSError:
            return None
        return image.path

    # ------------------------------------------------------------ pairs

    def next_pair(self, voter: str) -> Shown | None:
        """The voter's pair: the one handed out before (a reload shows it again), else the most informative one."""
        self.refresh()
        with self.lock:
            pending = self.pending.get(voter)
            if pending is not None and pair_key(pending.left, pending.right) in self.by_key:
                return pending
            on_screen = Counter(pair_key(p.left, p.right) for p in self.pending.values())
            pair = choose_pair(self.candidates, self.standing.shown, self.ranking, self.rng, on_screen)
            if pair is not None:
                self.pending[voter] = pair
            return pair

    def describe_pair(self, pair: Shown | None) -> dict[str, Any] | None:
        """What the page gets: ids, image URLs, prompt and seed; never the blends (they are revealed after the vote)."""
        if pair is None:
            return None
        prompt, seed, _ = pair.group
        return {"left": pair.left, "right": pair.right, "prompt": prompt, "seed": seed}

    def counts(self, voter: str) -> dict[str, int]:
        with self.lock:
            mine = sum(1 for v in self.standing.votes.values() if v["kind"] == "vote" and v["voter"] == voter)
            total = sum(1 for v in self.standing.votes.values() if v["kind"] == "vote")
        return {"votes": total, "yours": mine, "images": len(self.images), "pairs": len(self.candidates)}

    # ------------------------------------------------------------ votes

    def voter_name(self, value: Any) -> str:
        if value is None or value == "":
            return self.default_voter
        if not isinstance(value, str) or not VOTER.fullmatch(value.strip()):
            raise Refused("voter: a name of 1 to 64 printable characters")
        return value.strip()

    def checked_pair(self, body: dict[str, Any]) -> Candidate:
        left, right = body.get("left"), body.get("right")
        for side, value in (("left", left), ("right", right)):
            if not isinstance(value, str) or value not in self.images:
                raise Refused(f"{side}: not the id of a finished image of this sweep")
        candidate = self.by_key.get(pair_key(left, right))
        if candidate is None:
            raise Refused("left, right: not a pair to compare (two images of one prompt and seed from two different cells)")
        return candidate

    def vote(self, body: dict[str, Any]) -> dict[str, Any]:
        """One vote or skip: on disk before this returns; the reply reveals the two blends and brings the next pair."""
        only(body, {"left", "right", "choice", "voter"})
        choice = body.get("choice")
        if choice not in CHOICES:
            raise Refused("choice: one of left, right, tie, skip")
        voter = self.voter_name(body.get("voter"))
        with self.lock:
            candidate = self.checked_pair(body)
            record = {"kind": "skip" if choice == "skip" else "vote", "vote": uuid.uuid4().hex, "time": round(time.time(), 3)}
            record |= {"voter": voter, "left": body["left"], "right": body["right"]}
            if choice != "skip":
                record["choice"] = choice
            self.store.append_vote(record)
            self.standing.votes[record["vote"]] = record
            self.standing.shown[candidate.key] += 1
            self._version += 1
            if self.pending.get(voter) is not None and pair_key(self.pending[voter].left, self.pending[voter].right) == candidate.key:
                del self.pending[voter]
        self.refit()
        revealed = {"left": self.images[body["left"]].cell, "right": self.images[body["right"]].cell, "choice": choice}
        reply = {"vote": record["vote"], "revealed": None if choice == "skip" else revealed}
        return reply | {"next": self.describe_pair(self.next_pair(voter)), **self.counts(voter)}

    def undo(self, body: dict[str, Any]) -> dict[str, Any]:
        """Take back a vote or skip (a new `undo` line; nothing is rewritten); its pair comes back, sides as they were."""
        only(body, {"vote", "voter"})
        voter = self.voter_name(body.get("voter"))
        with self.lock:
            undone = self.standing.votes.get(body.get("vote")) if isinstance(body.get("vote"), str) else None
            if undone is None:
                raise Refused("vote: not a vote that stands (already undone, or never made here)")
            record = {"kind": "undo", "vote": uuid.uuid4().hex, "time": round(time.time(), 3), "voter": voter}
            record |= {"left": undone["left"], "right": undone["right"], "undoes": undone["vote"]}
            self.store.append_vote(record)
            del self.standing.votes[undone["vote"]]
            key = pair_key(undone["left"], undone["right"])
            self.standing.shown[key] = max(0, self.standing.shown[key] - 1)
            self._version += 1
            again = Shown(undone["left"], undone["right"], self.images[undone["left"]].group) if undone["left"] in self.images else None
            if again is not None:
                self.pending[voter] = again
        self.refit()
        reply = {"undone": undone["vote"], "vote": record["vote"]}
        return reply | {"next": self.describe_pair(again or self.next_pair(voter)), **self.counts(voter)}

    # ------------------------------------------------------------ the ranking behind the choice

    def refit(self) -> None:
        """Refit Bradley-Terry in the background when the votes changed; one fit at a time, the newest votes win."""
        with self.lock:
            if self._fitting or self._fitted == self._version:
                return
            self._fitting = True
        threading.Thread(target=self._fit_until_current, name="compare-fit", daemon=True).start()

    def _fit_until_current(self) -> None:
        try:
            while True:
                with self.lock:
                    votes = [v for v in self.standing.votes.values() if v["kind"] == "vote"]
                    version, plan = self._version, self.plan
                ranking = human_ranking(plan, pd.DataFrame(votes), bootstrap=self.bootstrap) if votes else pd.DataFrame()
                with self.lock:
                    self.ranking, self._fitted = ranking, version
                    if version == self._version:
                        return
        finally:
            with self.lock:
                self._fitting = False


def only(body: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise Refused(f"{extra[0]}: unknown field; the fields are {', '.join(sorted(allowed))}")
