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
