"""Search instead of grid: Optuna's ask-and-tell over a sweep file's `search:` space, judged by the report's scores.

spec.py parses the section (pure); loop.py runs trials through `run`'s engine, store and writer;
record.py leaves trials.csv, search.json and plots for the report and MLflow.
"""

from runner.search.loop import describe_search, is_search, prepare_search, run_search

__all__ = ["describe_search", "is_search", "prepare_search", "run_search"]
