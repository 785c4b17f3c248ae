"""Blends fused into the base weights: a blend sweep at base-model speed, the base weights exact after any switch.

Unfused, every LoRA layer adds its low-rank product at every step of every image (about a third
of the time of an SD 1.5 step on a GPU). Fused, each touched weight is W0 + sum(strength * delta),
computed in float32 and cast once, for the duration of the blend's plan group; peft's adapter path is
switched off, so the UNet runs as the base model does. Switching blends restores each touched weight
from a copy of its loaded value (bit-identical after any number of switches, unlike subtracting the
delta again) and writes the next blend in place: the parameters keep their storage, so a compiled
UNet reads the new values without recompiling (parameters are graph inputs, not constants).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from runner.engines.deltas import DeltaFile

log = logging.getLogger(__name__)


def lora_layers(models: Iterable[nn.Module]) -> list[nn.Module]:
    """peft's LoRA layers (those with lora_A/lora_B dicts) of the given models."""
    from peft.tuners.lora import LoraLayer

    return [m for model in models if model is not None for m in model.modules() if isinstance(m, LoraLayer)]


def plain_float(module: nn.Module) -> bool:
    """A Linear or Conv2d holding float weights: quantized ones (GGUF's GGUFLinear subclasses nn.Linear, bitsandbytes'
    Linear4bit too) store packed bytes a delta cannot be added to."""
    weight = getattr(module, "weight", None)
    return (
        type(module) in (nn.Linear, nn.Conv2d)
        and isinstance(weight, torch.Tensor)
        and weight.is_floating_point()
        and not hasattr(weight, "quant_type")
    )


def unit_scale(layer: nn.Module, name: str) -> float:
    """peft's scale of an adapter at strength 1 (alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    r, alpha = layer.r[name], layer.lora_alpha[name]
    return alpha / math.sqrt(r) if layer.use_rslora.get(name, False) else alpha / r


def delta_weight(layer: nn.Module, name: str) -> torch.Tensor | None:
    """The adapter's weight delta at strength 1 in float32, as peft's get_delta_weight computes it; None if not fusable here."""
    if layer.use_dora.get(name, False) or getattr(layer, "lora_bias", {}).get(name, False):
        return None  # DoRA's magnitude and LoRA biases are not a plain weight delta
    if name not in getattr(layer, "lora_A", {}):
        return None
    base = layer.get_base_layer()
    a, b = layer.lora_A[name].weight.float(), layer.lora_B[name].weight.float()
    if isinstance(base, nn.Linear):
        delta = b @ a
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.T
    elif isinstance(base, nn.Conv2d):
        if base.weight.shape[2:4] == (1, 1):
            delta = (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        else:
            delta = F.conv2d(a.transpose(0, 1), b)
            delta = delta if base.groups > 1 else delta.transpose(0, 1)
    else:
        return None
    return delta * unit_scale(layer, name)


Delta = Callable[[], tuple[slice, torch.Tensor]]  # a delta at strength 1 and the rows of its weight it adds to


def _peft_delta(layer: nn.Module, name: str) -> tuple[slice, torch.Tensor]:
    delta = delta_weight(layer, name)
    if delta is None:
        raise ValueError(f"adapter {name} cannot be fused into {type(layer).__name__}")
    return slice(None), delta


class FusedBlends:
    """Writes one blend at a time into the base weights of the given models, and restores them exactly."""

    def __init__(self, models: Sequence[nn.Module]):
        """`models`: the denoiser first, then the text encoders (whose layers take the text-encoder strengths)."""
        self.models = [m for m in models if m is not None]
        self._denoiser = self.models[0] if self.models else None
        self._pristine: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(weight) -> (weight, loaded copy)
        self._touched: set[int] = set()  # weights holding a blend now
        self._layers: list[nn.Module] | None = None
        self._text_layers: set[int] = set()  # ids of the LoRA layers in the text encoders
        # adapters that are weight deltas, not peft layers (LyCORIS and kohya DoRA files: engines/deltas.py)
        self._deltas: dict[str, DeltaFile] = {}

    def add_deltas(self, name: str, file: DeltaFile) -> None:
        self._deltas[name] = file

    def drop_deltas(self, names: Sequence[str]) -> None:
        for name in names:
            self._deltas.pop(name, None)

    def is_delta(self, name: str) -> bool:
        return name in self._deltas

    def adapters_changed(self) -> None:
        """Call after loading or deleting adapters: the LoRA layers are looked up again."""
        self._layers = None

    def layers(self) -> list[nn.Module]:
        if self._layers is None:
            self._layers = lora_layers(self.models)
            denoiser = {id(m) for m in lora_layers([self._denoiser])} if self._denoiser is not None else set()
            self._text_layers = {id(layer) for layer in self._layers if id(layer) not in denoiser}
        return self._layers

    def can_fuse(self, names: Sequence[str]) -> bool:
        """Whether every layer of these adapters is a kind this class fuses (Linear, Conv2d; no DoRA)."""
        names = [n for n in names if n not in self._deltas]  # weight deltas always fuse
        for layer in self.layers():
            for name in names:
                if name in layer.lora_A and (
                    layer.use_dora.get(name, False)
                    or getattr(layer, "lora_bias", {}).get(name, False)
                    or not plain_float(layer.get_base_layer())
                ):
                    return False
        return True

    @torch.no_grad()
    def apply(self, names: Sequence[str], strengths: Sequence[float], te_strengths: Sequence[float] | None = None) -> int:
        """Restore, then fuse this blend (adapter names at their strengths; the text encoders' layers at
        `te_strengths` where given). Each weight is its loaded value plus every delta in float32, cast once.
        Returns the number of weights written."""
        self.restore()
        parts: dict[int, tuple[torch.Tensor, list[tuple[float, Delta]]]] = {}  # id(weight) -> (weight, deltas)

        def add(weight: torch.Tensor, strength: float, delta: Delta) -> None:
            parts.setdefault(id(weight), (weight, []))[1].append((strength, delta))

        for layer in self.layers():
            chosen = te_strengths if te_strengths is not None and id(layer) in self._text_layers else strengths
            for name, strength in zip(names, chosen):
                if name in layer.lora_A:
                    add(layer.get_base_layer().weight, float(strength), partial(_peft_delta, layer, name))
        for index, name in enumerate(names):
            file = self._deltas.get(name)
            for layer, module, piece, in_text in file.pieces() if file is not None else ():
                strength = float((te_strengths if in_text and te_strengths is not None else strengths)[index])
                add(layer.weight, strength, partial(file.piece, module, piece, self._loaded))
        for key, (weight, deltas) in parts.items():
            total = self._loaded_weight(weight).to(torch.float32, copy=True)  # never the kept copy itself
            for strength, delta in deltas:
                rows, value = delta()
                total[rows] += strength * value.to(total.device)
            weight.copy_(total.to(weight.dtype))
            self._touched.add(key)
        return len(parts)

    def _loaded_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight's value as loaded (kept the first time a blend touches it, for the exact restore)."""
        key = id(weight)
        if key not in self._pristine:
            self._pristine[key] = (weight, weight.detach().clone())
        return self._pristine[key][1]

    def _loaded(self, layer: nn.Module) -> torch.Tensor:
        return self._loaded_weight(layer.weight)

    @torch.no_grad()
    def restore(self) -> None:
        """Every weight a blend touched back to its loaded value, bit for bit."""
        for key in self._touched:
            weight, loaded = self._pristine[key]
            weight.copy_(loaded)
        self._touched.clear()

    @property
    def fused(self) -> bool:
        return bool(self._touched)
