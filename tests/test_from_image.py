"""A sweep started from an image: its A1111/Forge `parameters` text as the base request (sweep.base_from), and
`lora-sweep params IMAGE`; lora-sweep's own images read back to their request and id."""

from __future__ import annotations

from PIL import Image, PngImagePlugin

from runner.prepare import prepare_sweep

FORGE = (
    "a red circle on a blue background, <lora:Sunset_v2:0.5>\n"
    "Negative prompt: blurry\n"
    "Steps: 6, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6, Seed: 42, Size: 64x64, Model: tiny-sd, "
    "Clip skip: 1, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent, Denoising strength: 0.5, Version: f2.0.1"
)


def png_with(path, text: str | None):
    info = PngImagePlugin.PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_a_lora_sweep_image_reads_back_to_its_request_and_id(workspace):
    path = workspace.sweep(
        "one",
        {
            "base": {
                "prompt": "a red circle",
                "width": 64,
                "height": 64,
                "num_inference_steps": 4,
                "seed": 5,
                "lora_model": "sunset",
                "lora_strength": 0.5,
            }
        },
    )
    result = workspace.run(f"sweep={path}", "sweep.name=one", "tracking=none")
    result.assert_all_ok()
    image = next((workspace.outputs / "one" / "images").glob("*.png"))
    again = workspace.sweep("again", {"base_from": str(image)})
    prepared = prepare_sweep(workspace.config(f"sweep={again}", "tracking=none"))
    assert prepared.ok, prepared.problems
    assert prepared.plan["id"].tolist() == [image.stem], "the same request: the same id"


def test_a_forge_image_starts_a_sweep_and_what_is_not_applied_is_said(workspace, tmp_path):
    image = png_with(tmp_path / "forge.png", FORGE)
    path = workspace.sweep("from", {"base_from": str(image), "grid": {"seed": [42, 43]}})
    prepared = prepare_sweep(workspace.config(f"sweep={path}", "tracking=none", "+loras.Sunset_v2={source: '${loras.sunset.source}'}"))
    assert prepared.ok, prepared.problems
    row = prepared.plan.iloc[0]
    assert (row["prompt"], row["negative_prompt"], row["num_inference_steps"], row["guidance_scale"]) == (
        "a red circle on a blue background,",
        "blurry",
        6,
        6.0,
    )
    assert (row["scheduler"], bool(row["use_karras_sigmas"]), row["lora_model"], row["lora_strength"]) == (
        "DPMSolverMultistepScheduler",
        True,
        "Sunset_v2",
        "0.5",
    )
    assert sorted(prepared.plan["seed"]) == [42, 43], "the grid varies the image's fields as usual"
    assert any(w.startswith("from_image: Hires fix") for w in prepared.warnings), prepared.warnings


def test_params_prints_the_request_and_an_image_without_parameters_is_one_line(workspace, tmp_path):
    image = png_with(tmp_path / "forge.png", FORGE)
    result = workspace.cli("params", str(image))
    assert result.code == 0, result.err
    assert "prompt: a red circle on a blue background, <lora:Sunset_v2:0.5>" in result.out
    assert "num_inference_steps: 6" in result.out and "from_image: Hires fix" in result.out
    bare = png_with(tmp_path / "bare.png", None)
    path = workspace.sweep("bare", {"base_from": str(bare)})
    prepared = prepare_sweep(workspace.config(f"sweep={path}", "tracking=none"))
    assert prepared.problems == [
        "sweep.base_from: bare.png has no A1111 parameters text; use an image A1111, Forge, ComfyUI or lora-sweep wrote, or set sweep.base"
    ]


def test_from_image_on_the_command_line_is_base_from(workspace, tmp_path):
    from helpers import cli_config

    image = png_with(tmp_path / "forge.png", FORGE)
    cfg = cli_config([*workspace.paths, f"+from_image={image}"])
    assert cfg.sweep.base_from == str(image)
