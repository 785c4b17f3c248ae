"""The `search:` section of a sweep file -> a search space, an objective, and each trial's request.

Pure: no Optuna, no torch, no I/O. A trial is anything with Optuna's `suggest_float`,
`suggest_int` and `suggest_categorical` (an Optuna trial, or `GivenTrial` for the probe requests that
validation checks before the first image).
"""

from __future__ import annotations

import ast
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from runner.errors import Problem, did_you_mean
from runner.plan import PlanError, expand_values
from runner.request import FIELDS, NOT_IN_ID, join_strengths, split_loras

SAMPLERS = ("tpe", "cmaes", "random", "grid")
DIRECTIONS = ("maximize", "minimize")
NOT_SEARCHABLE = {
    "seed": "every trial is judged on the same seeds; list them in search.seeds",
    "samples": "every trial is judged on search.seeds; list the seeds there",
    "lora_strength": "give one range per LoRA: lora_strength.<id>: [0.1, 1.0]",
    "prompt": "a search compares settings on the same prompts; put prompts in sweep.grid.prompt",
}
STRENGTH = "lora_strength."
HUMAN = "human"  # the objective's name for people's votes: each trial's Bradley-Terry strength from `lora-sweep compare`
VOTES_PER_TRIAL = 5  # votes a trial's images are in before a human objective tells it (search.votes_per_trial)


@dataclass(frozen=True)
class Param:
    """One searched field: a float or int range, a list of choices, or (LoRA strengths only) a fixed number."""

    name: str  # the request field, or lora_strength.<lora id>
    kind: str  # float | int | categorical | fixed
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "fixed":
            return self.low
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        value = trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)
        return value if self.step else float(f"{value:.4g}")  # 4 digits: readable names, and nearby trials share images

    def extremes(self) -> list[Any]:
        """The values validation tries: both ends of a range, every choice."""
        if self.kind == "fixed":
            return [self.low]
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def levels(self) -> list[Any] | None:
        """Every value a grid over this parameter takes (None: a continuous range)."""
        if self.kind in ("fixed", "categorical"):
            return self.extremes()
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if not self.step:
            return None
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return [round(self.low + i * self.step, 10) for i in range(count)]

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"{self.name} = {self.low:g}"
        if self.kind == "categorical":
            return f"{self.name} in {{{', '.join(str(c) if c != '' else '(none)' for c in self.choices)}}}"
        step = f" step {self.step:g}" if self.step else ""
        return f"{self.name} in [{self.low:g}, {self.high:g}]{step}{' log' if self.log else ''} ({self.kind})"


@dataclass
class Objective:
    """A score, or an arithmetic expression of scores (`clip_score - 0.5 * seed_spread`), over a trial's mean scores."""

    text: str
    names: list[str]
    tree: ast.Expression

    def value(self, means: Mapping[str, float]) -> float:
        return float(_evaluate(self.tree.body, means))


@dataclass
class SearchSpec:
    params: list[Param]
    objective: Objective
    direction: str
    seeds: list[int]
    trials: int
    batch: int
    sampler: str
    sampler_seed: int
    compare_grid: bool = False  # also run a grid of at most `trials` settings (budget_grid) and report both
    base_blend: str = ""  # the base request's lora_model when the blend itself is not searched
    strength_names: dict[str, Param] = field(default_factory=dict)  # lora id -> its strength parameter
    votes_per_trial: int = VOTES_PER_TRIAL  # a human objective: the votes a trial waits for

    @property
    def by_people(self) -> bool:
        """The objective names `human`: trials are judged from votes, a batch at a time, between runs."""
        return HUMAN in self.objective.names

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def searches_loras(self) -> bool:
        return self.param("lora_model") is not None or bool(self.strength_names)

    def fingerprint(self) -> str:
        """What must not change under a study that continues (its stored trials were asked in this space)."""
        space = [(p.name, p.kind, p.low, p.high, p.step, p.log, [str(c) for c in p.choices]) for p in self.params]
        return repr((space, self.objective.text.replace(" ", ""), self.direction, self.seeds, self.sampler))


class GivenTrial:
    """A trial whose values are given instead of asked of Optuna: validation's probes, a killed run's trials, grid settings."""

    def __init__(self, values: Mapping[str, Any]):
        self.params = dict(values)

    def suggest_float(self, name: str, *args: Any, **kwargs: Any) -> float:
        return float(self.params[name])

    def suggest_int(self, name: str, *args: Any, **kwargs: Any) -> int:
        return int(self.params[name])

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        return self.params[name]


# ---------------------------------------------------------------- parsing


def parse_search(
    search: Mapping[str, Any], base: Mapping[str, Any], grid: Mapping[str, Any], scores: list[str]
) -> tuple[SearchSpec | None, list[str]]:
    """The search section -> a spec, or the problems (one line each, naming the key and the fix)."""
    problems: list[Problem] = []
    params = _parse_space(search.get("space") or {}, problems)
    _check_grid_against_space(grid, params, problems)
    base_blend = ",".join(split_loras(base.get("lora_model")))
    strengths = _check_strengths(params, base_blend, problems)
    objective = _parse_objective(str(search.get("objective") or "").strip(), scores, problems)
    direction = str(search.get("direction", "maximize")).strip().lower()
    if direction not in DIRECTIONS:
        problems.append(Problem("search.direction", f"'{direction}' is not maximize or minimize", "use maximize (the default) or minimize"))
    sampler = _parse_sampler(search.get("sampler", "tpe"), params, problems)
    seeds = _parse_seeds(search.get("seeds", [0, 1]), problems)
    trials = _positive("search.trials", search.get("trials", 20), problems)
    batch = _positive("search.batch", search.get("batch", 4), problems)
    votes_per_trial = _check_human(search, objective, batch, problems)
    if not params:
        problems.append(Problem("search.space", "is empty", "give at least one field to search, e.g. guidance_scale: [3, 12]"))
    if problems or objective is None:
        return None, [str(p) for p in dict.fromkeys(problems)]
    spec = SearchSpec(
        params,
        objective,
        direction,
        seeds,
        trials,
        batch,
        sampler,
        int(search.get("sampler_seed", 0)),
        bool(search.get("compare_grid", False)),
        base_blend,
        strengths,
        votes_per_trial,
    )
    return spec, []


def _check_human(search: Mapping[str, Any], objective: Objective | None, batch: int, problems: list[Problem]) -> int:
    """`search.votes_per_trial`, which only a human objective reads; such a search compares the trials of each batch,
    and a grid beside it would wait for votes of its own."""
    by_people = objective is not None and HUMAN in objective.names
    given = search.get("votes_per_trial")
    if given is not None and objective is not None and not by_people:
        problems.append(
            Problem("search.votes_per_trial", "only an objective that names human waits for votes", "drop it, or use objective: human")
        )
    if by_people and batch == 1:
        problems.append(Problem("search.batch", "a human objective's votes compare the trials of a batch", "use 2 or more"))
    if by_people and search.get("compare_grid"):
        problems.append(Problem("search.compare_grid", "a grid beside a human objective would need votes of its own", "drop compare_grid"))
    return _positive("search.votes_per_trial", given, problems) if given is not None else VOTES_PER_TRIAL


def _parse_space(space: Mapping[str, Any], problems: list[Problem]) -> list[Param]:
    """Each `search.space` entry as a parameter (a range, choices or a fixed value)."""
    return [param for name, value in dict(space).items() if (param := _parse_param(str(name), value, problems)) is not None]


def _check_grid_against_space(grid: Mapping[str, Any], params: list[Param], problems: list[Problem]) -> None:
    """The sweep's grid axes may not vary what the search varies, nor the seeds (every trial is judged on search.seeds)."""
    searched = {p.name for p in params}
    for name in grid:
        key = "lora_model" if name == "lora_strength" else name
        if name == "seed":
            problems.append(Problem("sweep.grid.seed", "a search judges every trial on search.seeds", "move the seeds there"))
        elif key in searched or (name in ("lora_model", "lora_strength") and any(n.startswith(STRENGTH) for n in searched)):
            problems.append(Problem(f"sweep.grid.{name}", "is also searched in search.space", "keep it in one of them"))


def _check_strengths(params: list[Param], base_blend: str, problems: list[Problem]) -> dict[str, Param]:
    """Each `lora_strength.<id>` belongs to a LoRA some blend has, and each LoRA a blend can have has a strength."""
    strengths = {p.name[len(STRENGTH) :]: p for p in params if p.name.startswith(STRENGTH)}
    blend_param = next((p for p in params if p.name == "lora_model"), None)
    blends = [str(c) for c in blend_param.choices] if blend_param else [base_blend]
    in_blends = {lora for blend in blends for lora in split_loras(blend)}
    for lora_id in strengths:
        if lora_id not in in_blends:
            problems.append(
                Problem(
                    f"search.space.{STRENGTH}{lora_id}",
                    f"LoRA '{lora_id}' is in no blend of the search",
                    "add it to search.space.lora_model (or sweep.base.lora_model), or drop this line",
                )
            )
    if blend_param is not None or strengths:
        for lora_id in sorted(in_blends - set(strengths)):
            problems.append(
                Problem(
                    f"search.space.{STRENGTH}{lora_id}",
                    f"LoRA '{lora_id}' can be in a blend but has no strength",
                    f"give a range, e.g. {STRENGTH}{lora_id}: [0.1, 1.0], or a number",
                )
            )
    return strengths


def _parse_sampler(value: Any, params: list[Param], problems: list[Problem]) -> str:
    """A known sampler that can run this space (grid: steps on every range; cmaes: its package installed)."""
    sampler = str(value).strip().lower()
    if sampler not in SAMPLERS:
        hint = did_you_mean(sampler, SAMPLERS) or f"use one of {', '.join(SAMPLERS)}"
        problems.append(Problem("search.sampler", f"unknown sampler '{sampler}'", hint))
    elif sampler == "grid":
        for p in params:
            if p.levels() is None:
                problems.append(
                    Problem(
                        "search.sampler",
                        f"grid needs a step on every float range ({p.name} has none)",
                        f"give {p.name}: {{low: {p.low:g}, high: {p.high:g}, step: ...}}",
                    )
                )
    elif sampler == "cmaes":
        try:
            import cmaes  # noqa: F401  (optional: only this sampler needs it)
        except ImportError:
            problems.append(
                Problem("search.sampler", "cmaes needs the cmaes package, which is not installed", "pip install cmaes, or use tpe")
            )
    return sampler


def _parse_seeds(value: Any, problems: list[Problem]) -> list[int]:
    """The seeds every trial is judged on, in any axis form (`[0, 1]`, `{range: [0, 3]}`)."""
    try:
        return [int(s) for s in expand_values("search.seeds", value)]
    except PlanError as exc:
        problems.extend(exc.problems)
    except (TypeError, ValueError):
        problems.append(Problem("search.seeds", "must be whole numbers", "e.g. seeds: [0, 1, 2] or {range: [0, 3]}"))
    return []


def _positive(key: str, value: Any, problems: list[Problem]) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        problems.append(Problem(key, f"{value!r} is not a positive whole number", "use 1 or more"))
    return number


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_param(name: str, spec: Any, problems: list[Problem]) -> Param | None:
    key = f"search.space.{name}"
    field_name = "lora_strength" if name.startswith(STRENGTH) else name
    if name in NOT_SEARCHABLE:
        problems.append(Problem(key, "cannot be searched", NOT_SEARCHABLE[name]))
        return None
    if field_name not in FIELDS:
        hint = did_you_mean(name, [*FIELDS, "lora_strength.<id>"]) or "use a text2img request field, or lora_strength.<lora id>"
        problems.append(Problem(key, f"unknown field '{name}'", hint))
        return None
    if name in NOT_IN_ID:
        problems.append(Problem(key, "does not change the image", "search a field that does, e.g. guidance_scale"))
        return None
    kind = FIELDS[field_name].kind
    if name.startswith(STRENGTH) and _number(spec):
        return Param(name, "fixed", low=float(spec), high=float(spec))
    choices: list[Any] | None = None
    bounds: Mapping[str, Any] | None = None
    if isinstance(spec, Mapping) and "choices" in spec:
        choices = list(spec["choices"] or [])
    elif isinstance(spec, Mapping):
        bounds = spec
    elif isinstance(spec, (list, tuple)) and len(spec) == 2 and all(_number(v) for v in spec) and kind in ("int", "float", "strengths"):
        bounds = {"low": spec[0], "high": spec[1]}
    elif isinstance(spec, (list, tuple)):
        choices = list(spec)
    else:
        problems.append(Problem(key, f"cannot read {spec!r}", "give [low, high], {low: .., high: .., step: ..}, or a list of choices"))
        return None
    if choices is not None:
        if not choices:
            problems.append(Problem(key, "has no choices (an empty list)", "give at least two values, or set the field in sweep.base"))
            return None
        if kind == "loras":
            choices = [",".join(split_loras(c)) for c in choices]
        if any(isinstance(c, (Mapping, list, tuple)) for c in choices):
            problems.append(Problem(key, "choices must be single values", "e.g. [EulerDiscreteScheduler, DDIMScheduler]"))
            return None
        return Param(name, "categorical", choices=tuple(dict.fromkeys(choices)))
    assert bounds is not None
    if kind not in ("int", "float", "strengths"):
        problems.append(Problem(key, f"is not a number field ({kind}); a range does not apply", "give a list of choices"))
        return None
    unknown = set(bounds) - {"low", "high", "step", "log"}
    if unknown or "low" not in bounds or "high" not in bounds:
        problems.append(Problem(key, f"cannot read {dict(bounds)!r}", "give {low: .., high: ..} with optional step and log"))
        return None
    low, high, step = bounds["low"], bounds["high"], bounds.get("step")
    if not (_number(low) and _number(high)) or (step is not None and not _number(step)):
        problems.append(Problem(key, "low, high and step must be numbers", "e.g. [0.1, 1.0] or {low: 10, high: 40, step: 5}"))
        return None
    if not low < high:
        problems.append(Problem(key, f"is an empty range (low {low:g} is not below high {high:g})", "give [low, high] with low < high"))
        return None
    if step is not None and (step <= 0 or step > high - low):
        problems.append(
            Problem(key, f"step {step:g} does not fit the range [{low:g}, {high:g}]", "use a step above 0 and at most high - low")
        )
        return None
    log = bool(bounds.get("log", False))
    if log and (low <= 0 or step is not None):
        problems.append(Problem(key, "log ranges need low > 0 and no step", "drop log, or the step"))
        return None
    if kind == "int" and not all(float(v).is_integer() for v in (low, high, step or 1)):
        problems.append(Problem(key, f"{field_name} takes whole numbers", "give whole low, high and step"))
        return None
    return Param(name, "int" if kind == "int" else "float", float(low), float(high), float(step) if step is not None else None, log)


class _BadExpression(Exception):
    pass


def _parse_objective(text: str, scores: list[str], problems: list[Problem]) -> Objective | None:
    if not text:
        problems.append(
            Problem(
                "search.objective", "is missing", f"name a score of sweep.scores, e.g. objective: {scores[0] if scores else 'clip_score'}"
            )
        )
        return None
    try:
        tree = ast.parse(text, mode="eval")
        names = _names(tree.body)
    except (SyntaxError, _BadExpression):
        problems.append(
            Problem(
                "search.objective",
                f"cannot read '{text}'",
                "use scores, numbers, + - * / and parentheses, e.g. clip_score - 0.5 * seed_spread",
            )
        )
        return None
    unknown = [n for n in names if n not in scores and n != HUMAN]
    for name in unknown:
        hint = did_you_mean(name, [*scores, HUMAN])
        problems.append(
            Problem(
                "search.objective",
                f"'{name}' is not a score of this sweep",
                (hint + " " if hint else "")
                + f"add it to sweep.scores (now: {', '.join(scores) or 'none'})"
                + ("" if hint else ", or use human (people's votes)"),
            )
        )
    return None if unknown else Objective(text, names, tree)


_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def _names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Constant) and _number(node.value):
        return []
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return _names(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return list(dict.fromkeys(_names(node.left) + _names(node.right)))
    raise _BadExpression


def _evaluate(node: ast.AST, means: Mapping[str, float]) -> float:
    if isinstance(node, ast.Name):
        return float(means[node.id])
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.UnaryOp):
        value = _evaluate(node.operand, means)
        return -value if isinstance(node.op, ast.USub) else value
    assert isinstance(node, ast.BinOp)
    left, right = _evaluate(node.left, means), _evaluate(node.right, means)
    if isinstance(node.op, ast.Div) and right == 0:
        return float("nan")
    return _OPS[type(node.op)](left, right)


# ---------------------------------------------------------------- trials -> requests


def trial_request(spec: SearchSpec, base: Mapping[str, Any], trial: Any) -> dict[str, Any]:
    """The base request with the trial's values: what build_plan expands over the grid and the seeds.

    A LoRA's strength is asked only when the trial's blend holds it (conditional parameters), so a
    blend without a LoRA never varies its strength.
    """
    request = dict(base)
    for param in spec.params:
        if param.name != "lora_model" and not param.name.startswith(STRENGTH):
            request[param.name] = param.suggest(trial)
    if spec.searches_loras:
        blend_param = spec.param("lora_model")
        names = split_loras(blend_param.suggest(trial) if blend_param else spec.base_blend)
        request["lora_model"] = ",".join(names)
        if spec.strength_names or not names:
            request["lora_strength"] = join_strengths(spec.strength_names[n].suggest(trial) for n in names) if names else None
    return request


def trial_params(spec: SearchSpec, request: Mapping[str, Any]) -> dict[str, Any]:
    """The values a trial used, as a person reads them (the blend's strengths by LoRA, not those it skipped)."""
    shown = {p.name: request.get(p.name) for p in spec.params if not p.name.startswith(STRENGTH)}
    names = split_loras(request.get("lora_model"))
    strengths = str(request.get("lora_strength") or "").split(",")
    for lora_id, strength in zip(names, strengths):
        if lora_id in spec.strength_names:
            shown[f"{STRENGTH}{lora_id}"] = float(strength)
    return shown


def probe_trials(spec: SearchSpec) -> list[GivenTrial]:
    """Trials that reach every end of every range and every choice, for validation before the first image.

    Each range at its low and then its high end, with every choice of each categorical field tried
    at both: a size limit, a scheduler the engine lacks or a LoRA strength out of bounds is caught here.
    """
    probes = []
    for end in (0, -1):
        start = {p.name: p.extremes()[end if p.kind != "categorical" else 0] for p in spec.params}
        probes.append(GivenTrial(start))
        for p in spec.params:
            if p.kind == "categorical":
                probes += [GivenTrial({**start, p.name: choice}) for choice in p.choices[1:]]
    return probes


def grid_settings(spec: SearchSpec, levels: Mapping[str, list[Any]] | None = None) -> list[dict[str, Any]] | None:
    """Every setting of the space at its steps (None if a range is continuous): `sampler: grid`, and the full grid's size.

    `levels` replaces a parameter's own values (`budget_grid`'s coarser grid).
    """

    def values_of(p: Param) -> list[Any] | None:
        return list(levels[p.name]) if levels and p.name in levels else p.levels()

    others = [p for p in spec.params if p.name != "lora_model" and not p.name.startswith(STRENGTH)]
    other_levels = [values_of(p) for p in others]
    if any(level is None for level in other_levels):
        return None
    blend_param = spec.param("lora_model")
    blends = list(blend_param.choices) if blend_param else [spec.base_blend]
    lora_settings: list[dict[str, Any]] = []
    for blend in blends:
        names = [n for n in split_loras(blend) if n in spec.strength_names]
        strength_levels = [values_of(spec.strength_names[n]) for n in names]
        if any(level is None for level in strength_levels):
            return None
        for values in itertools.product(*strength_levels):
            setting = {f"{STRENGTH}{n}": v for n, v in zip(names, values)}
            lora_settings.append({"lora_model": blend, **setting} if blend_param else setting)
    settings = []
    for values in itertools.product(*other_levels):
        for lora_setting in lora_settings:
            settings.append({**{p.name: v for p, v in zip(others, values)}, **lora_setting})
    return settings


def coarse_levels(param: Param, count: int) -> list[Any]:
    """`count` values spread over a range, on its steps where it has them (the same images as the full grid's); choices stay whole."""
    if param.kind in ("fixed", "categorical"):
        return param.extremes()
    own = param.levels()
    if own is not None:
        if count >= len(own):
            return own
        picks = [own[len(own) // 2]] if count == 1 else [own[round(i * (len(own) - 1) / (count - 1))] for i in range(count)]
        return list(dict.fromkeys(picks))
    if count == 1:
        middle = math.sqrt(param.low * param.high) if param.log else (param.low + param.high) / 2
        return [float(f"{middle:.4g}")]
    if param.log:
        ratio = (param.high / param.low) ** (1 / (count - 1))
        return [float(f"{param.low * ratio**i:.4g}") for i in range(count)]
    return [float(f"{param.low + i * (param.high - param.low) / (count - 1):.4g}") for i in range(count)]


def budget_grid(spec: SearchSpec, budget: int, most_levels: int = 10) -> tuple[list[dict[str, Any]], dict[str, list[Any]]]:
    """A grid over the same space with at most `budget` settings: as many values per range as fit (at least one, the middle).

    What a person with the search's budget would run instead: the report compares the two.
    """
    for count in range(most_levels, 0, -1):
        levels = {p.name: coarse_levels(p, count) for p in spec.params}
        settings = grid_settings(spec, levels) or []
        if len(settings) <= budget or count == 1:
            return settings, levels
    raise AssertionError("unreachable")
