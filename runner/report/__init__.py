"""Reports built from the sweep folder alone: comparison grids (and later scores and HTML)."""

from runner.report.grid import make_grids

__all__ = ["make_grids"]
