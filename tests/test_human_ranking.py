"""People's votes become a ranking: Bradley-Terry over cells, bootstrap intervals, agreement with scores and between
voters, in ranking.csv, report.html and the MLflow parent, kept current by `lora-sweep report` and `score`."""

from __future__ import annotations

import json
import shutil
import uuid
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import Workspace, mlflow_runs, two_lora_sweep

from runner.report.human import (
    Comparisons,
    agreement,
    bradley_terry,
    human_ranking,
    kendall_tau,
    vote_cells,
    voter_agreement,
    win_matrix,
)
from runner.report.ranking import rank_cells
from runner.store import SweepStore

pytestmark = pytest.mark.slow

VOTED_SWEEP = two_lora_sweep("voted", ["clip_score", "lora_effect"], "two LoRAs at two strengths, scored, then voted on")
VOTERS = ("ann", "bob")


def utility(plan: pd.DataFrame) -> pd.Series:
    """The scripted taste, per image id: lower strength wins (no LoRA best), and sunset over star at one strength."""
    strength = pd.to_numeric(plan["lora_strength"], errors="coerce").fillna(0.0)
    star = plan["lora_model"].eq("star").astype(float)
    return pd.Series((-4 * strength - star).to_numpy(), index=plan["id"].to_numpy())  # cells 0, -2, -3, -4, -5


def cast_votes(store: SweepStore, plan: pd.DataFrame, count: int, seed: int, voters: tuple[str, ...] = VOTERS) -> list[dict]:
    """`count` votes on random image pairs by the scripted taste: Bradley-Terry draws (the noise), a tie now and then."""
    rng = np.random.default_rng(seed)
    u = utility(plan)
    ids = plan["id"].to_numpy()
    records = []
    for n in range(count):
        left, right = rng.choice(ids, 2, replace=False)
        p_left = 1 / (1 + np.exp(u[right] - u[left]))
        choice = "tie" if rng.random() < 0.08 else ("left" if rng.random() < p_left else "right")
        record = {
            "kind": "vote",
            "vote": uuid.uuid4().hex,
            "time": 1_700_000_000 + n,
            "voter": voters[n % len(voters)],
            "left": str(left),
            "right": str(right),
            "choice": choice,
        }
        store.append_vote(record)
        records.append(record)
    return records


@pytest.fixture(scope="module")
def voted(tmp_path_factory, assets_dir):
    """One scored run of 10 images (5 cells), its report before any vote, then 400 votes and `lora-sweep report`."""
    ws = Workspace(tmp_path_factory.mktemp("voted"), assets_dir)
    ws.run(f"sweep={ws.sweep('voted', VOTED_SWEEP)}").assert_all_ok()
    folder = ws.outputs / "voted"
    before = (folder / "report.html").read_text()
    store = SweepStore(folder)
    plan = store.read_plan()
    cast_votes(store, plan, 400, seed=1)
    ws.folder_command("report", folder)
    return ws, folder, store, plan, before


def scripted_order(plan: pd.DataFrame) -> list[str]:
    """The cells best first by the scripted taste."""
    u = utility(plan)
    cells = vote_cells(plan)
    return list(pd.Series(u.to_numpy(), index=cells.to_numpy()).groupby(level=0).mean().sort_values(ascending=False).index)


def test_vote_cells_name_images_by_the_ranking_cells(voted):
    _, folder, store, plan, _ = voted
    cells = vote_cells(plan)
    ranking = rank_cells(plan, store.read_results(), ["clip_score"])
    assert set(cells.index) == set(plan["id"]) and set(cells) == set(ranking["cell"])
    for row in ranking.to_dict("records"):
        assert set(cells[cells == row["cell"]].index) == set(row["ids"].split()), "the images of a cell are the ranking's"


def test_bradley_terry_recovers_the_scripted_order_with_intervals_that_separate_the_ends(voted):
    _, _, store, plan, _ = voted
    votes = store.read_votes()
    human = human_ranking(plan, votes)
    assert list(human["cell"]) == scripted_order(plan)
    assert human["human"].mean() == pytest.approx(0, abs=1e-9), "log-strengths are centred"
    assert (human["human_low"] <= human["human"]).all() and (human["human"] <= human["human_high"]).all()
    assert human["human_low"].iloc[0] > human["human_high"].iloc[-1], "the best and the worst cell are told apart"
    cells = vote_cells(plan)
    between = votes[votes["left"].map(cells) != votes["right"].map(cells)]
    assert human["human_votes"].sum() == 2 * len(between), "each vote between two cells counts for both"
    assert human["human_wins"].sum() == pytest.approx(len(between)), "one win per vote, a tie half to each side"
    again = human_ranking(plan, votes)
    pd.testing.assert_frame_equal(human, again, obj="the same votes, the same intervals")


def test_an_undo_takes_a_vote_back(voted):
    _, _, store, plan, _ = voted
    before = human_ranking(plan, store.read_votes())
    worst = plan[plan["id"].map(vote_cells(plan)) == before["cell"].iloc[-1]]["id"].iloc[0]
    best = plan[plan["id"].map(vote_cells(plan)) == before["cell"].iloc[0]]["id"].iloc[0]
    surprise = {"kind": "vote", "vote": uuid.uuid4().hex, "time": 1, "voter": "ann", "left": worst, "right": best, "choice": "left"}
    store.append_vote(surprise)
    counted = human_ranking(plan, store.read_votes())
    assert counted.set_index("cell")["human_votes"].sum() == before["human_votes"].sum() + 2
    store.append_vote({"kind": "undo", "vote": uuid.uuid4().hex, "time": 2, "voter": "ann", "undoes": surprise["vote"]})
    assert surprise["vote"] not in set(store.read_votes()["vote"])
    pd.testing.assert_frame_equal(human_ranking(plan, store.read_votes()), before)


def comparisons(cells: int, pairs: list[tuple[int, int, float]], voters: list[str] | None = None) -> Comparisons:
    left, right, score = (np.array(column) for column in zip(*pairs))
    voter = np.array(voters or ["ann"] * len(pairs))
    return Comparisons([f"c{i}" for i in range(cells)], left.astype(int), right.astype(int), score.astype(float), voter)


def test_ties_count_half_a_win_each_way():
    tied = win_matrix(comparisons(2, [(0, 1, 0.5)] * 6))
    assert tied[0, 1] == tied[1, 0] == 3
    even = bradley_terry(tied)
    assert even[0] == pytest.approx(even[1])
    leaning = bradley_terry(win_matrix(comparisons(2, [(0, 1, 0.5)] * 6 + [(0, 1, 1.0)])))
    assert leaning[0] > leaning[1], "one win among ties leans the fit"


def test_all_wins_and_disconnected_comparisons_stay_finite():
    strengths = bradley_terry(win_matrix(comparisons(4, [(0, 1, 1.0)] * 5 + [(2, 3, 0.0)] * 5)))
    assert np.isfinite(strengths).all()
    assert strengths[0] > strengths[1] and strengths[3] > strengths[2]


def test_a_score_that_is_the_taste_agrees_with_people_and_its_reverse_disagrees(voted):
    _, _, store, plan, _ = voted
    results = store.read_results().merge(utility(plan).rename("taste").rename_axis("id").reset_index(), on="id")
    results["reverse"] = -results["taste"]
    table = agreement(plan, results, store.read_votes(), ["taste", "reverse", "clip_score"]).set_index("score")
    assert table.loc["taste", "tau"] == pytest.approx(1.0)
    assert table.loc["reverse", "tau"] == pytest.approx(-1.0)
    assert 0.5 < table.loc["taste", "tau_low"] <= table.loc["taste", "tau_high"] <= 1.0
    low, tau, high = table.loc["clip_score", ["tau_low", "tau", "tau_high"]]
    assert -1 <= low <= tau <= high <= 1 and table.loc["clip_score", "cells"] == 5


def test_kendall_tau_counts_concordant_pairs():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert kendall_tau(x, x) == pytest.approx(1) and kendall_tau(x, -x) == pytest.approx(-1)
    assert kendall_tau(x, np.array([1.0, 2.0, 4.0, 3.0])) == pytest.approx(4 / 6), "one discordant pair of six"
    assert np.isnan(kendall_tau(x, np.zeros(4))), "no order at all: undefined"
    rows = kendall_tau(x, np.stack([x, -x]))
    assert rows == pytest.approx([1, -1])


def test_two_voters_with_one_taste_agree_and_a_contrarian_does_not(voted):
    _, _, store, plan, _ = voted
    from runner.report.human import comparisons as to_comparisons

    table = voter_agreement(to_comparisons(plan, store.read_votes()))
    assert len(table) == 1
    row = table.iloc[0]
    assert {row["voter_a"], row["voter_b"]} == set(VOTERS) and row["cells"] == 5 and 5 < row["shared_pairs"] <= 10
    assert row["same_choice"] > 0.7 and row["tau"] > 0.5
    pairs = [(0, 1, 1.0), (1, 2, 1.0), (0, 2, 1.0)]
    flipped = [(a, b, 1 - s) for a, b, s in pairs]
    opposed = voter_agreement(comparisons(3, pairs + flipped, ["ann"] * 3 + ["cat"] * 3)).iloc[0]
    assert opposed["same_choice"] == 0 and opposed["tau"] == pytest.approx(-1) and opposed["votes_a"] == 3


class Section(HTMLParser):
    """The text and table rows of report.html's People's votes section."""

    def __init__(self):
        super().__init__()
        self.inside = False
        self.text: list[str] = []
        self.vote_cells: list[str] = []
        self.tables: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "h2":
            self.inside = attrs.get("id") == "votes"
        if self.inside and tag == "table" and attrs.get("id"):
            self.tables.add(attrs["id"])
        if self.inside and tag == "tr" and attrs.get("data-human-cell") is not None:
            self.vote_cells.append(attrs["data-human-cell"])

    def handle_data(self, data):
        if self.inside:
            self.text.append(data)


def votes_section(html: str) -> Section:
    parser = Section()
    parser.feed(html)
    return parser


def test_report_shows_a_hint_before_votes_and_the_section_after(voted):
    _, folder, store, plan, before = voted
    hint = votes_section(before)
    assert "No votes yet" in "".join(hint.text) and "lora-sweep compare outputs/voted" in "".join(hint.text)
    section = votes_section((folder / "report.html").read_text())
    assert section.vote_cells == list(human_ranking(plan, store.read_votes())["cell"])
    assert {"votes-table", "agreement-table", "voters-table"} <= section.tables
    text = "".join(section.text)
    assert "clip_score" in text and "lora_effect" in text and "lora-sweep compare outputs/voted" in text


def test_ranking_csv_has_the_human_columns_of_a_recomputation(voted):
    _, folder, store, plan, _ = voted
    ranking = pd.read_csv(folder / "ranking.csv")
    expected = human_ranking(plan, store.read_votes()).set_index("cell")
    assert {"clip_score_mean", "human", "human_low", "human_high", "human_votes"} <= set(ranking.columns)
    assert set(ranking["cell"]) == set(expected.index)
    for row in ranking.to_dict("records"):
        for column in ("human", "human_low", "human_high", "human_votes"):
            assert row[column] == pytest.approx(expected.loc[row["cell"], column]), column


def test_score_puts_the_people_ranking_on_the_mlflow_parent(voted):
    from mlflow.tracking import MlflowClient

    ws, folder, store, plan, _ = voted
    ws.folder_command("score", folder)
    parent, _ = mlflow_runs(ws.outputs, "voted")
    run_id = parent["run_id"].iloc[0]
    client = MlflowClient(f"sqlite:///{ws.outputs / 'mlflow.db'}")
    run = client.get_run(run_id)
    expected = human_ranking(plan, store.read_votes())
    for k, row in enumerate(expected.to_dict("records"), start=1):
        assert run.data.tags[f"human.{k}.cell"] == row["cell"]
        assert run.data.metrics[f"human.{k}"] == pytest.approx(row["human"])
        assert run.data.metrics[f"human.{k}.low"] <= run.data.metrics[f"human.{k}"] <= run.data.metrics[f"human.{k}.high"]
        assert run.data.metrics[f"human.{k}.votes"] == row["human_votes"]
    assert "human_tau.clip_score" in run.data.metrics
    table = json.loads(Path(client.download_artifacts(run_id, "human_ranking.json", str(folder / ".dl"))).read_text())
    assert [r[table["columns"].index("cell")] for r in table["data"]] == list(expected["cell"])
    assert "human_agreement.json" in {a.path for a in client.list_artifacts(run_id)}


def test_votes_rank_a_sweep_that_has_no_scores(voted, tmp_path):
    ws, folder, store, plan, _ = voted
    copy = tmp_path / "voted"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("ranking.csv", "report.html"))
    config = (copy / "config.yaml").read_text()
    assert "  scores:\n  - clip_score\n  - lora_effect\n" in config
    (copy / "config.yaml").write_text(config.replace("  scores:\n  - clip_score\n  - lora_effect\n", "  scores: []\n"))
    ws.folder_command("report", copy)
    ranking = pd.read_csv(copy / "ranking.csv")
    expected = human_ranking(plan, store.read_votes())
    assert list(ranking["cell"]) == list(expected["cell"]) and "clip_score_mean" not in ranking
    cells = vote_cells(plan)
    for row in ranking.to_dict("records"):
        assert set(row["ids"].split()) == set(cells[cells == row["cell"]].index), "each cell's images, as with scores"
    page = (copy / "report.html").read_text()
    assert "No scores yet" in page and votes_section(page).vote_cells == list(expected["cell"])


def test_report_command_follows_new_votes(voted):
    """Last in the file: it adds votes (by the same taste, from a third voter)."""
    ws, folder, store, plan, _ = voted
    before = pd.read_csv(folder / "ranking.csv").set_index("cell")["human_votes"]
    cast_votes(store, plan, 60, seed=2, voters=("cat",))
    ws.folder_command("report", folder)
    ranking = pd.read_csv(folder / "ranking.csv").set_index("cell")
    expected = human_ranking(plan, store.read_votes()).set_index("cell")
    assert ranking["human_votes"].sum() > before.sum()
    assert (ranking["human_votes"] == expected.loc[ranking.index, "human_votes"]).all()
    section = votes_section((folder / "report.html").read_text())
    assert "cat" in "".join(section.text), "the new voter is compared with the others"
