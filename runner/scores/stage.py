"""The scoring stage: finished images in the sweep folder -> one score per image and metric.

Runs after generation (or alone, `lora-sweep score`), in batches, and computes only what is
missing: a new seed scores its image, and its cell's seed_spread again; nothing else is touched.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from runner.config import ScorerSource
from runner.errors import Problem, did_you_mean
from runner.registry import HUB_ID, hub_cache_path
from runner.request import FIELDS, NOT_IN_ID

BUILTIN_SCORES = ("clip_score", "lora_effect", "seed_spread")
# what a cell is: every field that decides the pixels but the seed (and `samples`, which the plan expands into seeds)
CELL_IGNORES = {"seed", "samples"} | set(NOT_IN_ID)
BASELINE_IGNORES = CELL_IGNORES - {"seed"} | {"lora_model", "lora_strength"}


def _scorer_keys() -> set[str]:
    return {f.name for f in fields(ScorerSource)}


SCORER_KEYS = _scorer_keys()


class ScoreProblem(Exception):
    """A score the config asks for cannot be computed (unknown scorer, files missing): one line each."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(map(str, problems)))


@dataclass(frozen=True)
class ScorerEntry:
    id: str
    kind: str
    path: Path
    clip: str | None = None
    builtin: bool = False


def _resolve_path(source: str) -> Path | None:
    path = Path(source).expanduser()
    if path.exists():
        return path
    if HUB_ID.match(source):
        return hub_cache_path(source)
    return None


def requested_scorers(names: list[str], clip_id: str, scorers: Mapping[str, Mapping[str, Any]]) -> dict[str, ScorerEntry]:
    """Check the sweep's `scores` against the `scorers:` registry; returns every scorer entry they need.

    Pure but for looking the files up; problems are raised together, one line each.
    """
    problems: list[Problem] = []
    needed: dict[str, ScorerEntry] = {}

    def entry(scorer_id: str, where: str) -> ScorerEntry | None:
        spec = scorers.get(scorer_id)
        if not isinstance(spec, Mapping) or not spec.get("source"):
            hint = did_you_mean(scorer_id, list(scorers)) or f"register it under scorers: (known: {', '.join(scorers) or 'none'})"
            problems.append(Problem(where, f"unknown scorer '{scorer_id}'", hint))
            return None
        unknown = sorted(set(spec) - SCORER_KEYS)
        if unknown:
            problems.append(Problem(f"scorers.{scorer_id}.{unknown[0]}", "unknown key", did_you_mean(unknown[0], SCORER_KEYS)))
            return None
        path = _resolve_path(str(spec["source"]))
        if path is None and spec.get("builtin"):  # the demo's: built into paths.assets on first use
            path = Path(str(spec["source"]))
        if path is None:
            problems.append(
                Problem(
                    f"scorers.{scorer_id}.source",
                    f"{spec['source']} is neither a file or folder nor a hub id in the local cache",
                    f"fix the path, or pre-download it with: huggingface-cli download {spec['source']}",
                )
            )
            return None
        return ScorerEntry(scorer_id, str(spec.get("kind") or "clip"), path, spec.get("clip"), bool(spec.get("builtin")))

    clip_scores = [n for n in names if n in BUILTIN_SCORES]
    if clip_scores:
        found = entry(clip_id, "scores.clip")
        if found is not None:
            needed[clip_id] = found
    for name in names:
        if name in BUILTIN_SCORES:
            continue
        if name in FIELDS:
            problems.append(
                Problem("sweep.scores", f"'{name}' is a request field, not a score", f"use {', '.join(BUILTIN_SCORES)} or a scorer id")
            )
            continue
        found = entry(name, "sweep.scores")
        if found is None:
            continue
        if found.kind == "clip":
            problems.append(Problem("sweep.scores", f"'{name}' is a CLIP model", f"name it in scores.clip={name} and ask for clip_score"))
            continue
        needed[name] = found
        if found.clip:
            clip_entry = entry(found.clip, f"scorers.{name}.clip")
            if clip_entry is not None:
                needed[found.clip] = clip_entry
    if problems:
        raise ScoreProblem(problems)
    return needed


def cell_key(row: Mapping[str, Any], ignore: set[str]) -> str:
    values = []
    for name in FIELDS:
        if name in ignore:
            continue
        value = row.get(name)
        if isinstance(value, float) and value != value:
            value = None
        values.append(f"{name}={value}")
    return "|".join(values)


def missing_ids(results: pd.DataFrame, metric: str, ok_ids: list[str]) -> set[str]:
    if metric not in results:
        return set(ok_ids)
    known = results.set_index("id")[metric]
    return {i for i in ok_ids if pd.isna(known.get(i, np.nan))}


def compute_scores(
    plan: pd.DataFrame,
    results: pd.DataFrame,
    root: Path,
    names: list[str],
    entries: Mapping[str, ScorerEntry],
    clip_id: str,
    device: str = "auto",
    batch_size: int = 32,
    progress: bool = False,
) -> pd.DataFrame:
    """Scores of the ok images that lack them: a frame with `id` and one column per metric (NaN where not computed)."""
    from runner.scores.clip import Clip  # torch and transformers: only when there is something to score
    from runner.scores.learned import scorer_class

    ok = results[results["status"] == "ok"][["id", "file"]]
    ok = ok[ok["id"].isin(plan["id"])]
    ok = ok[[(root / str(f)).exists() for f in ok["file"]]]
    rows = plan.set_index("id").loc[ok["id"]].reset_index()
    rows["file"] = ok["file"].to_numpy()
    ids = list(rows["id"])
    todo = {name: missing_ids(results, name, ids) for name in names}
    if not any(todo.values()):
        return pd.DataFrame({"id": []})
    records = rows.to_dict("records")
    by_id = {r["id"]: r for r in records}

    # which images need CLIP image embeddings
    cells: dict[str, list[str]] = {}
    baselines: dict[str, str] = {}
    for r in records:
        cells.setdefault(cell_key(r, CELL_IGNORES), []).append(r["id"])
        if not str(r.get("lora_model") or ""):
            baselines[cell_key(r, BASELINE_IGNORES)] = r["id"]
    embed: set[str] = set()
    clip_needing = [n for n in names if n in ("clip_score", "lora_effect") or (n in entries and entries[n].clip)]
    for name in clip_needing:
        embed |= todo[name]
    for i in todo.get("lora_effect", ()):
        base = baselines.get(cell_key(by_id[i], BASELINE_IGNORES))
        if base:
            embed.add(base)
    spread_cells = []
    if todo.get("seed_spread"):
        spread_cells = [members for members in cells.values() if todo["seed_spread"] & set(members)]
        embed |= {i for members in spread_cells for i in members}

    out = pd.DataFrame({"id": ids}).set_index("id")
    clips: dict[str, Clip] = {}

    def clip_for(scorer_id: str) -> Clip:
        if scorer_id not in clips:
            clips[scorer_id] = Clip(entries[scorer_id].path, device, batch_size)
        return clips[scorer_id]

    def load(image_ids):
        images = []
        for i in image_ids:
            with Image.open(root / str(by_id[i]["file"])) as im:
                images.append(im.convert("RGB"))
        return images

    def embeddings_of(scorer_id: str, image_ids: list[str]) -> dict[str, np.ndarray]:
        clip = clip_for(scorer_id)
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(image_ids), batch_size):
            chunk = image_ids[start : start + batch_size]
            found.update(zip(chunk, clip.image_embeddings(load(chunk))))
        return found

    needs_main_clip = any(n in BUILTIN_SCORES for n in names)
    main = embeddings_of(clip_id, sorted(embed)) if needs_main_clip and embed else {}

    if todo.get("clip_score"):
        want = sorted(todo["clip_score"])
        prompts = sorted({str(by_id[i]["prompt"]) for i in want})
        text = dict(zip(prompts, clip_for(clip_id).text_embeddings(prompts)))
        out.loc[want, "clip_score"] = [100.0 * max(0.0, float(main[i] @ text[str(by_id[i]["prompt"])])) for i in want]
    if todo.get("lora_effect"):
        values = {}
        for i in todo["lora_effect"]:
            base = baselines.get(cell_key(by_id[i], BASELINE_IGNORES))
            if base is not None and base in main:
                values[i] = 0.0 if base == i else float(1.0 - main[i] @ main[base])
        if values:
            out.loc[list(values), "lora_effect"] = list(values.values())
    for members in spread_cells:
        if len(members) < 2:
            continue
        vectors = [main[m] for m in members]
        distances = [1.0 - float(a @ b) for a, b in itertools.combinations(vectors, 2)]
        out.loc[members, "seed_spread"] = float(np.mean(distances))
    for name in names:
        if name in BUILTIN_SCORES or not todo.get(name):
            continue
        spec = entries[name]
        clip = clip_for(spec.clip) if spec.clip else None
        scorer = scorer_class(spec.kind)(spec.path, clip, device)
        want = sorted(todo[name])
        for start in range(0, len(want), batch_size):
            chunk = want[start : start + batch_size]
            images = load(chunk)
            embeds = None
            if clip is not None:  # the embeddings clip_score & co. computed already, when it is the same CLIP
                known = spec.clip == clip_id and all(i in main for i in chunk)
                embeds = np.stack([main[i] for i in chunk]) if known else clip.image_embeddings(images)
            out.loc[chunk, name] = np.asarray(scorer.score(images, [str(by_id[i]["prompt"]) for i in chunk], embeds), dtype=float)
    out = out.reset_index()
    return out.dropna(how="all", subset=[c for c in out.columns if c != "id"])
