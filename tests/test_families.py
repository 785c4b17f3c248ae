"""The family table (runner/families.py): every family's tiny diffusers folder is recognised, the plan names each
model's family, and a family the engine cannot run yet is one line before anything loads."""

from __future__ import annotations

import io

import pytest

from runner.cli import compose_config
from runner.families import FAMILIES, RUNNABLE, family_of_pipeline
from runner.prepare import describe_plan, prepare_sweep
from runner.registry import folder_family
from tests.tiny_families import FAMILIES as TINY
from tests.tiny_families import build_tiny_family

# one tiny folder per pipeline class (the dev/schnell, Klein distilled and SD3.5 variants share their class's family)
TINY_OF = {"flux": "flux-dev", "flux2": "flux2", "flux2-klein": "flux2-klein", "qwen-image": "qwen-image", "z-image": "z-image"}
TINY_OF |= {"sd3": "sd3", "chroma": "chroma"}


def test_the_table_names_a_real_pipeline_for_every_family_and_tiny_folders_cover_the_new_ones():
    import diffusers

    for family in FAMILIES.values():
        assert hasattr(diffusers, family.pipeline), family.pipeline
        assert family_of_pipeline(family.pipeline) is family
        assert family.size_multiple in (8, 16)
    assert set(TINY_OF) == set(FAMILIES) - set(RUNNABLE)
    assert all(TINY[t].class_name == FAMILIES[f].pipeline for f, t in TINY_OF.items())


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: build_tiny_family(tiny, root / tiny) for family, tiny in TINY_OF.items()}


@pytest.mark.parametrize("family", sorted(TINY_OF))
def test_a_family_folder_is_recognised_and_refused_in_one_line_before_anything_loads(family, tiny_folders, tmp_path):
    folder = tiny_folders[family]
    assert folder_family(folder) == family
    cfg = compose_config([f"paths.outputs={tmp_path}", "tracking=none", f"+models.mine={{source: '{folder}'}}", "model.id=mine"])
    prepared = prepare_sweep(cfg)
    lines = [p for p in prepared.problems if p.startswith("models.mine")]
    assert lines == [
        f"models.mine: is a {FAMILIES[family].label} model ({FAMILIES[family].pipeline}), which this version cannot run yet; "
        "use a model of SD 1.x/2.x, SDXL"
    ]
    assert not (tmp_path / "demo" / "images").exists()


def test_the_plan_says_which_family_each_model_is(tmp_path):
    cfg = compose_config([f"paths.outputs={tmp_path}", "tracking=none"])
    from runner.run import prepare_with_assets

    prepared = prepare_with_assets(cfg)
    out = io.StringIO()
    describe_plan(prepared, out)
    assert "models: tiny-sd (SD 1.x/2.x)" in out.getvalue().splitlines()
