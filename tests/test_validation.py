"""Bad input is refused before the first image: exit 2, one line per problem naming the field and the fix."""

from __future__ import annotations

import pytest

BAD_OVERRIDES = [
    (["sweep.grid.lora_model=[sunset,nope]"], "lora_model: unknown LoRA id 'nope'"),
    (["sweep.grid.lora_model=[sunst]"], "did you mean 'sunset'"),
    (["sweep.grid.lora_model=[sunset]", "sweep.grid.lora_strength=['0.4,0.5']"], "lora_strength: 2 strengths for 1 LoRAs"),
    (["sweep.grid.lora_strength=[1.5]"], "lora_strength: 1.5 is outside 0.1..1"),
    (["sweep.base.width=100"], "width: 100 must be a multiple of 8"),
    (["sweep.base.height=2048"], "height: 2048 must be a multiple of 8 in 8..1024"),
    (["sweep.base.samples=5"], "samples: 5 is outside 1..4"),
    (["sweep.base.guidance_scale=25"], "guidance_scale: 25 is outside 1..20"),
    (["sweep.base.clip_skip=9"], "clip_skip: 9 is outside 1..8"),
    (["sweep.grid.scheduler=[EulerDiscrete]"], "did you mean 'EulerDiscreteScheduler'"),
    (["sweep.grid.scheduler=[DDIMInverseScheduler]"], "scheduler: DDIMInverseScheduler inverts an image"),
    (["sweep.grid.scheduler=[KarrasVeScheduler]"], "use EulerDiscreteScheduler"),
    (["sweep.base.guidanc_scale=5"], "did you mean 'guidance_scale'"),
    (["sweep.base.width=abc"], "width: expected an integer"),
    (["sweep.max_images=5"], "sweep.max_images: the plan has"),
    (["model.id=nope"], "model_id: unknown model id 'nope'"),
    (
        ["models.tiny-sd.source=/does/not/exist", "models.tiny-sd.builtin=false"],
        "models.tiny-sd.source: path /does/not/exist does not exist",
    ),
    (["validation.max_lora_strength=5"], "validation.max_lora_strength"),
    (["engine.batch_size=0"], "engine.batch_size: 0 is not a batch size; use 1 or more, or auto (the default)"),
    (["engine.batch_size=abc"], "engine.batch_size: abc is not a batch size"),
    (["engine.fuse_loras=maybe"], "engine.fuse_loras: 'maybe' is not true, false or auto"),
    (["engine.compile=true", "engine.fuse_loras=false"], "engine.compile: a compiled UNet runs blends fused"),
    (["engine.batch_size=-2"], "engine.batch_size: -2 is not a batch size"),
    (["engine.workers=0"], "engine.workers: 0 is below 1; use 1 (this process) or the number of GPUs"),
    (["engine=remote", "engine.workers=2"], "engine.workers: applies to the local engine; the remote engine's concurrency is"),
    (["++sweep.base.vae=mse"], "vae: unknown VAE id 'mse'; add it under `vaes:` in the config"),
    (["++sweep.base.embeddings_model=easyneg", "+embeddings.easynegative={source: /e.pt}"], "did you mean 'easynegative'"),
    (["++sweep.base.vae=mse", "+vaes.mse={source: /no/vae}"], "vaes.mse.source: path /no/vae does not exist"),
    (["++sweep.base.vae=mse", "+vaes.mse={source: /x, confg: /y}"], "vaes.mse.confg: unknown key; did you mean 'config'?"),
    (["++sweep.base.upscale=yes", "upscaler.source=/no/upscaler"], "upscaler.source: path /no/upscaler does not exist"),
    (["+embeddings.a={source: x, token: <x>}"], "override '+embeddings.a={source: x, token: <x>}': cannot be parsed near '<x>}'"),
]


def check_refused(workspace, small_sweep, command, overrides, expected):
    result = workspace.cli(command, f"sweep={small_sweep}", *overrides)
    assert result.code == 2, result.out + result.err
    assert "Traceback" not in result.err
    assert any(expected in line for line in result.err_lines), result.err
    assert all(line.startswith("error: ") for line in result.err_lines), result.err
    assert not (workspace.outputs / "small" / "images").exists()
    assert not (workspace.outputs / "mlflow.db").exists()


@pytest.mark.parametrize("overrides, expected", BAD_OVERRIDES, ids=[e for _, e in BAD_OVERRIDES])
def test_plan_refuses_bad_input(workspace, small_sweep, overrides, expected):
    check_refused(workspace, small_sweep, "plan", overrides, expected)


@pytest.mark.parametrize("overrides, expected", [BAD_OVERRIDES[0], BAD_OVERRIDES[4], BAD_OVERRIDES[10]])
def test_run_refuses_bad_input_before_the_first_image(workspace, small_sweep, overrides, expected):
    check_refused(workspace, small_sweep, "run", overrides, expected)


def test_every_problem_is_reported_at_once(workspace, small_sweep):
    result = workspace.cli(
        "plan", f"sweep={small_sweep}", "sweep.base.width=100", "sweep.base.clip_skip=0", "sweep.base.guidance_scale=0.5"
    )
    assert result.code == 2
    fields = [line.split(":")[1].strip() for line in result.err_lines]
    assert fields == ["width", "guidance_scale", "clip_skip"]


def test_problems_shared_by_rows_are_said_once_with_a_count(workspace, small_sweep):
    result = workspace.cli("plan", f"sweep={small_sweep}", "sweep.grid.lora_strength=[1.5]")
    assert result.code == 2
    assert len(result.err_lines) == 1
    assert "(4 rows)" in result.err_lines[0]


def test_strength_above_one_allowed_when_configured(workspace, small_sweep):
    result = workspace.cli("plan", f"sweep={small_sweep}", "sweep.grid.lora_strength=[1.5]", "validation.max_lora_strength=2")
    assert result.code == 0, result.err


def test_substituted_scheduler_is_recorded_not_refused(workspace, small_sweep):
    result = workspace.cli("plan", f"sweep={small_sweep}", "sweep.grid.scheduler=[IPNDMScheduler]", "engine.substitute_schedulers=true")
    assert result.code == 0, result.err
    assert "warning: IPNDMScheduler" in result.out and "ran PNDMScheduler instead" in result.out
    import pandas as pd

    plan = pd.read_parquet(workspace.outputs / "small" / "plan-preview.parquet")
    assert set(plan["scheduler_used"]) == {"PNDMScheduler"}
    assert plan["notes"].str.contains("ran PNDMScheduler instead").all()


def test_fields_the_engine_cannot_honour_warned_once(workspace, small_sweep):
    result = workspace.cli("plan", f"sweep={small_sweep}", "sweep.base.enhance_prompt=yes", "sweep.base.upscale=yes")
    assert result.code == 0, result.err
    warnings = [line for line in result.out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert any("enhance_prompt not applied" in w for w in warnings)


def test_malformed_sweep_yaml_is_one_line(workspace):
    path = workspace.sweep("broken", "base:\n  prompt: [unclosed\n")
    result = workspace.cli("plan", f"sweep={path}")
    assert result.code == 2
    assert len(result.err_lines) == 1 and "is not valid YAML" in result.err and "line" in result.err


def test_unknown_sweep_key_did_you_mean(workspace):
    path = workspace.sweep("typo", {"base": {"prompt": "x"}, "gird": {"seed": [1]}})
    result = workspace.cli("plan", f"sweep={path}")
    assert result.code == 2
    assert "sweep.gird: unknown key" in result.err and "did you mean 'grid'" in result.err


MORE_BAD_OVERRIDES = [
    (["sweep.grid.seed=[]"], "sweep.grid.seed: is an empty list"),
    (["engine.batchsize=2"], "did you mean 'batch_size'"),
    (["tracking=nonee"], "tracking: no option 'nonee'; did you mean 'none'"),
    (["engine.kind=gpu"], "engine.kind: unknown engine 'gpu'"),
    (["sweep.base.key=abc123"], "key: API keys do not belong in sweep files"),
    (["sweep.base.safety_checker=maybe"], 'safety_checker: expected "yes" or "no"'),
    (["sweep.grid.seed=[-5]"], "seed: seed must be in 0.."),
    (["sweep.grid.lora_model={pairs: [sunset]}", "~sweep.grid.lora_strength"], "sweep.grid.lora_model: generates no blends"),
    (["+loras.x={weight_name: a.safetensors}", "sweep.grid.lora_model=[x]"], "loras.x: needs a source"),
    (["+loras.x={source: /tmp/a.safetensors, wieght_name: a}", "sweep.grid.lora_model=[x]"], "did you mean 'weight_name'"),
    (["paths.outputs=/etc/passwd/outputs"], "paths.outputs: cannot write /etc/passwd/outputs"),
]


@pytest.mark.parametrize("overrides, expected", MORE_BAD_OVERRIDES, ids=[e for _, e in MORE_BAD_OVERRIDES])
def test_plan_refuses_bad_config(workspace, small_sweep, overrides, expected):
    check_refused(workspace, small_sweep, "plan", overrides, expected)


def write_safetensors(path, names):
    import numpy as np
    from safetensors.numpy import save_file

    save_file({name: np.zeros((2, 2), dtype=np.float32) for name in names}, str(path))
    return path


def not_a_lora(ws):
    return write_safetensors(ws.root / "unet_weights.safetensors", ["down_blocks.0.conv.weight"]), "has no LoRA weights"


def corrupt_safetensors(ws):
    path = ws.root / "corrupt.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return path, "is not a readable .safetensors file"


def lycoris_loha(ws):
    return write_safetensors(ws.root / "loha.safetensors", ["lora_unet_down_blocks_0.hada_w1_a"]), "is a LyCORIS LoHa"


def sdxl_lora(ws):
    names = [
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
    ]
    return write_safetensors(ws.root / "xl.safetensors", names), None


def test_an_sdxl_lora_on_an_sd_model_is_refused(workspace, small_sweep):
    path, _ = sdxl_lora(workspace)
    overrides = [f"+loras.xl={{source: {path}}}", "sweep.grid.lora_model=[sunset,xl]"]
    check_refused(workspace, small_sweep, "run", overrides, "loras.xl: is an SDXL LoRA but model 'tiny-sd' is not SDXL")


@pytest.mark.parametrize("make", [not_a_lora, corrupt_safetensors, lycoris_loha])
def test_bad_lora_files_are_refused_before_loading(workspace, small_sweep, make):
    path, expected = make(workspace)
    overrides = [f"+loras.bad={{source: {path}}}", "sweep.grid.lora_model=[sunset,bad]"]
    check_refused(workspace, small_sweep, "run", overrides, f"loras.bad.source: {path.name} {expected}")


def test_model_folder_with_a_missing_component_is_refused(workspace, small_sweep):
    import shutil

    broken = workspace.root / "broken-model"
    shutil.copytree(workspace.assets / "tiny-sd", broken)
    shutil.rmtree(broken / "unet")
    overrides = [f"+models.broken={{source: {broken}}}", "model.id=broken"]
    check_refused(workspace, small_sweep, "run", overrides, "models.broken.source: ")
    result = workspace.cli("plan", f"sweep={small_sweep}", *overrides)
    assert "has no 'unet' folder" in result.err


def test_workers_without_ray_installed_is_one_line_with_the_install_command(workspace, small_sweep):
    shadow = workspace.root / "no-ray"
    (shadow / "ray").mkdir(parents=True)
    (shadow / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")  # as if not installed
    import os

    env = {"PYTHONPATH": os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])}
    result = workspace.cli("plan", f"sweep={small_sweep}", "engine.workers=2", env=env)
    assert result.code == 2 and "Traceback" not in result.err
    assert result.err_lines == ["error: engine.workers: 2 workers need Ray, which is not installed; pip install -e '.[ray]'"]
