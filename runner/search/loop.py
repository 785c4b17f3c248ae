"""A search's run: Optuna asks a batch of trials; each becomes plan rows, which the sweep session
generates and scores; each trial is judged from its images' scores and Optuna is told.

The study lives in the sweep folder (`study.db`, Optuna's RDB storage on sqlite): a killed search
continues where it stopped. Trials asked but never told (the process died) are finished first, with
their own parameters; images a trial needs that any earlier trial made are reused by id.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pandas as pd
from omegaconf import DictConfig

from runner.engines.factory import capabilities
from runner.engines.remote import require_api_key
from runner.errors import UserError
from runner.plan import with_ids
from runner.prepare import PreparedSweep, check_rows, registry_entries
from runner.registry import HashCache
from runner.request import split_loras
from runner.search.people import TOLD, PeopleFit, fit_people
from runner.search.prepare import build_requests, images_per_trial, plain, prepare_search_or_fail, search_given, search_grid
from runner.search.record import write_search_files
from runner.search.spec import HUMAN, GivenTrial, SearchSpec, budget_grid, grid_settings, trial_params, trial_request
from runner.sweep import Summary, SweepSession
from runner.validate import apply_family_defaults
from runner.world.assets import copy_demo_world_if


def run_search(cfg: DictConfig, out: TextIO = sys.stdout) -> Summary:
    prepared, spec = prepare_search_or_fail(cfg)
    if copy_demo_world_if(prepared.uses_demo_world, cfg.paths.assets):
        prepared, spec = prepare_search_or_fail(cfg)  # hashed again from the files just copied
    api_key = require_api_key(cfg) if cfg.engine.kind == "remote" else None
    check_study(cfg, spec)  # before the session records this config over the one the study was started with
    session = SweepSession(
        cfg,
        prepared,
        out=out,
        api_key=api_key,
        parent_tags={"lora_sweep.search": "true"},
        parent_params={"sweep": cfg.sweep.name, **search_params(spec)},
        keep_adapters=True,  # a later trial likely uses the LoRAs an earlier one loaded
    )
    with session:
        return Search(cfg, prepared, spec, session).run()


def study_storage(folder: Path) -> str:
    return f"sqlite:///{(folder / 'study.db').resolve()}"


def study_fingerprint(cfg: DictConfig, spec: SearchSpec) -> str:
    """What a continued study must share with the one that started: its space, objective, seeds and base request."""
    return repr((spec.fingerprint(), plain(cfg.sweep.base), search_grid(cfg, spec), bool(cfg.sweep.report.baseline)))


def check_study(cfg: DictConfig, spec: SearchSpec) -> None:
    """A study of this name already in the folder was started with the same search; one line if not."""
    import optuna

    folder = Path(cfg.paths.outputs) / cfg.sweep.name
    if not (folder / "study.db").exists():
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = study_storage(folder)
    if cfg.sweep.name not in optuna.study.get_all_study_names(storage):
        return
    started = optuna.load_study(study_name=cfg.sweep.name, storage=storage).user_attrs.get("lora_sweep.fingerprint")
    if started is not None and started != study_fingerprint(cfg, spec):
        raise UserError(
            f"sweep.search: the space, objective, seeds or base request changed since this search started in {folder}; "
            "use a new sweep.name, or delete study.db there to start over"
        )


def search_params(spec: SearchSpec) -> dict[str, str]:
    """The search's settings as the parent run's params."""
    return {
        "objective": spec.objective.text,
        "direction": spec.direction,
        "trials": str(spec.trials),
        "sampler": spec.sampler,
        "seeds": ",".join(map(str, spec.seeds)),
        **{f"space.{p.name}": p.describe().split(" ", 1)[1] for p in spec.params},
    }


@dataclass
class TrialResult:
    """A trial judged from its images: its objective (or why it failed), parameters, mean scores and image ids."""

    number: int
    state: str  # COMPLETE | FAIL
    value: float
    params: dict[str, Any]
    means: dict[str, float]
    ids: list[str]
    error: str = ""  # a failure's reason; a trial WAITING for votes: how many it has
    votes: int | None = None  # a human objective: the votes its images are in


class Search:
    """The trials of one search, run through one sweep session (one engine, one writer, one MLflow parent)."""

    def __init__(self, cfg: DictConfig, prepared: PreparedSweep, spec: SearchSpec, session: SweepSession):
        self.cfg, self.prepared, self.spec, self.session = cfg, prepared, spec, session
        self.store, self.out, self.tracker = session.store, session.out, session.tracker
        self.base = plain(cfg.sweep.base)
        self.caps = capabilities(cfg.engine.kind)
        self.entries = registry_entries(cfg)
        self.hash_cache = HashCache(Path(cfg.paths.outputs) / ".cache" / "hashes.json")
        self.identity = prepared.identity  # the probes named every file the space can reach
        self.families = {k: v.family for k, v in prepared.registry.models.items()} if prepared.registry else {}
        self.given = search_given(cfg, spec)
        self.plan = pd.DataFrame()  # every row a trial of this search has needed; grows with the trials
        self.done: list[TrialResult] = []  # trials told in this run
        self.logged: set[int] = set()  # trial numbers with their MLflow run
        self.waiting: list[TrialResult] = []  # a human objective: trials made, not yet told (too few votes)

    # ------------------------------------------------------------ the study

    def open_study(self):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        storage = study_storage(self.store.root)
        existing = optuna.study.get_all_study_names(storage) if (self.store.root / "study.db").exists() else []
        told = len(optuna.load_study(study_name=self.cfg.sweep.name, storage=storage).trials) if self.cfg.sweep.name in existing else 0
        study = optuna.create_study(
            study_name=self.cfg.sweep.name,
            storage=storage,
            load_if_exists=True,
            direction=self.spec.direction,
            sampler=self.sampler(told),
        )
        if not told:
            study.set_user_attr("lora_sweep.fingerprint", study_fingerprint(self.cfg, self.spec))
        if self.spec.sampler == "grid" and not study.user_attrs.get("lora_sweep.grid_enqueued"):
            fixed = {p.name for p in self.spec.params if p.kind == "fixed"}
            for setting in (grid_settings(self.spec) or [])[: self.spec.trials]:
                study.enqueue_trial({k: v for k, v in setting.items() if k not in fixed})
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
        return optuna.samplers.RandomSampler(seed=seed)  # random, and grid (whose settings are enqueued)

    def target(self) -> int:
        if self.spec.sampler == "grid":
            return min(self.spec.trials, len(grid_settings(self.spec) or []))
        return self.spec.trials

    # ------------------------------------------------------------ run

    def run(self) -> Summary:
        import optuna

        cfg, store, out, session = self.cfg, self.store, self.out, self.session
        study = self.open_study()
        if study.trials and store.plan_path.exists():
            self.plan = store.read_plan()
            session.add_rows(self.plan)
        made_before = store.ok_ids()  # images an earlier run made: "skipped"; a trial reusing this run's images is not
        if self.tracker:
            self.logged = self.tracker.trial_numbers()
        finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)]
        stale = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]  # asked by a run that was killed
        target = self.target()
        describe = f"search '{cfg.sweep.name}': {target} trials, {self.spec.direction} {self.spec.objective.text}"
        if finished or stale:
            unfinished = "waiting for votes" if self.spec.by_people else "to finish"
            describe += f"; continuing: {len(finished)} trials done" + (f", {len(stale)} {unfinished}" if stale else "")
        print(describe, file=out)

        comparison = None
        with session.interruptible():
            if stale:
                self.evaluate(study, [(t.number, GivenTrial(t.params)) for t in stale])
            while not self.waiting and len(finished) + len(self.done) < target:
                count = min(self.spec.batch, target - len(finished) - len(self.done))
                asked = [study.ask() for _ in range(count)]
                self.evaluate(study, [(t.number, t) for t in asked])
            if self.spec.compare_grid:
                comparison = self.compare_grid()
        session.close_generation()

        results = store.snapshot()
        records = self.trial_results(study, results)
        if self.tracker:  # trials told by a run that died before it logged them
            for record in records:
                if record.number not in self.logged and record.state in ("COMPLETE", "FAIL"):
                    self.log_trial(record)
        best = write_search_files(store.root, study, self.spec, records, images_per_trial(cfg, self.spec), comparison)
        session.summary.planned = len(self.plan)
        session.summary.skipped = len(set(session.rows) & made_before)
        if self.tracker and best is not None:
            self.tracker.tag_best(best.number, best.value, best.params)
        summary = session.finish(self.plan, results)
        if best is not None:
            params = "  ".join(f"{k}={v}" for k, v in best.params.items())
            print(f"best trial {best.number}: {self.spec.objective.text} = {best.value:.4f}  {params}", file=out)
            print(f"         its images: {' '.join(best.ids[:8])}{' ...' if len(best.ids) > 8 else ''}", file=out)
        if self.waiting:
            have = ", ".join(f"trial {r.number}: {r.votes}" for r in self.waiting)
            count = f"{len(self.waiting)} trials wait" if len(self.waiting) > 1 else "1 trial waits"
            print(
                f"{count} for people's votes ({self.spec.votes_per_trial} each; {have}): "
                f"vote with `lora-sweep compare {store.root}`, then run this command again to tell them and ask the next",
                file=out,
            )
        return summary

    # ------------------------------------------------------------ one batch of trials

    def evaluate(self, study, trials: list[tuple[int, Any]]) -> None:
        """One batch of trials made and judged, then each told to Optuna, logged and announced."""
        import optuna

        for record in self.make_and_judge(trials, study=study):
            if record.state == "WAITING":  # asked, made, not told: the next run tells it once people have voted
                self.waiting.append(record)
                self.announce(study, record)
                continue
            if record.state == "COMPLETE":
                if self.spec.by_people:  # the scale later trials are told on (runner/search/people.py)
                    study.set_user_attr(TOLD, {**study.user_attrs.get(TOLD, {}), str(record.number): record.means[HUMAN]})
                study.tell(record.number, record.value)
            else:
                study.tell(record.number, state=optuna.trial.TrialState.FAIL)
            self.done.append(record)
            if self.tracker:
                self.log_trial(record)
            self.announce(study, record)

    def check(self, plans: list[pd.DataFrame]):
        given = search_given(self.cfg, self.spec)
        return check_rows(pd.concat(plans, ignore_index=True), self.cfg, self.caps, self.entries, self.hash_cache, given=given)

    def trial_ids(self, plan: pd.DataFrame) -> list[str]:
        """The ids of a trial's rows as check_rows gives them (with the model family's defaults for unset fields)."""
        if self.caps.kind == "local":
            plan = apply_family_defaults(plan, self.families, self.given)
        return list(with_ids(plan, self.identity)[0]["id"])

    def make_and_judge(self, trials: list[tuple[int, Any]], label: str = "trial", study: Any = None) -> list[TrialResult]:
        """Rows for each trial, one engine workload for all of them, their scores, and each trial's objective
        (a human objective's from the votes that stand, given the `study` that holds what earlier trials were told)."""
        requests = [trial_request(self.spec, self.base, trial) for _, trial in trials]
        plans, problems = build_requests(self.cfg, self.spec, requests)
        good = [k for k, plan in enumerate(plans) if not problems[k] and not plan.empty]
        checked = self.check([plans[k] for k in good]) if good else None
        if checked is not None and checked.problems:  # which trial: check each alone (rare: the ends of the space were checked)
            for k in good:
                problems[k] = self.check([plans[k]]).problems
            good = [k for k in good if not problems[k]]
            checked = self.check([plans[k] for k in good]) if good else None
        ids = {k: self.trial_ids(plans[k]) for k in good}
        if checked is not None:
            new = checked.plan[~checked.plan["id"].isin(self.session.rows)]
            if len(new):
                self.plan = pd.concat([self.plan, new], ignore_index=True) if len(self.plan) else new.reset_index(drop=True)
                self.session.add_rows(new)
                self.store.write_plan(self.plan)  # before the images: a killed search's results always have their rows
            done = self.store.ok_ids()
            pending = checked.plan[~checked.plan["id"].isin(done)]
            first, last = trials[0][0], trials[-1][0]
            self.session.generate(pending, desc=f"{label}s {first}-{last}" if last != first else f"{label} {first}")
            self.session.score(checked.plan, quiet=True)
        results = self.store.read_results().set_index("id")  # a snapshot per batch would rewrite results.parquet each time
        people = self.people(study) if self.spec.by_people and study is not None else None
        records = []
        for k, (number, _) in enumerate(trials):
            params = trial_params(self.spec, requests[k])
            if k not in ids:
                records.append(TrialResult(number, "FAIL", float("nan"), params, {}, [], "; ".join(problems[k])[:500]))
            else:
                records.append(self.judge(number, params, ids[k], results, people, self.own_ids(ids[k], requests[k])))
        return records

    # ------------------------------------------------------------ a human objective

    def own_ids(self, ids: list[str], request: dict[str, Any]) -> list[str]:
        """A trial's own images: without the no-LoRA rows `report.baseline` adds, which every trial with LoRAs shares."""
        if not split_loras(request.get("lora_model")) or "lora_model" not in self.plan:
            return ids
        blank = set(self.plan.loc[self.plan["lora_model"].fillna("").astype(str) == "", "id"])
        return [i for i in ids if i not in blank]

    def trial_rows(self, params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """A study trial's request and image ids, from its parameters."""
        request = trial_request(self.spec, self.base, GivenTrial(params))
        plans, problems = build_requests(self.cfg, self.spec, [request])
        return request, self.trial_ids(plans[0]) if not problems[0] and not plans[0].empty else []

    def people(self, study: Any) -> PeopleFit:
        """The votes that stand, fitted over every cell of the search, shifted onto the scale of the values already told."""
        trials = {t.number: t for t in study.trials}
        told = {}
        for number, value in study.user_attrs.get(TOLD, {}).items():
            if int(number) in trials:
                request, ids = self.trial_rows(trials[int(number)].params)
                told[int(number)] = (float(value), self.own_ids(ids, request))
        return fit_people(self.plan, self.store.read_votes(), told)

    def compare_grid(self) -> dict[str, Any] | None:
        """`search.compare_grid`: what a grid of at most the search's trials, over the same space, finds (its images reused by id)."""
        settings, levels = budget_grid(self.spec, self.spec.trials)
        if not settings:
            return None
        records = self.make_and_judge([(k, GivenTrial(setting)) for k, setting in enumerate(settings)], label="grid setting")
        complete = [r for r in records if r.state == "COMPLETE"]
        if not complete:
            return None
        best = (max if self.spec.direction == "maximize" else min)(complete, key=lambda r: r.value)
        print(
            f"a grid at the same budget ({len(settings)} settings) finds {best.value:.4f}  "
            + "  ".join(f"{k}={v}" for k, v in best.params.items()),
            file=self.out,
        )
        return {
            "settings": len(settings),
            "levels": levels,
            "images": len({i for r in records for i in r.ids}),
            "best": {"value": best.value, "params": best.params, "ids": best.ids},
            "values": [r.value for r in complete],
        }

    def judge(
        self,
        number: int,
        params: dict[str, Any],
        ids: list[str],
        results: pd.DataFrame,
        people: PeopleFit | None = None,
        own: list[str] | None = None,
    ) -> TrialResult:
        """The objective over the trial's images: each score's mean over its seeds (and prompts), then the expression;
        `human`, its own images' strength from the votes, once they are in enough votes (until then it is WAITING)."""
        rows = results.reindex(ids)
        ok = rows[rows["status"] == "ok"] if "status" in rows else rows.iloc[0:0]
        if ok.empty:
            return TrialResult(number, "FAIL", float("nan"), params, {}, ids, "no image of the trial was generated")
        means = {
            name: float(pd.to_numeric(ok[name], errors="coerce").mean()) if name in ok else float("nan") for name in self.cfg.sweep.scores
        }
        votes = None
        if people is not None:
            means[HUMAN], votes = people.of(own if own is not None else ids)
            if votes < self.spec.votes_per_trial:
                have = f"{votes} of {self.spec.votes_per_trial} votes"
                return TrialResult(number, "WAITING", float("nan"), params, means, ids, have, votes)
        missing = [n for n in self.spec.objective.names if means.get(n) != means.get(n)]
        if missing:
            return TrialResult(number, "FAIL", float("nan"), params, means, ids, f"no {', '.join(missing)} for its images")
        value = self.spec.objective.value(means)
        if value != value:
            return TrialResult(number, "FAIL", value, params, means, ids, "the objective is not a number (a division by zero?)", votes)
        return TrialResult(number, "COMPLETE", value, params, means, ids, votes=votes)

    def log_trial(self, record: TrialResult) -> None:
        try:
            metrics = {"objective": record.value, **{f"{k}_mean": v for k, v in record.means.items()}}
            self.tracker.log_trial(record.number, record.state, record.params, metrics, record.ids)
            self.logged.add(record.number)
        except Exception as exc:  # MLflow down: the next run logs the trial
            print(f"warning: could not log trial {record.number} to MLflow ({str(exc).splitlines()[0][:160]})", file=self.out)

    def announce(self, study, record: TrialResult) -> None:
        params = "  ".join(f"{k}={v}" for k, v in record.params.items())
        if record.state == "WAITING":
            print(f"trial {record.number}: waits for votes ({record.error})  {params}", file=self.out, flush=True)
            return
        if record.state != "COMPLETE":
            print(f"trial {record.number}: failed ({record.error})  {params}", file=self.out, flush=True)
            return
        best = study.best_trial
        print(
            f"trial {record.number}: {record.value:.4f}  {params}  (best {best.value:.4f}, trial {best.number})", file=self.out, flush=True
        )

    def trial_results(self, study, results: pd.DataFrame) -> list[TrialResult]:
        """Every trial of the study (this run's and earlier ones'), judged from the store."""
        import optuna

        indexed = results.set_index("id") if len(results) else pd.DataFrame(columns=["status"])
        people = self.people(study) if self.spec.by_people else None
        shown = [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
        if self.spec.by_people:
            shown.append(optuna.trial.TrialState.RUNNING)  # made and waiting for votes
        records = []
        for trial in study.trials:
            if trial.state not in shown:
                continue
            request, ids = self.trial_rows(trial.params)
            params = trial_params(self.spec, request)
            if trial.state == optuna.trial.TrialState.RUNNING:  # its votes may have come since: the next run tells it
                record = self.judge(trial.number, params, ids, indexed, people, self.own_ids(ids, request))
                record.state, record.value = "WAITING", float("nan")
                record.error = f"{record.votes or 0} of {self.spec.votes_per_trial} votes"
            elif trial.state == optuna.trial.TrialState.COMPLETE:  # what Optuna was told (the scores' means as they are now)
                record = self.judge(trial.number, params, ids, indexed, people, self.own_ids(ids, request))
                record.state, record.value, record.error = "COMPLETE", float(trial.value), ""
            else:
                record = TrialResult(trial.number, "FAIL", float("nan"), params, {}, ids, "failed")
            records.append(record)
        return records
