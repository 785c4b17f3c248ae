"""An imitation of the provider's text2img API, served for real on 127.0.0.1, with its quirks.

Quirks (remote-api.md): errors with HTTP 200 and the misspelt `messege`; `output: ""` while queued;
rate-limit replies with `retry_after`; 5xx bursts; a slow queue; base64 outputs with and without
the data: prefix (inline, or behind a URL); image URLs served by the server itself.
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

KEY = "sk-fake-provider-key-0123456789abcdef"


@dataclass
class Behaviour:
    rate_limit_first: int = 0  # the first N submits answer the rate-limit error (HTTP 200, retry_after)
    http_429_first: int = 0  # ... or HTTP 429 with `messege`
    errors_5xx_first: int = 0  # the first N submits answer 500/503 (one of them not JSON)
    processing_polls: int = 1  # fetches answering "processing" (output "") before success; -1 = never
    immediate_success: bool = False  # submit answers success with the output at once
    output: str = "url"  # url | base64_url | base64_data_url | inline_data | inline_raw | proxy_only
    fetch_form: str = "path"  # path (fetch/{id}) | body (fetch with request_id only)
    fail_models: tuple[str, ...] = ()  # model ids answered "Model not found"


@dataclass
class Provider:
    behaviour: Behaviour = field(default_factory=Behaviour)
    submits: list[dict[str, Any]] = field(default_factory=list)
    fetches: list[str] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight_seen: int = 0
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ids: Any = field(default_factory=lambda: itertools.count(1000))
    base_url: str = ""

    def image_png(self, request: dict[str, Any]) -> bytes:
        digest = hashlib.sha256(f"{request.get('prompt')}|{request.get('seed')}|{request.get('lora_model')}".encode()).digest()
        image = Image.new("RGB", (int(request.get("width", 64)), int(request.get("height", 64))), tuple(digest[:3]))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    def outputs(self, job_id: str) -> dict[str, Any]:
        kind = self.behaviour.output
        png = self.jobs[job_id]["png"]
        url = f"{self.base_url}/cdn/{job_id}.png"
        if kind == "inline_data":
            return {"output": ["data:image/png;base64," + base64.b64encode(png).decode()]}
        if kind == "inline_raw":
            return {"output": [base64.b64encode(png).decode()]}
        if kind in ("base64_url", "base64_data_url"):
            return {"output": [f"{self.base_url}/cdn/{job_id}.b64"]}
        if kind == "proxy_only":
            return {"output": [], "proxy_links": [url]}
        return {"output": [url], "proxy_links": [url]}


def make_handler(provider: Provider):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def reply(self, code: int, body: Any, raw: bytes | None = None, content_type: str = "application/json") -> None:
            data = raw if raw is not None else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            name = self.path.rsplit("/", 1)[-1]
            job_id, _, ext = name.partition(".")
            job = provider.jobs.get(job_id)
            if job is None:
                return self.reply(404, {"status": "error"})
            png = job["png"]
            if ext == "b64":
                text = base64.b64encode(png).decode()
                if provider.behaviour.output == "base64_data_url":
                    text = "data:image/png;base64," + text
                return self.reply(200, None, raw=text.encode(), content_type="text/plain")
            return self.reply(200, None, raw=png, content_type="image/png")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                return self.reply(400, {"status": "error", "message": "invalid JSON"})
            if self.path.endswith("/images/text2img"):
                with provider.lock:
                    provider.submits.append({k: v for k, v in body.items() if k != "key"})
            if body.get("key") != KEY:
                return self.reply(200, {"status": "error", "messege": "Invalid API key"})
            if self.path.endswith("/images/text2img"):
                return self.submit(body)
            if "/images/fetch" in self.path:
                return self.fetch(body)
            return self.reply(404, {"status": "error", "message": "no such endpoint"})

        def submit(self, body: dict[str, Any]) -> None:
            b = provider.behaviour
            with provider.lock:
                n = len(provider.submits)
                if n <= b.errors_5xx_first:
                    if n % 2:
                        return self.reply(503, None, raw=b"<html>Service Unavailable</html>", content_type="text/html")
                    return self.reply(500, {"status": "error", "message": "Internal server error. Please try again."})
                if n <= b.errors_5xx_first + b.rate_limit_first:
                    return self.reply(
                        200, {"status": "error", "message": "Rate limit exceeded. Maximum 5 queued requests allowed.", "retry_after": 0.05}
                    )
                if n <= b.errors_5xx_first + b.rate_limit_first + b.http_429_first:
                    return self.reply(429, {"status": "error", "messege": "Too many requests in queue"})
                if body.get("model_id") in b.fail_models:
                    return self.reply(200, {"status": "error", "message": f"Model not found: {body.get('model_id')}"})
                if not body.get("prompt"):
                    return self.reply(200, {"status": "error", "messege": "prompt is required"})
                job_id = str(next(provider.ids))
                provider.jobs[job_id] = {"png": provider.image_png(body), "polls": 0, "request": body}
                provider.in_flight += 1
                provider.max_in_flight_seen = max(provider.max_in_flight_seen, provider.in_flight)
            meta = {
                "seed": body.get("seed"),
                "prompt": body.get("prompt") + " (enhanced)" if body.get("enhance_prompt") == "yes" else body.get("prompt"),
                "W": int(body.get("width", 512)),
                "H": int(body.get("height", 512)),
                "steps": int(body.get("num_inference_steps", 30)),
                "scheduler": body.get("scheduler"),
                "lora": body.get("lora_model"),
                "lora_strength": body.get("lora_strength"),
            }
            if b.immediate_success:
                with provider.lock:
                    provider.in_flight -= 1
                return self.reply(
                    200, {"status": "success", "generationTime": 1.5, "id": int(job_id), **provider.outputs(job_id), "meta": meta}
                )
            return self.reply(
                200,
                {
                    "status": "processing",
                    "eta": 0.05,
                    "messege": "Try to fetch request after seconds estimated",
                    "tip": "",
                    "webhook_status": "",
                    "id": int(job_id),
                    "fetch_result": f"{provider.base_url}/api/v6/images/fetch/{job_id}",
                    "output": [],
                    "meta": meta,
                    "future_links": [f"{provider.base_url}/cdn/{job_id}.png"],
                },
            )

        def fetch(self, body: dict[str, Any]) -> None:
            b = provider.behaviour
            tail = self.path.rstrip("/").rsplit("/", 1)[-1]
            if tail == "fetch":
                job_id = str(body.get("request_id", ""))
            elif b.fetch_form == "body":
                return self.reply(404, {"status": "error", "message": "use /fetch with request_id"})
            else:
                job_id = tail
            provider.fetches.append(job_id)
            job = provider.jobs.get(job_id)
            if job is None:
                return self.reply(200, {"status": "failed", "id": job_id, "messege": "Request not found"})
            with provider.lock:
                job["polls"] += 1
                ready = b.processing_polls >= 0 and job["polls"] > b.processing_polls
                if ready and not job.get("counted"):
                    job["counted"] = True
                    provider.in_flight -= 1
            if not ready:
                return self.reply(200, {"status": "processing", "messege": "try again later.", "output": ""})
            return self.reply(
                200, {"status": "success", "id": int(job_id), **provider.outputs(job_id), "meta": {"seed": job["request"].get("seed")}}
            )

    return Handler


class FakeProviderServer:
    def __init__(self, behaviour: Behaviour | None = None):
        self.provider = Provider(behaviour or Behaviour())
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self.provider))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.provider.base_url = self.url
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeProviderServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
