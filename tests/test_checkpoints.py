"""A LoRA training run as one registry entry: its checkpoints as an axis, in training order, new ones generated
alone on a rerun; trigger words from the entry or the file's metadata, where `{trigger}` says or prepended."""

from __future__ import annotations

import io

import pytest
from safetensors.torch import load_file, save_file

from runner.prepare import describe_plan, prepare_sweep

BASE = {"prompt": "a red circle on a blue background", "width": 64, "height": 64, "num_inference_steps": 4, "seed": 3}


def kohya_run(folder, assets, epochs=(1, 2, 3, 4), trigger: str | None = None):
    """A kohya-like output folder: mine-00000N.safetensors, the demo's sunset LoRA grown with the epoch, ss_* metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(assets / "loras" / "sunset.safetensors"))
    for epoch in epochs:
        metadata = {
            "ss_epoch": str(epoch),
            "ss_steps": str(250 * epoch),
            "ss_network_dim": "4",
            "ss_network_alpha": "1",
            "ss_tag_frequency": '{"10_sks": {"sks style": 12, "red circle": 30, "blue": 3}}',
            "ss_base_model_version": "sd_v1",
            "ss_network_module": "networks.lora",
            "ss_resolution": "(512, 512)",
        }
        if trigger:
            metadata["modelspec.trigger_phrase"] = trigger
        scaled = {k: (v * (0.4 + 0.2 * epoch) if ".lora_up." in k or "lora_B" in k else v) for k, v in tensors.items()}
        save_file(scaled, str(folder / f"mine-{epoch:06d}.safetensors"), metadata=metadata)
    return folder


def test_a_training_run_is_an_axis_of_its_checkpoints_in_training_order(workspace, tmp_path):
    run = kohya_run(tmp_path / "out", workspace.assets, epochs=(3, 1, 4, 2))
    path = workspace.sweep("ckpt", {"base": BASE, "grid": {"lora_model": {"checkpoints": "mine"}, "lora_strength": [0.5, 1.0]}})
    prepared = prepare_sweep(workspace.config(f"sweep={path}", "tracking=none", f"+loras.mine={{source: '{run}'}}"))
    assert prepared.ok, prepared.problems
    assert list(dict.fromkeys(prepared.plan["lora_model"])) == ["mine@e1", "mine@e2", "mine@e3", "mine@e4"]
    assert sorted(set(prepared.plan["checkpoint_step"])) == [250, 500, 750, 1000]
    out = io.StringIO()
    describe_plan(prepared, out)
    assert "checkpoints: mine: 4 found (mine@e1, mine@e2, mine@e3, mine@e4)" in out.getvalue()
    assert "lora mine@e4: kohya, sd_v1, LoRA rank 4 alpha 1, epoch 4, step 1000, 512x512" in out.getvalue().splitlines()
    assert "  its captions' most frequent tags (trigger: suggestions, not applied): red circle, sks style, blue" in out.getvalue()
    thinned = {"lora_model": {"checkpoints": "mine", "last": 2}}
    path = workspace.sweep("last", {"base": BASE, "grid": thinned})
    last = prepare_sweep(workspace.config(f"sweep={path}", "tracking=none", f"+loras.mine={{source: '{run}/mine-*.safetensors'}}"))
    assert list(last.plan["lora_model"]) == ["mine@e3", "mine@e4"], "a glob works as a folder does; last: 2 keeps the last two"


def test_a_checkpoint_added_later_generates_only_its_images(workspace, tmp_path):
    run = kohya_run(tmp_path / "out", workspace.assets, epochs=(1, 2))
    path = workspace.sweep("grow", {"base": BASE, "grid": {"lora_model": {"checkpoints": "mine"}, "seed": [1, 2]}})
    entry = f"+loras.mine={{source: '{run}'}}"
    first = workspace.run(f"sweep={path}", "sweep.name=grow", "tracking=none", entry)
    first.assert_all_ok()
    assert first.summary.ok == 4
    kohya_run(run, workspace.assets, epochs=(3,))  # training went on
    second = workspace.run(f"sweep={path}", "sweep.name=grow", "tracking=none", entry)
    second.assert_all_ok()
    assert (second.summary.ok, second.summary.skipped) == (2, 4)


def test_an_unknown_run_is_one_line(workspace, tmp_path):
    run = kohya_run(tmp_path / "out", workspace.assets, epochs=(1, 2))
    path = workspace.sweep("bad", {"base": BASE, "grid": {"lora_model": {"checkpoints": "mnie"}}})
    prepared = prepare_sweep(workspace.config(f"sweep={path}", "tracking=none", f"+loras.mine={{source: '{run}'}}"))
    assert prepared.problems == ["sweep.grid.lora_model.checkpoints: 'mnie' is not a LoRA entry of checkpoints; did you mean 'mine'?"]


@pytest.mark.parametrize(
    "prompt, mode, expected",
    [
        ("a red circle on a blue background", "prepend", "sks style, a red circle on a blue background"),
        ("a {trigger} red circle", "prepend", "a sks style red circle"),
        ("a {trigger} red circle", "none", "a sks style red circle"),
        ("a red circle on a blue background", "none", "a red circle on a blue background"),
    ],
)
def test_trigger_words_land_where_the_prompt_says_or_are_prepended(prompt, mode, expected, workspace, tmp_path):
    run = kohya_run(tmp_path / "out", workspace.assets, epochs=(1, 2), trigger="sks style")
    path = workspace.sweep("trig", {"base": {**BASE, "prompt": prompt}, "grid": {"lora_model": {"checkpoints": "mine"}}})
    prepared = prepare_sweep(
        workspace.config(f"sweep={path}", "tracking=none", f"+loras.mine={{source: '{run}'}}", f"sweep.trigger_mode={mode}")
    )
    assert prepared.ok, prepared.problems
    assert set(prepared.plan["prompt"]) == {expected}
    assert set(prepared.plan["prompt_original"].dropna()) == ({prompt} if expected != prompt else set())


def test_an_entrys_trigger_wins_over_the_files_and_changes_the_id(workspace, tmp_path):
    run = kohya_run(tmp_path / "out", workspace.assets, epochs=(1,), trigger="sks style")
    single = run / "mine-000001.safetensors"
    path = workspace.sweep("one", {"base": {**BASE, "lora_model": "solo"}})
    with_entry = prepare_sweep(workspace.config(f"sweep={path}", "tracking=none", f"+loras.solo={{source: '{single}', trigger: 'ohwx'}}"))
    from_file = prepare_sweep(workspace.config(f"sweep={path}", "tracking=none", f"+loras.solo={{source: '{single}'}}"))
    off = prepare_sweep(
        workspace.config(f"sweep={path}", "tracking=none", f"+loras.solo={{source: '{single}'}}", "sweep.trigger_mode=none")
    )
    assert with_entry.plan["prompt"].item() == "ohwx, " + BASE["prompt"]
    assert from_file.plan["prompt"].item() == "sks style, " + BASE["prompt"]
    assert len({with_entry.plan["id"].item(), from_file.plan["id"].item(), off.plan["id"].item()}) == 3


def test_the_report_answers_which_checkpoint_at_which_strength(workspace, tmp_path):
    """checkpoints.csv, the heatmap and the best checkpoint line match a recomputation from results.parquet."""
    import pandas as pd
    from helpers import mlflow_runs

    run = kohya_run(tmp_path / "out", workspace.assets, epochs=(1, 2, 3))
    grid = {"lora_model": {"checkpoints": "mine"}, "lora_strength": [0.5, 1.0], "seed": [1, 2]}
    path = workspace.sweep("best", {"base": BASE, "grid": grid, "scores": ["clip_score"]})
    workspace.run(f"sweep={path}", "sweep.name=best", f"+loras.mine={{source: '{run}'}}").assert_all_ok()
    folder = workspace.outputs / "best"
    table = pd.read_csv(folder / "checkpoints.csv")
    assert sorted(table["step"].unique()) == [250, 500, 750] and sorted(table["strength"].unique()) == [0.5, 1.0]
    plan, results = pd.read_parquet(folder / "plan.parquet"), pd.read_parquet(folder / "results.parquet")
    joined = plan.merge(results, on="id")
    means = joined.groupby(["lora_model", "lora_strength"])["clip_score"].mean()
    best = means.idxmax()
    assert (folder / "report" / "checkpoints.png").exists()
    html = (folder / "report.html").read_text()
    assert f"best <b>{best[0]}</b>" in html and f"at strength {float(best[1]):g}" in html
    top = table.sort_values("clip_score_mean", ascending=False).iloc[0]
    assert (top["checkpoint"], top["strength"]) == (best[0], float(best[1]))
    assert abs(top["clip_score_mean"] - means.max()) < 1e-9
    parent, children = mlflow_runs(workspace.outputs, "best")
    assert parent["tags.best_checkpoint.mine"].item().startswith(f"{best[0]} at {float(best[1]):g}: clip_score ")
    assert set(children["tags.lora.mine@e2.network"].dropna()) == {"LoRA"} and set(children["tags.lora.mine@e2.tool"].dropna()) == {"kohya"}


def test_text_encoder_and_unet_strengths_apart_equal_the_hand_merge(workspace, tmp_path):
    """lora_strength 1 with lora_strength_te 0.3 (and A1111's <lora:both:0.3:1>, the same image and id): the UNet
    deltas at 1 and the text encoder's at 0.3, merged by hand into the demo model, give the same pixels."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from helpers import demo_pipeline, render, sweep_images
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(workspace.assets / "tiny-sd", safety_checker=None)
    torch.manual_seed(7)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False), adapter_name="x")
    pipe.text_encoder.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), adapter_name="x"
    )
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path),
        unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="x"),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, adapter_name="x"),
        weight_name="both.safetensors",
    )
    entry = f"+loras.both={{source: '{tmp_path / 'both.safetensors'}'}}"
    by_fields = {**BASE, "seed": 1, "lora_model": "both", "lora_strength": 1, "lora_strength_te": 0.3}
    by_tag = {**BASE, "seed": 1, "prompt": BASE["prompt"] + " <lora:both:0.3:1>"}
    path = workspace.sweep("apart", {"base": by_fields})
    tagged = workspace.sweep("tagged", {"base": by_tag})
    assert (
        prepare_sweep(workspace.config(f"sweep={tagged}", "tracking=none", entry)).plan["id"].tolist()
        == prepare_sweep(workspace.config(f"sweep={path}", "tracking=none", entry)).plan["id"].tolist()
    )
    workspace.run(f"sweep={path}", "sweep.name=apart", "tracking=none", entry).assert_all_ok()
    rows, pixels = sweep_images(workspace.outputs, "apart")
    assert rows["blend"].item() == "both 1 (text encoders 0.3)"

    from safetensors.torch import load_file

    hand = demo_pipeline(workspace.assets)
    tensors = load_file(str(tmp_path / "both.safetensors"))
    with torch.no_grad():
        for component, strength in (("unet", 1.0), ("text_encoder", 0.3)):
            modules = dict(getattr(hand, component).named_modules())
            for key, a in tensors.items():
                if key.startswith(component + ".") and ".lora_A." in key:
                    module = modules[key.removeprefix(component + ".").split(".lora_A.")[0]]
                    module.weight += strength * (tensors[key.replace(".lora_A.", ".lora_B.")] @ a)
    reference = render(hand, BASE["prompt"], seed=1)
    assert np.abs(pixels(rows["id"].item()) - reference).max() <= 1
    workspace.run(f"sweep={path}", "sweep.name=peft", "tracking=none", "engine.fuse_loras=false", entry).assert_all_ok()
    peft_rows, peft_pixels = sweep_images(workspace.outputs, "peft")
    assert set(peft_rows["meta.lora_mode"]) == {"unfused"}, "peft's per-component adapter weights"
    assert np.abs(peft_pixels(peft_rows["id"].item()) - reference).max() <= 1


def ai_toolkit_run(folder, assets, steps=(500, 1000, 1500), trigger="ohwx cat"):
    """An ai-toolkit-like output folder: mine_000000500.safetensors ... and the final mine.safetensors, with its metadata:
    `software` and `training_info` as JSON strings, kohya's ss_output_name / ss_base_model_version, the trigger word as
    the one-tag ss_tag_frequency it writes for A1111."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(assets / "loras" / "sunset.safetensors"))
    for i, step in enumerate(steps):
        metadata = {
            "software": '{"name": "ai-toolkit", "repo": "https://github.com/ostris/ai-toolkit", "version": "0.2.0"}',
            "training_info": f'{{"step": {step}, "epoch": {i}}}',
            "ss_base_model_version": "sd_1.5",
            "ss_output_name": "mine",
            "ss_tag_frequency": f'{{"1_{trigger}": {{"{trigger}": 1}}}}',
            "format": "pt",
        }
        name = "mine.safetensors" if i == len(steps) - 1 else f"mine_{step:09d}.safetensors"
        save_file({k: v * (1 + i) if "lora_B" in k else v for k, v in tensors.items()}, str(folder / name), metadata=metadata)
    return folder


def test_an_ai_toolkit_run_is_read_from_its_own_metadata(workspace, tmp_path):
    run = ai_toolkit_run(tmp_path / "ait", workspace.assets)
    path = workspace.sweep("ait", {"base": BASE, "grid": {"lora_model": {"checkpoints": "mine"}}})
    prepared = prepare_sweep(workspace.config(f"sweep={path}", "tracking=none", f"+loras.mine={{source: '{run}'}}"))
    assert prepared.ok, prepared.problems
    assert list(prepared.plan["lora_model"]) == ["mine@s500", "mine@s1000", "mine@s1500"], "the final file has its step too"
    assert list(prepared.plan["checkpoint_step"]) == [500, 1000, 1500]
    assert set(prepared.plan["prompt"]) == {f"ohwx cat, {BASE['prompt']}"}, "ai-toolkit's trigger word is prepended"
    out = io.StringIO()
    describe_plan(prepared, out)
    lines = out.getvalue().splitlines()
    rank = next(v.shape[0] for k, v in load_file(str(run / "mine.safetensors")).items() if k.endswith("lora_A.weight"))
    assert f'lora mine@s1500: ai-toolkit, sd_1.5, LoRA rank {rank}, epoch 2, step 1500, trigger "ohwx cat"' in lines, lines
    assert not any("suggestions" in line for line in lines), "its trigger is its trigger, not a caption-tag suggestion"


def test_the_report_names_each_lora_files_metadata_and_trigger(workspace, tmp_path):
    import json

    run = kohya_run(tmp_path / "out", workspace.assets, epochs=(1, 2), trigger="sks style")
    path = workspace.sweep("about", {"base": BASE, "grid": {"lora_model": {"checkpoints": "mine"}}})
    workspace.run(f"sweep={path}", "sweep.name=about", "tracking=none", f"+loras.mine={{source: '{run}'}}").assert_all_ok()
    folder = workspace.outputs / "about"
    files = json.loads((folder / "loras.json").read_text())
    assert files["mine@e2"] | {"file": "mine-000002.safetensors"} == files["mine@e2"]
    assert (files["mine@e2"]["trigger"], files["mine@e2"]["epoch"], files["mine@e2"]["step"]) == ("sks style", "2", "500")
    page = (folder / "report.html").read_text()
    row = next(r for r in page.split("<tr>") if "<b>mine@e2</b>" in r)
    assert "mine-000002.safetensors</code>: kohya, sd_v1, LoRA rank 4 alpha 1, epoch 2, step 500, 512x512" in row
    assert "trigger <b class='trigger'>sks style</b>" in row
