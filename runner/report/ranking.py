"""Ranking and response curves: which cell (blend x strengths x other axes) scores best, and how stably.

A cell is every plan field but the seed; its images across seeds give a mean, a spread and a
bootstrap interval of the mean. Pure pandas/numpy on the plan and results tables (no torch).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from runner.plan import varying_fields
from runner.request import split_loras, split_strengths

PER_IMAGE_QUALITY_EXCLUDES = ("lora_effect", "seed_spread")  # they describe change and stability, not quality
BOOTSTRAP_SAMPLES = 1000


def default_rank_by(scores: list[str]) -> str | None:
    """The first score that rates one image on its own (a learned scorer or clip_score), else the first score."""
    quality = [s for s in scores if s not in PER_IMAGE_QUALITY_EXCLUDES]
    return (quality or scores or [None])[0]


def cell_axes(plan: pd.DataFrame) -> list[str]:
    """The fields that tell cells apart: the sweep's axes without the seed; LoRA fields shown as `blend`."""
    axes = [a for a in varying_fields(plan) if a not in ("seed", "samples")]
    if {"lora_model", "lora_strength"} & set(axes):
        axes = ["blend", *[a for a in axes if a not in ("lora_model", "lora_strength")]]
    return axes


def cell_label(values: tuple) -> str:
    """A cell's name: its axis values joined (the `cell` column of ranking.csv, the key votes are ranked by)."""
    return " · ".join(str(v) for v in values)


def cell_labels(plan: pd.DataFrame) -> pd.Series:
    """Each plan row's cell label, indexed by image id (one cell, "all images", when nothing varies but the seed)."""
    axes = cell_axes(plan)
    if not axes:
        return pd.Series("all images", index=plan["id"].to_numpy(), name="cell")
    labels = [cell_label(values) for values in plan[axes].itertuples(index=False, name=None)]
    return pd.Series(labels, index=plan["id"].to_numpy(), name="cell")


def bootstrap_interval(values: np.ndarray, rng: np.random.Generator, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (NaN, NaN for fewer than two values)."""
    if len(values) < 2:
        return float("nan"), float("nan")
    means = values[rng.integers(0, len(values), (BOOTSTRAP_SAMPLES, len(values)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def rank_cells(plan: pd.DataFrame, results: pd.DataFrame, scores: list[str], rank_by: str | None = None) -> pd.DataFrame:
    """One row per cell, best first by the mean of `rank_by`, with its spread across seeds and a 95% bootstrap interval."""
    rank_by = rank_by or default_rank_by(scores)
    present = [s for s in scores if s in results]
    if rank_by is None or rank_by not in results:
        return pd.DataFrame()
    table = plan.merge(results[["id", "status", *present]], on="id", how="left")
    axes = cell_axes(plan)
    keys = axes or ["_all"]
    if not axes:
        table = table.assign(_all="all images")
    rng = np.random.default_rng(0)  # the same interval on every report of the same results
    rows = []
    for key, group in table.groupby(keys, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        ok = group[group["status"] == "ok"]
        values = ok[rank_by].dropna().to_numpy(dtype=float)
        low, high = bootstrap_interval(values, rng)
        row = {"cell": cell_label(key), **dict(zip(keys, key))}
        row |= {
            "images": len(ok),
            "failed": int((group["status"] == "failed").sum()),
            f"{rank_by}_mean": float(values.mean()) if len(values) else float("nan"),
            f"{rank_by}_std": float(values.std(ddof=1)) if len(values) > 1 else float("nan"),
            "ci_low": low,
            "ci_high": high,
        }
        for other in present:
            if other != rank_by:
                row[f"{other}_mean"] = float(ok[other].mean()) if ok[other].notna().any() else float("nan")
        row["ids"] = " ".join(ok["id"])
        rows.append(row)
    ranking = pd.DataFrame(rows).drop(columns=["_all"], errors="ignore")
    ranking = ranking.sort_values(f"{rank_by}_mean", ascending=False, na_position="last", kind="stable").reset_index(drop=True)
    ranking.insert(0, "rank", range(1, len(ranking) + 1))
    return ranking


def response_curves(plan: pd.DataFrame, results: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Per LoRA and strength: mean and std of each metric over the images whose blend holds that LoRA.

    The no-LoRA rows (baseline) are every LoRA's strength 0.
    """
    present = [m for m in metrics if m in results]
    if not present:
        return pd.DataFrame()
    table = plan.merge(results[["id", "status", *present]], on="id")
    table = table[table["status"] == "ok"]
    points = []
    loras = sorted({name for blend in table["lora_model"] for name in split_loras(blend)})
    for record in table.to_dict("records"):
        names = split_loras(record["lora_model"])
        strengths = split_strengths(record["lora_strength"]) or [1.0] * len(names)
        pairs = zip(names, strengths) if names else ((lora, 0.0) for lora in loras)
        for lora, strength in pairs:
            points.append({"lora": lora, "strength": float(strength), **{m: record[m] for m in present}})
    if not points:
        return pd.DataFrame()
    frame = pd.DataFrame(points)
    stats = frame.groupby(["lora", "strength"]).agg(**{f"{m}_{f}": (m, f) for m in present for f in ("mean", "std", "count")})
    return stats.reset_index()


def plot_curves(curves: pd.DataFrame, metrics: list[str], path: Path) -> Path | None:
    """One panel per metric: each LoRA's mean (and std across images) against its strength."""
    present = [m for m in metrics if f"{m}_mean" in curves]
    if curves.empty or not present:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], present):
        for lora, group in curves.groupby("lora"):
            group = group.sort_values("strength")
            ax.errorbar(
                group["strength"], group[f"{metric}_mean"], yerr=group[f"{metric}_std"].fillna(0), marker="o", capsize=3, label=lora
            )
        ax.set_xlabel("LoRA strength")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def checkpoint_scores(plan: pd.DataFrame, results: pd.DataFrame, rank_by: str | None) -> pd.DataFrame:
    """Per training run, checkpoint step and strength: the mean of `rank_by` over seeds and prompts, with its 95%
    bootstrap interval (rows whose blend is one checkpoint of a run; plan column checkpoint_step)."""
    if rank_by is None or rank_by not in results or "checkpoint_step" not in plan:
        return pd.DataFrame()
    table = plan[plan["checkpoint_step"].notna()].merge(results[["id", "status", rank_by]], on="id")
    table = table[table["status"] == "ok"]
    if table.empty:
        return pd.DataFrame()
    table = table.assign(run=table["lora_model"].str.split("@").str[0], strength=table["lora_strength"].astype(float))
    rng = np.random.default_rng(0)
    rows = []
    for (run, step, checkpoint, strength), group in table.groupby(["run", "checkpoint_step", "lora_model", "strength"], sort=True):
        values = group[rank_by].dropna().to_numpy(dtype=float)
        low, high = bootstrap_interval(values, rng)
        rows.append(
            {
                "run": run,
                "checkpoint": checkpoint,
                "step": int(step),
                "strength": strength,
                "images": len(values),
                f"{rank_by}_mean": float(values.mean()) if len(values) else float("nan"),
                "ci_low": low,
                "ci_high": high,
            }
        )
    return pd.DataFrame(rows)


def plot_checkpoints(table: pd.DataFrame, rank_by: str, path: Path) -> Path | None:
    """Per run: the score as a heatmap over step x strength, and a curve over steps per strength."""
    if table.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(table["run"]))
    fig, axes = plt.subplots(len(runs), 2, figsize=(9, 3.4 * len(runs)), squeeze=False)
    for (heat, curve), run in zip(axes, runs):
        rows = table[table["run"] == run]
        grid = rows.pivot_table(index="strength", columns="step", values=f"{rank_by}_mean")
        image = heat.imshow(grid.to_numpy(), aspect="auto", origin="lower", cmap="viridis")
        heat.set_xticks(range(len(grid.columns)), [str(c) for c in grid.columns], rotation=45, fontsize=8)
        heat.set_yticks(range(len(grid.index)), [f"{s:g}" for s in grid.index], fontsize=8)
        heat.set_xlabel("step")
        heat.set_ylabel("strength")
        heat.set_title(f"{run}: {rank_by}")
        fig.colorbar(image, ax=heat)
        for strength, group in rows.groupby("strength"):
            group = group.sort_values("step")
            low, high = group["ci_low"].to_numpy(), group["ci_high"].to_numpy()
            mean = group[f"{rank_by}_mean"].to_numpy()
            curve.errorbar(group["step"], mean, yerr=[mean - low, high - mean], marker="o", capsize=3, label=f"strength {strength:g}")
        curve.set_xlabel("step")
        curve.set_title(f"{run}: {rank_by} over steps")
        curve.grid(alpha=0.3)
        curve.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
