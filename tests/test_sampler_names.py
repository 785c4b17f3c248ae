"""A1111/Forge sampler names map to the diffusers classes and options the diffusers docs give; unknown ones get a hint."""

from __future__ import annotations

import inspect
import subprocess
import sys

import diffusers
import pytest

from runner.schedulers import (
    ALIASES,
    AUTOMATIC_SCHEDULE,
    GENERATORS,
    KARRAS_SCHEDULERS,
    OPTION_FIELDS,
    SCHEDULE_TYPES,
    UNMAPPED,
    UNMAPPED_SCHEDULE_TYPES,
    canonical_scheduler,
    choose,
    unmapped_reason,
    web_ui_scheduler,
)

KARRAS = {"use_karras_sigmas": True}
SDE = {"algorithm_type": "sde-dpmsolver++"}


def _accepts(cls_name: str) -> set[str]:
    return set(inspect.signature(getattr(diffusers, cls_name).__init__).parameters)


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_every_alias_is_a_class_diffusers_has_and_takes_its_options(name):
    cls_name, options = ALIASES[name]
    assert cls_name in GENERATORS, f"{name}: {cls_name} is not a scheduler the runner generates with"
    assert hasattr(diffusers, cls_name)
    assert set(options) <= set(OPTION_FIELDS), f"{name}: options must be request fields"
    assert set(options) <= _accepts(cls_name), f"{name}: {cls_name}.__init__ lacks {set(options) - _accepts(cls_name)}"


def test_the_karras_classes_really_take_use_karras_sigmas():
    assert KARRAS_SCHEDULERS <= {n for n in GENERATORS if "use_karras_sigmas" in _accepts(n)}
    assert "EulerAncestralDiscreteScheduler" not in KARRAS_SCHEDULERS and "LCMScheduler" not in KARRAS_SCHEDULERS


@pytest.mark.parametrize(
    "name, expected",
    [
        # the diffusers docs' table (api/schedulers/overview.md)
        ("DPM++ 2M", ("DPMSolverMultistepScheduler", {})),
        ("DPM++ 2M Karras", ("DPMSolverMultistepScheduler", KARRAS)),
        ("DPM++ 2M SDE", ("DPMSolverMultistepScheduler", SDE)),
        ("DPM++ 2M SDE Karras", ("DPMSolverMultistepScheduler", SDE | KARRAS)),
        ("DPM++ SDE", ("DPMSolverSinglestepScheduler", {})),
        ("DPM++ SDE Karras", ("DPMSolverSinglestepScheduler", KARRAS)),
        ("DPM2", ("KDPM2DiscreteScheduler", {})),
        ("DPM2 Karras", ("KDPM2DiscreteScheduler", KARRAS)),
        ("DPM2 a", ("KDPM2AncestralDiscreteScheduler", {})),
        ("DPM2 a Karras", ("KDPM2AncestralDiscreteScheduler", KARRAS)),
        ("Euler", ("EulerDiscreteScheduler", {})),
        ("Euler a", ("EulerAncestralDiscreteScheduler", {})),
        ("Heun", ("HeunDiscreteScheduler", {})),
        ("LMS", ("LMSDiscreteScheduler", {})),
        ("LMS Karras", ("LMSDiscreteScheduler", KARRAS)),
        ("DEIS", ("DEISMultistepScheduler", {})),
        ("UniPC", ("UniPCMultistepScheduler", {})),
        ("LCM", ("LCMScheduler", {})),
        # A1111's own two (not in the table): its DDIM and PLMS samplers
        ("DDIM", ("DDIMScheduler", {})),
        ("PLMS", ("PNDMScheduler", {})),
    ],
)
def test_known_pairs(name, expected):
    assert ALIASES[name] == expected
    assert canonical_scheduler(name) == expected


def test_class_names_map_to_themselves_and_unknown_names_to_none():
    assert canonical_scheduler("DPMSolverMultistepScheduler") == ("DPMSolverMultistepScheduler", {})
    assert canonical_scheduler("dpmsolvermultistepscheduler") == ("DPMSolverMultistepScheduler", {})
    assert canonical_scheduler("FlowMatchEulerDiscreteScheduler") == ("FlowMatchEulerDiscreteScheduler", {})
    assert canonical_scheduler("DDIMInverseScheduler") == ("DDIMInverseScheduler", {})  # known; choose() refuses it
    for name in ["Foo", "", "Karras", "DPM++ 7M", "NotAScheduler"]:
        assert canonical_scheduler(name) is None, name


def test_the_result_is_a_copy():
    cls_name, options = canonical_scheduler("DPM++ 2M Karras")
    options["use_karras_sigmas"] = False
    assert ALIASES["DPM++ 2M Karras"][1] == KARRAS


@pytest.mark.parametrize(
    "written", ["dpm++ 2m karras", "DPM++2M Karras", "DPM++ 2M  Karras", " DPM++ 2M Karras ", "DPM++_2M_KARRAS", "dpm++2mkarras"]
)
def test_case_and_spacing_do_not_matter(written):
    assert canonical_scheduler(written) == ("DPMSolverMultistepScheduler", KARRAS)


def test_matching_forms_do_not_collide():
    from runner.schedulers import _key

    names = [*ALIASES, *UNMAPPED, *GENERATORS]
    assert len({_key(n) for n in names}) == len(names)


def test_split_form_sampler_and_schedule_type():
    # A1111 >= 1.9 infotext: "Sampler: DPM++ 2M, Schedule type: Karras"
    assert web_ui_scheduler("DPM++ 2M", "Karras") == ("DPMSolverMultistepScheduler", KARRAS)
    assert web_ui_scheduler("dpm++ 2m", "karras") == ("DPMSolverMultistepScheduler", KARRAS)
    assert web_ui_scheduler("DPM++ 2M SDE", "Karras") == ("DPMSolverMultistepScheduler", SDE | KARRAS)
    assert web_ui_scheduler("Euler", "Karras") == ("EulerDiscreteScheduler", KARRAS)  # no old whole name, still right
    assert web_ui_scheduler("DPM++ 2M", "Uniform") == ("DPMSolverMultistepScheduler", {})
    # no schedule type recorded: the old whole name (A1111 >= 1.9 always writes the one it ran when it is not Uniform)
    assert web_ui_scheduler("DPM++ 2M", None) == ("DPMSolverMultistepScheduler", {})
    assert web_ui_scheduler("DPM++ 2M", "") == ("DPMSolverMultistepScheduler", {})
    assert web_ui_scheduler("DPM++ 2M Karras", None) == ("DPMSolverMultistepScheduler", KARRAS)
    # a schedule type in the name wins, as in A1111's get_sampler_and_scheduler
    assert web_ui_scheduler("DPM++ 2M Karras", "Exponential") == ("DPMSolverMultistepScheduler", KARRAS)
    # class names take schedule types too
    assert web_ui_scheduler("HeunDiscreteScheduler", "Karras") == ("HeunDiscreteScheduler", KARRAS)


def test_automatic_is_the_samplers_own_default():
    assert AUTOMATIC_SCHEDULE["DPM++ 2M"] == "Karras"  # A1111 >= 1.9's sd_samplers_kdiffusion.py
    assert web_ui_scheduler("DPM++ 2M", "Automatic") == ("DPMSolverMultistepScheduler", KARRAS)
    assert web_ui_scheduler("DPM2 a", "Automatic") == ("KDPM2AncestralDiscreteScheduler", KARRAS)
    assert web_ui_scheduler("Euler", "Automatic") == ("EulerDiscreteScheduler", {})
    assert web_ui_scheduler("Euler a", "Automatic") == ("EulerAncestralDiscreteScheduler", {})
    assert web_ui_scheduler("LCM", "Automatic") == ("LCMScheduler", {})
    assert web_ui_scheduler("DPM++ 2M SDE", "Automatic") is None  # its default is Exponential
    assert "use_exponential_sigmas" in unmapped_reason("DPM++ 2M SDE Automatic")


def test_unmapped_schedule_types_give_none():
    for schedule in UNMAPPED_SCHEDULE_TYPES:
        assert web_ui_scheduler("DPM++ 2M", schedule) is None, schedule
        assert unmapped_reason(f"DPM++ 2M {schedule}"), schedule
    assert web_ui_scheduler("DPM++ 2M", "sgm_uniform") is None  # A1111's schedule ids work as well as labels
    assert web_ui_scheduler("DPM++ 2M", "No Such Schedule") is None
    assert canonical_scheduler("DPM++ 2M SDE Exponential") is None  # A1111 1.6's whole name
    # Karras on a class without use_karras_sigmas
    assert web_ui_scheduler("Euler a", "Karras") is None
    assert web_ui_scheduler("LCM", "Karras") is None
    assert "no use_karras_sigmas" in unmapped_reason("Euler a Karras")


def test_timestep_samplers_ignore_the_schedule_type_as_a1111_does():
    assert web_ui_scheduler("DDIM", "Karras") == ("DDIMScheduler", {})
    assert web_ui_scheduler("UniPC", "Exponential") == ("UniPCMultistepScheduler", {})
    assert web_ui_scheduler("PLMS", "Automatic") == ("PNDMScheduler", {})


def test_unmapped_names_say_why():
    assert canonical_scheduler("DPM++ 2S a") is None and web_ui_scheduler("DPM++ 2S a", "Karras") is None
    for name in UNMAPPED:
        assert canonical_scheduler(name) is None and unmapped_reason(name) == UNMAPPED[name]
    assert unmapped_reason("DPM++ 2S a Karras") == UNMAPPED["DPM++ 2S a"]
    assert unmapped_reason("DPM++ 2M Karras") == "" and unmapped_reason("Foo") == ""
    _, error = choose("DPM++ 2S a", False)
    assert "DPM++ 2S a" in error and "ancestral" in error


def test_schedule_type_options_are_request_fields():
    for options in SCHEDULE_TYPES.values():
        assert set(options) <= set(OPTION_FIELDS)


@pytest.mark.parametrize(
    "typed, hint",
    [
        ("DPM++ 2M Karas", "DPM++ 2M Karras"),
        ("dpm++2m karas", "DPM++ 2M Karras"),
        ("Eulr a", "Euler a"),
        ("LMS Karas", "LMS Karras"),
        ("DPM++ SDE Karass", "DPM++ SDE Karras"),
        ("EulerDiscrete", "EulerDiscreteScheduler"),  # the class names still win where they are closest
        ("DPMSolverMultistepSchedular", "DPMSolverMultistepScheduler"),
        ("FlowMatchEulerDiscrete", "FlowMatchEulerDiscreteScheduler"),
    ],
)
def test_did_you_mean_searches_both_vocabularies(typed, hint):
    choice, error = choose(typed, False)
    assert choice is None and f"unknown scheduler '{typed}'; did you mean '{hint}'?" == error
    choice, error = choose(typed, False, flow=True, family="Flux")
    assert choice is None and f"did you mean '{hint}'?" in error


def test_an_alias_that_reaches_choose_says_what_to_write():
    choice, error = choose("DPM++ 2M SDE Karras", False)
    assert choice is None
    assert "scheduler: DPMSolverMultistepScheduler, algorithm_type: sde-dpmsolver++, use_karras_sigmas: true" in error


def test_choose_keeps_its_behaviour():
    assert choose("EulerDiscreteScheduler", False)[0].used == "EulerDiscreteScheduler"
    assert choose("DDIMInverseScheduler", True)[0].used == "DDIMScheduler"
    assert "inverts an image" in choose("DDIMInverseScheduler", False)[1]
    assert "flow-matching" in choose("FlowMatchEulerDiscreteScheduler", False)[1]
    assert choose("EulerDiscreteScheduler", True, flow=True, family="Flux")[0].used == "FlowMatchEulerDiscreteScheduler"
    assert "use one of" in choose("zzzzzz", False)[1]


def test_importing_the_module_imports_no_torch():
    code = "import sys, runner.schedulers as s; s.canonical_scheduler('DPM++ 2M Karras'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
