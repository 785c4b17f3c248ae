"""The spec's 18 scheduler names -> diffusers scheduler classes, or a clear refusal.

The names are diffusers' own class names, so mapping is by name; four of them are not
text-to-image samplers and are refused (or, if the engine allows, substituted and recorded).
The A1111/Forge web UIs' sampler names ("DPM++ 2M Karras", or "DPM++ 2M" with schedule type "Karras") map to a
class and request options through ALIASES, `canonical_scheduler` and `web_ui_scheduler`.
Importing this module does not import torch; `load_scheduler` does.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any

from runner.errors import closest

SPEC_SCHEDULERS: tuple[str, ...] = (
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "DPMSolverSinglestepScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "UniPCMultistepScheduler",
    "DDIMInverseScheduler",
    "DEISMultistepScheduler",
    "IPNDMScheduler",
    "KarrasVeScheduler",
    "ScoreSdeVeScheduler",
    "LCMScheduler",
)


@dataclass(frozen=True)
class NotAGenerator:
    reason: str
    substitute: str


NOT_GENERATORS: dict[str, NotAGenerator] = {
    "DDIMInverseScheduler": NotAGenerator("inverts an image into noise, it does not generate one", "DDIMScheduler"),
    "IPNDMScheduler": NotAGenerator("uses its own continuous schedule, unlike SD's discrete training schedule", "PNDMScheduler"),
    "KarrasVeScheduler": NotAGenerator(
        "is deprecated since diffusers 0.24 and its step() differs from the others", "EulerDiscreteScheduler"
    ),
    "ScoreSdeVeScheduler": NotAGenerator("is for variance-exploding models only and has no step()", "EulerDiscreteScheduler"),
}

GENERATORS: tuple[str, ...] = tuple(n for n in SPEC_SCHEDULERS if n not in NOT_GENERATORS)

# The flow-matching families (Flux, SD3, Qwen-Image, ...) take their own samplers, and the spec's multistep solvers
# with flow sigmas (diffusers' use_flow_sigmas, prediction_type flow_prediction); the other spec names map or are refused.
FLOW_SCHEDULERS: tuple[str, ...] = ("FlowMatchEulerDiscreteScheduler",)
FLOW_SIGMA_SCHEDULERS: tuple[str, ...] = (
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
)
FLOW_GENERATORS: tuple[str, ...] = FLOW_SCHEDULERS + FLOW_SIGMA_SCHEDULERS
FLOW_EQUIVALENTS = {"EulerDiscreteScheduler": "FlowMatchEulerDiscreteScheduler"}
# flow samplers diffusers has that its text-to-image pipelines cannot drive (they pass custom sigmas to set_timesteps)
FLOW_UNRUNNABLE = {
    "FlowMatchHeunDiscreteScheduler": "takes no custom sigmas, which diffusers 0.42's flow pipelines pass to set_timesteps",
}

# Scheduler options of the request that only some schedulers have (set where the config has the key).
OPTION_FIELDS = {"use_karras_sigmas": "use_karras_sigmas", "algorithm_type": "algorithm_type"}


@dataclass(frozen=True)
class SchedulerChoice:
    requested: str
    used: str  # the class really run
    note: str = ""  # why `used` differs from `requested`, or a warning


def choose(name: str, substitute: bool, flow: bool = False, family: str = "") -> tuple[SchedulerChoice | None, str]:
    """Decide which scheduler class runs for a requested name (`flow`: for a flow-matching family, named `family`).

    Returns (choice, "") or (None, error text with the fix).
    """
    if flow:
        return _choose_flow(name, substitute, family)
    if name in FLOW_SCHEDULERS:
        return (
            None,
            f"{name} is for flow-matching models (Flux, SD3, Qwen-Image, ...); {family or 'this model'} takes the spec's schedulers",
        )
    if name in NOT_GENERATORS:
        info = NOT_GENERATORS[name]
        if substitute:
            note = f"{name} {info.reason}; ran {info.substitute} instead"
            return SchedulerChoice(name, info.substitute, note), ""
        return None, (
            f"{name} {info.reason}; use {info.substitute} (or set engine.substitute_schedulers=true to run {info.substitute} and record it)"
        )
    if name in GENERATORS:
        return SchedulerChoice(name, name), ""
    return None, _unknown(name, "use one of " + ", ".join(GENERATORS))


FLOW_TAKES = (
    "FlowMatchEulerDiscreteScheduler, or DPMSolverMultistep/DPMSolverSinglestep/UniPCMultistep/DEISMultistepScheduler with flow sigmas"
)


def _choose_flow(name: str, substitute: bool, family: str) -> tuple[SchedulerChoice | None, str]:
    if name in FLOW_GENERATORS:
        return SchedulerChoice(name, name), ""
    if name in FLOW_UNRUNNABLE:
        return None, f"{name} {FLOW_UNRUNNABLE[name]}; use {FLOW_TAKES}"
    target = FLOW_EQUIVALENTS.get(name)
    if target and substitute:
        return SchedulerChoice(name, target, f"{name} on {family} models (flow-matching) ran {target}"), ""
    if target:
        return (
            None,
            f"{name} is not a flow-matching sampler; use {target} (or set engine.substitute_schedulers=true to run it and record it)",
        )
    if name in SPEC_SCHEDULERS:
        return None, f"{name} does not run {family} models (flow-matching); use {FLOW_TAKES}"
    return None, _unknown(name, "use " + FLOW_TAKES)


def load_scheduler(
    name: str, base_config: Any, options: dict[str, Any] | None = None, *, flow: bool = False, shift: float | None = None
) -> Any:
    """A diffusers scheduler of class `name` built from the pipeline's scheduler config.

    For a flow-matching model (`flow`), the spec's multistep solvers run with flow sigmas; `shift` fixes the
    timestep shift (and turns off the resolution-dependent one, which would override it).
    """
    import diffusers

    cls = getattr(diffusers, name)
    accepted = inspect.signature(cls.__init__).parameters  # follows register_to_config's wrapper
    kwargs: dict[str, Any] = {}
    for field_name, key in OPTION_FIELDS.items():
        value = (options or {}).get(field_name)
        if value not in (None, False) and key in accepted:
            kwargs[key] = value
    if flow and name in FLOW_SIGMA_SCHEDULERS:
        kwargs |= {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
        base_shift = dict(base_config).get("shift")
        if shift is not None or base_shift is not None:
            kwargs["flow_shift"] = float(shift if shift is not None else base_shift)
    if shift is not None:
        if "shift" in accepted:
            kwargs["shift"] = float(shift)
        if "use_dynamic_shifting" in accepted:
            kwargs["use_dynamic_shifting"] = False
    return cls.from_config(base_config, **kwargs)


def supports_option(name: str, option: str) -> bool:
    """Whether scheduler class `name` has a request option such as use_karras_sigmas (needs diffusers)."""
    import diffusers

    return option in inspect.signature(getattr(diffusers, name).__init__).parameters


# --- The web UIs' names --------------------------------------------------------------------------------------------
# A1111/Forge sampler name -> (diffusers class, request options), as the diffusers docs' table "A1111/k-diffusion |
# Diffusers | Usage" gives them (docs/source/en/api/schedulers/overview.md); options use the request's own fields only
# (OPTION_FIELDS). These are the names A1111 < 1.9 wrote whole ("DPM++ 2M Karras"); A1111 >= 1.9 and Forge write the
# sampler and its schedule type apart ("Sampler: DPM++ 2M, Schedule type: Karras"): see web_ui_scheduler.
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "DPM++ SDE": ("DPMSolverSinglestepScheduler", {}),
    "DPM++ SDE Karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {}),  # PLMS is PNDM with skip_prk_steps, which SD's scheduler configs set
    "UniPC": ("UniPCMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),  # ComfyUI's and diffusers' name; A1111 has no DEIS
}

# Web-UI names not mapped, and why (choose()'s message says it). Their "Karras"/"Exponential" forms are refused with the
# same reason.
UNMAPPED: dict[str, str] = {
    "DPM++ 2S a": "diffusers has no ancestral single-step DPM-Solver++ (its docs: N/A, 'very similar to DPMSolverSinglestepScheduler')",
    "DPM fast": "diffusers has no equivalent (its docs: N/A)",
    "DPM adaptive": "diffusers has no equivalent (its docs: N/A)",
    "DPM++ 2M SDE Heun": "needs DPMSolverMultistepScheduler(solver_type='heun'), and solver_type is not a request field",
    "DPM++ 3M SDE": "needs DPMSolverMultistepScheduler(solver_order=3), and solver_order is not a request field",
    "Restart": "diffusers has no Restart sampler",
    "DDIM CFG++": "CFG++ changes the guidance step, which no diffusers scheduler does",
    "Euler CFG++": "CFG++ changes the guidance step, which no diffusers scheduler does",
    "Euler a CFG++": "CFG++ changes the guidance step, which no diffusers scheduler does",
    "DPM++ 2M CFG++": "CFG++ changes the guidance step, which no diffusers scheduler does",
    "DPM++ 2S a CFG++": "CFG++ changes the guidance step, which no diffusers scheduler does",
}

# A1111 >= 1.9 / Forge schedule types (modules/sd_schedulers.py labels) -> request options; "Automatic" is the
# sampler's own default (below). "Uniform" is the model's own sigmas, what the old names without "Karras" ran, which the
# diffusers table maps to the class's defaults.
SCHEDULE_TYPES: dict[str, dict[str, Any]] = {"Uniform": {}, "Karras": {"use_karras_sigmas": True}}
UNMAPPED_SCHEDULE_TYPES: dict[str, str] = {
    "Exponential": "needs use_exponential_sigmas=True (diffusers docs), not a request field",
    "Beta": "needs use_beta_sigmas=True (diffusers docs), not a request field",
    "SGM Uniform": "needs timestep_spacing='trailing' (diffusers docs), not a request field",
    "Simple": "needs timestep_spacing='trailing' (diffusers docs), not a request field",
    "Polyexponential": "has no diffusers option",
    "KL Optimal": "has no diffusers option",
    "Normal": "is not in the diffusers docs' table (no scheduler option gives it)",
    "DDIM": "is not in the diffusers docs' table (no scheduler option gives it)",
    "Align Your Steps": "is custom timesteps in diffusers (AysSchedules passed to the pipeline), not a scheduler option",
    "Align Your Steps GITS": "is custom timesteps in diffusers, not a scheduler option",
    "Align Your Steps 11": "is custom timesteps in diffusers, not a scheduler option",
    "Align Your Steps 32": "is custom timesteps in diffusers, not a scheduler option",
    "Turbo": "has no diffusers option",
}
# The schedule type "Automatic": the sampler's default schedule in A1111 >= 1.9 (the 'scheduler' option of
# modules/sd_samplers_kdiffusion.py); samplers not listed use the model's own sigmas ("Uniform").
AUTOMATIC_SCHEDULE: dict[str, str] = {
    "DPM++ 2M": "Karras",
    "DPM++ SDE": "Karras",
    "DPM++ 2M SDE": "Exponential",
    "DPM2": "Karras",
    "DPM2 a": "Karras",
}
# A1111's timestep samplers (modules/sd_samplers_timesteps.py): they take no schedule type, whatever is selected.
NO_SCHEDULE_TYPE: frozenset[str] = frozenset({"DDIM", "PLMS", "UniPC"})
# The classes whose __init__ takes use_karras_sigmas (diffusers 0.42; the tests check it against diffusers).
KARRAS_SCHEDULERS: frozenset[str] = frozenset(
    {
        "LMSDiscreteScheduler",
        "EulerDiscreteScheduler",
        "HeunDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "UniPCMultistepScheduler",
        "DEISMultistepScheduler",
    }
)
KNOWN_CLASSES: tuple[str, ...] = SPEC_SCHEDULERS + FLOW_SCHEDULERS + tuple(FLOW_UNRUNNABLE)


def _key(name: str) -> str:
    """The matching form of a name: case, spaces, '_' and '-' ignored ("dpm++2m karras", "sgm_uniform")."""
    return re.sub(r"[\s_-]+", "", name).lower()


_CLASSES = {_key(n): n for n in KNOWN_CLASSES}
# the samplers alone (the names without a schedule type), and the web UIs' names of every kind, by matching form
_SAMPLERS = {_key(n): n for n, (_, options) in ALIASES.items() if "use_karras_sigmas" not in options}
_UNMAPPED = {_key(n): n for n in UNMAPPED}
_SCHEDULES = {_key(n): n for n in (*SCHEDULE_TYPES, *UNMAPPED_SCHEDULE_TYPES, "Automatic")}
_SUFFIXES = sorted(_SCHEDULES, key=len, reverse=True)  # "sgmuniform" before "uniform"


def _split(key: str) -> tuple[str, str | None]:
    """A name's sampler and schedule type ("dpm++2mkarras" -> "dpm++2m", "Karras"), as A1111 reads old names."""
    if key in _SAMPLERS or key in _CLASSES or key in _UNMAPPED:
        return key, None
    for suffix in _SUFFIXES:
        base = key.removesuffix(suffix)
        if base != key and (base in _SAMPLERS or base in _CLASSES or base in _UNMAPPED):
            return base, _SCHEDULES[suffix]
    return key, None


def _resolve(sampler: str, schedule_type: str | None) -> tuple[tuple[str, dict[str, Any]] | None, str]:
    """(class, options), or None and why not ("" where the name is not a web-UI or class name at all)."""
    base, suffix = _split(_key(sampler))
    if base in _UNMAPPED:
        return None, UNMAPPED[_UNMAPPED[base]]
    if base in _SAMPLERS:
        name = _SAMPLERS[base]
        cls, options = ALIASES[name]
    elif base in _CLASSES:
        name, cls, options = "", _CLASSES[base], {}
    else:
        return None, ""
    schedule = suffix or (_SCHEDULES.get(_key(schedule_type)) if schedule_type and schedule_type.strip() else None)
    if schedule_type and schedule_type.strip() and schedule is None:
        return None, f"schedule type '{schedule_type}' is none this knows ({', '.join(_SCHEDULES.values())})"
    if schedule is None or name in NO_SCHEDULE_TYPE:  # none recorded (A1111 < 1.9), or one the sampler ignores
        return (cls, dict(options)), ""
    if schedule == "Automatic":
        schedule = AUTOMATIC_SCHEDULE.get(name, "Uniform")
    if schedule in UNMAPPED_SCHEDULE_TYPES:
        return None, f"the {schedule} schedule type {UNMAPPED_SCHEDULE_TYPES[schedule]}"
    extra = SCHEDULE_TYPES[schedule]
    if "use_karras_sigmas" in extra and cls not in KARRAS_SCHEDULERS:
        return None, f"{cls} has no use_karras_sigmas, so no Karras schedule"
    return (cls, {**options, **extra}), ""


def web_ui_scheduler(sampler: str, schedule_type: str | None = None) -> tuple[str, dict[str, Any]] | None:
    """The diffusers class and request options for an A1111/Forge sampler and schedule type, or None if unmapped.

    `schedule_type` None (or "") is the old whole name ("DPM++ 2M Karras", or "DPM++ 2M": the model's own sigmas);
    "Automatic" is the sampler's A1111 >= 1.9 default (Karras for "DPM++ 2M"); a schedule type in the sampler's name
    wins over the argument, as in A1111. Case, spaces, '_' and '-' are ignored.
    """
    return _resolve(sampler, schedule_type)[0]


def canonical_scheduler(value: str) -> tuple[str, dict[str, Any]] | None:
    """A request's `scheduler` value as (diffusers class, request options): a class name maps to itself with {}, a
    web-UI name ("DPM++ 2M Karras", "euler a") to its class and options; None when it is neither (or unmapped)."""
    key = _key(value)
    if key in _CLASSES:
        return _CLASSES[key], {}
    return web_ui_scheduler(value)


def unmapped_reason(value: str) -> str:
    """Why a web-UI name (or "sampler schedule-type") has no mapping; "" if it maps or is not a web-UI name."""
    return _resolve(value, None)[1]


def _spell(cls: str, options: dict[str, Any]) -> str:
    """A mapping as request fields: "scheduler: DPMSolverMultistepScheduler, use_karras_sigmas: true"."""
    return ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in {"scheduler": cls, **options}.items())


def suggest(name: str) -> str:
    """ "did you mean ...?" over the class names and the web UIs' names (case, spaces, '_' and '-' ignored), or ""."""
    names = {_key(n): n for n in (*SPEC_SCHEDULERS, *FLOW_SCHEDULERS, *ALIASES)}
    guess = closest(_key(name), names)
    return f"did you mean '{names[guess]}'?" if guess else ""


def _unknown(name: str, fallback: str) -> str:
    mapped = canonical_scheduler(name)
    if mapped is not None:  # a web-UI name that reached choose() unconverted: say what to write
        return f"'{name}' is a web-UI sampler name; in diffusers terms write {_spell(*mapped)}"
    reason = unmapped_reason(name)
    if reason:
        return f"'{name}' has no diffusers scheduler here: {reason}"
    return f"unknown scheduler '{name}'; {suggest(name) or fallback}"
