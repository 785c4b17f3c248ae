"""Shared fixtures: the tiny model and LoRAs are built once per session and reused by every test."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> CliResult:
    """Run `lora-sweep ARGS` as a user would: a separate process, its exit code, stdout and stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "runner.cli", *args],
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def assets_dir(tmp_path_factory) -> Path:
    from runner.assets import ensure_demo_assets

    return ensure_demo_assets(tmp_path_factory.mktemp("assets"))


@dataclass
class Workspace:
    """A temp project directory with its own outputs/ and sweeps/, sharing the session's assets."""

    root: Path
    assets: Path

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    def sweep(self, name: str, body: str | dict) -> Path:
        path = self.root / "sweeps" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(body, sort_keys=False) if isinstance(body, dict) else textwrap.dedent(body))
        return path

    def cli(self, command: str, *overrides: str, env: dict[str, str] | None = None, timeout: float = 300) -> CliResult:
        base = [f"paths.outputs={self.outputs}", f"paths.assets={self.assets}"]
        return run_cli(command, *base, *overrides, cwd=self.root, env=env, timeout=timeout)


@pytest.fixture
def workspace(tmp_path, assets_dir) -> Workspace:
    return Workspace(tmp_path, assets_dir)


SMALL_SWEEP = {
    "name": "small",
    "base": {"prompt": "a red fox", "negative_prompt": "blurry", "width": 64, "height": 64, "num_inference_steps": 4},
    "grid": {
        "lora_model": ["ganyu", "ganyu,more_details"],
        "lora_strength": [0.5, 1.0],
        "seed": [1, 2],
    },
    "report": {"grid": {"x": "lora_strength", "y": "lora_model"}},
}


@pytest.fixture
def small_sweep(workspace) -> Path:
    """8 images: 2 blends x 2 strengths x 2 seeds at 64x64, 4 steps."""
    return workspace.sweep("small", SMALL_SWEEP)
