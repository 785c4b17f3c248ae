"""`lora-sweep reproduce ID`: one image regenerated from its record alone (the results row or an MLflow run), with the
stored pixels; refused in one line when a file it was made with changed."""

from __future__ import annotations

import io
import shutil

import pandas as pd
import pytest
from helpers import mlflow_runs

from runner.cli import compose_config
from runner.folder_commands import reproduce

pytestmark = pytest.mark.slow

PROMPT = "a red circle on a blue background"


def test_reproduce_an_image_by_id_and_by_mlflow_run_id(workspace):
    """The two seeds of a cell run as one batch of 2; an image of it comes back identical, regenerated in its batch."""
    sweep = {
        "name": "again",
        "base": {"prompt": PROMPT, "width": 64, "height": 64, "num_inference_steps": 2, "lora_model": "sunset", "lora_strength": 0.5},
        "grid": {"seed": [1, 2]},
    }
    workspace.run(f"sweep={workspace.sweep('again', sweep)}", "tracking=sqlite").assert_all_ok()  # the record, made in this process
    results = pd.read_parquet(workspace.outputs / "again" / "results.parquet")
    assert list(results["batch_size"]) == [2, 2], "the batch is what reproduce has to regenerate"
    image_id = results["id"].iloc[1]
    by_id = workspace.cli("reproduce", image_id)
    assert by_id.code == 0, by_id.err
    assert by_id.out.startswith("identical: "), by_id.out
    _, children = mlflow_runs(workspace.outputs, "again")
    run_id = children.set_index("tags.lora_sweep.id").loc[image_id, "run_id"]
    out = io.StringIO()  # by run id, in this process: what `lora-sweep reproduce RUN_ID` calls (exit 0 when True)
    assert reproduce(run_id, [], compose_config(workspace.paths), out) is True, out.getvalue()
    assert "identical: " in out.getvalue()
    unknown = workspace.cli("reproduce", "0123456789abcdef")
    assert unknown.code == 2 and unknown.err_lines[-1].startswith("error: reproduce:") and "Traceback" not in unknown.err


def test_reproduce_refuses_when_a_lora_file_changed(workspace):
    own = workspace.root / "mine.safetensors"
    shutil.copy(workspace.assets / "loras" / "sunset.safetensors", own)
    base = {"prompt": PROMPT, "width": 64, "height": 64, "num_inference_steps": 2, "seed": 1, "lora_model": "mine"}
    sweep = {"name": "one", "base": base}
    workspace.run(f"sweep={workspace.sweep('one', sweep)}", f"+loras.mine={{source: {own}}}", "tracking=none").assert_all_ok()
    image_id = pd.read_parquet(workspace.outputs / "one" / "results.parquet")["id"].iloc[0]
    shutil.copy(workspace.assets / "loras" / "star.safetensors", own)
    again = workspace.cli("reproduce", image_id)
    assert again.code == 2 and "Traceback" not in again.err
    assert len(again.err_lines) == 1 and again.err_lines[0].startswith("error: loras.mine: "), again.err
    assert "has changed since the image was made" in again.err
