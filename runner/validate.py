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
from runner.families import FAMILIES, Family
from runner.plan import count_problems, row_groups, take_column
from runner.request import FIELDS
from runner.schedulers import SchedulerChoice, choose

# the fields the family checks read (besides scheduler, model_id and lora_model)
FAMILY_FIELDS = ("clip_skip", "negative_prompt", "true_cfg_scale", "max_sequence_length", "shift", "width", "height", "guidance_scale")


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
    given: frozenset[str] = frozenset(FIELDS),
) -> Validation:
    """Check scheduler choices and fields the engine cannot honour; record what will really run.

    `lcm_ids` are model or LoRA ids with LCM-distilled weights (LCMScheduler needs one of them);
    `families` maps model ids to their family (runner/families.py: what the local engine can do with them);
    `given` are the fields the user set (a guidance_scale the family ignores is said only if given).
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
    local = caps.kind == "local"
    keys = [c for c in ["scheduler", "model_id", "lora_model", *not_applied_fields, *(FAMILY_FIELDS if local else ())] if c in plan]
    groups, firsts = row_groups(plan, keys) if len(plan) else (np.zeros(0, dtype=np.int64), [])
    sizes = np.bincount(groups) if len(plan) else []
    group_used, group_notes, group_pipelines = [], [], []
    for first, size in zip(firsts, sizes):
        row = {k: _native(v) for k, v in plan.iloc[int(first)][keys].items()}
        row_notes: list[str] = []
        row_problems: list[Problem] = []
        family_name = (families or {}).get(row["model_id"])
        family = FAMILIES[family_name] if local and family_name else None
        if local and family is None:  # an unresolved model (its own line says why): no family to check against
            choice, error = SchedulerChoice(row["scheduler"], row["scheduler"]), ""
        elif family is not None:
            choice, error = choose(row["scheduler"], substitute_schedulers, flow=family.flow_matching, family=family.label)
            row_problems += family_row_problems(row, family)
        elif row["scheduler"] in caps.schedulers:
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
        if family is not None:
            pipeline, more = local_pipeline(row, family, has_upscaler)
            group_pipelines.append(pipeline)
            not_applied.update(more)
            if family.guidance == "none" and "guidance_scale" in given:
                cfg = " (its CFG is true_cfg_scale)" if family.true_cfg else ""
                not_applied["guidance_scale"] = f"{family.label} models have no guidance input{cfg}"
        elif local:
            group_pipelines.append("text2img")
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


def local_pipeline(row: Mapping[str, Any], family: Family, has_upscaler: bool) -> tuple[str, dict[str, str]]:
    """Which diffusers pipeline runs a row locally, and why the fields it cannot honour are not applied.

    panorama -> StableDiffusionPanoramaPipeline, self_attention -> StableDiffusionSAGPipeline (SD 1.x/2.x
    only: diffusers has neither for the others); upscale runs the configured 2x upscaler (an SD latent
    upscaler: SD and SDXL only) after any of them.
    """
    not_applied: dict[str, str] = {}
    if not has_upscaler:
        not_applied["upscale"] = "no upscaler model is configured (set upscaler.source)"
    elif family.denoiser != "unet":
        not_applied["upscale"] = f"the latent upscaler is for SD models, not {family.label}"
    if family.name != "sd":
        not_applied["panorama"] = f"diffusers has no {family.label} panorama pipeline"
        not_applied["self_attention"] = f"diffusers has no {family.label} self-attention guidance pipeline"
        return "text2img", not_applied
    if row.get("panorama"):
        if row.get("self_attention"):
            not_applied["self_attention"] = "the panorama pipeline has no self-attention guidance"
        return "panorama", not_applied
    return ("sag" if row.get("self_attention") else "text2img"), not_applied


def family_row_problems(row: Mapping[str, Any], family: Family) -> list[Problem]:
    """The request fields a family cannot honour as asked, one line each naming the family and the fix."""
    model, name = row["model_id"], family.label
    problems = []
    if row.get("clip_skip") not in (None, 1) and not family.clip_skip:
        problems.append(Problem("clip_skip", f"does not apply to {name} models ('{model}'): no CLIP layers to skip", "drop clip_skip"))
    negative = bool(str(row.get("negative_prompt") or "").strip())
    true_cfg = row.get("true_cfg_scale")
    if negative and not family.negative_prompt:
        problems.append(Problem("negative_prompt", f"{name} models take no negative prompt ('{model}')", "drop negative_prompt"))
    elif negative and family.true_cfg and family.guidance != "cfg" and (true_cfg if true_cfg is not None else family.true_cfg_default) <= 1:
        problems.append(
            Problem(
                "negative_prompt",
                f"is ignored by {name} models unless true_cfg_scale > 1 ('{model}')",
                "set true_cfg_scale (e.g. 4: real CFG, two passes per step) or drop negative_prompt",
            )
        )
    if true_cfg is not None and not family.true_cfg:
        hint = ": guidance_scale is their CFG" if family.guidance == "cfg" else ""
        problems.append(Problem("true_cfg_scale", f"does not apply to {name} models ('{model}'){hint}", "drop true_cfg_scale"))
    length = row.get("max_sequence_length")
    if length is not None:
        ceiling = max((e.max_tokens for e in family.text_encoders if e.kind != "clip"), default=None)
        if family.max_sequence_length is None or ceiling is None:
            problems.append(
                Problem(
                    "max_sequence_length", f"does not apply to {name} models ('{model}'): CLIP reads 77 tokens", "drop max_sequence_length"
                )
            )
        elif length > ceiling:
            problems.append(
                Problem("max_sequence_length", f"{length} is over {name}'s {ceiling} tokens ('{model}')", f"use at most {ceiling}")
            )
    if row.get("shift") is not None and not family.flow_matching:
        problems.append(Problem("shift", f"does not apply to {name} models ('{model}'): not flow-matching", "drop shift"))
    for side in ("width", "height"):
        value = row.get(side)
        if isinstance(value, int) and value % family.size_multiple:
            fixed = max(family.size_multiple, round(value / family.size_multiple) * family.size_multiple)
            problems.append(
                Problem(side, f"{value} is not a multiple of {family.size_multiple}, which {name} models need ('{model}')", f"use {fixed}")
            )
    return problems


def apply_family_defaults(plan: pd.DataFrame, families: Mapping[str, str], given: frozenset[str]) -> pd.DataFrame:
    """The family's own defaults (runner/families.py) for the fields the user left unset: a Flux sweep that names
    no steps runs Flux's 28 with FlowMatchEulerDiscreteScheduler, not the spec's 31 with UniPC."""
    if plan.empty:
        return plan
    family_of_row = plan["model_id"].map(lambda m: families.get(m, "sd"))
    changes: dict[str, pd.Series] = {}
    for name in family_of_row.unique():
        defaults = {k: v for k, v in FAMILIES[name].defaults.items() if k not in given}
        if not defaults:
            continue
        rows = (family_of_row == name).to_numpy()
        for field_name, value in defaults.items():
            column = changes.get(field_name, plan[field_name])
            changes[field_name] = column.where(~rows, value) if not rows.all() else pd.Series([value] * len(plan), index=plan.index)
    return plan.assign(**changes) if changes else plan


def _native(value: Any) -> Any:
    """A plan cell as Python sees it in a record: None for missing, plain bools and numbers."""
    if value is None or (isinstance(value, float) and value != value) or value is pd.NA:
        return None
    return value.item() if isinstance(value, np.generic) else value
