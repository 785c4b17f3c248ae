"""A search checked before its first image: the section parsed, and requests at every end of its space
validated as a grid's rows are (for `plan` and `run` alike). No torch.
"""

from __future__ import annotations

import re
from typing import Any, TextIO

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from runner.errors import UserError
from runner.plan import PlanError, build_plan, given_fields
from runner.prepare import (
    PreparedSweep,
    check_rows,
    engine_and_limits,
    engine_setting_problems,
    registry_entries,
    remote_setting_problems,
    score_entries,
)
from runner.search.spec import STRENGTH, SearchSpec, grid_settings, parse_search, probe_trials, trial_request


def is_search(cfg: DictConfig) -> bool:
    return bool(cfg.sweep.get("search") and cfg.sweep.search.get("space"))


def plain(node: Any) -> dict[str, Any]:
    """A config node as plain dicts and lists ({} for none)."""
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def search_grid(cfg: DictConfig, spec: SearchSpec) -> dict[str, Any]:
    """The grid every trial is expanded over: the sweep's own axes (prompts...) and the search's seeds."""
    return {**plain(cfg.sweep.grid), "seed": list(spec.seeds)}


def search_given(cfg: DictConfig, spec: SearchSpec) -> frozenset[str]:
    """The fields a search sets (its base, its grid, its space); the others take the model family's defaults."""
    return given_fields(plain(cfg.sweep.base), search_grid(cfg, spec)) | given_fields({p.name: None for p in spec.params}, {})


def build_requests(cfg: DictConfig, spec: SearchSpec, requests: list[dict[str, Any]]) -> tuple[list[pd.DataFrame], list[list[str]]]:
    """Each request expanded over the grid and seeds (rows without ids yet), or its problems."""
    _, limits, _ = engine_and_limits(cfg)
    grid = search_grid(cfg, spec)
    plans, problems = [], []
    for request in requests:
        try:
            built = build_plan(request, grid, default_model_id=cfg.model.id, limits=limits, baseline=bool(cfg.sweep.report.baseline))
            plans.append(built.plan)
            problems.append(list(built.problems))
        except PlanError as exc:
            plans.append(pd.DataFrame())
            problems.append([str(p) for p in exc.problems])
    return plans, problems


def _in_search_terms(lines: list[str], spec: SearchSpec) -> list[str]:
    """'guidance_scale: 25 is above 20' -> 'search.space.guidance_scale: ...' where the search set the field."""
    fields = {"lora_strength" if p.name.startswith(STRENGTH) else p.name for p in spec.params}
    out = []
    for line in lines:
        field = line.split(":", 1)[0]
        line = re.sub(r" \(\d+ rows\)$", "", line)  # rows of probe requests, not of a plan the user wrote
        out.append(f"search.space.{line}" if field in fields else line)
    return list(dict.fromkeys(out))


def prepare_search(cfg: DictConfig) -> tuple[PreparedSweep, SearchSpec | None]:
    """The search section parsed, and requests at every end of its space validated like a grid's rows (before any image)."""
    name = cfg.sweep.name
    empty = pd.DataFrame()
    base, grid = plain(cfg.sweep.base), plain(cfg.sweep.grid)
    spec, problems = parse_search(plain(cfg.sweep.search), base, grid, list(cfg.sweep.scores))
    if spec is None:
        return PreparedSweep(name, empty, None, None, problems), None
    caps, _, problems = engine_and_limits(cfg)
    if caps is None or problems:
        return PreparedSweep(name, empty, None, None, problems), spec
    probes = [trial_request(spec, base, trial) for trial in probe_trials(spec)]
    plans, plan_problems = build_requests(cfg, spec, probes)
    lines = list(dict.fromkeys(line for group in plan_problems for line in group))
    built = [plan for plan, found in zip(plans, plan_problems) if not found and not plan.empty]
    if not built:
        return PreparedSweep(name, empty, None, None, _in_search_terms(lines, spec)), spec
    rows = check_rows(pd.concat(built, ignore_index=True), cfg, caps, registry_entries(cfg), given=search_given(cfg, spec))
    scorers, score_problems = score_entries(cfg)
    engine_problems = engine_setting_problems(cfg) if caps.kind == "local" else remote_setting_problems(cfg)
    problems = _in_search_terms(lines + rows.problems, spec) + score_problems + engine_problems
    return PreparedSweep(name, rows.plan, rows.registry, rows.identity, problems, rows.warnings, 0, scorers), spec


def images_per_trial(cfg: DictConfig, spec: SearchSpec) -> int:
    """Rows one trial expands to (the grid's axes x the seeds, with baselines): every trial has as many."""
    plans, _ = build_requests(cfg, spec, [trial_request(spec, plain(cfg.sweep.base), probe_trials(spec)[0])])
    return len(plans[0])


def describe_search(prepared: PreparedSweep, spec: SearchSpec, cfg: DictConfig, out: TextIO) -> None:
    per_trial = images_per_trial(cfg, spec)
    settings = grid_settings(spec)
    print(
        f"search '{prepared.name}': {spec.trials} trials ({spec.sampler}, {spec.batch} at a time), {spec.direction} {spec.objective.text}; "
        f"each trial {per_trial} images (seeds {', '.join(map(str, spec.seeds))}), at most {spec.trials * per_trial} images",
        file=out,
    )
    for param in spec.params:
        print(f"  {param.describe()}", file=out)
    if spec.by_people:
        print(
            f"  human: each run makes {spec.batch} trials and stops; they are told once their images are in "
            f"{spec.votes_per_trial} votes each (lora-sweep compare), at the next run",
            file=out,
        )
    if settings is not None:
        print(f"  the full grid of this space at its steps: {len(settings)} settings, {len(settings) * per_trial} images", file=out)
    probes = len(probe_trials(spec))
    print(f"checked {probes} trials at the ends of every range and with every choice ({len(prepared.plan)} images' requests)", file=out)
    for warning in prepared.warnings:
        print(f"warning: {warning}", file=out)


def prepare_search_or_fail(cfg: DictConfig) -> tuple[PreparedSweep, SearchSpec]:
    """The checked search, or a UserError with one line per problem (nothing is generated)."""
    prepared, spec = prepare_search(cfg)
    if prepared.problems or spec is None:
        raise UserError(prepared.problems)
    return prepared, spec
