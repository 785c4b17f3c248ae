"""Every model family of runner/families.py, on its tiny model: recognised, planned with its own defaults, refused in
one line where a request cannot mean what it says, and run as SD is (ids, MLflow, report), with fused blends equal
to LoRA deltas merged by hand and reruns pixel-identical."""

from __future__ import annotations

import io

import numpy as np
import pytest
from family_world import TINY_OF, blend_of, family_call, hand_merged
from helpers import assert_complete, mlflow_runs, sweep_images

from runner.families import FAMILIES, family_of_pipeline, label
from runner.prepare import describe_plan, prepare_sweep
from runner.registry import folder_family
from runner.request import FIELDS

FAMILY_NAMES = sorted(TINY_OF)
SWEEP = {
    "base": {"prompt": "a red circle on a blue background", "width": 64, "height": 64, "num_inference_steps": 2},
    "grid": {"lora_model": ["a", "b", "a,b"], "lora_strength": [0.5, 1.0], "seed": [1, 2]},
}


def plain_config(workspace, model, *overrides: str):
    """A one-image sweep on the family's tiny model (no LoRA), composed as `lora-sweep plan` composes it."""
    path = workspace.sweep("plain", {"base": {"prompt": "a red circle", "width": 64, "height": 64}})
    return workspace.config(f"sweep={path}", "tracking=none", *(model.overrides if model else ()), *overrides)


def test_the_table_names_a_real_pipeline_for_every_family_and_each_has_a_tiny_model():
    import diffusers

    for family in FAMILIES.values():
        assert hasattr(diffusers, family.pipeline), family.pipeline
        assert family.lora_loader and hasattr(diffusers.loaders, family.lora_loader), family.lora_loader
        for index_class in family.index_classes:
            assert family_of_pipeline(index_class) is family
        assert family.size_multiple in (8, 16)
        assert set(family.defaults) <= set(FIELDS)
    assert set(TINY_OF) == {name for name, f in FAMILIES.items() if f.tested} - {"sd", "sdxl"}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_family_folder_is_recognised_and_the_plan_names_it_with_its_defaults(family, family_world, workspace):
    model = family_world.get(family)
    assert folder_family(model.folder) == family  # dev/schnell and Klein/distilled Klein apart, by their configs
    prepared = prepare_sweep(plain_config(workspace, model))
    assert prepared.ok, prepared.problems
    out = io.StringIO()
    describe_plan(prepared, out)
    assert f"models: m ({label(family)})" in out.getvalue().splitlines()
    row = prepared.plan.iloc[0]
    defaults = FAMILIES[family].defaults  # the unset fields take the family's own defaults, not SD's
    assert row["scheduler_used"] == "FlowMatchEulerDiscreteScheduler"
    assert row["num_inference_steps"] == defaults["num_inference_steps"]
    if "guidance_scale" in defaults:
        assert row["guidance_scale"] == defaults["guidance_scale"]


def test_sd_keeps_the_spec_defaults_and_its_ids(workspace):
    prepared = prepare_sweep(workspace.config("tracking=none"))
    assert prepared.ok
    plan = prepared.plan
    assert set(plan["scheduler_used"]) <= {"UniPCMultistepScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"}
    assert plan["true_cfg_scale"].isna().all() and plan["shift"].isna().all()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_lora_sweep_runs_on_every_family_like_sd(family, family_world, workspace):
    """2 LoRAs and their blend x 2 strengths x 2 seeds: every id once, tracked in MLflow, a report; fused blends equal
    the deltas merged by hand; the same sweep again gives the same pixels."""
    model = family_world.get(family)
    path = workspace.sweep("fam", SWEEP)
    result = workspace.run(f"sweep={path}", "sweep.name=fam", *model.overrides)
    result.assert_all_ok()
    assert f"models: m ({label(family)})" in result.out
    assert_complete(workspace, "fam", 12)
    assert f"m ({label(family)})" in (workspace.outputs / "fam" / "report.html").read_text()
    _, children = mlflow_runs(workspace.outputs, "fam")
    assert set(children["tags.meta.family"]) == {family} and set(children["params.model_id"]) == {"m"}
    assert set(children["params.true_cfg_scale"].fillna("")) == {""}, "an unset field is logged empty, not 'nan'"
    rows, pixels = sweep_images(workspace.outputs, "fam")
    assert set(rows["meta.lora_mode"]) == {"fused"} and set(rows["meta.family"]) == {family}
    images = {r["id"]: pixels(r["id"]) for _, r in rows.iterrows()}
    assert len({im.tobytes() for im in images.values()}) == 12, "every LoRA, strength and seed changes the image"

    for _, row in rows[(rows["lora_model"] == "a,b") & (rows["lora_strength"] == "0.5,0.5") & (rows["seed"] == 1)].iterrows():
        reference = hand_merged(model, blend_of(row), family_call(family, row), seed=1)
        # one image alone vs two in one call: float sums differ by ~1e-6, a pixel level at most
        assert np.abs(images[row["id"]] - reference).max() <= 1, family

    again = workspace.run(f"sweep={path}", "sweep.name=again", "tracking=none", *model.overrides)
    again.assert_all_ok()
    rows_again, pixels_again = sweep_images(workspace.outputs, "again")
    assert sorted(rows_again["id"]) == sorted(images)
    assert all(np.array_equal(pixels_again(i), images[i]) for i in images)


def test_unfused_blends_match_fused_ones_within_a_pixel_level(family_world, workspace):
    model = family_world.get("flux")
    sweep = {**SWEEP, "grid": {"lora_model": ["a,b"], "lora_strength": [0.5, 1.0], "seed": [1]}}
    path = workspace.sweep("f", sweep)
    workspace.run(f"sweep={path}", "sweep.name=fused", "tracking=none", *model.overrides).assert_all_ok()
    workspace.run(f"sweep={path}", "sweep.name=peft", "tracking=none", "engine.fuse_loras=false", *model.overrides).assert_all_ok()
    fused, fused_pixels = sweep_images(workspace.outputs, "fused")
    peft, peft_pixels = sweep_images(workspace.outputs, "peft")
    assert set(peft["meta.lora_mode"]) == {"unfused"}
    for image_id in fused["id"]:
        assert np.abs(fused_pixels(image_id) - peft_pixels(image_id)).max() <= 1


@pytest.mark.parametrize(
    "family, overrides, line",
    [
        ("flux", ["sweep.base.width=72"], "width: 72 is not a multiple of 16, which Flux.1 models need ('m'); use 64"),
        ("qwen-image", ["sweep.base.height=104"], "height: 104 is not a multiple of 16, which Qwen-Image models need ('m'); use 96"),
        ("flux", ["sweep.base.clip_skip=2"], "clip_skip: does not apply to Flux.1 models ('m'): no CLIP layers to skip; drop clip_skip"),
        (
            "z-image",
            ["sweep.base.clip_skip=2"],
            "clip_skip: does not apply to Z-Image models ('m'): no CLIP layers to skip; drop clip_skip",
        ),
        (
            "flux",
            ["sweep.base.negative_prompt=blurry"],
            "negative_prompt: is ignored by Flux.1 models unless true_cfg_scale > 1 ('m'); "
            "set true_cfg_scale (e.g. 4: real CFG, two passes per step) or drop negative_prompt",
        ),
        (
            "flux2",
            ["sweep.base.negative_prompt=blurry"],
            "negative_prompt: Flux.2 models take no negative prompt ('m'); drop negative_prompt",
        ),
        (
            "sd3",
            ["+sweep.base.true_cfg_scale=4"],
            "true_cfg_scale: does not apply to SD3 / SD3.5 models ('m'): guidance_scale is their CFG; drop true_cfg_scale",
        ),
        ("chroma", ["+sweep.base.max_sequence_length=600"], "max_sequence_length: 600 is over Chroma's 512 tokens ('m'); use at most 512"),
        (
            "flux",
            ["sweep.base.scheduler=EulerDiscreteScheduler"],
            "scheduler: EulerDiscreteScheduler is not a flow-matching sampler; use FlowMatchEulerDiscreteScheduler "
            "(or set engine.substitute_schedulers=true to run it and record it)",
        ),
        (
            "sd3",
            ["sweep.base.scheduler=LMSDiscreteScheduler"],
            "scheduler: LMSDiscreteScheduler does not run SD3 / SD3.5 models (flow-matching); use FlowMatchEulerDiscreteScheduler, "
            "or DPMSolverMultistep/DPMSolverSinglestep/UniPCMultistep/DEISMultistepScheduler with flow sigmas",
        ),
        (
            "z-image",
            ["sweep.base.scheduler=FlowMatchHeunDiscreteScheduler"],
            "scheduler: FlowMatchHeunDiscreteScheduler takes no custom sigmas, which diffusers 0.42's flow pipelines pass to "
            "set_timesteps; use FlowMatchEulerDiscreteScheduler, or DPMSolverMultistep/DPMSolverSinglestep/UniPCMultistep/"
            "DEISMultistepScheduler with flow sigmas",
        ),
    ],
)
def test_a_request_a_family_cannot_honour_is_one_line_before_anything_loads(family, overrides, line, family_world, workspace):
    model = family_world.get(family)
    prepared = prepare_sweep(plain_config(workspace, model, *overrides))
    assert prepared.problems == [line], prepared.problems
    assert not (workspace.outputs / "demo").exists()


def test_flow_schedulers_run_on_sd_only_where_they_are_sd_samplers(workspace):
    prepared = prepare_sweep(plain_config(workspace, None, "sweep.base.scheduler=FlowMatchEulerDiscreteScheduler"))
    assert any(
        p.startswith(
            "scheduler: FlowMatchEulerDiscreteScheduler is for flow-matching models (Flux, SD3, Qwen-Image, ...); "
            "SD 1.x/2.x takes the spec's schedulers"
        )
        for p in prepared.problems
    ), prepared.problems


def test_a_lora_for_another_family_is_refused_in_one_line(family_world, workspace):
    flux = family_world.get("flux")
    qwen = family_world.get("qwen-image")
    on_sd = prepare_sweep(plain_config(workspace, None, f"+loras.fx={{source: '{flux.loras['a']}'}}", "+sweep.grid.lora_model=[fx]"))
    assert any(
        p.startswith(
            "loras.fx: is a LoRA for Flux.1 / Flux.1 schnell / Chroma / Flux.2 / Flux.2 Klein / Flux.2 Klein (distilled) "
            "but model 'tiny-sd' is SD 1.x/2.x; use it with a model of its family or drop it from the blend"
        )
        for p in on_sd.problems
    ), on_sd.problems
    on_flux = prepare_sweep(plain_config(workspace, flux, f"+loras.q={{source: '{qwen.loras['a']}'}}", "+sweep.grid.lora_model=[q]"))
    assert any(p.startswith("loras.q: is a LoRA for Qwen-Image but model 'm' is Flux.1") for p in on_flux.problems), on_flux.problems
    sd_lora = workspace.assets / "loras" / "sunset.safetensors"
    on_z = prepare_sweep(
        plain_config(workspace, family_world.get("z-image"), f"+loras.s={{source: '{sd_lora}'}}", "+sweep.grid.lora_model=[s]")
    )
    assert any(p.startswith("loras.s: is a LoRA for SD 1.x/2.x / SDXL but model 'm' is Z-Image") for p in on_z.problems), on_z.problems


def test_a_lora_none_of_whose_keys_fit_is_one_line_before_any_image(family_world, workspace, tmp_path):
    """diffusers only warns when it places no key of a LoRA (the image would silently be the base model's): each file is
    matched against the loaded model before image 1."""
    from safetensors.torch import load_file, save_file

    model = family_world.get("flux")
    odd = tmp_path / "odd.safetensors"
    save_file({"diffusion_model." + k.removeprefix("transformer."): v for k, v in load_file(str(model.loras["b"])).items()}, str(odd))
    path = workspace.sweep("odd", {**SWEEP, "grid": {"lora_model": ["a", "odd"], "seed": [1]}})
    result = workspace.cli("run", f"sweep={path}", "sweep.name=odd", "tracking=none", *model.overrides, f"+loras.odd={{source: '{odd}'}}")
    assert result.code == 2, result.err[-2000:]
    errors = [line for line in result.err_lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: loras.odd: odd.safetensors (diffusers/peft LoRA, "), errors
    assert "matched 0 of its" in errors[0] and "on this Flux.1 model: none of its keys name a layer of it" in errors[0], errors
    assert not (workspace.outputs / "odd" / "images").exists()


def test_the_flow_fields_change_the_pixels_and_enter_the_ids_only_when_set(family_world, workspace):
    """true_cfg_scale with a negative (real CFG on Flux.1), a fixed shift, max_sequence_length, and the spec's UniPC
    and DPM++ solvers with flow sigmas: each runs and gives other pixels than the defaults."""
    from runner.plan import image_id

    model = family_world.get("flux")
    euler, none = "FlowMatchEulerDiscreteScheduler", None
    zipped = {
        "true_cfg_scale": [none, 4, none, none, none, none, none],
        "negative_prompt": ["", "blurry", "", "", "", "", ""],
        "shift": [none, none, 2.0, none, none, none, none],
        "max_sequence_length": [none, none, none, 16, none, none, none],
        "scheduler": [
            euler,
            euler,
            euler,
            euler,
            "UniPCMultistepScheduler",
            "DPMSolverMultistepScheduler",
            "DEISMultistepScheduler",
        ],
    }
    path = workspace.sweep("fields", {"base": {**SWEEP["base"], "seed": 3}, "grid": {"zip": zipped}})
    result = workspace.run(f"sweep={path}", "sweep.name=fields", "tracking=none", *model.overrides)
    result.assert_all_ok()
    rows, pixels = sweep_images(workspace.outputs, "fields")
    assert len(rows) == 7 and len({pixels(i).tobytes() for i in rows["id"]}) == 7

    prepared = prepare_sweep(workspace.config(f"sweep={path}", "tracking=none", *model.overrides))
    first = prepared.plan.iloc[0].to_dict()
    unset = {k: v for k, v in first.items() if k not in ("true_cfg_scale", "shift", "max_sequence_length")}
    assert image_id(unset, prepared.identity) == first["id"]  # as if the fields did not exist: earlier sweeps keep their ids
    shifted = prepared.plan.iloc[2].to_dict()
    assert image_id({**shifted, "shift": None}, prepared.identity) != shifted["id"]


def test_lora_weights_diffusers_drops_without_an_error_are_said_in_the_plan(family_world, workspace, tmp_path):
    """kohya Flux files' img_in/final_layer and T5 (lora_te2_) weights are dropped by diffusers' converter: said once."""
    from safetensors.numpy import save_file

    names = [
        "lora_unet_double_blocks_0_img_attn_qkv",
        "lora_unet_img_in",
        "lora_unet_final_layer_linear",
        "lora_te2_encoder_block_0_layer_0_SelfAttention_q",
    ]
    tensors = {f"{n}.{part}.weight": np.zeros((2, 2), dtype=np.float32) for n in names for part in ("lora_down", "lora_up")}
    save_file(tensors, str(tmp_path / "kohya.safetensors"))
    model = family_world.get("flux")
    kohya = f"+loras.k={{source: '{tmp_path / 'kohya.safetensors'}'}}"
    prepared = prepare_sweep(plain_config(workspace, model, kohya, "+sweep.grid.lora_model=[k]"))
    assert prepared.ok, prepared.problems
    assert [w for w in prepared.warnings if w.startswith("loras.k:")] == [
        "loras.k: diffusers drops its input, embedding and final layers (kohya lora_unet_img_in/txt_in/time_in/vector_in/guidance_in/"
        "final_layer) on Flux.1 models ('m'); the rest of the LoRA applies",
        "loras.k: diffusers drops its T5 text-encoder layers (lora_te2_) on Flux.1 models ('m'); the rest of the LoRA applies",
    ]


# sweeps/ for real models, with their conf/model files: (model config, family, model ids, LoRA ids -> a tiny LoRA)
EXAMPLES = {
    "flux-dev-strengths": ("flux-dev", "flux", ["flux-dev", "flux-dev-q8", "flux-dev-file"], {"my-style": "a", "my-style-e8": "b"}),
    "qwen-image-blend": ("qwen-image", "qwen-image", ["qwen-image", "qwen-image-q8"], {"lightning": "a", "my-char": "b"}),
    "z-image-turbo": ("z-image", "z-image", ["z-image-turbo"], {"my-style": "a"}),
}


@pytest.mark.parametrize("sweep", sorted(EXAMPLES))
def test_the_example_sweeps_for_real_models_are_valid_for_their_family(sweep, family_world, workspace):
    """With the real files missing, only the missing files are said; with the tiny model of the family in their place,
    the plan is clean (the example's fields, sizes and scheduler fit the family)."""
    model_config, family, model_ids, loras = EXAMPLES[sweep]
    missing = prepare_sweep(workspace.config(f"model={model_config}", f"sweep={sweep}"))
    assert missing.problems and all("does not exist" in p or "not in the local Hugging Face cache" in p for p in missing.problems)
    tiny = family_world.get(family)
    swaps = [f"models.{m}={{source: '{tiny.folder}'}}" for m in model_ids]
    swaps += [f"loras.{name}.source={tiny.loras[lora]}" for name, lora in loras.items()]
    prepared = prepare_sweep(workspace.config(f"model={model_config}", f"sweep={sweep}", "tracking=none", *swaps))
    assert prepared.ok, prepared.problems
    assert prepared.registry.models[model_ids[0]].family == family


def test_the_illustrious_example_is_valid_for_an_sdxl_single_file(sdxl_dir, workspace):
    swaps = [
        f"models.illustrious={{source: '{sdxl_dir / 'tiny-xl.safetensors'}', config: '{sdxl_dir / 'tiny-xl'}'}}",
        f"loras.char-a.source={sdxl_dir / 'xl_lora.safetensors'}",
        f"loras.detail.source={sdxl_dir / 'xl_te2_only.safetensors'}",
    ]
    prepared = prepare_sweep(workspace.config("model=illustrious", "sweep=illustrious-loras", "tracking=none", *swaps))
    assert prepared.ok, prepared.problems
    assert prepared.registry.models["illustrious"].family == "sdxl"


@pytest.mark.parametrize("family", ["qwen-image", "z-image", "flux2"])
def test_a_lora_with_the_diffusion_model_prefix_runs_as_its_diffusers_twin(family, family_world, workspace, tmp_path):
    """ComfyUI / musubi-style keys (`diffusion_model.<module>.lora_A`), converted by the family's loader: the same pixels."""
    from safetensors.torch import load_file, save_file

    model = family_world.get(family)
    twin = tmp_path / "comfy.safetensors"
    save_file({"diffusion_model." + k.removeprefix("transformer."): v for k, v in load_file(str(model.loras["b"])).items()}, str(twin))
    path = workspace.sweep("twins", {**SWEEP, "grid": {"lora_model": ["b", "comfy"], "seed": [1]}})
    workspace.run(
        f"sweep={path}", "sweep.name=twins", "tracking=none", *model.overrides, f"+loras.comfy={{source: '{twin}'}}"
    ).assert_all_ok()
    rows, pixels = sweep_images(workspace.outputs, "twins")
    first, second = (pixels(rows.loc[rows["lora_model"] == name, "id"].item()) for name in ("b", "comfy"))
    assert np.array_equal(first, second)


def test_lora_sweep_run_on_the_command_line_runs_a_dit_model(family_world, workspace):
    """The same as the in-process runs above, once as a user types it: exit 0, the family named, every image made."""
    model = family_world.get("z-image")
    path = workspace.sweep("cli", {**SWEEP, "grid": {"lora_model": ["a", "b"], "seed": [1, 2]}})
    result = workspace.cli("run", f"sweep={path}", "sweep.name=cli", "tracking=none", *model.overrides)
    assert result.code == 0, result.err
    assert "models: m (Z-Image)" in result.out and "done: 4 ok, 0 failed" in result.out
    assert len(list((workspace.outputs / "cli" / "images").glob("*.png"))) == 4
