"""Every scheduler the local engine accepts really generates; clip_skip and scheduler options take effect."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from runner.schedulers import GENERATORS, NOT_GENERATORS, SPEC_SCHEDULERS

pytestmark = pytest.mark.slow


def test_the_spec_lists_18_schedulers_and_refuses_exactly_four():
    assert len(SPEC_SCHEDULERS) == 18
    assert set(NOT_GENERATORS) == {"DDIMInverseScheduler", "IPNDMScheduler", "KarrasVeScheduler", "ScoreSdeVeScheduler"}


def test_every_generator_scheduler_runs_on_the_tiny_model(workspace):
    sweep = {
        "name": "schedulers",
        "base": {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 4, "seed": 5},
        "grid": {"scheduler": list(GENERATORS), "use_karras_sigmas": [False, True]},
    }
    result = workspace.run(f"sweep={workspace.sweep('schedulers', sweep)}", "tracking=none")
    result.assert_all_ok()
    assert result.out.count("LCMScheduler without LCM weights") == 1, result.out  # warned once, run anyway
    results = pd.read_parquet(workspace.outputs / "schedulers" / "results.parquet")
    plan = pd.read_parquet(workspace.outputs / "schedulers" / "plan.parquet").set_index("id")
    assert len(results) == 2 * len(GENERATORS) and set(results["status"]) == {"ok"}
    assert set(results["scheduler"]) == set(GENERATORS)
    arrays = {}
    for row in results.to_dict("records"):
        key = (plan.loc[row["id"], "scheduler"], bool(plan.loc[row["id"], "use_karras_sigmas"]))
        arrays[key] = np.asarray(Image.open(workspace.outputs / "schedulers" / row["file"]), dtype=np.int16)
    assert np.abs(arrays[("EulerDiscreteScheduler", False)] - arrays[("DDIMScheduler", False)]).mean() > 0.5
    karras_differs = [n for n in GENERATORS if np.abs(arrays[(n, False)] - arrays[(n, True)]).mean() > 0.5]
    assert "EulerDiscreteScheduler" in karras_differs and "DPMSolverMultistepScheduler" in karras_differs
    ddim_karras = results[results["id"].map(lambda i: plan.loc[i, "scheduler"] == "DDIMScheduler" and plan.loc[i, "use_karras_sigmas"])]
    assert ddim_karras["notes"].str.contains("use_karras_sigmas not applied: DDIMScheduler has no such option").all()


def test_clip_skip_changes_the_image(workspace):
    sweep = {
        "name": "clip",
        "base": {"prompt": "a fox in the snow", "width": 64, "height": 64, "num_inference_steps": 4, "seed": 5},
        "grid": {"clip_skip": [1, 2, 8]},
    }
    workspace.run(f"sweep={workspace.sweep('clip', sweep)}", "tracking=none").assert_all_ok()
    plan = pd.read_parquet(workspace.outputs / "clip" / "plan.parquet")
    images = [np.asarray(Image.open(workspace.outputs / "clip" / "images" / f"{i}.png"), dtype=np.int16) for i in plan["id"]]
    assert np.abs(images[0] - images[1]).mean() > 0.5 and np.abs(images[1] - images[2]).mean() > 0.5
