"""A CLIP model from a local folder or the local Hugging Face cache (transformers' CLIPModel + its processor)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pick_device(setting: str) -> str:
    import torch

    if setting != "auto":
        return setting
    return "cuda" if torch.cuda.is_available() else "cpu"


class Clip:
    """Normalised image and text embeddings; what clip_score, lora_effect, seed_spread and learned heads read."""

    def __init__(self, path: Path, device: str = "auto", batch_size: int = 32):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        self.device = pick_device(device)
        self.batch_size = max(1, batch_size)
        self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
        self.max_length = min(77, int(getattr(self.model.config.text_config, "max_position_embeddings", 77)))
        self._torch = torch

    @staticmethod
    def _features(out):
        # transformers 5 returns the projected embeddings as `pooler_output` of an output object
        return out if hasattr(out, "shape") else out.pooler_output

    def image_embeddings(self, images) -> np.ndarray:
        chunks = []
        with self._torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                pixels = self.processor(images=images[start : start + self.batch_size], return_tensors="pt")["pixel_values"]
                feats = self._features(self.model.get_image_features(pixel_values=pixels.to(self.device)))
                chunks.append(self._torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, self.model.config.projection_dim), np.float32)

    def text_embeddings(self, texts: list[str]) -> np.ndarray:
        chunks = []
        with self._torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                tokens = self.processor(
                    text=texts[start : start + self.batch_size],
                    padding="max_length",
                    max_length=self.max_length,
                    truncation=True,
                    return_tensors="pt",
                )
                feats = self._features(
                    self.model.get_text_features(
                        input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
                    )
                )
                chunks.append(self._torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, self.model.config.projection_dim), np.float32)
