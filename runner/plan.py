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

import numpy as np
import pandas as pd

from runner.errors import Problem, did_you_mean
from runner.prompts.syntax import has_weights, lora_tags
from runner.request import (
    FIELDS,
    LIMITED_FIELDS,
    NOT_IN_ID,
    OMITTED_WHEN_UNSET,
    SECRET_FIELDS,
    Limits,
    blend_label,
    canonical_strengths,
    field_limit_problems,
    format_number,
    join_strengths,
    lora_problems,
    parse_field,
    split_loras,
    split_strengths,
)
from runner.schedulers import canonical_scheduler

PLAN_COLUMNS = ("id", "blend", "sample", "seed_source", "prompt_original")
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
    # prompt texts over one CLIP chunk (75 tokens) for the plan's models' tokenizers: encoded in chunks since prompt
    # encoding was added, so their ids carry the encoding (as weighted prompts' do); the others' ids are as before
    long_prompts: frozenset[str] = frozenset()
    # whether this engine parses the prompt syntax itself (local); a provider does its own, and its ids stay as they were
    parses_prompts: bool = True


def prompt_encoding(prompt: Any, negative: Any, weighting: Any, identity: Identity) -> str | None:
    """What enters the id about how the prompts were encoded: the weighting mode for rows with weights, BREAK or a
    prompt over 75 tokens; None (nothing) for plain prompts, which encode as they always did."""
    texts = [t for t in (prompt, negative) if isinstance(t, str) and t]
    if identity.parses_prompts and any(has_weights(t) or t in identity.long_prompts for t in texts):
        return weighting if isinstance(weighting, str) and weighting else "a1111"
    return None


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
    payload = {k: v for k, v in request.items() if k not in NOT_IN_ID and k != "seed" and not _unset_optional(k, v)}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(digest[:4], "big")


def image_id(request: Mapping[str, Any], identity: Identity) -> str:
    """Short hash of everything that decides the pixels; LoRA order in a blend does not matter."""
    loras = split_loras(request.get("lora_model"))
    strengths = split_strengths(request.get("lora_strength")) or [1.0] * len(loras)
    # a None in a column of strings is NaN to pandas: ids must not depend on what the other rows hold
    request = {k: (None if isinstance(v, float) and v != v else v) for k, v in request.items()}
    payload = {
        k: v
        for k, v in request.items()
        if k in FIELDS and k not in NOT_IN_ID and k not in ("lora_model", "lora_strength") and not _unset_optional(k, v)
    }
    payload["model_id"] = [request.get("model_id"), identity.model_hashes.get(request.get("model_id"), "")]
    payload["loras"] = sorted([name, identity.lora_hashes.get(name, ""), format_number(s)] for name, s in zip(loras, strengths))
    payload["engine"] = dict(identity.engine)
    files = [f"vae:{request.get('vae')}"] if request.get("vae") else []
    files += [f"embeddings:{name}" for name in split_loras(request.get("embeddings_model"))]
    files += ["upscaler"] if request.get("upscale") else []
    if files:  # only rows that use such files carry them, so other ids do not change when one is added
        payload["files"] = sorted([name, identity.file_hashes.get(name, "")] for name in files)
    encoding = prompt_encoding(request.get("prompt"), request.get("negative_prompt"), request.get("prompt_weighting"), identity)
    payload.pop("prompt_weighting", None)  # it enters only as the encoding, for the rows it changes
    if encoding is not None:
        payload["prompt_encoding"] = encoding
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _unset_optional(name: str, value: Any) -> bool:
    return name in OMITTED_WHEN_UNSET and (value is None or (isinstance(value, float) and value != value))


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

    Vectorised: each axis value is parsed and checked once, rows are index arrays into the axes
    (numpy), each column is built once from its distinct values, and the text hashed for derived
    seeds is assembled column by column, so a million rows take seconds (bench/bench_plan.py). The
    rows, their order and the problems are what expanding the grid row by row and calling
    `parse_request` on each gives (`expand_grid`; tests/test_plan.py).

    `baseline` adds, for every row with LoRAs, the same row without them (`report.baseline: true`),
    the reference `lora_effect` is measured against. Raises PlanError when the grid itself cannot be
    read; row problems are returned, counted.

    Phases: the axes (`_grid_axes`), crossed with the strengths of each blend (`_expand_rows`), the
    baseline rows (`_with_baseline`), problems of the base request itself (`_base_problems`), every
    field but the blend parsed and checked (`_parse_fields`), the blend with its strengths
    (`_parse_blends`), the prompts' `<lora:name:weight>` tags merged into the blend (`_merge_lora_tags`), then
    seeds and samples (`_first_seeds`, `_plan_frame`).
    """
    rows = _expand_rows(base, _grid_axes(grid), grid.get("lora_strength", _MISSING))
    if baseline:
        rows = _with_baseline(rows)
    fields, field_problems = _parse_fields(rows, default_model_id, limits)
    blends, blend_problems = _parse_blends(rows, limits)
    problems = _base_problems(base, rows.n) + field_problems + blend_problems
    if problems:
        return PlanResult(pd.DataFrame(), _counted(problems))
    columns = _scheduler_aliases({**fields, **blends})
    columns, tag_problems = _merge_lora_tags(columns, rows, limits)
    if tag_problems:
        return PlanResult(pd.DataFrame(), _counted(tag_problems))
    given, first_seed = _first_seeds(columns)
    return PlanResult(_plan_frame(columns, given, first_seed), [])


_Found = tuple[tuple[int, int, int], str, int]  # ((first row, phase, position), problem text, rows that have it)


@dataclass(frozen=True)
class _Column:
    """A plan column as its distinct values (parsed) and each row's index into them: built once, at the end."""

    values: list[Any]
    codes: np.ndarray

    def take(self, rows: np.ndarray | None = None) -> Any:
        """The column for `rows` (an index into this column's rows; None: all of them, in order)."""
        return take_column(self.values, self.codes if rows is None else self.codes[rows])


@dataclass(frozen=True)
class _Rows:
    """The plan's rows before parsing: per row, the index of its value on every axis and of its lora_strength option."""

    base: Mapping[str, Any]
    axes: list[tuple[tuple[str, ...], list[dict[str, Any]]]]
    provider: dict[str, int]  # field -> the axis that sets it (the last one naming it)
    codes: list[np.ndarray]  # axis -> the value index of each row
    options: list[Any]  # the lora_strength options of every blend, one blend after the other
    strength: np.ndarray  # row -> its index into options
    lora: np.ndarray  # row -> its blend names LoRAs
    plain: np.ndarray  # row -> a no-LoRA copy added by the baseline

    @property
    def n(self) -> int:
        return len(self.strength)

    def raw_values(self, name: str) -> list[Any]:
        """The loose values a field takes: one per value of the axis that sets it, else the base's one."""
        if name in self.provider:
            return [a.get(name) for a in self.axes[self.provider[name]][1]]
        return [self.base[name] if name in self.base else FIELDS[name].default] if name in FIELDS else [self.base.get(name)]

    def value_codes(self, name: str) -> np.ndarray:
        """Each row's index into raw_values(name)."""
        return self.codes[self.provider[name]] if name in self.provider else _zeros(self.n)


def _expand_rows(base: Mapping[str, Any], axes: list[tuple[tuple[str, ...], list[dict[str, Any]]]], strength_spec: Any) -> _Rows:
    """The axes crossed (first axis slowest), each row then repeated over its blend's lora_strength options, innermost.

    The options depend on the blend (per-LoRA strengths), so they are found once per distinct
    (blend, base strength) pair and every row indexes into them, as expand_grid nests them.
    """
    sizes = [len(assignments) for _, assignments in axes]
    total = math.prod(sizes)
    provider = {name: k for k, (names, _) in enumerate(axes) for name in names}
    none = np.zeros(total, dtype=bool)
    crossed = _Rows(base, axes, provider, _product_codes(sizes, total), [], np.zeros(total, dtype=np.int64), none, none)
    blend_values, base_strengths = crossed.raw_values("lora_model"), crossed.raw_values("lora_strength")
    pair = crossed.value_codes("lora_model") * len(base_strengths) + crossed.value_codes("lora_strength")
    unique_pairs, pair_of_row = np.unique(pair, return_inverse=True)
    options: list[Any] = []
    option_start, option_count, has_loras = [], [], []
    for code in unique_pairs.tolist():
        try:
            blend = split_loras(blend_values[code // len(base_strengths)])
        except ValueError:
            blend = []  # parsing reports it
        found = strength_options(blend, strength_spec, base_strengths[code % len(base_strengths)])
        option_start.append(len(options))
        option_count.append(len(found))
        has_loras.append(bool(blend))
        options += found
    counts = np.asarray(option_count, dtype=np.int64)[pair_of_row]
    strength = np.asarray(option_start, dtype=np.int64)[pair_of_row]
    lora = np.asarray(has_loras, dtype=bool)[pair_of_row]
    if (counts == 1).all():  # one option per row: the rows stay as crossed
        return _Rows(base, axes, provider, crossed.codes, options, strength, lora, np.zeros(total, dtype=bool))
    rows = np.repeat(np.arange(total), counts)
    within = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    codes = [c[rows] for c in crossed.codes]
    return _Rows(base, axes, provider, codes, options, strength[rows] + within, lora[rows], np.zeros(len(rows), dtype=bool))


def _zeros(n: int) -> np.ndarray:
    """n zero codes that take no memory (a read-only view of one zero): the codes of a column with one value."""
    return np.broadcast_to(np.zeros(1, dtype=np.int64), (n,))


def _base_problems(base: Mapping[str, Any], n: int) -> list[_Found]:
    """Secrets and unknown fields of the base request: on every row, before anything else (as parse_request lists them)."""
    problems: list[_Found] = []
    for position, name in enumerate(base):
        if name in SECRET_FIELDS:
            why = Problem(
                name, "API keys do not belong in sweep files", "set the key in the environment variable named by engine.api_key_env"
            )
            problems.append(((0, 0, position), str(why), n))
        elif name not in FIELDS:
            why = Problem(name, "unknown request field", did_you_mean(name, FIELDS) or f"known fields: {', '.join(FIELDS)}")
            problems.append(((0, 0, position), str(why), n))
    return problems


def _report(found: Sequence[Problem], value_rows: np.ndarray, phase: int, position: int) -> list[_Found]:
    """Problems of one distinct value, placed at the first row that has it and counted over all of them."""
    if not found:
        return []
    first, count = int(np.argmax(value_rows)), int(value_rows.sum())
    return [((first, phase, position), str(problem), count) for problem in found]


def _parse_fields(rows: _Rows, default_model_id: str, limits: Limits) -> tuple[dict[str, _Column], list[_Found]]:
    """Every request field but the blend, parsed and limit-checked once per distinct loose value (a million rows, few values)."""
    columns: dict[str, _Column] = {}
    problems: list[_Found] = []
    for position, name in enumerate(FIELDS):
        if name in ("lora_model", "lora_strength"):
            continue
        values, value_codes = rows.raw_values(name), rows.value_codes(name)
        if name == "model_id":
            values = [default_model_id if v in (None, "") else v for v in values]
        parsed = []
        for index, value in enumerate(values):
            result, problem = parse_field(name, value)
            parsed.append(result)
            limit = field_limit_problems(name, result, limits) if problem is None and name in LIMITED_FIELDS else []
            if problem is not None or limit:
                used = value_codes == index
                problems += _report([problem] if problem else [], used, 1, position)
                problems += _report(limit, used, 2, LIMITED_FIELDS.index(name) if name in LIMITED_FIELDS else 0)
        columns[name] = _Column(parsed, value_codes)
    return columns, problems


def _parse_blends(rows: _Rows, limits: Limits) -> tuple[dict[str, _Column], list[_Found]]:
    """lora_model, lora_strength and the blend label: parsed and checked together, once per distinct (blend, strength) pair."""
    blend_values, options = rows.raw_values("lora_model"), rows.options
    blend_code = np.where(rows.plain, len(blend_values), rows.value_codes("lora_model"))
    strength_code = np.where(rows.plain, len(options), rows.strength)
    pairs, pair_index = np.unique(blend_code * (len(options) + 1) + strength_code, return_inverse=True)
    problems: list[_Found] = []
    lora_texts, strength_texts, labels = [], [], []
    for index, code in enumerate(pairs.tolist()):
        blend_raw = "" if code // (len(options) + 1) == len(blend_values) else blend_values[code // (len(options) + 1)]
        strength_raw = None if code % (len(options) + 1) == len(options) else options[code % (len(options) + 1)]
        lora_model, lora_problem = parse_field("lora_model", blend_raw)
        strengths, strength_problem = parse_field("lora_strength", strength_raw)
        found = lora_problems(lora_model, strengths, limits)
        if lora_problem or strength_problem or found:
            used = pair_index == index
            problems += _report([lora_problem] if lora_problem else [], used, 1, list(FIELDS).index("lora_model"))
            problems += _report([strength_problem] if strength_problem else [], used, 1, list(FIELDS).index("lora_strength"))
            problems += _report(found, used, 3, 0)
        strength_text = canonical_strengths(lora_model, strengths)
        lora_texts.append(lora_model)
        strength_texts.append(strength_text)
        labels.append(blend_label(lora_model, strength_text))
    columns = {"lora_model": _Column(lora_texts, pair_index), "lora_strength": _Column(strength_texts, pair_index)}
    return columns | {"blend": _Column(labels, pair_index)}, problems


def _scheduler_aliases(columns: dict[str, _Column]) -> dict[str, _Column]:
    """Web-UI sampler names ("DPM++ 2M Karras", "Euler a") as the diffusers class and options they stand for, so an
    alias and its class are one image with one id. An alias's options are added to the row's (Karras on stays on)."""
    scheduler = columns["scheduler"]
    mapped = [canonical_scheduler(v) if isinstance(v, str) else None for v in scheduler.values]
    if all(m is None or (m[0] == v and not m[1]) for m, v in zip(mapped, scheduler.values)):
        return columns
    names = [m[0] if m else v for m, v in zip(mapped, scheduler.values)]
    out = dict(columns)
    out["scheduler"] = _Column(names, scheduler.codes)
    for option in ("use_karras_sigmas", "algorithm_type"):
        given = columns[option]
        keys, inverse = np.unique(scheduler.codes.astype(np.int64) * len(given.values) + given.codes, return_inverse=True)
        values = []
        for key in keys.tolist():
            alias = mapped[key // len(given.values)]
            value = given.values[key % len(given.values)]
            values.append(alias[1][option] if alias and option in alias[1] and not (option == "algorithm_type" and value) else value)
        out[option] = _Column(values, inverse)
    return out


def _merge_lora_tags(columns: dict[str, _Column], rows: _Rows, limits: Limits) -> tuple[dict[str, _Column], list[_Found]]:
    """`<lora:name:weight>` tags of the prompt: out of its text and into the row's blend, as the web UIs do, and each
    row's `lora_strength_te` as one value per LoRA (a tag's `:te:unet` pair sets it apart from lora_strength).

    Done once per distinct (prompt, blend, te strengths). A tag and `lora_model` naming the same LoRA, a strength that
    is not a number, a tag in the negative prompt and te strengths that do not fit the blend are problems. Baseline
    rows keep the clean prompt, no LoRA. `prompt_original` keeps the prompt as written.
    """
    prompt, negative, te = columns["prompt"], columns["negative_prompt"], columns["lora_strength_te"]
    problems: list[_Found] = []
    position = list(FIELDS).index("negative_prompt")
    for index, text in enumerate(negative.values):
        for tag in lora_tags(text)[1] if isinstance(text, str) else []:
            why = Problem("negative_prompt", f"'{tag.raw}' is a LoRA tag, which belongs in the prompt", "move it to the prompt")
            problems += _report([why], negative.codes == index, 3, position)
    parsed = [lora_tags(text) if isinstance(text, str) else (text, []) for text in prompt.values]
    if not any(tags for _, tags in parsed) and all(v is None for v in te.values):
        return columns | {"prompt_original": _Column([None], np.zeros(len(prompt.codes), dtype=np.int64))}, problems
    pairs = columns["lora_model"]
    n_pairs, n_te = len(pairs.values), len(te.values)
    plain = (rows.plain if len(rows.plain) == len(prompt.codes) else np.zeros(len(prompt.codes), dtype=bool)).astype(np.int64)
    key = ((prompt.codes.astype(np.int64) * n_pairs + pairs.codes) * n_te + te.codes) * 2 + plain
    keys, inverse = np.unique(key, return_inverse=True)
    prompts, originals, loras_out, strengths_out, te_out, labels = [], [], [], [], [], []
    for index, code in enumerate(keys.tolist()):
        is_plain, code = code % 2, code // 2
        te_index, code = code % n_te, code // n_te
        prompt_index, pair_index = code // n_pairs, code % n_pairs
        clean, tags = parsed[prompt_index]
        names = split_loras(pairs.values[pair_index])
        strengths = split_strengths(columns["lora_strength"].values[pair_index]) or [1.0] * len(names)
        te_given = split_strengths(te.values[te_index])
        found: list[Problem] = []
        if te_given and not names:
            found.append(Problem("lora_strength_te", "is set but lora_model is empty", "set lora_model or drop lora_strength_te"))
        elif te_given and len(te_given) not in (1, len(names)):
            found.append(
                Problem("lora_strength_te", f"{len(te_given)} strengths for {len(names)} LoRAs", "give one per LoRA, or one for all")
            )
        te_values = (te_given * len(names) if len(te_given) == 1 else list(te_given)) if te_given and names else list(strengths)
        for tag in [] if is_plain else tags:
            if tag.strength is None:
                found.append(Problem("prompt", f"'{tag.raw}': the strength is not a number", f"write e.g. <lora:{tag.name}:0.8>"))
            elif tag.name in names:
                found.append(Problem("lora_model", f"LoRA '{tag.name}' is named twice: in lora_model and as '{tag.raw}'", "keep one"))
            else:
                names.append(tag.name)
                strengths.append(tag.unet if tag.unet is not None else tag.strength)
                te_values.append(tag.strength)
        if (tags and not is_plain) or te_given:
            found += lora_problems(",".join(names), strengths, limits)
            low, high = limits.min_lora_strength, limits.max_lora_strength
            found += [
                Problem(
                    "lora_strength_te", f"{format_number(v)} is outside {format_number(low)}..{format_number(high)}", "as lora_strength"
                )
                for v in te_values
                if not low <= v <= high
            ]
        if found:
            problems += _report(found, inverse == index, 3, 0)
        apart = not is_plain and len(te_values) == len(strengths) and [round(a, 6) for a in te_values] != [round(b, 6) for b in strengths]
        lora_text = ",".join(names) if not is_plain else pairs.values[pair_index]
        strength_text = join_strengths(strengths) if not is_plain else columns["lora_strength"].values[pair_index]
        prompts.append(clean)
        originals.append(prompt.values[prompt_index] if tags else None)
        loras_out.append(lora_text)
        strengths_out.append(strength_text)
        te_out.append(join_strengths(te_values) if apart else None)  # equal to lora_strength: unset (the id as before)
        labels.append(blend_label(lora_text, strength_text) + (f" (text encoders {join_strengths(te_values)})" if apart else ""))
    merged = {
        "prompt": _Column(prompts, inverse),
        "prompt_original": _Column(originals, inverse),
        "lora_model": _Column(loras_out, inverse),
        "lora_strength": _Column(strengths_out, inverse),
        "lora_strength_te": _Column(te_out, inverse),
        "blend": _Column(labels, inverse),
    }
    return columns | merged, problems


def _first_seeds(columns: Mapping[str, _Column]) -> tuple[np.ndarray, np.ndarray]:
    """(seed given, first seed) per row: the row's seed, or for `seed: null` one drawn from the row itself (`derived_seed`)."""
    seed = columns["seed"]
    given = np.asarray([v is not None for v in seed.values], dtype=bool)[seed.codes]
    first_seed = np.asarray([0 if v is None else v for v in seed.values], dtype=np.int64)[seed.codes]
    if not given.all():
        first_seed[~given] = _derived_seeds(columns, np.flatnonzero(~given))
    return given, first_seed


def _plan_frame(columns: Mapping[str, _Column], given: np.ndarray, first_seed: np.ndarray) -> pd.DataFrame:
    """The plan as a DataFrame: `samples: N` spread over N rows with seeds seed..seed+N-1, each column built once."""
    samples = columns["samples"]
    per_row = np.asarray(samples.values, dtype=np.int64)[samples.codes]
    if (per_row == 1).all():  # the usual case: the rows stay as they are
        repeat, sample = None, np.zeros(len(per_row), dtype=np.int64)
    else:
        repeat = np.repeat(np.arange(len(per_row)), per_row)
        sample = np.arange(len(repeat)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    n = len(sample)
    frame = {
        "id": take_column([""], np.zeros(n, dtype=np.int64)),
        "blend": columns["blend"].take(repeat),
        "sample": sample,
        "seed_source": take_column(["derived", "given"], (given if repeat is None else given[repeat]).astype(np.int64)),
        "prompt_original": columns["prompt_original"].take(repeat),  # the prompt as written, where tags were taken out
    }
    for name in FIELDS:
        if name not in ("seed", "samples"):
            frame[name] = columns[name].take(repeat)
    frame["seed"] = ((first_seed if repeat is None else first_seed[repeat]) + sample) % 2**32
    frame["samples"] = np.ones(n, dtype=np.int64)
    # copy=False: the columns are new arrays already; pandas keeps them as they are instead of copying them into blocks
    return pd.DataFrame(frame, columns=[*PLAN_COLUMNS, *FIELDS], copy=False)


def _grid_axes(grid: Mapping[str, Any]) -> list[tuple[tuple[str, ...], list[dict[str, Any]]]]:
    """The grid's axes in the order written, each (fields it sets, one assignment per value); lora_strength aside."""
    problems = [
        Problem(f"sweep.grid.{key}", "unknown request field", did_you_mean(key, FIELDS) or "see the text2img spec")
        for key in grid
        if key != "zip" and key not in FIELDS
    ]
    if problems:
        raise PlanError(problems)
    axes = []
    for key, spec in grid.items():
        if key == "lora_strength":
            continue
        if key == "zip":
            assignments = _zip_axis(spec)
        elif key == "lora_model":
            assignments = [{"lora_model": ",".join(b)} for b in expand_blends(spec)]
        else:
            assignments = [{key: v} for v in expand_values(f"sweep.grid.{key}", spec)]
        axes.append((tuple(assignments[0]), assignments))
    return axes


def _product_codes(sizes: list[int], total: int) -> list[np.ndarray]:
    """itertools.product as index arrays: the first axis varies slowest."""
    codes, stride = [], total
    ramp = np.arange(total, dtype=np.int64)
    for size in sizes:
        stride //= size
        codes.append((ramp // stride) % size)
    return codes


def _with_baseline(rows: _Rows) -> _Rows:
    """Add, after all rows, the no-LoRA copy of every row with LoRAs that the plan does not have yet."""
    lora_fields = {"lora_model", "lora_strength"}
    n = rows.n
    key = np.zeros(n, dtype=np.int64)  # the row without its blend: equal keys, equal no-LoRA rows
    for k, (names, assignments) in enumerate(rows.axes):
        other = [name for name in names if name not in lora_fields]
        if not other:
            continue
        plain_values = [a.get(other[0]) for a in assignments] if len(other) == 1 else []
        if plain_values and all(type(v) in (int, str, bool, type(None)) for v in plain_values):
            texts: list[Any] = [(type(v), v) for v in plain_values]  # equal as JSON exactly when equal with their type
        else:
            texts = [json.dumps({name: a.get(name) for name in other}, sort_keys=True, default=str) for a in assignments]
        first: dict[Any, int] = {}
        content = np.asarray([first.setdefault(t, i) for i, t in enumerate(texts)], dtype=np.int64)
        key = key * len(assignments) + content[rows.codes[k]]
    empty = np.asarray([v == "" for v in rows.raw_values("lora_model")], dtype=bool)[rows.value_codes("lora_model")]
    existing = np.unique(key[empty & ~rows.lora])
    candidates = np.flatnonzero(rows.lora)
    _, first = np.unique(key[candidates], return_index=True)
    new_rows = np.sort(candidates[first])
    new_rows = new_rows[~np.isin(key[new_rows], existing)]
    added = len(new_rows)
    return _Rows(
        rows.base,
        rows.axes,
        rows.provider,
        [np.concatenate([c, c[new_rows]]) for c in rows.codes],
        rows.options,
        np.concatenate([rows.strength, np.zeros(added, dtype=rows.strength.dtype)]),
        np.concatenate([rows.lora, np.zeros(added, dtype=bool)]),
        np.concatenate([np.zeros(n, dtype=bool), np.ones(added, dtype=bool)]),
    )


def take_column(values: list[Any], codes: np.ndarray) -> Any:
    """values[codes] as a plan column: numpy ints, floats or bools, pandas strings, else numpy objects.

    What pandas would make of the column of Python values, without converting a million of them.
    """
    kinds = {type(v) for v in values}
    if kinds <= {bool}:
        array = np.asarray(values, dtype=bool)
    elif kinds <= {int} and all(-(2**63) <= v < 2**63 for v in values):  # larger ones stay Python ints, for the range check
        array = np.asarray(values, dtype=np.int64)
    elif kinds <= {float}:
        array = np.asarray(values, dtype=np.float64)
    elif kinds <= {str}:  # pandas' own string column, built by one arrow take instead of a million conversions
        return pd.array(values, dtype="str").take(np.ascontiguousarray(codes))
    else:
        array = np.empty(len(values), dtype=object)
        array[:] = values
        if all(v is None for v in values):  # an unset optional field: object, as pandas would find after looking at every row
            return pd.Series(array[codes], dtype=object, copy=False)
    if len(array) == 1 and array.dtype != object:
        return np.full(len(codes), array[0], dtype=array.dtype)  # one value: no gather
    return array[codes]


def _counted(problems: list[tuple[tuple[int, int, int], str, int]]) -> list[str]:
    """Problem texts in first-seen order (by row, then as parse_request lists them), with how many rows had each."""
    first: dict[str, tuple[int, int, int]] = {}
    counts: Counter = Counter()
    for order, text, count in problems:
        first[text] = min(first.get(text, order), order)
        counts[text] += count
    return [text + (f" ({counts[text]} rows)" if counts[text] > 1 else "") for text in sorted(first, key=first.__getitem__)]


def _json_pieces(fragments: list[tuple[str, list[str | None], np.ndarray | None]], item_sep: str, key_sep: str) -> list[Any]:
    """The JSON text of a row as pieces: constant text, or (texts, codes) where rows differ; a constant follows every part."""
    pieces: list[Any] = []
    literal = "{"
    first_key = True
    for key, texts, codes in fragments:
        lead = "" if first_key else item_sep
        if codes is None or len(texts) == 1:
            if texts[0] is not None:
                literal += f"{lead}{json.dumps(key)}{key_sep}{texts[0]}"
                first_key = False
            continue
        if any(t is None for t in texts):  # optional key: the separator goes with it
            pieces += [literal, (["" if t is None else f"{lead}{json.dumps(key)}{key_sep}{t}" for t in texts], codes)]
        else:
            pieces += [literal + lead, ([f"{json.dumps(key)}{key_sep}{t}" for t in texts], codes)]
            first_key = False
        literal = ""
    pieces.append(literal + "}")
    return pieces


_CHUNK = 1 << 16  # rows whose texts exist at once while hashing


def _row_digests(fragments: list[tuple[str, list[str | None], np.ndarray | None]], n: int, item_sep: str, key_sep: str) -> np.ndarray:
    """The first 8 bytes of sha256(json.dumps(row, sort_keys=True)) for every row (from `_json_pieces`), as (n, 8) uint8.

    A row's text is mostly what its cell shares with others: everything before the part with the
    most distinct values (the seed, typically) is hashed once per distinct prefix, and each row only
    hashes its own rest, on a copy of that hash state. Rows are hashed in chunks: a million texts
    at once would be about 1 GB.
    """
    pieces = _json_pieces(fragments, item_sep, key_sep)
    varying = [i for i, p in enumerate(pieces) if not isinstance(p, str)]
    out = np.empty((n, 8), dtype=np.uint8)
    if not varying or n == 0:
        out[:] = np.frombuffer(hashlib.sha256("".join(pieces).encode()).digest()[:8], dtype=np.uint8)
        return out
    split = max(varying, key=lambda i: len(pieces[i][0]))
    prefix, prefixes = _combined_codes([pieces[i][1] for i in varying if i < split], n)
    if prefixes > n // 2:  # too many distinct prefixes to be worth it: hash whole texts
        split, prefix, prefixes = varying[0], np.zeros(n, dtype=np.int64), 1
    first_row = np.full(prefixes, n, dtype=np.int64)
    np.minimum.at(first_row, prefix, np.arange(n, dtype=np.int64))
    states = []
    for row in first_row.tolist():
        text = "".join(p if isinstance(p, str) else p[0][p[1][row]] for p in pieces[:split])
        states.append(hashlib.sha256(text.encode()))
    rest = _merged_pieces(pieces[split:])
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        parts = [texts[codes[start:stop]].tolist() for texts, codes in rest]
        tails = parts[0] if len(parts) == 1 else list(map(b"".join, zip(*parts)))
        if prefixes == 1:
            state = states[0]
            digests = [(h := state.copy()).update(t) or h.digest() for t in tails]  # update returns None
        else:
            digests = [(h := states[p].copy()).update(t) or h.digest() for p, t in zip(prefix[start:stop].tolist(), tails)]
        out[start:stop] = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, 32)[:, :8]
    return out


def _merged_pieces(pieces: list[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pieces that start with a varying part, as varying parts only (bytes, constant text folded into its neighbour)."""
    merged = []
    for piece in pieces:
        if isinstance(piece, str):
            texts, codes = merged[-1]
            merged[-1] = ([t + piece for t in texts], codes)
        else:
            merged.append(piece)
    return [(np.asarray([t.encode() for t in texts], dtype=object), codes) for texts, codes in merged]


def _combined_codes(codes: list[np.ndarray], n: int) -> tuple[np.ndarray, int]:
    """One code per row for the combination of several codes, numbered 0..k-1: (codes, k)."""
    combined, count = np.zeros(n, dtype=np.int64), 1
    for c in codes:
        size = int(c.max()) + 1 if len(c) else 1
        combined, count = _dense(combined * size + c, count * size)
    return combined, count


def _dense(key: np.ndarray, bound: int) -> tuple[np.ndarray, int]:
    """key's distinct values (all below bound) renumbered 0..k-1 in increasing order: (codes, k), without a sort when bound is small."""
    if bound <= 4 * len(key) + 1024:
        seen = np.zeros(bound, dtype=bool)
        seen[key] = True
        return (np.cumsum(seen) - 1)[key], int(seen.sum())
    unique, inverse = np.unique(key, return_inverse=True)
    return inverse.astype(np.int64), len(unique)


def _derived_seeds(columns: Mapping[str, _Column], rows: np.ndarray | None) -> np.ndarray:
    """derived_seed of `rows` (None: all), from each column's distinct values: the same sha256 of the same JSON text."""
    keys = sorted(k for k in FIELDS if k not in NOT_IN_ID and k != "seed")
    fragments = []
    for key in keys:
        column = columns[key]
        values = [None if (v is None or (isinstance(v, float) and v != v) or v is pd.NA) else v for v in column.values]
        texts: list[str | None] = _json_values(values, default=str)
        if key in OMITTED_WHEN_UNSET:  # an unset one leaves no key behind (derived_seed drops it)
            texts = [None if v is None else t for v, t in zip(values, texts)]
        fragments.append((key, texts, column.codes if rows is None else column.codes[rows]))
    n = len(fragments[0][2])
    digests = _row_digests(fragments, n, ", ", ": ")
    return digests[:, :4].copy().view(">u4").ravel().astype(np.int64)


def _json_values(values: list[Any], **options: Any) -> list[str]:
    """json.dumps of each value; a column of ints (a million seeds) as json writes them, without a million calls."""
    if all(type(v) is int for v in values):
        return list(map(str, values))
    return [json.dumps(v, **options) for v in values]


def _factorize(column: Any) -> tuple[list[Any], np.ndarray]:
    """(distinct values as Python objects with None for missing, codes per row); a column of one value is not hashed."""
    series = pd.Series(column, copy=False)
    n = len(series)
    if n and series.dtype.kind in "biuf" and not (series.dtype.kind == "f" and series.isna().any()):
        if (series.iloc[0] == series).all():  # numbers: one comparison instead of a hash table
            return series.iloc[:1].tolist(), _zeros(n)
    elif n and series.isna().all():
        return [None], _zeros(n)
    elif n and not series.isna().iloc[0] and series.dtype != object and (series == series.iloc[0]).all():
        return series.iloc[:1].tolist(), _zeros(n)
    codes, uniques = pd.factorize(series, use_na_sentinel=False)
    if series.dtype.kind in "biu":  # no missing values possible
        return uniques.tolist(), codes
    values = [None if (v is None or (isinstance(v, float) and v != v) or v is pd.NA) else v for v in uniques.tolist()]
    return values, codes


def row_groups(frame: pd.DataFrame, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each row's group of equal values in `keys`, numbered in order of first appearance, and each group's first row.

    What groupby(keys, sort=False, dropna=False).ngroup() numbers (missing values are one value),
    from each column's codes: a column of one value is compared, not hashed.
    """
    n = len(frame)
    combined, count = _combined_codes([_factorize(frame[key])[1] for key in keys], n)
    first = np.full(count, n, dtype=np.int64)
    np.minimum.at(first, combined, np.arange(n, dtype=np.int64))
    order = np.argsort(first)
    rank = np.empty(count, dtype=np.int64)
    rank[order] = np.arange(count, dtype=np.int64)
    return rank[combined], first[order]


def with_ids(plan: pd.DataFrame, identity: Identity) -> tuple[pd.DataFrame, int]:
    """Give every row its id (`image_id`, column by column); rows that are the same image are kept once.

    Returns (plan, dropped). The plan given is not changed.
    """
    digests = _row_digests(_id_fragments(plan, identity), len(plan), ",", ":")
    key = digests.copy().view(np.uint64).ravel()  # the id is these 8 bytes in hex: equal ids, equal keys
    duplicate = pd.Series(key, copy=False).duplicated(keep="first").to_numpy()
    plan = plan.assign(id=_hex_ids(digests))
    if duplicate.any():
        plan = plan[~duplicate]
    return plan.reset_index(drop=True), int(duplicate.sum())


def _id_fragments(plan: pd.DataFrame, identity: Identity) -> list[tuple[str, list[str | None], np.ndarray | None]]:
    """The pieces of image_id's JSON text, per key in sorted order: the text of each distinct value and each row's code."""
    compact = (",", ":")
    excluded = ("lora_model", "lora_strength", "prompt_weighting")  # the weighting enters as prompt_encoding
    keys = sorted([k for k in FIELDS if k not in NOT_IN_ID and k not in excluded] + ["loras", "engine", "files", "prompt_encoding"])
    fragments: list[tuple[str, list[str | None], np.ndarray | None]] = []
    for key in keys:
        if key == "engine":
            fragments.append((key, [json.dumps(dict(identity.engine), sort_keys=True, separators=compact, default=str)], None))
        elif key == "loras":
            blends, blend_codes = _factorize(plan["lora_model"])
            strengths, strength_codes = _factorize(plan["lora_strength"])
            pair = blend_codes.astype(np.int64) * len(strengths) + strength_codes
            unique, codes = np.unique(pair, return_inverse=True)
            texts = []
            for code in unique.tolist():
                loras = split_loras(blends[code // len(strengths)])
                values = split_strengths(strengths[code % len(strengths)]) or [1.0] * len(loras)
                texts.append(
                    json.dumps(
                        sorted([name, identity.lora_hashes.get(name, ""), format_number(s)] for name, s in zip(loras, values)),
                        separators=compact,
                    )
                )
            fragments.append((key, texts, codes))
        elif key == "files":
            fragments.append((key, *_files_fragments(plan, identity)))
        elif key == "prompt_encoding":
            fragments.append((key, *_encoding_fragments(plan, identity)))
        elif key == "model_id":
            uniques, codes = _factorize(plan["model_id"])
            texts = [json.dumps([m, identity.model_hashes.get(m, "")], separators=compact, default=str) for m in uniques]
            fragments.append((key, texts, codes))
        else:
            uniques, codes = _factorize(plan[key])
            texts: list[str | None] = _json_values(uniques, sort_keys=True, separators=compact, default=str)
            if key in OMITTED_WHEN_UNSET:
                texts = [None if v is None else t for v, t in zip(uniques, texts)]
            fragments.append((key, texts, codes))
    return fragments


def _hex_ids(digests: np.ndarray) -> Any:
    """(n, 8) bytes -> n ids of 16 hex digits (hexdigest()[:16]), as a string column built without a million str objects."""
    nibbles = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    text = np.empty((len(digests), 16), dtype=np.uint8)
    text[:, 0::2], text[:, 1::2] = nibbles[digests >> 4], nibbles[digests & 15]
    if pd.Series([""]).dtype == object:  # pandas without its arrow string default: a column of str objects
        return text.view("S16").ravel().astype("U16").tolist()
    import pyarrow as pa

    offsets = np.arange(0, 16 * (len(text) + 1), 16, dtype=np.int64)
    ids = pa.LargeStringArray.from_buffers(len(text), pa.py_buffer(offsets), pa.py_buffer(text))
    return pd.array(ids, dtype=pd.Series([""]).dtype)


def _encoding_fragments(plan: pd.DataFrame, identity: Identity) -> tuple[list[str | None], np.ndarray]:
    """prompt_encoding's JSON text per distinct (prompt, negative_prompt, prompt_weighting), None where it is absent."""
    columns = [plan[c] if c in plan else pd.Series([None] * len(plan)) for c in ("prompt", "negative_prompt", "prompt_weighting")]
    factors = [_factorize(c) for c in columns]
    code, _ = _combined_codes([codes for _, codes in factors], len(plan))
    first = np.full(int(code.max()) + 1 if len(plan) else 0, len(plan), dtype=np.int64)
    np.minimum.at(first, code, np.arange(len(plan), dtype=np.int64))
    texts = []
    for row in first.tolist():
        values = [uniques[codes[row]] for uniques, codes in factors]
        encoding = prompt_encoding(*values, identity)
        texts.append(None if encoding is None else json.dumps(encoding))
    return texts, code


def _files_fragments(plan: pd.DataFrame, identity: Identity) -> tuple[list[str | None], np.ndarray]:
    """The `files` entry of image_id: only rows that use a VAE, embeddings or the upscaler carry it."""
    vaes, vae_codes = _factorize(plan["vae"])
    embeddings, embedding_codes = _factorize(plan["embeddings_model"])
    upscales, upscale_codes = _factorize(plan["upscale"])
    combined = (vae_codes.astype(np.int64) * len(embeddings) + embedding_codes) * len(upscales) + upscale_codes
    unique, codes = np.unique(combined, return_inverse=True)
    texts: list[str | None] = []
    for code in unique.tolist():
        vae = vaes[code // (len(embeddings) * len(upscales))]
        names = split_loras(embeddings[(code // len(upscales)) % len(embeddings)])
        upscale = upscales[code % len(upscales)]
        files = [f"vae:{vae}"] if vae else []
        files += [f"embeddings:{name}" for name in names]
        files += ["upscaler"] if upscale else []
        entries = sorted([name, identity.file_hashes.get(name, "")] for name in files)
        texts.append(json.dumps(entries, separators=(",", ":")) if files else None)
    return texts, codes


def given_fields(base: Mapping[str, Any], grid: Mapping[str, Any]) -> frozenset[str]:
    """The request fields a sweep sets (in its base or as grid axes, zipped ones too); the others take defaults."""
    keys = set(base) | {k for k in grid if k != "zip"}
    for member in grid.get("zip") or []:
        if isinstance(member, Mapping):
            keys |= set(member)
    zipped = grid.get("zip")
    if isinstance(zipped, Mapping):
        keys |= set(zipped)
    return frozenset(k for k in keys if k in FIELDS)


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
    return [c for c in FIELDS if c in plan and not _one_value(plan[c])]


def _one_value(column: pd.Series) -> bool:
    """Whether a column holds one value at most (missing counts as a value): one comparison, not a hash table, when it does."""
    if len(column) < 2:
        return True
    missing = column.isna()
    if missing.all():
        return True
    if missing.iloc[0] or column.dtype == object:
        return column.nunique(dropna=False) <= 1
    return bool((column == column.iloc[0]).all())


def summarize(plan: pd.DataFrame) -> dict[str, Any]:
    """Rows, distinct blends, the varying fields with their number of values, and the models: what `plan` prints."""
    axes = {c: plan[c].nunique(dropna=False) for c in varying_fields(plan)}
    if not len(plan):
        return {"rows": 0, "blends": 0, "axes": axes, "models": []}
    models = plan["model_id"].iloc[:1] if _one_value(plan["model_id"]) else plan["model_id"]
    return {"rows": len(plan), "blends": plan["lora_model"].nunique(), "axes": axes, "models": sorted(models.unique())}
