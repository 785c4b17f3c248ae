"""Prompts as the web UIs read them (runner/prompts/syntax.py): the attention syntax parsed as A1111 parses it, and
`<lora:name:weight>` tags taken out of the text into the row's blend, on the demo world."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import sweep_images

from runner.plan import build_plan, summarize
from runner.prepare import prepare_sweep
from runner.prompts.syntax import ROUND, SQUARE, Segment, lora_tags, parse_weights, plain_text

BASE = {"prompt": "a red circle on a blue background", "width": 64, "height": 64, "num_inference_steps": 4, "seed": 3}


@pytest.mark.parametrize(
    "text, segments",
    [
        ("a red circle", [("a red circle", 1.0)]),
        ("a (red:1.5) circle", [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]),
        ("(red) circle", [("red", ROUND), (" circle", 1.0)]),
        ("((red)) circle", [("red", ROUND * ROUND), (" circle", 1.0)]),
        ("[red] circle", [("red", SQUARE), (" circle", 1.0)]),
        ("((red:1.5)) circle", [("red", 1.5 * ROUND), (" circle", 1.0)]),  # nesting multiplies
        ("a \\(red\\) circle", [("a (red) circle", 1.0)]),  # escaped brackets are text
        ("(unclosed red circle", [("unclosed red circle", ROUND)]),  # A1111: weighted to the end
        ("a red) circle]", [("a red) circle]", 1.0)]),  # stray closers are text
        ("red BREAK circle", [("red", 1.0), (None, 1.0), ("circle", 1.0)]),
        ("BREAKFAST", [("BREAKFAST", 1.0)]),  # only the word BREAK
        ("(red:abc)", [("red:abc", ROUND)]),  # not a number: a colon in the text, the bracket x1.1
        ("", [("", 1.0)]),
    ],
)
def test_the_attention_syntax_is_read_as_a1111_reads_it(text, segments):
    got = parse_weights(text)
    assert [(s.text, round(s.weight, 6)) for s in got] == [(t, round(w, 6)) for t, w in segments]
    assert all(isinstance(s, Segment) for s in got)


def test_plain_text_is_what_the_encoder_reads():
    assert plain_text("a ((red:1.5)) [big] circle BREAK blue") == "a red big circleblue"


@pytest.mark.parametrize(
    "text, clean, tags",
    [
        ("a red circle <lora:star:0.8>", "a red circle", [("star", 0.8)]),
        ("<lora:star> a red circle", "a red circle", [("star", 1.0)]),
        ("a <lyco:sunset:0.5> red circle, <lora:star:1>", "a red circle,", [("sunset", 0.5), ("star", 1.0)]),
        ("<LORA:star:-0.3>x", "x", [("star", -0.3)]),
        ("no tags here", "no tags here", []),
    ],
)
def test_lora_tags_come_out_of_the_text(text, clean, tags):
    stripped, found = lora_tags(text)
    assert stripped == clean and [(t.name, t.strength) for t in found] == tags


def test_a_tag_is_the_same_image_as_lora_model_by_id_and_by_pixels(workspace):
    tagged = {**BASE, "prompt": BASE["prompt"] + " <lora:star:1>"}
    by_field = {**BASE, "lora_model": "star", "lora_strength": 1}
    both = workspace.sweep(
        "both", {"base": BASE, "grid": {"zip": {"prompt": [tagged["prompt"], BASE["prompt"]], "lora_model": ["", "star"]}}}
    )
    prepared = prepare_sweep(workspace.config(f"sweep={both}", "tracking=none"))
    assert prepared.ok and len(prepared.plan) == 1 and prepared.duplicates == 1, "the two rows are one image"
    row = prepared.plan.iloc[0]
    assert (row["prompt"], row["lora_model"], row["lora_strength"], row["blend"]) == (BASE["prompt"], "star", "1", "star 1")

    for name, base in {"tagged": tagged, "field": by_field}.items():
        path = workspace.sweep(name, {"base": base})
        workspace.run(f"sweep={path}", f"sweep.name={name}", "tracking=none").assert_all_ok()
    (rows_a, pixels_a), (rows_b, pixels_b) = sweep_images(workspace.outputs, "tagged"), sweep_images(workspace.outputs, "field")
    assert rows_a["id"].item() == rows_b["id"].item()
    assert np.array_equal(pixels_a(rows_a["id"].item()), pixels_b(rows_b["id"].item()))
    assert rows_a["prompt_original"].item() == tagged["prompt"], "the prompt as written is kept beside the plan"
    assert rows_a["prompt"].item() == BASE["prompt"]


def test_tags_in_a_grid_of_prompts_make_a_blend_axis_and_combine_with_lora_model():
    grid = {"prompt": ["a red circle <lora:sunset:0.5>", "a red circle <lora:star:1>", "a red circle"], "seed": [1, 2]}
    built = build_plan({"lora_model": "stripes", "lora_strength": 0.7}, grid, default_model_id="m")
    assert built.problems == []
    assert sorted(set(built.plan["blend"])) == ["stripes 0.7", "stripes 0.7 + star 1", "stripes 0.7 + sunset 0.5"]
    axes = summarize(built.plan)["axes"]
    assert "prompt" not in axes and axes["lora_model"] == 3  # one prompt text, three blends


def test_bad_tags_are_one_line_each_exit_2_and_nothing_is_made(workspace):
    base = {**BASE, "prompt": "a red circle <lora:starr:1> <lora:sunset:abc>", "negative_prompt": "blurry <lora:stripes:1>"}
    path = workspace.sweep("bad", {"base": base})
    result = workspace.cli("run", f"sweep={path}", "tracking=none")
    assert result.code == 2 and "Traceback" not in result.err
    assert result.err_lines == [
        "error: prompt: '<lora:sunset:abc>': the strength is not a number; write e.g. <lora:sunset:0.8>",
        "error: negative_prompt: '<lora:stripes:1>' is a LoRA tag, which belongs in the prompt; move it to the prompt",
    ], result.err
    assert not (workspace.outputs / "bad" / "images").exists()
    base["prompt"], base["negative_prompt"] = "a red circle <lora:starr:1>", ""
    path = workspace.sweep("bad", {"base": base})
    prepared = prepare_sweep(workspace.config(f"sweep={path}", "tracking=none"))
    assert prepared.problems and prepared.problems[0].startswith("lora_model: unknown LoRA id 'starr'; did you mean 'star'?")
    base["prompt"], base["lora_model"] = "a red circle <lora:star:1>", "star"
    twice = build_plan(base, {}, default_model_id="m")
    assert twice.problems == ["lora_model: LoRA 'star' is named twice: in lora_model and as '<lora:star:1>'; keep one"]


def test_a_web_ui_sampler_name_is_its_diffusers_class_with_the_same_id(workspace):
    by_alias = {**BASE, "scheduler": "DPM++ 2M Karras"}
    by_class = {**BASE, "scheduler": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    path = workspace.sweep(
        "alias",
        {"base": BASE, "grid": {"zip": {"scheduler": [by_alias["scheduler"], by_class["scheduler"]], "use_karras_sigmas": [False, True]}}},
    )
    prepared = prepare_sweep(workspace.config(f"sweep={path}", "tracking=none"))
    assert prepared.ok and len(prepared.plan) == 1 and prepared.duplicates == 1
    row = prepared.plan.iloc[0]
    assert (row["scheduler_used"], bool(row["use_karras_sigmas"])) == ("DPMSolverMultistepScheduler", True)
    typo = prepare_sweep(workspace.config(f"sweep={path}", "tracking=none", "sweep.grid.zip.scheduler=[DPM++ 2M Karas,DDIMScheduler]"))
    assert any("did you mean 'DPM++ 2M Karras'?" in p for p in typo.problems), typo.problems


# ---------------------------------------------------------------- weighted and chunked encoding (SD's CLIP)

FILLER = ", ".join(["a"] * 45)  # 45 fillers: with the demo's byte tokenizer, about 135 tokens before the scene


def by_hand(pipe, pieces: list[tuple[str, float]], mode: str):
    """The embeddings computed here, independently of runner/prompts: tokenise each piece, cut every 75 tokens (no
    commas in these prompts), wrap in BOS/EOS + padding, encode each chunk, weight it, concatenate."""
    import torch

    tok, encoder = pipe.tokenizer, pipe.text_encoder
    ids, weights = [], []
    for text, weight in pieces:
        piece = tok(text, add_special_tokens=False).input_ids
        ids += piece
        weights += [weight] * len(piece)
    pad = tok.pad_token_id
    chunks = [(ids[i : i + 75], weights[i : i + 75]) for i in range(0, max(len(ids), 1), 75)]
    with torch.no_grad():
        empty = encoder(torch.tensor([[tok.bos_token_id, tok.eos_token_id] + [pad] * 75])).last_hidden_state
        out = []
        for chunk_ids, chunk_weights in chunks:
            row = [tok.bos_token_id, *chunk_ids, tok.eos_token_id] + [pad] * (75 - len(chunk_ids))
            w = torch.tensor([1.0, *chunk_weights, 1.0] + [1.0] * (75 - len(chunk_ids))).view(1, -1, 1)
            z = encoder(torch.tensor([row])).last_hidden_state
            if mode == "a1111":
                weighted = z * w
                z = weighted * (z.mean() / weighted.mean())
            else:
                z = (z - empty) * w + empty
            out.append(z)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("mode", ["a1111", "comfy"])
@pytest.mark.parametrize(
    "prompt, pieces",
    [
        (
            "a (red:1.5) circle on a [blue] background",
            [("a ", 1), ("red", 1.5), (" circle on a ", 1), ("blue", 1 / 1.1), (" background", 1)],
        ),
        (FILLER + " ((red)) circle", [(FILLER + " ", 1), ("red", 1.21), (" circle", 1)]),
    ],
)
def test_the_engines_embeddings_equal_a_computation_by_hand(mode, prompt, pieces, assets_dir):
    from diffusers import StableDiffusionPipeline
    from helpers import demo_engine

    engine = demo_engine(assets_dir)
    engine._load_model("tiny-sd")
    group = {"prompt": prompt, "negative_prompt": "", "clip_skip": 1, "lora_model": "", "lora_strength": "", "prompt_weighting": mode}
    got = engine._prompt_embeddings(group)
    pipe = StableDiffusionPipeline.from_pretrained(assets_dir / "tiny-sd", safety_checker=None)
    expected = by_hand(pipe, pieces, mode)
    assert got["prompt_embeds"].shape == expected.shape
    assert np.allclose(got["prompt_embeds"].numpy(), expected.numpy(), atol=1e-5)
    chunks = expected.shape[1] // 77
    assert got["negative_prompt_embeds"].shape == expected.shape, "the negative is padded to as many chunks"
    assert chunks == (1 if len(prompt) < 75 else 2)


def test_words_past_77_tokens_change_the_image_and_break_changes_the_chunks(workspace):
    """45 fillers + a scene: the scene after token 77 is encoded (before, everything there was dropped)."""
    base = {**BASE, "width": 128, "height": 128, "num_inference_steps": 12, "scheduler": "EulerDiscreteScheduler"}
    prompts = [FILLER + " a red circle on a blue background", FILLER + " a yellow triangle on a purple background"]
    path = workspace.sweep("long", {"base": base, "grid": {"prompt": [*prompts, "a red circle BREAK on a blue background"]}})
    result = workspace.run(f"sweep={path}", "sweep.name=long", "tracking=none")
    result.assert_all_ok()
    assert "over CLIP's 77 tokens" not in result.out
    rows, pixels = sweep_images(workspace.outputs, "long")
    red, yellow, broken = (
        pixels(rows.loc[rows["prompt"] == p, "id"].item()) for p in [*prompts, "a red circle BREAK on a blue background"]
    )
    assert np.abs(red - yellow).mean() > 10, "the scenes after the fillers decide the images"
    border = lambda im: np.concatenate([im[:12].reshape(-1, 3), im[-12:].reshape(-1, 3)]).mean(0)  # noqa: E731
    assert border(red)[2] - border(red)[0] > border(yellow)[2] - border(yellow)[0], "a blue background is bluer than a purple one"
    workspace.run(
        f"sweep={path}", "sweep.name=plain", "tracking=none", "sweep.grid.prompt=[a red circle on a blue background]"
    ).assert_all_ok()
    plain_rows, plain_pixels = sweep_images(workspace.outputs, "plain")
    assert not np.array_equal(broken, plain_pixels(plain_rows["id"].item())), "BREAK starts a second chunk"


# ---------------------------------------------------------------- weights on the DiTs' T5 (Flux.1) and CLIP + T5 (SD3)


@pytest.mark.parametrize("mode", ["a1111", "comfy"])
def test_flux_t5_embeddings_of_a_weighted_prompt_equal_a_computation_by_hand(mode, family_world):
    import diffusers
    import torch

    from runner.engines.local import LocalEngine
    from runner.registry import HashCache, Registry, resolve_model

    model = family_world.get("flux")
    resolved, _ = resolve_model("m", {"source": str(model.folder)}, HashCache(None))
    engine = LocalEngine(registry=Registry(models={"m": resolved}), device="cpu", dtype="float32")
    engine._load_model("m")
    prompt = "a (red:1.5) circle on a [blue] background"
    group = {
        "prompt": prompt,
        "negative_prompt": "",
        "clip_skip": 1,
        "lora_model": "",
        "lora_strength": "",
        "prompt_weighting": mode,
        "max_sequence_length": 32,
    }
    got = engine._prompt_embeddings(group)

    pipe = diffusers.DiffusionPipeline.from_pretrained(model.folder)
    tok, t5 = pipe.tokenizer_2, pipe.text_encoder_2
    ids, weights = [], []
    for text, weight in [("a ", 1), ("red", 1.5), (" circle on a ", 1), ("blue", 1 / 1.1), (" background", 1)]:
        piece = tok(text, add_special_tokens=False).input_ids
        ids, weights = ids + piece, weights + [weight] * len(piece)
    row = ids + [tok.eos_token_id] + [tok.pad_token_id] * (31 - len(ids))
    w = torch.tensor(weights + [1.0] * (32 - len(weights))).view(1, -1, 1)
    with torch.no_grad():
        z = t5(torch.tensor([row]))[0]
        if mode == "a1111":
            expected = z * w * (z.mean() / (z * w).mean())
        else:
            empty = t5(torch.tensor([[tok.eos_token_id] + [tok.pad_token_id] * 31]))[0]
            expected = (z - empty) * w + empty
        pooled = pipe._get_clip_prompt_embeds("a red circle on a blue background", device="cpu")
    assert np.allclose(got["prompt_embeds"].numpy(), expected.numpy(), atol=1e-5)
    assert np.allclose(got["pooled_prompt_embeds"].numpy(), pooled.numpy(), atol=1e-6), "CLIP's pooled embedding is of the words"


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_weights_move_the_pixels_of_dit_families_and_none_reads_the_text_as_written(family, family_world, workspace):
    model = family_world.get(family)
    base = {"prompt": "a red circle on a blue background", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 1}
    grid = {
        "zip": {
            "prompt": [
                "a red circle on a blue background",
                "a (red:1.8) circle on a blue background",
                "a (red:1.8) circle on a blue background",
            ],
            "prompt_weighting": [None, "a1111", "none"],
        }
    }
    path = workspace.sweep("w", {"base": base, "grid": grid})
    result = workspace.run(f"sweep={path}", "sweep.name=w", "tracking=none", *model.overrides)
    result.assert_all_ok()
    assert "attention weights" not in result.out, "applied: nothing to warn about"
    rows, pixels = sweep_images(workspace.outputs, "w")
    assert len({pixels(i).tobytes() for i in rows["id"]}) == 3


def test_a_prompt_past_t5s_max_sequence_length_is_said_with_the_words_it_loses(family_world, workspace):
    model = family_world.get("flux")
    long = "a red circle on a blue background " + " ".join(["with a yellow star"] * 12)
    path = workspace.sweep("t5", {"base": {"prompt": long, "width": 64, "height": 64, "max_sequence_length": 16}})
    prepared = prepare_sweep(workspace.config(f"sweep={path}", "tracking=none", *model.overrides))
    assert prepared.ok, prepared.problems
    lines = [w for w in prepared.warnings if "T5 tokens" in w]
    assert len(lines) == 1, prepared.warnings
    assert lines[0].startswith("prompt: 'a red circle on a blue background with a yellow star with...' is over Flux.1's 16 T5 tokens")
    assert "(max_sequence_length) on 'm'; the words from about '" in lines[0] and "(up to 512)" in lines[0]


def test_plain_prompts_keep_the_ids_earlier_versions_gave(workspace):
    """The demo's 104 ids as lora-sweep gave them before prompts were parsed and the DiT fields existed (116d75d)."""
    prepared = prepare_sweep(workspace.config("tracking=none"))
    assert prepared.ok and len(prepared.plan) == 104
    assert prepared.plan["id"].head(3).tolist() == ["58da0130e7921441", "bd4c61ab3fa608a5", "fff4e0344988a760"]


def test_the_weight_on_a_word_moves_the_image_steadily_and_brackets_the_other_way(workspace):
    """(red:w) for w = 0.5, 1, 1.5, 2 moves the circle's colour one way, step by step, and [red] (/1.1) the other way.

    The direction is the demo model's: its tiny text encoder, trained on a few hundred captions, reads more weight
    on 'red' as a darker, less saturated red (real SD models read it as more red); the test pins that the weight
    reaches the pixels, in order, as A1111's emphasis computes it."""
    base = {**BASE, "width": 128, "height": 128, "num_inference_steps": 20, "scheduler": "EulerDiscreteScheduler", "seed": 0}
    prompts = [f"a (red:{w}) circle on a blue background" for w in (0.5, 1.5, 2.0)]
    prompts += ["a red circle on a blue background", "a [red] circle on a blue background"]
    path = workspace.sweep("weights", {"base": base, "grid": {"prompt": prompts}})
    workspace.run(f"sweep={path}", "sweep.name=weights", "tracking=none").assert_all_ok()
    rows, pixels = sweep_images(workspace.outputs, "weights")

    def redness(prompt: str) -> float:
        centre = pixels(rows.loc[rows["prompt"] == prompt, "id"].item())[44:84, 44:84].astype(float)
        return float((centre[..., 0] - centre[..., 1:].mean(-1)).mean())

    half, plain, one_and_half, double, less = (redness(p) for p in [prompts[0], prompts[3], prompts[1], prompts[2], prompts[4]])
    assert half > plain > one_and_half > double, (half, plain, one_and_half, double)
    assert less > plain, "[red] moves the other way from (red)"


def test_an_image_runs_params_show_the_parsed_blend_and_the_prompt_as_written():
    from runner.tracking import image_params

    params = image_params(
        {
            "prompt": "a red circle",
            "prompt_original": "a red circle <lora:star:0.8>",
            "lora_model": "star",
            "lora_strength": "0.8",
            "blend": "star 0.8",
        }
    )
    assert (params["prompt"], params["prompt_original"], params["lora_model"], params["lora_strength.star"], params["blend"]) == (
        "a red circle",
        "a red circle <lora:star:0.8>",
        "star",
        "0.8",
        "star 0.8",
    )
    assert "prompt_original" not in image_params({"prompt": "a red circle", "lora_model": "", "blend": "no LoRA"})


def test_a_remote_engines_ids_do_not_change_with_the_prompt_syntax():
    """The provider parses weights itself: its rows' ids stay what they were (no paid request made again)."""
    from runner.plan import Identity, image_id

    row = {"prompt": "a (red:1.5) circle", "negative_prompt": "", "model_id": "m", "seed": 1}
    local, remote = Identity(), Identity(parses_prompts=False)
    assert image_id(row, local) != image_id(row, remote)
    assert image_id(row, remote) == image_id({**row, "prompt_weighting": None}, remote)
    plain = {**row, "prompt": "a red circle"}
    assert image_id(plain, local) == image_id(plain, remote)
