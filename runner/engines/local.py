"""The local engine: diffusers + peft on this machine's GPU or CPU.

One flow, as a diffusers user would write it by hand, minus the waste: the pipeline is loaded
once, each LoRA once as a named adapter (adapter name = LoRA id), rows are grouped so that blend
switches are few, prompt embeddings are computed once per prompt, and a seed group (rows equal but
for the seed) runs as batches with one CPU generator per image (so an image does not depend on the
batch it fell in).

The fast path (each part a switch in conf/engine/local.yaml): each blend fused into the base
weights for its plan group (runner/engines/fuse.py) instead of peft's per-step adapter path (on
every device); on CUDA also bfloat16, channels-last UNet and VAE, the batch picked from free GPU
memory; optional torch.compile. The VAE decode and the conversion to 8-bit happen on the GPU, and a batch's
pixels are copied back while the next batch is already queued, so the GPU does not wait for Python.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from runner.checkpoints import PART_NAMES, lora_info, lora_module, lora_parts, lycoris_kind
from runner.engines.base import ImageResult, QueueState
from runner.engines.fuse import FusedBlends
from runner.families import FAMILIES, Family
from runner.prompts.syntax import CHUNK, has_weights, may_be_long, plain_text, token_count
from runner.registry import Registry, safetensors_keys, weight_variants
from runner.request import optional, split_loras, split_strengths
from runner.schedulers import OPTION_FIELDS, load_scheduler, supports_option

log = logging.getLogger(__name__)

# Rows sharing these values run with one pipeline setting; the seeds among them are batched.
SEED_GROUP_KEYS = [
    "model_id",
    "lora_model",
    "lora_strength",
    "scheduler_used",
    "use_karras_sigmas",
    "algorithm_type",
    "width",
    "height",
    "prompt",
    "negative_prompt",
    "clip_skip",
    "num_inference_steps",
    "guidance_scale",
    "vae",
    "embeddings_model",
    "pipeline_used",
    "upscale",
    "true_cfg_scale",
    "max_sequence_length",
    "shift",
    "prompt_weighting",
    "lora_strength_te",
]


def pick_device(device: str) -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on GPUs that have it (no float16 overflow in VAEs, same speed), float16 on other GPUs and MPS, float32 on CPU."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device.type == "mps" else torch.float32


def on_for_cuda(setting: Any, device: torch.device) -> bool:
    """A fast-path switch: true/false as given, auto = on for CUDA."""
    if isinstance(setting, str) and setting.strip().lower() == "auto":
        return device.type == "cuda"
    return bool(setting)


AUTO_BATCH_CPU = 4  # batch_size: auto on CPU (no memory to measure; larger batches barely help there)
AUTO_BATCH_HEADROOM = 0.85  # share of free GPU memory batch_size: auto plans to use


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def lora_weights(path: Path, fold_alphas: bool = True) -> str | dict[str, torch.Tensor]:
    """What load_lora_weights gets: the file, or for kohya/A1111 files their tensors with each `.alpha` folded in.

    diffusers 0.42 with transformers 5 drops the alphas of SD/SDXL text-encoder (`lora_te_*`) modules
    (its alpha keys keep a `text_model.` prefix the flattened CLIPTextModel no longer has), so those
    modules would get the wrong scale. up * alpha/rank with no alpha is the same LoRA for every module.
    The families whose converters read the alphas themselves (Flux's kohya, ...) get the file (`fold_alphas`).
    """
    from safetensors.torch import load_file

    keys = safetensors_keys(path) if fold_alphas and path.suffix == ".safetensors" else []
    if not any(k.endswith(".alpha") for k in keys) or not any(".lora_down." in k for k in keys):
        return str(path)
    tensors = load_file(str(path))
    folded = {}
    for key, value in tensors.items():
        if key.endswith(".alpha"):
            continue
        if ".lora_up." in key:
            module = key.split(".lora_up.")[0]
            alpha, down = tensors.get(f"{module}.alpha"), tensors.get(f"{module}.lora_down.weight")
            if alpha is not None and down is not None:
                value = value * (float(alpha) / down.shape[0])
        folded[key] = value
    return folded


LATENT_DECODE = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")  # pipelines whose VAE decode runs here

# engine.quantize: diffusers' PipelineQuantizationConfig backend and its arguments, for the denoiser (CUDA only)
QUANTIZE = {
    "bnb-4bit": ("bitsandbytes_4bit", {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "compute"}),
    "bnb-8bit": ("bitsandbytes_8bit", {"load_in_8bit": True}),
    "torchao-int8": ("torchao", {"quant_type": "int8wo"}),
}
OFFLOAD = ("none", "model", "sequential")  # engine.offload: diffusers' enable_model_cpu_offload / enable_sequential_cpu_offload


def decode_latents(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """The pipeline's own VAE decode of output_type="latent" (SD and SDXL, diffusers 0.42), images in [-1, 1]."""
    vae = pipe.vae
    sdxl = type(pipe).__name__ == "StableDiffusionXLPipeline"
    upcast = sdxl and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)  # SDXL's VAE overflows in fp16
    if upcast:
        vae.to(torch.float32)
        latents = latents.to(torch.float32)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if sdxl and mean is not None and std is not None:
        mean_t = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        std_t = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std_t / vae.config.scaling_factor + mean_t
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    if sdxl and getattr(pipe, "watermark", None) is not None:
        image = pipe.watermark.apply_watermark(image)
    if upcast:
        vae.to(torch.float16)
    return image


def dequantize_stray_gguf(model: torch.nn.Module, dtype: torch.dtype) -> list[str]:
    """GGUF tensors that diffusers leaves as packed bytes outside its GGUFLinear layers, dequantized once.

    diffusers 0.42 keeps every tensor not stored F32/F16 (BF16 too) as raw bytes and decodes them only in linear
    layers: a BF16 `x_pad_token` of a Z-Image GGUF would reach the forward as uint8 bytes and fail.
    """
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter, dequantize_gguf_tensor

    fixed = []
    for module_name, module in model.named_modules():
        if isinstance(module, GGUFLinear):
            continue
        for name, param in list(module._parameters.items()):
            if isinstance(param, GGUFParameter):
                module._parameters[name] = torch.nn.Parameter(dequantize_gguf_tensor(param).to(dtype), requires_grad=False)
                fixed.append(f"{module_name}.{name}".lstrip("."))
    return fixed


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


class LoraMismatch(ValueError):
    """A LoRA file whose layers this model does not have (all, a part, or some): one line naming file, format and counts."""


def adapter_layers(module: Any, adapter: str) -> int:
    """How many layers of a pipeline component carry the peft adapter `adapter`."""
    if module is None or adapter not in getattr(module, "peft_config", {}):
        return 0
    return sum(1 for layer in module.modules() if adapter in (getattr(layer, "lora_A", None) or {}))


def unexpected_modules(lines: list[str]) -> set[str]:
    """The layers named by peft's "unexpected keys" warnings (diffusers logs them and goes on without those keys)."""
    names = set()
    for line in lines:
        listed = line.split("found in the model:", 1)[-1].split(". Loading adapter")[0]
        names |= {m for key in listed.split(",") if (m := lora_module(key.strip()))}
    return names


@contextlib.contextmanager
def library_warnings() -> Iterator[list[str]]:
    """diffusers' warnings while a LoRA loads, kept instead of printed: keys it could not place mean a LoRA dropped in part."""
    logger = logging.getLogger("diffusers")
    saved = (logger.level, logger.handlers[:], logger.propagate)
    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    logger.handlers, logger.propagate = [Keep()], False
    logger.setLevel(logging.WARNING)
    try:
        yield said
    finally:
        logger.level, logger.handlers, logger.propagate = saved[0], saved[1], saved[2]


def to_pixels(decoded: torch.Tensor, unit: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[-1, 1] NCHW (or [0, 1] with `unit`: a pipeline's own "pt" output) -> (uint8 NHWC, finite flag per image) on the device.

    The same numbers as diffusers' postprocess followed by our rounding, with 4x fewer bytes to copy back."""
    finite = torch.isfinite(decoded).flatten(1).all(dim=1)
    images = (decoded if unit else decoded / 2 + 0.5).clamp(0, 1).float()
    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return pixels, finite


def to_host(pixels: torch.Tensor, finite: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Start copying a batch's pixels to (pinned) host memory without waiting; the event says when they are there."""
    if pixels.device.type != "cuda":
        return pixels.cpu(), finite.cpu(), None
    host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
    host_finite = torch.empty(finite.shape, dtype=finite.dtype, pin_memory=True)
    host.copy_(pixels, non_blocking=True)
    host_finite.copy_(finite, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, host_finite, event


class LaunchThrottle:
    """A denoising-step callback that keeps at most `depth` steps queued on the GPU ahead of Python.

    Unthrottled, the main thread queues kernels until CUDA's launch queue is full and then blocks
    inside a launch holding the GIL, so the writer thread (PNG encoding, MLflow) starves and its
    work ends up serialized with the denoising. Waiting on an event instead releases the GIL.
    """

    def __init__(self, depth: int = 2):
        self.depth = depth
        self.events: deque = deque()

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        event = torch.cuda.Event()
        event.record()
        self.events.append(event)
        while len(self.events) > self.depth:
            self.events.popleft().synchronize()
        return {}


@dataclass
class Launched:
    """A batch queued on the device: its rows and the host tensors its pixels are being copied into."""

    batch: list[dict[str, Any]]
    pixels: torch.Tensor
    finite: torch.Tensor
    event: Any
    started: float
    # how the batch ran, taken when it was queued (the next batch may switch blends or models before it finishes)
    ran_with: dict[str, Any] = field(default_factory=dict)
    _ready: float | None = None

    def ready(self) -> float:
        """Wait for the copy; the time it was done."""
        if self._ready is None:
            if self.event is not None:
                self.event.synchronize()
            self._ready = time.perf_counter()
        return self._ready


@dataclass(frozen=True)
class FastPath:
    """The speed switches of conf/engine/local.yaml, resolved for the device once; fixed for the engine's life."""

    fuse_loras: bool  # each blend written into the base weights for its plan group (fuse.py) instead of peft's per-step path
    channels_last: bool  # NHWC UNet and VAE: cuDNN's fast layout for half precision
    compile: bool  # torch.compile of the UNet and the VAE decoder
    compile_mode: str | None  # torch.compile's mode; None: its default
    cache_prompt_embeddings: bool  # keep every prompt's embeddings while the model is loaded, not only the last group's


@dataclass
class BatchSizes:
    """How many images one pipeline call gets: `batch_size` as configured, or `auto`.

    auto on CUDA measures a 2-image call once per image shape and fits later calls into free memory;
    elsewhere it is AUTO_BATCH_CPU. What was measured outlives a model switch (the shape names its model).
    """

    auto: bool
    size: int  # a fixed batch_size, or auto's size where nothing is measured
    max_size: int  # auto's cap
    measured: dict[tuple, int] = field(default_factory=dict)  # (model, width, height, pipeline, upscale) -> batch found to fit


@dataclass
class LoadedModel:
    """One model's pipeline and the per-seed-group switches made on it (scheduler, VAE, embeddings); a model switch drops it whole."""

    model_id: str
    pipe: Any  # the diffusers pipeline
    family: Family  # runner/families.py: what the request fields mean for it
    variant: str  # the weight variant its weights came from ("fp16") or ""
    quantization: str  # "" or how its denoiser's weights are stored ("gguf:Q8_0", "bnb-4bit"): blends then run unfused
    base_scheduler_config: Any  # each group's scheduler is built from the model's own config
    base_vae: Any  # the model's own VAE, put back for rows without `vae`
    scheduler_key: tuple | None = None  # (name, options) of the scheduler in the pipeline now
    vaes: dict[str, Any] = field(default_factory=dict)  # VAE id -> AutoencoderKL, loaded once per model
    vae_key: str | None = None  # the `vae` in the pipeline now (None: the model's own)
    pipelines: dict[str, Any] = field(default_factory=dict)  # "panorama" / "sag" -> pipeline sharing the loaded components
    # the tokenizers and vocabulary sizes as loaded, to take textual inversions out again: (tokenizer attr, encoder attr, copy, size)
    pristine_text: list[tuple[str, str, Any, int]] = field(default_factory=list)
    inversion_key: str | None = None  # the `embeddings_model` whose tokens are loaded now
    prompt_embeddings: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # see _prompt_embeddings


@dataclass
class Adapters:
    """The LoRAs loaded into the current pipeline as peft adapters (name = LoRA id), and how the current blend runs.

    They live in the loaded model's modules, so a model switch replaces the whole group.
    """

    fuser: FusedBlends | None = None  # writes blends into the loaded model's base weights; None while no model is loaded
    loaded: set[str] = field(default_factory=set)
    in_text_encoder: set[str] = field(default_factory=set)  # those with text-encoder layers: prompt embeddings depend on the blend
    blend: tuple[str, str] | None = None  # the (lora_model, lora_strength) set now; None: the next blend is set in full
    mode: str = "none"  # how the current blend runs: none | fused | unfused


class LocalEngine:
    """diffusers + peft on this machine; the state it keeps is grouped by lifetime.

    For the engine's life: `device`, `dtype`, `fast_path`, `batches` (sizes measured so far), the upscaler.
    For one loaded model: `loaded` (the pipeline and its per-seed-group switches) and `adapters` (its LoRAs), both
    dropped by close() and by every model switch.
    """

    kind = "local"
    state: QueueState | None = None  # no queue of its own to show (the remote engine has one)

    def __init__(
        self,
        *,
        registry: Registry,
        upscaler: dict[str, Any] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | str = "auto",
        max_batch_size: int = 32,
        cache_prompt_embeddings: bool = True,
        fuse_loras: bool | str = "auto",
        channels_last: bool | str = "auto",
        compile: bool = False,
        compile_mode: str | None = None,
        keep_adapters: bool = False,
        offload: str = "none",
        quantize: str = "none",
        **_: Any,
    ):
        self.registry = registry
        self.models, self.loras = registry.models, registry.loras
        self.upscaler_settings = upscaler or {}
        self.device: torch.device = pick_device(device)
        self.dtype: torch.dtype = pick_dtype(dtype, self.device)
        self.fast_path = FastPath(
            # auto: fused on every device (a CPU runs the demo 40% faster fused too); a compiled UNet always runs fused
            fuse_loras=True if str(fuse_loras).strip().lower() == "auto" else bool(fuse_loras),
            channels_last=on_for_cuda(channels_last, self.device),
            compile=bool(compile),
            compile_mode=compile_mode or None,
            cache_prompt_embeddings=bool(cache_prompt_embeddings),
        )
        auto_batch = str(batch_size).strip().lower() == "auto"
        self.batches = BatchSizes(
            auto=auto_batch,
            size=(AUTO_BATCH_CPU if self.device.type != "cuda" else 1) if auto_batch else max(1, int(batch_size)),
            max_size=max(1, int(max_batch_size)),
        )
        # a server or a search keeps every adapter it loaded: its next request or trial likely uses it again
        # (a sweep drops each one after its last group)
        self.keep_adapters = bool(keep_adapters)
        # cards that cannot hold a whole pipeline: components visit the GPU only while they run (CUDA only)
        self.offload = str(offload or "none") if self.device.type == "cuda" else "none"
        if self.offload != str(offload or "none"):
            log.warning("engine.offload=%s needs a CUDA device; running without offload on %s", offload, self.device)
        self.quantize = str(quantize or "none")
        self.loaded: LoadedModel | None = None
        self.adapters = Adapters()
        self._upscaler: Any = None  # the `upscaler:` pipeline, loaded by the first row that asks for it; kept across models
        self._last_ready = 0.0  # when the last batch's pixels reached the host
        self._quiet_libraries()

    @property
    def pipe(self) -> Any:
        """The loaded model's pipeline; None before the first model and after close()."""
        return self.loaded.pipe if self.loaded is not None else None

    # ------------------------------------------------------------ loading

    @staticmethod
    def _quiet_libraries() -> None:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated.*")
        warnings.filterwarnings("ignore", message=".*peft_config.*multiple adapters.*")
        warnings.filterwarnings("ignore", message=".*torchvision.*")
        warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")  # peft, when a finished LoRA is unloaded

    def _load_model(self, model_id: str) -> None:
        if self.loaded is not None and self.loaded.model_id == model_id:
            return
        self.close()
        source = self.models[model_id]
        family = FAMILIES[source.family]
        import diffusers

        pipeline_class = getattr(diffusers, family.pipeline)
        log.info("loading model %s (%s) from %s", model_id, family.label, source.path)
        variant = None
        # SD 1.x folders may list a safety checker; sweeps never load one (the spec's safety_checker is recorded as not applied)
        no_checker = {"safety_checker": None, "requires_safety_checker": False} if family.name == "sd" else {}
        quantization = source.quantization or (self.quantize if self.quantize != "none" else "")
        extra = no_checker | self._quantization_config(family)
        if source.kind == "single_file":  # a whole SD/SDXL pipeline in one file
            pipe = pipeline_class.from_single_file(
                str(source.path), config=str(source.config), local_files_only=True, torch_dtype=self.dtype, **no_checker
            )
        elif source.kind == "transformer_file":  # a DiT's transformer in one file; the other parts from `config:`
            transformer = self._load_transformer_file(source.path, source.config, pipeline_class, family)
            pipe = pipeline_class.from_pretrained(
                str(source.config), transformer=transformer, torch_dtype=self.dtype, local_files_only=True
            )
        else:
            variant = source.variant
            if variant is None and self.dtype == torch.float16 and "fp16" in weight_variants(source.path):
                variant = "fp16"  # half the bytes to read, and the weights the authors meant for float16
            pipe = pipeline_class.from_pretrained(str(source.path), torch_dtype=self.dtype, variant=variant, local_files_only=True, **extra)
        self._place(pipe)
        pipe.set_progress_bar_config(disable=True)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # a sweep repeats the same shapes: pick the fastest convolutions once
        if self.fast_path.channels_last and family.denoiser == "unet":  # NHWC convolutions: cuDNN's fast layout for half precision
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        self.loaded = LoadedModel(
            model_id=model_id,
            pipe=pipe,
            family=family,
            variant=variant or "",
            quantization=quantization,
            base_scheduler_config=pipe.scheduler.config,
            base_vae=pipe.vae,
        )
        patched = [getattr(pipe, family.denoiser)] + [getattr(pipe, e.component, None) for e in family.text_encoders]
        self.adapters = Adapters(fuser=FusedBlends(patched))
        if quantization:
            log.warning("model %s has quantized weights (%s): its LoRAs run unfused (fusing would not be exact)", model_id, quantization)
        if self.fast_path.compile:
            self._compile(pipe)

    def _place(self, pipe: Any) -> None:
        """The whole pipeline on the device, or (engine.offload) each component on it only while it runs:
        `model` moves whole components (the text encoders leave the GPU once the prompt is encoded), `sequential`
        single layers (slowest, least memory)."""
        if self.offload == "model":
            pipe.enable_model_cpu_offload(device=self.device)
        elif self.offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)

    def _quantization_config(self, family: Family) -> dict[str, Any]:
        """engine.quantize for a diffusers folder: the denoiser loaded in 4/8 bit (bitsandbytes) or int8 (torchao)."""
        if self.quantize == "none":
            return {}
        from diffusers.quantizers import PipelineQuantizationConfig

        backend, kwargs = QUANTIZE[self.quantize]
        kwargs = {k: (self.dtype if v == "compute" else v) for k, v in kwargs.items()}
        config = PipelineQuantizationConfig(quant_backend=backend, quant_kwargs=kwargs, components_to_quantize=[family.denoiser])
        return {"quantization_config": config}

    def _load_transformer_file(self, path: Path, config: Path, pipeline_class: Any, family: Family) -> Any:
        """A transformer from one .safetensors (original layout, converted by diffusers) or GGUF file (dequantized per layer)."""
        import diffusers

        component = json.loads((config / "model_index.json").read_text())[family.denoiser]
        transformer_class = getattr(diffusers, component[1])
        options: dict[str, Any] = {"config": str(config), "subfolder": family.denoiser, "local_files_only": True, "torch_dtype": self.dtype}
        if path.suffix != ".gguf":
            return transformer_class.from_single_file(str(path), **options)
        options["quantization_config"] = diffusers.GGUFQuantizationConfig(compute_dtype=self.dtype)
        transformer = transformer_class.from_single_file(str(path), **options)
        if stray := dequantize_stray_gguf(transformer, self.dtype):
            log.info("GGUF tensors outside linear layers dequantized once: %s", ", ".join(stray))
        return transformer

    def _compile(self, pipe: Any) -> None:
        """torch.compile the UNet and the VAE decoder in place (the first call of each shape pays the warm-up).

        Fused blends change weight values in place, which compiled graphs read as inputs: switching
        blends does not recompile. conv_1x1_as_mm follows diffusers' speed-up guide.
        """
        import torch._inductor.config as inductor

        inductor.conv_1x1_as_mm = True  # diffusers' guide; its coordinate-descent tuning is left off (minutes more warm-up)
        mode = self.fast_path.compile_mode
        denoiser = self.loaded.family.denoiser
        log.info("compiling the %s and the VAE decoder (mode %s); the first batch of each size warms up", denoiser, mode)
        getattr(pipe, denoiser).compile(mode=mode, fullgraph=False)
        pipe.vae.decoder.compile(mode=mode, fullgraph=False)

    def _config_root(self) -> Path:
        """The diffusers folder the loaded model's configs come from."""
        source = self.models[self.loaded.model_id]
        return source.config if source.kind in ("single_file", "transformer_file") else source.path

    def _set_vae(self, vae_id: str | None) -> None:
        """The request's `vae`: a separate AutoencoderKL, loaded once, swapped in for the model's own."""
        model = self.loaded
        if vae_id == model.vae_key:
            return
        if vae_id and vae_id not in model.vaes:
            from diffusers import AutoencoderKL

            source = self.registry.vaes[vae_id]
            log.info("loading VAE %s from %s", vae_id, source.path)
            if source.kind == "vae_file":
                config = {"config": str(source.config)} if source.config else {"config": str(self._config_root()), "subfolder": "vae"}
                vae = AutoencoderKL.from_single_file(str(source.path), local_files_only=True, torch_dtype=self.dtype, **config)
            else:
                vae = AutoencoderKL.from_pretrained(str(source.path), local_files_only=True, torch_dtype=self.dtype)
            model.vaes[vae_id] = vae.to(self.device)
        model.pipe.vae = model.vaes[vae_id] if vae_id else model.base_vae
        model.vae_key = vae_id

    def _text_stacks(self) -> list[tuple[str, str]]:
        """(tokenizer, text encoder) attribute pairs of the loaded pipeline: one for SD, two for SDXL."""
        pairs = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]
        return [(t, e) for t, e in pairs if getattr(self.pipe, t, None) is not None and getattr(self.pipe, e, None) is not None]

    def _set_inversions(self, names: str | None) -> None:
        """The request's `embeddings_model`: textual inversion tokens present exactly while a row asks for them.

        Rows without the embedding must see the tokenizer as it was (the token's text then means
        what it says), so the tokenizers are restored from a copy and the added rows of the
        embedding matrix are cut off, instead of trusting unload_textual_inversion's id bookkeeping.
        """
        model = self.loaded
        key = names or None
        if key == model.inversion_key:
            return
        import copy

        for tokenizer_attr, encoder_attr, pristine, size in model.pristine_text:
            setattr(model.pipe, tokenizer_attr, copy.deepcopy(pristine))
            getattr(model.pipe, encoder_attr).resize_token_embeddings(size)
        if not model.pristine_text:
            model.pristine_text = [
                (t, e, copy.deepcopy(getattr(model.pipe, t)), getattr(model.pipe, e).get_input_embeddings().num_embeddings)
                for t, e in self._text_stacks()
            ]
        for name in split_loras(key):
            source = self.registry.embeddings[name]
            log.info("loading embeddings %s (token %s) from %s", name, source.token, source.path)
            if source.family == "sdxl":  # one tensor per text encoder, as SDXL embeddings are saved
                from safetensors.torch import load_file

                tensors = load_file(str(source.path))
                for (tokenizer_attr, encoder_attr), key_name in zip(self._text_stacks(), ("clip_l", "clip_g")):
                    model.pipe.load_textual_inversion(
                        tensors[key_name],
                        token=[source.token] + [f"{source.token}_{i}" for i in range(1, len(tensors[key_name]))],
                        tokenizer=getattr(model.pipe, tokenizer_attr),
                        text_encoder=getattr(model.pipe, encoder_attr),
                    )
            else:
                model.pipe.load_textual_inversion(str(source.path), token=source.token)
        model.inversion_key = key

    def _pipeline(self, mode: str) -> Any:
        """The pipeline that runs a row: the loaded one, or diffusers' panorama / SAG pipeline over its components."""
        if mode == "text2img":
            return self.pipe
        pipelines = self.loaded.pipelines
        if mode not in pipelines:
            from diffusers import StableDiffusionPanoramaPipeline, StableDiffusionSAGPipeline

            pipeline_class = {"panorama": StableDiffusionPanoramaPipeline, "sag": StableDiffusionSAGPipeline}[mode]
            pipelines[mode] = pipeline_class.from_pipe(self.pipe)
            pipelines[mode].set_progress_bar_config(disable=True)
        pipe = pipelines[mode]
        # follow the switches made on the main pipeline
        pipe.scheduler, pipe.vae, pipe.tokenizer = self.pipe.scheduler, self.pipe.vae, self.pipe.tokenizer
        return pipe

    def _upscale(self, group: dict[str, Any], images: np.ndarray, seeds: list[int]) -> np.ndarray:
        """`upscale: yes`: 2x with the configured StableDiffusionLatentUpscalePipeline, seeded per image."""
        if self._upscaler is None:
            from diffusers import StableDiffusionLatentUpscalePipeline

            source = self.registry.upscaler
            log.info("loading upscaler from %s", source.path)
            self._upscaler = StableDiffusionLatentUpscalePipeline.from_pretrained(
                str(source.path), torch_dtype=self.dtype, local_files_only=True
            ).to(self.device)
            self._upscaler.set_progress_bar_config(disable=True)
        with torch.inference_mode():
            return self._upscaler(
                prompt=[group["prompt"]] * len(seeds),
                image=images,
                num_inference_steps=int(self.upscaler_settings["num_inference_steps"]),  # the `upscaler:` config
                guidance_scale=float(self.upscaler_settings["guidance_scale"]),
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                output_type="np",
            ).images

    def _load_adapters(self, lora_ids: set[str]) -> None:
        for lora_id in sorted(lora_ids - self.adapters.loaded):
            self._load_adapter(lora_id)

    def _load_adapter(self, lora_id: str) -> None:
        """One LoRA as a peft adapter (or LyCORIS deltas), refused in one line when its layers are not all placed."""
        adapters, lora, family = self.adapters, self.loras[lora_id], self.loaded.family
        log.info("loading LoRA %s from %s", lora_id, lora.path)
        if self._load_lycoris(lora_id, lora.path):
            return
        error = ""
        with library_warnings() as said:
            try:
                self.pipe.load_lora_weights(lora_weights(lora.path, family.fold_lora_alphas), adapter_name=lora_id)
            except Exception as exc:  # diffusers cannot read its keys as a format it knows for this pipeline
                error = one_line(exc)[:200]
        components = [family.denoiser, *(e.component for e in family.text_encoders)]
        patched = {c: adapter_layers(getattr(self.pipe, c, None), lora_id) for c in components}
        unplaced = [line for line in said if "unexpected keys" in line.lower()]
        problem = self._fit_problem(lora_id, patched, unplaced, error)
        if problem:  # diffusers only warns: the LoRA, or part of it, would be silently dropped
            if any(patched.values()):
                self.pipe.delete_adapters([lora_id])
            raise LoraMismatch(problem)
        adapters.loaded.add(lora_id)
        adapters.fuser.adapters_changed()
        if any(n for c, n in patched.items() if c != family.denoiser):
            adapters.in_text_encoder.add(lora_id)

    def _fit_problem(self, lora_id: str, patched: dict[str, int], unplaced: list[str], error: str = "") -> str | None:
        """What of a loaded LoRA found no layer: the whole file, a part (its text-encoder half...), or some keys."""
        family, path = self.loaded.family, self.loras[lora_id].path
        parts = lora_parts(safetensors_keys(path) if path.suffix == ".safetensors" else [])
        total = sum(len(m) for m in parts.values())
        takes = {"denoiser"} | ({e.component for e in family.text_encoders} if family.text_encoder_loras else set())
        # a part the family's loader takes whose layers got none of the adapter (unprefixed keys may be either)
        dropped = [p for p in parts if p in takes and not patched.get(family.denoiser if p == "denoiser" else p)]
        names = unexpected_modules(unplaced)
        said = f" (diffusers: {error})" if error else ""
        if not any(patched.values()):
            return self._mismatch(lora_id, parts, 0, "none of its keys name a layer of it" + said)
        if dropped:
            reason = " and ".join(f"its {PART_NAMES.get(p, p)} part ({_count(len(parts[p]), 'module')})" for p in dropped)
            return self._mismatch(lora_id, parts, total - sum(len(parts[p]) for p in dropped), reason + " matches no layer" + said)
        if names:
            reason = f"{len(names)} of its modules name no layer (e.g. {sorted(names)[0]})"
            return self._mismatch(lora_id, parts, total - len(names), reason + said)
        if error:
            return self._mismatch(lora_id, parts, None, f"diffusers cannot load it ({error})")
        return None

    def _mismatch(self, lora_id: str, parts: dict[str, set[str]], matched: int | None, reason: str) -> str:
        """`loras.mine: mine.safetensors (kohya LoRA, 264 modules: 192 UNet/transformer, 72 text encoder) matched 192 of
        its 264 modules on this SD 1.x model: its text encoder part (72 modules) matches no layer; ...`"""
        path, family = self.loras[lora_id].path, self.loaded.family
        info = lora_info(path, safetensors_keys(path)) if path.suffix == ".safetensors" else {}
        total = sum(len(m) for m in parts.values())
        shown = ", ".join(f"{len(m)} {PART_NAMES.get(p, 'unprefixed')}" for p, m in parts.items())
        what = f"{info.get('tool', 'unknown')} {info.get('network', 'LoRA')}" + (f", {_count(total, 'module')}: {shown}" if total else "")
        count = f" matched {max(0, matched)} of its {total} modules on this {family.label} model" if total and matched is not None else ""
        return f"loras.{lora_id}: {path.name} ({what}){count}: {reason}; use a LoRA made for {family.label} or drop it from the blend"

    def _load_lycoris(self, lora_id: str, path: Path) -> bool:
        """A LoHa/LoKr file or a kohya DoRA as weight deltas (engines/deltas.py) in the fuser; False: not one of those."""
        from runner.engines.deltas import match_file

        kind = lycoris_kind(safetensors_keys(path)) if path.suffix == ".safetensors" else None
        if kind is None:
            return False
        from safetensors.torch import load_file

        family, adapters = self.loaded.family, self.adapters
        if self.loaded.quantization:
            raise LoraMismatch(
                f"loras.{lora_id}: {path.name} is a LyCORIS {kind}, whose deltas are written into the weights, and this model's "
                f"weights are quantized ({self.loaded.quantization}); use a LoRA export of it or the unquantized model"
            )
        try:
            file, unmatched, total = match_file(self.pipe, load_file(str(path)), family.denoiser)
        except ValueError as exc:  # factors that do not fit their layer, Tucker factors
            problem = f"loras.{lora_id}: {path.name} (LyCORIS {kind}): {one_line(exc)}"
            raise LoraMismatch(f"{problem}; use a LoRA made for {family.label}") from None
        if unmatched or not file.targets:
            example = f" (e.g. {unmatched[0]})" if unmatched else ""
            raise LoraMismatch(
                f"loras.{lora_id}: {path.name} (LyCORIS {kind}, {_count(total, 'module')}) matched {total - len(unmatched)} of its "
                f"{total} modules on this {family.label} model: {_count(len(unmatched), 'module')} name no layer{example}; "
                f"use a LoRA made for {family.label} or drop it from the blend"
            )
        adapters.fuser.add_deltas(lora_id, file)
        adapters.loaded.add(lora_id)
        if any(t.component != family.denoiser for t in file.targets.values()):
            adapters.in_text_encoder.add(lora_id)
        if not self.fast_path.fuse_loras:
            log.warning("LoRA %s is a LyCORIS %s: it runs fused (as weight deltas) whatever engine.fuse_loras says", lora_id, kind)
        return True

    def prepare(self, plan: pd.DataFrame) -> None:
        """Load the first model; adapters are loaded by the groups that need them (see generate).

        A compiled UNet gets every adapter of its model now: loading one later changes the modules
        the compiled graph was traced over, and would recompile it.
        """
        if plan.empty:
            return
        first = plan.sort_values("model_id").iloc[0]["model_id"]
        self._load_model(first)
        if self.fast_path.compile:
            blends = plan.loc[plan["model_id"] == first, "lora_model"].unique()
            self._load_adapters({lora for blend in blends for lora in split_loras(blend)})

    def check_loras(self, plan: pd.DataFrame) -> list[str]:
        """Each LoRA of the loaded model's rows, loaded and matched against its layers (engine-side: every format
        diffusers converts is counted after its conversion); unloaded again unless kept, so memory stays one group's."""
        if plan.empty or self.loaded is None:
            return []
        blends = plan.loc[plan["model_id"] == self.loaded.model_id, "lora_model"].unique()
        wanted = {lora for blend in blends for lora in split_loras(blend)} - self.adapters.loaded
        problems = []
        for lora_id in sorted(wanted):
            try:
                self._load_adapter(lora_id)
            except LoraMismatch as exc:
                problems.append(str(exc))
        if not (self.fast_path.compile or self.keep_adapters):
            self._unload_adapters(wanted)
        return problems

    def _unload_adapters(self, lora_ids: set[str]) -> None:
        adapters = self.adapters
        names = sorted(lora_ids & adapters.loaded)
        if names and self.pipe is not None and not self.fast_path.compile:
            log.info("unloading LoRAs no later group needs: %s", ", ".join(names))
            adapters.fuser.restore()
            deltas = [n for n in names if adapters.fuser.is_delta(n)]
            adapters.fuser.drop_deltas(deltas)
            if [n for n in names if n not in deltas]:
                self.pipe.delete_adapters([n for n in names if n not in deltas])
            adapters.fuser.adapters_changed()
            adapters.loaded.difference_update(names)
            adapters.in_text_encoder.difference_update(names)
            adapters.blend = None

    # ------------------------------------------------------------ per seed group settings

    def _set_adapters(self, lora_model: str, lora_strength: str, lora_strength_te: str | None = None) -> None:
        """The group's blend: fused into the base weights (fast path), or as peft adapters at their weights; with
        `lora_strength_te`, the text encoders' layers at those strengths and the denoiser's at lora_strength."""
        adapters = self.adapters
        key = (lora_model, lora_strength, lora_strength_te)
        if key == adapters.blend:
            return
        names = split_loras(lora_model)
        strengths = split_strengths(lora_strength)
        te_strengths = split_strengths(lora_strength_te) or None
        if names:
            self._load_adapters(set(names))
        exact = self.loaded.family.fuse and not self.loaded.quantization  # quantized weights cannot hold a blend exactly
        deltas = [n for n in names if adapters.fuser.is_delta(n)]  # LyCORIS files: always fused (no peft path)
        peft_names = [n for n in names if n not in deltas]
        if names and self.fast_path.fuse_loras and exact and adapters.fuser.can_fuse(names):
            if peft_names:
                self.pipe.disable_lora()  # peft's adapter path off: the fused base weights carry the blend
            adapters.fuser.apply(names, strengths, te_strengths)
            adapters.mode = "fused"
        elif not peft_names and deltas:
            adapters.fuser.apply(names, strengths, te_strengths)
            if adapters.loaded - set(deltas):
                self.pipe.disable_lora()
            adapters.mode = "fused"
        elif names:
            adapters.fuser.restore()
            if deltas:
                picked = [(n, s, t) for n, s, t in zip(names, strengths, te_strengths or strengths) if n in deltas]
                adapters.fuser.apply([p[0] for p in picked], [p[1] for p in picked], [p[2] for p in picked] if te_strengths else None)
                names, strengths = peft_names, [s for n, s in zip(names, strengths) if n in peft_names]
                te_strengths = [t for n, t in zip(split_loras(lora_model), te_strengths) if n in peft_names] if te_strengths else None
            self.pipe.enable_lora()
            if te_strengths:  # diffusers' per-component weights: {component: weight} per adapter
                family = self.loaded.family
                parts = [family.denoiser, *(e.component for e in family.text_encoders)]
                weights = [
                    {part: (s if part == family.denoiser else t) for part in parts if getattr(self.pipe, part, None) is not None}
                    for s, t in zip(strengths, te_strengths)
                ]
                self.pipe.set_adapters(names, adapter_weights=weights)
            else:
                self.pipe.set_adapters(names, adapter_weights=strengths)
            adapters.mode = "unfused"
        else:
            adapters.fuser.restore()
            if any(not adapters.fuser.is_delta(n) for n in adapters.loaded):
                self.pipe.disable_lora()
            adapters.mode = "none"
        adapters.blend = key

    def _set_scheduler(self, name: str, options: dict[str, Any], shift: float | None) -> None:
        model = self.loaded
        key = (name, tuple(sorted(options.items())), shift)
        if key == model.scheduler_key:
            return
        model.pipe.scheduler = load_scheduler(name, model.base_scheduler_config, options, flow=model.family.flow_matching, shift=shift)
        model.scheduler_key = key

    def _prompt_embeddings(self, group: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """The prompts' embeddings as pipeline arguments, cached while the text encoders are unchanged; None: the
        pipeline encodes the prompts itself (plain prompts on the DiTs and SDXL, and families without weights)."""
        family = self.loaded.family
        prompt, negative = group["prompt"], group["negative_prompt"] or ""
        mode = optional(group.get("prompt_weighting")) or "a1111"
        if family.prompt_weights == "clip":
            chunked = self._needs_chunks(prompt) or self._needs_chunks(negative)
            if family.name == "sdxl" and not chunked:
                return None
        elif family.prompt_weights and mode != "none" and (has_weights(prompt) or has_weights(negative)):
            chunked = True
        else:
            return None
        clip_skip = int(group["clip_skip"]) - 1 or None  # the web UIs' 1 = diffusers' None
        touches_te = bool(self.adapters.in_text_encoder & set(split_loras(group["lora_model"])))
        lora_key = (group["lora_model"], group["lora_strength"], optional(group.get("lora_strength_te"))) if touches_te else None
        length = optional(group.get("max_sequence_length")) or family.max_sequence_length
        key = (prompt, negative, clip_skip, lora_key, optional(group.get("embeddings_model")), mode if chunked else None, length)
        cache = self.loaded.prompt_embeddings
        if key not in cache:
            if not self.fast_path.cache_prompt_embeddings:
                cache.clear()
            if family.prompt_weights != "clip":
                cache[key] = self._weighted_dit_embeddings(prompt, negative, mode, clip_skip, int(length))
            elif chunked:
                cache[key] = self._chunked_embeddings(prompt, negative, mode, clip_skip)
            elif clip_skip and not hasattr(self.pipe.text_encoder, "text_model"):
                cache[key] = {
                    "prompt_embeds": self._encode_text(prompt, clip_skip),
                    "negative_prompt_embeds": self._encode_text(negative, clip_skip),
                }
            else:
                positive, negative_embeds = self.pipe.encode_prompt(prompt, self.device, 1, True, negative or None, clip_skip=clip_skip)
                cache[key] = {"prompt_embeds": positive, "negative_prompt_embeds": negative_embeds}
        return cache[key]

    def _weighted_dit_embeddings(self, prompt: str, negative: str, mode: str, clip_skip: int | None, length: int) -> dict[str, Any]:
        """Weighted prompts on Flux.1 (T5 weighted; CLIP gives only its pooled embedding, of the words), SD3 (CLIP-L/G
        weighted on their first chunk, zero-padded to T5's width, then T5 weighted) and Chroma (T5 with its masks)."""
        from runner.prompts.encode import Stack, clip_first_chunk, t5_weighted

        pipe, kind = self.pipe, self.loaded.family.prompt_weights
        if kind == "t5-masked":  # Chroma: T5 only, with its attention masks
            with torch.inference_mode():
                (positive, mask), (negative_embeds, negative_mask) = (
                    t5_weighted(pipe.tokenizer, pipe.text_encoder, t, mode, length, self.device, masked=True) for t in (prompt, negative)
                )
            dtype = positive.dtype
            return {
                "prompt_embeds": positive,
                "prompt_attention_mask": mask.to(dtype),
                "negative_prompt_embeds": negative_embeds,
                "negative_prompt_attention_mask": negative_mask.to(dtype),
            }
        sd3 = kind == "sd3"

        def one(text: str) -> tuple[torch.Tensor, torch.Tensor]:
            if not sd3:
                pooled = pipe._get_clip_prompt_embeds(plain_text(text), num_images_per_prompt=1, device=self.device)
                return t5_weighted(pipe.tokenizer_2, pipe.text_encoder_2, text, mode, length, self.device)[0], pooled
            layer = -(clip_skip + 2) if clip_skip else -2
            clip_l, pooled_l = clip_first_chunk(Stack(pipe.tokenizer, pipe.text_encoder, layer, False), text, mode, self.device)
            clip_g, pooled_g = clip_first_chunk(Stack(pipe.tokenizer_2, pipe.text_encoder_2, layer, False), text, mode, self.device)
            clip = torch.cat([clip_l, clip_g], dim=-1)
            if pipe.text_encoder_3 is not None:
                t5 = t5_weighted(pipe.tokenizer_3, pipe.text_encoder_3, text, mode, length, self.device)[0]
            else:  # SD3 without its T5: zeros, as the pipeline does
                t5 = torch.zeros(1, length, pipe.transformer.config.joint_attention_dim, device=self.device, dtype=clip.dtype)
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat([pooled_l, pooled_g], dim=-1)

        with torch.inference_mode():
            positive, pooled = one(prompt)
            negative_embeds, negative_pooled = one(negative)
        return {
            "prompt_embeds": positive,
            "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": negative_embeds,
            "negative_pooled_prompt_embeds": negative_pooled,
        }

    def _needs_chunks(self, text: str) -> bool:
        """Weights, BREAK, or more than one chunk of tokens: the prompt goes through runner/prompts/encode.py."""
        return bool(text) and (has_weights(text) or (may_be_long(text) and token_count(self.pipe.tokenizer, text) > CHUNK))

    def _chunked_embeddings(self, prompt: str, negative: str, mode: str, clip_skip: int | None) -> dict[str, torch.Tensor]:
        """A1111's chunked, weighted encoding on SD's CLIP (last layer, or clip_skip before it, normed) or SDXL's two
        (their penultimate layers, pooled from the second's first chunk), the shorter side padded with empty chunks."""
        from runner.prompts.encode import Stack, empty_chunk, encode, pad_to

        pipe, sdxl = self.pipe, self.loaded.family.name == "sdxl"
        if sdxl:
            layer = -(clip_skip + 2) if clip_skip else -2
            stacks = [
                Stack(pipe.tokenizer, pipe.text_encoder, layer, False),
                Stack(pipe.tokenizer_2, pipe.text_encoder_2, layer, False, True),
            ]
        else:
            stacks = [Stack(pipe.tokenizer, pipe.text_encoder, -(clip_skip + 1) if clip_skip else None, True)]
        with torch.inference_mode():
            positive, pooled, chunks = encode(stacks, prompt, mode, self.device)
            zeros = sdxl and not negative and getattr(pipe.config, "force_zeros_for_empty_prompt", False)
            negative_embeds, negative_pooled, negative_chunks = (
                (None, None, chunks) if zeros else encode(stacks, negative, mode, self.device)
            )
            total = max(chunks, negative_chunks)
            empty = empty_chunk(stacks, self.device)
            positive = pad_to(positive, total, empty)
            negative_embeds = torch.zeros_like(positive) if zeros else pad_to(negative_embeds, total, empty)
        out = {"prompt_embeds": positive, "negative_prompt_embeds": negative_embeds}
        if sdxl:  # as SDXL's encode_prompt: an empty negative is zeros where the model's config says so
            out |= {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": torch.zeros_like(pooled) if zeros else negative_pooled}
        return out

    def _encode_text(self, text: str, clip_skip: int) -> torch.Tensor:
        """CLIP embeddings `clip_skip` layers before the last, then the final layer norm, as encode_prompt does.

        Here because diffusers 0.42's encode_prompt reaches for `text_encoder.text_model`, which
        transformers 5's CLIPTextModel no longer has (its final_layer_norm sits on the model itself).
        """
        tokenizer, encoder = self.pipe.tokenizer, self.pipe.text_encoder
        tokens = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device) if getattr(encoder.config, "use_attention_mask", False) else None
        with torch.inference_mode():
            hidden = encoder(tokens.input_ids.to(self.device), attention_mask=mask, output_hidden_states=True).hidden_states
            return encoder.final_layer_norm(hidden[-(clip_skip + 1)]).to(dtype=encoder.dtype, device=self.device)

    # ------------------------------------------------------------ generation

    def generate(self, rows: pd.DataFrame) -> Iterator[ImageResult]:
        if rows.empty:
            return
        # rows of plans written before a field existed (a resumed sweep, a reproduced image) lack its column: unset
        rows = rows.assign(**{k: None for k in SEED_GROUP_KEYS if k not in rows})
        ordered = rows.sort_values(SEED_GROUP_KEYS + ["seed"], kind="stable")
        seed_groups = [group.to_dict("records") for _, group in ordered.groupby(SEED_GROUP_KEYS, sort=False, dropna=False)]
        # how many seed_groups still need each LoRA: an adapter is deleted after its last group, so a sweep
        # over many LoRAs holds only what the current and later seed_groups need (set_adapters slows down
        # as adapters accumulate, and each one costs memory)
        uses = Counter(lora for group in seed_groups for lora in set(split_loras(group[0]["lora_model"])))
        pending: list[Launched | ImageResult] = []  # the batch queued on the GPU before this one
        for records in seed_groups:
            start = 0
            while start < len(records):
                size, probe = self._batch_size_for(records[0], len(records) - start)
                batch = records[start : start + size]
                launched = self._launch(batch, probe=probe)
                if probe and self.fast_path.compile:
                    continue  # an eager measurement only: its images are made again at the batch size found
                start += size
                # the previous batch finished while this one was being queued: hand it over now
                yield from self._finish_all(pending)
                pending = launched
                if probe:
                    yield from self._finish_all(pending)
                    pending = []
            finished = set(split_loras(records[0]["lora_model"]))
            uses.subtract(finished)
            if not self.keep_adapters:
                self._unload_adapters({lora for lora in finished if uses[lora] <= 0})
        yield from self._finish_all(pending)

    # ------------------------------------------------------------ batches

    def _size_key(self, group: dict[str, Any]) -> tuple:
        return (group["model_id"], int(group["width"]), int(group["height"]), group.get("pipeline_used"), bool(group.get("upscale")))

    def _batch_size_for(self, group: dict[str, Any], remaining: int) -> tuple[int, bool]:
        """(images in the next call, whether it measures memory for batch_size: auto)."""
        # diffusers 0.42's panorama pipeline pairs the guidance halves wrongly when a call holds
        # several images (two equal seeds in one call give different images), so it gets one at a time
        if group.get("pipeline_used") == "panorama":
            return 1, False
        batches = self.batches
        if not (batches.auto and self.device.type == "cuda"):
            return min(batches.size, remaining), False
        key = self._size_key(group)
        if key not in batches.measured:
            return min(2, remaining), True  # a small batch measures the memory one image needs
        return min(batches.measured[key], remaining), False

    def _measured_batch(self, n: int, before: int) -> int:
        """batch_size: auto: how many images fit in free memory, from a batch of n that needed peak - before bytes."""
        per_image = max(1, (torch.cuda.max_memory_allocated(self.device) - before) / max(1, n))
        free, _ = torch.cuda.mem_get_info(self.device)
        usable = free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return int(min(self.batches.max_size, max(1, usable * AUTO_BATCH_HEADROOM // per_image)))

    def _launch(self, batch: list[dict[str, Any]], probe: bool = False, retried: bool = False) -> list[Launched | ImageResult]:
        """Queue one batch on the device; on CUDA this returns before the GPU is done (see _finish)."""
        group = batch[0]
        try:
            self._load_model(group["model_id"])
            self._set_adapters(group["lora_model"], group["lora_strength"], optional(group.get("lora_strength_te")))
            self._set_scheduler(
                group["scheduler_used"],
                {"use_karras_sigmas": group["use_karras_sigmas"], "algorithm_type": group["algorithm_type"]},
                optional(group.get("shift")),
            )
            self._set_vae(optional(group.get("vae")))
            self._set_inversions(optional(group.get("embeddings_model")))
            seeds = [int(r["seed"]) for r in batch]
            before = 0
            if probe:
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                before = torch.cuda.memory_allocated(self.device)
            started = time.perf_counter()
            # a compiled UNet measures eagerly: compiling for the probe's batch would add a graph no later batch uses
            stance = torch.compiler.set_stance("force_eager") if probe and self.fast_path.compile else contextlib.nullcontext()
            with stance:
                pixels, finite = self._denoise(group, seeds)
            launched = Launched(batch, *to_host(pixels, finite), started=started, ran_with=self._ran_with(group))
            if probe:
                launched.ready()
                fits = self.batches.measured[self._size_key(group)] = self._measured_batch(len(batch), before)
                log.info("batch_size auto: %d images per call at %sx%s", fits, group["width"], group["height"])
            return [launched]
        except torch.cuda.OutOfMemoryError as exc:
            out_of_memory = one_line(exc)
            if self.batches.auto:  # remember: later batches of this size start at what fits
                measured, key = self.batches.measured, self._size_key(group)
                measured[key] = max(1, min(measured.get(key, len(batch)), len(batch)) // 2)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # one bad batch must not end the sweep; its rows say why in one line
            log.info("batch of %d failed", len(batch), exc_info=True)  # the traceback goes to lora-sweep.log only
            return [self._failed(r, one_line(exc)) for r in batch]
        # out of memory: retried here, after the except block, whose traceback held the failed call's tensors
        if len(batch) > 1 and not retried:
            log.warning("out of memory with a batch of %d; retrying at half the batch size", len(batch))
            torch.cuda.empty_cache()
            half = len(batch) // 2
            return self._launch(batch[:half], retried=True) + self._launch(batch[half:], retried=True)
        return [self._failed(r, out_of_memory) for r in batch]

    def _ran_with(self, group: dict[str, Any]) -> dict[str, Any]:
        """The loaded state a batch runs with, for its images' meta."""
        return {
            "adapters_loaded": len(self.adapters.loaded),
            "variant": self.loaded.variant,
            "pipeline": type(self._pipeline(group.get("pipeline_used", "text2img"))).__name__,
            "lora_mode": self.adapters.mode,  # fused | unfused | none
            "family": self.loaded.family.name,
            **({"quantization": self.loaded.quantization} if self.loaded.quantization else {}),
            **({"offload": self.offload} if self.offload != "none" else {}),
        }

    def _finish_all(self, items: list[Launched | ImageResult]) -> Iterator[ImageResult]:
        for item in items:
            if isinstance(item, ImageResult):
                yield item
            else:
                yield from self._finish(item)

    def _finish(self, launched: Launched) -> Iterator[ImageResult]:
        """Wait for a queued batch's pixels and turn them into results."""
        ready = launched.ready()
        # the time this batch had the device to itself: from its queueing, or from the previous batch's end
        elapsed = ready - max(launched.started, self._last_ready)
        self._last_ready = ready
        batch, group = launched.batch, launched.batch[0]
        ignored = [
            f"{option} not applied: {group['scheduler_used']} has no such option"
            for option in OPTION_FIELDS
            if group.get(option) not in (None, False, "") and not supports_option(group["scheduler_used"], option)
        ]
        pixels, finite = launched.pixels.numpy(), launched.finite.numpy()
        for row, image_pixels, ok in zip(batch, pixels, finite):
            if not ok:
                yield self._failed(row, "NaN in the output (try dtype=float32 or bfloat16)")
                continue
            yield ImageResult(
                id=row["id"],
                status="ok",
                image=Image.fromarray(image_pixels),
                seed=int(row["seed"]),
                scheduler=row["scheduler_used"],
                generation_s=elapsed / len(batch),
                batch_size=len(batch),
                notes=[n for n in str(row.get("notes") or "").split("; ") if n] + ignored,
                meta={
                    "device": str(self.device),
                    "dtype": str(self.dtype).removeprefix("torch."),
                    **launched.ran_with,
                    "upscaled": bool(group.get("upscale") and self.registry.upscaler is not None),
                    "compiled": self.fast_path.compile,
                    # the images computed together: float results differ by a few 1e-7 between batch sizes, so
                    # `lora-sweep reproduce` runs this same batch again to get identical pixels
                    "batch": " ".join(r["id"] for r in batch),
                },
            )

    def _denoise(self, group: dict[str, Any], seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One call of the pipeline for these seeds -> (uint8 pixels N x H x W x 3 on the device, finite flag per image)."""
        n = len(seeds)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        family = self.loaded.family
        kwargs: dict[str, Any] = {
            "width": int(group["width"]),
            "height": int(group["height"]),
            "num_inference_steps": int(group["num_inference_steps"]),
            "generator": generators,
        }
        if family.guidance != "none":
            kwargs["guidance_scale"] = float(group["guidance_scale"])
        embeddings = self._prompt_embeddings(group)
        if embeddings is not None:
            kwargs |= {name: value.repeat(n, *[1] * (value.dim() - 1)) for name, value in embeddings.items()}
        else:
            # the families without a weighted encoder get the words without the syntax (the plan says so)
            words = (lambda t: t) if optional(group.get("prompt_weighting")) == "none" else plain_text
            kwargs["prompt"] = [words(group["prompt"])] * n
            if family.negative_prompt:  # "" is a negative too: Qwen-Image's default true_cfg_scale runs CFG against it
                kwargs["negative_prompt"] = [words(group["negative_prompt"] or "")] * n
            if family.clip_skip and int(group["clip_skip"]) > 1:
                kwargs["clip_skip"] = int(group["clip_skip"]) - 1
        # the flow families' own fields, where set (validation refused them on families without them)
        if (true_cfg := optional(group.get("true_cfg_scale"))) is not None:
            kwargs["true_cfg_scale"] = float(true_cfg)
        if (length := optional(group.get("max_sequence_length"))) is not None:
            kwargs["max_sequence_length"] = int(length)
        mode = group.get("pipeline_used", "text2img")
        pipe = self._pipeline(mode)
        upscale = bool(group.get("upscale") and self.registry.upscaler is not None)
        with torch.inference_mode():
            if mode == "text2img" and not upscale:
                if self.device.type == "cuda":
                    kwargs["callback_on_step_end"] = LaunchThrottle()
                if type(pipe).__name__ in LATENT_DECODE:
                    latents = pipe(**kwargs, output_type="latent").images
                    return to_pixels(decode_latents(pipe, latents))
                # the DiTs decode with their own VAE inside the call; "pt" keeps the images on the device, so
                # the copy to the host overlaps the next batch as for SD (the same pixels as "np": [0, 1] floats)
                images = pipe(**kwargs, output_type="pt").images
                return to_pixels(images, unit=True)
            images = pipe(**kwargs, output_type="np").images
        if upscale:
            images = self._upscale(group, images, seeds)
        finite = torch.from_numpy(np.isfinite(images).reshape(len(images), -1).all(axis=1))
        pixels = torch.from_numpy((np.clip(np.nan_to_num(images), 0, 1) * 255).round().astype(np.uint8))
        return pixels, finite

    @staticmethod
    def _failed(row: dict[str, Any], error: str) -> ImageResult:
        return ImageResult(id=row["id"], status="failed", error=error, seed=int(row["seed"]), scheduler=row.get("scheduler_used", ""))

    # ------------------------------------------------------------ the rest

    def describe(self) -> dict[str, str]:
        import diffusers
        import peft
        import transformers

        return {
            "engine": self.kind,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "fuse_loras": str(self.fast_path.fuse_loras).lower(),
            "channels_last": str(self.fast_path.channels_last).lower(),
            "compile": str(self.fast_path.compile).lower(),
            "batch_size": "auto" if self.batches.auto else str(self.batches.size),
            "offload": self.offload,
            "quantize": self.quantize,
        }

    def close(self) -> None:
        """Drop the loaded model with its adapters (a model switch does this first); settings and measured batch sizes stay."""
        self.loaded = None
        self.adapters = Adapters()
        if torch.cuda.is_available():
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
