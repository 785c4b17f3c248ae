"""The image file lora-sweep writes: a PNG whose text chunks carry the request that made it.

`parameters` is the line A1111/Forge write and read (and CivitAI shows as generation data), so a
lora-sweep image opens with its settings in the web UIs; `lora_sweep` holds the full request as JSON.
Plain functions of a row: the background writer and Ray workers both encode with them.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

from PIL import Image, PngImagePlugin

from runner.request import FIELDS, optional, split_loras


def png_bytes(image: Image.Image, row: Mapping[str, Any], hashes: Mapping[str, str]) -> bytes:
    """The PNG with its parameters in text chunks: A1111's `parameters` line and our full request."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(row, hashes))
    request = {k: row.get(k) for k in FIELDS}
    info.add_text("lora_sweep", json.dumps({"id": row["id"], **request}, default=str))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=4)
    return buffer.getvalue()


def a1111_parameters(row: Mapping[str, Any], hashes: Mapping[str, str]) -> str:
    """The `parameters` text the web UIs write and read (prompt, negative prompt, settings line)."""
    settings = [
        f"Steps: {row['num_inference_steps']}",
        f"Sampler: {row.get('scheduler_used') or row['scheduler']}",
        f"CFG scale: {row['guidance_scale']}",
        f"Seed: {row['seed']}",
        f"Size: {row['width']}x{row['height']}",
        f"Model hash: {hashes.get('model:' + str(row['model_id']), '')[:10]}",
        f"Model: {row['model_id']}",
        f"Clip skip: {row['clip_skip']}",
    ]
    loras = split_loras(row.get("lora_model"))
    if loras:
        settings.append('Lora hashes: "' + ", ".join(f"{n}: {hashes.get('lora:' + n, '')[:12]}" for n in loras) + '"')
        settings.append(f'Lora weights: "{row.get("lora_strength")}"')
    vae = optional(row.get("vae"))
    if vae:
        settings += [f"VAE hash: {hashes.get('vae:' + vae, '')[:10]}", f"VAE: {vae}"]
    inversions = split_loras(row.get("embeddings_model"))
    if inversions:
        settings.append('TI hashes: "' + ", ".join(f"{n}: {hashes.get('embeddings:' + n, '')[:12]}" for n in inversions) + '"')
    settings.append(f"lora-sweep id: {row['id']}")
    text = str(row["prompt"])
    if row.get("negative_prompt"):
        text += f"\nNegative prompt: {row['negative_prompt']}"
    return text + "\n" + ", ".join(settings)
