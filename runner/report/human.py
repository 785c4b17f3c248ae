"""People's votes as a ranking: Bradley-Terry over cells, bootstrap intervals, and agreement with the scores.

A vote compares two images; each image belongs to a cell (every plan field but the seed, the same
`cell` labels as ranking.csv), so a vote is a comparison of two cells. Ties count as half a win each
way. The fit is choix's iterative Luce spectral ranking on the dense win matrix with a small
regularisation (`ALPHA`), so a cell that won every vote stays finite and a comparison graph in
several pieces still fits. Intervals resample the votes (percentile bootstrap). numpy, pandas and choix (no torch).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd

from runner.report.ranking import cell_labels

ALPHA = 0.01  # LSR chain prior: a hundredth of a comparison between every two cells (keeps all-win cells finite)
LEVEL = 0.95
CHOICE_SCORE = {"left": 1.0, "right": 0.0, "tie": 0.5}  # the left image's share of the win
HUMAN_COLUMNS = ["human", "human_low", "human_high", "human_votes"]


def vote_cells(plan: pd.DataFrame) -> pd.Series:
    """Image id -> cell label (the `cell` of rank_cells), for voting and ranking by cell."""
    return cell_labels(plan)


@dataclass
class Comparisons:
    """Votes between two different cells, as cell indices: `left` got `score` (1 win, 0 loss, 0.5 tie) against `right`."""

    cells: list[str]
    left: np.ndarray
    right: np.ndarray
    score: np.ndarray
    voter: np.ndarray


def comparisons(plan: pd.DataFrame, votes: pd.DataFrame) -> Comparisons:
    """The votes that say something about cells: both images in the plan, a known choice, two different cells."""
    labels = vote_cells(plan)
    table = votes.assign(
        left_cell=votes["left"].map(labels), right_cell=votes["right"].map(labels), score=votes["choice"].map(CHOICE_SCORE)
    )
    table = table.dropna(subset=["left_cell", "right_cell", "score"])
    table = table[table["left_cell"] != table["right_cell"]]  # two seeds of one cell: nothing to rank
    cells = list(dict.fromkeys([*table["left_cell"], *table["right_cell"]]))
    index = {cell: i for i, cell in enumerate(cells)}
    return Comparisons(
        cells=cells,
        left=table["left_cell"].map(index).to_numpy(dtype=int),
        right=table["right_cell"].map(index).to_numpy(dtype=int),
        score=table["score"].to_numpy(dtype=float),
        voter=table["voter"].fillna("").astype(str).to_numpy(),
    )


def win_matrix(data: Comparisons, weights: np.ndarray | None = None) -> np.ndarray:
    """wins[i, j]: how often cell i beat cell j (ties half each way), each vote counted `weights` times."""
    n = len(data.cells)
    weights = np.ones(len(data.score)) if weights is None else weights
    wins = np.bincount(data.left * n + data.right, weights=weights * data.score, minlength=n * n)
    wins += np.bincount(data.right * n + data.left, weights=weights * (1 - data.score), minlength=n * n)
    return wins.reshape(n, n)


def bradley_terry(wins: np.ndarray, initial: np.ndarray | None = None) -> np.ndarray:
    """Log-strengths (mean 0) from a win matrix; choix's I-LSR, regularised so every input fits."""
    import choix

    if len(wins) < 2:
        return np.zeros(len(wins))
    try:
        params = choix.ilsr_pairwise_dense(wins, alpha=ALPHA, initial_params=initial, max_iter=500, tol=1e-7)
    except RuntimeError:  # not converged within max_iter: a cruder but still sensible estimate
        params = choix.lsr_pairwise_dense(wins, alpha=ALPHA, initial_params=initial)
    return params - params.mean()


@dataclass
class HumanFit:
    """The fit on all votes and on each bootstrap resample of them (rows of `boot`)."""

    data: Comparisons
    strength: np.ndarray
    boot: np.ndarray


def fit(plan: pd.DataFrame, votes: pd.DataFrame, bootstrap: int = 200, seed: int = 0) -> HumanFit:
    """Bradley-Terry on all votes, then on `bootstrap` resamples of the votes (the same seed, the same interval)."""
    data = comparisons(plan, votes)
    strength = bradley_terry(win_matrix(data))
    n_votes = len(data.score)
    if n_votes == 0 or bootstrap <= 0:
        return HumanFit(data, strength, np.empty((0, len(data.cells))))
    counts = np.random.default_rng(seed).multinomial(n_votes, np.full(n_votes, 1 / n_votes), size=bootstrap)
    boot = np.stack([bradley_terry(win_matrix(data, weights), strength) for weights in counts.astype(float)])
    return HumanFit(data, strength, boot)


def _percentiles(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tail = (1 - LEVEL) / 2 * 100
    if len(samples) == 0:
        return np.full(samples.shape[1:], np.nan), np.full(samples.shape[1:], np.nan)
    low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
    return low, high


def ranking_table(result: HumanFit) -> pd.DataFrame:
    """One row per voted cell, best first: log-strength, its interval, votes it was in and wins (ties half)."""
    data = result.data
    n = len(data.cells)
    low, high = _percentiles(result.boot)
    votes_in = np.bincount(data.left, minlength=n) + np.bincount(data.right, minlength=n)
    wins = np.bincount(data.left, weights=data.score, minlength=n) + np.bincount(data.right, weights=1 - data.score, minlength=n)
    table = pd.DataFrame(
        {"cell": data.cells, "human": result.strength, "human_low": low, "human_high": high, "human_votes": votes_in, "human_wins": wins}
    )
    table["human_votes"] = table["human_votes"].astype(int)
    return table.sort_values("human", ascending=False, kind="stable").reset_index(drop=True)


def human_ranking(plan: pd.DataFrame, votes: pd.DataFrame, bootstrap: int = 200, seed: int = 0) -> pd.DataFrame:
    """One row per cell that has votes: cell, human (Bradley-Terry log-strength, mean 0), human_low, human_high
    (95% percentile bootstrap over votes), human_votes, human_wins (ties half a win each way); best first."""
    return ranking_table(fit(plan, votes, bootstrap, seed))


def merge_human(ranking: pd.DataFrame, human: pd.DataFrame) -> pd.DataFrame:
    """The score ranking with the people's columns beside it, by `cell` (NaN and 0 votes where nobody voted)."""
    if ranking.empty:
        return ranking
    if human.empty:
        human = pd.DataFrame(columns=["cell", *HUMAN_COLUMNS])
    merged = ranking.drop(columns=HUMAN_COLUMNS, errors="ignore").merge(human[["cell", *HUMAN_COLUMNS]], on="cell", how="left")
    merged[HUMAN_COLUMNS[:3]] = merged[HUMAN_COLUMNS[:3]].astype(float)
    merged["human_votes"] = merged["human_votes"].fillna(0).astype(int)
    return merged


# ------------------------------------------------------------ agreement


def kendall_tau(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of `x` against each row of `y` (1-D or 2-D); NaN where one side has no order at all."""
    y2 = np.atleast_2d(y)
    sx = np.sign(x[:, None] - x[None, :])
    sy = np.sign(y2[:, :, None] - y2[:, None, :])
    numerator = (sx[None] * sy).sum(axis=(1, 2))
    denominator = np.sqrt((sx**2).sum() * (sy**2).sum(axis=(1, 2)))
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)
    return tau if np.ndim(y) == 2 else tau[0]


def cell_values(plan: pd.DataFrame, results: pd.DataFrame, score: str) -> dict[str, np.ndarray]:
    """Each cell's values of `score` over its images that finished (their mean is the `<score>_mean` of ranking.csv)."""
    if score not in results:
        return {}
    table = results[["id", "status", score]].assign(cell=results["id"].map(vote_cells(plan)))
    ok = table[(table["status"] == "ok") & table[score].notna() & table["cell"].notna()]
    return {cell: group.to_numpy(dtype=float) for cell, group in ok.groupby("cell")[score]}


def resampled_means(values: list[np.ndarray], samples: int, rng: np.random.Generator) -> np.ndarray:
    """(samples, cells): each cell's mean over its images drawn again with replacement (the score's own uncertainty)."""
    return np.stack([v[rng.integers(0, len(v), (samples, len(v)))].mean(axis=1) for v in values], axis=1)


def score_agreement(result: HumanFit, plan: pd.DataFrame, results: pd.DataFrame, scores: list[str], seed: int = 0) -> pd.DataFrame:
    """Per score: Kendall's tau between its cell ranking (mean per cell) and the people's, over the cells both rank;
    the 95% interval resamples the votes (the bootstrap fits) and each cell's images (the score's means) together."""
    rows = []
    rng = np.random.default_rng(seed)
    for score in scores:
        values = cell_values(plan, results, score)
        known = np.array([cell in values for cell in result.data.cells], dtype=bool)
        if known.sum() < 2:
            continue
        cells = [values[cell] for cell, k in zip(result.data.cells, known) if k]
        means = np.array([v.mean() for v in cells])
        tau = float(kendall_tau(means, result.strength[known]))
        low = high = float("nan")
        if len(result.boot):
            boot_means = resampled_means(cells, len(result.boot), rng)
            taus = np.array([kendall_tau(m, h) for m, h in zip(boot_means, result.boot[:, known])])
            low, high = _percentiles(taus)
        rows.append({"score": score, "tau": tau, "tau_low": float(low), "tau_high": float(high), "cells": int(known.sum())})
    return pd.DataFrame(rows, columns=["score", "tau", "tau_low", "tau_high", "cells"])


def agreement(
    plan: pd.DataFrame, results: pd.DataFrame, votes: pd.DataFrame, scores: list[str], bootstrap: int = 200, seed: int = 0
) -> pd.DataFrame:
    """How well each automatic score agrees with people on this sweep: score, tau, tau_low, tau_high (95%), cells."""
    return score_agreement(fit(plan, votes, bootstrap, seed), plan, results, scores, seed)


def _pair_preferences(data: Comparisons, voter: str) -> pd.Series:
    """One voter's mean preference per unordered cell pair (1: the lower-indexed cell always won, 0.5: even)."""
    mine = data.voter == voter
    first, second = np.minimum(data.left[mine], data.right[mine]), np.maximum(data.left[mine], data.right[mine])
    score = np.where(data.left[mine] == first, data.score[mine], 1 - data.score[mine])
    return pd.Series(score).groupby([first, second]).mean()


def voter_agreement(data: Comparisons) -> pd.DataFrame:
    """Per two voters: the cell pairs both voted on, the share where they lean the same way, and Kendall's tau of
    their own Bradley-Terry rankings over the cells both voted on. Empty with fewer than two voters."""
    voters = sorted(set(data.voter))
    columns = ["voter_a", "voter_b", "votes_a", "votes_b", "shared_pairs", "same_choice", "cells", "tau"]
    if len(voters) < 2:
        return pd.DataFrame(columns=columns)
    preferences = {v: _pair_preferences(data, v) for v in voters}
    strengths = {}
    for v in voters:
        mine = data.voter == v
        own = Comparisons(data.cells, data.left[mine], data.right[mine], data.score[mine], data.voter[mine])
        seen = np.zeros(len(data.cells), dtype=bool)
        seen[own.left], seen[own.right] = True, True
        strengths[v] = (bradley_terry(win_matrix(own)), seen)
    rows = []
    for a, b in itertools.combinations(voters, 2):
        shared = preferences[a].index.intersection(preferences[b].index)
        lean_a = np.sign(preferences[a].loc[shared].to_numpy() - 0.5)
        lean_b = np.sign(preferences[b].loc[shared].to_numpy() - 0.5)
        both = strengths[a][1] & strengths[b][1]
        tau = float(kendall_tau(strengths[a][0][both], strengths[b][0][both])) if both.sum() >= 2 else float("nan")
        rows.append(
            {
                "voter_a": a,
                "voter_b": b,
                "votes_a": int((data.voter == a).sum()),
                "votes_b": int((data.voter == b).sum()),
                "shared_pairs": len(shared),
                "same_choice": float((lean_a == lean_b).mean()) if len(shared) else float("nan"),
                "cells": int(both.sum()),
                "tau": tau,
            }
        )
    return pd.DataFrame(rows, columns=columns)


@dataclass
class HumanReport:
    """Everything the report shows of the votes (all empty when there are none)."""

    ranking: pd.DataFrame
    scores: pd.DataFrame
    voters: pd.DataFrame
    votes: int


def human_report(plan: pd.DataFrame, results: pd.DataFrame, votes: pd.DataFrame, scores: list[str], bootstrap: int = 200) -> HumanReport:
    """The human ranking, each score's agreement with it and the voters' with each other, from one fit."""
    result = fit(plan, votes, bootstrap)
    if not len(result.data.score):
        return HumanReport(pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), 0)
    ranking = with_images(ranking_table(result), plan, results)
    return HumanReport(ranking, score_agreement(result, plan, results, scores), voter_agreement(result.data), len(result.data.score))


def with_images(ranking: pd.DataFrame, plan: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """The `ids` column of ranking.csv (each cell's finished images), for a sweep people ranked before any score did."""
    ok = set(results.loc[results["status"] == "ok", "id"]) if "status" in results else set()
    cells = vote_cells(plan)
    ids = pd.Series(cells.index, index=cells.to_numpy())
    ids = ids[ids.isin(ok)].groupby(level=0, sort=False).agg(" ".join)
    return ranking.assign(ids=ranking["cell"].map(ids).fillna(""))


__all__ = ["HUMAN_COLUMNS", "HumanReport", "agreement", "human_ranking", "human_report", "merge_human", "vote_cells", "voter_agreement"]
