"""The local engine: diffusers + peft on this machine's GPU or CPU.

One flow, as a diffusers user would write it by hand, minus the waste: the pipeline is loaded
once, each LoRA once as a named adapter (adapter name = LoRA id), blends are switched with
`set_adapters`, rows are grouped so that switches are few, prompt embeddings are computed once
per prompt, and the seeds of a cell run as one batch with one CPU generator per image (so an
image does not depend on the batch it fell in).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from runner.engines.base import ImageResult
from runner.registry import Resolved
from runner.request import split_loras, split_strengths
from runner.schedulers import OPTION_FIELDS, load_scheduler, supports_option

log = logging.getLogger(__name__)

# Rows sharing these values run with one pipeline setting; the seeds among them are batched.
CELL_KEYS = [
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
    if dtype != "auto":
        return getattr(torch, dtype)
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class LocalEngine:
    kind = "local"

    def __init__(
        self,
        *,
        models: dict[str, Resolved],
        loras: dict[str, Resolved],
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 4,
        cache_prompt_embeddings: bool = True,
        **_: Any,
    ):
        self.models = models
        self.loras = loras
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.batch_size = max(1, int(batch_size))
        self.cache_prompt_embeddings = cache_prompt_embeddings
        self.pipe: Any = None
        self._model_id: str | None = None
        self._base_scheduler_config: Any = None
        self._scheduler_key: tuple | None = None
        self._adapters_key: tuple | None = None
        self._loaded_adapters: set[str] = set()
        self._text_encoder_loras: set[str] = set()
        self._embeddings: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._quiet_libraries()

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

    def _load_model(self, model_id: str) -> None:
        if self._model_id == model_id:
            return
        self.close()
        source = self.models[model_id]
        from diffusers import AutoPipelineForText2Image, StableDiffusionPipeline

        log.info("loading model %s from %s", model_id, source.path)
        if source.kind == "single_file":
            pipe = StableDiffusionPipeline.from_single_file(str(source.path), torch_dtype=self.dtype)
        else:
            pipe = AutoPipelineForText2Image.from_pretrained(
                str(source.path), torch_dtype=self.dtype, safety_checker=None, requires_safety_checker=False
            )
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self._model_id = model_id
        self._base_scheduler_config = pipe.scheduler.config

    def _load_adapters(self, lora_ids: set[str]) -> None:
        for lora_id in sorted(lora_ids - self._loaded_adapters):
            lora = self.loras[lora_id]
            log.info("loading LoRA %s from %s", lora_id, lora.path)
            self.pipe.load_lora_weights(str(lora.path.parent), weight_name=lora.path.name, adapter_name=lora_id)
            self._loaded_adapters.add(lora_id)
            if lora_id in getattr(getattr(self.pipe, "text_encoder", None), "peft_config", {}):
                self._text_encoder_loras.add(lora_id)

    def prepare(self, plan: pd.DataFrame) -> None:
        """Load the first model; adapters are loaded by the groups that need them (see generate)."""
        if plan.empty:
            return
        self._load_model(plan.sort_values("model_id").iloc[0]["model_id"])

    def _unload_adapters(self, lora_ids: set[str]) -> None:
        names = sorted(lora_ids & self._loaded_adapters)
        if names and self.pipe is not None:
            log.info("unloading LoRAs no later group needs: %s", ", ".join(names))
            self.pipe.delete_adapters(names)
            self._loaded_adapters.difference_update(names)
            self._text_encoder_loras.difference_update(names)
            self._adapters_key = None

    # ------------------------------------------------------------ per cell settings

    def _set_adapters(self, lora_model: str, lora_strength: str) -> None:
        key = (lora_model, lora_strength)
        if key == self._adapters_key:
            return
        names = split_loras(lora_model)
        if names:
            self._load_adapters(set(names))
            self.pipe.enable_lora()
            self.pipe.set_adapters(names, adapter_weights=split_strengths(lora_strength))
        elif self._loaded_adapters:
            self.pipe.disable_lora()
        self._adapters_key = key

    def _set_scheduler(self, name: str, options: dict[str, Any]) -> None:
        key = (name, tuple(sorted(options.items())))
        if key == self._scheduler_key:
            return
        self.pipe.scheduler = load_scheduler(name, self._base_scheduler_config, options)
        self._scheduler_key = key

    def _prompt_embeddings(self, cell: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(positive, negative) embeddings of one image, cached while the text encoder is unchanged."""
        if not hasattr(self.pipe, "encode_prompt") or type(self.pipe).__name__ != "StableDiffusionPipeline":
            return None  # other families encode inside __call__
        clip_skip = int(cell["clip_skip"]) - 1 or None  # the web UIs' 1 = diffusers' None
        touches_te = bool(self._text_encoder_loras & set(split_loras(cell["lora_model"])))
        key = (cell["prompt"], cell["negative_prompt"], clip_skip, (cell["lora_model"], cell["lora_strength"]) if touches_te else None)
        if key not in self._embeddings:
            if not self.cache_prompt_embeddings:
                self._embeddings.clear()
            if clip_skip and not hasattr(self.pipe.text_encoder, "text_model"):
                self._embeddings[key] = (
                    self._encode_text(cell["prompt"], clip_skip),
                    self._encode_text(cell["negative_prompt"] or "", clip_skip),
                )
            else:
                self._embeddings[key] = self.pipe.encode_prompt(
                    cell["prompt"], self.device, 1, True, cell["negative_prompt"] or None, clip_skip=clip_skip
                )
        return self._embeddings[key]

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
        ordered = rows.sort_values(CELL_KEYS + ["seed"], kind="stable")
        cells = [cell.to_dict("records") for _, cell in ordered.groupby(CELL_KEYS, sort=False, dropna=False)]
        # how many cells still need each LoRA: an adapter is deleted after its last cell, so a sweep
        # over many LoRAs holds only what the current and later cells need (set_adapters slows down
        # as adapters accumulate, and each one costs memory)
        uses = Counter(lora for cell in cells for lora in set(split_loras(cell[0]["lora_model"])))
        for records in cells:
            for start in range(0, len(records), self.batch_size):
                yield from self._run_batch(records[start : start + self.batch_size])
            finished = set(split_loras(records[0]["lora_model"]))
            uses.subtract(finished)
            self._unload_adapters({lora for lora in finished if uses[lora] <= 0})

    def _run_batch(self, batch: list[dict[str, Any]], retried: bool = False) -> Iterator[ImageResult]:
        cell = batch[0]
        try:
            self._load_model(cell["model_id"])
            self._set_adapters(cell["lora_model"], cell["lora_strength"])
            self._set_scheduler(
                cell["scheduler_used"], {"use_karras_sigmas": cell["use_karras_sigmas"], "algorithm_type": cell["algorithm_type"]}
            )
            started = time.perf_counter()
            images = self._denoise(cell, [int(r["seed"]) for r in batch])
            elapsed = time.perf_counter() - started
        except torch.cuda.OutOfMemoryError as exc:
            if len(batch) > 1 and not retried:
                log.warning("out of memory with a batch of %d; retrying at half the batch size", len(batch))
                torch.cuda.empty_cache()
                half = len(batch) // 2
                yield from self._run_batch(batch[:half], retried=True)
                yield from self._run_batch(batch[half:], retried=True)
                return
            yield from (self._failed(r, one_line(exc)) for r in batch)
            return
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # one bad batch must not end the sweep; its rows say why in one line
            log.info("batch of %d failed", len(batch), exc_info=True)  # the traceback goes to lora-sweep.log only
            yield from (self._failed(r, one_line(exc)) for r in batch)
            return
        ignored = [
            f"{option} not applied: {cell['scheduler_used']} has no such option"
            for option in OPTION_FIELDS
            if cell.get(option) not in (None, False, "") and not supports_option(cell["scheduler_used"], option)
        ]
        for row, pixels in zip(batch, images):
            if not np.isfinite(pixels).all():
                yield self._failed(row, "NaN in the output (try dtype=float32 or bfloat16)")
                continue
            image = Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8))
            yield ImageResult(
                id=row["id"],
                status="ok",
                image=image,
                seed=int(row["seed"]),
                scheduler=row["scheduler_used"],
                generation_s=elapsed / len(batch),
                batch_size=len(batch),
                notes=[n for n in str(row.get("notes") or "").split("; ") if n] + ignored,
                meta={
                    "device": str(self.device),
                    "dtype": str(self.dtype).removeprefix("torch."),
                    "adapters_loaded": len(self._loaded_adapters),
                },
            )

    def _denoise(self, cell: dict[str, Any], seeds: list[int]) -> np.ndarray:
        n = len(seeds)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        kwargs: dict[str, Any] = {
            "width": int(cell["width"]),
            "height": int(cell["height"]),
            "num_inference_steps": int(cell["num_inference_steps"]),
            "guidance_scale": float(cell["guidance_scale"]),
            "generator": generators,
            "output_type": "np",
        }
        embeddings = self._prompt_embeddings(cell)
        if embeddings is not None:
            positive, negative = embeddings
            kwargs["prompt_embeds"] = positive.repeat(n, 1, 1)
            kwargs["negative_prompt_embeds"] = negative.repeat(n, 1, 1)
        else:
            kwargs["prompt"] = [cell["prompt"]] * n
            kwargs["negative_prompt"] = [cell["negative_prompt"]] * n
            if int(cell["clip_skip"]) > 1:
                kwargs["clip_skip"] = int(cell["clip_skip"]) - 1
        with torch.inference_mode():
            return self.pipe(**kwargs).images

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
        }

    def close(self) -> None:
        self.pipe = None
        self._model_id = None
        self._scheduler_key = None
        self._adapters_key = None
        self._loaded_adapters.clear()
        self._text_encoder_loras.clear()
        self._embeddings.clear()
        if torch.cuda.is_available():
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
