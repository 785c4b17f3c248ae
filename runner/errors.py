"""What bad input becomes: one line naming the field, what is wrong and the fix; exit code 2, no traceback.

The lowest layer: every other module may raise or collect these, none of them imports anything of ours.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input: which field, what is wrong, how to fix it."""

    field: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" + (f"; {self.fix}" if self.fix else "")


class UserError(Exception):
    """Bad input: printed as one line per problem, exit code 2, no traceback."""

    def __init__(self, lines: list[str] | str):
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        super().__init__("\n".join(self.lines))


def closest(name: str, options: Iterable[str]) -> str | None:
    """The option most like `name`, for "did you mean" hints."""
    options = list(options)
    lowered = {o.lower(): o for o in options}
    match = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.5)
    return lowered[match[0]] if match else None


def did_you_mean(name: str, options: Iterable[str]) -> str:
    guess = closest(name, options)
    return f"did you mean '{guess}'?" if guess else ""
