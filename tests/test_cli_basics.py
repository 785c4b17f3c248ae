"""The CLI surface: usage, help, composed config, overrides, sweep lookup, and `plan` staying free of torch."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from runner import cli
from runner.prepare import prepare_sweep


def test_no_arguments_prints_usage(capsys):
    cli.main([])  # returns: exit code 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lora-sweep COMMAND")
    for command in ("run", "plan", "sync", "score", "report", "reproduce", "serve"):
        assert f"\n  {command} " in out, command


def test_run_help_lists_config_groups(workspace):
    result = workspace.cli("run", "--help")
    assert result.code == 0, result.err
    section = result.out.split("Config groups (choose with GROUP=OPTION):\n", 1)[1].split("\n\n", 1)[0]
    groups = {group: set(options.split(", ")) for group, options in (line.split(": ", 1) for line in section.splitlines())}
    assert set(groups) == {"engine", "model", "scores", "sweep", "tracking"}, section
    assert groups["engine"] == {"local", "remote"} and groups["tracking"] == {"none", "sqlite"}
    assert {"demo", "blends", "search"} <= groups["sweep"]
    assert "sweep=NAME" in result.out


def test_cfg_job_prints_composed_config_with_overrides(workspace, small_sweep):
    result = workspace.cli("run", f"sweep={small_sweep}", "sweep.base.guidance_scale=5", "engine.batch_size=2", "--cfg", "job")
    assert result.code == 0, result.err
    assert "guidance_scale: 5" in result.out
    assert "batch_size: 2" in result.out
    assert "name: small" in result.out
    assert not (workspace.outputs / "small" / "images").exists(), "--cfg job must not run the sweep"


@pytest.fixture
def restored_environ():
    """main() sets its environment defaults (LORA_SWEEP_ARGV, MLflow's retries...) in this process: undone after."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_unknown_command_suggests(capsys, restored_environ):
    with pytest.raises(SystemExit) as exited:
        cli.main(["pln"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["error: unknown command 'pln'; did you mean 'plan'?"]


def test_plan_writes_plan_and_does_not_import_torch(workspace):
    code = (
        "import sys; from runner.cli import main; "
        f"main(['plan', 'paths.outputs={workspace.outputs}', 'paths.assets={workspace.assets}']); "
        "assert 'torch' not in sys.modules, 'plan imported torch'; "
        "assert 'diffusers' not in sys.modules, 'plan imported diffusers'"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=workspace.root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "plan 'demo': 104 images, 4 distinct blends" in proc.stdout
    plan = pd.read_parquet(workspace.outputs / "demo" / "plan-preview.parquet")
    assert len(plan) == 104 and plan["id"].is_unique
    assert (workspace.outputs / "demo" / "plan-preview.csv").exists()


def test_sweep_selected_by_name_from_cwd_sweeps(workspace, small_sweep, monkeypatch):
    monkeypatch.chdir(workspace.root)
    prepared = prepare_sweep(workspace.config("sweep=small"))
    assert prepared.name == "small" and len(prepared.plan) == 8 and prepared.plan["blend"].str.startswith("sunset").all()


def test_hydra_multirun_plans_several_sweeps(workspace, small_sweep):
    result = workspace.cli("plan", "-m", "sweep=demo,small")
    assert result.code == 0, result.err
    assert "plan 'demo': 104 images" in result.out and "plan 'small': 8 images" in result.out
    assert (workspace.outputs / "demo" / "plan-preview.parquet").exists()
    assert (workspace.outputs / "small" / "plan-preview.parquet").exists()


def test_a_sweep_in_the_working_directory_wins_over_the_projects(workspace, monkeypatch):
    workspace.sweep("demo", {"name": "demo", "base": {"prompt": "mine", "width": 64, "height": 64}, "grid": {"seed": [1, 2]}})
    monkeypatch.chdir(workspace.root)
    prepared = prepare_sweep(workspace.config("sweep=demo"))
    assert list(prepared.plan["prompt"]) == ["mine", "mine"]
