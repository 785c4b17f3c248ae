"""The spec's 18 scheduler names -> diffusers scheduler classes, or a clear refusal.

The names are diffusers' own class names, so mapping is by name; four of them are not
text-to-image samplers and are refused (or, if the engine allows, substituted and recorded).
Importing this module does not import torch; `load_scheduler` does.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from runner.errors import did_you_mean

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

# Scheduler options of the request that only some schedulers have (set where the config has the key).
OPTION_FIELDS = {"use_karras_sigmas": "use_karras_sigmas", "algorithm_type": "algorithm_type"}


@dataclass(frozen=True)
class SchedulerChoice:
    requested: str
    used: str  # the class really run
    note: str = ""  # why `used` differs from `requested`, or a warning


def choose(name: str, substitute: bool) -> tuple[SchedulerChoice | None, str]:
    """Decide which scheduler class runs for a requested name.

    Returns (choice, "") or (None, error text with the fix).
    """
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
    hint = did_you_mean(name, SPEC_SCHEDULERS)
    return None, f"unknown scheduler '{name}'; {hint or 'use one of ' + ', '.join(GENERATORS)}"


def load_scheduler(name: str, base_config: Any, options: dict[str, Any] | None = None) -> Any:
    """A diffusers scheduler of class `name` built from the pipeline's scheduler config."""
    import diffusers

    cls = getattr(diffusers, name)
    accepted = inspect.signature(cls.__init__).parameters  # follows register_to_config's wrapper
    kwargs = {}
    for field_name, key in OPTION_FIELDS.items():
        value = (options or {}).get(field_name)
        if value not in (None, False) and key in accepted:
            kwargs[key] = value
    return cls.from_config(base_config, **kwargs)


def supports_option(name: str, option: str) -> bool:
    """Whether scheduler class `name` has a request option such as use_karras_sigmas (needs diffusers)."""
    import diffusers

    return option in inspect.signature(getattr(diffusers, name).__init__).parameters
