"""The main job: config -> plan -> engine -> store + tracker -> grids, with resume and a summary.

Everything here composes the pieces; each piece owns its job (plan, validate, engines, store,
tracking, writer, report).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from runner.plan import summarize, varying_fields
from runner.prepare import PreparedSweep, prepare_sweep
from runner.store import SweepLocked, SweepStore

SECRET_KEY = re.compile(r"(^|_)(key|api_key|secret|token|password)$", re.IGNORECASE)


class UserError(Exception):
    """Bad input: printed as one line per problem, exit code 2, no traceback."""

    def __init__(self, lines: list[str] | str):
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        super().__init__("\n".join(self.lines))


@dataclass
class Summary:
    sweep: str
    folder: Path
    planned: int
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    generate_s: float = 0.0  # from the engine ready to the last image written and logged
    interrupted: bool = False
    grids: list[Path] = field(default_factory=list)
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    experiment_id: str | None = None
    tracking_errors: int = 0
    report: Path | None = None
    ranking: pd.DataFrame | None = None
    rank_by: str | None = None
    scored: int = 0

    @property
    def images_per_s(self) -> float:
        done = self.ok + self.failed
        return done / self.generate_s if self.generate_s > 0 else 0.0


def redact(config: Any) -> Any:
    """The config with every secret-looking value replaced, for saving and logging."""
    if isinstance(config, dict):
        # secrets are strings: `serve.max_queued_per_key: 5` is a number, not a key
        return {k: ("***" if SECRET_KEY.search(str(k)) and isinstance(v, str) and v else redact(v)) for k, v in config.items()}
    if isinstance(config, list):
        return [redact(v) for v in config]
    return config


def config_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(redact(OmegaConf.to_container(cfg, resolve=True))))


def sweep_folder(cfg: DictConfig) -> Path:
    return Path(cfg.paths.outputs) / cfg.sweep.name


def ensure_builtin_assets(cfg: DictConfig, prepared: PreparedSweep) -> bool:
    """Copy the demo's tiny world into paths.assets if the plan or its scores use it and it is missing or from an older recipe."""
    uses_builtin = any(r.builtin for group in prepared.registry.files().values() for r in group.values())
    uses_builtin = uses_builtin or any(entry.builtin for entry in prepared.scorers.values())
    return copy_demo_world_if(uses_builtin, cfg)


def ensure_builtin_assets_for(cfg: DictConfig, entries: dict[str, dict], wanted: dict[str, set[str]]) -> None:
    """The same, for one record's files (`lora-sweep reproduce`)."""
    copy_demo_world_if(any((entries.get(kind) or {}).get(i, {}).get("builtin") for kind, ids in wanted.items() for i in ids), cfg)


def copy_demo_world_if(needed: bool, cfg: DictConfig) -> bool:
    """Copy the demo's world into paths.assets when something uses it and it is not there (or older); True if copied."""
    from runner.assets import demo_assets_ready, ensure_demo_assets

    if not needed or demo_assets_ready(Path(cfg.paths.assets)):
        return False
    print(f"copying the demo's tiny world (model, LoRAs, scorers) into {cfg.paths.assets} (once) ...", flush=True)
    ensure_demo_assets(cfg.paths.assets)
    return True


def plan_or_fail(cfg: DictConfig) -> PreparedSweep:
    prepared = prepare_sweep(cfg)
    if prepared.problems:
        raise UserError(prepared.problems)
    return prepared


def describe_plan(prepared: PreparedSweep, out: TextIO) -> None:
    info = summarize(prepared.plan)
    axes = ", ".join(f"{k}={v}" for k, v in info["axes"].items()) or "none"
    dup = f" ({prepared.duplicates} duplicate rows dropped)" if prepared.duplicates else ""
    print(f"plan '{prepared.name}': {info['rows']} images, {info['blends']} distinct blends, axes: {axes}{dup}", file=out)
    for warning in prepared.warnings:
        print(f"warning: {warning}", file=out)


def open_tracker(cfg: DictConfig, experiment: str | None = None):
    """(Tracker, uri) for tracking.*, or (None, None) with tracking off; the experiment defaults to the sweep's name."""
    if not cfg.tracking.enabled:
        return None, None
    from runner.tracking import Tracker, default_uri

    outputs = Path(cfg.paths.outputs)
    uri = cfg.tracking.uri or default_uri(outputs)
    artifacts = cfg.tracking.artifact_location
    if not artifacts and not uri.startswith(("http://", "https://", "databricks")):
        artifacts = (outputs.resolve() / "mlartifacts").as_uri()  # beside the sqlite store, not ./mlruns
    try:
        return Tracker(uri, cfg.tracking.experiment or experiment or cfg.sweep.name, artifacts), uri
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"tracking.uri: cannot use MLflow at {uri} ({first[:200]}); start the server, fix the URI, or run with tracking=none"
        ) from None


def run_sweep(cfg: DictConfig, out: TextIO = sys.stdout, generate: bool = True) -> Summary:
    """Generate every image of the sweep that is not done yet; see the module docstring.

    With generate=False (`lora-sweep sync`) only the MLflow back-fill, the grids and the parent run's
    artifacts are brought up to date.
    """
    from runner.search import is_search, run_search

    if is_search(cfg):
        if not generate:
            raise UserError("sync: a search logs its trials as it runs; continue it with `lora-sweep run` and the same overrides")
        return run_search(cfg, out)
    prepared = plan_or_fail(cfg)
    if generate and ensure_builtin_assets(cfg, prepared):  # the local engine's model and LoRAs, any engine's scorers
        prepared = plan_or_fail(cfg)  # hashed again from the files just built
    api_key = require_api_key(cfg) if cfg.engine.kind == "remote" and generate else None
    plan = prepared.plan
    store = locked_store(cfg)
    try:
        return _run_locked(cfg, prepared, plan, store, out, generate, api_key)
    finally:
        store.release()


def locked_store(cfg: DictConfig) -> SweepStore:
    """The sweep folder's store, locked for this process (one run per sweep folder at a time)."""
    store = SweepStore(sweep_folder(cfg))
    try:
        store.acquire()
    except SweepLocked as exc:
        raise UserError(f"sweep.name: {exc}") from None
    except OSError as exc:
        raise UserError(
            f"paths.outputs: cannot write {store.root} ({exc.strerror}); choose a writable folder with paths.outputs=DIR"
        ) from None
    return store


def file_hashes_and_tags(files: dict, sweep: str, engine: str) -> tuple[dict[str, str], dict[str, str]]:
    """Each file's sha256 by `kind:id` (PNG text chunks), and the tags every run of the sweep carries."""
    hashes = {f"{SINGULAR[kind]}:{k}": v.sha256 for kind, group in files.items() for k, v in group.items()}
    tags = {"lora_sweep.sweep": sweep, "engine": engine}
    for kind, group in files.items():
        for k, v in group.items():
            tags |= {f"{SINGULAR[kind]}.{k}.sha256": v.sha256, f"{SINGULAR[kind]}.{k}.short_hash": v.short_hash}
    return hashes, tags


SINGULAR = {"models": "model", "loras": "lora", "vaes": "vae", "embeddings": "embeddings", "upscaler": "upscaler"}


def changed_files(before: dict[str, dict[str, str]], now: dict[str, dict[str, str]]) -> list[str]:
    """Lines naming each model, LoRA, VAE... whose file changed since the last run of this sweep."""
    from runner.registry import WHAT

    lines = []
    for kind, group in now.items():
        for name, sha in group.items():
            old = before.get(kind, {}).get(name)
            if old and sha and old != sha:
                what = WHAT.get(kind, kind)
                lines.append(
                    f"{what} '{name}' changed on disk since the last run (sha256 {old[:10]} -> {sha[:10]}): "
                    "its images get new ids and are generated again"
                )
    return lines


def backfill_tracking(tracker, store: SweepStore, plan: pd.DataFrame, rows: dict, tags: dict, out: TextIO) -> int:
    """Log to MLflow the finished images that are in the results but not in MLflow (it was down)."""
    from runner.engines.base import ImageResult

    results = store.read_results()
    results = results[results["id"].isin(plan["id"]) & results["status"].isin(["ok", "failed"])]
    missing = [r for r in results.to_dict("records") if tracker.children.get(r["id"], ("", ""))[1] not in ("FINISHED", "FAILED")]
    items, logged = [], []
    for record in missing:
        path = store.image_path(record["id"]) if record["status"] == "ok" else None
        if path is not None and not path.exists():
            continue
        result = ImageResult(
            id=record["id"],
            status=record["status"],
            error=str(record.get("error") or ""),
            seed=int(record["seed"]),
            scheduler=str(record.get("scheduler") or ""),
            generation_s=float(record.get("generation_s") or 0),
            batch_size=int(record.get("batch_size") or 1),
            notes=[n for n in str(record.get("notes") or "").split("; ") if n],
        )
        items.append((rows[record["id"]], result, path))
        logged.append(record)
    for start in range(0, len(items), 256):
        tracker.log_images(items[start : start + 256], {**tags, "lora_sweep.backfilled": "true"})
        for record in logged[start : start + 256]:
            store.append_result({**record, "tracked": True})
    if logged:
        print(f"logged {len(logged)} earlier images to MLflow that were not logged when they were made", file=out)
    return len(logged)


def require_api_key(cfg: DictConfig) -> str:
    """The provider's key, from the environment variable (or file) the config names; never from YAML."""
    if cfg.engine.get("api_key_file"):
        try:
            key = Path(cfg.engine.api_key_file).expanduser().read_text().strip()
        except OSError as exc:
            raise UserError(f"engine.api_key_file: cannot read {cfg.engine.api_key_file} ({exc.strerror})") from None
    else:
        key = os.environ.get(cfg.engine.api_key_env, "").strip()
    if not key:
        raise UserError(
            f"engine.api_key_env: the remote engine needs an API key; set it with: export {cfg.engine.api_key_env}=YOUR_KEY "
            "(or set engine.api_key_file=PATH)"
        )
    return key


def with_remote_ids(pending: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """Rows an earlier run submitted but did not finish carry their remote id: fetch, do not pay twice."""
    if "meta.remote_id" not in results:
        return pending
    known = results.dropna(subset=["meta.remote_id"])
    known = known[known["meta.remote_id"].astype(str) != ""].set_index("id")["meta.remote_id"]
    return pending.assign(remote_id=pending["id"].map(known).fillna(""))


def _run_locked(
    cfg: DictConfig, prepared: PreparedSweep, plan: pd.DataFrame, store: SweepStore, out: TextIO, generate: bool, api_key: str | None
) -> Summary:
    describe_plan(prepared, out)
    registry = prepared.registry
    files = registry.files()
    identity = {kind: {k: v.sha256 for k, v in group.items()} for kind, group in files.items()}
    for line in changed_files(store.read_identity(), identity):
        print(line, file=out)
    store.write_plan(plan)
    plan.to_csv(store.root / "plan.csv", index=False)
    store.write_config(config_yaml(cfg))
    store.write_identity(identity)
    done = store.ok_ids()
    if not generate:
        pending = plan.iloc[0:0]
    elif cfg.retry_failed:
        pending = plan[plan["id"].isin(store.failed_ids() - done)]
    else:
        pending = plan[~plan["id"].isin(done)]
    summary = Summary(cfg.sweep.name, store.root, len(plan), skipped=len(plan) - len(pending))
    if summary.skipped and generate:
        print(f"{summary.skipped} images already done in {store.root}; generating the other {len(pending)}", file=out)

    tracker, summary.tracking_uri = open_tracker(cfg)
    hashes, base_tags = file_hashes_and_tags(files, cfg.sweep.name, cfg.engine.kind)
    rows = {r["id"]: r for r in plan.to_dict("records")}  # the writer's and the back-fill's view of each image
    if tracker:
        tracker.name_axes = varying_fields(plan)
        tracker.chart_images = bool(cfg.tracking.get("chart_images", True))
        summary.experiment_id = tracker.experiment_id
        summary.parent_run_id = tracker.start_parent(
            cfg.sweep.name,
            base_tags,
            {"sweep": cfg.sweep.name, "images": str(len(plan)), **{f"axis.{k}": str(v) for k, v in summarize(plan)["axes"].items()}},
        )
        backfill_tracking(tracker, store, plan, rows, base_tags, out)

    status = "FINISHED"
    if len(pending):
        pending = with_remote_ids(pending, store.read_results())
        if cfg.engine.kind == "remote":
            print(f"sending {len(pending)} requests to {cfg.engine.base_url} ({cfg.engine.max_in_flight} at a time)", file=out)
        summary, status = _generate(cfg, prepared, pending, rows, store, tracker, hashes, base_tags, summary, api_key)

    results = store.snapshot()
    scores = list(cfg.sweep.scores)
    if scores and not summary.interrupted:
        summary.scored = score_stage(cfg, prepared.scorers, store, plan, results, tracker, out)
        results = store.snapshot()
    write_report(cfg, store, plan, results, summary)
    if tracker:
        results.to_csv(store.root / "results.csv", index=False)
        finish_parent(tracker, summary, status, store, out)
    print_summary(summary, out)
    return summary


def user_command() -> str:
    """The command as the user typed it (the CLI keeps it before Hydra rewrites argv), for the report."""
    import shlex

    argv = os.environ.get("LORA_SWEEP_ARGV")
    return "lora-sweep " + shlex.join(json.loads(argv)) if argv else "lora-sweep run"


def write_report(cfg: DictConfig, store: SweepStore, plan: pd.DataFrame, results: pd.DataFrame, summary: Summary) -> None:
    from runner.report import make_report

    files = make_report(
        store, plan, results, cfg.sweep.report, list(cfg.sweep.scores), cfg.sweep.name, cfg.sweep.description, user_command()
    )
    summary.grids, summary.report, summary.ranking, summary.rank_by = files.grids, files.html, files.ranking, files.rank_by


def score_stage(cfg: DictConfig, scorers: dict, store: SweepStore, plan: pd.DataFrame, results: pd.DataFrame, tracker, out: TextIO) -> int:
    """Scores of the finished images that lack them, into the store and onto their MLflow runs. Returns images scored."""
    from runner.scores import compute_scores

    started = time.perf_counter()
    scores = compute_scores(
        plan,
        results,
        store.root,
        list(cfg.sweep.scores),
        scorers,
        cfg.scores.clip,
        device=cfg.scores.device,
        batch_size=cfg.scores.batch_size,
    )
    store.append_scores(scores)
    if len(scores):
        print(f"scored {len(scores)} images ({', '.join(cfg.sweep.scores)}) in {time.perf_counter() - started:.1f} s", file=out)
    if tracker is not None and len(scores):
        try:
            tracker.log_scores(scores)
        except Exception as exc:
            print(
                f"warning: could not log the scores to MLflow ({str(exc).splitlines()[0][:160]}); `lora-sweep score` logs them later",
                file=out,
            )
    return len(scores)


def finish_parent(tracker, summary: Summary, status: str, store: SweepStore, out: TextIO) -> None:
    """Attach the sweep's files to the parent run and end it; MLflow being down must not lose the run."""
    try:
        tracker.finish_parent(
            status,
            files={
                "": store.plan_path,
                "results": store.results_path,
                "results_csv": store.root / "results.csv",
                "config": store.config_path,
                "report": store.root / "report.html",
                "report/ranking": store.root / "ranking.csv",
            },
            folders={"grids": store.grids, "report/curves": store.root / "report", "search": store.root / "search"},
            metrics={"images_ok": summary.ok, "images_failed": summary.failed, "images_per_s": summary.images_per_s},
        )
        if summary.ranking is not None:
            tracker.log_ranking(summary.ranking.drop(columns=["ids"], errors="ignore"))
    except Exception as exc:
        summary.tracking_errors += 1
        print(f"warning: could not finish the MLflow parent run ({str(exc).splitlines()[0][:160]})", file=out)


def _generate(cfg, prepared, pending, rows, store, tracker, hashes, base_tags, summary, api_key=None):
    from runner.generation import Generation

    status = "FINISHED"
    generation = Generation(cfg, prepared, store, tracker, rows, hashes, base_tags, api_key)
    try:
        generation.run(pending, summary)
    except KeyboardInterrupt:
        summary.interrupted = True
        status = "KILLED"
    finally:
        generation.close(summary)
    return summary, status


def print_summary(s: Summary, out: TextIO) -> None:
    state = "interrupted" if s.interrupted else "done"
    print(
        f"{state}: {s.ok} ok, {s.failed} failed, {s.skipped} skipped of {s.planned} images"
        + (f" at {s.images_per_s:.2f} images/s" if s.generate_s else ""),
        file=out,
    )
    if s.ranking is not None and not s.ranking.empty:
        print(f"best by {s.rank_by} (mean over seeds, 95% interval):", file=out)
        for record in s.ranking.head(3).to_dict("records"):
            mean = record[f"{s.rank_by}_mean"]
            interval = f"  [{record['ci_low']:.3f}, {record['ci_high']:.3f}]" if record["ci_low"] == record["ci_low"] else ""
            print(f"  {record['rank']}. {record['cell']}: {mean:.3f}{interval}", file=out)
    print(f"outputs: {s.folder}  (images/, results.parquet, grids/, config.yaml)", file=out)
    if s.report:
        print(f"report:  {s.report}  (ranking, curves, grids; open it in a browser)", file=out)
    if s.grids:
        print(f"grids:   {len(s.grids)} in {s.folder / 'grids'}, e.g. {s.grids[0]}", file=out)
    if s.tracking_uri:
        from runner.tracking import runs_view_url, ui_command

        print(f"mlflow:  experiment '{s.sweep}', parent run {s.parent_run_id}", file=out)
        print(f"         open it with: {ui_command(s.tracking_uri)}", file=out)
        if not s.tracking_uri.startswith(("http://", "https://")):
            print(f"         then the runs: {runs_view_url(s.experiment_id)}", file=out)
    if s.tracking_errors:
        print(f"warning: {s.tracking_errors} images could not be logged to MLflow; the next run or `lora-sweep sync` logs them", file=out)
    if s.failed:
        print("retry the failed images with: lora-sweep run <same overrides> retry_failed=true", file=out)
    if s.interrupted:
        print("continue where it stopped with the same command", file=out)


def run_environment_defaults() -> None:
    """No hub traffic at run time, ever."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # e.g. "requires torchvision" notes at import
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # one clear policy against a tracking server: a few quick retries, then the writer moves on
    # and the next run back-fills what was not logged
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
