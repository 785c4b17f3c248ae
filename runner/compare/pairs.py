"""Which two images to show next: pure bookkeeping over the plan, what was shown and the people's ranking so far.

Two images make a pair when they share a prompt and seed (a "group": the same noise, the same words) and belong
to two different cells, so a vote says something about the cells and nothing about the seed. The next pair is
the least shown one (no pair twice before every pair was shown once), then one no other voter has on screen now,
then the one whose two cells' Bradley-Terry
intervals overlap most (their order is least certain), then the cell pair shown least, then the group
shown least (spread over seeds and prompts); the rest is chance, and so are the sides.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from runner.prompts.syntax import lora_tags


@dataclass(frozen=True)
class Candidate:
    """Two images (ids sorted) of one group from two cells (labels in the same order as the ids)."""

    first: str
    second: str
    first_cell: str
    second_cell: str
    group: tuple

    @property
    def key(self) -> tuple[str, str]:
        return (self.first, self.second)

    @property
    def cells(self) -> tuple[str, str]:
        return tuple(sorted((self.first_cell, self.second_cell)))  # type: ignore[return-value]


@dataclass(frozen=True)
class Shown:
    """A pair as the page shows it: which image is on which side."""

    left: str
    right: str
    group: tuple


def pair_key(a: str, b: str) -> tuple[str, str]:
    """The same key whichever side each image was on."""
    return (a, b) if a <= b else (b, a)


def group_prompt(row: Mapping) -> str:
    """The prompt as written, `<lora:>` tags out: the same words for every cell (trigger words are the LoRA's)."""
    written = row.get("prompt_original")
    text = written if isinstance(written, str) and written else row.get("prompt")
    return " ".join(lora_tags(text)[0].split()) if isinstance(text, str) else ""


def image_groups(plan: pd.DataFrame) -> pd.Series:
    """Image id -> its group (prompt as written, seed, sample): the images a vote may set side by side."""
    samples = plan["sample"] if "sample" in plan else pd.Series(0, index=plan.index)
    groups = [
        (group_prompt(row), int(row["seed"]) if pd.notna(row["seed"]) else None, int(sample) if pd.notna(sample) else 0)
        for row, sample in zip(plan.to_dict("records"), samples)
    ]
    return pd.Series(groups, index=plan["id"].to_numpy(), dtype=object)


def candidate_pairs(cells: Mapping[str, str], groups: Mapping[str, tuple]) -> list[Candidate]:
    """Every pair of images (of those given: the finished ones) with one group and two different cells."""
    by_group: dict[tuple, list[str]] = {}
    for image_id in sorted(cells):
        by_group.setdefault(groups[image_id], []).append(image_id)
    return [
        Candidate(a, b, cells[a], cells[b], group)
        for group, ids in by_group.items()
        for a, b in itertools.combinations(ids, 2)
        if cells[a] != cells[b]
    ]


def interval_overlap(ranking: pd.DataFrame, cells: tuple[str, str]) -> float:
    """How much the two cells' intervals overlap (in log-strength); infinite when one has no interval yet."""
    if ranking.empty:
        return math.inf
    table = ranking.set_index("cell")
    if not all(c in table.index for c in cells):
        return math.inf
    (low_a, high_a), (low_b, high_b) = (table.loc[c, ["human_low", "human_high"]].to_numpy(dtype=float) for c in cells)
    if any(math.isnan(v) for v in (low_a, high_a, low_b, high_b)):
        return math.inf
    return min(high_a, high_b) - max(low_a, low_b)


def choose_pair(
    candidates: Sequence[Candidate],
    shown: Mapping[tuple[str, str], int],
    ranking: pd.DataFrame,
    rng: random.Random,
    on_screen: Mapping[tuple[str, str], int] | None = None,
) -> Shown | None:
    """The most informative pair to show next (see the module docstring), sides at random; None when there is none.

    `shown`: how often each pair (pair_key) was voted on or skipped; `ranking`: human_ranking's table (may be empty);
    `on_screen`: the pairs handed out and not voted on yet (a page left open must not hold a pair back for long).
    """
    on_screen = on_screen or {}
    if not candidates:
        return None
    cell_shown: Counter[tuple[str, str]] = Counter()
    group_shown: Counter[tuple] = Counter()
    for candidate in candidates:
        times = shown.get(candidate.key, 0)
        cell_shown[candidate.cells] += times
        group_shown[candidate.group] += times
    overlaps = {cells: interval_overlap(ranking, cells) for cells in {c.cells for c in candidates}}

    def rank(c: Candidate) -> tuple:
        return (shown.get(c.key, 0), on_screen.get(c.key, 0), -overlaps[c.cells], cell_shown[c.cells], group_shown[c.group])

    best = min(rank(c) for c in candidates)
    chosen = rng.choice([c for c in candidates if rank(c) == best])
    left, right = (chosen.first, chosen.second) if rng.random() < 0.5 else (chosen.second, chosen.first)
    return Shown(left, right, chosen.group)
