"""Shared fixtures: the tiny model and LoRAs are built once per session and reused by every test."""

from __future__ import annotations

import os
import shutil
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
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if XDIST_WORKERS > 1:
    # The cores shared out between xdist workers, for their torch and the CLIs they start (which inherit the
    # variable): with every process taking a thread per core, OpenMP's spinning threads fought over the cores
    # (the whole suite on 2 cores: 13:50 -> 10:28).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // XDIST_WORKERS)))


# The files that take longest on 2 cores, longest first (pytest --durations=0). xdist's loadfile mode hands files to
# its two workers in collection order (with --no-loadscope-reorder, pyproject.toml): started first, they no longer
# leave one worker running a long file alone at the end. A stale list costs minutes, never correctness.
LONGEST_FILES = [  # seconds on 2 cores, 2026-11-30: 220, 138, 130, 123, 86, 81, 74, 61, 61, 52, 44, 36
    "test_faults.py",
    "test_ray.py",
    "test_report.py",
    "test_serve.py",
    "test_validation_cli.py",
    "test_search.py",
    "test_run.py",
    "test_remote.py",
    "test_models.py",
    "test_sdxl.py",
    "test_mlflow_server.py",
    "test_world.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


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
    from runner.world.assets import ensure_demo_assets

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
        "lora_model": ["sunset", "sunset,stripes"],
        "lora_strength": [0.5, 1.0],
        "seed": [1, 2],
    },
    "report": {"grid": {"x": "lora_strength", "y": "lora_model"}},
}


@pytest.fixture
def small_sweep(workspace) -> Path:
    """8 images: 2 blends x 2 strengths x 2 seeds at 64x64, 4 steps."""
    return workspace.sweep("small", SMALL_SWEEP)


def fake_hub_cache(root, repo_id, folder):
    """The Hugging Face cache layout (refs/main -> snapshots/<commit>/...) holding `folder`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def sweep_images(outputs: Path, sweep: str):
    """The sweep's results (ok rows) joined with their plan rows, and a function giving an image's pixels."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    folder = outputs / sweep
    results = pd.read_parquet(folder / "results.parquet")
    plan = pd.read_parquet(folder / "plan.parquet").drop(columns=["seed", "notes"], errors="ignore")
    rows = plan.merge(results, on="id")
    rows = rows.astype(object).where(rows.notna(), None)  # None, not NaN, where a request field is unset

    def pixels(image_id: str):
        with Image.open(folder / "images" / f"{image_id}.png") as image:
            return np.asarray(image.convert("RGB"), dtype=np.int16)

    return rows, pixels


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory) -> Path:
    """A tiny SDXL pipeline folder and single file, an SDXL LoRA (UNet + te1 + te2), a te2-only cut of it, SDXL embeddings."""
    import torch
    from ldm_layout import sdxl_pipeline_to_ldm
    from safetensors.torch import load_file, save_file
    from tiny_models import build_tiny_sdxl, save_sdxl_lora

    root = tmp_path_factory.mktemp("sdxl")
    pipe = build_tiny_sdxl()
    pipe.save_pretrained(root / "tiny-xl")
    save_file(sdxl_pipeline_to_ldm(pipe), str(root / "tiny-xl.safetensors"))  # the same model as one A1111-layout file
    save_sdxl_lora(pipe, root / "xl_lora.safetensors", seed=5)
    tensors = load_file(str(root / "xl_lora.safetensors"))
    save_file({k: v for k, v in tensors.items() if k.startswith("text_encoder_2.")}, str(root / "xl_te2_only.safetensors"))
    generator = torch.Generator().manual_seed(9)
    save_file(
        {"clip_l": torch.randn(2, 32, generator=generator), "clip_g": torch.randn(2, 48, generator=generator)},
        str(root / "xl_emb.safetensors"),
    )
    return root


def demo_engine(assets: Path, device: str = "cpu", **settings):
    """A LocalEngine over the demo's model and LoRAs, for tests of the engine interface itself."""
    from runner.engines.local import LocalEngine
    from runner.registry import HashCache, Registry, resolve_lora, resolve_model

    cache = HashCache(None)
    model, problem = resolve_model("tiny-sd", {"source": str(assets / "tiny-sd")}, cache)
    assert problem is None, problem
    loras = {}
    for name in ("sunset", "stripes", "star"):
        loras[name], problem = resolve_lora(name, str(assets / "loras" / f"{name}.safetensors"), None, cache)
        assert problem is None, problem
    if device == "cpu":
        settings.setdefault("dtype", "float32")
    return LocalEngine(registry=Registry(models={"tiny-sd": model}, loras=loras), device=device, **settings)


def engine_rows(blends: list[tuple[str, str]], seeds: list[int], size: int = 64, steps: int = 4):
    """Plan rows as the engine receives them (validated columns included): each blend x each seed."""
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "id": f"{blend}@{strength}#{seed}",
                "model_id": "tiny-sd",
                "prompt": "a red circle on a blue background",
                "negative_prompt": "",
                "width": size,
                "height": size,
                "num_inference_steps": steps,
                "guidance_scale": 7.5,
                "seed": seed,
                "lora_model": blend,
                "lora_strength": strength,
                "scheduler_used": "EulerDiscreteScheduler",
                "use_karras_sigmas": False,
                "algorithm_type": None,
                "clip_skip": 1,
                "vae": None,
                "embeddings_model": None,
                "pipeline_used": "text2img",
                "upscale": False,
            }
            for blend, strength in blends
            for seed in seeds
        ]
    )
