"""Shared fixtures: the tiny model and LoRAs are built once per session and reused by every test.

The helpers they are built from (and that tests import) live in helpers.py, one copy each.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# demo_engine, engine_rows, sweep_images: test_gpu.py imports them from conftest
from helpers import SMALL_SWEEP, Workspace, demo_engine, engine_rows, sweep_images  # noqa: F401

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
LONGEST_FILES = [  # longest first on 2 cores (pytest --durations, 2026-12-02, the whole suite under xdist)
    "test_faults.py",
    "test_serve.py",
    "test_ray.py",
    "test_families.py",
    "test_family_services.py",
    "test_mlflow_server.py",
    "test_compare.py",
    "test_search.py",
    "test_report.py",
    "test_grid_page.py",
    "test_sdxl.py",
    "test_remote.py",
    "test_human_ranking.py",
    "test_human_search.py",
    "test_lycoris_dit.py",
    "test_world.py",
    "test_reproduce.py",
    "test_models.py",
    "test_lora_files.py",
    "test_run.py",
    "test_prompts.py",
    "test_checkpoints.py",
    "test_flux_lora_formats.py",
    "test_engine_features.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


@pytest.fixture(scope="session")
def assets_dir(tmp_path_factory) -> Path:
    from runner.world.assets import ensure_demo_assets

    return ensure_demo_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture
def workspace(tmp_path, assets_dir) -> Workspace:
    return Workspace(tmp_path, assets_dir)


@pytest.fixture
def small_sweep(workspace) -> Path:
    """8 images: 2 blends x 2 strengths x 2 seeds at 64x64, 4 steps."""
    return workspace.sweep("small", SMALL_SWEEP)


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


@pytest.fixture(scope="session")
def family_world(tmp_path_factory):
    """Tiny models of every family (runner/families.py) with two LoRAs each, built on first use (tests/family_world.py)."""
    import torch
    from family_world import FamilyWorld

    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and two xdist workers share the cores
    return FamilyWorld(tmp_path_factory.mktemp("family-world"))
