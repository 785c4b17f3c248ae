"""Bad input is refused before the first image: every problem at once, one line each naming the field and the fix.

The rules are checked in this process, through what `lora-sweep plan` and `run` call: runner/cli.py's sweep-file
loading and composition precheck, then runner.prepare's plan_or_fail. A few real CLI runs at the end check what
only the CLI can show: exit code 2, one `error:` line per problem on stderr, no traceback, nothing generated.
"""

from __future__ import annotations

import shutil
import sys

import pandas as pd
import pytest

from runner import cli
from runner.config import register_configs
from runner.errors import UserError
from runner.prepare import plan_or_fail, prepare_sweep


def refused(ws, sweep, *overrides) -> list[str]:
    """The lines `lora-sweep plan sweep=SWEEP OVERRIDES` prints as `error: ...`; fails if the plan is accepted."""
    with pytest.raises(UserError) as refusal:
        plan_or_fail(ws.config(f"sweep={sweep}", *overrides))
    lines = refusal.value.lines
    assert lines and all(line.strip() and "\n" not in line for line in lines), lines  # one line per problem
    return lines


def planned(ws, sweep, *overrides, capsys) -> list[str]:
    """What `lora-sweep plan` prints for a valid plan (it also writes plan-preview.parquet)."""
    capsys.readouterr()
    cli.plan_command(ws.config(f"sweep={sweep}", *overrides))
    return capsys.readouterr().out.splitlines()


# ---------------------------------------------------------------- the request rules, field by field

BAD_REQUESTS = [
    (["sweep.grid.lora_model=[sunset,nope]"], "lora_model: unknown LoRA id 'nope'"),
    (["sweep.grid.lora_model=[sunst]"], "did you mean 'sunset'"),
    (["sweep.grid.lora_model=[sunset]", "sweep.grid.lora_strength=['0.4,0.5']"], "lora_strength: 2 strengths for 1 LoRAs"),
    (["sweep.grid.lora_strength=[1.5]"], "lora_strength: 1.5 is outside 0.1..1"),
    (["sweep.base.width=100"], "width: 100 must be a multiple of 8"),
    (["sweep.base.height=4096"], "height: 4096 must be a multiple of 8 in 8..2048"),
    (["sweep.base.samples=5"], "samples: 5 is outside 1..4"),
    (["sweep.base.guidance_scale=25"], "guidance_scale: 25 is outside 0..20"),
    (["sweep.base.clip_skip=9"], "clip_skip: 9 is outside 1..8"),
    (["sweep.grid.scheduler=[EulerDiscrete]"], "did you mean 'EulerDiscreteScheduler'"),
    (["sweep.grid.scheduler=[DDIMInverseScheduler]"], "scheduler: DDIMInverseScheduler inverts an image"),
    (["sweep.grid.scheduler=[KarrasVeScheduler]"], "use EulerDiscreteScheduler"),
    (["sweep.base.guidanc_scale=5"], "did you mean 'guidance_scale'"),
    (["sweep.base.width=abc"], "width: expected an integer"),
    (["sweep.base.key=abc123"], "key: API keys do not belong in sweep files"),
    (["sweep.base.safety_checker=maybe"], 'safety_checker: expected "yes" or "no"'),
    (["sweep.grid.seed=[-5]"], "seed: seed must be in 0.."),
    (["sweep.grid.seed=[]"], "sweep.grid.seed: is an empty list"),
    (["sweep.grid.lora_model={pairs: [sunset]}", "~sweep.grid.lora_strength"], "sweep.grid.lora_model: generates no blends"),
    (["sweep.max_images=5"], "sweep.max_images: the plan has"),
    (["sweep.scores=[clip_score,aesthetics]"], "sweep.scores: unknown scorer 'aesthetics'; did you mean 'aesthetic'?"),
]


@pytest.mark.parametrize("overrides, expected", BAD_REQUESTS, ids=[e for _, e in BAD_REQUESTS])
def test_bad_requests_are_refused(workspace, small_sweep, overrides, expected):
    lines = refused(workspace, small_sweep, *overrides)
    assert any(expected in line for line in lines), lines


# ---------------------------------------------------------------- the registry: ids, paths, files

BAD_REGISTRY = [
    (["model.id=nope"], "model_id: unknown model id 'nope'"),
    (
        ["models.tiny-sd.source=/does/not/exist", "models.tiny-sd.builtin=false"],
        "models.tiny-sd.source: path /does/not/exist does not exist",
    ),
    (["++sweep.base.vae=mse"], "vae: unknown VAE id 'mse'; add it under `vaes:` in the config"),
    (["++sweep.base.embeddings_model=easyneg", "+embeddings.easynegative={source: /e.pt}"], "did you mean 'easynegative'"),
    (["++sweep.base.vae=mse", "+vaes.mse={source: /no/vae}"], "vaes.mse.source: path /no/vae does not exist"),
    (["++sweep.base.vae=mse", "+vaes.mse={source: /x, confg: /y}"], "vaes.mse.confg: unknown key; did you mean 'config'?"),
    (["++sweep.base.upscale=yes", "upscaler.source=/no/upscaler"], "upscaler.source: path /no/upscaler does not exist"),
    (["+loras.x={weight_name: a.safetensors}", "sweep.grid.lora_model=[x]"], "loras.x: needs a source"),
    (["+loras.x={source: /tmp/a.safetensors, wieght_name: a}", "sweep.grid.lora_model=[x]"], "did you mean 'weight_name'"),
]


@pytest.mark.parametrize("overrides, expected", BAD_REGISTRY, ids=[e for _, e in BAD_REGISTRY])
def test_bad_registry_entries_are_refused(workspace, small_sweep, overrides, expected):
    lines = refused(workspace, small_sweep, *overrides)
    assert any(expected in line for line in lines), lines


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


def lycoris_oft(ws):
    return write_safetensors(ws.root / "oft.safetensors", ["lora_unet_down_blocks_0.oft_blocks"]), "is a LyCORIS OFT"


@pytest.mark.parametrize("make", [not_a_lora, corrupt_safetensors, lycoris_oft])
def test_bad_lora_files_are_refused_before_loading(workspace, small_sweep, make):
    path, expected = make(workspace)
    lines = refused(workspace, small_sweep, f"+loras.bad={{source: {path}}}", "sweep.grid.lora_model=[sunset,bad]")
    assert any(f"loras.bad.source: {path.name} {expected}" in line for line in lines), lines


def test_an_sdxl_lora_on_an_sd_model_is_refused(workspace, small_sweep):
    names = [
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
    ]
    path = write_safetensors(workspace.root / "xl.safetensors", names)
    lines = refused(workspace, small_sweep, f"+loras.xl={{source: {path}}}", "sweep.grid.lora_model=[sunset,xl]")
    assert any("loras.xl: is an SDXL LoRA but model 'tiny-sd' is SD 1.x/2.x" in line for line in lines), lines


def test_model_folder_with_a_missing_component_is_refused(workspace, small_sweep):
    broken = workspace.root / "broken-model"
    shutil.copytree(workspace.assets / "tiny-sd", broken)
    shutil.rmtree(broken / "unet")
    lines = refused(workspace, small_sweep, f"+models.broken={{source: {broken}}}", "model.id=broken")
    assert [line for line in lines if line.startswith("models.broken.source: ")], lines
    assert any("has no 'unet' folder" in line for line in lines), lines


# ---------------------------------------------------------------- the engine's settings

BAD_SETTINGS = [
    (["validation.max_lora_strength=5"], "validation.max_lora_strength"),
    (["engine.kind=gpu"], "engine.kind: unknown engine 'gpu'"),
    (["engine.batch_size=0"], "engine.batch_size: 0 is not a batch size; use 1 or more, or auto (the default)"),
    (["engine.batch_size=abc"], "engine.batch_size: abc is not a batch size"),
    (["engine.batch_size=-2"], "engine.batch_size: -2 is not a batch size"),
    (["engine.fuse_loras=maybe"], "engine.fuse_loras: 'maybe' is not true, false or auto"),
    (["engine.compile=true", "engine.fuse_loras=false"], "engine.compile: a compiled UNet runs blends fused"),
    (["engine.workers=0"], "engine.workers: 0 is below 1; use 1 (this process) or the number of GPUs"),
    (["engine=remote", "engine.workers=2"], "engine.workers: applies to the local engine; the remote engine's concurrency is"),
]


@pytest.mark.parametrize("overrides, expected", BAD_SETTINGS, ids=[e for _, e in BAD_SETTINGS])
def test_bad_engine_settings_are_refused(workspace, small_sweep, overrides, expected):
    lines = refused(workspace, small_sweep, *overrides)
    assert any(expected in line for line in lines), lines


def test_workers_without_ray_installed_is_one_line_with_the_install_command(workspace, small_sweep, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as if not installed
    assert refused(workspace, small_sweep, "engine.workers=2") == [
        "engine.workers: 2 workers need Ray, which is not installed; pip install -e '.[ray]'"
    ]


# ---------------------------------------------------------------- all at once, once each, and what is allowed


def test_every_problem_is_reported_at_once(workspace, small_sweep):
    lines = refused(workspace, small_sweep, "sweep.base.width=100", "sweep.base.clip_skip=0", "sweep.base.guidance_scale=25")
    assert [line.split(":")[0] for line in lines] == ["width", "guidance_scale", "clip_skip"]


def test_problems_shared_by_rows_are_said_once_with_a_count(workspace, small_sweep):
    lines = refused(workspace, small_sweep, "sweep.grid.lora_strength=[1.5]")
    assert len(lines) == 1 and "(4 rows)" in lines[0], lines


def test_strength_above_one_allowed_when_configured(workspace, small_sweep):
    prepared = prepare_sweep(workspace.config(f"sweep={small_sweep}", "sweep.grid.lora_strength=[1.5]", "validation.max_lora_strength=2"))
    assert prepared.problems == [] and set(prepared.plan["lora_strength"]) == {"1.5", "1.5,1.5"}


def test_substituted_scheduler_is_recorded_not_refused(workspace, small_sweep, capsys):
    out = planned(workspace, small_sweep, "sweep.grid.scheduler=[IPNDMScheduler]", "engine.substitute_schedulers=true", capsys=capsys)
    warnings = [line for line in out if line.startswith("warning: ")]
    assert len(warnings) == 1 and "warning: IPNDMScheduler" in warnings[0] and "ran PNDMScheduler instead" in warnings[0], out
    plan = pd.read_parquet(workspace.outputs / "small" / "plan-preview.parquet")
    assert set(plan["scheduler_used"]) == {"PNDMScheduler"}
    assert plan["notes"].str.contains("ran PNDMScheduler instead").all()


def test_fields_the_engine_cannot_honour_warned_once(workspace, small_sweep, capsys):
    out = planned(workspace, small_sweep, "sweep.base.enhance_prompt=yes", "sweep.base.upscale=yes", capsys=capsys)
    warnings = [line for line in out if line.startswith("warning:")]
    assert len(warnings) == 2, out
    assert any("enhance_prompt not applied" in w for w in warnings)
    assert any("upscale not applied: no upscaler model is configured (set upscaler.source)" in w for w in warnings)


def test_a_base_field_that_an_axis_replaces_is_warned_about_once(workspace, small_sweep, capsys):
    out = planned(workspace, small_sweep, "sweep.base.seed=5", "sweep.base.scheduler=DDIMScheduler", capsys=capsys)
    assert [line for line in out if line.startswith("warning: sweep.base.")] == [
        "warning: sweep.base.seed=5 is not used: the axis sweep.grid.seed sets it on every row; "
        "to use the base value, remove the axis (~sweep.grid.seed)"
    ]


# ---------------------------------------------------------------- before the plan: sweep files and overrides


def test_sweep_files_that_cannot_be_read_are_one_line(workspace):
    broken = workspace.sweep("broken", "base:\n  prompt: [unclosed\n")
    typo = workspace.sweep("typo", {"base": {"prompt": "x"}, "gird": {"seed": [1]}})
    cases = [
        (broken, ["is not valid YAML", "line 3"]),
        (typo, ["sweep.gird: unknown key", "did you mean 'grid'"]),
        (workspace.root / "missing.yaml", ["sweep: file", "does not exist"]),
    ]
    for path, expected in cases:
        with pytest.raises(UserError) as refusal:
            cli.register_sweeps([f"sweep={path}"])
        assert len(refusal.value.lines) == 1 and all(e in refusal.value.lines[0] for e in expected), refusal.value.lines


def test_unknown_sweep_name_suggests(workspace, small_sweep, monkeypatch):
    monkeypatch.chdir(workspace.root)  # ./sweeps holds small.yaml
    with pytest.raises(UserError) as refusal:
        cli.register_sweeps(["sweep=smal"])
    assert len(refusal.value.lines) == 1 and "did you mean 'small'" in refusal.value.lines[0]


BAD_COMPOSITION = [
    (["+embeddings.a={source: x, token: <x>}"], "override '+embeddings.a={source: x, token: <x>}': cannot be parsed near '<x>}'"),
    (["engine.batchsize=2"], "engine.batchsize: Key 'batchsize' not in 'EngineConfig'; did you mean 'batch_size'?"),
    (["tracking=nonee"], "tracking: no option 'nonee'; did you mean 'none'?"),
    (["paths.outputs=/etc/passwd/outputs"], "paths.outputs: cannot write /etc/passwd/outputs"),
]


@pytest.mark.parametrize("overrides, expected", BAD_COMPOSITION, ids=[e for _, e in BAD_COMPOSITION])
def test_overrides_hydra_cannot_compose_are_one_line(workspace, small_sweep, overrides, expected):
    register_configs()
    argv, sweep = cli.register_sweeps([f"sweep={small_sweep}", *workspace.paths, *overrides])
    with pytest.raises(UserError) as refusal:
        cli.precheck_composition(cli.request_overrides(argv, sweep))
    assert len(refusal.value.lines) == 1 and refusal.value.lines[0].startswith(expected), refusal.value.lines


# ---------------------------------------------------------------- what only the CLI shows


def check_refused_by_cli(ws, command, *overrides, lines):
    """Exit 2, exactly the refusal's lines as `error:` lines on stderr (one per problem), no traceback, nothing made."""
    result = ws.cli(command, *overrides)
    assert result.code == 2, result.out + result.err
    assert "Traceback" not in result.err
    assert result.err_lines == [f"error: {line}" for line in lines], result.err
    assert not (ws.outputs / "small" / "images").exists()
    assert not (ws.outputs / "mlflow.db").exists()


def test_plan_exits_2_with_one_error_line_per_problem(workspace, small_sweep):
    overrides = ["sweep.base.width=100", "sweep.base.clip_skip=0", "sweep.base.guidance_scale=25"]
    lines = refused(workspace, small_sweep, *overrides)
    assert len(lines) == 3
    check_refused_by_cli(workspace, "plan", f"sweep={small_sweep}", *overrides, lines=lines)


def test_run_refuses_bad_input_before_the_first_image(workspace, small_sweep):
    overrides = ["sweep.grid.lora_model=[sunset,nope]", "sweep.grid.scheduler=[DDIMInverseScheduler]"]
    lines = refused(workspace, small_sweep, *overrides)
    assert len(lines) == 2
    check_refused_by_cli(workspace, "run", f"sweep={small_sweep}", *overrides, lines=lines)


def test_run_refuses_a_bad_lora_file_before_loading_anything(workspace, small_sweep):
    path, _ = corrupt_safetensors(workspace)
    overrides = [f"+loras.bad={{source: {path}}}", "sweep.grid.lora_model=[sunset,bad]"]
    check_refused_by_cli(workspace, "run", f"sweep={small_sweep}", *overrides, lines=refused(workspace, small_sweep, *overrides))


def test_an_override_hydra_cannot_parse_is_one_line_not_hydras_report(workspace, small_sweep):
    override = "+embeddings.a={source: x, token: <x>}"
    check_refused_by_cli(workspace, "plan", f"sweep={small_sweep}", override, lines=refused(workspace, small_sweep, override))


def test_web_ui_prompt_syntax_is_said_where_it_is_not_applied():
    """Attention weights on a family without the weighted encoder, and a tag's second weight: said once per text."""
    from runner.prepare import prompt_warnings

    plan = pd.DataFrame(
        {
            "model_id": ["qwen", "sd", "sd"],
            "prompt": ["a (red:1.5) circle", "a (red:1.5) circle", "a red circle"],
            "prompt_original": [None, "a (red:1.5) circle <lora:star:0.8:x>", None],
            "negative_prompt": ["", "", "blurry"],
        }
    )
    lines = prompt_warnings(plan, {"qwen": "qwen-image", "sd": "sd"})
    assert lines == [
        "prompt: the second weight of '<lora:star:0.8:x>' is not a number: the LoRA runs at one strength",
        "prompt: 'a (red:1.5) circle': attention weights and BREAK are not applied on Qwen-Image models ('qwen'); "
        "the words are encoded without the syntax",
    ]
    assert prompt_warnings(plan[plan["model_id"] == "sd"].assign(prompt_original=None), {"sd": "sd"}) == []
