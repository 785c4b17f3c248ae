"""What a search leaves in its sweep folder's `search/`: trials.csv, search.json and Optuna's plots.

The report (runner/report/html.py) renders its section from these files alone, as it renders the
rest from the store; MLflow gets the folder as the parent run's `search/` artifacts.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from runner.search.spec import SearchSpec, grid_settings


def write_search_files(root: Path, study: Any, spec: SearchSpec, records: list, per_trial: int, comparison: dict | None = None) -> Any:
    """Write search/ and return the best trial's record (None before any trial completed)."""
    folder = root / "search"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "trial": r.number,
            "state": r.state,
            "objective": r.value,
            **{f"param.{k}": v for k, v in r.params.items()},
            **{f"{k}_mean": v for k, v in r.means.items()},
            **({"votes": r.votes} if spec.by_people else {}),
            "images": len(r.ids),
            "ids": " ".join(r.ids),
            "error": r.error,
        }
        for r in records
    ]
    table = pd.DataFrame(rows)
    table.to_csv(folder / "trials.csv", index=False)
    complete = [r for r in records if r.state == "COMPLETE"]
    best = None
    if complete:
        pick = max if spec.direction == "maximize" else min
        best = pick(complete, key=lambda r: r.value)
    distinct = {i for r in records for i in r.ids}
    settings = grid_settings(spec)
    summary = {
        "objective": spec.objective.text,
        "direction": spec.direction,
        "sampler": spec.sampler,
        "seeds": spec.seeds,
        "trials_planned": spec.trials,
        "trials_complete": len(complete),
        "trials_failed": sum(r.state == "FAIL" for r in records),
        "trials_waiting": sum(r.state == "WAITING" for r in records),  # a human objective: made, waiting for votes
        "votes_per_trial": spec.votes_per_trial if spec.by_people else None,
        "images_per_trial": per_trial,
        "images_generated": len(distinct),
        "full_grid": {"settings": len(settings), "images": len(settings) * per_trial} if settings is not None else None,
        "grid_at_budget": comparison,  # search.compare_grid: what a grid of at most `trials` settings found
        "space": [p.describe() for p in spec.params],
        "best": {"trial": best.number, "value": best.value, "params": best.params, "means": best.means, "ids": best.ids} if best else None,
        "importances": importances(study) if len(complete) >= 3 else {},
        "plots": plots(study, folder, spec) if complete else [],
    }
    (folder / "search.json").write_text(json.dumps(summary, indent=2, default=str))
    return best


def importances(study: Any) -> dict[str, float]:
    """Optuna's fANOVA importance of each parameter for the objective ({} when it cannot tell, e.g. one distinct value)."""
    import optuna

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {k: round(float(v), 4) for k, v in optuna.importance.get_param_importances(study).items()}
    except Exception:
        return {}


def plots(study: Any, folder: Path, spec: SearchSpec) -> list[str]:
    """The objective over trials, the parameter importances, slices and a contour of the two most important ranges (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from optuna.visualization import matplotlib as vis

    made = []
    ranked = list(importances(study)) or [p.name for p in spec.params]
    numeric = [n for n in ranked if (p := spec.param(n)) is not None and p.kind in ("float", "int")]
    wanted = [
        ("history", lambda: vis.plot_optimization_history(study, target_name=spec.objective.text)),
        ("importances", lambda: vis.plot_param_importances(study)),
        ("slice", lambda: vis.plot_slice(study, params=ranked[:4], target_name=spec.objective.text)),
    ]
    if len(numeric) >= 2:
        wanted.append(("contour", lambda: vis.plot_contour(study, params=numeric[:2], target_name=spec.objective.text)))
    for name, draw in wanted:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = draw()
                figure = np.ravel(axes)[0].figure
                if name == "slice":
                    figure.set_size_inches(4 * max(1, len(np.ravel(axes))), 3.6)
                figure.tight_layout()
                figure.savefig(folder / f"{name}.png", dpi=90)
            plt.close(figure)
            made.append(f"search/{name}.png")
        except Exception:  # too few trials for a plot: the others still come
            plt.close("all")
    return made
