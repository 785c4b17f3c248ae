"""`lora-sweep run` and `sync`: a sweep file's grid -> its validated plan -> a sweep session.

Everything a sweep's life needs (lock, identity, MLflow parent, generation, scores, report, summary)
is the session's; this is only the order a grid run takes. A sweep file with `search:` runs the
search instead (runner/search).
"""

from __future__ import annotations

import sys
from typing import TextIO

from omegaconf import DictConfig

from runner.engines.remote import require_api_key
from runner.errors import UserError
from runner.plan import summarize, varying_fields
from runner.prepare import PreparedSweep, describe_plan, plan_or_fail
from runner.search import is_search, run_search
from runner.sweep import Summary, SweepSession
from runner.world.assets import copy_demo_world_if


def run_sweep(cfg: DictConfig, out: TextIO = sys.stdout, generate: bool = True) -> Summary:
    """Generate every image of the sweep that is not done yet; score, report and log it.

    With generate=False (`lora-sweep sync`) only the MLflow back-fill, the report and the parent
    run's files are brought up to date.
    """
    if is_search(cfg):
        if not generate:
            raise UserError("sync: a search logs its trials as it runs; continue it with `lora-sweep run` and the same overrides")
        return run_search(cfg, out)
    prepared = prepare_with_assets(cfg) if generate else plan_or_fail(cfg)
    api_key = require_api_key(cfg) if cfg.engine.kind == "remote" and generate else None
    plan = prepared.plan
    describe_plan(prepared, out)
    axes = {f"axis.{k}": str(v) for k, v in summarize(plan)["axes"].items()}
    session = SweepSession(
        cfg,
        prepared,
        out=out,
        api_key=api_key,
        parent_params={"sweep": cfg.sweep.name, "images": str(len(plan)), **axes},
        name_axes=varying_fields(plan),
    )
    with session:
        session.write_plan(plan)
        session.backfill(plan)
        if generate:
            with session.interruptible():
                session.generate(session.pending(plan, retry_failed=cfg.retry_failed))
        else:
            session.summary.skipped = len(plan)
        session.score(plan)
        return session.finish(plan)


def prepare_with_assets(cfg: DictConfig) -> PreparedSweep:
    """The validated plan, with the demo's tiny world copied into paths.assets first if the plan uses it."""
    prepared = plan_or_fail(cfg)
    if copy_demo_world_if(prepared.uses_demo_world, cfg.paths.assets):
        prepared = plan_or_fail(cfg)  # hashed again from the files just copied
    return prepared
