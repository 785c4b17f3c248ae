"""A search: Optuna asks a batch of trials; each becomes plan rows, which run through `run`'s engine,
store and writer; they are scored and Optuna is told.

The study lives in the sweep folder (`study.db`, Optuna's RDB storage on sqlite): a killed search
continues where it stopped. Trials asked but never told (the process died) are finished first, with
their own parameters; images a trial needs that any earlier trial made are reused by id.
"""

from __future__ import annotations

import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from runner.engines import capabilities
from runner.generation import Generation
from runner.plan import PlanError, build_plan, with_ids
from runner.prepare import (
    PreparedSweep,
    check_rows,
    engine_and_limits,
    engine_setting_problems,
    registry_entries,
    remote_setting_problems,
    score_entries,
)
from runner.registry import HashCache
from runner.run import (
    Summary,
    UserError,
    config_yaml,
    ensure_builtin_assets,
    file_hashes_and_tags,
    finish_parent,
    locked_store,
    open_tracker,
    print_summary,
    require_api_key,
    score_stage,
    write_report,
)
from runner.search.record import write_search_files
from runner.search.spec import STRENGTH, Fixed, SearchSpec, budget_grid, grid_cells, parse_search, probe_trials, trial_params, trial_request
from runner.store import SweepStore


def is_search(cfg: DictConfig) -> bool:
    return bool(cfg.sweep.get("search") and cfg.sweep.search.get("space"))


def _container(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def search_grid(cfg: DictConfig, spec: SearchSpec) -> dict[str, Any]:
    """The grid every trial is expanded over: the sweep's own axes (prompts...) and the search's seeds."""
    return {**_container(cfg.sweep.grid), "seed": list(spec.seeds)}


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
    base, grid = _container(cfg.sweep.base), _container(cfg.sweep.grid)
    spec, problems = parse_search(_container(cfg.sweep.search), base, grid, list(cfg.sweep.scores))
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
    rows = check_rows(pd.concat(built, ignore_index=True), cfg, caps, registry_entries(cfg))
    scorers, score_problems = score_entries(cfg)
    engine_problems = engine_setting_problems(cfg) if caps.kind == "local" else remote_setting_problems(cfg)
    problems = _in_search_terms(lines + rows.problems, spec) + score_problems + engine_problems
    return PreparedSweep(name, rows.plan, rows.registry, rows.identity, problems, rows.warnings, 0, scorers), spec


def images_per_trial(cfg: DictConfig, spec: SearchSpec) -> int:
    """Rows one trial expands to (the grid's axes x the seeds, with baselines): every trial has as many."""
    plans, _ = build_requests(cfg, spec, [trial_request(spec, _container(cfg.sweep.base), probe_trials(spec)[0])])
    return len(plans[0])


def describe_search(prepared: PreparedSweep, spec: SearchSpec, cfg: DictConfig, out: TextIO) -> None:
    per_trial = images_per_trial(cfg, spec)
    cells = grid_cells(spec)
    print(
        f"search '{prepared.name}': {spec.trials} trials ({spec.sampler}, {spec.batch} at a time), {spec.direction} {spec.objective.text}; "
        f"each trial {per_trial} images (seeds {', '.join(map(str, spec.seeds))}), at most {spec.trials * per_trial} images",
        file=out,
    )
    for param in spec.params:
        print(f"  {param.describe()}", file=out)
    if cells is not None:
        print(f"  the full grid of this space at its steps: {len(cells)} settings, {len(cells) * per_trial} images", file=out)
    probes = len(probe_trials(spec))
    print(f"checked {probes} trials at the ends of every range and with every choice ({len(prepared.plan)} images' requests)", file=out)
    for warning in prepared.warnings:
        print(f"warning: {warning}", file=out)


def run_search(cfg: DictConfig, out: TextIO = sys.stdout) -> Summary:
    prepared, spec = prepare_search(cfg)
    if prepared.problems or spec is None:
        raise UserError(prepared.problems)
    if ensure_builtin_assets(cfg, prepared):
        prepared, spec = prepare_search(cfg)  # hashed again from the files just built
        if prepared.problems or spec is None:
            raise UserError(prepared.problems)
    api_key = require_api_key(cfg) if cfg.engine.kind == "remote" else None
    store = locked_store(cfg)
    try:
        return Search(cfg, prepared, spec, store, out, api_key).run()
    finally:
        store.release()


@dataclass
class Evaluated:
    number: int
    state: str  # COMPLETE | FAIL
    value: float
    params: dict[str, Any]
    means: dict[str, float]
    ids: list[str]
    error: str = ""


class Search:
    def __init__(self, cfg: DictConfig, prepared: PreparedSweep, spec: SearchSpec, store: SweepStore, out: TextIO, api_key: str | None):
        self.cfg, self.prepared, self.spec, self.store, self.out, self.api_key = cfg, prepared, spec, store, out, api_key
        self.base = _container(cfg.sweep.base)
        self.caps = capabilities(cfg.engine.kind)
        self.entries = registry_entries(cfg)
        self.hash_cache = HashCache(Path(cfg.paths.outputs) / ".cache" / "hashes.json")
        self.identity = prepared.identity  # the probes named every file the space can reach
        self.plan = pd.DataFrame()
        self.rows: dict[str, dict[str, Any]] = {}  # the writer's view of each image; grows with the trials
        self.done: list[Evaluated] = []

    # ------------------------------------------------------------ the study

    def open_study(self):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        storage = f"sqlite:///{(self.store.root / 'study.db').resolve()}"
        fingerprint = repr((self.spec.fingerprint(), self.base, search_grid(self.cfg, self.spec), bool(self.cfg.sweep.report.baseline)))
        existing = optuna.study.get_all_study_names(storage) if (self.store.root / "study.db").exists() else []
        told = 0
        if self.cfg.sweep.name in existing:
            probe = optuna.load_study(study_name=self.cfg.sweep.name, storage=storage)
            if probe.user_attrs.get("lora_sweep.fingerprint") != fingerprint:
                raise UserError(
                    f"sweep.search: the space, objective, seeds or base request changed since this search started in {self.store.root}; "
                    "use a new sweep.name, or delete study.db there to start over"
                )
            told = len(probe.trials)
        study = optuna.create_study(
            study_name=self.cfg.sweep.name,
            storage=storage,
            load_if_exists=True,
            direction=self.spec.direction,
            sampler=self.sampler(told),
        )
        if not told:
            study.set_user_attr("lora_sweep.fingerprint", fingerprint)
        if self.spec.sampler == "grid" and not study.user_attrs.get("lora_sweep.grid_enqueued"):
            fixed = {p.name for p in self.spec.params if p.kind == "fixed"}
            for cell in (grid_cells(self.spec) or [])[: self.spec.trials]:
                study.enqueue_trial({k: v for k, v in cell.items() if k not in fixed})
            study.set_user_attr("lora_sweep.grid_enqueued", True)
        return study

    def sampler(self, told: int):
        """The configured sampler; a continued study reseeds it past the trials it has, so it does not ask them again."""
        import optuna

        seed = self.spec.sampler_seed + told
        if self.spec.sampler == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)
        if self.spec.sampler == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
        return optuna.samplers.RandomSampler(seed=seed)  # random, and grid (whose cells are enqueued)

    def target(self) -> int:
        if self.spec.sampler == "grid":
            return min(self.spec.trials, len(grid_cells(self.spec) or []))
        return self.spec.trials

    # ------------------------------------------------------------ run

    def run(self) -> Summary:
        import optuna

        cfg, store, out = self.cfg, self.store, self.out
        study = self.open_study()
        files = self.prepared.registry.files()
        store.write_config(config_yaml(cfg))
        store.write_identity({kind: {k: v.sha256 for k, v in group.items()} for kind, group in files.items()})
        if study.trials and store.plan_path.exists():
            self.plan = store.read_plan()
            self.rows = {r["id"]: r for r in self.plan.to_dict("records")}
        summary = Summary(cfg.sweep.name, store.root, 0)
        made_before = store.ok_ids()  # images an earlier run made: "skipped"; a trial reusing this run's images is not
        hashes, base_tags = file_hashes_and_tags(files, cfg.sweep.name, cfg.engine.kind)
        tracker, summary.tracking_uri = open_tracker(cfg)
        logged: set[int] = set()
        if tracker:
            summary.experiment_id = tracker.experiment_id
            summary.parent_run_id = tracker.start_parent(
                cfg.sweep.name, {**base_tags, "lora_sweep.search": "true"}, {"sweep": cfg.sweep.name, **self.search_params()}
            )
            logged = tracker.trial_numbers()
        finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)]
        stale = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]  # asked by a run that was killed
        target = self.target()
        describe = f"search '{cfg.sweep.name}': {target} trials, {self.spec.direction} {self.spec.objective.text}"
        if finished or stale:
            describe += f"; continuing: {len(finished)} trials done" + (f", {len(stale)} to finish" if stale else "")
        print(describe, file=out)

        status = "FINISHED"
        comparison = None
        generation = Generation(cfg, self.prepared, store, tracker, self.rows, hashes, base_tags, self.api_key, keep_adapters=True)
        try:
            if stale:
                self.evaluate(study, [(t.number, Fixed(t.params)) for t in stale], generation, summary, tracker, logged)
            while len(finished) + len(self.done) < target:
                count = min(self.spec.batch, target - len(finished) - len(self.done))
                asked = [study.ask() for _ in range(count)]
                self.evaluate(study, [(t.number, t) for t in asked], generation, summary, tracker, logged)
            if self.spec.compare_grid:
                comparison = self.compare_grid(generation, summary, tracker)
        except KeyboardInterrupt:
            summary.interrupted, status = True, "KILLED"
        finally:
            generation.close(summary)

        results = store.snapshot()
        records = self.trial_records(study, results)
        if tracker:  # trials told by a run that died before it logged them
            for record in records:
                if record.number not in logged and record.state in ("COMPLETE", "FAIL"):
                    self.log_trial(tracker, record, logged)
        best = write_search_files(store.root, study, self.spec, records, images_per_trial(cfg, self.spec), comparison)
        summary.planned = len(self.plan)
        summary.skipped = len(set(self.rows) & made_before)
        write_report(cfg, store, self.plan, results, summary)
        if tracker:
            if best is not None:
                tracker.tag_best(best.number, best.value, best.params)
            finish_parent(tracker, summary, status, store, out)
        print_summary(summary, out)
        if best is not None:
            params = "  ".join(f"{k}={v}" for k, v in best.params.items())
            print(f"best trial {best.number}: {self.spec.objective.text} = {best.value:.4f}  {params}", file=out)
            print(f"         its images: {' '.join(best.ids[:8])}{' ...' if len(best.ids) > 8 else ''}", file=out)
        return summary

    def search_params(self) -> dict[str, str]:
        spec = self.spec
        return {
            "objective": spec.objective.text,
            "direction": spec.direction,
            "trials": str(spec.trials),
            "sampler": spec.sampler,
            "seeds": ",".join(map(str, spec.seeds)),
            **{f"space.{p.name}": p.describe().split(" ", 1)[1] for p in spec.params},
        }

    # ------------------------------------------------------------ one batch of trials

    def evaluate(self, study, trials: list[tuple[int, Any]], generation: Generation, summary: Summary, tracker, logged: set[int]) -> None:
        """One batch of trials made and judged, then each told to Optuna, logged and announced."""
        import optuna

        for record in self.make_and_judge(trials, generation, summary, tracker):
            if record.state == "COMPLETE":
                study.tell(record.number, record.value)
            else:
                study.tell(record.number, state=optuna.trial.TrialState.FAIL)
            self.done.append(record)
            if tracker:
                self.log_trial(tracker, record, logged)
            self.announce(study, record)

    def make_and_judge(
        self, trials: list[tuple[int, Any]], generation: Generation, summary: Summary, tracker, label: str = "trial"
    ) -> list[Evaluated]:
        """Rows for each trial, one engine workload for all of them, their scores, and each trial's objective."""
        requests = [trial_request(self.spec, self.base, trial) for _, trial in trials]
        plans, problems = build_requests(self.cfg, self.spec, requests)
        good = [k for k, plan in enumerate(plans) if not problems[k] and not plan.empty]
        checked = None
        if good:
            checked = check_rows(pd.concat([plans[k] for k in good], ignore_index=True), self.cfg, self.caps, self.entries, self.hash_cache)
            if checked.problems:  # which trial: check each alone (rare: the ends of the space were checked before the first image)
                for k in good:
                    problems[k] = check_rows(plans[k], self.cfg, self.caps, self.entries, self.hash_cache).problems
                good = [k for k in good if not problems[k]]
                checked = (
                    check_rows(pd.concat([plans[k] for k in good], ignore_index=True), self.cfg, self.caps, self.entries, self.hash_cache)
                    if good
                    else None
                )
        ids = {k: list(with_ids(plans[k], self.identity)[0]["id"]) for k in good}
        if checked is not None:
            new = checked.plan[~checked.plan["id"].isin(self.rows)]
            if len(new):
                self.plan = pd.concat([self.plan, new], ignore_index=True) if len(self.plan) else new.reset_index(drop=True)
                self.rows.update({r["id"]: r for r in new.to_dict("records")})
                self.store.write_plan(self.plan)  # before the images: a killed search's results always have their rows
            done = self.store.ok_ids()
            pending = checked.plan[~checked.plan["id"].isin(done)]
            first, last = trials[0][0], trials[-1][0]
            generation.run(pending, summary, desc=f"{label}s {first}-{last}" if last != first else f"{label} {first}")
            self.score(checked.plan, tracker)
        results = self.store.read_results().set_index("id")  # a snapshot per batch would rewrite results.parquet each time
        records = []
        for k, (number, _) in enumerate(trials):
            params = trial_params(self.spec, requests[k])
            if k not in ids:
                records.append(Evaluated(number, "FAIL", float("nan"), params, {}, [], "; ".join(problems[k])[:500]))
            else:
                records.append(self.judge(number, params, ids[k], results))
        return records

    def compare_grid(self, generation: Generation, summary: Summary, tracker) -> dict[str, Any] | None:
        """`search.compare_grid`: what a grid of at most the search's trials, over the same space, finds (its images reused by id)."""
        cells, levels = budget_grid(self.spec, self.spec.trials)
        if not cells:
            return None
        records = self.make_and_judge(
            [(k, Fixed(cell)) for k, cell in enumerate(cells)], generation, summary, tracker, label="grid setting"
        )
        complete = [r for r in records if r.state == "COMPLETE"]
        if not complete:
            return None
        best = (max if self.spec.direction == "maximize" else min)(complete, key=lambda r: r.value)
        print(
            f"a grid at the same budget ({len(cells)} settings) finds {best.value:.4f}  "
            + "  ".join(f"{k}={v}" for k, v in best.params.items()),
            file=self.out,
        )
        return {
            "settings": len(cells),
            "levels": levels,
            "images": len({i for r in records for i in r.ids}),
            "best": {"value": best.value, "params": best.params, "ids": best.ids},
            "values": [r.value for r in complete],
        }

    def judge(self, number: int, params: dict[str, Any], ids: list[str], results: pd.DataFrame) -> Evaluated:
        """The objective over the trial's images: each score's mean over its seeds (and prompts), then the expression."""
        rows = results.reindex(ids)
        ok = rows[rows["status"] == "ok"] if "status" in rows else rows.iloc[0:0]
        if ok.empty:
            return Evaluated(number, "FAIL", float("nan"), params, {}, ids, "no image of the trial was generated")
        means = {
            name: float(pd.to_numeric(ok[name], errors="coerce").mean()) if name in ok else float("nan") for name in self.cfg.sweep.scores
        }
        missing = [n for n in self.spec.objective.names if means.get(n) != means.get(n)]
        if missing:
            return Evaluated(number, "FAIL", float("nan"), params, means, ids, f"no {', '.join(missing)} for its images")
        value = self.spec.objective.value(means)
        if value != value:
            return Evaluated(number, "FAIL", value, params, means, ids, "the objective is not a number (a division by zero?)")
        return Evaluated(number, "COMPLETE", value, params, means, ids)

    def score(self, plan: pd.DataFrame, tracker) -> None:
        if self.cfg.sweep.scores:
            import io

            score_stage(self.cfg, self.prepared.scorers, self.store, plan, self.store.read_results(), tracker, io.StringIO())

    def log_trial(self, tracker, record: Evaluated, logged: set[int]) -> None:
        try:
            metrics = {"objective": record.value, **{f"{k}_mean": v for k, v in record.means.items()}}
            tracker.log_trial(record.number, record.state, record.params, metrics, record.ids)
            logged.add(record.number)
        except Exception as exc:  # MLflow down: the next run logs the trial
            print(f"warning: could not log trial {record.number} to MLflow ({str(exc).splitlines()[0][:160]})", file=self.out)

    def announce(self, study, record: Evaluated) -> None:
        params = "  ".join(f"{k}={v}" for k, v in record.params.items())
        if record.state != "COMPLETE":
            print(f"trial {record.number}: failed ({record.error})  {params}", file=self.out, flush=True)
            return
        best = study.best_trial
        print(
            f"trial {record.number}: {record.value:.4f}  {params}  (best {best.value:.4f}, trial {best.number})", file=self.out, flush=True
        )

    def trial_records(self, study, results: pd.DataFrame) -> list[Evaluated]:
        """Every trial of the study (this run's and earlier ones'), judged from the store."""
        import optuna

        indexed = results.set_index("id") if len(results) else pd.DataFrame(columns=["status"])
        records = []
        for trial in study.trials:
            if trial.state not in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL):
                continue
            request = trial_request(self.spec, self.base, Fixed(trial.params))
            plans, problems = build_requests(self.cfg, self.spec, [request])
            ids = list(with_ids(plans[0], self.identity)[0]["id"]) if not problems[0] and not plans[0].empty else []
            params = trial_params(self.spec, request)
            if trial.state == optuna.trial.TrialState.COMPLETE:
                record = self.judge(trial.number, params, ids, indexed)
                record.value = float(trial.value)
            else:
                record = Evaluated(trial.number, "FAIL", float("nan"), params, {}, ids, "failed")
            records.append(record)
        return records
