"""Scores: numbers that rank blends, computed after generation on their own stage (never in the denoising loop).

clip_score    image against its prompt, 100 x cosine of CLIP embeddings (as torchmetrics' CLIPScore), >= 0
lora_effect   1 - cosine between the image and the same row without LoRAs (its baseline; `report.baseline: true`)
seed_spread   per cell (every field but the seed): mean pairwise 1 - cosine of its images across seeds
<scorer id>   a learned scorer from the `scorers:` registry, e.g. `aesthetic` (runner/scores/learned.py)
"""

from runner.scores.stage import BUILTIN_SCORES, ScoreProblem, compute_scores, requested_scorers

__all__ = ["BUILTIN_SCORES", "ScoreProblem", "compute_scores", "requested_scorers"]
