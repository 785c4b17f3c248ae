"""Learned scorers: one interface, so any reward model a user has the weights of can rank a sweep.

A learned scorer is a class registered under `scorers:` with `kind: aesthetic` (the one built in) or
`kind: package.module:ClassName` (your own). It is built once per scoring stage and called on batches:

    class MyScorer:
        def __init__(self, source: Path, clip: Clip | None, device: str): ...
        def score(self, images: list[PIL.Image.Image], prompts: list[str], image_embeddings: np.ndarray | None) -> np.ndarray: ...

`clip` is the scorer's `clip:` model (None when it names none) and `image_embeddings` its normalised
image embeddings of the batch, computed once for every score that reads them; return one float per
image, higher is better. ImageReward, PickScore or HPSv2 fit this shape (they take images and prompts).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

import numpy as np

from runner.scores.clip import Clip, pick_device


class LearnedScorer(Protocol):
    def score(self, images: list, prompts: list[str], image_embeddings: np.ndarray | None) -> np.ndarray: ...


class AestheticHead:
    """LAION's aesthetic predictor layout: linear layers (`layers.N.weight/bias`, no activations between
    them, as in improved-aesthetic-predictor) over L2-normalised CLIP image embeddings, 0..10 scale.

    Reads `.safetensors` or a torch `.pth`/`.pt` state dict, so LAION's own `sac+logos+ava1-l14-linearMSE.pth`
    works with `clip:` set to a CLIP ViT-L/14 in the local cache; the demo ships a tiny one for its tiny CLIP.
    """

    needs_clip = True

    def __init__(self, source: Path, clip: Clip | None, device: str = "auto"):
        import torch

        if clip is None:
            raise ValueError("an aesthetic head reads CLIP image embeddings: set `clip:` on its scorers: entry")
        if str(source).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(source))
        else:
            state = torch.load(str(source), map_location="cpu", weights_only=True)
        index = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")})
        if not index:
            raise ValueError(f"{source} has no layers.N.weight tensors (LAION's aesthetic head layout)")
        self.layers = [(state[f"layers.{i}.weight"].float(), state[f"layers.{i}.bias"].float()) for i in index]
        width = self.layers[0][0].shape[1]
        if width != clip.model.config.projection_dim:
            raise ValueError(f"{source} reads {width}-wide embeddings but its CLIP gives {clip.model.config.projection_dim}")
        self.device = pick_device(device)

    def score(self, images, prompts, image_embeddings) -> np.ndarray:
        import torch

        x = torch.as_tensor(image_embeddings, dtype=torch.float32)
        for weight, bias in self.layers:
            x = x @ weight.T + bias
        return x[:, 0].numpy().astype(np.float64)


BUILTIN_KINDS = {"aesthetic": AestheticHead}


def scorer_class(kind: str):
    """`aesthetic`, or `package.module:ClassName` for a user's own scorer."""
    if kind in BUILTIN_KINDS:
        return BUILTIN_KINDS[kind]
    module, _, name = kind.partition(":")
    if not name:
        raise ValueError(f"unknown scorer kind '{kind}'; use clip, aesthetic or package.module:ClassName")
    return getattr(importlib.import_module(module), name)
