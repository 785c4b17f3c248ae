"""The remote engine: the provider's text2img HTTP API (../shared/spec/remote-api.md), or our own `serve`.

One client, one policy (remote-api.md, "a robust client"):
  submit -> parse the JSON whatever the HTTP status (a non-JSON body is an error carrying its text);
  rate limited (429, or a message about the rate limit or queue) -> wait `retry_after` or back off
  (5 s doubling to 80 s), bounded; fatal (invalid key, credits, model not found, validation) -> fail
  that request at once; 5xx / "try again" -> transient, bounded retries; `processing` -> wait the
  `eta` (kept within 1..10 s), then poll fetch every 3 s growing to 10 s until a deadline (300 s);
  on timeout the error keeps the remote id, so the next run fetches instead of paying again.
At most `max_in_flight` requests at once (the provider's smallest queue is 5).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
from omegaconf import DictConfig
from PIL import Image

from runner.config import Policy
from runner.engines.base import ImageResult
from runner.errors import UserError
from runner.request import to_api_fields

log = logging.getLogger(__name__)

RATE_MARKERS = ("rate limit", "queue")
TRANSIENT_MARKERS = ("try again", "temporarily", "internal server error", "timeout", "overloaded", "unavailable")
PNG_MAGIC = b"\x89PNG"
JPEG_MAGIC = b"\xff\xd8"
WEBP_MAGIC = b"RIFF"


class RemoteError(Exception):
    """A request that failed; `remote_id` is kept when the provider already accepted it."""

    def __init__(self, message: str, *, fatal: bool = True, remote_id: str | None = None):
        super().__init__(message)
        self.fatal = fatal
        self.remote_id = remote_id


def message_of(body: dict[str, Any]) -> str:
    """The provider's message, whichever spelling it used (`message`, legacy `messege`)."""
    value = body.get("message") or body.get("messege") or body.get("error") or ""
    if isinstance(value, (dict, list)):
        value = "; ".join(f"{k}: {v}" for k, v in value.items()) if isinstance(value, dict) else "; ".join(map(str, value))
    return str(value)


def classify(status_code: int, body: dict[str, Any]) -> str:
    """'ok' | 'processing' | 'rate_limited' | 'transient' | 'fatal' for one reply."""
    status = str(body.get("status", "")).lower()
    message = message_of(body).lower()
    if status == "success":
        return "ok"
    if status in ("processing", "queued", "pending"):
        return "processing"
    if status_code == 429 or any(m in message for m in RATE_MARKERS):
        return "rate_limited"
    if status_code >= 500 or any(m in message for m in TRANSIENT_MARKERS):
        return "transient"
    return "fatal"  # invalid key, credits, model not found, validation, and anything unknown: not retried


def decode_image(data: bytes | str) -> bytes:
    """Image bytes from raw bytes, base64 text, or a data: URL (with or without the prefix)."""
    if isinstance(data, bytes) and data.startswith((PNG_MAGIC, JPEG_MAGIC, WEBP_MAGIC)):
        return data
    text = data.decode("ascii", errors="replace") if isinstance(data, bytes) else data
    text = text.strip()
    if text.startswith("data:"):
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise RemoteError(f"image is neither image bytes nor base64 ({exc})") from None


class Text2ImgClient:
    """A small client of the provider's API: submit, poll, download."""

    def __init__(self, base_url: str, key: str, policy: Policy = Policy(), sleep: Callable[[float], None] = time.sleep):
        self.base_url = base_url.rstrip("/")
        self._key = key
        self.policy = policy
        self.sleep = sleep
        self.http = httpx.Client(timeout=policy.request_timeout_s, follow_redirects=True)

    def __repr__(self) -> str:  # never show the key
        return f"Text2ImgClient({self.base_url!r})"

    def close(self) -> None:
        self.http.close()

    # ------------------------------------------------------------ one HTTP call

    def _post(self, url: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        response = self.http.post(url, json={**payload, "key": self._key})
        try:
            body = response.json()
        except ValueError:
            text = response.text.strip().replace("\n", " ")[:200]
            body = {"status": "error", "message": f"HTTP {response.status_code}, not JSON: {text or '(empty body)'}"}
        if not isinstance(body, dict):
            body = {"status": "error", "message": f"HTTP {response.status_code}, unexpected reply {str(body)[:200]}"}
        return response.status_code, body

    # ------------------------------------------------------------ the policy

    def submit(self, payload: dict[str, Any]) -> dict[str, Any]:
        """POST text2img until it is accepted (success or processing) or fails for good."""
        rate_limited = transient = 0
        backoff = self.policy.backoff_initial_s
        while True:
            try:
                code, body = self._post(f"{self.base_url}/api/v6/images/text2img", payload)
                kind = classify(code, body)
            except httpx.HTTPError as exc:
                code, body, kind = 0, {"message": f"{type(exc).__name__}: {exc}"}, "transient"
            if kind in ("ok", "processing"):
                return body
            if kind == "rate_limited":
                rate_limited += 1
                if rate_limited > self.policy.max_rate_limit_retries:
                    raise RemoteError(f"still rate limited after {rate_limited - 1} retries: {message_of(body)}", fatal=False)
                wait_s = float(body.get("retry_after") or backoff)
                self.sleep(min(wait_s, self.policy.backoff_max_s))
                backoff = min(backoff * 2, self.policy.backoff_max_s)
            elif kind == "transient":
                transient += 1
                if transient > self.policy.max_transient_retries:
                    raise RemoteError(f"provider kept failing ({message_of(body) or f'HTTP {code}'})", fatal=False)
                self.sleep(min(backoff, self.policy.backoff_max_s))
                backoff = min(backoff * 2, self.policy.backoff_max_s)
            else:
                raise RemoteError(message_of(body) or f"HTTP {code}", fatal=True)

    def fetch_once(self, remote_id: str) -> tuple[str, dict[str, Any]]:
        """One poll, in the SDKs' form (fetch/{id}); the documented form (request_id) as the fallback."""
        code, body = self._post(f"{self.base_url}/api/v6/images/fetch/{remote_id}", {})
        if code == 404:
            code, body = self._post(f"{self.base_url}/api/v6/images/fetch", {"request_id": remote_id})
        return classify(code, body), body

    def wait_for(self, remote_id: str, eta: float | None, started: float) -> dict[str, Any]:
        """Poll until the result is ready; transient trouble while polling is waited out until the deadline."""
        policy = self.policy
        self.sleep(min(max(float(eta or policy.eta_min_s), policy.eta_min_s), policy.eta_max_s))
        interval = policy.poll_initial_s
        while True:
            try:
                kind, body = self.fetch_once(remote_id)
            except httpx.HTTPError as exc:
                kind, body = "transient", {"message": str(exc)}
            if kind == "ok" and self.image_sources(body):
                return body
            if kind == "fatal" or str(body.get("status", "")).lower() == "failed":
                raise RemoteError(message_of(body) or "the provider reported a failure", fatal=True, remote_id=remote_id)
            if time.monotonic() - started + interval > policy.deadline_s:
                raise RemoteError(
                    f"no result after {policy.deadline_s:g} s (remote id {remote_id}; the next run fetches it instead of paying again)",
                    fatal=False,
                    remote_id=remote_id,
                )
            self.sleep(interval)
            interval = min(interval + 1.0 if interval >= 1 else interval * 1.5, policy.poll_max_s)

    @staticmethod
    def image_sources(body: dict[str, Any]) -> list[str]:
        """Images from `output`, else `proxy_links`, else `future_links` (output is "" while queued)."""
        for name in ("output", "proxy_links", "future_links"):
            value = body.get(name)
            if isinstance(value, str) and value:
                value = [value]
            if isinstance(value, list) and [v for v in value if v]:
                return [str(v) for v in value if v]
        return []

    def download(self, source: str, started: float) -> bytes:
        """An image from a URL (bytes or base64 text) or inline base64; a CDN not ready yet is retried."""
        if not source.startswith(("http://", "https://")):
            return decode_image(source)
        interval = self.policy.poll_initial_s
        while True:
            try:
                response = self.http.get(source)
                if response.status_code == 200 and response.content:
                    return decode_image(response.content)
                problem = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}"
            if time.monotonic() - started + interval > self.policy.deadline_s:
                raise RemoteError(f"could not download {source} ({problem})", fatal=False)
            self.sleep(interval)
            interval = min(interval * 1.5, self.policy.poll_max_s)


@dataclass
class RemoteState:
    """Counts for the progress bar: requests queued locally, processing remotely, done."""

    queued: int = 0
    processing: int = 0
    done: int = 0
    eta_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def move(self, src: str | None, dst: str | None) -> None:
        with self.lock:
            if src:
                setattr(self, src, getattr(self, src) - 1)
            if dst:
                setattr(self, dst, getattr(self, dst) + 1)


class RemoteEngine:
    kind = "remote"

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        max_in_flight: int = 5,
        max_steps: int = 50,
        policy: Policy = Policy(),
        keep_adapters: bool = False,  # the provider holds the models and LoRAs: nothing to keep here
        **_: Any,
    ):
        self._stop = threading.Event()  # set when generation ends or is interrupted: waits end at once
        self.client = Text2ImgClient(base_url, api_key, policy, sleep=self._sleep)
        self.max_in_flight = max(1, int(max_in_flight))
        self.max_steps = int(max_steps)
        self.state = RemoteState()
        self._events: list[ImageResult] = []
        self._events_lock = threading.Lock()

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise RemoteError("stopped before the result arrived", fatal=False)

    def check_loras(self, plan: pd.DataFrame) -> list[str]:
        """The provider's LoRA ids name its files, not ours: nothing to match here."""
        return []

    def prepare(self, plan: pd.DataFrame) -> None:
        """Nothing to load: the provider holds the models."""

    def describe(self) -> dict[str, str]:
        return {"engine": self.kind, "base_url": self.client.base_url, "httpx": httpx.__version__}

    def payload(self, row: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """A plan row as the provider's request (its field names and wire types), with what was adjusted."""
        notes = []
        fields = to_api_fields(row)
        fields["samples"] = "1"  # one row, one image: the plan already expanded samples into seeds
        fields["seed"] = int(row["seed"])  # always sent, so results are reproducible
        if int(row["num_inference_steps"]) > self.max_steps:
            fields["num_inference_steps"] = str(self.max_steps)
            notes.append(f"num_inference_steps clamped to the provider's {self.max_steps}")
        return {k: v for k, v in fields.items() if v is not None or k in ("lora_model", "lora_strength", "seed")}, notes

    def generate(self, rows: pd.DataFrame) -> Iterator[ImageResult]:
        """Run every row with at most max_in_flight requests; yields `submitted` events and final results."""
        records = rows.to_dict("records")
        self.state = RemoteState(queued=len(records))
        self._stop.clear()
        executor = ThreadPoolExecutor(max_workers=self.max_in_flight, thread_name_prefix="remote")
        futures: set[Future] = {executor.submit(self._one, row) for row in records}
        try:
            while futures:
                done, futures = wait(futures, timeout=0.2, return_when=FIRST_COMPLETED)
                yield from self._drain_events()
                for future in done:
                    yield future.result()
            yield from self._drain_events()
        finally:  # on Ctrl-C: queued requests are never sent, waiting ones stop polling (their ids are journalled)
            self._stop.set()
            executor.shutdown(wait=False, cancel_futures=True)

    def _drain_events(self) -> list[ImageResult]:
        with self._events_lock:
            events, self._events = self._events, []
        return events

    def _one(self, row: dict[str, Any]) -> ImageResult:
        started = time.monotonic()
        remote_id = str(row.get("remote_id") or "") or None
        payload, notes = self.payload(row)
        self.state.move("queued", "processing")
        meta: dict[str, Any] = {}
        try:
            if remote_id:  # submitted by an earlier run that did not get the result: fetch, do not pay again
                body = self.client.wait_for(remote_id, 0, started)
            else:
                body = self.client.submit(payload)
                remote_id = str(body.get("id") or "") or None
                if remote_id:
                    self._event(ImageResult(id=row["id"], status="submitted", seed=int(row["seed"]), meta={"remote_id": remote_id}))
                if str(body.get("status")).lower() != "success" or not self.client.image_sources(body):
                    if not remote_id:
                        raise RemoteError("the provider accepted the request but gave no id to fetch it by", fatal=False)
                    self.state.eta_s = float(body.get("eta") or 0)
                    body = self.client.wait_for(remote_id, body.get("eta"), started)
            image_bytes = self.client.download(self.client.image_sources(body)[0], started)
            image = Image.open(io.BytesIO(image_bytes))
            image.load()
            kept = ("seed", "prompt", "scheduler", "scheduler_used", "W", "H", "steps", "lora_sweep_id")  # the last two: `lora-sweep serve`
            meta = {k: v for k, v in (body.get("meta") or {}).items() if k in kept}
            meta["remote_id"] = remote_id or ""
            if body.get("generationTime") is not None:
                meta["remote_generation_s"] = body.get("generationTime")
            used_seed = int(meta.get("seed", row["seed"]) or row["seed"])
            self.state.move("processing", "done")
            return ImageResult(
                id=row["id"],
                status="ok",
                image=image.convert("RGB"),
                seed=used_seed,
                scheduler=str(meta.get("scheduler_used") or meta.get("scheduler") or row["scheduler"]),
                generation_s=time.monotonic() - started,
                notes=[*notes, *[n for n in str(row.get("notes") or "").split("; ") if n]],
                meta=meta,
            )
        except (RemoteError, httpx.HTTPError, OSError, ValueError) as exc:
            self.state.move("processing", "done")
            kept = getattr(exc, "remote_id", None) or remote_id
            return ImageResult(
                id=row["id"],
                status="failed",
                error=str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__,
                seed=int(row["seed"]),
                scheduler=row["scheduler"],
                generation_s=time.monotonic() - started,
                notes=notes,
                meta={"remote_id": kept or ""} if kept and not getattr(exc, "fatal", True) else {},
            )

    def _event(self, event: ImageResult) -> None:
        with self._events_lock:
            self._events.append(event)

    def close(self) -> None:
        self._stop.set()
        self.client.close()


def require_api_key(cfg: DictConfig) -> str:
    """The provider's key, from the environment variable (or file) the config names; never from YAML."""
    if cfg.engine.get("api_key_file"):
        try:
            key = Path(cfg.engine.api_key_file).expanduser().read_text().strip()
        except OSError as exc:
            raise UserError(f"engine.api_key_file: cannot read {cfg.engine.api_key_file} ({exc.strerror})") from None
    else:
        key = os.environ.get(cfg.engine.api_key_env, "").strip()
    if not key:
        raise UserError(
            f"engine.api_key_env: the remote engine needs an API key; set it with: export {cfg.engine.api_key_env}=YOUR_KEY "
            "(or set engine.api_key_file=PATH)"
        )
    return key


def with_remote_ids(pending: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """Rows an earlier run submitted but did not finish carry their remote id: fetch, do not pay twice."""
    if "meta.remote_id" not in results:
        return pending
    known = results.dropna(subset=["meta.remote_id"])
    known = known[known["meta.remote_id"].astype(str) != ""].set_index("id")["meta.remote_id"]
    return pending.assign(remote_id=pending["id"].map(known).fillna(""))
