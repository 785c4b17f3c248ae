"""The one generation loop: rows -> engine -> background writer (store, journal, MLflow), for `run`, `serve` and a search.

`Generation` opens the engine and the writer once; the sweep session feeds it a sweep's pending rows,
a search each batch of trials' rows; `serve` drives `feed_writer` with its own queue. The writer
stores and logs off the generation path; results come back in the order the engine finishes them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from runner.engines.base import Engine
from runner.engines.factory import create_engine
from runner.errors import UserError
from runner.registry import Registry
from runner.store import SweepStore
from runner.sweep.summary import Summary
from runner.writer import BackgroundWriter


class Generation:
    """The engine and the background writer, opened once for a run: a sweep calls `run` once, a search once per batch of trials.

    The pipeline and its LoRAs stay loaded between calls; `run` returns when every image it made is written.
    `keep_adapters` keeps every loaded LoRA (a search's later trials and a server's next requests reuse them);
    `one_process` ignores engine.workers (a server runs one engine; more GPUs: one server each).
    """

    def __init__(
        self,
        cfg: DictConfig,
        *,
        registry: Registry,
        store: SweepStore,
        tracker: Any,
        rows: Mapping[str, Mapping[str, Any]],
        hashes: Mapping[str, str],
        tags: Mapping[str, str],
        api_key: str | None = None,
        keep_adapters: bool = False,
        one_process: bool = False,
        on_written: Callable[[dict[str, Any]], None] | None = None,
    ):
        settings = OmegaConf.to_container(cfg.engine, resolve=True)
        kind = settings.pop("kind")
        if one_process:
            settings.pop("workers", None)
        self.cfg = cfg
        self.engine: Engine = create_engine(
            kind,
            registry=registry,
            upscaler=OmegaConf.to_container(cfg.upscaler),
            api_key=api_key,
            hashes=hashes,  # Ray workers write the PNG text chunks with them
            keep_adapters=keep_adapters,
            **settings,
        )
        self.writer: BackgroundWriter | None = None
        try:
            described = {f"lib.{k}" if k not in ("engine", "device", "dtype") else k: v for k, v in self.engine.describe().items()}
            self.tags = {**tags, **described}
            self.writer = BackgroundWriter(store, tracker, rows, hashes, self.tags, cfg.tracking.queue_size, on_written=on_written)
        except BaseException:
            self.engine.close()
            raise
        self.started: float | None = None

    def run(self, pending: pd.DataFrame, summary: Summary, desc: str | None = None, on_result: Callable[[], None] | None = None) -> None:
        """Generate `pending`, counting into `summary`; KeyboardInterrupt passes through (the caller marks the run KILLED).

        `on_result` is called after each result (the live grid page: it throttles itself)."""
        from tqdm import tqdm

        if pending.empty:
            return
        self.engine.prepare(pending)
        if problems := self.engine.check_loras(pending):  # a LoRA that would be dropped in whole or in part: no image yet
            raise UserError(problems)
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
                if on_result is not None:
                    on_result()
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
    state = engine.state
    if state is None:
        return {"failed": summary.failed}
    shown = {"queued": state.queued, "processing": state.processing, "failed": summary.failed}
    if state.eta_s:
        shown["provider_eta"] = f"{state.eta_s:.0f}s"
    return shown
