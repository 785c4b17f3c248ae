"""The engine interface: what the runner, the server and a worker pool need from any engine.

An engine turns plan rows into images. It may reorder rows (to switch adapters rarely) and yields
one `ImageResult` per row as images finish, so the caller can store and log them while the next
batch runs. It never writes files or logs to MLflow: that is the store's and the tracker's job.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import pandas as pd


@dataclass
class ImageResult:
    id: str
    status: str  # ok | failed
    image: Any = None  # PIL.Image.Image when ok
    error: str = ""
    seed: int | None = None  # the seed really used
    scheduler: str = ""  # the scheduler class really run
    generation_s: float = 0.0  # this image's share of its batch's wall time
    batch_size: int = 1
    notes: list[str] = field(default_factory=list)  # substitutions, fields not applied, warnings
    meta: dict[str, Any] = field(default_factory=dict)  # engine-specific (remote meta, device, ...)
    png: bytes | None = None  # the image already encoded (Ray workers encode their own PNGs)


@dataclass(frozen=True)
class Capabilities:
    """What an engine can honour; validation checks the plan against it before the first image."""

    kind: str
    schedulers: frozenset[str]
    # request field -> why it is not applied when set (warned once per sweep, recorded per row)
    not_applied: dict[str, str] = field(default_factory=dict)


class QueueState(Protocol):
    """A remote engine's queue as the progress bar shows it (RemoteState in remote.py)."""

    queued: int  # requests waiting here for a free slot
    processing: int  # requests the provider is working on
    eta_s: float  # the provider's last estimate, 0 when it gave none


class Engine(Protocol):
    """Everything the generation loop, the server and the worker pool use of an engine; nothing else is reached into.

    Engines are built by `create_engine(kind, **settings)` with keyword arguments only, and ignore the
    settings of other engines. Each takes `keep_adapters: bool = False`: a server or a search keeps every
    LoRA it loaded, as its next request or trial likely uses it again (engines without adapters ignore it).
    """

    kind: str  # "local" | "remote": which capabilities the plan is validated against

    @property
    def state(self) -> QueueState | None:
        """The remote engine's queue for the progress bar; None for engines without one."""

    def prepare(self, plan: pd.DataFrame) -> None:
        """Load what the pending rows need (pipeline, adapters); called once before generate."""

    def check_loras(self, plan: pd.DataFrame) -> list[str]:
        """One line per LoRA file of the plan whose layers the loaded model lacks (all, a part or some), before image 1."""
        return []

    def generate(self, rows: pd.DataFrame) -> Iterator[ImageResult]:
        """Generate every row, yielding one result per row (failed rows included) as they finish."""

    def describe(self) -> dict[str, str]:
        """Tags for tracking: device, dtype, library versions."""

    def close(self) -> None:
        """Release models and connections; safe to call twice."""
