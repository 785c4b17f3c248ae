"""Every plan row against the engine's abilities, before the first image. Pure: no torch, no I/O.

Problems stop the sweep (all reported at once, one line each). Warnings are said once per sweep
and what really happens is recorded on each row (`scheduler_used`, `notes`), never silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from runner.engines.base import Capabilities
from runner.errors import Problem
from runner.plan import count_problems, row_groups, take_column
from runner.schedulers import SchedulerChoice, choose


@dataclass
class Validation:
    plan: pd.DataFrame  # with scheduler_used and notes
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def validate_plan(
    plan: pd.DataFrame,
    caps: Capabilities,
    *,
    substitute_schedulers: bool = False,
    max_images: int = 5000,
    lcm_ids: frozenset[str] = frozenset(),
    families: Mapping[str, str] | None = None,
    has_upscaler: bool = False,
) -> Validation:
    """Check scheduler choices and fields the engine cannot honour; record what will really run.

    `lcm_ids` are model or LoRA ids with LCM-distilled weights (LCMScheduler needs one of them);
    `families` maps model ids to sd/sdxl (local engine: which pipelines exist for them).
    """
    problems: list[Problem] = []
    warnings: dict[str, None] = {}
    if len(plan) > max_images:
        problems.append(
            Problem(
                "sweep.max_images",
                f"the plan has {len(plan)} images, over the limit of {max_images}",
                f"shrink the grid or set sweep.max_images={len(plan)}",
            )
        )
    # every distinct combination of the fields these checks read is checked once, then spread to its rows
    not_applied_fields = sorted(set(caps.not_applied) | {"upscale", "panorama", "self_attention"})
    keys = [c for c in ["scheduler", "model_id", "lora_model", *not_applied_fields] if c in plan]
    groups, firsts = row_groups(plan, keys) if len(plan) else (np.zeros(0, dtype=np.int64), [])
    sizes = np.bincount(groups) if len(plan) else []
    group_used, group_notes, group_pipelines = [], [], []
    for first, size in zip(firsts, sizes):
        row = {k: _native(v) for k, v in plan.iloc[int(first)][keys].items()}
        row_notes: list[str] = []
        row_problems: list[Problem] = []
        if row["scheduler"] in caps.schedulers:
            choice, error = SchedulerChoice(row["scheduler"], row["scheduler"]), ""
        else:
            choice, error = choose(row["scheduler"], substitute_schedulers)
        if choice is None:
            row_problems.append(Problem("scheduler", error))
            group_used.append("")
        elif choice.used not in caps.schedulers:
            row_problems.append(Problem("scheduler", f"the {caps.kind} engine cannot run {choice.used}", "pick another scheduler"))
            group_used.append("")
        else:
            group_used.append(choice.used)
            if choice.note:
                row_notes.append(choice.note)
                warnings[choice.note] = None
        problems.extend(row_problems * int(size))  # counted per row, as before
        if row["scheduler"] == "LCMScheduler" and caps.kind == "local":
            members = {row["model_id"], *filter(None, str(row["lora_model"]).split(","))}
            if not members & lcm_ids:
                note = "LCMScheduler without LCM weights or an LCM LoRA gives poor images (mark LCM models/LoRAs with lcm: true)"
                row_notes.append(note)
                warnings[note] = None
        not_applied = dict(caps.not_applied)
        if caps.kind == "local":
            pipeline, more = local_pipeline(row, (families or {}).get(row["model_id"], "sd"), has_upscaler)
            group_pipelines.append(pipeline)
            not_applied.update(more)
        for name, why in not_applied.items():
            if row.get(name) not in (None, False, "", 0):
                note = f"{name} not applied: {why}"
                row_notes.append(note)
                warnings[note] = None
        group_notes.append("; ".join(row_notes))
    # string columns taken from the groups' values (a million objects would each be converted to arrow)
    used = take_column(group_used, groups) if len(plan) else []
    notes = take_column(group_notes, groups) if len(plan) else []
    pipelines = take_column(group_pipelines, groups) if len(plan) and group_pipelines else []
    plan = plan.assign(scheduler_used=used, notes=notes)
    if len(pipelines):
        plan = plan.assign(pipeline_used=pipelines)
    return Validation(plan, count_problems(problems), list(warnings))


def local_pipeline(row: Mapping[str, Any], family: str, has_upscaler: bool) -> tuple[str, dict[str, str]]:
    """Which diffusers pipeline runs a row locally, and why the fields it cannot honour are not applied.

    panorama -> StableDiffusionPanoramaPipeline, self_attention -> StableDiffusionSAGPipeline (SD 1.x/2.x
    only: diffusers has neither for SDXL); upscale runs the configured 2x upscaler after any of them.
    """
    not_applied: dict[str, str] = {}
    if not has_upscaler:
        not_applied["upscale"] = "no upscaler model is configured (set upscaler.source)"
    if family == "sdxl":
        not_applied["panorama"] = "diffusers has no SDXL panorama pipeline"
        not_applied["self_attention"] = "diffusers has no SDXL self-attention guidance pipeline"
        return "text2img", not_applied
    if row.get("panorama"):
        if row.get("self_attention"):
            not_applied["self_attention"] = "the panorama pipeline has no self-attention guidance"
        return "panorama", not_applied
    return ("sag" if row.get("self_attention") else "text2img"), not_applied


def _native(value: Any) -> Any:
    """A plan cell as Python sees it in a record: None for missing, plain bools and numbers."""
    if value is None or (isinstance(value, float) and value != value) or value is pd.NA:
        return None
    return value.item() if isinstance(value, np.generic) else value
