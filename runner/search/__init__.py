"""Search instead of grid: Optuna's ask-and-tell over a sweep file's `search:` space, judged by the report's scores.

spec.py parses the section (pure); prepare.py checks it before the first image (for `plan` and `run`);
loop.py runs the trials through a sweep session; record.py leaves trials.csv, search.json and plots
for the report and MLflow.
"""

from runner.search.loop import run_search
from runner.search.prepare import describe_search, is_search, prepare_search, prepare_search_or_fail

__all__ = ["describe_search", "is_search", "prepare_search", "prepare_search_or_fail", "run_search"]
