"""Config -> validated plan: what `lora-sweep plan` prints and `lora-sweep run` executes. No torch.

Reads files only to hash them (the registry); expansion and validation stay pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from runner.checkpoints import (
    Checkpoint,
    checkpoints,
    info_line,
    is_checkpoint_source,
    lycoris_kind,
    safetensors_metadata,
    tag_suggestions,
    thin,
    trigger_of,
)
from runner.engines.base import Capabilities
from runner.engines.factory import capabilities
from runner.errors import Problem, UserError, did_you_mean
from runner.families import DROPPED_LORA_KEYS, FAMILIES, label
from runner.plan import Identity, PlanError, build_plan, given_fields, shadowed_base_fields, summarize, with_ids
from runner.prompts.syntax import CHUNK, has_weights, lora_tags, may_be_long, plain_text, token_count
from runner.registry import (
    CROSS_ATTENTION_WIDTHS,
    HashCache,
    Registry,
    lora_cross_attention_width,
    lora_fit,
    model_cross_attention_width,
    resolve_all,
    safetensors_keys,
)
from runner.request import FIELDS, Limits, split_loras
from runner.scores import ScoreProblem, requested_scorers
from runner.validate import apply_family_defaults, validate_plan


@dataclass
class PreparedSweep:
    """A sweep ready to run: its plan with ids, the files it names (resolved and hashed), and what is wrong with it."""

    name: str
    plan: pd.DataFrame
    registry: Registry | None
    identity: Identity | None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    duplicates: int = 0
    scorers: dict[str, Any] = field(default_factory=dict)  # scorer id -> ScorerEntry, for sweep.scores
    checkpoints: dict[str, list[str]] = field(default_factory=dict)  # a LoRA run's name -> its checkpoints' ids, in order

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def uses_demo_world(self) -> bool:
        """A model, LoRA or scorer of the plan is the demo's tiny world (copied into paths.assets on first use)."""
        files = self.registry.files().values() if self.registry is not None else ()
        return any(r.builtin for group in files for r in group.values()) or any(e.builtin for e in self.scorers.values())


def plan_or_fail(cfg: DictConfig) -> PreparedSweep:
    """The validated plan, or a UserError with one line per problem (nothing is generated)."""
    prepared = prepare_sweep(cfg)
    if prepared.problems:
        raise UserError(prepared.problems)
    return prepared


def describe_plan(prepared: PreparedSweep, out: TextIO) -> None:
    """The plan's one-line summary, its models with their families, and its warnings, as `plan` and `run` print them."""
    info = summarize(prepared.plan)
    axes = ", ".join(f"{k}={v}" for k, v in info["axes"].items()) or "none"
    dup = f" ({prepared.duplicates} duplicate rows dropped)" if prepared.duplicates else ""
    print(f"plan '{prepared.name}': {info['rows']} images, {info['blends']} distinct blends, axes: {axes}{dup}", file=out)
    models = prepared.registry.models if prepared.registry is not None else {}
    if models:
        print("models: " + ", ".join(f"{k} ({label(m.family)})" for k, m in sorted(models.items())), file=out)
    registry = prepared.registry
    for lora_id, info in (registry.lora_files() if registry is not None else {}).items():
        if not registry.loras[lora_id].builtin:
            print("lora " + info_line(lora_id, info), file=out)
            if "trigger" not in info and (tags := tag_suggestions(registry.loras[lora_id].path)):  # said, not applied
                print(f"  its captions' most frequent tags (trigger: suggestions, not applied): {', '.join(tags)}", file=out)
    for run, ids in prepared.checkpoints.items():
        shown = ", ".join(ids) if len(ids) <= 8 else ", ".join(ids[:3] + ["..."] + ids[-3:])
        print(f"checkpoints: {run}: {len(ids)} found ({shown})", file=out)
    for warning in prepared.warnings:
        print(f"warning: {warning}", file=out)


def engine_identity(cfg: DictConfig) -> dict[str, Any]:
    """The engine settings that decide pixels (as configured: `auto` stays `auto`)."""
    if cfg.engine.kind == "remote":
        return {"kind": "remote", "base_url": cfg.engine.base_url.rstrip("/")}
    identity = {"kind": cfg.engine.kind, "device": cfg.engine.device, "dtype": cfg.engine.dtype}
    quantize = cfg.engine.get("quantize", "none")
    return identity | ({"quantize": quantize} if quantize != "none" else {})  # other ids stay as they were


def registry_identity(registry: Registry, cfg: DictConfig) -> Identity:
    """What decides the pixels besides the request: every resolved file's identity and the engine's settings."""
    file_hashes = {f"vae:{k}": v.identity for k, v in registry.vaes.items()}
    file_hashes |= {f"embeddings:{k}": v.identity for k, v in registry.embeddings.items()}
    if registry.upscaler is not None:
        file_hashes["upscaler"] = registry.upscaler.identity
    return Identity(
        model_hashes={k: v.identity for k, v in registry.models.items()},
        lora_hashes={k: v.identity for k, v in registry.loras.items()},
        engine=engine_identity(cfg),
        file_hashes=file_hashes,
        parses_prompts=cfg.engine.kind == "local",
    )


def fit_problems(plan: pd.DataFrame, registry: Registry) -> list[str]:
    """Files made for another model family (an SDXL LoRA or embedding on SD 1.x...) are refused before any image."""
    problems = []
    blends = plan[["model_id", "lora_model"]].drop_duplicates()  # distinct pairs first: a plan may have a million rows
    pairs = {(m, lora) for m, blend in zip(blends["model_id"], blends["lora_model"]) for lora in split_loras(blend)}
    for model_id, lora_id in sorted(pairs):
        model, lora = registry.models.get(model_id), registry.loras.get(lora_id)
        if model is None or lora is None or not lora.path.exists():
            continue
        lora_width, model_width = lora_cross_attention_width(lora.path), model_cross_attention_width(model)
        if lora_width and model_width and lora_width != model_width:
            made_for = CROSS_ATTENTION_WIDTHS.get(lora_width, f"a model with text width {lora_width}")
            model_kind = CROSS_ATTENTION_WIDTHS.get(model_width, f"text width {model_width}")
            problems.append(
                str(
                    Problem(
                        f"loras.{lora_id}",
                        f"is made for {made_for} but model '{model_id}' is {model_kind}",
                        "use it with a model of its family or drop it from the blend",
                    )
                )
            )
        elif (fits := lora_fit(lora.path)) and model.family not in fits:
            what = "an SDXL LoRA" if fits == ("sdxl",) else f"a LoRA for {' / '.join(dict.fromkeys(label(f) for f in fits))}"
            problems.append(
                str(
                    Problem(
                        f"loras.{lora_id}",
                        f"is {what} but model '{model_id}' is {label(model.family)}",
                        "use it with a model of its family or drop it from the blend",
                    )
                )
            )
    used = plan[["model_id", "embeddings_model"]].drop_duplicates()
    pairs = {(m, e) for m, names in zip(used["model_id"], used["embeddings_model"]) for e in split_loras(names)}
    for model_id, name in sorted(pairs):
        model, embedding = registry.models.get(model_id), registry.embeddings.get(name)
        if model is None or embedding is None or embedding.family == model.family:
            continue
        wanted = "clip_l and clip_g tensors (SDXL)" if model.family == "sdxl" else "one CLIP embedding (SD 1.x/2.x)"
        problems.append(
            str(
                Problem(
                    f"embeddings.{name}", f"does not fit model '{model_id}', which needs {wanted}", "use embeddings made for that model"
                )
            )
        )
    return problems


def prompt_warnings(plan: pd.DataFrame, families: dict[str, str] | None = None) -> list[str]:
    """Lines for prompt text not applied as the web UIs apply it (checked once per distinct text): the attention
    syntax on families without a weighted encoder (runner/prompts/encode.py covers SD and SDXL: there long prompts
    are chunked, nothing is dropped), and the parts of `<lora:>` tags that are not applied.

    `families`: model id -> family; without it every model counts as one without the weighted encoder."""
    lines = []
    originals = plan["prompt_original"].dropna().unique() if "prompt_original" in plan else []
    for note in dict.fromkeys(tag.note for text in originals for tag in lora_tags(text)[1] if tag.note):
        lines.append(f"prompt: {note}")
    families = families or {}
    unweighted = [families.get(m, "") in UNWEIGHTED_FAMILIES or m not in families for m in plan["model_id"]] if "model_id" in plan else []
    unchunked = plan[unweighted] if "model_id" in plan else plan
    for model_id, rows in unchunked.groupby("model_id", sort=True) if "model_id" in unchunked else [("", unchunked)]:
        what = f"{label(families[model_id])} models ('{model_id}')" if model_id in families else "this model"
        for name in ("prompt", "negative_prompt"):
            for text in (t for t in rows[name].dropna().unique() if isinstance(t, str) and t) if name in rows else []:
                short = text if len(text) <= 60 else text[:57] + "..."
                if has_weights(text):
                    lines.append(
                        f"{name}: '{short}': attention weights and BREAK are not applied on {what}; "
                        "the words are encoded without the syntax"
                    )
    return lines


# the families whose CLIP prompts the engine encodes in chunks (runner/prompts/encode.py), and those whose encoders
# take no weights at all
CHUNKED_FAMILIES = tuple(name for name, f in FAMILIES.items() if f.prompt_weights == "clip")
UNWEIGHTED_FAMILIES = tuple(name for name, f in FAMILIES.items() if not f.prompt_weights)


def overflow_warnings(plan: pd.DataFrame, registry: Registry) -> list[str]:
    """Prompts longer than a T5 or LLM text encoder's max_sequence_length (Flux.1, SD3, Chroma, Qwen-Image, ...):
    the encoder keeps its limit, so the plan says which prompt loses which words, once per model and text. Only
    texts that can be that long are tokenized; an LLM's chat template adds tokens of its own, so its count is a
    lower bound (a warning is never a false alarm)."""
    lines = []
    for model_id, model in sorted(registry.models.items()):
        family = FAMILIES[model.family]
        encoder = next((e for e in family.text_encoders if e.kind != "clip"), None)
        rows = plan[plan["model_id"] == model_id]
        if encoder is None or rows.empty:
            continue
        default = family.max_sequence_length or encoder.max_tokens
        lengths = rows["max_sequence_length"] if "max_sequence_length" in rows else [None] * len(rows)
        pairs = {
            (text, int(length) if length is not None and length == length else default)
            for name in ("prompt", "negative_prompt")
            for text, length in zip(rows[name], lengths)
            if isinstance(text, str)
        }
        pairs = {(t, n) for t, n in pairs if len(t) >= n}
        if not pairs:
            continue
        folder = model.config if model.kind in ("single_file", "transformer_file") else model.path
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(folder), subfolder=encoder.component.replace("text_encoder", "tokenizer"))
        except Exception:  # a tokenizer that cannot load here fails at run time, in one line per image
            continue
        what = "T5" if encoder.kind == "t5" else "text-encoder"
        for text, length in sorted(pairs):
            ids = tokenizer(plain_text(text)).input_ids
            if len(ids) > length:
                dropped = tokenizer.decode(ids[length - 1 : length + 11], skip_special_tokens=True)
                short = text if len(text) <= 60 else text[:57] + "..."
                lines.append(
                    f"prompt: '{short}' is over {family.label}'s {length} {what} tokens (max_sequence_length) on '{model_id}'; "
                    f"the words from about '{dropped}' on are dropped: shorten it or raise max_sequence_length (up to {encoder.max_tokens})"
                )
    return lines


def families_of(registry: Registry) -> dict[str, str]:
    return {k: v.family for k, v in registry.models.items()}


def long_prompts(plan: pd.DataFrame, registry: Registry) -> frozenset[str]:
    """The prompt texts over one CLIP chunk for the tokenizers of the plan's SD/SDXL models (they enter the ids).

    Only texts that can be that long are tokenized (more than 75 characters that are not spaces), with the model's
    own tokenizer files, or the demo world's recipe before its files exist; transformers' tokenizers need no torch.
    """
    texts = {t for c in ("prompt", "negative_prompt") for t in plan[c].dropna().unique() if isinstance(t, str) and may_be_long(t)}
    models = [m for m in registry.models.values() if m.family in CHUNKED_FAMILIES]
    if not texts or not models:
        return frozenset()
    found = set()
    for tokenizer in clip_tokenizers(models):
        found |= {t for t in texts - found if token_count(tokenizer, t) > CHUNK}
    return frozenset(found)


def clip_tokenizers(models: list) -> list:
    """The first CLIP tokenizer of each distinct model folder (SDXL's two share their vocabulary)."""
    from transformers import CLIPTokenizer

    from runner.world.assets import byte_tokenizer

    tokenizers, seen = [], set()
    for model in models:
        folder = model.config if model.kind in ("single_file", "transformer_file") else model.path
        if folder in seen:
            continue
        seen.add(folder)
        if model.builtin and not (Path(folder) / "tokenizer").exists():
            tokenizers.append(byte_tokenizer())  # the demo world's recipe, before its files are copied
        elif (Path(folder) / "tokenizer").exists():
            tokenizers.append(CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer"))
    return tokenizers


def dropped_lora_warnings(plan: pd.DataFrame, registry: Registry) -> list[str]:
    """Lines for LoRA weights diffusers drops without an error on a model's family (DROPPED_LORA_KEYS): never silently."""
    blends = plan[["model_id", "lora_model"]].drop_duplicates()
    pairs = {(m, lora) for m, blend in zip(blends["model_id"], blends["lora_model"]) for lora in split_loras(blend)}
    lines = []
    for model_id, lora_id in sorted(pairs):
        model, lora = registry.models.get(model_id), registry.loras.get(lora_id)
        if model is None or lora is None or lora.path.suffix != ".safetensors" or not lora.path.exists():
            continue
        keys = safetensors_keys(lora.path)
        if lycoris_kind(keys):  # loaded as weight deltas by lora-sweep itself (engines/deltas.py): nothing is dropped
            continue
        for families, fragments, what in DROPPED_LORA_KEYS:
            if model.family in families and any(f in k for k in keys for f in fragments):
                lines.append(
                    f"loras.{lora_id}: diffusers drops {what} on {label(model.family)} models ('{model_id}'); the rest of the LoRA applies"
                )
    return lines


def wanted_files(plan: pd.DataFrame) -> dict[str, set[str]]:
    """Registry name -> the ids the plan names."""

    def names(column: str) -> set[str]:
        return {n for value in plan[column].dropna().unique() for n in split_loras(value)}

    return {"models": names("model_id"), "loras": names("lora_model"), "vaes": names("vae"), "embeddings": names("embeddings_model")}


def local_limits(cfg: DictConfig) -> Limits:
    """The API's limits, widened where local models go beyond them: guidance_scale from 0 (distilled models run
    without CFG: Z-Image Turbo at 0), sides up to 2048 (SDXL's 832x1216, Flux's 2 megapixels)."""
    return Limits(max_lora_strength=float(cfg.validation.max_lora_strength), min_guidance=0.0, max_size=2048)


def engine_and_limits(cfg: DictConfig) -> tuple[Capabilities | None, Limits, list[str]]:
    """The engine's capabilities and the request limits a sweep or search is checked against, or why they cannot be had."""
    limits = local_limits(cfg) if cfg.engine.kind == "local" else Limits(max_lora_strength=float(cfg.validation.max_lora_strength))
    try:
        caps = capabilities(cfg.engine.kind)
    except KeyError:
        return None, limits, [str(Problem("engine.kind", f"unknown engine '{cfg.engine.kind}'", "use engine=local"))]
    if not 0.1 <= limits.max_lora_strength <= 2:
        fix = "use 1 (the spec) or up to 2"
        return caps, limits, [str(Problem("validation.max_lora_strength", f"{limits.max_lora_strength} is outside 0.1..2", fix))]
    return caps, limits, []


def registry_files(cfg: DictConfig) -> dict[str, dict[str, tuple[str, str]]]:
    """Every registered model, LoRA, embedding and VAE as (sha256, file name), to match an image's hashes and names."""
    entries = registry_entries(cfg)
    hashes = HashCache(Path(cfg.paths.outputs) / ".cache" / "hashes.json")
    registry = resolve_all(entries, {name: set(entries[name] or {}) for name in ("models", "loras", "vaes", "embeddings")}, hashes)
    groups = {"models": registry.models, "loras": registry.loras, "vaes": registry.vaes, "embeddings": registry.embeddings}
    return {kind: {k: (v.sha256, v.path.name) for k, v in group.items()} for kind, group in groups.items()}


def image_base(cfg: DictConfig, base: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
    """`sweep.base_from`: the image's A1111/Forge parameters as the base request, the sweep's own base on top.

    Returns (base, lines for the plan's output: what was not matched or not applied, problems)."""
    from runner.prompts.parameters import base_request, parse_parameters, read_parameters

    path = Path(str(cfg.sweep.base_from)).expanduser()
    try:
        text = read_parameters(path)
    except (OSError, ValueError) as exc:
        return base, [], [str(Problem("sweep.base_from", f"{path} cannot be read ({exc})", "give the path of a PNG, JPEG or WebP"))]
    if not text:
        fix = "use an image A1111, Forge, ComfyUI or lora-sweep wrote, or set sweep.base"
        return base, [], [str(Problem("sweep.base_from", f"{path.name} has no A1111 parameters text", fix))]
    request, lines = base_request(parse_parameters(text), registry_files(cfg))
    replaced = [f"from_image: {k} from {path.name} is replaced by sweep.base.{k}" for k in base if k in request and request[k] != base[k]]
    return {**request, **base}, lines + replaced, []


def image_base_text(image: str, cfg: DictConfig) -> str:
    """What `lora-sweep params IMAGE` prints: the base request read from the image, then its lines."""
    cfg.sweep.base_from = image
    base, lines, problems = image_base(cfg, {})
    if problems:
        raise UserError(problems)
    text = OmegaConf.to_yaml(OmegaConf.create({"base": base}))
    return text + "".join(f"{line}\n" for line in lines)


def prepare_sweep(cfg: DictConfig) -> PreparedSweep:
    name = cfg.sweep.name
    caps, limits, problems = engine_and_limits(cfg)
    if caps is None or problems:
        return PreparedSweep(name, pd.DataFrame(), None, None, problems)
    if not cfg.sweep.base and not cfg.sweep.grid and not cfg.sweep.get("base_from"):
        return PreparedSweep(
            name,
            pd.DataFrame(),
            None,
            None,
            [str(Problem("sweep.base", "the sweep has no base request and no grid", "give at least sweep.base.prompt"))],
        )
    base = OmegaConf.to_container(cfg.sweep.base, resolve=True)
    grid = OmegaConf.to_container(cfg.sweep.grid, resolve=True)
    from_image: list[str] = []
    if cfg.sweep.get("base_from"):
        base, from_image, image_problems = image_base(cfg, base)
        if image_problems:
            return PreparedSweep(name, pd.DataFrame(), None, None, image_problems)
    if str(cfg.sweep.get("trigger_mode") or "prepend") not in ("prepend", "none"):
        fix = "use prepend (a LoRA's trigger words before the prompt) or none; {trigger} in a prompt places them"
        return PreparedSweep(
            name, pd.DataFrame(), None, None, [str(Problem("sweep.trigger_mode", f"unknown mode '{cfg.sweep.trigger_mode}'", fix))]
        )
    configured_loras = OmegaConf.to_container(cfg.loras, resolve=True) or {}
    runs = checkpoint_runs(configured_loras)
    grid, run_problems = checkpoint_axis(grid, runs, configured_loras)
    if run_problems:
        return PreparedSweep(name, pd.DataFrame(), None, None, run_problems)
    try:
        built = build_plan(base, grid, default_model_id=cfg.model.id, limits=limits, baseline=bool(cfg.sweep.report.baseline))
    except PlanError as exc:
        return PreparedSweep(name, pd.DataFrame(), None, None, [str(p) for p in exc.problems])
    if built.problems:
        return PreparedSweep(name, built.plan, None, None, built.problems)

    entries = registry_entries(cfg)
    rows = check_rows(built.plan, cfg, caps, entries, given=given_fields(base, grid))
    scorers, score_problems = score_entries(cfg)
    engine_problems = engine_setting_problems(cfg) if caps.kind == "local" else remote_setting_problems(cfg)
    problems = rows.problems + score_problems + engine_problems
    warnings = (
        from_image
        + shadowed_base_fields(base, grid)
        + rows.warnings
        + (prompt_warnings(rows.plan, families_of(rows.registry)) if caps.kind == "local" else [])
    )
    plan = with_checkpoint_columns(rows.plan, runs)
    prepared = PreparedSweep(name, plan, rows.registry, rows.identity, problems, warnings, rows.duplicates, scorers)
    prepared.checkpoints = {name: [c.id for c in found] for name, found in runs.items()}
    return prepared


@dataclass
class CheckedRows:
    """Parsed plan rows with their ids, checked against the files and the engine (what `run` and `serve` share)."""

    plan: pd.DataFrame
    registry: Registry
    identity: Identity
    problems: list[str]
    warnings: list[str]
    duplicates: int


def registry_entries(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """The registries of the config; a LoRA entry whose source is a folder or glob of checkpoints is one entry per
    checkpoint (`mine@e4`, runner/checkpoints.py), each with the run's other keys."""
    entries = {name: OmegaConf.to_container(cfg[name], resolve=True) for name in ("models", "loras", "vaes", "embeddings")}
    loras = dict(entries["loras"] or {})
    for name, found in checkpoint_runs(loras).items():
        spec = {k: v for k, v in loras.pop(name).items() if k != "source"}
        loras |= {c.id: {**spec, "source": str(c.path)} for c in found}
    return entries | {"loras": loras}


def checkpoint_runs(loras: dict[str, Any]) -> dict[str, list[Checkpoint]]:
    """The LoRA entries that stand for a training run's checkpoints, with the checkpoints found (in training order)."""
    runs = {}
    for name, spec in loras.items():
        source = spec.get("source") if isinstance(spec, dict) else None
        if isinstance(source, str) and not spec.get("weight_name") and is_checkpoint_source(source):
            runs[name] = checkpoints(name, source)
    return runs


def checkpoint_axis(grid: dict[str, Any], runs: dict[str, list[Checkpoint]], loras: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`lora_model: {checkpoints: mine, last: 3, every: 2}` -> `{each: [mine@e2, mine@e4, ...]}` (baseline kept)."""
    spec = grid.get("lora_model")
    if not isinstance(spec, dict) or "checkpoints" not in spec:
        return grid, []
    names = [spec["checkpoints"]] if isinstance(spec["checkpoints"], str) else list(spec["checkpoints"] or [])
    ids, problems = [], []
    for name in names:
        if name not in runs:
            known = ", ".join(runs) or "none (give a LoRA entry a folder or a glob as its source)"
            hint = did_you_mean(name, runs) or f"runs of checkpoints: {known}"
            problems.append(str(Problem("sweep.grid.lora_model.checkpoints", f"'{name}' is not a LoRA entry of checkpoints", hint)))
        elif not runs[name]:
            where = loras[name]["source"]
            problems.append(str(Problem(f"loras.{name}.source", f"{where} holds no .safetensors checkpoint", "fix the folder or glob")))
        else:
            ids += thin([c.id for c in runs[name]], spec.get("last"), spec.get("every"))
    rest = {k: v for k, v in spec.items() if k not in ("checkpoints", "last", "every")}
    return {**grid, "lora_model": {**rest, "each": ids}}, problems


def with_checkpoint_columns(plan: pd.DataFrame, runs: dict[str, list[Checkpoint]]) -> pd.DataFrame:
    """`checkpoint_epoch` / `checkpoint_step` of rows whose blend is one checkpoint (the report's step axis)."""
    by_id = {c.id: c for found in runs.values() for c in found}
    if not by_id or plan.empty:
        return plan
    epoch = plan["lora_model"].map(lambda m: by_id[m].epoch if m in by_id else None)
    step = plan["lora_model"].map(lambda m: by_id[m].step if m in by_id else None)
    return plan.assign(checkpoint_epoch=epoch, checkpoint_step=step)


def lora_triggers(entries: dict[str, Any], registry: Registry) -> dict[str, str]:
    """Each LoRA's trigger words: its registry entry's `trigger`, else the trainer's metadata in the file."""
    triggers = {}
    for lora_id, resolved in registry.loras.items():
        spec = (entries.get("loras") or {}).get(lora_id) or {}
        given = spec.get("trigger") if isinstance(spec, dict) else None
        found = given or (trigger_of(safetensors_metadata(resolved.path)) if resolved.path.suffix == ".safetensors" else None)
        if found:
            triggers[lora_id] = str(found)
    return triggers


def with_triggers(plan: pd.DataFrame, triggers: dict[str, str], mode: str) -> pd.DataFrame:
    """The blend's trigger words into the prompt: where it says `{trigger}` (in blend order), else prepended
    (`trigger_mode: prepend`, the default) or not at all (`none`). prompt_original keeps the prompt as written."""
    if plan.empty or (not triggers and not plan["prompt"].str.contains("{trigger}", regex=False).any()):
        return plan
    pairs = plan[["prompt", "lora_model"]].drop_duplicates()
    rewritten = {}
    for prompt, blend in zip(pairs["prompt"], pairs["lora_model"]):
        words = ", ".join(triggers[n] for n in split_loras(blend) if n in triggers)
        if "{trigger}" in prompt:
            rewritten[(prompt, blend)] = prompt.replace("{trigger}", words)
        elif words and mode == "prepend":
            rewritten[(prompt, blend)] = f"{words}, {prompt}"
    if not rewritten:
        return plan
    keys = list(zip(plan["prompt"], plan["lora_model"]))
    new = [rewritten.get(k, k[0]) for k in keys]
    original = [o if o is not None and o == o else (p if n != p else None) for o, p, n in zip(plan["prompt_original"], plan["prompt"], new)]
    return plan.assign(prompt=new, prompt_original=original)


def check_rows(
    plan: pd.DataFrame,
    cfg: DictConfig,
    caps: Capabilities,
    entries: dict,
    hashes: HashCache | None = None,
    given: frozenset[str] = frozenset(FIELDS),
) -> CheckedRows:
    """Resolve and hash the files the rows name, give the rows their ids and validate them against the engine.

    `given`: the request fields the user set; the others take the model family's defaults (local engine).
    """
    if caps.kind == "remote":  # model, LoRA, VAE and embeddings ids are the provider's: nothing on disk to resolve or hash
        registry = Registry()
    else:
        hashes = hashes or HashCache(Path(cfg.paths.outputs) / ".cache" / "hashes.json")
        upscaler = OmegaConf.to_container(cfg.upscaler, resolve=True) if plan["upscale"].any() else None
        registry = resolve_all(entries, wanted_files(plan), hashes, upscaler)
    families = {k: v.family for k, v in registry.models.items()}
    if caps.kind == "local":
        plan = apply_family_defaults(plan, families, given)
    registry.triggers = lora_triggers(entries, registry)
    plan = with_triggers(plan, registry.triggers, str(cfg.sweep.get("trigger_mode") or "prepend"))
    identity = registry_identity(registry, cfg)
    if caps.kind == "local":
        identity = replace(identity, long_prompts=long_prompts(plan, registry))
    problems_fit = fit_problems(plan, registry)
    plan, duplicates = with_ids(plan, identity)
    lcm_ids = frozenset(k for k, v in {**entries["models"], **entries["loras"]}.items() if (v or {}).get("lcm"))
    checked = validate_plan(
        plan,
        caps,
        substitute_schedulers=cfg.engine.get("substitute_schedulers", False),
        max_images=cfg.sweep.max_images,
        lcm_ids=lcm_ids,
        families=families,
        has_upscaler=registry.upscaler is not None,
        given=given,
    )
    problems = [str(p) for p in registry.problems] + problems_fit + checked.problems
    warnings = checked.warnings + (
        dropped_lora_warnings(plan, registry) + overflow_warnings(plan, registry) if caps.kind == "local" else []
    )
    return CheckedRows(checked.plan, registry, identity, problems, warnings, duplicates)


def prepare_request(raw: dict[str, Any], cfg: DictConfig, hashes: HashCache | None = None) -> CheckedRows | list[str]:
    """One text2img request (loose types, as the API sends it) -> its checked rows, or the problems.

    `serve` calls this for every request: the same parsing, limits, registry and validation as a
    sweep's plan, so the server and the CLI refuse the same things with the same words.
    """
    limits = local_limits(cfg)
    try:
        built = build_plan(raw, {}, default_model_id=cfg.model.id, limits=limits)
    except PlanError as exc:
        return [str(p) for p in exc.problems]
    if built.problems:
        return list(built.problems)
    rows = check_rows(built.plan, cfg, capabilities("local"), registry_entries(cfg), hashes, given=frozenset(raw) & frozenset(FIELDS))
    return rows.problems or rows


def score_entries(cfg: DictConfig) -> tuple[dict[str, Any], list[str]]:
    """The scorers `sweep.scores` needs, checked before the first image (as models and LoRAs are)."""
    names = list(cfg.sweep.get("scores") or [])
    if not names:
        return {}, []
    try:
        return requested_scorers(names, cfg.scores.clip, OmegaConf.to_container(cfg.scorers, resolve=True)), []
    except ScoreProblem as exc:
        return {}, [str(p) for p in exc.problems]


def remote_setting_problems(cfg: DictConfig) -> list[str]:
    if int(cfg.engine.get("workers", 1)) != 1:
        return [
            str(
                Problem(
                    "engine.workers",
                    "applies to the local engine; the remote engine's concurrency is engine.max_in_flight",
                    "drop engine.workers, or set engine.max_in_flight=N",
                )
            )
        ]
    return []


OFFLOAD_MODES = ("none", "model", "sequential")
# engine.quantize -> the package it needs (the engine's QUANTIZE table says how it is applied)
QUANTIZE_PACKAGES = {"none": None, "bnb-4bit": "bitsandbytes", "bnb-8bit": "bitsandbytes", "torchao-int8": "torchao"}


def memory_setting_problems(cfg: DictConfig) -> list[str]:
    """engine.offload and engine.quantize: known values, on a device that has them, with their package installed."""
    import importlib.util

    problems = []
    offload, quantize = str(cfg.engine.get("offload", "none")), str(cfg.engine.get("quantize", "none"))
    cpu = str(cfg.engine.device).startswith(("cpu", "mps"))
    if offload not in OFFLOAD_MODES:
        problems.append(str(Problem("engine.offload", f"unknown mode '{offload}'", f"use one of {', '.join(OFFLOAD_MODES)}")))
    elif offload != "none" and cpu:
        problems.append(str(Problem("engine.offload", f"{offload} offload moves weights to a CUDA device", "drop engine.offload on CPU")))
    if quantize not in QUANTIZE_PACKAGES:
        problems.append(str(Problem("engine.quantize", f"unknown mode '{quantize}'", f"use one of {', '.join(QUANTIZE_PACKAGES)}")))
    elif quantize != "none":
        package = QUANTIZE_PACKAGES[quantize]
        if cpu:
            problems.append(
                str(Problem("engine.quantize", f"{quantize} runs on CUDA devices only", "drop engine.quantize, or use a GGUF file"))
            )
        elif importlib.util.find_spec(package) is None:
            problems.append(
                str(Problem("engine.quantize", f"{quantize} needs {package}, which is not installed", f"pip install {package}"))
            )
    return problems


def engine_setting_problems(cfg: DictConfig) -> list[str]:
    """The local engine's fast-path switches, checked before anything loads (one line each)."""
    problems = []
    batch = cfg.engine.get("batch_size", "auto")
    if not (isinstance(batch, str) and batch.strip().lower() == "auto"):
        try:
            valid = int(str(batch)) >= 1  # it used to run silently as 1
        except ValueError:
            valid = False
        if not valid:
            problems.append(str(Problem("engine.batch_size", f"{batch} is not a batch size", "use 1 or more, or auto (the default)")))
    for name in ("fuse_loras", "channels_last"):
        value = cfg.engine.get(name, "auto")
        if not isinstance(value, bool) and str(value).strip().lower() != "auto":
            problems.append(str(Problem(f"engine.{name}", f"{value!r} is not true, false or auto", f"use engine.{name}=auto")))
    workers = int(cfg.engine.get("workers", 1))
    if workers < 1:
        problems.append(str(Problem("engine.workers", f"{workers} is below 1", "use 1 (this process) or the number of GPUs")))
    elif workers > 1:
        try:
            import ray  # noqa: F401
        except ImportError:
            problems.append(
                str(Problem("engine.workers", f"{workers} workers need Ray, which is not installed", "pip install -e '.[ray]'"))
            )
    if int(cfg.engine.get("max_batch_size", 32)) < 1:
        problems.append(str(Problem("engine.max_batch_size", f"{cfg.engine.max_batch_size} is below 1", "use for example 32")))
    problems += memory_setting_problems(cfg)
    if cfg.engine.get("compile") and cfg.engine.get("fuse_loras") is False:
        problems.append(
            str(
                Problem(
                    "engine.compile",
                    "a compiled UNet runs blends fused (switching peft adapters would recompile it)",
                    "drop engine.fuse_loras=false, or set engine.compile=false",
                )
            )
        )
    return problems
