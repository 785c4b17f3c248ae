"""Labelled comparison grids from the sweep folder (reads only the store; never generates).

`report.grid: {x: lora_strength, y: lora_model}` puts those fields on the axes and draws one grid
per combination of the sweep's other axes (for example per scheduler and seed). The pseudo-field
`blend` labels a cell's LoRAs with their strengths ("ganyu 0.45 + more_details 0.55").
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from runner.plan import varying_fields
from runner.request import format_number, missing, split_loras

PAD = 6


def axis_label(field: str, row: pd.Series) -> str:
    if field == "blend":
        return str(row["blend"])
    if field == "lora_model":
        loras = split_loras(row["lora_model"])
        return " + ".join(loras) if loras else "no LoRA"
    if field == "lora_strength":
        value = row["lora_strength"]
        return str(value) if value else "-"
    value = row[field]
    if missing(value):  # an unset optional field (vae, embeddings_model...): the model's own
        return "none"
    return format_number(value) if isinstance(value, float) else str(value)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")[:150] or "grid"


def make_grids(plan: pd.DataFrame, results: pd.DataFrame, root: Path, x: str | None, y: str | None, cell_size: int = 128) -> list[Path]:
    """Draw the grids into root/grids/ and return their paths."""
    if plan.empty:
        return []
    table = plan.merge(results[["id", "status", "file"]], on="id", how="left")
    axes = varying_fields(plan)
    x = x if x and (x in plan or x == "blend") else None
    y = y if y and (y in plan or y == "blend") else None
    used = {x, y} | ({"lora_model", "lora_strength"} if "blend" in (x, y) else set())
    rest = [a for a in axes if a not in used]
    table = table.assign(
        _x=table.apply(lambda r: axis_label(x, r), axis=1) if x else "",
        _y=table.apply(lambda r: axis_label(y, r), axis=1) if y else "",
    )
    out_dir = root / "grids"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    groups = table.groupby(rest, sort=False, dropna=False) if rest else [((), table)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        title = ", ".join(f"{a}={axis_label(a, group.iloc[0])}" for a in rest) or "all images"
        image = _draw(group, root, title, x or "", y or "", cell_size)
        path = out_dir / f"{_slug(title)}.png"
        image.save(path)
        paths.append(path)
    return paths


def _draw(group: pd.DataFrame, root: Path, title: str, x: str, y: str, cell: int) -> Image.Image:
    xs = list(dict.fromkeys(group["_x"]))
    ys = list(dict.fromkeys(group["_y"]))
    font = _font(12)
    title_font = _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max([probe.textlength(v, font=font) for v in ys] + [probe.textlength(y, font=font)]) + 2 * PAD
    label_w = int(label_w)
    header_h = 18 + 2 * PAD + 36
    canvas = Image.new("RGB", (label_w + cell * len(xs) + PAD, header_h + cell * len(ys) + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, PAD), title, fill="black", font=title_font)
    if x:
        draw.text((label_w, header_h - 36), f"{x} ->", fill="gray", font=font)
    if y:
        draw.text((PAD, header_h - 18), f"{y} (rows)", fill="gray", font=font)
    for i, value in enumerate(xs):
        _centered(draw, value, label_w + i * cell, header_h - 18, cell, font)
    cells = {(r["_x"], r["_y"]): r for _, r in group.iterrows()}
    for j, yv in enumerate(ys):
        top = header_h + j * cell
        draw.text((PAD, top + cell // 2 - 7), yv, fill="black", font=font)
        for i, xv in enumerate(xs):
            left = label_w + i * cell
            row = cells.get((xv, yv))
            if row is not None and row.get("status") == "ok" and (root / str(row["file"])).exists():
                with Image.open(root / str(row["file"])) as tile:
                    canvas.paste(tile.convert("RGB").resize((cell, cell)), (left, top))
            else:
                draw.rectangle([left, top, left + cell - 1, top + cell - 1], fill=(230, 230, 230))
                text = "failed" if row is not None and row.get("status") == "failed" else "missing"
                _centered(draw, text, left, top + cell // 2 - 7, cell, font)
    return canvas


def _centered(draw: ImageDraw.ImageDraw, text: str, left: int, top: int, width: int, font) -> None:
    w = draw.textlength(text, font=font)
    if w > width - 4:  # shorten long labels to the cell
        while text and draw.textlength(text + "…", font=font) > width - 4:
            text = text[:-1]
        text += "…"
        w = draw.textlength(text, font=font)
    draw.text((left + (width - w) / 2, top), text, fill="black", font=font)
