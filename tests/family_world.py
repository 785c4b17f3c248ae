"""Tiny models of every family with two LoRAs each, built on first use and shared by the tests of a session.

`FamilyWorld.get(name)` builds `tests/tiny_families.py`'s pipeline `name` as a diffusers folder and two random peft
LoRAs on its transformer (saved with the pipeline's own `save_lora_weights`, as trainers' diffusers/ai-toolkit files
are), and gives the registry overrides a sweep needs (`+models.m`, `+loras.a`, `+loras.b`). `hand_merged` is the
reference the engine's fused blends are checked against: the same tiny model with the LoRA deltas written into
its weights by hand, run by diffusers directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiny_families import FAMILIES as TINY
from tiny_families import build_tiny_family

# the tiny pipeline of each family of runner/families.py (SD and SDXL have theirs in tiny_models.py)
TINY_OF = {
    "flux": "flux-dev",
    "flux-schnell": "flux-schnell",
    "flux2": "flux2",
    "flux2-klein": "flux2-klein",
    "flux2-klein-distilled": "flux2-klein-dist",
    "qwen-image": "qwen-image",
    "z-image": "z-image",
    "sd3": "sd3",
    "chroma": "chroma",
}
LORA_SEEDS = {"a": 10, "b": 11}
# beyond the attention layers: the MLPs trainers also target (and that tell a Qwen-Image LoRA from others by its keys)
EXTRA_TARGETS = {"qwen-image": ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")}


@dataclass
class FamilyModel:
    family: str  # runner/families.py's name
    tiny: str  # tests/tiny_families.py's name
    folder: Path
    loras: dict[str, Path]

    @property
    def overrides(self) -> list[str]:
        """The registry entries of a sweep on this model: model `m`, LoRAs `a` and `b`."""
        entries = [f"+models.m={{source: '{self.folder}'}}", "model.id=m"]
        return entries + [f"+loras.{name}={{source: '{path}'}}" for name, path in self.loras.items()]


class FamilyWorld:
    def __init__(self, root: Path):
        self.root = root
        self.models: dict[str, FamilyModel] = {}

    def get(self, family: str) -> FamilyModel:
        if family not in self.models:
            self.models[family] = self._build(family, TINY_OF[family])
        return self.models[family]

    def _build(self, family: str, tiny: str) -> FamilyModel:
        import diffusers
        import torch
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict

        folder = build_tiny_family(tiny, self.root / tiny)
        pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
        loras = {}
        for name, seed in LORA_SEEDS.items():
            torch.manual_seed(seed)
            targets = [*TINY[tiny].lora_targets, *EXTRA_TARGETS.get(family, ())]
            config = LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False)
            pipe.transformer.add_adapter(config, adapter_name=name)
            layers = get_peft_model_state_dict(pipe.transformer, adapter_name=name)
            pipe.transformer.delete_adapters(name)
            out = self.root / f"{tiny}-{name}"
            type(pipe).save_lora_weights(save_directory=str(out), transformer_lora_layers=layers, weight_name="lora.safetensors")
            loras[name] = out / "lora.safetensors"
        return FamilyModel(family, tiny, folder, loras)


def hand_merged(model: FamilyModel, blend: dict[str, float], call: dict, seed: int):
    """Pixels (uint8 HxWx3) of the tiny model with W += strength * B @ A (alpha = rank) per LoRA, run by diffusers."""
    from safetensors.torch import load_file

    edits = []
    for name, strength in blend.items():
        tensors = load_file(str(model.loras[name]))
        for key, a in tensors.items():
            if ".lora_A." in key:
                b = tensors[key.replace(".lora_A.", ".lora_B.")]
                edits.append(
                    ("transformer", key.removeprefix("transformer.").split(".lora_A.")[0], slice(None), strength * (b.float() @ a.float()))
                )
    return merged_render(model, edits, call, seed)


def merged_render(model: FamilyModel, edits: list[tuple[str, str, slice, Any]], call: dict, seed: int):
    """Pixels (uint8 HxWx3) of the tiny model with each (component, layer, rows, delta) added to that layer's weight
    rows, run by diffusers directly: the reference the engine's fused LoRAs are checked against."""
    import diffusers
    import numpy as np
    import torch

    pipe = diffusers.DiffusionPipeline.from_pretrained(model.folder)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for component, layer, rows, delta in edits:
            weight = getattr(pipe, component).get_submodule(layer).weight
            weight[rows] += delta.to(weight.dtype)
        image = pipe(**call, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
    return (np.clip(image, 0, 1) * 255).round().astype(np.int16)


def blend_of(row) -> dict[str, float]:
    names = row["lora_model"].split(",")
    return dict(zip(names, [float(s) for s in row["lora_strength"].split(",")]))


def family_call(family: str, row) -> dict:
    """The pipeline call the sweep's row asks for, written out from the family table (prompt as one string)."""
    from runner.families import FAMILIES

    f = FAMILIES[family]
    call = {"prompt": row["prompt"], "width": 64, "height": 64, "num_inference_steps": int(row["num_inference_steps"])}
    if f.guidance != "none":
        call["guidance_scale"] = float(row["guidance_scale"])
    if f.negative_prompt:
        call["negative_prompt"] = row["negative_prompt"] or ""
    return call
