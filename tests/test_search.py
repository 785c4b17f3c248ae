"""Search instead of grid (sweep files' `search:`): through the CLI, the sweep folder and MLflow.

The search and the grid over the same space make the same requests, so they share image ids and
pixels: the search's best objective is one of the grid's, and the comparison is exact.
"""

from __future__ import annotations

import json
import signal

import pandas as pd
import pytest
from helpers import cli_config, mlflow_runs, start_run, wait_for_results

from runner import cli
from runner.errors import UserError
from runner.search import prepare_search_or_fail

pytestmark = pytest.mark.slow

PROMPT = "a red circle on a blue background"
BASE = {"prompt": PROMPT, "width": 128, "height": 128, "num_inference_steps": 12, "scheduler": "EulerDiscreteScheduler"}
STRENGTHS = [0.2, 0.4, 0.6, 0.8, 1.0]
GUIDANCE = [3, 5, 7.5, 10]
SEEDS = [0]
OBJECTIVE = "clip_score"
SEARCH = {
    "name": "found",
    "base": BASE,
    "search": {
        "space": {
            "lora_model": ["sunset", "stripes", "star"],
            **{f"lora_strength.{lora}": {"low": 0.2, "high": 1.0, "step": 0.2} for lora in ("sunset", "stripes", "star")},
            "guidance_scale": {"choices": GUIDANCE},
        },
        "objective": OBJECTIVE,
        "seeds": SEEDS,
        "trials": 20,
        "batch": 4,
        "compare_grid": True,  # and a grid of at most 20 settings over the same space, beside it in the report
    },
    "scores": ["clip_score"],
}
FULL_GRID = {  # the same space, every setting: 3 LoRAs x 5 strengths x 4 guidance scales = 60 settings, 60 images
    "name": "everything",
    "base": BASE,
    "grid": {"lora_model": {"each": ["sunset", "stripes", "star"]}, "lora_strength": STRENGTHS, "guidance_scale": GUIDANCE, "seed": SEEDS},
    "scores": ["clip_score"],
}
TOLERANCE = 0.05  # of the spread between the grid's worst and best settings


def grid_objectives(folder) -> pd.Series:
    """The objective of every setting of the full grid, computed from its results as the search computes a trial's."""
    plan = pd.read_parquet(folder / "plan.parquet")
    results = pd.read_parquet(folder / "results.parquet")
    table = plan.merge(results[["id", "status", "clip_score"]], on="id")
    assert set(table["status"]) == {"ok"}
    return table.groupby(["lora_model", "lora_strength", "guidance_scale"])["clip_score"].mean()


def test_a_search_of_20_trials_finds_the_grid_best_with_a_third_of_its_images(workspace):
    workspace.run(f"sweep={workspace.sweep('everything', FULL_GRID)}", "progress=false", "tracking=none").assert_all_ok()
    search = workspace.cli("run", f"sweep={workspace.sweep('found', SEARCH)}", "progress=false")
    assert search.code == 0, search.err
    assert "Traceback" not in search.err

    objectives = grid_objectives(workspace.outputs / "everything")
    assert len(objectives) == 60
    folder = workspace.outputs / "found"
    trials = pd.read_csv(folder / "search" / "trials.csv")
    assert sorted(trials["trial"]) == list(range(20)) and set(trials["state"]) == {"COMPLETE"}
    summary = json.loads((folder / "search" / "search.json").read_text())
    best = summary["best"]
    assert best["value"] == trials["objective"].max()

    # at most a third of the full grid's images, and every one of them an image the grid made too (same request, same id)
    search_ids = {i for ids in trials["ids"] for i in ids.split()}
    grid_ids = set(pd.read_parquet(workspace.outputs / "everything" / "results.parquet")["id"])
    assert len(search_ids) <= len(grid_ids) / 3 and search_ids <= grid_ids
    assert summary["images_generated"] == len(search_ids) and summary["full_grid"] == {"settings": 60, "images": 60}

    # the best trial's objective is the grid's value of that very setting, and close to the grid's best
    params = best["params"]
    lora = params["lora_model"]
    setting = (lora, format(params[f"lora_strength.{lora}"], "g"), float(params["guidance_scale"]))
    assert best["value"] == pytest.approx(objectives.loc[setting], abs=1e-3)  # CLIP in other batches: float32 noise
    spread = objectives.max() - objectives.min()
    assert objectives.max() - best["value"] <= TOLERANCE * spread, (best, objectives.sort_values().tail(5))
    assert f"best trial {best['trial']}: {OBJECTIVE} = {best['value']:.4f}" in search.out

    # MLflow: a run per trial with its parameters and objective, the best trial tagged on the parent
    parent, children = mlflow_runs(workspace.outputs, "found")
    trial_runs = children[children["tags.lora_sweep.role"] == "trial"]
    made = set(pd.read_parquet(folder / "results.parquet")["id"])  # the trials' images and the budget grid's
    assert len(trial_runs) == 20 and len(children) - len(trial_runs) == len(made) and search_ids <= made
    best_run = trial_runs[trial_runs["tags.lora_sweep.trial"] == str(best["trial"])].iloc[0]
    assert best_run["metrics.objective"] == pytest.approx(best["value"]) and best_run["params.lora_model"] == lora
    assert set(best_run["tags.lora_sweep.image_ids"].split()) == set(best["ids"])
    assert parent["tags.best_trial"].iloc[0] == str(best["trial"]) and parent["tags.best.lora_model"].iloc[0] == lora

    # the grid a person could run with the same budget: at most 20 settings of the space, judged the same way
    versus = summary["grid_at_budget"]
    assert 1 <= versus["settings"] <= 20 and len(versus["values"]) == versus["settings"]
    lora = versus["best"]["params"]["lora_model"]
    cell = (lora, format(versus["best"]["params"][f"lora_strength.{lora}"], "g"), float(versus["best"]["params"]["guidance_scale"]))
    assert versus["best"]["value"] == pytest.approx(objectives.loc[cell], abs=1e-3) == pytest.approx(max(versus["values"]))
    assert f"a grid at the same budget ({versus['settings']} settings) finds {versus['best']['value']:.4f}" in search.out

    # the report shows the answer: the best setting's images, importances and the objective over trials
    html = (folder / "report.html").read_text()
    assert "<h2 id='search'>Search</h2>" in html and f"Best: trial {best['trial']}" in html
    assert f"best {versus['best']['value']:.4f}" in html and f"vs the search's {best['value']:.4f}" in html
    for image_id in best["ids"]:
        assert f"images/{image_id}.png" in html and (folder / "images" / f"{image_id}.png").exists()
    assert summary["importances"] and "search/history.png" in summary["plots"]
    for plot in summary["plots"]:
        assert (folder / plot).stat().st_size > 1000 and plot in html


SMALL = {  # `sampler: grid`: 4 + 2 = 6 settings (a strength is asked only when its LoRA is in the blend), 3 seeds each
    "name": "resumed",
    "base": {"prompt": PROMPT, "width": 64, "height": 64, "num_inference_steps": 6},
    "search": {
        "space": {
            "lora_model": ["sunset", "stripes"],
            "lora_strength.sunset": {"low": 0.25, "high": 1.0, "step": 0.25},
            "lora_strength.stripes": {"low": 0.5, "high": 1.0, "step": 0.5},
        },
        "objective": "clip_score - 0.5 * seed_spread",
        "seeds": [0, 1, 2],
        "trials": 100,  # the grid has 6 settings: 6 trials
        "batch": 2,
        "sampler": "grid",
    },
    "scores": ["clip_score", "seed_spread"],
}


def test_a_killed_search_continues_without_repeating_finished_trials(workspace):
    path = workspace.sweep("resumed", SMALL)
    folder = workspace.outputs / "resumed"
    proc = start_run(workspace, f"sweep={path}", "engine.batch_size=1", "tracking=none")
    wait_for_results(folder, 9, proc)  # the first batch (2 trials x 3 seeds) told, the second under way
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)

    import optuna

    storage = f"sqlite:///{folder / 'study.db'}"
    before = {t.number: t.params for t in optuna.load_study(study_name="resumed", storage=storage).trials if t.state.is_finished()}
    assert len(before) >= 2
    again = workspace.run(f"sweep={path}", "engine.batch_size=1", "tracking=none", "progress=false")  # the same command again
    again.assert_all_ok()
    assert f"continuing: {len(before)} trials done" in again.out
    study = optuna.load_study(study_name="resumed", storage=storage)
    assert [t.number for t in study.trials] == list(range(6)) and all(t.state.name == "COMPLETE" for t in study.trials)
    for number, params in before.items():  # finished trials kept as they were, not asked again
        assert study.trials[number].params == params
        assert not [line for line in again.out.splitlines() if line.startswith(f"trial {number}:")]
    journal = pd.read_json(folder / "results.jsonl", lines=True)
    ok = journal[journal["status"] == "ok"]
    assert ok["id"].is_unique, "no image was made twice"

    # every setting of the grid once; each blend carries only its own LoRA's strength
    trials = pd.read_csv(folder / "search" / "trials.csv")
    assert len(trials) == 6 and trials["objective"].notna().all() and (trials["images"] == 3).all()
    settings = {
        (r["param.lora_model"], r["param.lora_strength.sunset"], r["param.lora_strength.stripes"]) for r in trials.to_dict("records")
    }
    settings = {(m, None if a != a else a, None if b != b else b) for m, a, b in settings}
    sunset = {("sunset", x, None) for x in (0.25, 0.5, 0.75, 1.0)}
    assert settings == sunset | {("stripes", None, 0.5), ("stripes", None, 1.0)}
    plan = pd.read_parquet(folder / "plan.parquet")
    assert len(plan) == 18 and set(plan["lora_strength"]) == {"0.25", "0.5", "0.75", "1"}


def search_refused(ws, body) -> list[str]:
    """The lines `lora-sweep plan` and `run` print as `error: ...` for this sweep file (both check it the same way)."""
    with pytest.raises(UserError) as refused:
        prepare_search_or_fail(ws.config(f"sweep={ws.sweep(body['name'], body)}"))
    return refused.value.lines


def test_bad_search_sections_are_one_line_each_and_nothing_is_generated(workspace, capsys):
    bad = {
        "name": "bad",
        "base": {"prompt": PROMPT, "width": 64, "height": 64},
        "search": {
            "space": {
                "guidance_scael": [3, 9],
                "num_inference_steps": [20, 10],
                "lora_model": ["sunset"],
                "lora_strength.sunset": [0.2, 1],
            },
            "objective": "clip_scor - 0.5 * seed_spread",
        },
        "scores": ["clip_score", "seed_spread"],
    }
    lines = search_refused(workspace, bad)
    assert lines == [
        "search.space.guidance_scael: unknown field 'guidance_scael'; did you mean 'guidance_scale'?",
        "search.space.num_inference_steps: is an empty range (low 20 is not below high 10); give [low, high] with low < high",
        "search.objective: 'clip_scor' is not a score of this sweep; "
        "did you mean 'clip_score'? add it to sweep.scores (now: clip_score, seed_spread)",
    ]
    run = workspace.cli("run", f"sweep={workspace.root / 'sweeps' / 'bad.yaml'}")  # `run` refuses a search the same way
    assert run.code == 2 and "Traceback" not in run.err
    assert run.err_lines == [f"error: {line}" for line in lines]
    assert not (workspace.outputs / "bad" / "images").exists()

    # the ends of a valid-looking space are checked as requests: a size the spec refuses, a scheduler that does not exist
    ends = {
        **bad,
        "search": {"space": {"width": [64, 4096], "scheduler": ["EulerDiscreteScheduler", "EulerScheduler"]}, "objective": "clip_score"},
    }
    lines = search_refused(workspace, ends)
    assert len(lines) == 2, lines
    assert lines[0].startswith("search.space.width: ") and "4096" in lines[0]
    assert lines[1].startswith("search.space.scheduler: ") and "EulerScheduler" in lines[1]

    capsys.readouterr()
    cli.plan_command(workspace.config(f"sweep={workspace.sweep('found', SEARCH)}"))
    out = capsys.readouterr().out
    assert "search 'found': 20 trials (tpe, 4 at a time), maximize clip_score; each trial 1 images" in out
    assert "the full grid of this space at its steps: 60 settings, 60 images" in out
    assert not (workspace.outputs / "found" / "images").exists()


def test_the_search_example_is_checked_by_plan(tmp_path, capsys):
    """sweeps/search.yaml as shipped: the README's example must stay valid."""
    capsys.readouterr()
    cli.plan_command(cli_config(["sweep=search", f"paths.outputs={tmp_path}"]))
    assert "the full grid of this space at its steps: 60 settings, 240 images" in capsys.readouterr().out
