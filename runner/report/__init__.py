"""Reports built from the sweep folder alone: grids, ranking, response curves and report.html.

Reads the store (plan, results with their scores, config, identity); never generates or scores.
Works on a sweep that is still running or was interrupted: what is not done yet shows as missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from runner.report.grid import make_grids
from runner.report.grid_page import LiveGridPage, write_grid_page
from runner.report.html import write_html
from runner.report.human import HumanReport, human_report, merge_human
from runner.report.ranking import checkpoint_scores, default_rank_by, plot_checkpoints, plot_curves, rank_cells, response_curves


@dataclass
class ReportFiles:
    html: Path
    grids: list[Path] = field(default_factory=list)
    ranking: pd.DataFrame = field(default_factory=pd.DataFrame)
    ranking_csv: Path | None = None
    curves: list[Path] = field(default_factory=list)
    rank_by: str | None = None
    checkpoints: pd.DataFrame = field(default_factory=pd.DataFrame)  # per run, step and strength (checkpoints.csv)
    human: HumanReport | None = None  # people's votes: their ranking, the scores' agreement with it, the voters'


def make_report(
    store: Any,
    plan: pd.DataFrame,
    results: pd.DataFrame,
    report: Any,
    scores: list[str],
    name: str,
    description: str = "",
    command: str = "",
) -> ReportFiles:
    """Grids, ranking.csv, response curves and report.html into the sweep folder."""
    root = Path(store.root)
    grid = report.grid
    grids = make_grids(
        plan,
        results,
        root,
        grid.x,
        grid.y,
        report.cell_size,
        page=grid.get("page"),
        max_pixels=report.get("max_grid_pixels", 40_000_000),
    )
    rank_by = report.get("rank_by") or default_rank_by(scores)
    ranking = rank_cells(plan, results, scores, rank_by)
    human = human_report(plan, results, store.read_votes(), scores)
    ranking = merge_human(ranking, human.ranking)
    ranking_csv = None
    if not ranking.empty or not human.ranking.empty:  # votes and no scores yet: the people's ranking alone
        ranking_csv = root / "ranking.csv"
        (ranking if not ranking.empty else human.ranking).to_csv(ranking_csv, index=False)
    curve_metrics = list(dict.fromkeys([m for m in [rank_by, "lora_effect", *scores] if m and m != "seed_spread"]))
    curves = []
    table = response_curves(plan, results, curve_metrics)
    if not table.empty and table["strength"].nunique() > 1:
        path = plot_curves(table, curve_metrics, root / "report" / "curves.png")
        curves = [path] if path else []
    checkpoints = checkpoint_scores(plan, results, rank_by)
    if not checkpoints.empty:  # a training run's checkpoints: which one, at which strength (checkpoints.csv, a heatmap)
        checkpoints.to_csv(root / "checkpoints.csv", index=False)
        if path := plot_checkpoints(checkpoints, rank_by, root / "report" / "checkpoints.png"):
            curves = [*curves, path]
    config_text = store.config_path.read_text() if store.config_path.exists() else ""
    html = write_html(
        root,
        name=name,
        description=description,
        plan=plan,
        results=results,
        ranking=ranking,
        rank_by=rank_by,
        scores=scores,
        curves=curves,
        grids=grids,
        config_text=config_text,
        command=command,
        identity=store.read_identity(),
        checkpoints=checkpoints,
        human=human,
        lora_files=store.read_lora_files(),
    )
    write_grid_page(  # grid.html beside report.html: axes chosen in the page, the viewer, compare (thumbs/ once per image)
        root,
        plan,
        results,
        ranking if not ranking.empty else human.ranking,
        scores,
        name=name,
        defaults={"x": grid.x, "y": grid.y, "page": grid.get("page")},
    )
    return ReportFiles(html, grids, ranking, ranking_csv, curves, rank_by, checkpoints, human)


__all__ = ["LiveGridPage", "ReportFiles", "make_grids", "make_report"]
