"""Where models come from: a diffusers folder, or a hub id already in the local cache (never downloaded)."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

pytestmark = pytest.mark.slow


def fake_hub_cache(root, repo_id, folder):
    """The Hugging Face cache layout (refs/main -> snapshots/<commit>/...) holding `folder`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_in_the_local_cache_loads_offline(workspace, small_sweep):
    cache = workspace.root / "hf-cache"
    fake_hub_cache(cache, "lora-sweep/tiny-sd", workspace.assets / "tiny-sd")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    overrides = ["+models.hub-tiny={source: lora-sweep/tiny-sd}", "model.id=hub-tiny", "sweep.grid.seed=[1]", "tracking=none"]
    result = workspace.cli("run", f"sweep={small_sweep}", *overrides, env=env)
    assert result.code == 0, result.err
    results = pd.read_parquet(workspace.outputs / "small" / "results.parquet")
    assert len(results) == 4 and set(results["status"]) == {"ok"}


def test_hub_id_not_in_the_cache_is_one_line_with_the_download_command(workspace, small_sweep):
    env = {"HF_HUB_CACHE": str(workspace.root / "empty-cache"), "HF_HUB_OFFLINE": "1"}
    result = workspace.cli("plan", f"sweep={small_sweep}", "+models.sd15={source: someone/not-cached}", "model.id=sd15", env=env)
    assert result.code == 2
    assert result.err_lines == [
        "error: models.sd15.source: hub model 'someone/not-cached' is not in the local Hugging Face cache "
        "(nothing is downloaded at run time); pre-download it with: huggingface-cli download someone/not-cached"
    ]


def test_file_hashes_are_cached_by_path_size_and_mtime(workspace, small_sweep):
    import os

    own = workspace.root / "mine.safetensors"
    shutil.copy(workspace.assets / "loras" / "ganyu.safetensors", own)
    overrides = [f"+loras.mine={{source: {own}}}", "sweep.grid.lora_model=[mine]", "sweep.grid.seed=[1]"]

    def ids():
        result = workspace.cli("plan", f"sweep={small_sweep}", *overrides)
        assert result.code == 0, result.err
        return sorted(pd.read_parquet(workspace.outputs / "small" / "plan-preview.parquet")["id"])

    first = ids()
    stat = own.stat()
    replacement = (workspace.assets / "loras" / "watercolor.safetensors").read_bytes()
    assert len(replacement) == stat.st_size
    own.write_bytes(replacement)
    os.utime(own, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same path, size and mtime: the cached hash is used
    assert ids() == first, "a 2 GB checkpoint is not re-hashed on every run"
    os.utime(own)  # a new mtime: hashed again, and the new content gives new ids
    assert ids() != first
