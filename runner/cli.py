"""`lora-sweep`: a thin entry point. Parses the subcommand, lets Hydra compose the config, calls the pieces.

    lora-sweep run    [overrides]      generate the sweep (default: the demo sweep on the tiny model)
    lora-sweep plan   [overrides]      expand + validate, print the summary, write the plan (no torch)
    lora-sweep sync   [overrides]      back-fill MLflow from the sweep folder (no generation)
    lora-sweep score  SWEEP_FOLDER     scores of finished images (no generation), logged to their MLflow runs
    lora-sweep report SWEEP_FOLDER     grids, ranking, curves and report.html from a sweep folder
    lora-sweep reproduce IMAGE_ID      regenerate one image from its record; are the pixels identical?
    lora-sweep serve  [overrides]      the text2img HTTP API over the local engine (runner/server)
    lora-sweep compare SWEEP_FOLDER    a blind pairwise voting page on a sweep's images (runner/compare)

Sweep files are the `sweep` config group: every `sweeps/*.yaml` (the project's and the current
directory's) is registered under its file name, so `sweep=NAME` selects one and
`sweep.base.guidance_scale=5` overrides inside it; `sweep=path/to/file.yaml` works too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from runner import folder_commands
from runner.compare import compare
from runner.config import CONF_DIR, PROJECT_ROOT, Config, register_configs, sweep_folder
from runner.errors import UserError, did_you_mean
from runner.prepare import describe_plan, image_base_text, plan_or_fail
from runner.run import run_sweep
from runner.search import describe_search, is_search, prepare_search_or_fail
from runner.server import serve
from runner.store import atomic_write_parquet

SWEEP_KEYS = ("name", "description", "base", "base_from", "grid", "search", "report", "scores", "max_images", "trigger_mode")

USAGE = """usage: lora-sweep COMMAND [overrides...]

commands:
  run     generate a sweep: plan, validate, generate what is not done yet, score, log to MLflow, report
  plan    expand and validate a sweep, print its summary and write plan-preview.parquet/.csv (no GPU, no torch)
  sync    log to MLflow what a run could not (tracking server down), refresh grids; generates nothing
  score   compute missing scores of a sweep folder, or a new scorer's, and log them to its MLflow runs:
            lora-sweep score outputs/demo 'sweep.scores=[clip_score,aesthetic,lora_effect,seed_spread]'
  report  grids, ranking.csv, response curves and report.html of a sweep folder (also while it runs):
            lora-sweep report outputs/demo
  reproduce  regenerate one image from its record and say whether the pixels are identical:
            lora-sweep reproduce IMAGE_ID   (or an MLflow run id; paths.outputs=DIR to look elsewhere)
  params     the base request an image's A1111/Forge parameters text gives, and what is not applied:
            lora-sweep params IMAGE.png   (a sweep starts from it with sweep.base_from=IMAGE.png)
  serve   the provider's text2img HTTP API over the local engine, for engine=remote sweeps from other machines:
            LORA_SWEEP_API_KEYS=secret lora-sweep serve serve.host=0.0.0.0 serve.port=7860 [tracking=sqlite]
            (serve.* settings: lora-sweep serve --help; README, "Serving")
  compare a blind voting page on a sweep's images (two at a time, same prompt and seed; votes.jsonl; README, "Voting"):
            lora-sweep compare outputs/demo [compare.port=7870 compare.voter=NAME]

overrides use Hydra's syntax:
  lora-sweep run                                     the demo sweep on the embedded tiny model
  lora-sweep run sweep=blends                        another file of sweeps/
  lora-sweep run sweep=my_sweep.yaml engine.batch_size=8 sweep.base.guidance_scale=5
  lora-sweep run tracking=none                       no MLflow
  lora-sweep run retry_failed=true                   only the images that failed before
  lora-sweep run --cfg job                           print the composed config and exit
  lora-sweep run --help                              config groups and every setting
"""


def sweep_dirs() -> list[Path]:
    """Where sweep files are looked up: ./sweeps first, then the project's sweeps/."""
    dirs = [Path.cwd() / "sweeps", PROJECT_ROOT / "sweeps"]
    return list(dict.fromkeys(d.resolve() for d in dirs if d.is_dir()))


def load_sweep_file(path: Path) -> dict[str, Any]:
    """Read one sweep file, with a one-line error for what YAML or the schema would say at length."""

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"sweep: {path} is not valid YAML ({problem} at{where}); fix the file") from None
    except OSError as exc:
        raise UserError(f"sweep: cannot read {path} ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise UserError(f"sweep: {path} must be a mapping with base: and grid:; see sweeps/demo.yaml")
    for key in data:
        if key not in SWEEP_KEYS:
            hint = did_you_mean(str(key), SWEEP_KEYS) or f"known keys: {', '.join(SWEEP_KEYS)}"
            raise UserError(f"sweep.{key}: unknown key in {path.name}; {hint}")
    data.setdefault("name", path.stem)
    return data


def register_sweeps(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Put the sweep files in Hydra's ConfigStore (group `sweep`).

    Returns argv with file paths made names, and the selected sweep's content ({} when a multirun
    selects several: `-m sweep=demo,blends`). Selected files must be valid; others are skipped if not.
    """

    cs = ConfigStore.instance()
    value = next((a.split("=", 1)[1] for a in argv if a.startswith("sweep=")), "demo")
    names: list[str] = []
    contents: dict[str, dict[str, Any]] = {}
    for item in (part.strip() for part in value.split(",")):
        if item.endswith((".yaml", ".yml")):
            path = Path(item)
            if not path.is_file():
                raise UserError(f"sweep: file {item} does not exist; give a path to a sweep YAML or a name from sweeps/")
            contents[path.stem] = load_sweep_file(path)
            item = path.stem
        names.append(item)
    known: list[str] = []
    for folder in sweep_dirs():  # ./sweeps first: it wins over the project's
        for path in sorted(folder.glob("*.y*ml")):
            known.append(path.stem)
            if path.stem in contents:
                continue
            if path.stem in names:
                contents[path.stem] = load_sweep_file(path)
            else:
                with contextlib.suppress(UserError):  # a broken file that is not selected does not block this run
                    contents[path.stem] = load_sweep_file(path)
    for name in names:
        if name not in contents:
            hint = did_you_mean(name, known) or f"known sweeps: {', '.join(sorted(set(known))) or 'none'}"
            raise UserError(f"sweep: no sweep named '{name}' in {', '.join(map(str, sweep_dirs())) or 'sweeps/'}; {hint}")
    for name, content in contents.items():
        cs.store(group="sweep", name=name, node=content)
    new_argv = [f"sweep={','.join(names)}" if a.startswith("sweep=") else a for a in argv]
    return new_argv, contents[names[0]] if len(names) == 1 else {}


def _hydra_command(command: str, argv: list[str]) -> None:

    register_configs()
    argv, sweep = register_sweeps(argv)
    argv = request_overrides(argv, sweep)
    if command == "serve":
        argv = serve_overrides(argv)
    precheck_composition(argv, "serve.name" if command == "serve" else "sweep.name")

    def task(cfg: DictConfig) -> None:

        try:
            if command == "serve":
                serve(cfg)
            elif command in ("run", "sync"):
                summary = run_sweep(cfg, generate=command == "run")
                if summary.interrupted:
                    sys.exit(130)
                if summary.failed:
                    sys.exit(1)
            else:
                plan_command(cfg)
        except UserError as exc:
            fail(exc.lines)

    if command == "run":  # SLURM and Kubernetes send SIGTERM before they kill: stop as Ctrl-C does
        signal.signal(signal.SIGTERM, interrupt_on_sigterm)
    os.environ["LORA_SWEEP_COMMAND"] = command  # named in --help's header (conf/config.yaml)
    sys.argv = [f"lora-sweep {command}", *flags_first(argv)]
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(task)()


def interrupt_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


FLAGS_WITH_VALUE = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
}
INFO_VALUES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def flags_first(argv: list[str]) -> list[str]:
    """Hydra's flags (with their values) before the overrides, wherever the user typed them.

    Hydra's parser takes the overrides as one run of positional arguments, so
    `lora-sweep run a=1 -m b=2,3` would otherwise fail with "unrecognized arguments".
    """
    flags, overrides = [], []
    args = iter(argv)
    for arg in args:
        if not arg.startswith("-"):
            overrides.append(arg)
            continue
        flags.append(arg)
        if arg in FLAGS_WITH_VALUE:
            flags.append(next(args, ""))
        elif arg == "--info":
            following = next(args, None)
            if following is not None:
                (flags if following in INFO_VALUES else overrides).append(following)
    return flags + overrides


def serve_overrides(argv: list[str]) -> list[str]:
    """`serve` logs to MLflow only when asked (tracking=sqlite, or any tracking.* setting), and runs in its own folder."""
    extra = [] if any(a.lstrip("+~").startswith("tracking") for a in argv) else ["tracking=none"]
    return [*argv, *extra, "hydra.run.dir=${paths.outputs}/${serve.name}"]


def precheck_composition(argv: list[str], folder_key: str = "sweep.name") -> None:
    """Compose once with Hydra's compose API so a bad override or config is one line, not Hydra's report.

    Skipped for Hydra's own flags (--help, --cfg, -m, ...), which hydra.main handles itself.
    """
    if any(a.startswith("-") for a in argv):
        return

    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=argv)
    except Exception as exc:
        raise UserError(composition_error(exc)) from None
    finally:
        GlobalHydra.instance().clear()

    folder = Path(cfg.paths.outputs) / str(OmegaConf.select(cfg, folder_key))  # Hydra's run dir: it must be creatable
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"paths.outputs: cannot write {folder} ({exc.strerror}); choose a writable folder with paths.outputs=DIR") from None


def composition_error(exc: BaseException) -> str:
    """Hydra/OmegaConf's multi-line error -> 'field: what is wrong; fix'."""
    chain, seen = [], exc
    while seen is not None:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = "\n".join(str(e) for e in chain)
    if type(exc).__name__ == "OverrideParseException":  # Hydra's grammar: show the override and where it broke
        first, *rest = str(exc).splitlines() or [""]
        override = first.split(": ", 1)[-1]
        column = rest[0].find("^") if rest else -1
        near = f" near '{first[column : column + 12]}'" if column >= len(first) - len(override) else ""
        return (
            f"override '{override}': cannot be parsed{near}; quote values with special characters "
            "(key='<token>' or key=\"a, b\"), see https://hydra.cc/docs/advanced/override_grammar/basic"
        )
    missing = re.search(r"Could not find '([\w/.-]+)/([\w.-]+)'", text)
    if missing:  # a config group option that does not exist: tracking=nonee
        group, option = missing.groups()
        options = [line.strip() for line in text.split("Available options:", 1)[-1].splitlines() if line.strip()]
        return f"{group}: no option '{option}'; {did_you_mean(option, options) or 'available: ' + ', '.join(options)}"
    key = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.strip().startswith("full_key:")), "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    noise = ("full_key", "reference_type", "object_type", "To append")
    # the outer exceptions carry the formatted message ("Value 'abc' ..."), the innermost its template
    reason = next((line for line in lines if line.startswith("Value ") and "$VALUE" not in line), None) or next(
        (line for line in reversed(lines) if not line.startswith(noise)), type(exc).__name__
    )
    hint = ""
    if key and "not in" in reason:  # an unknown setting: suggest its closest sibling
        parent_key, _, name = key.rpartition(".")
        schema = OmegaConf.structured(Config)
        parent = OmegaConf.select(schema, parent_key) if parent_key else schema
        if isinstance(parent, DictConfig):
            hint = did_you_mean(name, [str(k) for k in parent.keys()])
    return f"{key or 'config'}: {reason}; {hint or 'check the override or config file (lora-sweep run --help lists the settings)'}"


def request_overrides(argv: list[str], sweep: dict[str, Any]) -> list[str]:
    """`sweep.base.X=v` / `sweep.grid.X=v` set a request field or axis whatever the file has there;
    `+from_image=IMAGE` is `sweep.base_from=IMAGE`.

    Hydra would need `+` for a field the file lacks, and cannot turn a mapping axis
    (`seed: {range: ...}`) into a list; so an axis the file has is deleted and added again.
    """
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key.lstrip("+") == "from_image":  # `+from_image=IMAGE`: the sweep starts from that image's parameters
            out.append(f"sweep.base_from={value}")
            continue
        parts = key.split(".")
        if not eq or parts[0] != "sweep" or len(parts) < 3 or parts[1] not in ("base", "grid"):
            out.append(arg)
        elif len(parts) == 3 and parts[2] in (sweep.get(parts[1]) or {}):
            out += [f"~{key}", f"+{key}={value}"]
        else:
            out.append(f"++{key}={value}")
    return out


def plan_command(cfg: Any) -> None:

    if is_search(cfg):  # the space's ends and choices, checked; the trials' rows exist only once Optuna asks
        prepared, spec = prepare_search_or_fail(cfg)
        describe_search(prepared, spec, cfg, sys.stdout)
        return
    prepared = plan_or_fail(cfg)
    describe_plan(prepared, sys.stdout)
    folder = sweep_folder(cfg)

    try:
        folder.mkdir(parents=True, exist_ok=True)
        # a preview beside the run's own plan.parquet, which a plan with other settings must not overwrite
        atomic_write_parquet(folder / "plan-preview.parquet", prepared.plan)
        csv = len(prepared.plan) <= CSV_PREVIEW_ROWS  # a million-row CSV takes longer to write than the plan to build
        if csv:
            prepared.plan.to_csv(folder / "plan-preview.csv", index=False)
    except OSError as exc:
        raise UserError(f"paths.outputs: cannot write {folder} ({exc.strerror}); choose a writable folder with paths.outputs=DIR") from None
    requests = len(prepared.plan)
    also = " and plan-preview.csv" if csv else f" (no CSV preview over {CSV_PREVIEW_ROWS:,} rows)"
    print(f"wrote {folder / 'plan-preview.parquet'}{also} ({requests} rows; {requests} requests on a remote engine)")


CSV_PREVIEW_ROWS = 100_000


FOLDER_USAGE = {
    "report": "usage: lora-sweep report SWEEP_FOLDER   (e.g. outputs/demo): grids, ranking.csv, curves and report.html",
    "score": "usage: lora-sweep score SWEEP_FOLDER [key=value ...]   "
    "e.g. lora-sweep score outputs/demo 'sweep.scores=[clip_score,aesthetic]'",
    "reproduce": "usage: lora-sweep reproduce IMAGE_ID|MLFLOW_RUN_ID [overrides]   e.g. lora-sweep reproduce 3f2a9c0d1e4b5a67",
    "params": "usage: lora-sweep params IMAGE [overrides]   the request its A1111/Forge parameters text gives (sweep.base_from=IMAGE)",
    "compare": "usage: lora-sweep compare SWEEP_FOLDER [compare.port=N compare.host=ADDR compare.voter=NAME ...]   "
    "a blind pairwise voting page on http://localhost:7870/ (keys: left, right, down = tie, space = skip, u = undo)",
}


def folder_command(command: str, argv: list[str]) -> None:
    """report, score, reproduce, params and compare: one sweep folder (or image id) and key=value overrides, in any order."""
    positional = [a for a in argv if "=" not in a and not a.startswith("-")]
    overrides = [a for a in argv if "=" in a]
    if any(a in ("-h", "--help") for a in argv) or len(positional) != 1:
        print(FOLDER_USAGE[command])
        sys.exit(0 if any(a in ("-h", "--help") for a in argv) else 2)
    target = positional[0]
    if command == "report":
        folder_commands.report_folder(target)
    elif command == "params":
        print(image_base_text(target, compose_config(overrides)), end="")
    elif command == "score":
        folder_commands.score_folder(target, overrides)
    elif command == "compare":
        compare(target, compose_config(overrides).compare)
    else:
        # the `sweep.*` overrides are for the image's own sweep folder config, which reproduce reads itself
        identical = folder_commands.reproduce(target, overrides, compose_config([o for o in overrides if not o.startswith("sweep.")]))
        sys.exit(0 if identical else 1)


def compose_config(overrides: list[str]) -> DictConfig:
    """The project's config with overrides, composed in this process as `plan` and `run` compose it (sweep files
    registered, `sweep.base.X` / `sweep.grid.X` rewritten for Hydra); a bad override is one line."""
    register_configs()
    overrides, sweep = register_sweeps(overrides)
    overrides = request_overrides(overrides, sweep)
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=overrides)
    except Exception as exc:
        raise UserError(composition_error(exc)) from None
    finally:
        GlobalHydra.instance().clear()


def fail(lines: list[str]) -> None:
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    run_environment_defaults()
    os.environ["LORA_SWEEP_ARGV"] = json.dumps(argv)  # the command as typed, for the report's "reproduce" section
    try:
        if command in ("run", "plan", "sync", "serve"):
            _hydra_command(command, rest)
        elif command in FOLDER_USAGE:
            folder_command(command, rest)
        else:
            hint = did_you_mean(command, ["run", "plan", "sync", "serve", *FOLDER_USAGE])
            fail([f"unknown command '{command}'; {hint or 'use run, plan, sync, serve, score, report, reproduce, params or compare'}"])
    except UserError as exc:
        fail(exc.lines)
    except KeyboardInterrupt:
        print("interrupted; run the same command to continue where it stopped", file=sys.stderr)
        sys.exit(130)


def run_environment_defaults() -> None:
    """No hub traffic at run time, ever; libraries quiet unless asked. Set before any of them is imported."""
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


if __name__ == "__main__":
    main()
