"""grid.html: the interactive grid page of a sweep folder, offline and self-contained (issue 24).

Written with the report, for any sweep folder (also one still running: pending images are empty cells):
  thumbs/<id>.webp   small thumbnails (THUMB_SIZE px long side, aspect kept), made once per image
  grid.html          the page, with its script, style and the image index inlined (it works from file://)
  grid-live.js       while the sweep runs: the same index as a script, rewritten as images land (LiveGridPage);
                     the open page loads it again every few seconds (a <script> works from file://, fetch() does not)

The index is columnar so that 10,000 images stay small and parse fast: per axis a table of value labels and
one small integer code per image; scores as one number list per column; no dict per image. The page itself
(grid_page.js / grid_page.css beside this file) chooses the axes, hides values, opens and compares images.
"""

from __future__ import annotations

import contextlib
import html
import json
import logging
import math
import os
import sqlite3
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from runner.plan import varying_fields
from runner.report.grid import axis_label, axis_order
from runner.store import RESULT_COLUMNS, SweepStore, atomic_write_bytes, pid_alive
from runner.tracking import ID_TAG

log = logging.getLogger(__name__)

THUMB_SIZE = 128  # long side of a thumbnail; the viewer shows the full PNG
THUMBS = "thumbs"
MLFLOW_HOST = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
STATUS_CODES = {"ok": 0, "failed": 1}  # any other status (none yet, running) is 2: pending
HERE = Path(__file__).parent
LIVE = "grid-live.js"
LIVE_EVERY_S = 3.0  # the running sweep's grid-live.js is rewritten at most this often
LIVE_SHARE = 0.02  # ... and less often when writing it takes longer (a big sweep): at most this share of the run's time


def write_grid_page(
    root: Path,
    plan: pd.DataFrame,
    results: pd.DataFrame,
    ranking: pd.DataFrame | None = None,
    scores: Iterable[str] = (),
    *,
    name: str = "",
    defaults: dict[str, str | None] | None = None,
    runs: dict[str, tuple[str, str]] | None = None,
    running: bool | None = None,
) -> Path:
    """Thumbnails (new images only) and grid.html; `runs` maps image id -> (experiment id, run id) where known,
    else one query of the default sqlite MLflow store beside the sweep folder finds them.

    `running` (by default: another live process holds the folder's lock, as when `lora-sweep report` runs beside
    the sweep) makes the page poll grid-live.js; that file is written too where it exists, so a page open on a
    running sweep learns its final state (and stops polling) from the report at the end."""
    root = Path(root)
    running = sweep_running(root) if running is None else running
    index = page_index(root, plan, results, ranking, list(scores), name=name, defaults=defaults, runs=runs, running=running)
    path = root / "grid.html"
    atomic_write_bytes(path, page_html(index).encode("utf-8"))
    if running or (root / LIVE).exists():
        write_live(root, index)
    return path


def page_index(
    root: Path,
    plan: pd.DataFrame,
    results: pd.DataFrame,
    ranking: pd.DataFrame | None,
    scores: list[str],
    *,
    name: str,
    defaults: dict[str, str | None] | None,
    runs: dict[str, tuple[str, str]] | None,
    running: bool,
) -> dict[str, Any]:
    """The thumbnails made, then the page's index (see grid_index) with the sweep's name and whether it runs."""
    table = plan[["id"]].merge(results, on="id", how="left") if "id" in results else plan[["id"]].assign(status=None)
    make_thumbnails(root, table)
    if runs is None:
        runs = mlflow_runs(root.parent / "mlflow.db", name or root.name)
    index = grid_index(plan, table, ranking, scores, defaults or {}, runs, root)
    return index | {"name": name or root.name, "running": bool(running), "written": round(time.time())}


def sweep_running(root: Path) -> bool:
    """Whether another live process holds the sweep folder's lock: the sweep is still being made."""
    try:
        owner = int(SweepStore(root).lock_path.read_text().strip() or 0)
    except (OSError, ValueError):
        return False
    return owner > 0 and owner != os.getpid() and pid_alive(owner)


def write_live(root: Path, index: dict[str, Any]) -> Path:
    """grid-live.js: the index as a script that hands it to the open page (which defines window.gridLive)."""
    path = root / LIVE
    data = json.dumps(index, separators=(",", ":"), allow_nan=False)
    atomic_write_bytes(path, f"window.gridLive && gridLive({data});\n".encode())
    return path


class LiveGridPage:
    """grid.html and grid-live.js while a sweep runs, from what its folder holds: the page when the plan is new
    (a run's start, a search's next trials), the live index as images land, throttled by time (`tick`).

    MLflow links and the ranking come with the report at the end (the run's own store is not queried meanwhile);
    a failed write is logged and never stops the sweep."""

    def __init__(self, store: SweepStore, scores: list[str], name: str, defaults: dict[str, str | None], every_s: float = LIVE_EVERY_S):
        self.store, self.scores, self.name, self.defaults, self.every_s = store, scores, name, defaults, every_s
        self.plan: pd.DataFrame | None = None
        self.page_ids: list[str] | None = None  # the ids of the grid.html last written
        self.index: dict[str, Any] | None = None  # the live index last written
        self.next_at = 0.0

    def start(self, plan: pd.DataFrame) -> None:
        """Before the plan's images: grid.html (what is not done yet shows as pending) and grid-live.js."""
        self.plan = plan
        self.write()

    def tick(self) -> None:
        """Called as images come: grid-live.js again when it is due."""
        if self.plan is not None and time.monotonic() >= self.next_at:
            self.write()

    def write(self) -> None:
        started = time.monotonic()
        try:
            self._write()
        except Exception:
            log.warning("could not write the live grid page in %s", self.store.root, exc_info=True)
        spent = time.monotonic() - started
        self.next_at = time.monotonic() + max(self.every_s, spent / LIVE_SHARE)

    def _write(self) -> None:
        root = self.store.root
        results = self.store.read_results()
        index = page_index(root, self.plan, results, None, self.scores, name=self.name, defaults=self.defaults, runs={}, running=True)
        if index["ids"] != self.page_ids:
            atomic_write_bytes(root / "grid.html", page_html(index).encode("utf-8"))
            self.page_ids = index["ids"]
        write_live(root, index)
        self.index = index

    def stop(self) -> None:
        """The sweep ended without its report (an error): the open page stops polling, its last state kept."""
        if self.index is not None:
            with contextlib.suppress(OSError):
                write_live(self.store.root, self.index | {"running": False})


# ------------------------------------------------------------ thumbnails


def thumb_path(root: Path, image_id: str) -> Path:
    return root / THUMBS / f"{image_id}.webp"


def make_thumbnails(root: Path, table: pd.DataFrame) -> int:
    """A small WebP per finished image that has none yet (or an older one than its PNG); how many were made."""
    ok = table[table["status"] == "ok"]["id"] if "status" in table else []
    todo = [i for i in ok if _stale(root / "images" / f"{i}.png", thumb_path(root, i))]
    if not todo:
        return 0
    (root / THUMBS).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # Pillow decodes and resizes outside the GIL
        return sum(pool.map(lambda i: _thumbnail(root / "images" / f"{i}.png", thumb_path(root, i)), todo))


def _stale(png: Path, thumb: Path) -> bool:
    try:
        png_time = png.stat().st_mtime
    except OSError:
        return False  # no image file (yet): nothing to make
    try:
        return thumb.stat().st_mtime < png_time
    except OSError:
        return True


def _thumbnail(png: Path, thumb: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(png) as image:
            image.draft("RGB", (THUMB_SIZE, THUMB_SIZE))
            small = image.convert("RGB")
            small.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS)
    except OSError:
        return False  # a file cut short: the page falls back to the PNG itself
    tmp = thumb.with_name(f".{thumb.name}.tmp")
    small.save(tmp, "WEBP", quality=80, method=2)
    tmp.replace(thumb)
    return True


# ------------------------------------------------------------ MLflow runs


def mlflow_runs(db: Path, sweep: str) -> dict[str, tuple[str, str]]:
    """image id -> (experiment id, run id) of the sweep's image runs in a sqlite MLflow store: one query, read-only.

    Only the default store (outputs/mlflow.db) is read; a tracking server is not asked (the page then shows
    `lora-sweep reproduce <id>`, which finds the run itself)."""
    if not db.is_file():
        return {}
    query = (
        "SELECT i.value, r.experiment_id, r.run_uuid FROM tags i "
        "JOIN tags s ON s.run_uuid = i.run_uuid AND s.key = 'lora_sweep.sweep' AND s.value = ? "
        "JOIN runs r ON r.run_uuid = i.run_uuid "
        "WHERE i.key = ? AND r.lifecycle_stage = 'active' ORDER BY r.status = 'FINISHED', r.start_time"
    )
    try:
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=2)) as con:
            rows = con.execute(query, (sweep, ID_TAG)).fetchall()
    except sqlite3.Error:
        return {}  # another schema, a locked or broken file: no links, the page still works
    return {image_id: (str(experiment), run) for image_id, experiment, run in rows}  # finished runs last: they win


# ------------------------------------------------------------ the index


def axis_columns(plan: pd.DataFrame) -> list[str]:
    """The plan columns the page offers as axes: the request fields that vary, then the other varying columns
    (blend, checkpoint step and epoch, ...); the id and columns of one value are not axes."""
    fields = varying_fields(plan)
    others = [c for c in plan.columns if c not in fields and c != "id" and _varies(plan[c])]
    return [*fields, *others]


def _varies(column: pd.Series) -> bool:
    try:
        return column.nunique(dropna=False) > 1
    except TypeError:  # lists or dicts in a column
        return column.astype(str).nunique() > 1


def encode_axis(plan: pd.DataFrame, column: str) -> dict[str, Any]:
    """One axis as a table of labels (in axis order: numbers ascending, no LoRA first) and a code per image."""
    values = plan[column]
    try:
        codes, uniques = pd.factorize(values, use_na_sentinel=False)
    except TypeError:
        codes, uniques = pd.factorize(values.astype(str), use_na_sentinel=False)
    labels = [axis_label(column, {column: u}) for u in uniques]
    order = axis_order(labels)  # labels of equal text (1 and 1.0) share a slot
    slot = {label: k for k, label in enumerate(order)}
    remap = np.array([slot[label] for label in labels], dtype=np.int64)
    return {"name": column, "values": order, "codes": remap[codes].tolist()}


def constants(plan: pd.DataFrame, axes: list[str]) -> dict[str, str]:
    """The fields of one value across the plan, for the viewer's parameter table (unset ones left out)."""
    out = {}
    for column in plan.columns:
        if column in axes or column == "id" or not len(plan):
            continue
        value = plan[column].iloc[0]
        with contextlib.suppress(TypeError, ValueError):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
        out[column] = axis_label(column, {column: value})
    return out


def _numbers(values: pd.Series) -> list[float | None]:
    """Floats with 6 significant digits (JSON stays small), missing as null."""
    numeric = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    return [None if not math.isfinite(v) else float(f"{v:.6g}") for v in numeric]


def image_score_columns(table: pd.DataFrame, scores: list[str], plan: pd.DataFrame) -> list[str]:
    """The configured scores first, then any other numeric results column (a scorer added later, generation time);
    not the engine's `meta.*` notes."""
    skip = set(RESULT_COLUMNS) - {"generation_s"} | set(plan.columns)
    extra = [
        c
        for c in table.columns
        if c not in skip and c not in scores and not str(c).startswith("meta.") and pd.api.types.is_numeric_dtype(table[c])
    ]
    return [c for c in [*scores, *extra] if c in table and pd.to_numeric(table[c], errors="coerce").notna().any()]


def cell_scores(ranking: pd.DataFrame | None, ids: list[str]) -> dict[str, Any]:
    """The ranking's numeric columns per cell (clip_score_mean, human, ...), and each image's ranking row (-1: none)."""
    if ranking is None or ranking.empty or "ids" not in ranking:
        return {"columns": {}, "row": [], "cells": []}
    position = {image_id: k for k, image_id in enumerate(ids)}
    row = [-1] * len(ids)
    for k, members in enumerate(ranking["ids"].fillna("")):
        for image_id in str(members).split():
            if image_id in position:
                row[position[image_id]] = k
    numeric = [c for c in ranking.columns if c != "ids" and pd.api.types.is_numeric_dtype(ranking[c]) and ranking[c].notna().any()]
    cells = ranking["cell"].astype(str).tolist() if "cell" in ranking else [str(k + 1) for k in range(len(ranking))]
    return {"columns": {c: _numbers(ranking[c]) for c in numeric}, "row": row, "cells": cells}


def pick_defaults(axes: list[str], wanted: dict[str, str | None]) -> dict[str, str | None]:
    """The report config's x, y and page where they are axes of this plan, else the first axes (the seed last)."""
    chosen = {k: v if v in axes else None for k, v in ((k, wanted.get(k)) for k in ("x", "y", "page"))}
    spare = [a for a in sorted(axes, key=lambda a: a == "seed") if a not in chosen.values()]
    for key in ("x", "y"):
        if chosen[key] is None and spare and not (key == "y" and spare[0] == "seed" and chosen["x"] is None):
            chosen[key] = spare.pop(0)
    if chosen["page"] is None:  # another axis (a prompt...): one page each, cells hold the seeds
        chosen["page"] = next((a for a in spare if a not in ("seed", "blend")), None)
    return chosen


def grid_index(
    plan: pd.DataFrame,
    table: pd.DataFrame,
    ranking: pd.DataFrame | None,
    scores: list[str],
    wanted: dict[str, str | None],
    runs: dict[str, tuple[str, str]],
    root: Path,
) -> dict[str, Any]:
    """The page's data: ids, axes (labels + codes), constants, status, sizes, scores, ranking cells, MLflow runs."""
    ids = plan["id"].astype(str).tolist()
    table = table.set_index("id").reindex(ids)
    names = axis_columns(plan)
    status = table["status"].map(STATUS_CODES).fillna(2).astype(int).tolist() if "status" in table else [2] * len(ids)
    errors = {}
    if "error" in table:
        failed = table[(table["status"] == "failed") & table["error"].notna()]
        position = {image_id: k for k, image_id in enumerate(ids)}
        errors = {str(position[i]): (str(e).strip().splitlines() or [""])[0][:300] for i, e in failed["error"].items()}
    columns = image_score_columns(table.reset_index(), scores, plan)
    experiments = sorted({e for e, _ in runs.values()})
    return {
        "version": 1,
        "n": len(ids),
        "ids": ids,
        "status": status,
        "errors": errors,
        "axes": [encode_axis(plan, c) for c in names],
        "constants": constants(plan, names),
        "size": encode_size(plan),
        "defaults": pick_defaults(names, wanted),
        "scores": {c: _numbers(table[c]) for c in columns},
        "cell": cell_scores(ranking, ids),
        "thumbs": THUMBS,
        "mlflow": {
            "host": MLFLOW_HOST,
            "ui": f"mlflow ui --backend-store-uri sqlite:///{(root.parent / 'mlflow.db').resolve()}",
            "experiments": experiments,
            "experiment": [experiments.index(runs[i][0]) if i in runs else -1 for i in ids],
            "run": [runs[i][1] if i in runs else "" for i in ids],
        }
        if runs
        else None,
    }


def encode_size(plan: pd.DataFrame) -> dict[str, Any]:
    """Each image's width and height as a code into a small table of sizes (for the cells' aspect ratio)."""
    if not {"width", "height"} <= set(plan.columns) or plan.empty:
        return {"values": [[1, 1]], "codes": [0] * len(plan)}
    pairs = plan["width"].astype(int).astype(str) + "x" + plan["height"].astype(int).astype(str)
    codes, uniques = pd.factorize(pairs)
    return {"values": [[int(p) for p in u.split("x")] for u in uniques], "codes": codes.tolist()}


# ------------------------------------------------------------ the page


def page_html(index: dict[str, Any]) -> str:
    """grid.html: style, index and script inline (no network, works from file://)."""
    data = json.dumps(index, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    style = (HERE / "grid_page.css").read_text(encoding="utf-8")
    script = (HERE / "grid_page.js").read_text(encoding="utf-8")
    title = html.escape(f"{index['name']}: grid")
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{title}</title><style>{style}</style></head><body>"
        f"<script type='application/json' id='grid-index'>{data}</script>"
        f"<script>{script}</script></body></html>"
    )
