"""The text2img request fields of the provider's API: names, loose parsing, limits, one-line errors.

One module owns what a field means so that the plan, the local engine, the remote engine and the
server all agree. Values arrive loose, as the API accepts them ("512" or 512, "yes" or True,
"0.45,0.55" or 0.5); `parse_request` turns them into one canonical form and reports every
problem as a `Problem` that prints as a single line naming the field and the fix.
No torch, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from runner.errors import Problem, did_you_mean

YES = {"yes", "y", "true", "1", "on"}
NO = {"no", "n", "false", "0", "off", ""}


@dataclass(frozen=True)
class Limits:
    """The spec's limits; `max_lora_strength` may be raised (up to 2) for local sweeps."""

    max_size: int = 1024
    size_multiple: int = 8
    min_size: int = 8
    max_samples: int = 4
    min_guidance: float = 1.0
    max_guidance: float = 20.0
    min_clip_skip: int = 1
    max_clip_skip: int = 8
    min_lora_strength: float = 0.1
    max_lora_strength: float = 1.0
    min_steps: int = 1
    max_steps: int = 500


@dataclass(frozen=True)
class FieldSpec:
    kind: str  # str | int | float | bool | strengths | strengths_opt | loras | seed | optional_str | optional_int | optional_float | mode
    default: Any = None
    doc: str = ""


# The fields of the text2img request (../shared/spec), in the spec's order, with sweep defaults.
# enhance_prompt and safety_checker default to "no" in sweeps: the first rewrites the prompt (the
# sweep would no longer compare like with like), the second needs a checker model.
FIELDS: dict[str, FieldSpec] = {
    "model_id": FieldSpec("str", None, "model id from the models registry (default: model.id)"),
    "prompt": FieldSpec("str", None, "what to draw (required)"),
    "negative_prompt": FieldSpec("str", ""),
    "width": FieldSpec("int", 512),
    "height": FieldSpec("int", 512),
    "samples": FieldSpec("int", 1, "images per request; expands into rows with seeds seed..seed+N-1"),
    "num_inference_steps": FieldSpec("int", 31),
    "safety_checker": FieldSpec("bool", False),
    "enhance_prompt": FieldSpec("bool", False),
    "seed": FieldSpec("seed", None, "int, or null for a seed drawn (stably) per row"),
    "guidance_scale": FieldSpec("float", 7.5),
    "multi_lingual": FieldSpec("bool", False),
    "panorama": FieldSpec("bool", False),
    "self_attention": FieldSpec("bool", False),
    "upscale": FieldSpec("bool", False),
    "embeddings_model": FieldSpec("optional_str", None),
    "lora_model": FieldSpec("loras", ""),
    "lora_strength": FieldSpec("strengths", None),
    "scheduler": FieldSpec("str", "UniPCMultistepScheduler"),
    "webhook": FieldSpec("optional_str", None),
    "track_id": FieldSpec("optional_str", None),
    "clip_skip": FieldSpec("int", 1, "1 = last CLIP layer, as in the web UIs"),
    "base64": FieldSpec("bool", False),
    "temp": FieldSpec("bool", False),
    # extra fields the provider accepts
    "tomesd": FieldSpec("bool", False),
    "use_karras_sigmas": FieldSpec("bool", False),
    "algorithm_type": FieldSpec("optional_str", None),
    "vae": FieldSpec("optional_str", None),
    "highres_fix": FieldSpec("bool", False),
    "safety_checker_type": FieldSpec("optional_str", None),
    # fields of the flow-matching families (runner/families.py says which family takes which); unset: the pipeline's default
    "true_cfg_scale": FieldSpec("optional_float", None, "real CFG on Flux.1 and Qwen-Image (with negative_prompt)"),
    "max_sequence_length": FieldSpec("optional_int", None, "prompt tokens of the T5 / LLM text encoder"),
    "shift": FieldSpec("optional_float", None, "flow-matching timestep shift, fixed (no resolution-dependent shift)"),
    "lora_strength_te": FieldSpec("strengths_opt", None, "per LoRA, the text encoders' strength (A1111's te weight); unset: lora_strength"),
    "prompt_weighting": FieldSpec("mode", None, "a1111 (unset: the default) | comfy | none: how (word:1.3) weights apply"),
}

# Fields that never change the pixels: left out of the image id.
NOT_IN_ID = frozenset({"samples", "webhook", "track_id", "base64", "temp"})
# Fields left out of the id (and of derived seeds) while unset, so adding them kept every earlier id.
OMITTED_WHEN_UNSET = frozenset({"true_cfg_scale", "max_sequence_length", "shift", "prompt_weighting", "lora_strength_te"})
PROMPT_WEIGHTING = ("a1111", "comfy", "none")  # unset: a1111
# Secrets the API carries in the body; never stored.
SECRET_FIELDS = frozenset({"key", "api_key"})


def missing(value: Any) -> bool:
    """None, NaN (how pandas holds None in a column of strings) or an empty string."""
    return value is None or value == "" or (isinstance(value, float) and value != value)


def optional(value: Any) -> Any:
    """A plan cell as the request means it: None where the cell is missing."""
    return None if missing(value) else value


def split_loras(value: Any) -> list[str]:
    """'a, b' or ['a', 'b'] or None -> ['a', 'b']."""
    if missing(value):
        return []
    if isinstance(value, str):
        items: Iterable[Any] = value.split(",")
    elif isinstance(value, Iterable):
        items = value
    else:
        raise ValueError(f"expected a comma list of LoRA ids, got {value!r}")
    return [str(v).strip() for v in items if str(v).strip()]


def split_strengths(value: Any) -> list[float]:
    """'0.45,0.55' or 0.5 or [0.45, 0.55] -> [0.45, 0.55]."""
    if value is None or value == "":
        return []
    if isinstance(value, bool):
        raise ValueError(f"expected a number or a comma list of numbers, got {value!r}")
    if isinstance(value, (int, float)):
        return [float(value)]
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        return [float(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        raise ValueError(f"expected a number or a comma list of numbers, got {value!r}") from None


def format_number(x: float) -> str:
    """Shortest stable text of a number: 0.5 -> '0.5', 1.0 -> '1'."""
    return format(round(float(x), 6), "g")


def join_strengths(values: Iterable[float]) -> str:
    return ",".join(format_number(v) for v in values)


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    text = str(value).strip().lower()
    if text in YES:
        return True
    if text in NO:
        return False
    raise ValueError(f'expected "yes" or "no", got {value!r}')


def parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    try:
        return int(str(value).strip())
    except ValueError:
        try:
            as_float = float(str(value).strip())
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ValueError(f"expected an integer, got {value!r}") from None
        return int(as_float)


def parse_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        return float(str(value).strip())
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}") from None


def _parse_value(spec: FieldSpec, value: Any) -> Any:
    if spec.kind == "str":
        if isinstance(value, (dict, list, tuple)):
            raise ValueError(f"expected text, got {value!r}")
        return "" if value is None else str(value)
    if spec.kind == "optional_str":
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none")):
            return None
        return str(value)
    if spec.kind == "strengths_opt":  # canonical text, one value per LoRA once the blend is known (plan.py)
        return join_strengths(split_strengths(value)) or None if value not in (None, "") else None
    if spec.kind == "mode":  # a word of a small vocabulary ("none" is one of them, not null)
        return None if value is None or str(value).strip() == "" else str(value).strip().lower()
    if spec.kind in ("optional_int", "optional_float") and (
        value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none"))
    ):
        return None
    if spec.kind in ("int", "optional_int"):
        return parse_int(value)
    if spec.kind in ("float", "optional_float"):
        return parse_float(value)
    if spec.kind == "bool":
        return parse_bool(value)
    if spec.kind == "seed":
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none")):
            return None
        seed = parse_int(value)
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in 0..{2**32 - 1}, got {seed}")
        return seed
    if spec.kind == "loras":
        return ",".join(split_loras(value))
    if spec.kind == "strengths":
        return split_strengths(value) or None
    return value


def parse_request(raw: Mapping[str, Any], limits: Limits = Limits()) -> tuple[dict[str, Any], list[Problem]]:
    """Loose request -> (canonical request, problems).

    The canonical form has every field of FIELDS: ints, floats and bools as such, `lora_model` as
    'a,b' and `lora_strength` as 'x,y' with one value per LoRA (a single value is spread over all).
    Unknown fields and secrets are reported, never kept.
    """
    problems: list[Problem] = []
    out: dict[str, Any] = {}
    for name in raw:
        if name in SECRET_FIELDS:
            problems.append(
                Problem(
                    name, "API keys do not belong in sweep files", "set the key in the environment variable named by engine.api_key_env"
                )
            )
        elif name not in FIELDS:
            hint = did_you_mean(name, FIELDS)
            problems.append(Problem(name, "unknown request field", hint or f"known fields: {', '.join(FIELDS)}"))
    for name, spec in FIELDS.items():
        value = raw.get(name, spec.default)
        try:
            out[name] = _parse_value(spec, value)
        except ValueError as exc:
            problems.append(Problem(name, str(exc), f"see the text2img spec for {name}"))
            out[name] = spec.default if spec.kind != "strengths" else None
    problems += _check_limits(out, limits)
    if not problems:
        out["lora_strength"] = _canonical_strengths(out)
    return out, problems


def parse_field(name: str, value: Any) -> tuple[Any, Problem | None]:
    """One field's loose value -> (canonical value, problem); on a problem the value is the field's default."""
    spec = FIELDS[name]
    try:
        return _parse_value(spec, value), None
    except ValueError as exc:
        return (spec.default if spec.kind != "strengths" else None), Problem(name, str(exc), f"see the text2img spec for {name}")


def canonical_strengths(lora_model: str, strengths: list[float] | None) -> str:
    return _canonical_strengths({"lora_model": lora_model, "lora_strength": strengths})


def _canonical_strengths(req: dict[str, Any]) -> str:
    loras = split_loras(req["lora_model"])
    strengths = req["lora_strength"] or [1.0]
    if len(strengths) == 1:
        strengths = strengths * len(loras)
    return join_strengths(strengths) if loras else ""


def _check_limits(req: dict[str, Any], lim: Limits) -> list[Problem]:
    problems: list[Problem] = []
    for name in LIMITED_FIELDS:
        problems += field_limit_problems(name, req[name], lim)
    return problems + lora_problems(req["lora_model"], req["lora_strength"], lim)


LIMITED_FIELDS = (
    "prompt",
    "width",
    "height",
    "samples",
    "num_inference_steps",
    "guidance_scale",
    "clip_skip",
    "true_cfg_scale",
    "max_sequence_length",
    "shift",
    "prompt_weighting",
)


def field_limit_problems(name: str, v: Any, lim: Limits) -> list[Problem]:
    """The limits of one parsed field on its own (the plan checks each distinct value once)."""
    if name == "prompt" and not v.strip():
        return [Problem("prompt", "is required", "set sweep.base.prompt")]
    if name in ("width", "height") and (v % lim.size_multiple or not lim.min_size <= v <= lim.max_size):
        fixed = min(max(lim.min_size, round(v / lim.size_multiple) * lim.size_multiple), lim.max_size)
        return [Problem(name, f"{v} must be a multiple of {lim.size_multiple} in {lim.min_size}..{lim.max_size}", f"use {fixed}")]
    if name == "samples" and not 1 <= v <= lim.max_samples:
        return [Problem("samples", f"{v} is outside 1..{lim.max_samples}", "use more seeds instead of more samples")]
    if name == "num_inference_steps" and not lim.min_steps <= v <= lim.max_steps:
        return [Problem("num_inference_steps", f"{v} is outside {lim.min_steps}..{lim.max_steps}", "use for example 30")]
    if name == "guidance_scale" and not lim.min_guidance <= v <= lim.max_guidance:
        return [
            Problem(
                "guidance_scale",
                f"{format_number(v)} is outside {format_number(lim.min_guidance)}..{format_number(lim.max_guidance)}",
                "use for example 7.5",
            )
        ]
    if name == "clip_skip" and not lim.min_clip_skip <= v <= lim.max_clip_skip:
        return [Problem("clip_skip", f"{v} is outside {lim.min_clip_skip}..{lim.max_clip_skip}", "1 means the last CLIP layer")]
    if v is None:
        return []
    if name == "true_cfg_scale" and not 1 <= v <= lim.max_guidance:
        return [Problem(name, f"{format_number(v)} is outside 1..{format_number(lim.max_guidance)}", "use for example 4 (1 turns it off)")]
    if name == "max_sequence_length" and not 1 <= v <= 1024:
        return [Problem(name, f"{v} is outside 1..1024", "use for example 512")]
    if name == "prompt_weighting" and v not in PROMPT_WEIGHTING:
        return [Problem(name, f"unknown mode '{v}'", f"use one of {', '.join(PROMPT_WEIGHTING)} (a1111 when unset)")]
    if name == "shift" and not 0 < v <= 100:
        return [Problem(name, f"{format_number(v)} must be above 0 (and at most 100)", "use for example 3")]
    return []


def lora_problems(lora_model: str, strengths: list[float] | None, lim: Limits) -> list[Problem]:
    """The checks that need the blend and its strengths together."""
    problems: list[Problem] = []
    loras = split_loras(lora_model)
    strengths = strengths or []
    if strengths and not loras:
        problems.append(Problem("lora_strength", "is set but lora_model is empty", "set lora_model or drop lora_strength"))
    if loras and len(strengths) > 1 and len(strengths) != len(loras):
        problems.append(
            Problem(
                "lora_strength",
                f"{len(strengths)} strengths for {len(loras)} LoRAs ({','.join(loras)})",
                "give one strength per LoRA, or a single value for all",
            )
        )
    if len(set(loras)) != len(loras):
        problems.append(Problem("lora_model", f"'{lora_model}' names a LoRA twice", "name each LoRA once"))
    for s in strengths:
        if not lim.min_lora_strength <= s <= lim.max_lora_strength:
            fix = f"use a value in {format_number(lim.min_lora_strength)}..{format_number(lim.max_lora_strength)}"
            if lim.max_lora_strength < 2:
                fix += " (local sweeps may allow up to 2 with validation.max_lora_strength=2)"
            problems.append(
                Problem(
                    "lora_strength",
                    f"{format_number(s)} is outside {format_number(lim.min_lora_strength)}..{format_number(lim.max_lora_strength)}",
                    fix,
                )
            )
    return problems


def blend_label(lora_model: str, lora_strength: str) -> str:
    """'sunset,stripes' + '0.45,0.55' -> 'sunset 0.45 + stripes 0.55' ('no LoRA' if empty)."""
    loras = split_loras(lora_model)
    if not loras:
        return "no LoRA"
    strengths = split_strengths(lora_strength) or [1.0] * len(loras)
    return " + ".join(f"{n} {format_number(s)}" for n, s in zip(loras, strengths))


def to_api_fields(req: Mapping[str, Any]) -> dict[str, Any]:
    """Canonical request -> the provider's wire types (strings and "yes"/"no" where it expects them)."""
    out: dict[str, Any] = {}
    for name, spec in FIELDS.items():
        if name not in req:
            continue
        v = req[name]
        if spec.kind == "bool":
            out[name] = "yes" if v else "no"
        elif spec.kind == "int" and name in ("width", "height", "samples", "num_inference_steps"):
            out[name] = str(v)
        elif name in ("lora_model", "lora_strength"):
            out[name] = v or None  # the provider takes null for "no LoRA"
        elif name in OMITTED_WHEN_UNSET and v is None:
            continue
        else:
            out[name] = v
    return out
