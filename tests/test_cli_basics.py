"""The CLI surface: help, composed config, overrides, and `plan` staying free of torch."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd

from tests.conftest import run_cli


def test_no_arguments_prints_usage(tmp_path):
    result = run_cli(cwd=tmp_path)
    assert result.code == 0
    assert "lora-sweep run" in result.out and "plan" in result.out and "report" in result.out


def test_run_help_lists_config_groups(workspace):
    result = workspace.cli("run", "--help")
    assert result.code == 0, result.err
    for group in ("model", "engine", "tracking", "sweep"):
        assert f"{group}:" in result.out or f"{group}/" in result.out or group in result.out
    assert "sweep=NAME" in result.out


def test_cfg_job_prints_composed_config_with_overrides(workspace, small_sweep):
    result = workspace.cli("run", f"sweep={small_sweep}", "sweep.base.guidance_scale=5", "engine.batch_size=2", "--cfg", "job")
    assert result.code == 0, result.err
    assert "guidance_scale: 5" in result.out
    assert "batch_size: 2" in result.out
    assert "name: small" in result.out
    assert not (workspace.outputs / "small" / "images").exists(), "--cfg job must not run the sweep"


def test_unknown_command_suggests(tmp_path):
    result = run_cli("pln", cwd=tmp_path)
    assert result.code == 2
    assert "did you mean 'plan'" in result.err


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


def test_sweep_selected_by_name_from_cwd_sweeps(workspace, small_sweep):
    result = workspace.cli("plan", "sweep=small")
    assert result.code == 0, result.err
    assert "plan 'small': 8 images, 2 distinct blends" in result.out


def test_unknown_sweep_name_suggests(workspace, small_sweep):
    result = workspace.cli("plan", "sweep=smal")
    assert result.code == 2
    assert result.err_lines == [line for line in result.err_lines if line.startswith("error:")]
    assert "did you mean 'small'" in result.err


def test_hydra_multirun_plans_several_sweeps(workspace, small_sweep):
    result = workspace.cli("plan", "-m", "sweep=demo,small")
    assert result.code == 0, result.err
    assert "plan 'demo': 104 images" in result.out and "plan 'small': 8 images" in result.out
    assert (workspace.outputs / "demo" / "plan-preview.parquet").exists()
    assert (workspace.outputs / "small" / "plan-preview.parquet").exists()


def test_a_sweep_in_the_working_directory_wins_over_the_projects(workspace):
    workspace.sweep("demo", {"name": "demo", "base": {"prompt": "mine", "width": 64, "height": 64}, "grid": {"seed": [1, 2]}})
    result = workspace.cli("plan", "sweep=demo")
    assert result.code == 0, result.err
    assert "plan 'demo': 2 images" in result.out
