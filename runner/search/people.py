"""A human objective: each trial's value from people's votes (`lora-sweep compare`), on one scale across runs.

Bradley-Terry strengths (runner/report/human.py) are relative: mean 0 over the cells voted on so far, so a
cell's strength moves as new trials join and votes come in. Optuna keeps the value it was told, so a trial
told later is shifted by how far the trials told before have moved since (their mean told value minus their
mean strength now): the values Optuna compares stay on one scale. No torch, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from runner.report.human import human_ranking, vote_cells

TOLD = "lora_sweep.human_told"  # study user attribute: trial number -> the human value it was told


@dataclass
class PeopleFit:
    """Cells' Bradley-Terry strengths and vote counts from every vote that stands, and the shift onto the told scale."""

    cells: pd.Series  # image id -> cell
    strength: dict[str, float]
    votes: dict[str, int]
    shift: float = 0.0

    def raw(self, ids: Iterable[str]) -> tuple[float, int]:
        """The mean strength of these images' cells (NaN if none has a vote) and the votes they are in."""
        cells = list(dict.fromkeys(self.cells[i] for i in ids if i in self.cells.index))
        strengths = [self.strength[c] for c in cells if c in self.strength]
        return (float(np.mean(strengths)) if strengths else float("nan")), sum(self.votes.get(c, 0) for c in cells)

    def of(self, ids: Iterable[str]) -> tuple[float, int]:
        """A trial's human value (on the scale of the trials told before) and the votes its images are in."""
        strength, votes = self.raw(ids)
        return strength + self.shift, votes


def fit_people(plan: pd.DataFrame, votes: pd.DataFrame, told: Mapping[int, tuple[float, list[str]]] | None = None) -> PeopleFit:
    """The fit over the plan's cells; `told` (trial number -> (value told, its own image ids)) sets the shift."""
    ranking = human_ranking(plan, votes, bootstrap=0) if len(plan) else pd.DataFrame(columns=["cell", "human", "human_votes"])
    fit = PeopleFit(
        vote_cells(plan) if len(plan) else pd.Series(dtype=str),
        dict(zip(ranking["cell"], ranking["human"].astype(float))),
        dict(zip(ranking["cell"], ranking["human_votes"].astype(int))),
    )
    moved = [value - now for value, ids in (told or {}).values() if (now := fit.raw(ids)[0]) == now]
    fit.shift = float(np.mean(moved)) if moved else 0.0
    return fit
