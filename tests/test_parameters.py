"""Reading A1111/Forge `parameters` text (runner/prompts/parameters.py) into a base request, with a line per thing not applied.

Each text is written into a PNG (or a JPEG's EXIF) as the web UIs write it, read back with read_parameters, and
turned into a request against a registry given as plain data; lora-sweep's own text (runner/image_file.py) round-trips.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct

import pytest
from PIL import Image, PngImagePlugin

from runner.image_file import a1111_parameters, png_bytes
from runner.prompts.parameters import base_request, parse_parameters, read_parameters, tensor_data_hash
from runner.request import parse_request


def sha(prefix: str) -> str:
    """A sha256 that starts with the given hash (the rest does not matter to a short hash)."""
    return prefix + "0" * (64 - len(prefix))


FILES = {
    "models": {
        "dreamshaper": (sha("4496b36d48"), "dreamshaper_8.safetensors"),
        "ghostmix": (sha("77777777aa"), "ghostmix_v20Bakedvae.safetensors"),
        "sdxl-base": (sha("31e35c80fc"), "sd_xl_base_1.0.safetensors"),
        "wai": (sha("bdb59bac77"), "waiNSFWIllustrious_v140.safetensors"),
        "flux-dev": (sha("275ef623d3"), "flux1-dev-bnb-nf4-v2.safetensors"),
    },
    "loras": {
        # a third item: the AutoV3 (tensor data) hash, which A1111 writes for .safetensors LoRAs
        "add_detail": (sha("5e5e5e5e5e"), "add_detail.safetensors", sha("7c6bad76eb54")),
        "knight": (sha("6f6f6f6f6f"), "KnightStyle_v2.safetensors"),
        "blue_archive": (sha("1a1a1a1a1a"), "blue_archive.safetensors", sha("3fc8d3abb551")),
        "lighthouse": (sha("9f8e7d6c5b"), "lighthouse_style.safetensors"),
        "watercolor": (sha("2b2b2b2b2b"), "watercolor.safetensors"),
    },
    "embeddings": {
        "EasyNegative": (sha("c74b4e810b03"), "EasyNegative.safetensors"),
        "negxl": (sha("fff5d51ab6"), "negativeXL_D.safetensors"),
    },
    "vaes": {
        "ft-mse": (sha("735e4c3a44"), "vae-ft-mse-840000-ema-pruned.safetensors"),
        "sdxl-vae": (sha("63aeecb90f"), "sdxl_vae.safetensors"),
    },
}

# A1111 1.10: Schedule type, Lora hashes (AutoV3), TI hashes, VAE, Hires fix; a tag with a UNet weight
A1111_110 = (
    "masterpiece, best quality, a knight in ornate armor, <lora:add_detail:0.6>, <lora:KnightStyle_v2:0.8:0.5>\n"
    "Negative prompt: EasyNegative, worst quality, lowres\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 2071383329, Size: 512x768, "
    "Model hash: 4496b36d48, Model: dreamshaper_8, VAE hash: 735e4c3a44, VAE: vae-ft-mse-840000-ema-pruned.safetensors, "
    "Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, Hires steps: 15, Hires upscaler: R-ESRGAN 4x+, "
    'Lora hashes: "add_detail: 7c6bad76eb54, KnightStyle_v2: 3fc8d3abb5ff", TI hashes: "EasyNegative: c74b4e810b03", '
    "Emphasis: Original, Version: v1.10.1"
)
# Forge on SDXL: Schedule type Automatic, Forge's Hires keys, the VAE as `Module 1`
FORGE_SDXL = (
    "1girl, solo, silver hair, school uniform, cherry blossoms, <lora:add_detail:0.4>\n"
    "Negative prompt: lowres, bad anatomy, worst quality\n"
    "Steps: 25, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 3829571040, Size: 832x1216, "
    "Model hash: bdb59bac77, Model: waiNSFWIllustrious_v140, Denoising strength: 0.37, Clip skip: 2, "
    "Hires Module 1: Use same choices, Hires CFG Scale: 5, Hires upscale: 1.5, Hires upscaler: R-ESRGAN 4x+, "
    'Lora hashes: "add_detail: 7c6bad76eb54", Version: f2.0.1v1.10.1-previous-669-gdfdcbab6, Module 1: sdxl_vae'
)
# Forge on Flux: Distilled CFG Scale is the guidance, the modules are the VAE and text encoders
FORGE_FLUX = (
    "a cozy cabin in a snowy forest at dusk, warm light in the windows\n"
    "Steps: 20, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 1577512391, "
    "Size: 896x1152, Model hash: 275ef623d3, Model: flux1-dev-bnb-nf4-v2, Diffusion in Low Bits: Automatic (fp16 LoRA), "
    "Module 1: ae, Module 2: clip_l, Module 3: t5xxl_fp16, Version: f2.0.1v1.10.1-previous-635-gf5330788"
)
# A1111 1.6: the schedule in the sampler's name, two ADetailer units, a LoRA only the ADetailer prompt tags
A1111_16_ADETAILER = (
    "(masterpiece:1.2), best quality, PIXIV, blue archive, <lora:blue archive-000018:0.8>\n"
    "Negative prompt: EasyNegative,badhandsv5-neg,Subtitles,word,\n"
    "Steps: 32, Sampler: DPM++ SDE Karras, CFG scale: 7, Seed: 3089360094, Size: 768x512, Model hash: e3edb8a26f, "
    "Model: ghostmix_v20Bakedvae, Denoising strength: 0.5, Clip skip: 2, ADetailer model: face_yolov8n.pt, "
    'ADetailer prompt: "detailed face, <lora:FaceFix:0.4>", ADetailer confidence: 0.3, ADetailer dilate erode: 4, '
    "ADetailer mask blur: 4, ADetailer denoising strength: 0.4, ADetailer inpaint only masked: True, "
    "ADetailer inpaint padding: 32, ADetailer model 2nd: hand_yolov8n.pt, ADetailer confidence 2nd: 0.3, "
    "ADetailer version: 23.11.0, Hires upscale: 2, Hires steps: 12, Hires upscaler: R-ESRGAN 4x+ Anime6B, "
    'Lora hashes: "blue archive-000018: 3fc8d3abb551, FaceFix: 0a1b2c3d4e5f", '
    'TI hashes: "EasyNegative: 66a7279a88dd, badhandsv5-neg: aa7651be154c", Version: v1.6.0-2-g4afaaf8a'
)
# a ComfyUI image saver's A1111 text: ComfyUI's sampler name, a 64-bit seed, CivitAI's `Hashes` JSON, a folder in Model
COMFYUI = (
    "cinematic photo of a lighthouse on a cliff, stormy sea, dramatic clouds, <lora:lighthouse_style:0.7>\n"
    "Negative prompt: negativeXL_D, cartoon, painting, blurry\n"
    "Steps: 25, Sampler: dpmpp_2m_karras, CFG scale: 5.5, Seed: 884512906348123, Size: 1024x1024, Model hash: 31e35c80fc, "
    'Model: SDXL/sd_xl_base_1.0.safetensors, Hashes: {"model": "31e35c80fc", "lora:lighthouse_style": "9f8e7d6c5b", '
    '"embed:negativeXL_D": "fff5d51ab6"}, Version: ComfyUI'
)
# multi-line prompts, and most of what lora-sweep cannot do
MULTILINE = (
    "a watercolor painting of a fox,\n"
    "sitting in tall grass,\n"
    "BREAK soft morning light <lora:watercolor:0.9>\n"
    "Negative prompt: photo, 3d render,\n"
    "text, watermark,\n"
    "signature\n"
    "Steps: 30, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, Model: v1-5-pruned-emaonly, Variation seed: 12345, "
    "Variation seed strength: 0.3, Seed resize from: -1x-1, RNG: CPU, ENSD: 31337, Face restoration: CodeFormer, "
    "Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8, "
    'ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1", '
    'Civitai resources: [{"type":"lora","weight":0.6,"modelName":"Ink Wash","modelVersionName":"v1"}], Version: v1.8.0'
)

P = "from_image: "
CASES = {
    "a1111-1.10": (
        A1111_110,
        {
            "prompt": "masterpiece, best quality, a knight in ornate armor, <lora:add_detail:0.6>, <lora:knight:0.8:0.5>",
            "negative_prompt": "EasyNegative, worst quality, lowres",
            "num_inference_steps": 28,
            "scheduler": "DPM++ 2M Karras",
            "guidance_scale": 6.5,
            "seed": 2071383329,
            "width": 512,
            "height": 768,
            "clip_skip": 2,
            "model_id": "dreamshaper",
            "vae": "ft-mse",
            "embeddings_model": "EasyNegative",
        },
        [
            P + "'<lora:KnightStyle_v2:0.8:0.5>': the first weight 0.8 is used for the whole LoRA; "
            "the second (UNet) weight 0.5 is not applied: one strength per LoRA",
            P + "LoRA 'KnightStyle_v2' is registry 'knight' by name; its hash 3fc8d3abb5ff is not the file's sha256 "
            "(A1111 hashes a .safetensors LoRA's tensor data, AutoV3, which registry_files does not give): not compared",
            P + "Hires fix (Hires upscale 2, Hires steps 15, Hires upscaler R-ESRGAN 4x+, Denoising strength 0.45) "
            "is not applied: lora-sweep generates at 512x768",
        ],
    ),
    "forge-sdxl": (
        FORGE_SDXL,
        {
            "prompt": "1girl, solo, silver hair, school uniform, cherry blossoms, <lora:add_detail:0.4>",
            "negative_prompt": "lowres, bad anatomy, worst quality",
            "num_inference_steps": 25,
            "scheduler": "Euler a",
            "guidance_scale": 7.0,
            "seed": 3829571040,
            "width": 832,
            "height": 1216,
            "clip_skip": 2,
            "model_id": "wai",
            "vae": "sdxl-vae",
        },
        [
            P + "Hires fix (Hires Module 1 Use same choices, Hires CFG Scale 5, Hires upscale 1.5, Hires upscaler R-ESRGAN 4x+, "
            "Denoising strength 0.37) is not applied: lora-sweep generates at 832x1216",
        ],
    ),
    "forge-flux": (
        FORGE_FLUX,
        {
            "prompt": "a cozy cabin in a snowy forest at dusk, warm light in the windows",
            "negative_prompt": "",
            "num_inference_steps": 20,
            "scheduler": "Euler Simple",
            "guidance_scale": 3.5,
            "seed": 1577512391,
            "width": 896,
            "height": 1152,
            "clip_skip": 1,
            "model_id": "flux-dev",
        },
        [
            P + f"Module {i}: {name} (a Forge VAE or text encoder) is not applied: lora-sweep loads the model's own, or the vae field's VAE"
            for i, name in ((1, "ae"), (2, "clip_l"), (3, "t5xxl_fp16"))
        ],
    ),
    "a1111-1.6-adetailer": (
        A1111_16_ADETAILER,
        {
            "prompt": "(masterpiece:1.2), best quality, PIXIV, blue archive, <lora:blue_archive:0.8>",
            "negative_prompt": "EasyNegative,badhandsv5-neg,Subtitles,word,",
            "num_inference_steps": 32,
            "scheduler": "DPM++ SDE Karras",
            "guidance_scale": 7.0,
            "seed": 3089360094,
            "width": 768,
            "height": 512,
            "clip_skip": 2,
            "model_id": "ghostmix",
            "embeddings_model": "EasyNegative",
        },
        [
            P + "model 'ghostmix_v20Bakedvae' is registry 'ghostmix' by name, but the image's hash e3edb8a26f is not that file's: "
            "another version?",
            P + "LoRA 'FaceFix' is in Lora hashes but not tagged in the prompt (it is tagged in ADetailer prompt, a pass lora-sweep "
            "does not run): not applied",
            P + "embedding 'EasyNegative' is registry 'EasyNegative' by name, but the image's hash 66a7279a88dd is not that file's: "
            "another version?",
            P + "embedding 'badhandsv5-neg' (hash aa7651be154c) matches no registry embedding by hash or name: not applied",
            P + "Hires fix (Hires upscale 2, Hires steps 12, Hires upscaler R-ESRGAN 4x+ Anime6B, Denoising strength 0.5) "
            "is not applied: lora-sweep generates at 768x512",
            P + "ADetailer (model face_yolov8n.pt, prompt 'detailed face, <lora:FaceFix:0.4>', denoising strength 0.4, 5 more settings) "
            "is not applied: lora-sweep has no detailer (inpainting) pass",
            P + "ADetailer 2nd unit (model hand_yolov8n.pt, 1 more setting) is not applied: lora-sweep has no detailer (inpainting) pass",
        ],
    ),
    "comfyui": (
        COMFYUI,
        {
            "prompt": "cinematic photo of a lighthouse on a cliff, stormy sea, dramatic clouds, <lora:lighthouse:0.7>",
            "negative_prompt": "negativeXL_D, cartoon, painting, blurry",
            "num_inference_steps": 25,
            "scheduler": "dpmpp_2m_karras",
            "guidance_scale": 5.5,
            "seed": 884512906348123,
            "width": 1024,
            "height": 1024,
            "clip_skip": 1,
            "model_id": "sdxl-base",
            "embeddings_model": "negxl",
        },
        [
            P + "Seed 884512906348123 is above lora-sweep's seed range 0..4294967295 (a ComfyUI seed?): the request will be refused",
            P + "embedding 'negativeXL_D' is registry 'negxl': the prompt calls it 'negativeXL_D', so give that entry token: negativeXL_D "
            "(unless it has that token already)",
        ],
    ),
    "multi-line": (
        MULTILINE,
        {
            "prompt": "a watercolor painting of a fox,\nsitting in tall grass,\nBREAK soft morning light <lora:watercolor:0.9>",
            "negative_prompt": "photo, 3d render,\ntext, watermark,\nsignature",
            "num_inference_steps": 30,
            "scheduler": "Euler a",
            "guidance_scale": 7.0,
            "seed": 42,
            "width": 512,
            "height": 512,
            "clip_skip": 1,
        },
        [
            P + "model 'v1-5-pruned-emaonly' matches no registry model by hash or name: model_id is left to the sweep "
            "(add the checkpoint to the models registry)",
            P + "LoRA 'Ink Wash', version v1, weight 0.6 is named only in Civitai resources (by its CivitAI page, not its file): "
            "not applied; tag it in the prompt with its registry id",
            P + "Refiner (Refiner sd_xl_refiner_1.0 [7440042bbd], Refiner switch at 0.8) is not applied: "
            "lora-sweep runs one model for all steps",
            P + "Variation seed (Variation seed 12345, Variation seed strength 0.3) is not applied: "
            "lora-sweep draws the noise from the seed alone",
            P + "'RNG: CPU' is not applied: lora-sweep draws the noise from the seed with its own generator",
            P + "'ENSD: 31337' is not applied: lora-sweep draws the noise from the seed with its own generator",
            P + "Face restoration (CodeFormer) is not applied: lora-sweep does not restore faces",
            P + "ControlNet 0 (Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1) is not applied: "
            "lora-sweep has no ControlNet",
        ],
    ),
}


def write_png(path, text: str, *, itxt: bool = False) -> None:
    info = PngImagePlugin.PngInfo()
    if itxt:
        info.add_itxt("parameters", text)
    else:
        info.add_text("parameters", text)
    Image.new("RGB", (8, 8), "gray").save(path, pnginfo=info)


@pytest.mark.parametrize("name", list(CASES))
def test_real_world_texts_give_their_base_request_and_a_line_per_thing_not_applied(name, tmp_path):
    text, request, lines = CASES[name]
    path = tmp_path / f"{name}.png"
    write_png(path, text, itxt=name == "comfyui")  # Pillow writes non-Latin-1 text as iTXt; both are read
    read = read_parameters(path)
    assert read == text
    got, got_lines = base_request(parse_parameters(read), FILES)
    assert got == request
    assert got_lines == lines
    assert all(line.startswith("from_image: ") for line in got_lines)


def test_the_parsed_text_keeps_every_key_raw_and_unquoted_and_the_tags():
    params = parse_parameters(A1111_110)
    assert params.settings["Lora hashes"] == "add_detail: 7c6bad76eb54, KnightStyle_v2: 3fc8d3abb5ff"
    assert ("Lora hashes", '"add_detail: 7c6bad76eb54, KnightStyle_v2: 3fc8d3abb5ff"') in params.pairs
    assert params.lora_hashes == {"add_detail": "7c6bad76eb54", "KnightStyle_v2": "3fc8d3abb5ff"}
    assert params.ti_hashes == {"EasyNegative": "c74b4e810b03"}
    assert params.get("cfg SCALE") == "6.5" and params.get("Version") == "v1.10.1"
    assert len(params.pairs) == len(params.settings) == 19
    assert params.settings_line.startswith("Steps: 28,") and params.lines == []
    knight = params.tags[1]
    assert (knight.kind, knight.name, knight.weight, knight.unet_weight) == ("lora", "KnightStyle_v2", 0.8, 0.5)
    assert params.prompt[knight.start : knight.end] == "<lora:KnightStyle_v2:0.8:0.5>"
    comfy = parse_parameters(COMFYUI)
    assert comfy.hashes == {"model": "31e35c80fc", "lora:lighthouse_style": "9f8e7d6c5b", "embed:negativeXL_D": "fff5d51ab6"}
    assert json.loads(parse_parameters(MULTILINE).settings["Civitai resources"])[0]["modelName"] == "Ink Wash"


def test_tags_lyco_defaults_and_named_weights():
    params = parse_parameters("a <lora:sunset> b <LyCO:stripes:0.7:unet=0.3:dyn=8> c <lora:star:x>\nSteps: 5, Sampler: Euler, Seed: 1")
    sunset, stripes, star = params.tags
    assert (sunset.weight, sunset.unet_weight) == (1.0, None)
    assert (stripes.kind, stripes.weight, stripes.unet_weight, stripes.extra) == ("LyCO", 0.7, 0.3, ("dyn=8",))
    assert star.unreadable == "x" and star.weight == 1.0
    files = {"loras": {"sun": (sha("aa11aa11aa"), "sunset.safetensors"), "stripes": (sha("bb"), "x.safetensors")}}
    request, lines = base_request(params, files)
    assert request["prompt"] == "a <lora:sun> b <LyCO:stripes:0.7:unet=0.3:dyn=8> c <lora:star:x>"
    assert lines == [
        P + "'<LyCO:stripes:0.7:unet=0.3:dyn=8>': the first weight 0.7 is used for the whole LoRA; "
        "the second (UNet) weight 0.3 is not applied: one strength per LoRA",
        P + "'<LyCO:stripes:0.7:unet=0.3:dyn=8>': dyn=8 is not applied: lora-sweep reads a name and one strength",
        P + "'<lora:star:x>': the weight 'x' is not a number: 1 is used",
        P + "LoRA tag '<lora:star:x>' matches no registry LoRA by hash or name: add it to the loras registry",
    ]


def test_the_older_sampler_name_and_an_explicit_schedule_are_one_scheduler_name():
    def scheduler(settings: str) -> str:
        return base_request(parse_parameters("p\n" + settings), {})[0]["scheduler"]

    assert scheduler("Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1") == "DPM++ 2M Karras"
    assert scheduler("Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1") == "DPM++ 2M Karras"
    assert scheduler("Steps: 20, Sampler: DPM++ 2M Karras, Schedule type: Karras, CFG scale: 7, Seed: 1") == "DPM++ 2M Karras"
    assert scheduler("Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1") == "Euler a"
    assert scheduler("Steps: 20, Sampler: euler, Scheduler: karras, CFG Scale: 7, Seed: 1") == "euler karras"


# ---------------------------------------------------------------- lora-sweep's own text


def sweep_row(**fields):
    request, problems = parse_request(fields)
    assert problems == []
    return {**request, "id": "3f2a9c0d1e4b5a67", "scheduler_used": request["scheduler"]}


ROUND_TRIP_FIELDS = (
    "prompt",
    "negative_prompt",
    "num_inference_steps",
    "scheduler",
    "guidance_scale",
    "seed",
    "width",
    "height",
    "clip_skip",
    "model_id",
    "lora_model",
    "lora_strength",
    "vae",
    "embeddings_model",
)
SWEEP_HASHES = {
    "model:tiny-sd": hashlib.sha256(b"model").hexdigest(),
    "lora:sunset": hashlib.sha256(b"sunset").hexdigest(),
    "lora:stripes": hashlib.sha256(b"stripes").hexdigest(),
    "vae:tiny-vae": hashlib.sha256(b"vae").hexdigest(),
    "embeddings:shapes": hashlib.sha256(b"shapes").hexdigest(),
}
SWEEP_FILES = {
    "models": {"tiny-sd": (SWEEP_HASHES["model:tiny-sd"], "tiny-sd")},
    "loras": {n: (SWEEP_HASHES[f"lora:{n}"], f"{n}.safetensors") for n in ("sunset", "stripes")},
    "vaes": {"tiny-vae": (SWEEP_HASHES["vae:tiny-vae"], "vae")},
    "embeddings": {"shapes": (SWEEP_HASHES["embeddings:shapes"], "shapes.pt")},
}


@pytest.mark.parametrize(
    "fields",
    [
        {
            "prompt": "a red circle on a blue background,\nsoft light",
            "negative_prompt": "blurry, text",
            "model_id": "tiny-sd",
            "lora_model": "sunset,stripes",
            "lora_strength": "0.45,0.8",
            "vae": "tiny-vae",
            "embeddings_model": "shapes",
            "seed": 3,
            "scheduler": "DPMSolverMultistepScheduler",
            "clip_skip": 2,
            "guidance_scale": 6.5,
            "width": 256,
            "height": 128,
            "num_inference_steps": 12,
        },
        {"prompt": "a yellow triangle on a purple background", "model_id": "tiny-sd", "seed": 0},
        {"prompt": "a green square", "model_id": "tiny-sd", "lora_model": "stripes", "lora_strength": 0.5, "seed": 4294967295},
    ],
)
def test_lora_sweeps_own_png_round_trips_to_the_rows_request(fields, tmp_path):
    row = sweep_row(**fields)
    path = tmp_path / "image.png"
    path.write_bytes(png_bytes(Image.new("RGB", (8, 8)), row, SWEEP_HASHES))
    request, lines = base_request(parse_parameters(read_parameters(path)), SWEEP_FILES)
    assert lines == []
    expected = {k: row[k] for k in ROUND_TRIP_FIELDS if row[k] not in (None, "")} | {"negative_prompt": row["negative_prompt"]}
    assert request == expected


def test_lora_sweeps_text_without_hashes_matches_by_name_and_writes_the_scheduler_it_ran():
    row = sweep_row(prompt="p", model_id="tiny-sd", lora_model="sunset", lora_strength=0.7, scheduler="KarrasVeScheduler", seed=7)
    row["scheduler_used"] = "EulerDiscreteScheduler"  # the spec name was substituted; the text names what ran
    request, lines = base_request(parse_parameters(a1111_parameters(row, {})), SWEEP_FILES)
    assert (request["scheduler"], request["model_id"], request["lora_model"], request["lora_strength"]) == (
        "EulerDiscreteScheduler",
        "tiny-sd",
        "sunset",
        "0.7",
    )
    assert lines == []


def test_a_tag_and_lora_weights_together_apply_each_lora_once():
    """A row whose prompt keeps a tag that its blend also holds: the tag stays, lora_model gets only the others."""
    row = sweep_row(prompt="p <lora:sunset:0.45>", model_id="tiny-sd", lora_model="sunset,stripes", lora_strength="0.45,0.8", seed=7)
    request, lines = base_request(parse_parameters(a1111_parameters(row, SWEEP_HASHES)), SWEEP_FILES)
    assert (request["prompt"], request["lora_model"], request["lora_strength"]) == ("p <lora:sunset:0.45>", "stripes", "0.8")
    assert lines == []


# ---------------------------------------------------------------- odd input never crashes


ODD = {
    "": [P + "the parameters text is empty", P + "the image has no prompt"],
    "just a prompt, style: anime, mood: dark, light: soft": [
        P + "no settings line (`Steps: ..., Sampler: ...`) found: only the prompts were read"
    ],
    'p\nSteps: 20, Sampler: Euler, CFG scale: 7, Lora hashes: "a: 0123456789ab, Seed: 5': [
        P + "'Lora hashes: \"a: 0123456789ab' has an unclosed quote: read up to the next comma",
        P + "LoRA 'a' is in Lora hashes but not tagged in the prompt (A1111 lists the LoRAs of other passes' prompts there too): "
        "not applied",
    ],
    'p\nSteps: 20, Sampler: Euler, CFG scale: 7, Tiled Diffusion: {"a": [1, 2, Seed: 5': [
        P + "'Tiled Diffusion: {\"a\": [1' has an unclosed bracket: read up to the next comma",
        P + "'2' in the settings line is not a `key: value` pair: not read",
        P + "'Tiled Diffusion: {\"a\": [1' is not applied: lora-sweep generates the image in one piece",
    ],
    "p <lora:> <hypernet:h:1>\nNegative prompt: <lora:z:1>\nSteps: twenty, Sampler: Euler, CFG scale: x, Seed: -1, Size: 512 by 512, "
    "Clip skip: 2.5, garbage here, Steps: 30, Model hash: 12345678, Model: foo": [
        P + "'Steps' is written twice ('twenty', '30'): the last is read",
        P + "'garbage here' in the settings line is not a `key: value` pair: not read",
        P + "'<lora:>' names no LoRA: left as text",
        P + "CFG scale 'x' is not a number: guidance_scale is left to the sweep",
        P + "Seed -1 means a random seed: seed is left to the sweep",
        P + "Size '512 by 512' is not WIDTHxHEIGHT: width and height are left to the sweep",
        P + "Clip skip '2.5' is not an integer: clip_skip is left to the sweep",
        P + "model 'foo' (hash 12345678) matches no registry model by hash or name (an 8-digit Model hash is A1111's old AutoV1, "
        "of 64 KiB of the file, which no sha256 can be compared with): "
        "model_id is left to the sweep (add the checkpoint to the models registry)",
        P + "'<lora:z:1>' in the negative prompt is not applied: LoRAs are applied from the prompt's tags",
        P + "'<hypernet:h:1>' (a hypernetwork) is not applied: lora-sweep has no hypernetworks",
    ],
}


@pytest.mark.parametrize("text", list(ODD))
def test_odd_texts_give_what_could_be_read_and_a_line_for_the_rest(text):
    request, lines = base_request(parse_parameters(text), FILES)
    assert lines == ODD[text]
    assert request["prompt"] == text.split("\n")[0]


def test_a_one_line_export_is_split_at_steps():
    text = "A generic prompt text.,.Negative prompt: .Steps: 4, Sampler: Euler, CFG scale: 1.0, Seed: 10, Size: 1088x1920, Version: ComfyUI"
    request, lines = base_request(parse_parameters(text), FILES)
    assert (request["prompt"], request["negative_prompt"], request["num_inference_steps"], request["height"]) == (
        "A generic prompt text",
        "",
        4,
        1920,
    )
    assert lines == [P + "the settings line began inside the prompt's last line: read from 'Steps: 4, Sampler: Euler, C...'"]


def test_every_cut_of_a_real_text_parses_without_raising():
    for text in (A1111_16_ADETAILER, MULTILINE, COMFYUI):
        for end in range(0, len(text), 3):
            request, lines = base_request(parse_parameters(text[:end]), FILES)
            assert isinstance(request["prompt"], str) and all(line.startswith(P) for line in lines)


# ---------------------------------------------------------------- files


def test_read_parameters_reads_jpeg_and_webp_exif_user_comments_and_says_none_when_there_is_none(tmp_path):
    text = A1111_110
    for name, encoded in (("be.jpg", text.encode("utf-16-be")), ("le.webp", text.encode("utf-16-le"))):
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + encoded  # A1111 writes it with piexif, encoding "unicode"
        Image.new("RGB", (8, 8)).save(tmp_path / name, exif=exif)
        assert read_parameters(tmp_path / name) == text
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert read_parameters(tmp_path / "plain.png") is None
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    (tmp_path / "plain.jpg").write_bytes(buffer.getvalue())
    assert read_parameters(tmp_path / "plain.jpg") is None


def test_tensor_data_hash_is_a1111s_lora_hash_and_matches_as_the_third_item(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"ss_output_name": "x"}}).encode()
    data = struct.pack("<2f", 0.5, -1.0)
    path = tmp_path / "style.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    autov3 = tensor_data_hash(path)
    assert autov3 == hashlib.sha256(data).hexdigest() != hashlib.sha256(path.read_bytes()).hexdigest()
    text = f'p <lora:Style v1:0.5>\nSteps: 20, Sampler: Euler, Seed: 1, Lora hashes: "Style v1: {autov3[:12]}"'
    files = {"loras": {"style": (hashlib.sha256(path.read_bytes()).hexdigest(), "style-renamed.safetensors", autov3)}}
    request, lines = base_request(parse_parameters(text), files)
    assert (request["prompt"], lines) == ("p <lora:style:0.5>", [])
