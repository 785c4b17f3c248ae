"""What `serve` does behind its HTTP routes: check a request, queue it, generate, answer in the provider's shapes.

One request = one job = the rows `prepare_request` makes of it (the same parsing, registry and
validation as a sweep, so ids are the ones `run` gives the same image). The JobQueue (queue.py)
keeps which images each job waits for; one worker thread takes its batches to one LocalEngine
(jobs taken together are handed to the engine together, which batches rows of equal model, blend
and settings in one call); the run's BackgroundWriter writes images and results to the server's
sweep folder and, with tracking on, logs them to MLflow; when a job's last image is on disk the
queue says so, and the job is finished in the job database and its webhook is called.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
from omegaconf import DictConfig

from runner.engines.base import ImageResult
from runner.errors import UserError
from runner.prepare import CheckedRows, PreparedSweep, engine_setting_problems, prepare_request, registry_entries
from runner.registry import HashCache, resolve_all
from runner.request import FIELDS, parse_field
from runner.server.auth import KeyCheck
from runner.server.jobs import Job, JobStore
from runner.server.queue import Finished, JobQueue
from runner.sweep import SweepSession
from runner.sweep.generation import feed_writer
from runner.world.assets import copy_demo_world_if

log = logging.getLogger("lora_sweep.serve")

RATE_LIMIT_RETRY_S = 30
API_ONLY = ("webhook", "track_id")  # the reply's business, not the image's


def error_reply(message: str, **extra: Any) -> dict[str, Any]:
    """The provider's error shape; `messege` (its spelling) and `message` both, as newer replies carry."""
    return {"status": "error", "message": message, "messege": message, **extra}


def yes_no(value: Any) -> str:
    return "yes" if value else "no"


class Service:
    """The server's life is a sweep session's (its folder, MLflow parent, engine and writer) with a job queue in front."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.settings = cfg.serve
        try:
            self.keys = KeyCheck.from_settings(
                cfg.serve.api_keys_env, cfg.serve.api_keys_file, bool(cfg.serve.allow_no_auth), str(cfg.serve.host)
            )
        except ValueError as exc:
            raise UserError(str(exc)) from None
        problems = engine_setting_problems(cfg)
        if problems:
            raise UserError(problems[0])
        self.hashes = HashCache(Path(cfg.paths.outputs) / ".cache" / "hashes.json")
        entries = registry_entries(cfg)
        copy_demo_world_if(any((e or {}).get("builtin") for group in entries.values() for e in group.values()), cfg.paths.assets)
        # every configured file, resolved and hashed once: requests name them by id
        self.registry = resolve_all(entries, {k: set(v) for k, v in entries.items()}, self.hashes)
        for problem in self.registry.problems:
            log.warning("not served: %s", problem)
        if cfg.model.id not in self.registry.models:
            raise UserError(f"model.id: the default model '{cfg.model.id}' cannot be loaded; fix its models: entry or choose another")

        self._stop = threading.Event()  # the engine loop's (feed_writer stops after the image in hand)
        self._webhook_lock = threading.Lock()
        self._webhooks: list[threading.Thread] = []  # calls in flight: a stop waits for them (each has its timeout)
        self.seconds_per_image = 1.0  # measured from every engine call (eta)
        self.images_made = 0

        self.session = SweepSession(
            cfg,
            PreparedSweep(cfg.serve.name, pd.DataFrame(), self.registry, None),
            folder=Path(cfg.paths.outputs) / cfg.serve.name,
            experiment=cfg.serve.name,
            lock_setting="serve.name",
            run_tags={"served": "true"},
            parent_params={"served": "true"},
            name_axes=["lora_model", "lora_strength", "seed"],
            keep_adapters=True,  # the next request likely uses a LoRA again
            one_process=True,  # one engine per server; more GPUs: one server each, behind a proxy
            on_written=self._written,
        ).open()
        try:
            self.store, self.tracker = self.session.store, self.session.tracker
            self.tracking_uri = self.session.summary.tracking_uri
            self.jobs = JobStore(self.store.root / "jobs.db")
            self._rows = self.session.rows  # the writer's view of images in flight (dropped once written)
            self.queue = JobQueue(self.store.ok_ids(), max_batch_images=int(cfg.serve.max_batch_images))
            generation = self.session.generation()
            self.engine, self.writer = generation.engine, generation.writer
            self.engine.prepare(pd.DataFrame({"model_id": [cfg.model.id], "lora_model": [""]}))  # the pipeline, once, at start
        except BaseException:
            self.session.close("FAILED")
            raise
        for job in self.jobs.unfinished():  # a restart: run again what was queued or running
            self._enqueue(job)
        self._worker = threading.Thread(target=self._work, name="lora-sweep-serve", daemon=True)
        self._worker.start()

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.cfg.model.id,
            "device": str(self.engine.device),
            "dtype": str(self.engine.dtype).removeprefix("torch."),
            "models": sorted(self.registry.models),
            "loras": sorted(self.registry.loras),
            "auth": "none (loopback)" if self.keys.open_access else f"{len(self.keys.hashes)} key(s)",
            "webhooks": bool(self.settings.allow_webhooks),
            "tracking": self.tracking_uri,
        }

    def health(self) -> dict[str, Any]:
        counts = self.queue.counts()
        return {
            "status": "ok",
            "model": self.cfg.model.id,
            "device": str(self.engine.device),
            "jobs_waiting": counts.jobs_waiting,
            "jobs_running": counts.jobs_running,  # on the engine now
            "images_queued": counts.images_queued,
            "images_made": self.images_made,
            "seconds_per_image": round(self.seconds_per_image, 4),
        }

    # ------------------------------------------------------------ requests

    def owner(self, body: dict[str, Any]) -> str | None:
        return self.keys.owner(body.get("key"))

    def request_fields(self, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        """(request fields for the plan, the reply's options, notes): key dropped, seed drawn, steps clamped."""
        fields = {k: v for k, v in body.items() if k in FIELDS and k not in API_ONLY}
        ignored = sorted(k for k in body if k not in FIELDS and k not in ("key", "api_key"))
        notes = [f"ignored fields this server does not know: {', '.join(ignored)}"] if ignored else []
        seed = fields.get("seed")
        if seed is None or (isinstance(seed, str) and seed.strip().lower() in ("", "null", "none", "random", "-1")):
            fields["seed"] = secrets.randbelow(2**32)  # the provider draws one for `seed: null` and echoes it in meta.seed
        if "num_inference_steps" in fields:
            steps, problem = parse_field("num_inference_steps", fields["num_inference_steps"])
            top = int(self.settings.max_steps)
            if problem is None and not 1 <= steps <= top:
                fields["num_inference_steps"] = min(max(steps, 1), top)
                notes.append(f"num_inference_steps {steps} clamped to this server's 1..{top}")
        fields.setdefault("model_id", self.cfg.model.id)
        options = {"webhook": body.get("webhook") or None, "track_id": body.get("track_id"), "notes": notes}
        return fields, options, notes

    def submit(self, body: dict[str, Any], base_url: str) -> dict[str, Any]:
        """POST text2img: a reply in the provider's shapes (success, processing or error)."""
        owner = self.owner(body)
        if owner is None:
            return error_reply("Invalid API key")
        fields, options, notes = self.request_fields(body)
        webhook = options["webhook"]
        if webhook is not None:
            if not isinstance(webhook, str) or not webhook.startswith(("http://", "https://")):
                return error_reply("webhook: must be an http:// or https:// URL; or leave it out and fetch the result")
            if not self.settings.allow_webhooks:
                options["webhook"] = None
                options["webhook_status"] = "not sent: webhooks are off on this server (serve.allow_webhooks=false)"
        checked = prepare_request(fields, self.cfg, self.hashes)
        if not isinstance(checked, CheckedRows):
            return error_reply(checked[0], errors=checked)
        rows = json.loads(checked.plan.to_json(orient="records", date_format="iso"))
        job = self.jobs.add(owner, rows, options, limit=int(self.settings.max_queued_per_key))
        if job is None:
            limit = int(self.settings.max_queued_per_key)
            return error_reply(f"Rate limit exceeded. Maximum {limit} queued requests allowed.", retry_after=RATE_LIMIT_RETRY_S)
        event = self._enqueue(job)
        event.wait(max(0.0, float(self.settings.wait_s)))
        return self.reply(self.jobs.get(job.id), base_url, submitted=True)

    def fetch(self, body: dict[str, Any], job_id: Any, base_url: str) -> dict[str, Any]:
        """POST fetch: the job's reply; another key's job is not found (ids are not secrets)."""
        owner = self.owner(body)
        if owner is None:
            return error_reply("Invalid API key")
        try:
            number = int(str(job_id).strip())
        except (TypeError, ValueError):
            return error_reply("request_id: give the id the text2img reply returned")
        job = self.jobs.get(number) if 0 < number < 2**63 else None
        if job is None or (job.owner != owner and not self.keys.open_access):
            return error_reply(f"Request not found: {number}")
        return self.reply(job, base_url, submitted=False)

    # ------------------------------------------------------------ replies

    def image_urls(self, job: Job, base_url: str) -> list[str]:
        base = (self.settings.public_url or base_url).rstrip("/")
        suffix = "base64" if job.rows and job.rows[0].get("base64") else "png"
        return [f"{base}/images/{image_id}.{suffix}" for image_id in job.image_ids]

    def meta(self, job: Job) -> dict[str, Any]:
        """The provider's `meta`, renamed fields included, from the request as parsed (seed: the one really used)."""
        row = job.rows[0]
        return {
            "prompt": row["prompt"],
            "model_id": row["model_id"],
            "negative_prompt": row["negative_prompt"],
            "scheduler": row["scheduler"],
            "scheduler_used": row.get("scheduler_used") or row["scheduler"],
            "safety_checker": yes_no(row["safety_checker"]),
            "W": row["width"],
            "H": row["height"],
            "guidance_scale": row["guidance_scale"],
            "seed": row["seed"],
            "seeds": [r["seed"] for r in job.rows],
            "steps": row["num_inference_steps"],
            "n_samples": len(job.rows),
            "full_url": "no",
            "tomesd": yes_no(row["tomesd"]),
            "upscale": yes_no(row["upscale"]),
            "panorama": yes_no(row["panorama"]),
            "self_attention": yes_no(row["self_attention"]),
            "use_karras_sigmas": yes_no(row["use_karras_sigmas"]),
            "algorithm_type": row.get("algorithm_type"),
            "embeddings": row.get("embeddings_model"),
            "vae": row.get("vae"),
            "lora": row["lora_model"] or None,
            "lora_strength": row["lora_strength"] or None,
            "clip_skip": row["clip_skip"],
            "temp": yes_no(row["temp"]),
            "base64": yes_no(row["base64"]),
            "file_prefix": f"{job.image_ids[0]}.png",
            "lora_sweep_id": job.image_ids[0],  # the image id `lora-sweep run` gives the same image
            "lora_sweep_ids": job.image_ids,
        }

    def reply(self, job: Job | None, base_url: str, submitted: bool) -> dict[str, Any]:
        if job is None:
            return error_reply("Request not found")
        urls = self.image_urls(job, base_url)
        webhook_status = job.webhook_status or job.options.get("webhook_status", "")
        tip = "; ".join(job.options.get("notes") or [])
        track = {"track_id": job.options.get("track_id")} if job.options.get("track_id") is not None else {}
        if job.status == "success":
            return {
                "status": "success",
                "generationTime": round(job.generation_s or 0.0, 3),
                "id": job.id,
                "output": urls,
                "proxy_links": urls,
                "nsfw_content_detected": False,
                "webhook_status": webhook_status,
                "tip": tip,
                "meta": self.meta(job),
                **track,
            }
        if job.status == "failed":
            return {"status": "failed", "id": job.id, "output": [], **error_reply(job.error or "generation failed"), "meta": self.meta(job)}
        if not submitted:  # the fetch form: output is an empty string while queued, and there is no eta
            return {"status": "processing", "id": job.id, "messege": "try again later.", "message": "try again later.", "output": ""}
        base = (self.settings.public_url or base_url).rstrip("/")
        return {
            "status": "processing",
            "tip": tip or "Your image is processing in background, you can get it with the fetch API (fetch_result)",
            "eta": round(self.eta(job.id), 2),
            "messege": "Try to fetch request after seconds estimated",
            "message": "Try to fetch request after seconds estimated",
            "webhook_status": webhook_status,
            "fetch_result": f"{base}/api/v6/images/fetch/{job.id}",
            "id": job.id,
            "output": [],
            "meta": self.meta(job),
            "future_links": urls,
            **track,
        }

    def eta(self, job_id: int) -> float:
        """Seconds until the job is done: the images queued before it and its own, at the measured rate."""
        return max(1.0, self.queue.images_ahead(job_id) * self.seconds_per_image)

    def image_file(self, name: str) -> Path | None:
        """The file behind an image URL, or None: only `<16 hex>.png|.base64` names inside the image folder, no links."""
        match = re.fullmatch(r"([0-9a-f]{16})\.(png|base64)", name)
        if not match:
            return None
        path = self.store.image_path(match.group(1))
        try:
            if path.is_symlink() or path.resolve().parent != self.store.images.resolve() or not path.is_file():
                return None
        except OSError:
            return None
        return path

    # ------------------------------------------------------------ the queue

    def _enqueue(self, job: Job) -> threading.Event:
        """Queue a job; its event is set once the job is finished in the job database (at once when its images all exist)."""
        event = threading.Event()
        finished = self.queue.add(job.id, job.rows, payload=(job, event))
        if finished is not None:  # every image exists already (the same request before): no generation
            self._finish(finished)
        return event

    def _work(self) -> None:
        """The generation worker; an unexpected error is logged and the loop goes on (a dead worker would stall every job)."""
        while not self._stop.is_set():
            try:
                self._work_once()
            except Exception:
                log.exception("the serve worker hit an unexpected error; it goes on with the next jobs")

    def _work_once(self) -> None:
        batch = self.queue.take()
        if not batch:
            return
        try:
            self.jobs.mark_processing(batch.job_ids)
            if batch.rows:
                for row in batch.rows:  # the writer reads each image's row until it is written
                    self._rows.setdefault(row["id"], row)
                self._generate(pd.DataFrame(batch.rows))
        finally:
            self.queue.end_batch()

    def _generate(self, frame: pd.DataFrame) -> None:
        started = time.perf_counter()
        made = 0
        try:
            self.engine.prepare(frame)
            for _ in feed_writer(self.engine, frame, self.writer, stop=self._stop):  # a stop leaves the rest queued in jobs.db
                made += 1
        except Exception as exc:  # the engine itself failed (not one image): fail what it did not make, keep serving
            log.exception("generation failed")
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            for image_id in frame["id"]:
                if self.queue.is_pending(image_id):
                    self.writer.put(ImageResult(id=image_id, status="failed", error=f"Internal server error: {first}"))
        finally:
            if made:
                elapsed = (time.perf_counter() - started) / made
                self.seconds_per_image = 0.5 * self.seconds_per_image + 0.5 * elapsed if self.images_made else elapsed
                self.images_made += made

    def _written(self, record: dict[str, Any]) -> None:
        """The writer put an image (or its failure) on disk: finish the jobs that were waiting only for it."""
        image_id = record["id"]
        self._rows.pop(image_id, None)  # before the queue hears of it: a failed image may be handed out again at once
        for finished in self.queue.written(image_id, record["status"] == "ok", str(record.get("error") or "")):
            self._finish(finished)

    def _finish(self, finished: Finished) -> None:
        """The job in the job database, then the request waiting on it, then its webhook."""
        job, event = finished.payload
        generation_s = time.time() - (job.started or job.created)
        self.jobs.finish(job.id, "failed" if finished.error else "success", finished.error, generation_s)
        event.set()
        if job.options.get("webhook"):
            thread = threading.Thread(target=self._call_webhook, args=(job.id,), daemon=True, name="lora-sweep-webhook")
            with self._webhook_lock:
                self._webhooks = [t for t in self._webhooks if t.is_alive()] + [thread]
            thread.start()

    def _call_webhook(self, job_id: int) -> None:
        """POST the final reply once (best effort, one timeout, no retries), with track_id echoed."""
        job = self.jobs.get(job_id)
        if job is None or not job.options.get("webhook"):
            return
        base = self.settings.public_url or f"http://{self.settings.host}:{self.settings.port}"
        payload = self.reply(job, base, submitted=False)
        payload["track_id"] = job.options.get("track_id")
        if payload["status"] == "failed":
            payload = {"status": "failed", "id": job.id, "message": job.error, "track_id": job.options.get("track_id")}
        try:
            response = httpx.post(job.options["webhook"], json=payload, timeout=float(self.settings.webhook_timeout_s))
            text = f"sent (HTTP {response.status_code})"
        except httpx.HTTPError as exc:
            text = f"failed: {type(exc).__name__}"
        self.jobs.set_webhook_status(job_id, text)

    # ------------------------------------------------------------ shutdown

    def close(self) -> None:
        """Stop taking jobs, write what finished, release the folder (unfinished jobs stay queued in jobs.db)."""
        self._stop.set()
        self.queue.stop()
        self._worker.join(timeout=60)
        self.session.close_generation()  # the writer finishes what was made (and its jobs), then the engine goes
        with self._webhook_lock:
            webhooks = list(self._webhooks)
        for thread in webhooks:
            thread.join(timeout=float(self.settings.webhook_timeout_s) + 1)
        self.jobs.close()
        self.session.close("FINISHED")
