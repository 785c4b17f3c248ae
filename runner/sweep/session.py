"""The sweep session: one sweep's life, written once.

    with SweepSession(cfg, prepared) as session:    # lock, config.yaml, identity, MLflow parent
        session.write_plan(plan)
        with session.interruptible():              # Ctrl-C / SIGTERM: the images made so far are kept
            session.generate(session.pending(plan))
        session.score(plan)
        return session.finish(plan)                # report, parent status (KILLED if interrupted), summary

The grid run, the search, `serve` and `lora-sweep score` use it; none of them repeats a step of it.
An error or interrupt that escapes the session still releases the folder and ends the parent run
(KILLED or FAILED), so MLflow never shows a sweep running that is not.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

import pandas as pd
from omegaconf import DictConfig

from runner.config import config_yaml, sweep_folder
from runner.engines.base import ImageResult
from runner.engines.remote import with_remote_ids
from runner.prepare import PreparedSweep
from runner.registry import changed_files
from runner.report import LiveGridPage, ReportFiles, make_report
from runner.report.human import HumanReport
from runner.scores import compute_scores
from runner.store import SweepStore, locked_store
from runner.sweep.generation import Generation
from runner.sweep.summary import Summary, print_summary
from runner.tracking import Tracker, open_tracker

BACKFILL_BATCH = 256  # images logged to MLflow per call when a run catches up on what was not logged


def best_checkpoint_tags(table: pd.DataFrame, rank_by: str | None) -> dict[str, str]:
    """`best_checkpoint.<run>` = 'mine@e4 at 0.8' (with its score and interval) for each training run of the sweep."""
    if table is None or table.empty or rank_by is None:
        return {}
    tags = {}
    for run, rows in table.groupby("run", sort=False):
        best = rows.sort_values(f"{rank_by}_mean", ascending=False).iloc[0]
        tags[f"best_checkpoint.{run}"] = (
            f"{best['checkpoint']} at {best['strength']:g}: {rank_by} {best[f'{rank_by}_mean']:.4g} "
            f"[{best['ci_low']:.4g}, {best['ci_high']:.4g}]"
        )
    return tags


class SweepSession:
    """Owns one sweep folder and its MLflow parent run from lock to summary.

    `attach=True` is for commands on a finished sweep (`lora-sweep score`): the existing parent run
    is used if there is one, nothing about the sweep's inputs is rewritten and the parent keeps its status.
    `keep_adapters` keeps every LoRA the engine loads (a search's later trials, a server's next requests reuse
    them); `one_process` ignores engine.workers (a server); `on_written` is called as each image is on disk.
    """

    def __init__(
        self,
        cfg: DictConfig,
        prepared: PreparedSweep,
        *,
        out: TextIO = sys.stdout,
        folder: str | os.PathLike | None = None,
        experiment: str | None = None,
        lock_setting: str = "sweep.name",
        api_key: str | None = None,
        run_tags: Mapping[str, str] | None = None,
        parent_tags: Mapping[str, str] | None = None,
        parent_params: Mapping[str, str] | None = None,
        name_axes: list[str] | tuple[str, ...] = (),
        attach: bool = False,
        keep_adapters: bool = False,
        one_process: bool = False,
        on_written: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.cfg, self.prepared, self.out = cfg, prepared, out
        self.name = prepared.name
        self.folder = Path(folder) if folder is not None else sweep_folder(cfg)
        self.experiment = experiment
        self.lock_setting = lock_setting
        self.api_key = api_key
        self.attach = attach
        self.name_axes = list(name_axes)
        self.engine_options = {"keep_adapters": keep_adapters, "one_process": one_process, "on_written": on_written}
        registry = prepared.registry
        self.hashes = registry.file_hashes() if registry is not None else {}
        # on the parent and on every image's run
        self.tags = {"lora_sweep.sweep": self.name, "engine": cfg.engine.kind, **(registry.file_tags() if registry else {})}
        self.tags |= dict(run_tags or {})
        self.parent_tags = dict(parent_tags or {})
        self.parent_params = dict(parent_params or {})
        self.summary = Summary(self.name, self.folder, len(prepared.plan))
        self.checkpoints = pd.DataFrame()  # the report's per-checkpoint scores, for the parent run's best_checkpoint tags
        self.human: HumanReport | None = None  # the report's people's votes, for the parent run
        self.rows: dict[str, dict[str, Any]] = {}  # the writer's and the back-fill's view of each image
        self.store: SweepStore | None = None
        self.tracker: Tracker | None = None
        self._generation: Generation | None = None
        self._live: LiveGridPage | None = None  # grid.html and grid-live.js while images are made
        self._ended = False

    # ------------------------------------------------------------ open and close

    def __enter__(self) -> SweepSession:
        return self.open()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        status = "FINISHED" if exc_type is None else "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        self.close(status)

    def open(self) -> SweepSession:
        self.store = locked_store(self.folder, self.lock_setting)
        try:
            if not self.attach:
                self._record_inputs()
            self.tracker, self.summary.tracking_uri = open_tracker(self.cfg, self.experiment, self.name_axes)
            if self.tracker is not None:
                self._start_parent()
        except BaseException:
            self.store.release()
            raise
        return self

    def close(self, status: str = "FINISHED") -> None:
        """Close the engine and writer, end the parent run if `finish` did not, release the folder; safe to call twice."""
        if self.store is None:
            return
        try:
            self.close_generation()
        finally:
            if self._live is not None:  # no report came: the open grid page stops polling
                self._live.stop()
                self._live = None
            if self.tracker is not None and not self._ended and not self.attach:
                with contextlib.suppress(Exception):  # MLflow down: the next run sets the parent's status
                    self.tracker.end_parent(status)
            self._ended = True
            self.store.release()
            self.store = None

    def _record_inputs(self) -> None:
        """config.yaml and identity.json, and a line for each file that changed since the last run."""
        self.store.write_config(config_yaml(self.cfg))
        if self.prepared.registry is None:
            return
        identity = self.prepared.registry.identity()
        for line in changed_files(self.store.read_identity(), identity):
            print(line, file=self.out)
        self.store.write_identity(identity)
        self.store.write_lora_files(self.prepared.registry.lora_files())

    def _start_parent(self) -> None:
        if self.attach:
            if self.tracker.attach_parent() is None:
                print(
                    f"note: no MLflow runs of '{self.name}' at {self.summary.tracking_uri}; scores go to the sweep folder only",
                    file=self.out,
                )
                self.tracker = self.summary.tracking_uri = None
                return
        else:
            self.tracker.start_parent(self.name, {**self.tags, **self.parent_tags}, self.parent_params)
        self.summary.experiment_id = self.tracker.experiment_id
        self.summary.parent_run_id = self.tracker.parent_id

    # ------------------------------------------------------------ plan and pending rows

    def write_plan(self, plan: pd.DataFrame) -> None:
        """The plan (parquet and CSV) before any image, so every result has its row; the rows join the writer's view."""
        self.store.write_plan(plan)
        plan.to_csv(self.store.root / "plan.csv", index=False)
        self.add_rows(plan)

    def add_rows(self, rows: pd.DataFrame) -> None:
        self.rows.update({r["id"]: r for r in rows.to_dict("records")})

    def pending(self, plan: pd.DataFrame, retry_failed: bool = False) -> pd.DataFrame:
        """The rows not made yet (or only those that failed); says how many are done already."""
        done = self.store.ok_ids()
        if retry_failed:
            pending = plan[plan["id"].isin(self.store.failed_ids() - done)]
        else:
            pending = plan[~plan["id"].isin(done)]
        self.summary.skipped = len(plan) - len(pending)
        if self.summary.skipped:
            print(f"{self.summary.skipped} images already done in {self.store.root}; generating the other {len(pending)}", file=self.out)
        return pending

    def backfill(self, plan: pd.DataFrame) -> int:
        """Log to MLflow the finished images that are in the results but not in MLflow (it was down, or the run died)."""
        if self.tracker is None:
            return 0
        results = self.store.read_results()
        results = results[results["id"].isin(plan["id"]) & results["status"].isin(["ok", "failed"])]
        items, logged = [], []
        for record in results.to_dict("records"):
            if self.tracker.is_logged(record["id"]):
                continue
            path = self.store.image_path(record["id"]) if record["status"] == "ok" else None
            if path is not None and not path.exists():
                continue
            items.append((self.rows[record["id"]], result_of(record), path))
            logged.append(record)
        for start in range(0, len(items), BACKFILL_BATCH):
            self.tracker.log_images(items[start : start + BACKFILL_BATCH], {**self.tags, "lora_sweep.backfilled": "true"})
            for record in logged[start : start + BACKFILL_BATCH]:
                self.store.append_result({**record, "tracked": True})
        if logged:
            print(f"logged {len(logged)} earlier images to MLflow that were not logged when they were made", file=self.out)
        return len(logged)

    # ------------------------------------------------------------ generation

    def generation(self) -> Generation:
        """The engine and background writer, opened on first use and kept for the session (a search's batches, a server's jobs)."""
        if self._generation is None:
            self._generation = Generation(
                self.cfg,
                registry=self.prepared.registry,
                store=self.store,
                tracker=self.tracker,
                rows=self.rows,
                hashes=self.hashes,
                tags=self.tags,
                api_key=self.api_key,
                **self.engine_options,
            )
        return self._generation

    def generate(self, rows: pd.DataFrame, desc: str | None = None) -> None:
        """Make `rows` (their results counted in the summary); a remote engine first fetches what an earlier run submitted."""
        if rows.empty:
            return
        if self.cfg.engine.kind == "remote":
            rows = with_remote_ids(rows, self.store.read_results())
            engine = self.cfg.engine
            print(f"sending {len(rows)} requests to {engine.base_url} ({engine.max_in_flight} at a time)", file=self.out)
        live = self.live_page()
        live.start(self.store.read_plan())  # the page can be opened while the images come
        self.generation().run(rows, self.summary, desc=desc, on_result=live.tick)
        live.write()

    def live_page(self) -> LiveGridPage:
        """grid.html at the start and grid-live.js as images land, so an open grid page follows the sweep."""
        if self._live is None:
            sweep = self.cfg.sweep
            grid = sweep.report.grid
            axes = {"x": grid.x, "y": grid.y, "page": grid.get("page")}
            self._live = LiveGridPage(self.store, list(sweep.scores), sweep.name, axes)
        return self._live

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Ctrl-C or SIGTERM inside stops generating; what finished is written, the sweep ends as interrupted (KILLED)."""
        try:
            yield
        except KeyboardInterrupt:
            self.summary.interrupted = True
            self.close_generation()

    def close_generation(self) -> None:
        if self._generation is not None:
            generation, self._generation = self._generation, None
            generation.close(self.summary)

    # ------------------------------------------------------------ scores, report, finish

    def score(self, plan: pd.DataFrame, quiet: bool = False) -> int:
        """Scores of the finished images that lack them, into the store and onto their MLflow runs; images scored."""
        names = list(self.cfg.sweep.scores)
        if not names or self.summary.interrupted:
            return 0
        started = time.perf_counter()
        scores = compute_scores(
            plan,
            self.store.read_results(),
            self.store.root,
            names,
            self.prepared.scorers,
            self.cfg.scores.clip,
            device=self.cfg.scores.device,
            batch_size=self.cfg.scores.batch_size,
        )
        self.store.append_scores(scores)
        if len(scores) and not quiet:
            print(f"scored {len(scores)} images ({', '.join(names)}) in {time.perf_counter() - started:.1f} s", file=self.out)
        if self.tracker is not None and len(scores):
            try:
                self.tracker.log_scores(scores)
            except Exception as exc:
                print(f"warning: could not log the scores to MLflow ({first_line(exc)}); `lora-sweep score` logs them later", file=self.out)
        self.summary.scored += len(scores)
        return len(scores)

    def report(self, plan: pd.DataFrame, results: pd.DataFrame) -> ReportFiles:
        files = write_report(self.cfg, self.store, plan, results)
        self.checkpoints = files.checkpoints
        self.human = files.human
        s = self.summary
        s.grids, s.report, s.ranking, s.rank_by = files.grids, files.html, files.ranking, files.rank_by
        return files

    def publish_report(self, plan: pd.DataFrame) -> ReportFiles:
        """The report from what the folder holds now, also onto the parent run (which keeps its status)."""
        files = self.report(plan, self.store.snapshot())
        if self.tracker is not None:
            self.tracker.log_parent_files({"report": files.html, "report/ranking": self.store.root / "ranking.csv"})
            if files.ranking is not None:
                self.tracker.log_ranking(files.ranking.drop(columns=["ids"], errors="ignore"))
            self._log_human()
        return files

    def finish(self, plan: pd.DataFrame, results: pd.DataFrame | None = None) -> Summary:
        """Report, the parent run's files and status, the printed summary; the session's last step."""
        self.close_generation()
        results = self.store.snapshot() if results is None else results
        self.report(plan, results)
        self._live = None  # the report's grid page and grid-live.js are the final ones
        if self.tracker is not None:
            results.to_csv(self.store.root / "results.csv", index=False)
            self._finish_parent()
        self._ended = True
        print_summary(self.summary, self.out)
        return self.summary

    def _finish_parent(self) -> None:
        """Attach the sweep's files to the parent run and end it; MLflow being down must not lose the run."""
        store, summary = self.store, self.summary
        try:
            self.tracker.finish_parent(
                "KILLED" if summary.interrupted else "FINISHED",
                files={
                    "": store.plan_path,
                    "results": store.results_path,
                    "results_csv": store.root / "results.csv",
                    "config": store.config_path,
                    "report": store.root / "report.html",
                    "report/ranking": store.root / "ranking.csv",
                    "report/checkpoints": store.root / "checkpoints.csv",
                },
                folders={"grids": store.grids, "report/curves": store.root / "report", "search": store.root / "search"},
                metrics={"images_ok": summary.ok, "images_failed": summary.failed, "images_per_s": summary.images_per_s},
            )
            if summary.ranking is not None:
                self.tracker.log_ranking(summary.ranking.drop(columns=["ids"], errors="ignore"))
            self._log_human()
            self.tracker.tag_parent(best_checkpoint_tags(self.checkpoints, summary.rank_by))
        except Exception as exc:
            summary.tracking_errors += 1
            print(f"warning: could not finish the MLflow parent run ({first_line(exc)})", file=self.out)

    def _log_human(self) -> None:
        """People's ranking and the scores' agreement with it onto the parent run (after the score ranking)."""
        if self.human is not None and not self.human.ranking.empty:
            self.tracker.log_human(self.human.ranking.drop(columns=["ids"], errors="ignore"), self.human.scores)


def write_report(cfg: DictConfig, store: SweepStore, plan: pd.DataFrame, results: pd.DataFrame) -> ReportFiles:
    """Grids, ranking, curves and report.html as the config's report section asks (`run`, `score` and `report` alike)."""
    sweep = cfg.sweep
    return make_report(
        store, plan, results, sweep.report, list(sweep.scores), sweep.name, description=sweep.description, command=user_command()
    )


def user_command() -> str:
    """The command as the user typed it (the CLI keeps it before Hydra rewrites argv), for the report."""
    import json

    argv = os.environ.get("LORA_SWEEP_ARGV")
    return "lora-sweep " + shlex.join(json.loads(argv)) if argv else "lora-sweep run"


def result_of(record: Mapping[str, Any]) -> ImageResult:
    """A journalled result as the writer had it, for logging it to MLflow after the fact."""
    return ImageResult(
        id=record["id"],
        status=record["status"],
        error=str(record.get("error") or ""),
        seed=int(record["seed"]),
        scheduler=str(record.get("scheduler") or ""),
        generation_s=float(record.get("generation_s") or 0),
        batch_size=int(record.get("batch_size") or 1),
        notes=[n for n in str(record.get("notes") or "").split("; ") if n],
    )


def first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
