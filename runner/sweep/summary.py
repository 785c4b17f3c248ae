"""What a sweep did, counted as it runs and printed at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import pandas as pd

from runner.tracking import runs_view_url, ui_command


@dataclass
class Summary:
    sweep: str
    folder: Path
    planned: int
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    generate_s: float = 0.0  # from the engine ready to the last image written and logged
    interrupted: bool = False
    grids: list[Path] = field(default_factory=list)
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    experiment_id: str | None = None
    tracking_errors: int = 0
    report: Path | None = None
    ranking: pd.DataFrame | None = None
    rank_by: str | None = None
    scored: int = 0

    @property
    def images_per_s(self) -> float:
        done = self.ok + self.failed
        return done / self.generate_s if self.generate_s > 0 else 0.0


def print_summary(s: Summary, out: TextIO) -> None:
    state = "interrupted" if s.interrupted else "done"
    print(
        f"{state}: {s.ok} ok, {s.failed} failed, {s.skipped} skipped of {s.planned} images"
        + (f" at {s.images_per_s:.2f} images/s" if s.generate_s else ""),
        file=out,
    )
    if s.ranking is not None and not s.ranking.empty:
        print(f"best by {s.rank_by} (mean over seeds, 95% interval):", file=out)
        for record in s.ranking.head(3).to_dict("records"):
            mean = record[f"{s.rank_by}_mean"]
            interval = f"  [{record['ci_low']:.3f}, {record['ci_high']:.3f}]" if record["ci_low"] == record["ci_low"] else ""
            print(f"  {record['rank']}. {record['cell']}: {mean:.3f}{interval}", file=out)
    print(f"outputs: {s.folder}  (images/, results.parquet, grids/, config.yaml)", file=out)
    if s.report:
        print(f"report:  {s.report}  (ranking, curves, grids; open it in a browser)", file=out)
    if s.grids:
        print(f"grids:   {len(s.grids)} in {s.folder / 'grids'}, e.g. {s.grids[0]}", file=out)
    if s.tracking_uri:
        print(f"mlflow:  experiment '{s.sweep}', parent run {s.parent_run_id}", file=out)
        print(f"         open it with: {ui_command(s.tracking_uri)}", file=out)
        if not s.tracking_uri.startswith(("http://", "https://")):
            print(f"         then the runs: {runs_view_url(s.experiment_id)}", file=out)
    if s.tracking_errors:
        print(f"warning: {s.tracking_errors} images could not be logged to MLflow; the next run or `lora-sweep sync` logs them", file=out)
    if s.failed:
        print("retry the failed images with: lora-sweep run <same overrides> retry_failed=true", file=out)
    if s.interrupted:
        print("continue where it stopped with the same command", file=out)
