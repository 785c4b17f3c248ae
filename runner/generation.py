"""The one generation loop: rows -> engine -> background writer (store, journal, MLflow), for `run`, `serve` and a search.

`Generation` opens the engine and the writer once; `run` feeds it a sweep's pending rows, a search
each batch of trials' rows; `serve` drives `feed_writer` with its own queue. The writer stores and
logs off the generation path; results come back in the order the engine finishes them.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from runner.prepare import PreparedSweep
    from runner.run import Summary
    from runner.store import SweepStore


class Generation:
    """The engine and the background writer, opened once for a run: a sweep calls `run` once, a search once per batch of trials.

    The pipeline and its LoRAs stay loaded between calls; `run` returns when every image it made is written.
    """

    def __init__(
        self,
        cfg: DictConfig,
        prepared: PreparedSweep,
        store: SweepStore,
        tracker,
        rows: dict,
        hashes,
        base_tags,
        api_key=None,
        keep_adapters=False,
    ):
        from runner.engines import create_engine
        from runner.writer import BackgroundWriter

        settings = OmegaConf.to_container(cfg.engine, resolve=True)
        self.cfg = cfg
        self.engine = create_engine(
            settings.pop("kind"),
            registry=prepared.registry,
            upscaler=OmegaConf.to_container(cfg.upscaler),
            api_key=api_key,
            hashes=hashes,  # Ray workers write the PNG text chunks with them
            **settings,
        )
        if keep_adapters and hasattr(self.engine, "keep_adapters"):  # a search's later trials reuse them
            self.engine.keep_adapters = True
        self.writer = None
        try:
            tags = {
                **base_tags,
                **{f"lib.{k}" if k not in ("engine", "device", "dtype") else k: v for k, v in self.engine.describe().items()},
            }
            self.writer = BackgroundWriter(store, tracker, rows, hashes, tags, cfg.tracking.queue_size)
        except BaseException:
            self.engine.close()
            raise
        self.started: float | None = None

    def run(self, pending: pd.DataFrame, summary: Summary, desc: str | None = None) -> None:
        """Generate `pending`, counting into `summary`; KeyboardInterrupt passes through (the caller marks the run KILLED)."""
        from tqdm import tqdm

        if pending.empty:
            return
        self.engine.prepare(pending)
        if self.started is None:
            self.started = time.perf_counter()  # images/s counts generation + writing, not imports and loading
        bar = tqdm(
            total=len(pending),
            unit="img",
            desc=desc or self.cfg.sweep.name,
            disable=not self.cfg.progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        try:
            for result in feed_writer(self.engine, pending, self.writer):
                if result.status == "submitted":  # accepted by a remote engine; its id is journalled
                    bar.set_postfix(**progress_state(self.engine, summary), refresh=True)
                    continue
                if result.status == "ok":
                    summary.ok += 1
                else:
                    summary.failed += 1
                bar.update(1)
                bar.set_postfix(**progress_state(self.engine, summary), refresh=False)
        finally:
            bar.close()
        self.writer.drain()

    def close(self, summary: Summary) -> None:
        try:
            if self.writer is not None:
                self.writer.close()
                summary.tracking_errors = self.writer.tracking_errors
                if self.started is not None:
                    summary.generate_s = time.perf_counter() - self.started
        finally:
            self.engine.close()


def feed_writer(engine, rows: pd.DataFrame, writer, stop: Any = None):
    """The one generation loop (`run`, `serve`, a search): each result to the background writer, then to the caller.

    The writer stores, journals and logs it off the generation path; `stop` (an Event) ends the loop
    after the image in hand, leaving the rest for the next run or server start."""
    for result in engine.generate(rows):
        writer.put(result)
        yield result
        if stop is not None and stop.is_set():
            return


def progress_state(engine, summary: Summary) -> dict[str, Any]:
    """What the progress bar shows beside rate and ETA: failures, and a remote engine's queue."""
    state = getattr(engine, "state", None)
    if state is None:
        return {"failed": summary.failed}
    shown = {"queued": state.queued, "processing": state.processing, "failed": summary.failed}
    if state.eta_s:
        shown["provider_eta"] = f"{state.eta_s:.0f}s"
    return shown
