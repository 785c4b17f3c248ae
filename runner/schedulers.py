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
    hint = did_you_mean(name, SPEC_SCHEDULERS + FLOW_SCHEDULERS)
    return None, f"unknown scheduler '{name}'; {hint or 'use one of ' + ', '.join(GENERATORS)}"  # noqa: E501


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
    hint = did_you_mean(name, SPEC_SCHEDULERS + FLOW_SCHEDULERS)
    return None, f"unknown scheduler '{name}'; {hint or 'use ' + FLOW_TAKES}"


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
