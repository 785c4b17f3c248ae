"""Sweep file (`base` request + `grid` axes) -> plan: a DataFrame with one row per image and a stable id.

Pure: no torch, no I/O. What the plan cannot know by itself (the hashes of the model and LoRA
files, the engine's settings) is passed in as `Identity`, so the same image gets the same id in
every run, and adding seeds to a sweep only adds rows.

Grid axes (any request field):
    field: [v1, v2]                         a list of values
    field: {range: [start, stop, step]}     inclusive range (step defaults to 1)
    field: {start: 0, count: 4, step: 1}    `count` values from `start`
    lora_model: ["a", "a,b", ""]            explicit blends ("" = no LoRA)
    lora_model: {each: [a, b, c]}           each LoRA alone; also {pairs: [...]},
                {combinations: [...], k: 2} (k may be a list), and `baseline: true` adds no-LoRA
    lora_strength: [0.4, 0.8]               one value for every LoRA of the blend, or "0.4,0.8" per LoRA
    lora_strength: {a: [0.4, 0.8], b: [0.5], default: [1]}   per-LoRA values crossed within a blend
    lora_strength: {mode: zip, a: [...], b: [...]}           ... or zipped position by position
    zip: {prompt: [p1, p2], negative_prompt: [n1, n2]}       fields that move together
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from runner.request import (
    FIELDS,
    NOT_IN_ID,
    Limits,
    Problem,
    blend_label,
    did_you_mean,
    format_number,
    parse_request,
    split_loras,
    split_strengths,
)

PLAN_COLUMNS = ("id", "blend", "sample", "seed_source")
_MISSING = object()


class PlanError(Exception):
    """The sweep cannot be expanded or is invalid; carries every problem found."""

    def __init__(self, problems: Sequence[Problem | str]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class Identity:
    """What decides the pixels besides the request: file hashes and the engine's settings."""

    model_hashes: Mapping[str, str] = field(default_factory=dict)  # model id -> sha256
    lora_hashes: Mapping[str, str] = field(default_factory=dict)  # LoRA id -> sha256
    engine: Mapping[str, Any] = field(default_factory=dict)  # kind, device, dtype...
    # the other files a row can name: "vae:<id>", "embeddings:<id>", and "upscaler" (used when upscale is on)
    file_hashes: Mapping[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- axis values


def expand_values(where: str, spec: Any) -> list[Any]:
    """A list, a range or count mapping, or a scalar -> the list of values of one axis."""
    if isinstance(spec, Mapping):
        if "range" in spec:
            bounds = list(spec["range"])
            if len(bounds) not in (2, 3):
                raise PlanError([Problem(where, "range needs [start, stop] or [start, stop, step]", "e.g. {range: [0, 3]}")])
            start, stop = bounds[0], bounds[1]
            step = bounds[2] if len(bounds) == 3 else 1
            return _inclusive_range(where, start, stop, step)
        if "count" in spec:
            start, step, count = spec.get("start", 0), spec.get("step", 1), spec["count"]
            if not isinstance(count, int) or count < 1:
                raise PlanError([Problem(where, f"count must be a positive integer, got {count!r}", "e.g. {start: 0, count: 4}")])
            return [_clean_number(start + i * step) for i in range(count)]
        raise PlanError(
            [Problem(where, f"cannot read axis {dict(spec)!r}", "use a list, {range: [start, stop, step]} or {start: 0, count: N}")]
        )
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise PlanError([Problem(where, "is an empty list", "give at least one value or remove the axis")])
        return list(spec)
    return [spec]


def _clean_number(x: Any) -> Any:
    if isinstance(x, float):
        x = round(x, 10)
        return int(x) if x.is_integer() and not isinstance(x, bool) else x
    return x


def _inclusive_range(where: str, start: Any, stop: Any, step: Any) -> list[Any]:
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (start, stop, step))
    try:
        fstart, fstop, fstep = float(start), float(stop), float(step)
    except (TypeError, ValueError):
        raise PlanError([Problem(where, "range bounds must be numbers", "e.g. {range: [0.2, 1.0, 0.2]}")]) from None
    if fstep == 0 or (fstop - fstart) / fstep < 0:
        raise PlanError(
            [Problem(where, f"range [{start}, {stop}, {step}] is empty", "check the order of start and stop and the sign of step")]
        )
    n = int(math.floor((fstop - fstart) / fstep + 1e-9)) + 1
    values = [fstart + i * fstep for i in range(n)]
    return [int(v) for v in values] if ints else [round(v, 6) for v in values]


def expand_blends(spec: Any) -> list[list[str]]:
    """The `lora_model` axis -> a list of blends (each a list of LoRA ids, [] = no LoRA)."""
    where = "sweep.grid.lora_model"
    if isinstance(spec, Mapping):
        known = {"each", "pairs", "combinations", "k", "baseline"}
        unknown = [k for k in spec if k not in known]
        if unknown:
            raise PlanError(
                [
                    Problem(
                        f"{where}.{unknown[0]}",
                        "unknown blend generator",
                        did_you_mean(unknown[0], known) or "use each, pairs or combinations",
                    )
                ]
            )
        blends: list[list[str]] = []
        if spec.get("baseline"):
            blends.append([])
        if "each" in spec:
            blends += [[x] for x in split_loras(spec["each"])]
        if "pairs" in spec:
            blends += [list(c) for c in itertools.combinations(split_loras(spec["pairs"]), 2)]
        if "combinations" in spec:
            pool = split_loras(spec["combinations"])
            ks = spec.get("k", [2])
            for k in ks if isinstance(ks, (list, tuple)) else [ks]:
                if not isinstance(k, int) or not 1 <= k <= len(pool):
                    raise PlanError([Problem(f"{where}.k", f"{k!r} is not in 1..{len(pool)}", "k is the number of LoRAs per blend")])
                blends += [list(c) for c in itertools.combinations(pool, k)]
        if not blends:
            raise PlanError([Problem(where, "generates no blends", "e.g. {each: [sunset, stripes]}")])
        return blends
    return [split_loras(item) for item in expand_values(where, spec)]


def strength_options(blend: list[str], spec: Any, base_strength: Any) -> list[Any]:
    """The `lora_strength` values to try for one blend (each a value the request field accepts)."""
    where = "sweep.grid.lora_strength"
    if not blend:
        return [None]
    if spec is _MISSING:
        return [base_strength]
    if isinstance(spec, Mapping) and not ({"range", "count"} & set(spec)):
        mode = spec.get("mode", "cross")
        per_lora: list[list[float]] = []
        for lora in blend:
            if lora in spec:
                values = expand_values(f"{where}.{lora}", spec[lora])
            elif "default" in spec:
                values = expand_values(f"{where}.default", spec["default"])
            elif base_strength is not None:
                values = [split_strengths(base_strength)[0]]
            else:
                raise PlanError([Problem(f"{where}.{lora}", f"no strengths for LoRA '{lora}'", f"add '{lora}: [...]' or 'default: [...]'")])
            per_lora.append([float(v) for v in values])
        if mode == "cross":
            combos = itertools.product(*per_lora)
        elif mode == "zip":
            n = max(len(v) for v in per_lora)
            if any(len(v) not in (1, n) for v in per_lora):
                raise PlanError(
                    [
                        Problem(
                            f"{where}.mode", "zip needs lists of the same length (or of one value)", "make the per-LoRA lists equally long"
                        )
                    ]
                )
            combos = zip(*[v * n if len(v) == 1 else v for v in per_lora])
        else:
            raise PlanError([Problem(f"{where}.mode", f"unknown mode {mode!r}", "use cross or zip")])
        return [",".join(format_number(s) for s in combo) for combo in combos]
    return expand_values(where, spec)


# ---------------------------------------------------------------- expansion


def expand_grid(base: Mapping[str, Any], grid: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`base` crossed with every `grid` axis, in the order the axes are written -> loose rows."""
    problems = []
    for key in grid:
        if key != "zip" and key not in FIELDS:
            problems.append(Problem(f"sweep.grid.{key}", "unknown request field", did_you_mean(key, FIELDS) or "see the text2img spec"))
    if problems:
        raise PlanError(problems)

    axes: list[tuple[str, Any]] = []
    for key, spec in grid.items():
        if key == "lora_strength":
            continue  # depends on the blend; expanded right after it
        if key == "zip":
            axes.append(("zip", _zip_axis(spec)))
        elif key == "lora_model":
            axes.append(("lora_model", [",".join(b) for b in expand_blends(spec)]))
        else:
            axes.append((key, expand_values(f"sweep.grid.{key}", spec)))
    strength_spec = grid.get("lora_strength", _MISSING)

    rows = []
    for combo in itertools.product(*(values for _, values in axes)):
        row = dict(base)
        for (key, _), value in zip(axes, combo):
            if key == "zip":
                row.update(value)
            else:
                row[key] = value
        blend = split_loras(row.get("lora_model"))
        for strength in strength_options(blend, strength_spec, row.get("lora_strength")):
            rows.append({**row, "lora_strength": strength})
    return rows


def _zip_axis(spec: Any) -> list[dict[str, Any]]:
    if not isinstance(spec, Mapping) or not spec:
        raise PlanError([Problem("sweep.grid.zip", "must map fields to lists of equal length", "e.g. zip: {prompt: [a, b], seed: [1, 2]}")])
    lists = {}
    for key, values in spec.items():
        if key not in FIELDS:
            raise PlanError([Problem(f"sweep.grid.zip.{key}", "unknown request field", did_you_mean(key, FIELDS))])
        lists[key] = expand_values(f"sweep.grid.zip.{key}", values)
    lengths = {len(v) for v in lists.values()}
    if len(lengths) != 1:
        raise PlanError(
            [
                Problem(
                    "sweep.grid.zip", f"lists have different lengths {sorted(lengths)}", "give every zipped field the same number of values"
                )
            ]
        )
    return [dict(zip(lists, values)) for values in zip(*lists.values())]


def derived_seed(request: Mapping[str, Any]) -> int:
    """A seed for `seed: null`, drawn from the row itself so that it is the same on every run."""
    payload = {k: v for k, v in request.items() if k not in NOT_IN_ID and k != "seed"}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(digest[:4], "big")


def image_id(request: Mapping[str, Any], identity: Identity) -> str:
    """Short hash of everything that decides the pixels; LoRA order in a blend does not matter."""
    loras = split_loras(request.get("lora_model"))
    strengths = split_strengths(request.get("lora_strength")) or [1.0] * len(loras)
    # a None in a column of strings is NaN to pandas: ids must not depend on what the other rows hold
    request = {k: (None if isinstance(v, float) and v != v else v) for k, v in request.items()}
    payload = {k: v for k, v in request.items() if k in FIELDS and k not in NOT_IN_ID and k not in ("lora_model", "lora_strength")}
    payload["model_id"] = [request.get("model_id"), identity.model_hashes.get(request.get("model_id"), "")]
    payload["loras"] = sorted([name, identity.lora_hashes.get(name, ""), format_number(s)] for name, s in zip(loras, strengths))
    payload["engine"] = dict(identity.engine)
    files = [f"vae:{request.get('vae')}"] if request.get("vae") else []
    files += [f"embeddings:{name}" for name in split_loras(request.get("embeddings_model"))]
    files += ["upscaler"] if request.get("upscale") else []
    if files:  # only rows that use such files carry them, so other ids do not change when one is added
        payload["files"] = sorted([name, identity.file_hashes.get(name, "")] for name in files)
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class PlanResult:
    plan: pd.DataFrame
    problems: list[str]  # one line each, with a row count where several rows share it


def count_problems(problems: Sequence[Problem]) -> list[str]:
    """Deduplicate problems across rows, keeping their first-seen order and how many rows had each."""
    counts = Counter(str(p) for p in problems)
    lines = []
    for text in dict.fromkeys(str(p) for p in problems):
        lines.append(text + (f" ({counts[text]} rows)" if counts[text] > 1 else ""))
    return lines


def build_plan(
    base: Mapping[str, Any],
    grid: Mapping[str, Any],
    *,
    default_model_id: str,
    limits: Limits = Limits(),
    baseline: bool = False,
) -> PlanResult:
    """Expand and parse every row; rows get ids from `with_ids` once the files are hashed.

    `baseline` adds, for every row with LoRAs, the same row without them (`report.baseline: true`),
    the reference `lora_effect` is measured against. Raises PlanError when the grid itself cannot be
    read; row problems are returned, counted.
    """
    parsed: list[dict[str, Any]] = []
    problems: list[Problem] = []
    raws = expand_grid(base, grid)
    if baseline:
        seen = {json.dumps(r, sort_keys=True, default=str) for r in raws if not split_loras(r.get("lora_model"))}
        for raw in list(raws):
            if split_loras(raw.get("lora_model")):
                plain = {**raw, "lora_model": "", "lora_strength": None}
                key = json.dumps(plain, sort_keys=True, default=str)
                if key not in seen:
                    seen.add(key)
                    raws.append(plain)
    for raw in raws:
        raw = dict(raw)
        if raw.get("model_id") in (None, ""):
            raw["model_id"] = default_model_id
        request, row_problems = parse_request(raw, limits)
        problems += row_problems
        parsed.append(request)
    if problems:
        return PlanResult(pd.DataFrame(), count_problems(problems))

    rows = []
    for request in parsed:
        source = "given" if request["seed"] is not None else "derived"
        first_seed = request["seed"] if request["seed"] is not None else derived_seed(request)
        for sample in range(request["samples"]):
            row = {**request, "seed": (first_seed + sample) % 2**32, "samples": 1}
            row["id"] = ""
            row["blend"] = blend_label(row["lora_model"], row["lora_strength"])
            row["sample"] = sample
            row["seed_source"] = source
            rows.append(row)
    return PlanResult(pd.DataFrame(rows, columns=[*PLAN_COLUMNS, *FIELDS]), [])


def with_ids(plan: pd.DataFrame, identity: Identity) -> tuple[pd.DataFrame, int]:
    """Give every row its id; rows that are the same image are kept once. Returns (plan, dropped)."""
    plan = plan.copy()
    plan["id"] = [image_id(row, identity) for row in plan[list(FIELDS)].to_dict("records")]
    deduped = plan.drop_duplicates("id", keep="first").reset_index(drop=True)
    return deduped, len(plan) - len(deduped)


def shadowed_base_fields(base: Mapping[str, Any], grid: Mapping[str, Any]) -> list[str]:
    """`sweep.base` fields that a grid axis replaces (the base value is never used): one warning line each."""
    axes = {k: v for k, v in grid.items() if k != "zip"}
    axes |= {k: v for k, v in (grid.get("zip") or {}).items()} if isinstance(grid.get("zip"), Mapping) else {}
    lines = []
    for name in base:
        if name in axes:
            where = "sweep.grid.zip" if name not in grid else "sweep.grid"
            lines.append(
                f"sweep.base.{name}={base[name]} is not used: the axis {where}.{name} sets it on every row; "
                f"to use the base value, remove the axis (~sweep.grid.{name})"
            )
    return lines


def varying_fields(plan: pd.DataFrame) -> list[str]:
    """The request fields that take more than one value in the plan (the sweep's real axes)."""
    return [c for c in FIELDS if c in plan and plan[c].astype(str).nunique(dropna=False) > 1]


def summarize(plan: pd.DataFrame) -> dict[str, Any]:
    axes = {c: plan[c].astype(str).nunique(dropna=False) for c in varying_fields(plan)}
    return {
        "rows": len(plan),
        "blends": plan["lora_model"].nunique() if len(plan) else 0,
        "axes": axes,
        "models": sorted(plan["model_id"].unique()) if len(plan) else [],
    }
