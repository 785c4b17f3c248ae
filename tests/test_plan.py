"""The plan: grid expansion, blends, strengths, seeds, samples and stable ids."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from runner.plan import Identity, PlanError, build_plan, summarize, with_ids
from runner.request import parse_request

BASE = {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 4, "seed": 0}


def plan_of(grid, base=BASE, identity=Identity()):
    result = build_plan(base, grid, default_model_id="tiny-sd")
    assert not result.problems, result.problems
    plan, _ = with_ids(result.plan, identity)
    return plan


def test_demo_shape_three_blends_three_strengths_two_schedulers_four_seeds():
    plan = plan_of(
        {
            "lora_model": {"each": ["a", "b", "c"]},
            "lora_strength": [0.4, 0.7, 1.0],
            "scheduler": ["EulerDiscreteScheduler", "DDIMScheduler"],
            "seed": {"range": [0, 3]},
        }
    )
    assert len(plan) == 72
    assert plan["id"].is_unique
    assert set(plan["lora_model"]) == {"a", "b", "c"}
    assert sorted(plan["seed"].unique()) == [0, 1, 2, 3]


def test_blend_generators():
    pairs = plan_of({"lora_model": {"pairs": ["a", "b", "c"]}})
    assert sorted(pairs["lora_model"]) == ["a,b", "a,c", "b,c"]
    combos = plan_of({"lora_model": {"combinations": ["a", "b", "c", "d"], "k": [1, 3]}})
    assert len(combos) == 4 + 4
    with_baseline = plan_of({"lora_model": {"each": ["a", "b"], "baseline": True}})
    assert list(with_baseline["lora_model"]) == ["", "a", "b"]
    assert with_baseline.loc[0, "blend"] == "no LoRA" and with_baseline.loc[0, "lora_strength"] == ""
    explicit = plan_of({"lora_model": ["a,b", ["c", "d"], ""]})
    assert list(explicit["lora_model"]) == ["a,b", "c,d", ""]


def test_per_lora_strengths_crossed_and_zipped():
    crossed = plan_of({"lora_model": ["sunset,stripes"], "lora_strength": {"sunset": [0.4, 0.8], "stripes": [0.5, 0.6]}})
    assert list(crossed["lora_strength"]) == ["0.4,0.5", "0.4,0.6", "0.8,0.5", "0.8,0.6"]
    assert crossed.loc[0, "blend"] == "sunset 0.4 + stripes 0.5"
    zipped = plan_of({"lora_model": ["a,b"], "lora_strength": {"mode": "zip", "a": [0.2, 0.4], "b": [0.6, 0.8]}})
    assert list(zipped["lora_strength"]) == ["0.2,0.6", "0.4,0.8"]
    with_default = plan_of({"lora_model": {"each": ["a", "b"]}, "lora_strength": {"a": [0.3], "default": [0.9, 1.0]}})
    assert list(with_default["lora_strength"]) == ["0.3", "0.9", "1"]


def test_strength_ranges_and_single_value_spread_over_blend():
    plan = plan_of({"lora_model": ["a,b"], "lora_strength": {"range": [0.2, 1.0, 0.4]}})
    assert list(plan["lora_strength"]) == ["0.2,0.2", "0.6,0.6", "1,1"]


def test_samples_expand_into_consecutive_seeds():
    plan = plan_of({}, base={**BASE, "seed": 10, "samples": 3})
    assert list(plan["seed"]) == [10, 11, 12]
    assert list(plan["sample"]) == [0, 1, 2]
    assert set(plan["samples"]) == {1}


def test_null_seed_is_drawn_stably():
    first = plan_of({}, base={**BASE, "seed": None, "samples": 2})
    again = plan_of({}, base={**BASE, "seed": None, "samples": 2})
    assert list(first["seed"]) == list(again["seed"])
    assert first["seed"].iloc[1] == first["seed"].iloc[0] + 1
    assert set(first["seed_source"]) == {"derived"}


def test_zip_axis_moves_fields_together():
    plan = plan_of({"zip": {"prompt": ["p1", "p2"], "seed": [5, 6]}})
    assert list(zip(plan["prompt"], plan["seed"])) == [("p1", 5), ("p2", 6)]


def test_adding_seeds_keeps_old_ids():
    small = plan_of({"lora_model": ["a"], "seed": [1, 2]})
    large = plan_of({"lora_model": ["a"], "seed": [1, 2, 3, 4]})
    assert set(small["id"]) < set(large["id"])


def test_id_depends_on_hashes_and_pixels_deciding_fields_only():
    one = plan_of({"lora_model": ["a,b"], "lora_strength": ["0.4,0.6"]}, identity=Identity(lora_hashes={"a": "h1", "b": "h2"}))
    changed_file = plan_of({"lora_model": ["a,b"], "lora_strength": ["0.4,0.6"]}, identity=Identity(lora_hashes={"a": "h1x", "b": "h2"}))
    reordered = plan_of({"lora_model": ["b,a"], "lora_strength": ["0.6,0.4"]}, identity=Identity(lora_hashes={"a": "h1", "b": "h2"}))
    webhook = plan_of(
        {"lora_model": ["a,b"], "lora_strength": ["0.4,0.6"]},
        base={**BASE, "webhook": "http://x", "track_id": 3},
        identity=Identity(lora_hashes={"a": "h1", "b": "h2"}),
    )
    assert one["id"][0] != changed_file["id"][0]
    assert one["id"][0] == reordered["id"][0]
    assert one["id"][0] == webhook["id"][0]


def test_duplicate_images_are_planned_once():
    result = build_plan(BASE, {"seed": [1, 1, 2]}, default_model_id="m")
    plan, dropped = with_ids(result.plan, Identity())
    assert len(plan) == 2 and dropped == 1


def test_loose_types_of_the_spec_are_accepted():
    request, problems = parse_request(
        {
            "prompt": "x",
            "width": "512",
            "height": 512.0,
            "samples": "2",
            "safety_checker": "yes",
            "panorama": False,
            "lora_model": "a, b",
            "lora_strength": "0.45,0.55",
            "seed": "42",
            "guidance_scale": "7",
            "track_id": 12,
        }
    )
    assert problems == []
    assert request["width"] == 512 and request["height"] == 512 and request["samples"] == 2
    assert request["safety_checker"] is True and request["panorama"] is False
    assert request["lora_model"] == "a,b" and request["lora_strength"] == "0.45,0.55"
    assert request["seed"] == 42 and request["guidance_scale"] == 7.0 and request["track_id"] == "12"
    single, _ = parse_request({"prompt": "x", "lora_model": "a,b", "lora_strength": 0.5})
    assert single["lora_strength"] == "0.5,0.5"


def test_numbers_beyond_64_bits_are_problems_not_crashes():
    """Found by the server's generated bodies: a width of 9.2e18 overflowed the plan's int64 column (HTTP 500)."""
    built = build_plan({"prompt": "x", "width": 9.223372036854776e18}, {"seed": [1, 2**70]}, default_model_id="m")
    assert sorted(str(p).split(":")[0] for p in built.problems) == ["seed", "width"], built.problems
    assert any("multiple of 8 in 8..1024" in str(p) for p in built.problems)


@pytest.mark.parametrize(
    "grid, field",
    [
        ({"sed": [1]}, "sweep.grid.sed"),
        ({"seed": []}, "sweep.grid.seed"),
        ({"seed": {"range": [5, 1]}}, "sweep.grid.seed"),
        ({"lora_model": {"pairs_of": ["a"]}}, "sweep.grid.lora_model.pairs_of"),
        ({"lora_model": ["a,b"], "lora_strength": {"a": [0.5]}}, "sweep.grid.lora_strength.b"),
        ({"zip": {"prompt": ["a", "b"], "seed": [1]}}, "sweep.grid.zip"),
    ],
)
def test_unreadable_grids_name_the_field(grid, field):
    with pytest.raises(PlanError) as info:
        build_plan(BASE, grid, default_model_id="m")
    assert str(info.value.problems[0]).startswith(field)


def test_plan_is_a_dataframe_with_the_spec_fields():
    plan = plan_of({"seed": [1]})
    assert isinstance(plan, pd.DataFrame)
    for column in (
        "id",
        "blend",
        "model_id",
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "samples",
        "num_inference_steps",
        "guidance_scale",
        "seed",
        "scheduler",
        "lora_model",
        "lora_strength",
        "clip_skip",
    ):
        assert column in plan


def test_an_unset_optional_field_keeps_its_id_and_counts_as_an_axis_value():
    """None among strings (NaN to pandas) is still None: the id of a row without a VAE does not depend on other rows."""
    alone = plan_of({"seed": [1]})
    mixed = plan_of({"seed": [1], "vae": [None, "mse"]}, identity=Identity(file_hashes={"vae:mse": "h"}))
    assert alone["id"][0] in set(mixed["id"])
    other_hash = plan_of({"seed": [1], "vae": [None, "mse"]}, identity=Identity(file_hashes={"vae:mse": "h2"}))
    assert len(set(mixed["id"]) & set(other_hash["id"])) == 1, "only the row using the VAE depends on its hash"
    assert summarize(mixed)["axes"] == {"vae": 2}


# ---------------------------------------------------------------- the vectorised planner vs row by row


def row_by_row(base, grid, baseline=False):
    """The plan as the grid defines it: expand_grid's rows, parse_request on each, samples spread over seeds."""
    from runner.plan import PLAN_COLUMNS, count_problems, derived_seed, expand_grid
    from runner.request import FIELDS, blend_label, parse_request, split_loras

    raws = expand_grid(base, grid)
    if baseline:
        seen = {json.dumps(r, sort_keys=True, default=str) for r in raws if not split_loras(r.get("lora_model"))}
        for raw in list(raws):
            plain = {**raw, "lora_model": "", "lora_strength": None}
            if split_loras(raw.get("lora_model")) and json.dumps(plain, sort_keys=True, default=str) not in seen:
                seen.add(json.dumps(plain, sort_keys=True, default=str))
                raws.append(plain)
    parsed, problems = [], []
    for raw in raws:
        request, found = parse_request({**raw, "model_id": raw.get("model_id") or "m"})
        parsed.append(request)
        problems += found
    if problems:
        return None, count_problems(problems)
    rows = []
    for request in parsed:
        first = request["seed"] if request["seed"] is not None else derived_seed(request)
        for sample in range(request["samples"]):
            row = {**request, "seed": (first + sample) % 2**32, "samples": 1, "id": "", "sample": sample}
            row["blend"] = blend_label(row["lora_model"], row["lora_strength"])
            row["seed_source"] = "given" if request["seed"] is not None else "derived"
            rows.append(row)
    return pd.DataFrame(rows, columns=[*PLAN_COLUMNS, *FIELDS]), []


EQUIVALENCE_CASES = [
    ({"prompt": "p", "seed": 1}, {}),
    ({"prompt": "p"}, {"seed": [1, 2, 2], "guidance_scale": [5, "7.5"]}),
    ({"prompt": "p", "samples": 2}, {"lora_model": ["a", "a,b", ""], "lora_strength": [0.5, 1.0], "seed": [3]}),
    ({"prompt": "p", "lora_strength": 0.7}, {"lora_model": {"each": ["a", "b"], "baseline": True}, "seed": {"start": 0, "count": 3}}),
    (
        {"prompt": "p"},
        {
            "lora_model": {"pairs": ["a", "b", "c"]},
            "lora_strength": {"a": [0.5, 1], "default": [0.2, 0.4]},
            "zip": {"prompt": ["x", "y"], "negative_prompt": ["n1", "n2"]},
        },
    ),
    ({"prompt": "p", "vae": "v", "upscale": "yes"}, {"embeddings_model": ["e", None], "seed": [1, 2], "scheduler": ["DDIMScheduler"]}),
    ({"prompt": "p", "width": 513, "num_inference_steps": 0}, {"seed": [1, -1], "guidance_scale": [0.5, 7]}),
    ({"prompt": ""}, {"lora_model": ["a,a", "a"], "lora_strength": ["0.5,0.6,0.7", 3]}),
    ({"prompt": "p", "key": "x", "promt": "y"}, {"seed": [1]}),
]


@pytest.mark.parametrize("baseline", [False, True])
@pytest.mark.parametrize("base, grid", EQUIVALENCE_CASES)
def test_vectorised_plan_equals_the_row_by_row_definition(base, grid, baseline):
    from runner.plan import image_id
    from runner.request import FIELDS

    want, want_problems = row_by_row(base, grid, baseline)
    got = build_plan(base, grid, default_model_id="m", baseline=baseline)
    assert got.problems == want_problems
    if want is None:
        return
    assert list(got.plan.columns) == list(want.columns)
    for column in want.columns:
        assert [None if v != v else v for v in got.plan[column].tolist()] == [None if v != v else v for v in want[column].tolist()], column
    identity = Identity({"m": "h"}, {"a": "1", "b": "2"}, {"kind": "local"}, {"vae:v": "3", "embeddings:e": "4", "upscaler": "5"})
    ids, _ = with_ids(got.plan, identity)
    expected = dict.fromkeys(image_id(r, identity) for r in want[list(FIELDS)].to_dict("records"))
    assert list(ids["id"]) == list(expected), "each id is image_id of its row; duplicates dropped"


def test_a_large_plan_is_built_whole():
    grid = {"lora_model": {"each": ["a", "b"], "pairs": ["a", "b"]}, "lora_strength": [0.5, 1], "seed": {"start": 0, "count": 40_000}}
    plan, dropped = with_ids(build_plan({"prompt": "p"}, grid, default_model_id="m").plan, Identity())
    assert len(plan) == 3 * 2 * 40_000 and dropped == 0 and plan["id"].is_unique
    assert plan["seed"].between(0, 39_999).all() and (plan.groupby("blend")["seed"].nunique() == 40_000).all()
