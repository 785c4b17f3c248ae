"""Config -> validated plan: what `lora-sweep plan` prints and `lora-sweep run` executes. No torch.

Reads files only to hash them (the registry); expansion and validation stay pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from runner.engines import capabilities
from runner.plan import Identity, PlanError, build_plan, with_ids
from runner.registry import HashCache, Registry, lora_family, model_family, resolve_all
from runner.request import Limits, Problem, split_loras
from runner.validate import validate_plan


@dataclass
class PreparedSweep:
    name: str
    plan: pd.DataFrame
    registry: Registry | None
    identity: Identity | None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    duplicates: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def engine_identity(cfg: DictConfig) -> dict[str, Any]:
    """The engine settings that decide pixels (as configured: `auto` stays `auto`)."""
    if cfg.engine.kind == "remote":
        return {"kind": "remote", "base_url": cfg.engine.base_url.rstrip("/")}
    return {"kind": cfg.engine.kind, "device": cfg.engine.device, "dtype": cfg.engine.dtype}


def lora_fit_problems(plan: pd.DataFrame, registry: Registry) -> list[str]:
    """A LoRA made for another model family (an SDXL LoRA on SD 1.x, or the reverse) is refused before any image."""
    problems = []
    pairs = {(m, lora) for m, blend in zip(plan["model_id"], plan["lora_model"]) for lora in split_loras(blend)}
    for model_id, lora_id in sorted(pairs):
        model, lora = registry.models.get(model_id), registry.loras.get(lora_id)
        if model is None or lora is None or not lora.path.exists() or not model.path.exists():
            continue
        model_kind, lora_kind = model_family(model), lora_family(lora.path)
        if lora_kind == "sdxl" and model_kind != "sdxl":
            problems.append(
                str(
                    Problem(
                        f"loras.{lora_id}",
                        f"is an SDXL LoRA but model '{model_id}' is not SDXL",
                        "use it with an SDXL model or drop it from the blend",
                    )
                )
            )
    return problems


def prepare_sweep(cfg: DictConfig) -> PreparedSweep:
    name = cfg.sweep.name
    try:
        caps = capabilities(cfg.engine.kind)
    except KeyError:
        return PreparedSweep(
            name, pd.DataFrame(), None, None, [str(Problem("engine.kind", f"unknown engine '{cfg.engine.kind}'", "use engine=local"))]
        )
    if not cfg.sweep.base and not cfg.sweep.grid:
        return PreparedSweep(
            name,
            pd.DataFrame(),
            None,
            None,
            [str(Problem("sweep.base", "the sweep has no base request and no grid", "give at least sweep.base.prompt"))],
        )

    limits = Limits(max_lora_strength=float(cfg.validation.max_lora_strength))
    if not 0.1 <= limits.max_lora_strength <= 2:
        return PreparedSweep(
            name,
            pd.DataFrame(),
            None,
            None,
            [str(Problem("validation.max_lora_strength", f"{limits.max_lora_strength} is outside 0.1..2", "use 1 (the spec) or up to 2"))],
        )
    base = OmegaConf.to_container(cfg.sweep.base, resolve=True)
    grid = OmegaConf.to_container(cfg.sweep.grid, resolve=True)
    try:
        built = build_plan(base, grid, default_model_id=cfg.model.id, limits=limits)
    except PlanError as exc:
        return PreparedSweep(name, pd.DataFrame(), None, None, [str(p) for p in exc.problems])
    if built.problems:
        return PreparedSweep(name, built.plan, None, None, built.problems)

    plan = built.plan
    models = OmegaConf.to_container(cfg.models, resolve=True)
    loras = OmegaConf.to_container(cfg.loras, resolve=True)
    lora_ids = {lora for blend in plan["lora_model"].unique() for lora in split_loras(blend)}
    if caps.kind == "remote":  # model and LoRA ids are the provider's: nothing on disk to resolve or hash
        registry = Registry({}, {}, [])
    else:
        hashes = HashCache(Path(cfg.paths.outputs) / ".cache" / "hashes.json")
        registry = resolve_all(models, loras, set(plan["model_id"].unique()), lora_ids, hashes)
    identity = Identity(
        model_hashes={k: v.identity for k, v in registry.models.items()},
        lora_hashes={k: v.identity for k, v in registry.loras.items()},
        engine=engine_identity(cfg),
    )
    problems_fit = lora_fit_problems(plan, registry)
    plan, duplicates = with_ids(plan, identity)
    lcm_ids = frozenset(k for k, v in {**models, **loras}.items() if (v or {}).get("lcm"))
    checked = validate_plan(
        plan,
        caps,
        substitute_schedulers=cfg.engine.get("substitute_schedulers", False),
        max_images=cfg.sweep.max_images,
        lcm_ids=lcm_ids,
    )
    problems = [str(p) for p in registry.problems] + problems_fit + checked.problems
    return PreparedSweep(name, checked.plan, registry, identity, problems, checked.warnings, duplicates)
