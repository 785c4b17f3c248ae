"""Commands on a sweep folder that generate nothing new for the sweep: `score`, `report` and `reproduce`.

    lora-sweep score     outputs/demo [overrides]   compute missing scores (or a new scorer's), log them to the MLflow runs
    lora-sweep report    outputs/demo               grids, ranking, curves and report.html, also while the sweep runs
    lora-sweep reproduce IMAGE_ID | RUN_ID          regenerate one image from its record and compare the pixels

Each reads the folder's saved config.yaml, so it uses the models, LoRAs and scorers the sweep used.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from runner.config import CONF_DIR, Config, config_yaml
from runner.engines.factory import create_engine
from runner.errors import UserError
from runner.families import FAMILIES
from runner.plan import image_id
from runner.prepare import PreparedSweep, registry_identity, score_entries, wanted_files
from runner.registry import SINGULAR, HashCache, resolve_all
from runner.request import FIELDS, parse_request
from runner.store import SweepStore
from runner.sweep import SweepSession
from runner.sweep.session import write_report
from runner.tracking import open_tracker
from runner.validate import local_pipeline
from runner.world.assets import copy_demo_world_if


def folder_config(store: SweepStore, overrides: list[str] = ()) -> DictConfig:
    """The sweep's saved config (checked against the schema) with `key=value` overrides applied."""
    if not store.plan_path.exists() or not store.config_path.exists():
        raise UserError(
            f"{store.root} has no plan.parquet and config.yaml; give a sweep folder written by lora-sweep run (e.g. outputs/demo)"
        )
    try:
        saved = OmegaConf.load(store.config_path)
        layers = [group_choice(o) for o in overrides if o.split("=", 1)[0] in CONFIG_GROUPS]
        extra = OmegaConf.from_dotlist([o.lstrip("+") for o in overrides if o.split("=", 1)[0] not in CONFIG_GROUPS])
        return OmegaConf.merge(OmegaConf.structured(Config), saved, *layers, extra)
    except UserError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"overrides: {first}; use key=value, e.g. 'sweep.scores=[clip_score,aesthetic]'") from None


CONFIG_GROUPS = ("model", "engine", "tracking", "scores")


def group_choice(override: str) -> DictConfig:
    """`tracking=none` and friends: the group's file from conf/, placed where Hydra would put it."""
    group, _, option = override.partition("=")
    path = CONF_DIR / group / f"{option}.yaml"
    if not path.exists():
        options = ", ".join(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))
        raise UserError(f"{group}: no option '{option}'; available: {options}")
    content = OmegaConf.load(path)
    is_global = path.read_text().lstrip().startswith("# @package _global_")
    return content if is_global else OmegaConf.create({group: content})


def report_folder(folder: str, out: TextIO = sys.stdout) -> Path:
    """`lora-sweep report`: the whole report from what the folder holds now (no lock: the sweep may be running)."""
    store = SweepStore(folder)
    cfg = folder_config(store)
    plan = store.read_plan()
    results = store.read_results()
    files = write_report(cfg, store, plan, results)
    done = int((results["status"].isin(["ok", "failed"]) & results["id"].isin(plan["id"])).sum()) if len(results) else 0
    print(f"report of {done} of {len(plan)} images: {files.html}", file=out)
    print(f"grids:  {len(files.grids)} in {store.grids}" + (f"; ranking: {files.ranking_csv}" if files.ranking_csv else ""), file=out)
    return files.html


def score_folder(folder: str, overrides: list[str], out: TextIO = sys.stdout) -> int:
    """`lora-sweep score`: scores the finished images lack, onto their MLflow runs; then the report again."""
    store = SweepStore(folder)
    cfg = folder_config(store, overrides)
    if not cfg.sweep.scores:
        raise UserError(
            "sweep.scores: no scores asked for; e.g. lora-sweep score FOLDER 'sweep.scores=[clip_score,lora_effect,seed_spread]'"
        )
    scorers, problems = score_entries(cfg)
    if problems:
        raise UserError(problems)
    copy_demo_world_if(any(entry.builtin for entry in scorers.values()), cfg.paths.assets)
    plan = store.read_plan()
    prepared = PreparedSweep(cfg.sweep.name, plan, registry=None, identity=None, scorers=scorers)
    with SweepSession(cfg, prepared, out=out, folder=store.root, attach=True) as session:
        scored = session.score(plan)
        if not scored:
            print(f"nothing to score: every finished image already has {', '.join(cfg.sweep.scores)}", file=out)
        if session.tracker is not None:  # scores computed while MLflow was down reach their runs now
            backfilled = session.tracker.log_scores(store.read_scores(), only_missing=True)
            if backfilled:
                print(f"logged the scores of {backfilled} images to MLflow that their runs did not have", file=out)
        store.write_config(config_yaml(cfg))  # the report (and a later `score`) show the scores asked for
        files = session.publish_report(plan)
        print(f"report: {files.html}", file=out)
        return scored


# ---------------------------------------------------------------- reproduce


def find_record(outputs: Path, key: str) -> tuple[SweepStore, dict[str, Any]] | None:
    """The sweep folder and plan row of an image id under `outputs`."""
    for plan_path in sorted(outputs.glob("*/plan.parquet")):
        plan = pd.read_parquet(plan_path)
        hit = plan[plan["id"] == key]
        if len(hit):
            row = hit.iloc[0].to_dict()
            return SweepStore(plan_path.parent), {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
    return None


def records_from_mlflow(cfg: DictConfig, run_id: str) -> tuple[list[dict[str, Any]], dict[str, str], str]:
    """An image's request from its MLflow run's params (first), the other images of its batch from theirs,
    the file hashes from its tags, and its sweep name."""
    tracker, uri = open_tracker(cfg)
    if tracker is None:
        raise UserError("tracking.enabled: MLflow is off, so a run id cannot be looked up; give the image id instead")
    found = tracker.image_run(run_id)
    if found is None:
        raise UserError(f"reproduce: '{run_id}' is neither an image id under {cfg.paths.outputs} nor a run in MLflow at {uri}")
    params, tags, experiment_id = found
    if "lora_sweep.id" not in tags:
        raise UserError(f"reproduce: MLflow run {run_id} is not an image of a lora-sweep sweep (no lora_sweep.id tag)")
    hashes = {k: v for k, v in tags.items() if k.endswith(".sha256")}

    def record(params: dict[str, str], tags: dict[str, str]) -> dict[str, Any]:
        return {**params, "id": tags["lora_sweep.id"], "scheduler_used": tags.get("scheduler_used") or params.get("scheduler")}

    records = [record(params, tags)]
    for other in str(tags.get("meta.batch") or "").split():
        if other == tags["lora_sweep.id"]:
            continue
        member = tracker.find_image_run(experiment_id, other)
        if member is None:
            return records[:1], hashes, tags.get("lora_sweep.sweep", "")  # its batch is not all there: the image alone
        records.append(record(member[1], member[2]))
    return records, hashes, tags.get("lora_sweep.sweep", "")


def reproduce(key: str, overrides: list[str], cfg: DictConfig, out: TextIO = sys.stdout) -> bool:
    """Regenerate one image from its record alone; True when the pixels are identical to the stored image."""
    outputs = Path(cfg.paths.outputs)
    found = find_record(outputs, key)
    stored_png: Path | None = None
    if found:
        store, row = found
        identity = store.read_identity()
        recorded = {f"{SINGULAR[kind]}.{name}.sha256": sha for kind, group in identity.items() for name, sha in group.items()}
        stored_png = store.image_path(row["id"])
        sweep_cfg = folder_config(store, overrides)
        results = store.read_results().set_index("id")
        plan = store.read_plan().set_index("id", drop=False)
        members = str(results["meta.batch"].get(row["id"]) or "").split() if "meta.batch" in results else []
        batch = [clean(plan.loc[m].to_dict()) for m in members if m in plan.index] if members else []
    else:
        records, recorded, sweep = records_from_mlflow(cfg, key)
        store = SweepStore(outputs / sweep)
        sweep_cfg = folder_config(store, overrides) if store.config_path.exists() else cfg
        batch = []
        for params in records:
            request, problems = parse_request({k: v for k, v in params.items() if k in FIELDS})
            if problems:
                raise UserError([f"reproduce: MLflow run {key}: {p}" for p in problems])
            batch.append({**request, "id": params["id"], "scheduler_used": params["scheduler_used"]})
        row = batch[0]
        stored_png = download_run_image(sweep_cfg, key, row["id"], store.root / "reproduced")
    batch = batch if row["id"] in {b["id"] for b in batch} else [row]
    if sweep_cfg.engine.kind != "local":
        raise UserError("engine.kind: reproduce regenerates with the local engine; a remote provider's pixels are not reproducible here")

    wanted = wanted_files(pd.DataFrame([row]))
    entries = {name: OmegaConf.to_container(sweep_cfg[name], resolve=True) for name in ("models", "loras", "vaes", "embeddings")}
    copy_demo_world_if(
        any((entries.get(kind) or {}).get(i, {}).get("builtin") for kind, ids in wanted.items() for i in ids), sweep_cfg.paths.assets
    )
    hashes = HashCache(outputs / ".cache" / "hashes.json")
    registry = resolve_all(
        entries, wanted, hashes, OmegaConf.to_container(sweep_cfg.upscaler, resolve=True) if row.get("upscale") else None
    )
    if registry.problems:
        raise UserError([str(p) for p in registry.problems])
    for kind, group in registry.files().items():
        for name, resolved in group.items():
            tag = f"{SINGULAR[kind]}.{name}.sha256"
            if tag in recorded and recorded[tag] != resolved.sha256:
                raise UserError(
                    f"{kind}.{name}: {resolved.path} has changed since the image was made "
                    f"(sha256 {recorded[tag][:10]} -> {resolved.sha256[:10]}); restore the original file to reproduce it"
                )
    if image_id(row, registry_identity(registry, sweep_cfg)) != row["id"]:
        print(
            f"note: the record's id {row['id']} differs from the id its fields give now (the config changed); regenerating anyway", file=out
        )
    image = generate_batch(sweep_cfg, registry, batch, row["id"])
    target = store.root / "reproduced" / f"{row['id']}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target)
    if stored_png is None or not stored_png.exists():
        print(f"regenerated {target}; no stored image to compare with", file=out)
        return False
    with Image.open(stored_png) as before:
        old = np.asarray(before.convert("RGB"), dtype=np.int16)
    new = np.asarray(image.convert("RGB"), dtype=np.int16)
    if old.shape == new.shape and np.array_equal(old, new):
        print(f"identical: {target} has the same pixels as {stored_png}", file=out)
        return True
    diff = np.abs(old - new).max() if old.shape == new.shape else "size differs"
    print(
        f"different: {target} vs {stored_png} (largest difference {diff}/255; a GPU or another library version gives other pixels)",
        file=out,
    )
    return False


def clean(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}


def generate_batch(cfg: DictConfig, registry, rows: list[dict[str, Any]], target: str):
    """The image `target`, generated in the batch it was first made in (same members, one engine call)."""
    family = FAMILIES[next(iter(registry.models.values())).family if registry.models else "sd"]
    prepared = []
    for row in rows:
        row = dict(row)
        row["scheduler_used"] = row.get("scheduler_used") or row.get("scheduler")
        if not row.get("pipeline_used"):
            row["pipeline_used"], _ = local_pipeline(row, family, registry.upscaler is not None)
        prepared.append(row)
    settings = OmegaConf.to_container(cfg.engine, resolve=True)
    settings["batch_size"] = len(prepared)
    engine = create_engine(settings.pop("kind"), registry=registry, upscaler=OmegaConf.to_container(cfg.upscaler), api_key=None, **settings)
    frame = pd.DataFrame(prepared)
    try:
        engine.prepare(frame)
        result = next(r for r in engine.generate(frame) if r.id == target)
    finally:
        engine.close()
    if result.status != "ok":
        raise UserError(f"reproduce: generation failed: {result.error}")
    return result.image


def download_run_image(cfg: DictConfig, run_id: str, image_id: str, where: Path) -> Path | None:
    tracker, _ = open_tracker(cfg)
    return tracker.download_image(run_id, image_id, where / ".mlflow") if tracker is not None else None
