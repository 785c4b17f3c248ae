"""One sweep's life in one place: the session (lock, identity, MLflow parent, generation, scores, report,
finish), the generation loop under it, and the summary it prints.

The grid run, the search, `serve` and the folder commands are thin users of `SweepSession`.
"""

from runner.sweep.session import SweepSession
from runner.sweep.summary import Summary, print_summary

__all__ = ["Summary", "SweepSession", "print_summary"]
