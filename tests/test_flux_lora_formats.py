"""Third-party Flux.1 LoRA layouts through diffusers' converters, at the real key names and shapes.

diffusers' Flux.1 converters hard-code the real model (19 double + 38 single blocks, width 3072, MLP 12288), so they
cannot run on a tiny model. Here the transformer and CLIP are built from the real configs on the meta device (no
memory), the LoRA files are real .safetensors files with the real key names and rank-2 CPU tensors, and they go the
runner's way: `lora_weights(path, flux.fold_lora_alphas)` (engines/local.py; Flux.1 gets the file), then
`FluxPipeline.lora_state_dict` (the converter `load_lora_weights` runs); kohya files also with their alphas folded
(`lora_weights(path, fold_alphas=True)`, SD/SDXL's path). Every converted module must be a real nn.Linear with
matching LoRA shapes, and a random probe `B @ (A @ x)` must equal the rows of `scale * up @ (down @ x)` of its source
module: that checks the split order of fused qkv / linear1 weights and the alpha scaling at the cost of a
matrix-vector product.

Format markers as diffusers 0.42.1 detects them (FluxLoraLoaderMixin.lora_state_dict, first match wins):
any `.lora_down.weight` -> kohya (sd-scripts, ComfyUI `diffusion_model.`, `lora_transformer_` mixture); any
`processor` -> XLabs; any `query_norm.scale` -> BFL control LoRA; any `base_model` -> fal Kontext; anything else
is taken as diffusers/peft (ai-toolkit's `transformer.` keys) with `.alpha` keys popped as network alphas.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from runner.engines.local import lora_weights
from runner.families import FAMILIES

D, MLP, DOUBLE, SINGLE, RANK = 3072, 12288, 19, 38, 2
FLUX_DEV = dict(  # black-forest-labs/FLUX.1-dev transformer/config.json
    patch_size=1,
    in_channels=64,
    num_layers=DOUBLE,
    num_single_layers=SINGLE,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)


@dataclass(frozen=True)
class Source:
    """One LoRA'd Linear of a third-party layout and the diffusers modules its output rows go to, in order."""

    name: str  # the layout's own module name, e.g. BFL's "double_blocks.3.img_attn.qkv"
    fan_in: int
    targets: tuple[tuple[str, int], ...]  # (diffusers module, rows of fan_out)
    swap: bool = False  # final_layer.adaLN_modulation.1: BFL (shift, scale) is diffusers' norm_out (scale, shift)

    @property
    def fan_out(self) -> int:
        return sum(rows for _, rows in self.targets)


def _t(*names: str, rows: int = D) -> tuple[tuple[str, int], ...]:
    return tuple((n, rows) for n in names)


# BFL's (original Flux) module names inside a block -> fan_in, the diffusers modules (kohya's names: `.` -> `_`)
DOUBLE_BLOCK = {
    "img_mod.lin": (D, _t("norm1.linear", rows=6 * D)),
    "img_attn.qkv": (D, _t("attn.to_q", "attn.to_k", "attn.to_v")),
    "img_attn.proj": (D, _t("attn.to_out.0")),
    "img_mlp.0": (D, _t("ff.net.0.proj", rows=MLP)),
    "img_mlp.2": (MLP, _t("ff.net.2")),
    "txt_mod.lin": (D, _t("norm1_context.linear", rows=6 * D)),
    "txt_attn.qkv": (D, _t("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    "txt_attn.proj": (D, _t("attn.to_add_out")),
    "txt_mlp.0": (D, _t("ff_context.net.0.proj", rows=MLP)),
    "txt_mlp.2": (MLP, _t("ff_context.net.2")),
}
SINGLE_BLOCK = {
    "linear1": (D, _t("attn.to_q", "attn.to_k", "attn.to_v") + (("proj_mlp", MLP),)),
    "linear2": (D + MLP, _t("proj_out")),
    "modulation.lin": (D, _t("norm.linear", rows=3 * D)),
}
OUTER = {  # outside the blocks: (fan_in, diffusers module, rows)
    "time_in.in_layer": (256, "time_text_embed.timestep_embedder.linear_1", D),
    "time_in.out_layer": (D, "time_text_embed.timestep_embedder.linear_2", D),
    "vector_in.in_layer": (768, "time_text_embed.text_embedder.linear_1", D),
    "vector_in.out_layer": (D, "time_text_embed.text_embedder.linear_2", D),
    "guidance_in.in_layer": (256, "time_text_embed.guidance_embedder.linear_1", D),
    "guidance_in.out_layer": (D, "time_text_embed.guidance_embedder.linear_2", D),
    "txt_in": (4096, "context_embedder", D),
    "img_in": (64, "x_embedder", D),
    "final_layer.linear": (D, "proj_out", 64),
    "final_layer.adaLN_modulation.1": (D, "norm_out.linear", 2 * D),
}
# XLabs (x-flux) LoRA processors: DoubleStreamBlockLoraProcessor / SingleStreamBlockLoraProcessor
XLABS_DOUBLE = {
    "processor.qkv_lora1": (D, _t("attn.to_q", "attn.to_k", "attn.to_v")),
    "processor.proj_lora1": (D, _t("attn.to_out.0")),
    "processor.qkv_lora2": (D, _t("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    "processor.proj_lora2": (D, _t("attn.to_add_out")),
}
XLABS_SINGLE = {
    "processor.qkv_lora": (D, _t("attn.to_q", "attn.to_k", "attn.to_v")),  # adds to linear1's qkv rows only
    "processor.proj_lora": (D + MLP, _t("proj_out")),  # 15360 -> 3072, like linear2
}
CLIP_MODULES = {"self_attn.q_proj": (768, 768), "self_attn.k_proj": (768, 768), "self_attn.v_proj": (768, 768)}
CLIP_MODULES |= {"self_attn.out_proj": (768, 768), "mlp.fc1": (768, 3072), "mlp.fc2": (3072, 768)}


def block_sources(double: dict = DOUBLE_BLOCK, single: dict = SINGLE_BLOCK, outer: bool = False) -> list[Source]:
    """Every LoRA'd Linear of the 19 double and 38 single blocks (and with `outer` the embedders and final layer)."""
    sources = [
        Source(f"double_blocks.{i}.{name}", fan_in, tuple((f"transformer_blocks.{i}.{m}", r) for m, r in targets))
        for i in range(DOUBLE)
        for name, (fan_in, targets) in double.items()
    ]
    sources += [
        Source(f"single_blocks.{i}.{name}", fan_in, tuple((f"single_transformer_blocks.{i}.{m}", r) for m, r in targets))
        for i in range(SINGLE)
        for name, (fan_in, targets) in single.items()
    ]
    if outer:
        sources += [
            Source(name, fan_in, ((module, rows),), swap=name.startswith("final_layer.adaLN"))
            for name, (fan_in, module, rows) in OUTER.items()
        ]
    return sources


class Weights:
    """The tensors written for each source module, and the delta they stand for (scale * up @ down [+ bias])."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self.tensors: dict[str, torch.Tensor] = {}
        self.delta: dict[Source, tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]] = {}

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator)

    def add(self, source: Source, down_key: str, up_key: str, *, alpha: float | None = None, bias_key: str | None = None, rank=RANK):
        down, up = self.randn(rank, source.fan_in), self.randn(source.fan_out, rank)
        self.tensors |= {down_key: down, up_key: up}
        bias = None
        if bias_key is not None:
            bias = self.tensors[bias_key] = self.randn(source.fan_out)
        self.delta[source] = (down, up, 1.0 if alpha is None else alpha / rank, bias)

    def write(self, path: Path) -> Path:
        save_file(self.tensors, str(path))
        return path


def kohya_name(source_name: str) -> str:
    return "lora_unet_" + source_name.replace(".", "_")


ALPHAS = (2.0, 1.0, 16.0, 0.5)  # with rank 2: scales 1, 1/2, 8, 1/4 (powers of two: folding stays exact)


def kohya_weights(sources: list[Source], *, te_layers: tuple[int, ...] = (), split_qkv_block: int | None = 0) -> Weights:
    """An sd-scripts (networks/lora_flux.py) Flux LoRA: `lora_unet_<BFL name, . -> _>` and `lora_te1_text_model_...`
    with lora_down / lora_up / alpha, alphas varying per module. `split_qkv_block`: that double block's img_attn_qkv
    is saved as sd-scripts' split_qkv=True writes it (down [3r, in], up block-diagonal [3 * 3072, 3r])."""
    weights = Weights()
    for n, source in enumerate(sources):
        base, alpha = kohya_name(source.name), ALPHAS[n % len(ALPHAS)]
        if source.name == f"double_blocks.{split_qkv_block}.img_attn.qkv":
            downs, ups = [weights.randn(RANK, D) for _ in range(3)], [weights.randn(D, RANK) for _ in range(3)]
            down, up = torch.cat(downs), torch.block_diag(*ups)
            weights.tensors |= {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up}
            weights.delta[source] = (down, up, alpha / (3 * RANK), None)  # the saved rank is 3r (as sd-scripts reloads it)
        else:
            weights.add(source, f"{base}.lora_down.weight", f"{base}.lora_up.weight", alpha=alpha)
        weights.tensors[f"{base}.alpha"] = torch.tensor(alpha)
    for i in te_layers:
        for n, (module, (fan_in, fan_out)) in enumerate(CLIP_MODULES.items()):
            base, alpha = f"lora_te1_text_model_encoder_layers_{i}_{module.replace('.', '_')}", ALPHAS[n % len(ALPHAS)]
            source = Source(f"text_model.encoder.layers.{i}.{module}", fan_in, ((f"{CLIP_ROOT}encoder.layers.{i}.{module}", fan_out),))
            weights.add(source, f"{base}.lora_down.weight", f"{base}.lora_up.weight", alpha=alpha)
            weights.tensors[f"{base}.alpha"] = torch.tensor(alpha)
    return weights


def runner_input(path: Path) -> str | dict[str, torch.Tensor]:
    """What the runner hands load_lora_weights for a Flux.1 LoRA file."""
    return lora_weights(path, FAMILIES["flux"].fold_lora_alphas)


def folded(path: Path) -> str | dict[str, torch.Tensor]:
    """The file with its kohya alphas folded into the up weights (the SD/SDXL families' path)."""
    return lora_weights(path, fold_alphas=True)


def convert(pretrained: str | dict) -> tuple[dict[str, torch.Tensor], dict | None]:
    """FluxPipeline.lora_state_dict as load_lora_weights calls it: (state dict, network alphas)."""
    if isinstance(pretrained, dict):
        pretrained = dict(pretrained)  # load_lora_weights copies a dict too: some converters pop from it
    return FluxPipeline.lora_state_dict(pretrained, return_alphas=True)


def lora_modules(state_dict: dict, prefix: str) -> set[str]:
    return {k.removeprefix(prefix).split(".lora_")[0] for k in state_dict if k.startswith(prefix) and ".lora_" in k}


def check_against(converted: dict, weights: Weights, linears: dict[str, torch.nn.Linear], prefix: str, skip_values=()) -> set[str]:
    """Every converted `<prefix><module>.lora_A/B` names a real nn.Linear with LoRA shapes [r, in] / [out, r], exactly
    the modules the file covered are converted, and each module's B @ (A @ x) (+ B's bias) is its rows of the source's
    scale * up @ (down @ x) (+ bias), but for the sources named in `skip_values`. Returns the converted modules."""
    modules = lora_modules(converted, prefix)
    expected = {module for source in weights.delta for module, _ in source.targets}
    assert modules == expected, f"missing {sorted(expected - modules)[:5]}, unexpected {sorted(modules - expected)[:5]}"
    for module in modules:
        linear = linears.get(module)
        assert isinstance(linear, torch.nn.Linear), f"{module} is not an nn.Linear of the real model"
        a, b = converted[f"{prefix}{module}.lora_A.weight"], converted[f"{prefix}{module}.lora_B.weight"]
        assert a.shape == (b.shape[1], linear.in_features) and b.shape == (linear.out_features, a.shape[0]), module
    for source, (down, up, scale, bias) in weights.delta.items():
        if source.name in skip_values:
            continue
        x = torch.randn(source.fan_in, generator=torch.Generator().manual_seed(1))
        full = scale * (up.float() @ (down.float() @ x)) + (0 if bias is None else bias)
        if source.swap:
            full = torch.cat(full.chunk(2)[::-1])
        for (module, _), rows in zip(source.targets, full.split([r for _, r in source.targets])):
            a, b = converted[f"{prefix}{module}.lora_A.weight"], converted[f"{prefix}{module}.lora_B.weight"]
            got = b.float() @ (a.float() @ x) + converted.get(f"{prefix}{module}.lora_B.bias", 0)
            torch.testing.assert_close(got, rows, rtol=1e-5, atol=1e-4, msg=f"{source.name} -> {module}")
    return modules


def meta_flux() -> FluxTransformer2DModel:
    with torch.device("meta"):
        return FluxTransformer2DModel(**FLUX_DEV)


def meta_clip() -> CLIPTextModel:
    with torch.device("meta"):
        return CLIPTextModel(CLIPTextConfig(**CLIP_L))


CLIP_ROOT = "text_model." if hasattr(meta_clip(), "text_model") else ""  # transformers 5 flattened CLIPTextModel


def flux_pipeline(transformer: FluxTransformer2DModel, text_encoder: CLIPTextModel | None = None) -> FluxPipeline:
    """A FluxPipeline holding only the (meta) models LoRAs load into."""
    parts = dict(scheduler=None, vae=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    return FluxPipeline(transformer=transformer, text_encoder=text_encoder, **parts)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Matrix-vector probes on tall rank-2 factors are ~15x slower with 2 threads fighting over 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def flux_linears() -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in meta_flux().named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.fixture(scope="module")
def clip_linears() -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in meta_clip().named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.fixture(scope="module")
def kohya_file(tmp_path_factory) -> tuple[Path, Weights]:
    """A full sd-scripts Flux LoRA (all 19 + 38 blocks, CLIP-L's 12 layers), ~40 MB at rank 2."""
    weights = kohya_weights(block_sources(), te_layers=tuple(range(12)))
    return weights.write(tmp_path_factory.mktemp("kohya") / "kohya_flux.safetensors"), weights


@pytest.fixture
def diffusers_warnings():
    """diffusers' warnings while the test runs (the runner sets diffusers' verbosity to error, hiding them)."""
    import diffusers

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    handler, verbosity = Collect(), diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_warning()
    logging.getLogger("diffusers").addHandler(handler)
    yield handler.messages
    logging.getLogger("diffusers").removeHandler(handler)
    diffusers.utils.logging.set_verbosity(verbosity)


def split_transformer_and_te(converted: dict) -> tuple[dict, dict]:
    other = [k for k in converted if not k.startswith(("transformer.", "text_encoder."))]
    assert not other, f"keys load_lora_weights would drop: {other[:5]}"
    return {k: v for k, v in converted.items() if k.startswith("transformer.")}, {
        k: v for k, v in converted.items() if k.startswith("text_encoder.")
    }


def clip_state_dict(te_converted: dict) -> dict:
    """The text-encoder part as diffusers' _load_lora_into_text_encoder hands it to peft (names on the CLIPTextModel)."""
    state_dict = {k.removeprefix("text_encoder."): v for k, v in te_converted.items()}
    state_dict = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state_dict))
    return {CLIP_ROOT + k.removeprefix("text_model."): v for k, v in state_dict.items()}


def test_kohya_flux_file_maps_every_module_at_real_shapes(kohya_file, flux_linears, clip_linears):
    """A full sd-scripts Flux LoRA, as the runner hands it over and with its alphas folded, through the kohya
    converter, lands on exactly the 494 diffusers Linears of the blocks and CLIP-L's 72 projections, each with its
    alpha/rank scale and the fused qkv / linear1 (incl. a split_qkv block-diagonal one) split in q, k, v(, mlp) order."""
    path, weights = kohya_file
    alpha_free = folded(path)
    assert isinstance(alpha_free, dict) and not any(k.endswith(".alpha") for k in alpha_free)
    block_weights, te_weights = Weights(), Weights()
    for source, delta in weights.delta.items():
        (te_weights if source.name.startswith("text_model.") else block_weights).delta[source] = delta
    for pretrained in (runner_input(path), alpha_free):
        converted, alphas = convert(pretrained)
        assert alphas is None, "the kohya converter applies the scale itself"
        transformer, te = split_transformer_and_te(converted)
        assert len(check_against(transformer, block_weights, flux_linears, "transformer.")) == DOUBLE * 14 + SINGLE * 6 == 494
        assert all(k.startswith("text_encoder.text_model.encoder.layers.") for k in te), "the converter keeps `text_model.`"
        assert len(check_against(clip_state_dict(te), te_weights, clip_linears, "")) == 12 * 6


def test_alpha_folding_gives_the_same_conversion_as_the_raw_file(kohya_file):
    """lora_weights' folding (up * alpha/rank, alphas dropped) does not change what the Flux kohya converter makes of
    the file: the converter's default alpha is the rank, so each module's B @ A equals the raw file's."""
    path, _ = kohya_file
    raw, _ = convert(str(path))
    alpha_free, _ = convert(folded(path))
    assert raw.keys() == alpha_free.keys()
    for a_key in (k for k in raw if k.endswith("lora_A.weight")):
        b_key = a_key.replace("lora_A", "lora_B")
        x = torch.randn(raw[a_key].shape[1], generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(alpha_free[b_key] @ (alpha_free[a_key] @ x), raw[b_key] @ (raw[a_key] @ x), rtol=1e-5, atol=1e-4)


def test_comfyui_prefixed_kohya_file_converts_like_sd_scripts(tmp_path, flux_linears):
    """ComfyUI's kohya variant (`diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight`, dotted names) is
    renamed to `lora_unet_...` by the converter and maps the same way, folded or not."""
    sources = [s for s in block_sources() if s.name.startswith(("double_blocks.0.", "single_blocks.37."))]
    weights = Weights()
    for source, alpha in zip(sources, ALPHAS * 4):
        weights.add(source, f"diffusion_model.{source.name}.lora_down.weight", f"diffusion_model.{source.name}.lora_up.weight", alpha=alpha)
        weights.tensors[f"diffusion_model.{source.name}.alpha"] = torch.tensor(alpha)
    path = weights.write(tmp_path / "comfy.safetensors")
    for pretrained in (runner_input(path), folded(path)):
        converted, _ = convert(pretrained)
        assert len(check_against(converted, weights, flux_linears, "transformer.")) == 14 + 6


def test_kohya_embedder_and_final_layer_keys_lose_the_transformer_prefix(tmp_path, flux_linears):
    """Documents a diffusers 0.42.1 gap: kohya's `lora_unet_img_in/txt_in/time_in/vector_in/guidance_in/final_layer`
    convert to the right Linears but without the `transformer.` prefix, so load_lora_weights silently drops them
    (no error, no warning); only the block modules load. Also: the converter ignores the final_layer modules'
    alphas (their B @ A is unscaled), which alpha folding would make right."""
    sources = [s for s in block_sources(outer=True) if not s.name.startswith(("double_blocks", "single_blocks"))]
    weights = kohya_weights(sources)
    path = weights.write(tmp_path / "outer.safetensors")
    converted, _ = convert(folded(path))
    assert not any(k.startswith("transformer.") for k in converted)
    assert check_against(converted, weights, flux_linears, "") == {module for s in sources for module, _ in s.targets}
    raw, _ = convert(runner_input(path))
    assert raw.keys() == converted.keys()
    final = [s for s in sources if s.name.startswith("final_layer.")]
    check_against(raw, weights, flux_linears, "", skip_values={s.name for s in final})  # the others get their alpha
    unscaled = Weights()
    unscaled.delta = {s: (down, up, 1.0, bias) for s, (down, up, _, bias) in weights.delta.items() if s in final}
    assert {weights.delta[s][2] for s in final} == {1.0, 0.5}, "one of them has alpha != rank"
    check_against({k: v for k, v in raw.items() if k.startswith(("proj_out.", "norm_out."))}, unscaled, flux_linears, "")


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_xlabs_file_maps_every_processor(tmp_path, flux_linears, prefix):
    """An XLabs (x-flux) LoRA, `double_blocks.N.processor.qkv_lora1.down.weight` ... with or without ComfyUI's
    `diffusion_model.` prefix, no alphas: lora_weights passes the file through, the XLabs converter fills to_q/k/v
    (and add_q/k/v) from the fused qkv and to_out / to_add_out / proj_out, 19 * 8 + 38 * 4 modules."""
    weights = Weights()
    for source in block_sources(XLABS_DOUBLE, XLABS_SINGLE):
        weights.add(source, f"{prefix}{source.name}.down.weight", f"{prefix}{source.name}.up.weight")
    path = weights.write(tmp_path / "xlabs.safetensors")
    assert folded(path) == runner_input(path) == str(path), "no lora_down / alpha: always passed as the file"
    converted, alphas = convert(runner_input(path))
    assert alphas is None
    assert len(check_against(converted, weights, flux_linears, "transformer.")) == DOUBLE * 8 + SINGLE * 4


def bfl_control_weights(rank: int = RANK) -> Weights:
    """A BFL control LoRA (flux's LinearLora on every Linear, lora_B with a bias, plus trained q/k norm scales), as
    FLUX.1-Canny/Depth-dev-lora are saved (theirs has img_in at 128 inputs; 64 here, the dev model's)."""
    weights = Weights()
    for source in block_sources(outer=True):
        weights.add(
            source, f"{source.name}.lora_A.weight", f"{source.name}.lora_B.weight", bias_key=f"{source.name}.lora_B.bias", rank=rank
        )
    norms = [f"double_blocks.{i}.{s}_attn.norm.{q}_norm.scale" for i in range(DOUBLE) for s in ("img", "txt") for q in ("query", "key")]
    norms += [f"single_blocks.{i}.norm.{q}_norm.scale" for i in range(SINGLE) for q in ("query", "key")]
    weights.tensors |= {name: weights.randn(128) for name in norms}
    return weights


@pytest.fixture(scope="module")
def bfl_control(tmp_path_factory) -> tuple[Path, Weights, dict, dict | None]:
    """A full BFL control LoRA file, and what lora_state_dict makes of it."""
    weights = bfl_control_weights()
    path = weights.write(tmp_path_factory.mktemp("bfl") / "bfl_control.safetensors")
    return (path, weights, *convert(runner_input(path)))


ADALN = "final_layer.adaLN_modulation.1"


def test_bfl_control_lora_maps_every_module_and_norm(bfl_control, flux_linears):
    """A BFL control LoRA (`double_blocks.N.img_attn.qkv.lora_A.weight`, `...query_norm.scale`, no prefix) converts
    to all 504 Linears (blocks + embedders + final layer, lora_B biases kept and split) and the 152 q/k RMSNorm
    weights, with no network alphas (norm_out.linear's values: see the next test)."""
    path, weights, converted, alphas = bfl_control
    assert folded(path) == runner_input(path) == str(path), "no lora_down / alpha: always passed as the file"
    assert alphas is None
    modules = check_against(converted, weights, flux_linears, "transformer.", skip_values={ADALN})
    assert len(modules) == 494 + len(OUTER)
    for module in modules:
        assert converted[f"transformer.{module}.lora_B.bias"].shape == (flux_linears[module].out_features,)
    norms = {k for k in converted if ".lora_" not in k}
    meta = meta_flux()
    assert len(norms) == DOUBLE * 4 + SINGLE * 2
    for key in norms:
        assert key.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")), key
        assert meta.get_parameter(key.removeprefix("transformer.")).shape == converted[key].shape == (128,)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="diffusers 0.42.1 swap_scale_shift()s lora_A's rows too")
def test_bfl_control_norm_out_keeps_the_rank_order(bfl_control, flux_linears):
    """final_layer.adaLN_modulation.1 -> norm_out.linear must swap the (shift, scale) halves of the output rows only.
    _convert_bfl_flux_control_lora_to_diffusers applies swap_scale_shift to lora_A as well, permuting its rank rows
    against lora_B's columns: the delta is wrong for any rank > 1 (and rank 1 crashes, see below)."""
    _, weights, converted, _ = bfl_control
    only = Weights()
    only.delta = {s: d for s, d in weights.delta.items() if s.name == ADALN}
    check_against({k: v for k, v in converted.items() if ".norm_out." in k}, only, flux_linears, "transformer.")


def test_bfl_control_lora_of_rank_1_crashes_the_converter(tmp_path):
    """Documents: a rank-1 BFL control LoRA raises ValueError in swap_scale_shift (lora_A [1, 3072] has no two halves)."""
    weights = bfl_control_weights(rank=1)
    with pytest.raises(ValueError, match="not enough values to unpack"):
        convert(runner_input(weights.write(tmp_path / "bfl_rank1.safetensors")))


def test_bfl_style_diffusion_model_lora_is_not_converted_and_loads_nothing(tmp_path, diffusers_warnings):
    """Documents a diffusers 0.42.1 gap: an original-layout LoRA with peft names and ComfyUI's prefix
    (`diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`, no norm scales) matches no Flux.1 converter, is
    returned unconverted, and load_lora_weights then loads no adapter at all, only logging two "No LoRA keys"
    warnings; the first error comes when the adapter is set."""
    weights = Weights()
    for source in block_sources():
        if source.name.startswith(("double_blocks.0.", "single_blocks.0.")):
            weights.add(source, f"diffusion_model.{source.name}.lora_A.weight", f"diffusion_model.{source.name}.lora_B.weight")
    path = weights.write(tmp_path / "bfl_peft.safetensors")
    converted, alphas = convert(runner_input(path))
    assert converted.keys() == weights.tensors.keys() and alphas == {}
    transformer = meta_flux()
    pipe = flux_pipeline(transformer)
    pipe.load_lora_weights(runner_input(path), adapter_name="bfl")  # no error
    assert getattr(transformer, "peft_config", None) is None, "no adapter was made"
    with pytest.raises(ValueError, match="not in the list of present adapters"):
        pipe.set_adapters(["bfl"], [1.0])  # the first loud failure comes when the adapter is used
    assert any("No LoRA keys associated to FluxTransformer2DModel" in m for m in diffusers_warnings)


def test_ai_toolkit_diffusers_keys_pass_through(tmp_path, flux_linears):
    """ai-toolkit's Flux LoRAs already use diffusers names (`transformer.single_transformer_blocks.0.attn.to_q.lora_A
    .weight`): no converter runs, the keys pass unchanged, the network alphas are empty."""
    weights = Weights()
    for source in block_sources():
        if source.name.split(".")[1] in ("0", "18", "37"):
            for module, rows in source.targets:
                target = Source(module, source.fan_in, ((module, rows),))
                weights.add(target, f"transformer.{module}.lora_A.weight", f"transformer.{module}.lora_B.weight")
    path = weights.write(tmp_path / "ai_toolkit.safetensors")
    converted, alphas = convert(runner_input(path))
    assert converted.keys() == weights.tensors.keys() and alphas == {}
    assert len(check_against(converted, weights, flux_linears, "transformer.")) == 2 * 14 + 3 * 6


def test_kohya_mixture_file_converts_but_not_with_its_alphas_folded(tmp_path, flux_linears):
    """kohya naming on diffusers modules (`lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight`, the
    "mixture" branch) converts from the file the runner passes, but alpha folding (alphas removed) would make
    diffusers' _convert_mixture_state_dict_to_diffusers raise KeyError('<module>.alpha'): Flux.1 must not fold."""
    weights = Weights()
    for block, module in (
        ("transformer_blocks.0", "attn.to_q"),
        ("transformer_blocks.0", "attn.add_k_proj"),
        ("single_transformer_blocks.5", "attn.to_v"),
    ):
        name = f"lora_transformer_{block}_{module}".replace(".", "_")
        weights.add(Source(name, D, ((f"{block}.{module}", D),)), f"{name}.lora_down.weight", f"{name}.lora_up.weight", alpha=1.0)
        weights.tensors[f"{name}.alpha"] = torch.tensor(1.0)
    path = weights.write(tmp_path / "mixture.safetensors")
    raw, _ = convert(runner_input(path))
    assert len(check_against(raw, weights, flux_linears, "transformer.")) == 3
    with pytest.raises(KeyError, match=r"\.alpha"):
        convert(folded(path))


@pytest.mark.parametrize(
    "bad",
    [
        "lora_unet_double_blocks_19_img_attn_proj",  # a 20th double block: a LoRA for another model
        "lora_unet_double_blocks_0_img_attn_norm_query_norm",  # not a Linear the converter knows
        "lora_unet_single_blocks_0_linear3",  # a typo / unknown module
    ],
)
def test_kohya_file_with_an_unmappable_key_raises(tmp_path, bad):
    """A kohya Flux file with a `lora_unet_` module the converter cannot map raises ValueError("Incompatible keys
    detected: ...") naming it, folded or not; nothing is loaded silently."""
    weights = kohya_weights([s for s in block_sources() if s.name.startswith("double_blocks.0.")], split_qkv_block=None)
    weights.tensors |= {f"{bad}.lora_down.weight": torch.zeros(RANK, 128), f"{bad}.lora_up.weight": torch.zeros(128, RANK)}
    weights.tensors[f"{bad}.alpha"] = torch.tensor(1.0)
    path = weights.write(tmp_path / "bad.safetensors")
    for pretrained in (runner_input(path), folded(path)):
        with pytest.raises(ValueError, match=f"(?s)Incompatible keys detected.*{bad}"):
            convert(pretrained)


def test_kohya_t5_keys_are_dropped_without_a_word(tmp_path, flux_linears, diffusers_warnings):
    """Documents: sd-scripts' T5 LoRA keys (`lora_te2_encoder_block_0_layer_0_SelfAttention_q`, --train_t5xxl) are
    filtered out before conversion with no error and no warning; the rest of the file converts."""
    weights = kohya_weights([s for s in block_sources() if s.name.startswith("single_blocks.3.")])
    t5 = "lora_te2_encoder_block_0_layer_0_SelfAttention_q"
    weights.tensors |= {f"{t5}.lora_down.weight": torch.ones(RANK, 4096), f"{t5}.lora_up.weight": torch.ones(4096, RANK)}
    weights.tensors[f"{t5}.alpha"] = torch.tensor(1.0)
    converted, _ = convert(runner_input(weights.write(tmp_path / "t5.safetensors")))
    assert len(check_against(converted, weights, flux_linears, "transformer.")) == 6
    assert not any("te2" in k or "t5" in k.lower() for k in converted)
    assert not diffusers_warnings


def test_kohya_file_loads_as_a_peft_adapter_on_the_meta_model(tmp_path, diffusers_warnings):
    """The runner's call, pipe.load_lora_weights(lora_weights(path, ...), adapter_name=...), on a FluxPipeline of the
    meta transformer and meta CLIP-L, for a kohya file on the first and last blocks, the embedders and CLIP's first and
    last layers: peft wraps exactly the blocks' converted Linears and CLIP's projections (transformers 5's flattened
    names), with the converted ranks and scale 1 (the converter scales the weights); the embedders get no adapter,
    and diffusers says nothing about them (a warnings-based check in the runner cannot see this drop).
    Adapter weights stay on meta, like their base layers, so values are checked by the conversion tests, not here."""
    from peft.tuners.lora import LoraLayer

    ends = ("double_blocks.0.", "double_blocks.18.", "single_blocks.0.", "single_blocks.37.", "img_in", "txt_in")
    weights = kohya_weights([s for s in block_sources(outer=True) if s.name.startswith(ends)], te_layers=(0, 11))
    path = weights.write(tmp_path / "kohya_ends.safetensors")
    transformer, clip = meta_flux(), meta_clip()
    flux_pipeline(transformer, clip).load_lora_weights(runner_input(path), adapter_name="kohya")
    wrapped = {name: m for name, m in transformer.named_modules() if isinstance(m, LoraLayer)}
    blocks = {module for s in weights.delta if s.name.startswith(ends[:4]) for module, _ in s.targets}
    assert set(wrapped) == blocks and len(blocks) == 2 * 14 + 2 * 6, "x_embedder / context_embedder are not wrapped"
    assert not diffusers_warnings
    assert wrapped["transformer_blocks.0.attn.to_q"].lora_A["kohya"].weight.shape == (RANK, D), "split_qkv block: r per split"
    assert wrapped["single_transformer_blocks.37.proj_mlp"].lora_B["kohya"].weight.shape == (MLP, RANK)
    assert {m.scaling["kohya"] for m in wrapped.values()} == {1.0}
    te_wrapped = {name for name, m in clip.named_modules() if isinstance(m, LoraLayer)}
    assert te_wrapped == {f"{CLIP_ROOT}encoder.layers.{i}.{m}" for i in (0, 11) for m in CLIP_MODULES}


def test_lycoris_names_map_every_bfl_module_at_real_shapes():
    """LyCORIS files are not converted by diffusers: runner/engines/deltas.py maps their kohya BFL names itself, from the
    model's own layers. On the real-config Flux.1-dev (meta device), every module of the 19 double and 38 single blocks
    and the outer layers maps to its diffusers layers in order, the rows adding up to the source's fan-out; the final
    modulation's halves swapped (BFL's shift, scale is diffusers' scale, shift)."""
    from runner.engines.deltas import layer_names

    pipe = flux_pipeline(meta_flux(), meta_clip())
    names = layer_names(pipe, "transformer")
    layers = dict(pipe.transformer.named_modules())
    for source in block_sources(outer=True):
        target = names.get(kohya_name(source.name))
        assert target is not None, source.name
        assert target.component == "transformer"
        if source.swap:
            layer = layers[source.targets[0][0]]
            assert [(p[0], p[1]) for p in target.pieces] == [(layer, slice(D, None)), (layer, slice(0, D))]
            continue
        assert [p[0] for p in target.pieces] == [layers[m] for m, _ in source.targets], source.name
        assert [p[0].weight[p[1]].shape for p in target.pieces] == [(rows, source.fan_in) for _, rows in source.targets], source.name
        assert names.get("diffusion_model." + source.name) == target  # ai-toolkit's / ComfyUI's dotted BFL names
    assert names["lora_te1_text_model_encoder_layers_11_mlp_fc2"].component == "text_encoder"
