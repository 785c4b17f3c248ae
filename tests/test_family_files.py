"""DiT models as users hold them: one transformer file in its original layout or as GGUF, the rest from a `config:`
folder; run through a sweep, checked against the same tiny model as a diffusers folder."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import sweep_images
from single_file_tools import flux_to_original, flux_width_patch, write_gguf, z_image_to_original

from runner.prepare import describe_plan, prepare_sweep

pytest.importorskip("gguf")

SWEEP = {
    "base": {"prompt": "a red circle on a blue background", "width": 64, "height": 64, "num_inference_steps": 2},
    "grid": {"lora_model": ["", "a"], "seed": [1, 2]},
}


def transformer_state(model):
    import diffusers

    return diffusers.DiffusionPipeline.from_pretrained(model.folder).transformer.state_dict()


def run_pair(workspace, model, file_entry: str, *extra: str):
    """The sweep on the diffusers folder and on the file entry: (rows and pixels of the folder, of the file)."""
    path = workspace.sweep("files", SWEEP)
    workspace.run(f"sweep={path}", "sweep.name=folder", "tracking=none", *model.overrides).assert_all_ok()
    file_model = [o for o in model.overrides if not o.startswith("+models.m=")] + [f"+models.m={file_entry}"]
    result = workspace.run(f"sweep={path}", "sweep.name=file", "tracking=none", *file_model, *extra)
    result.assert_all_ok()
    return sweep_images(workspace.outputs, "folder"), sweep_images(workspace.outputs, "file"), result


def by_request(rows):
    return {(r["lora_model"], r["seed"]): r["id"] for _, r in rows.iterrows()}


def test_a_flux_transformer_file_in_bfl_layout_runs_as_its_folder_does(family_world, workspace, tmp_path):
    """flux1-dev.safetensors-style file + the folder's other parts: the same pixels (other ids: another file hash)."""
    from safetensors.torch import save_file

    model = family_world.get("flux")
    file = tmp_path / "flux1-tiny.safetensors"
    save_file(flux_to_original(transformer_state(model), prefix="model.diffusion_model."), str(file))
    entry = f"{{source: '{file}', config: '{model.folder}'}}"
    with flux_width_patch():  # diffusers' Flux converter assumes the released width (3072); the tiny model is narrower
        (folder_rows, folder_px), (file_rows, file_px), result = run_pair(workspace, model, entry)
    assert "models: m (Flux.1)" in result.out
    ids, file_ids = by_request(folder_rows), by_request(file_rows)
    assert set(ids.values()).isdisjoint(file_ids.values())
    for key, image_id in ids.items():
        assert np.array_equal(folder_px(image_id), file_px(file_ids[key]))


def test_a_z_image_transformer_file_in_its_original_layout_runs_as_its_folder_does(family_world, workspace, tmp_path):
    from safetensors.torch import save_file

    model = family_world.get("z-image")
    file = tmp_path / "z-image-tiny.safetensors"
    save_file(z_image_to_original(transformer_state(model)), str(file))
    (folder_rows, folder_px), (file_rows, file_px), _ = run_pair(workspace, model, f"{{source: '{file}', config: '{model.folder}'}}")
    ids, file_ids = by_request(folder_rows), by_request(file_rows)
    for key, image_id in ids.items():
        assert np.array_equal(folder_px(image_id), file_px(file_ids[key]))


def test_a_gguf_transformer_runs_quantized_with_its_loras_unfused_and_says_so(family_world, workspace, tmp_path, caplog):
    """Qwen-Image Q8_0 (city96's layout = diffusers' names): within a pixel level of the float model; the quantization
    is in each image's meta and the sweep's log says once that the LoRAs ran unfused."""
    model = family_world.get("qwen-image")
    file = tmp_path / "qwen-image-tiny-Q8_0.gguf"
    write_gguf(transformer_state(model), file, arch="qwen_image", qtype="Q8_0", small=0)
    entry = f"{{source: '{file}', config: '{model.folder}'}}"
    (folder_rows, folder_px), (file_rows, file_px), result = run_pair(workspace, model, entry)
    assert "models: m (Qwen-Image)" in result.out
    assert set(file_rows["meta.quantization"]) == {"gguf:Q8_0"}
    assert set(file_rows.loc[file_rows["lora_model"] == "a", "meta.lora_mode"]) == {"unfused"}
    assert set(folder_rows.loc[folder_rows["lora_model"] == "a", "meta.lora_mode"]) == {"fused"}
    ids, file_ids = by_request(folder_rows), by_request(file_rows)
    for key, image_id in ids.items():
        assert np.abs(folder_px(image_id) - file_px(file_ids[key])).max() <= 1  # Q8_0 vs float32: ~1e-4 measured
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sum("quantized weights (gguf:Q8_0): its LoRAs run unfused" in m for m in said) == 1, said


def test_model_files_that_cannot_run_are_one_line_before_anything_loads(family_world, workspace, tmp_path):
    import io

    import torch
    from safetensors.torch import save_file

    flux, qwen = family_world.get("flux"), family_world.get("qwen-image")
    unknown = tmp_path / "llama.gguf"
    write_gguf({"blk.0.attn_q.weight": torch.zeros(32, 32)}, unknown, arch="llama", qtype="F16")
    flux_file = tmp_path / "flux1.safetensors"
    save_file(flux_to_original(transformer_state(flux)), str(flux_file))
    path = workspace.sweep("bad", {"base": {"prompt": "a red circle", "width": 64, "height": 64}})
    cases = {
        f"{{source: '{unknown}', config: '{qwen.folder}'}}": "models.m.source: llama.gguf cannot be read as a checkpoint: its tensors "
        "are of no family this version knows (architecture llama); use a checkpoint of a family README lists",
        f"{{source: '{flux_file}', config: '{qwen.folder}'}}": f"models.m.config: flux1.safetensors is a Flux.1 transformer but "
        f"{qwen.folder} is a Qwen-Image pipeline; set config to a Flux.1 diffusers folder",
    }
    for entry, line in cases.items():
        prepared = prepare_sweep(workspace.config(f"sweep={path}", "tracking=none", f"+models.m={entry}", "model.id=m"))
        assert prepared.problems == [line]
    prepared = prepare_sweep(workspace.config(f"sweep={path}", "tracking=none", f"+models.m={{source: '{flux_file}'}}", "model.id=m"))
    assert prepared.problems == [
        "models.m.config: the single-file checkpoint needs the configs of 'black-forest-labs/FLUX.1-dev', which are not on disk "
        "(nothing is downloaded); pre-download its configs: "
        "huggingface-cli download black-forest-labs/FLUX.1-dev --include '*.json' '*.txt'"
    ]
    out = io.StringIO()
    good = prepare_sweep(
        workspace.config(f"sweep={path}", "tracking=none", f"+models.m={{source: '{flux_file}', config: '{flux.folder}'}}", "model.id=m")
    )
    describe_plan(good, out)
    assert good.ok and "models: m (Flux.1)" in out.getvalue()
