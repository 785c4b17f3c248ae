"""Labelled comparison grids from the sweep folder (reads only the store; never generates).

`report.grid: {x: lora_strength, y: lora_model, page: scheduler}` puts those fields on the axes and
draws one grid per combination of the sweep's other axes (for example per scheduler and seed). The pseudo-field
`blend` labels a cell's LoRAs with their strengths ("sunset 0.45 + stripes 0.55").
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


MIN_CELL = 32  # the smallest long side a thumbnail is shrunk to before a grid is split into parts
PIL_LIMIT = Image.MAX_IMAGE_PIXELS or 89_478_485


def make_grids(
    plan: pd.DataFrame,
    results: pd.DataFrame,
    root: Path,
    x: str | None,
    y: str | None,
    cell_size: int = 128,
    page: str | None = None,
    max_pixels: int = 40_000_000,
) -> list[Path]:
    """Draw the grids into root/grids/ and return their paths.

    x and y are any plan column or `blend`; `page` (optional) splits pages first; every other axis of
    the sweep splits pages too, so each cell holds one image. No grid exceeds `max_pixels`: thumbnails
    shrink (down to 32 px), then a grid is split into parts by rows.
    """
    if plan.empty:
        return []
    columns = [c for c in ("id", "status", "file", "error") if c in results]
    table = plan.merge(results[columns], on="id", how="left")
    axes = varying_fields(plan)
    usable = lambda name: name if name and (name in plan or name == "blend") else None  # noqa: E731
    x, y, page = usable(x), usable(y), usable(page)
    used = {x, y, page} | ({"lora_model", "lora_strength"} if "blend" in (x, y, page) else set())
    rest = ([page] if page else []) + [a for a in axes if a not in used]
    table = table.assign(
        _x=table.apply(lambda r: axis_label(x, r), axis=1) if x else "",
        _y=table.apply(lambda r: axis_label(y, r), axis=1) if y else "",
    )
    out_dir = root / "grids"
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = min(int(max_pixels), PIL_LIMIT // 2)
    paths = []
    groups = table.groupby(rest, sort=False, dropna=False) if rest else [((), table)]
    for _, group in groups:
        title = ", ".join(f"{a}={axis_label(a, group.iloc[0])}" for a in rest) or "all images"
        ys = axis_order(group["_y"])
        parts = _layout(group, ys, x or "", y or "", cell_size, budget)
        for k, (rows, cell) in enumerate(parts):
            part = group[group["_y"].isin(rows)]
            suffix = f" (part {k + 1} of {len(parts)})" if len(parts) > 1 else ""
            image = _draw(part, root, title + suffix, x or "", y or "", cell)
            path = out_dir / f"{_slug(title)}{f'_part{k + 1}' if len(parts) > 1 else ''}.png"
            image.save(path)
            paths.append(path)
    return paths


def _cell_shape(group: pd.DataFrame, long_side: int) -> tuple[int, int]:
    """Thumbnail size that keeps the images' aspect ratio (the widest of the group decides)."""
    width, height = int(group["width"].max()), int(group["height"].max())
    scale = long_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _frame(group: pd.DataFrame, ys: list[str], x: str, y: str) -> tuple[int, int]:
    font = _font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max([probe.textlength(v, font=font) for v in ys] + [probe.textlength(y, font=font)]) + 2 * PAD)
    return label_w, 18 + 2 * PAD + 36


def _layout(group: pd.DataFrame, ys: list[str], x: str, y: str, cell_size: int, budget: int) -> list[tuple[list[str], tuple[int, int]]]:
    """Split the rows of one grid into parts of at most `budget` pixels, shrinking thumbnails first."""
    label_w, header_h = _frame(group, ys, x, y)
    nx = max(1, group["_x"].nunique())

    def pixels(n_rows: int, cell: tuple[int, int]) -> int:
        return (label_w + cell[0] * nx + PAD) * (header_h + cell[1] * n_rows + PAD)

    long_side = cell_size
    cell = _cell_shape(group, long_side)
    while pixels(len(ys), cell) > budget and long_side > MIN_CELL:
        long_side = max(MIN_CELL, int(long_side * 0.8))
        cell = _cell_shape(group, long_side)
    rows_per_part = len(ys)
    while rows_per_part > 1 and pixels(rows_per_part, cell) > budget:
        rows_per_part = max(1, rows_per_part // 2)
    return [(ys[i : i + rows_per_part], cell) for i in range(0, len(ys), rows_per_part)]


NO_LORA_LABELS = ("no LoRA", "-")


def axis_order(labels) -> list[str]:
    """Axis values in plan order, but numbers ascending and the no-LoRA value first (it is strength 0)."""
    values = list(dict.fromkeys(labels))

    def number(text: str) -> float | None:
        try:
            return float(text)
        except ValueError:
            return None

    if all(number(v) is not None or v in NO_LORA_LABELS for v in values):
        return sorted(values, key=lambda v: -1.0 if v in NO_LORA_LABELS else number(v))
    return sorted(values, key=lambda v: v not in NO_LORA_LABELS)  # stable: plan order otherwise


def _draw(group: pd.DataFrame, root: Path, title: str, x: str, y: str, cell: tuple[int, int]) -> Image.Image:
    xs = axis_order(group["_x"])
    ys = axis_order(group["_y"])
    cw, ch = cell
    font = _font(12 if cw >= 64 else 9)
    title_font = _font(14)
    label_w, header_h = _frame(group, ys, x, y)
    canvas = Image.new("RGB", (label_w + cw * len(xs) + PAD, header_h + ch * len(ys) + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, PAD), title, fill="black", font=title_font)
    if x:
        draw.text((label_w, header_h - 36), f"{x} ->", fill="gray", font=font)
    if y:
        draw.text((PAD, header_h - 18), f"{y} (rows)", fill="gray", font=font)
    for i, value in enumerate(xs):
        _centered(draw, value, label_w + i * cw, header_h - 18, cw, font)
    cells = {(r["_x"], r["_y"]): r for _, r in group.iterrows()}
    for j, yv in enumerate(ys):
        top = header_h + j * ch
        draw.text((PAD, top + ch // 2 - 7), yv, fill="black", font=font)
        for i, xv in enumerate(xs):
            left = label_w + i * cw
            row = cells.get((xv, yv))
            if row is not None and row.get("status") == "ok" and (root / str(row["file"])).exists():
                with Image.open(root / str(row["file"])) as tile:
                    tile = tile.convert("RGB")
                    tile.thumbnail((cw, ch))
                    canvas.paste(tile, (left + (cw - tile.width) // 2, top + (ch - tile.height) // 2))
            elif row is not None and row.get("status") == "failed":
                draw.rectangle([left, top, left + cw - 1, top + ch - 1], fill=(250, 225, 225), outline=(200, 40, 40), width=2)
                _centered(draw, "failed", left, top + ch // 2 - 7, cw, font, fill=(170, 20, 20))
            elif row is not None:  # planned, not finished yet (running, interrupted), or its file is gone
                draw.rectangle([left, top, left + cw - 1, top + ch - 1], fill=(230, 230, 230))
                status = "missing" if missing(row.get("status")) else str(row.get("status"))
                _centered(draw, status, left, top + ch // 2 - 7, cw, font)
            # else: no such image in the plan (the no-LoRA row has no strengths): left blank
    return canvas


def _centered(draw: ImageDraw.ImageDraw, text: str, left: int, top: int, width: int, font, fill="black") -> None:
    w = draw.textlength(text, font=font)
    if w > width - 4:  # shorten long labels to the cell
        while text and draw.textlength(text + "…", font=font) > width - 4:
            text = text[:-1]
        text += "…"
        w = draw.textlength(text, font=font)
    draw.text((left + (width - w) / 2, top), text, fill=fill, font=font)
