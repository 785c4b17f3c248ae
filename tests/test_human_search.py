"""A search whose objective is `human`: each run makes a batch of trials and stops; people vote on them through a
real `lora-sweep compare` server (HTTP, a scripted taste: the lower strength wins); the next run tells Optuna the
trials' Bradley-Terry strengths and asks the next batch. Through the CLI, the sweep folder, the report and MLflow."""

from __future__ import annotations

import time

import pandas as pd
import pytest
from helpers import Compare, Workspace, mlflow_runs, start_compare

pytestmark = pytest.mark.slow

VOTES_PER_TRIAL = 4
HUMAN_SEARCH = {
    "name": "taste",
    "base": {
        "prompt": "a red circle on a blue background",
        "lora_model": "sunset",
        "width": 64,
        "height": 64,
        "num_inference_steps": 4,
    },
    "search": {
        "space": {"lora_strength.sunset": {"low": 0.1, "high": 0.9, "step": 0.1}},
        "objective": "human",
        "seeds": [0, 1],
        "trials": 6,
        "batch": 3,
        "votes_per_trial": VOTES_PER_TRIAL,
    },
    "scores": [],
}


def strength_of(folder) -> dict[str, float]:
    plan = pd.read_parquet(folder / "plan.parquet")
    return dict(zip(plan["id"], plan["lora_strength"].astype(float)))


def trials(folder) -> pd.DataFrame:
    return pd.read_csv(folder / "search" / "trials.csv").sort_values("trial").reset_index(drop=True)


def vote_until_every_trial_has_enough(server: Compare, folder, voter: str) -> int:
    """Vote the pairs the server hands out (lower strength wins) until every waiting trial's images are in enough votes.

    The server reads the folder again when the search has added images; until it has, it hands out old pairs or none."""
    strength = strength_of(folder)
    waiting = trials(folder)
    waiting = waiting[waiting["state"] == "WAITING"]
    need = {float(s): VOTES_PER_TRIAL - int(v) for s, v in zip(waiting["param.lora_strength.sunset"], waiting["votes"])}
    cast, deadline = 0, time.monotonic() + 60
    while any(n > 0 for n in need.values()):
        assert time.monotonic() < deadline, f"the server never handed out pairs for {need}"
        reply = server.get("/api/pair", params={"voter": voter}).json()
        pair = reply["pair"]
        if pair is None or pair["left"] not in strength or pair["right"] not in strength:
            time.sleep(0.2)  # the folder is read again every 2 s at most
            continue
        left, right = strength[pair["left"]], strength[pair["right"]]
        choice = "left" if left < right else "right"
        answer = server.post("/api/vote", {"left": pair["left"], "right": pair["right"], "choice": choice, "voter": voter})
        assert answer.status_code == 200, answer.text
        cast += 1
        for s in (left, right):
            if s in need:
                need[s] -= 1
    return cast


def test_a_human_objective_waits_for_votes_between_runs_and_finds_the_taste(workspace: Workspace):
    sweep = workspace.sweep("taste", HUMAN_SEARCH)
    folder = workspace.outputs / "taste"

    first = workspace.cli("run", f"sweep={sweep}")
    assert first.code == 0, first.err
    assert "3 trials wait for people's votes (4 each;" in first.out and f"lora-sweep compare {folder}" in first.out
    made = trials(folder)
    assert list(made["state"]) == ["WAITING"] * 3 and list(made["votes"]) == [0, 0, 0]
    assert len(pd.read_parquet(folder / "plan.parquet")) == 6, "3 trials x 2 seeds, made before any vote"
    assert "3 waiting for votes (4 each)" in (folder / "report.html").read_text()

    server = start_compare(folder)  # it stays up while the search goes on, and reads the new images itself
    try:
        assert vote_until_every_trial_has_enough(server, folder, "ann") >= 6
        second = workspace.run(f"sweep={sweep}").out
        assert "continuing: 0 trials done, 3 waiting for votes" in second
        round_one = trials(folder).iloc[:3]
        assert list(round_one["state"]) == ["COMPLETE"] * 3, second
        by_strength = round_one.sort_values("param.lora_strength.sunset")
        assert by_strength["objective"].is_monotonic_decreasing, "the lower strength the people's favourite"
        assert "for people's votes" in second, "the next trials made, and waiting"
        last, rounds = second, 1
        while (trials(folder)["state"] == "WAITING").any():  # a trial that lands on a voted setting is told at once
            assert rounds < 4, last
            assert vote_until_every_trial_has_enough(server, folder, "bo") >= 1
            last, rounds = workspace.run(f"sweep={sweep}").out, rounds + 1
    finally:
        assert server.stop() == 0, server.log.read_text()

    assert "wait for people's votes" not in last
    told = trials(folder)
    assert list(told["state"]) == ["COMPLETE"] * 6 and (told["votes"] >= VOTES_PER_TRIAL).all()
    lowest = told.loc[told["param.lora_strength.sunset"].idxmin()]
    assert f"best trial {int(lowest['trial'])}: human = " in last, "the lowest strength tried wins"
    assert told.sort_values("param.lora_strength.sunset")["objective"].iloc[0] == told["objective"].max()
    report = (folder / "report.html").read_text()
    assert "human: its cells' Bradley-Terry strength from the votes" in report and "waiting for votes" not in report
    _, children = mlflow_runs(workspace.outputs, "taste")
    trial_runs = children[children["tags.lora_sweep.role"] == "trial"]
    assert len(trial_runs) == 6 and trial_runs["metrics.human_mean"].notna().all(), "each trial logged once it was told"


@pytest.mark.parametrize(
    ("search", "line"),
    [
        ({"objective": "clip_score", "votes_per_trial": 3}, "search.votes_per_trial: only an objective that names human waits for votes"),
        ({"compare_grid": True}, "search.compare_grid: a grid beside a human objective would need votes of its own"),
        ({"objective": "humann"}, "search.objective: 'humann' is not a score of this sweep; did you mean 'human'?"),
        ({"votes_per_trial": 0}, "search.votes_per_trial: 0 is not a positive whole number"),
        ({"batch": 1}, "search.batch: a human objective's votes compare the trials of a batch; use 2 or more"),
    ],
)
def test_a_human_objective_is_checked_before_any_image(workspace: Workspace, search: dict, line: str):
    body = {**HUMAN_SEARCH, "search": {**HUMAN_SEARCH["search"], **search}, "scores": ["clip_score"]}
    result = workspace.cli("plan", f"sweep={workspace.sweep('bad', body)}")
    assert result.code == 2 and line in result.err, result.err
    assert "Traceback" not in result.err and not (workspace.outputs / "taste" / "plan.parquet").exists()
