"""`lora-sweep serve`, started for real on 127.0.0.1 and used as its clients would: our remote engine, plain httpx
with the spec page's example body, many concurrent clients, generated junk bodies, a restart."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pandas as pd
import pytest
from helpers import SMALL_SWEEP, Workspace, free_port, mlflow_runs, sweep_images, wait_until_healthy
from PIL import Image

from runner.errors import UserError
from runner.prepare import plan_or_fail

pytestmark = pytest.mark.slow

KEYS = ["sk-serve-alpha-0f1e2d3c4b5a", "sk-serve-beta-9a8b7c6d5e4f", "sk-serve-gamma-13579bdf", "sk-serve-delta-2468ace0"]
EXAMPLE_BODY = {  # the spec page's example, ids changed to the demo's
    "key": "",
    "model_id": "tiny-sd",
    "prompt": "a female model doing photoshoot, ultra realistic face, ultra high resolution, 4K image",
    "negative_prompt": "painting, extra fingers, mutated hands, poorly drawn hands, poorly drawn face, deformed, ugly, blurry",
    "width": "512",
    "height": "512",
    "samples": "1",
    "num_inference_steps": "30",
    "safety_checker": "yes",
    "enhance_prompt": "yes",
    "seed": None,
    "guidance_scale": 7.5,
    "panorama": "no",
    "self_attention": "no",
    "upscale": "no",
    "embeddings_model": None,
    "lora_model": "sunset,stripes",
    "lora_strength": "0.45,0.55",
    "scheduler": "UniPCMultistepScheduler",
    "webhook": None,
    "track_id": None,
}


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    outputs: Path
    log: Path

    def post(self, path: str, body, **kwargs) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=60, **kwargs)

    def submit(self, body: dict) -> dict:
        return self.post("/api/v6/images/text2img", body).json()

    def wait_for(self, job_id: int, key: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self.post(f"/api/v6/images/fetch/{job_id}", {"key": key}).json()
            if reply["status"] != "processing":
                return reply
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not finish")

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0


def start_server(root: Path, assets: Path, *overrides: str, keys: list[str] = KEYS, port: int | None = None) -> Server:
    """`lora-sweep serve` in its own process; returns once /health answers."""
    port = port or free_port()
    log = root / f"serve-{port}-{time.monotonic_ns()}.log"
    root.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "runner.cli", "serve", f"paths.outputs={root / 'outputs'}", f"paths.assets={assets}"]
    args.append(f"serve.port={port}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORA_SWEEP_API_KEYS": ",".join(keys)}
    with open(log, "w") as sink:
        proc = subprocess.Popen([*args, *overrides], cwd=root, stdout=sink, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, f"http://127.0.0.1:{port}", root / "outputs", log)
    wait_until_healthy(f"{server.url}/health", proc, 180, "serve", log=log.read_text)
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory, assets_dir):
    """One server for the module: batch size 1 (pixel parity with a local run), MLflow on."""
    server = start_server(tmp_path_factory.mktemp("serve"), assets_dir, "engine.batch_size=1", "tracking=sqlite", "serve.wait_s=5")
    yield server
    assert server.stop() == 0, server.log.read_text()


def png_of(url: str) -> Image.Image:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def test_a_sweep_through_serve_matches_the_local_run_pixel_for_pixel(server, workspace):
    """The same plan run locally and with engine=remote against `serve`: identical pixels, the same ids, matching MLflow params."""
    path = workspace.sweep("small", SMALL_SWEEP)
    workspace.run(f"sweep={path}", "engine.batch_size=1", "tracking=sqlite").assert_all_ok()  # locally, in this process
    remote_ws = Workspace(workspace.root / "remote", workspace.assets)
    remote_ws.root.mkdir()
    remote_path = remote_ws.sweep("small", SMALL_SWEEP)
    remote = remote_ws.cli(
        "run",
        f"sweep={remote_path}",
        "engine=remote",
        f"engine.base_url={server.url}",
        "tracking=none",
        env={"MODELSLAB_API_KEY": KEYS[0]},
    )
    assert remote.code == 0, remote.out + remote.err
    assert "done: 8 ok, 0 failed" in remote.out

    local_rows, local_pixels = sweep_images(workspace.outputs, "small")
    remote_rows, remote_pixels = sweep_images(remote_ws.outputs, "small")
    cell = ["lora_model", "lora_strength", "seed"]
    pairs = local_rows.merge(remote_rows, on=cell, suffixes=("_local", "_remote"))
    assert len(pairs) == 8
    for record in pairs.to_dict("records"):
        assert record["meta.lora_sweep_id"] == record["id_local"], "the server keys the image by the id `run` gives it"
        assert np.array_equal(local_pixels(record["id_local"]), remote_pixels(record["id_remote"])), record

    def child_params(outputs: Path, experiment: str) -> dict[str, dict]:
        _, runs = mlflow_runs(outputs, experiment)
        params = [c for c in runs.columns if c.startswith("params.")] + ["tags.scheduler_used", "tags.seed_used"]
        return {r["tags.lora_sweep.id"]: {c: r[c] for c in params if isinstance(r[c], str)} for r in runs.to_dict("records")}

    local_params = child_params(workspace.outputs, "small")
    served_params = child_params(server.outputs, "served")
    for image_id in local_rows["id"]:
        assert image_id in served_params, "each served image is an MLflow run under its id"
        mine, theirs = local_params[image_id], served_params[image_id]
        assert mine == theirs and len(mine) > 20


def test_the_spec_example_body_with_plain_httpx(server):
    body = {**EXAMPLE_BODY, "key": KEYS[1]}
    reply = server.submit(body)
    assert reply["status"] in ("success", "processing"), reply
    job_id = reply["id"]
    if reply["status"] == "processing":
        assert reply["eta"] > 0 and reply["messege"] and reply["output"] == [] and len(reply["future_links"]) == 1
        assert reply["fetch_result"].endswith(f"/api/v6/images/fetch/{job_id}")
        reply = server.wait_for(job_id, KEYS[1])
    assert reply["status"] == "success", reply
    meta = reply["meta"]
    assert (meta["W"], meta["H"], meta["steps"], meta["n_samples"]) == (512, 512, 30, 1)
    assert meta["lora"] == "sunset,stripes" and meta["lora_strength"] == "0.45,0.55"
    assert isinstance(meta["seed"], int) and 0 <= meta["seed"] < 2**32, "seed: null draws one and echoes it"
    assert len(reply["output"]) == 1 and reply["proxy_links"] == reply["output"]
    assert png_of(reply["output"][0]).size == (512, 512)

    by_body = server.post("/api/v6/images/fetch", {"key": KEYS[1], "request_id": str(job_id)}).json()
    assert by_body["status"] == "success" and by_body["output"] == reply["output"], "both fetch forms answer the same"

    again = server.submit({**body, "seed": meta["seed"], "base64": "yes"})  # the same image: no second generation
    assert again["status"] == "success" and again["meta"]["lora_sweep_id"] == meta["lora_sweep_id"]
    text = httpx.get(again["output"][0], timeout=30).text
    decoded = Image.open(io.BytesIO(base64.b64decode(text)))
    assert decoded.size == (512, 512), "base64: yes gives a URL whose body is the PNG as base64"


def test_bad_requests_get_the_cli_words_and_keys_stay_secret(server, workspace):
    tiny = {"key": KEYS[2], "prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 2}
    assert server.submit({**tiny, "key": "sk-not-a-key"}) == {
        "status": "error",
        "message": "Invalid API key",
        "messege": "Invalid API key",
    }
    assert server.submit({k: v for k, v in tiny.items() if k != "key"})["message"] == "Invalid API key"

    # the same refusals, in the same words, as `lora-sweep plan` gives for the same fields
    bad = {"width": "65", "guidance_scale": "25", "clip_skip": "9", "lora_strength": "0.5,0.7"}
    sweep = workspace.sweep("bad", {"base": {**{k: v for k, v in tiny.items() if k != "key"}, **bad, "lora_model": "sunset"}})
    with pytest.raises(UserError) as refused:  # what `lora-sweep plan` prints as its error: lines
        plan_or_fail(workspace.config(f"sweep={sweep}"))
    cli_lines = refused.value.lines
    assert len(cli_lines) == len(bad), cli_lines
    for field, value in bad.items():
        reply = server.submit({**tiny, "lora_model": "sunset", field: value})
        assert reply["status"] == "error" and reply["message"] in cli_lines, (reply, cli_lines)
    unknown = server.submit({**tiny, "lora_model": "sunsett"})
    assert unknown["message"].startswith("lora_model: unknown LoRA id 'sunsett'; did you mean 'sunset'?"), unknown
    assert server.submit({**tiny, "scheduler": "KarrasVeScheduler"})["message"].startswith("scheduler: ")

    clamped = server.submit({**tiny, "num_inference_steps": "999", "seed": 5})
    if clamped["status"] == "processing":  # 150 steps may outlast serve.wait_s on a busy machine
        clamped = {**server.wait_for(clamped["id"], KEYS[2]), "tip": clamped["tip"]}
    assert clamped["status"] == "success" and clamped["meta"]["steps"] == 150 and "clamped" in clamped["tip"]

    mine = server.submit({**tiny, "seed": 11})
    assert mine["status"] == "success"
    other = server.post(f"/api/v6/images/fetch/{mine['id']}", {"key": KEYS[3]}).json()
    assert other["status"] == "error" and "not found" in other["message"], "another key's job is not found"

    assert server.post("/api/v6/images/text2img", {**tiny, "negative_prompt": "x" * 70000}).status_code == 413
    images = server.outputs / "served" / "images"
    secret_target = server.outputs / "served" / "jobs.db"
    (images / "0123456789abcdef.png").symlink_to(secret_target)
    for name in ["..%2Fjobs.db", "%2e%2e%2fjobs.db", "..%252Fjobs.db", "0123456789abcdef.png", "../jobs.db", "x.png"]:
        response = httpx.get(f"{server.url}/images/{name}", timeout=10)
        assert response.status_code == 404, (name, response.status_code)
        assert b"SQLite" not in response.content
    assert httpx.post(f"{server.url}/images/x", timeout=10).status_code in (404, 405)

    for file in [server.log, *server.outputs.rglob("*")]:
        if file.is_file():
            data = file.read_bytes()
            assert not any(key.encode() in data for key in KEYS), f"a key was written to {file}"


def test_many_concurrent_clients_each_job_finishes_or_is_rate_limited(server):
    """200 submits from 20 clients on 2 keys (5 queued per key): none lost, none duplicated, memory bounded.

    The 200 requests ask for 25 distinct images: a repeated request is answered from the image already made,
    so the load is on the queue, the job database and the limits, not on the CPU."""
    before = server.rss_mb()
    replies: list[tuple[str, dict]] = []
    lock = threading.Lock()

    def client(number: int) -> None:
        key = KEYS[number % 2]
        with httpx.Client(timeout=60) as http:
            for i in range(10):
                body = {"key": key, "prompt": "a fox", "width": 32, "height": 32, "num_inference_steps": 2, "seed": (number * 10 + i) % 25}
                reply = http.post(f"{server.url}/api/v6/images/text2img", json=body).json()
                if reply["status"] == "processing":
                    deadline = time.monotonic() + 120  # a stalled queue fails the test instead of hanging the suite
                    while reply["status"] == "processing":
                        assert time.monotonic() < deadline, f"job {reply['id']} stayed processing"
                        time.sleep(0.05)
                        reply = http.post(f"{server.url}/api/v6/images/fetch", json={"key": key, "request_id": reply["id"]}).json()
                with lock:
                    replies.append((key, reply))

    with ThreadPoolExecutor(20) as pool:
        list(pool.map(client, range(20)))
    assert len(replies) == 200
    limited = [r for _, r in replies if r["status"] == "error"]
    done = [r for _, r in replies if r["status"] != "error"]
    assert all("Rate limit exceeded" in r["message"] and r["retry_after"] > 0 for r in limited), limited[:3]
    assert all(r["status"] == "success" for r in done), [r for r in done if r["status"] != "success"][:3]
    assert done, "some jobs ran"
    ids = [r["id"] for r in done]
    assert len(set(ids)) == len(ids), "no job is answered twice"
    image_of_seed = {}
    for reply in done:
        assert image_of_seed.setdefault(reply["meta"]["seed"], reply["meta"]["lora_sweep_id"]) == reply["meta"]["lora_sweep_id"]
    results = pd.read_json(server.outputs / "served" / "results.jsonl", lines=True)
    made = results[results["id"].isin(image_of_seed.values())]
    assert set(made["status"]) == {"ok"} and made["id"].is_unique, "each distinct image is made once"
    for url in [done[0]["output"][0], done[-1]["output"][0]]:
        assert png_of(url).size == (32, 32)
    health = httpx.get(f"{server.url}/health", timeout=10).json()
    assert health["jobs_waiting"] == 0 and health["images_queued"] == 0
    assert server.rss_mb() - before < 400, "memory stays bounded"


def test_a_job_whose_image_another_job_made_while_it_waited_does_not_stall_the_queue(server):
    """A job waiting in the queue for an image another job is making is finished by it while still queued; the
    worker must go on to the next job (it used to die on that job's id, and every later job stayed processing).

    The first job makes seeds 7, 8 and 9 one at a time; the second asks for seed 7 alone while the first runs, so
    seed 7 is written (finishing the second job) while seed 9 is still on the engine."""
    body = {"key": KEYS[0], "prompt": "a slow owl", "width": 64, "height": 64, "num_inference_steps": 80, "seed": 7}
    url = f"{server.url}/api/v6/images/text2img"
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(lambda: httpx.post(url, json={**body, "samples": 3}, timeout=60).json())
        deadline = time.monotonic() + 30
        while not httpx.get(f"{server.url}/health", timeout=10).json()["jobs_running"] and time.monotonic() < deadline:
            time.sleep(0.02)  # the first job is on the engine: the second now waits in the queue for its image
        second = pool.submit(lambda: httpx.post(url, json={**body, "key": KEYS[1]}, timeout=60).json())
        first, second = first.result(), second.result()
    after = httpx.post(url, json={**body, "num_inference_steps": 2, "seed": 8}, timeout=60).json()
    deadline = time.monotonic() + 60
    while after["status"] == "processing" and time.monotonic() < deadline:
        time.sleep(0.05)
        after = httpx.post(f"{server.url}/api/v6/images/fetch", json={"key": KEYS[0], "request_id": after["id"]}, timeout=30).json()
    replies = [first, second, after]
    assert all(r["status"] in ("success", "processing") for r in replies[:2]), replies[:2]
    assert after["status"] == "success", after
    assert httpx.get(f"{server.url}/health", timeout=10).json()["jobs_waiting"] == 0


def test_generated_junk_bodies_never_get_a_5xx_or_a_traceback(server):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from runner.request import FIELDS

    junk = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=30),
        st.lists(st.integers(), max_size=3),
        st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    )
    small = {  # valid-looking values stay small: a junk body that passes must not tie up the CPU
        "width": st.one_of(junk, st.sampled_from([8, "16", 24, "32"])),
        "height": st.one_of(junk, st.sampled_from([8, "16", 24, "32"])),
        "num_inference_steps": st.one_of(junk, st.sampled_from([1, "2"])),
        "samples": st.one_of(junk, st.sampled_from([1, "2"])),
    }
    field_values = {name: small.get(name, junk) for name in FIELDS if name != "prompt"}
    bodies = st.fixed_dictionaries(
        {"key": st.sampled_from([KEYS[3], "", None, 5, "nope"]), "prompt": st.one_of(junk, st.just("a fox"))},
        optional={**field_values, "zz_unknown": junk, "request_id": junk},
    )
    http = httpx.Client(timeout=60)

    def check(response: httpx.Response) -> None:
        assert response.status_code < 500, response.text
        assert "Traceback" not in response.text and 'File "' not in response.text
        assert response.json()["status"] in ("success", "processing", "error", "failed")

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies, raw=st.one_of(st.binary(max_size=40), st.text(max_size=40)), job=st.one_of(st.integers(), st.text(max_size=10)))
    def fuzz(body, raw, job):
        check(http.post(f"{server.url}/api/v6/images/text2img", content=json.dumps(body, default=str)))
        check(http.post(f"{server.url}/api/v6/images/fetch", content=json.dumps(body, default=str)))
        check(http.post(f"{server.url}/api/v6/images/text2img", content=raw if isinstance(raw, bytes) else raw.encode()))
        response = http.post(f"{server.url}/api/v6/images/fetch/{quote(str(job), safe='')}", json={"key": KEYS[3]})
        assert response.status_code < 500 and "Traceback" not in response.text

    fuzz()
    schema = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    assert "/api/v6/images/text2img" in schema["paths"] and "/api/v6/images/fetch/{request_id}" in schema["paths"]


class WebhookSink:
    """A real HTTP receiver on 127.0.0.1 that records each POST."""

    def __init__(self):
        self.calls: list[dict] = []
        self.arrived = threading.Event()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                sink.calls.append(body)
                sink.arrived.set()
                self.send_response(200)
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_a_restarted_server_keeps_finished_jobs_and_runs_unfinished_ones_and_calls_webhooks(tmp_path, assets_dir):
    root = tmp_path / "restart"
    sink = WebhookSink()
    first = start_server(root, assets_dir, "serve.wait_s=0", "serve.allow_webhooks=true", "engine.batch_size=1")
    key = KEYS[0]
    quick = first.submit({"key": key, "prompt": "a fox", "width": 32, "height": 32, "num_inference_steps": 2, "seed": 1})
    assert first.wait_for(quick["id"], key)["status"] == "success"
    slow = {"key": key, "prompt": "a fox", "width": 128, "height": 128, "num_inference_steps": 8, "webhook": sink.url}
    queued = [first.submit({**slow, "seed": s, "track_id": f"t{s}"}) for s in range(4)]
    assert all(r["status"] == "processing" for r in queued), queued
    assert first.stop(signal.SIGTERM) == 0, first.log.read_text()

    jobs = pd.read_sql("SELECT id, status FROM jobs", f"sqlite:///{root / 'outputs' / 'served' / 'jobs.db'}")
    assert (jobs["status"] != "success").sum() >= 1, "the stop came while jobs were waiting"
    import hashlib

    hashes = tmp_path / "keys.sha256"  # the second start knows the key only by its hash, in a file
    hashes.write_text(f"# team keys\n{hashlib.sha256(key.encode()).hexdigest()}  -\n")
    second = start_server(
        root, assets_dir, "serve.wait_s=0", "serve.allow_webhooks=true", "engine.batch_size=1", f"serve.api_keys_file={hashes}", keys=[]
    )
    try:
        assert second.post(f"/api/v6/images/fetch/{quick['id']}", {"key": KEYS[1]}).json()["message"] == "Invalid API key"
        kept = second.post(f"/api/v6/images/fetch/{quick['id']}", {"key": key}).json()
        assert kept["status"] == "success" and png_of(kept["output"][0]).size == (32, 32), "a finished job survives the restart"
        for reply in queued:
            done = second.wait_for(reply["id"], key, timeout=240)
            assert done["status"] == "success" and png_of(done["output"][0]).size == (128, 128)
        deadline = time.monotonic() + 30
        while len(sink.calls) < 4 and time.monotonic() < deadline:
            sink.arrived.wait(1)
            sink.arrived.clear()
        by_track = {call["track_id"]: call for call in sink.calls}
        assert set(by_track) == {"t0", "t1", "t2", "t3"} and len(sink.calls) == 4, "one webhook per job, track_id echoed"
        assert all(call["status"] == "success" and call["output"] for call in sink.calls)
    finally:
        assert second.stop() == 0
        sink.httpd.shutdown()


def test_serve_refuses_to_start_open_to_a_network_or_without_keys(tmp_path):
    without_keys = {k: v for k, v in os.environ.items() if k != "LORA_SWEEP_API_KEYS"}

    def serve(*overrides: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "runner.cli", "serve", f"paths.outputs={tmp_path}", *overrides]
        return subprocess.run(command, capture_output=True, text=True, env=without_keys, cwd=tmp_path, timeout=120)

    no_keys = serve(f"serve.port={free_port()}")
    assert no_keys.returncode == 2 and "Traceback" not in no_keys.stderr
    assert no_keys.stderr.strip().splitlines() == [
        "error: serve: no API keys are configured; set LORA_SWEEP_API_KEYS=key1,key2 or serve.api_keys_file=FILE "
        "(sha256 hashes), or for a loopback-only server serve.allow_no_auth=true"
    ]
    open_net = serve("serve.host=0.0.0.0", "serve.allow_no_auth=true")
    assert open_net.returncode == 2 and "may only listen on loopback" in open_net.stderr
    helped = subprocess.run(
        [sys.executable, "-m", "runner.cli", "serve", "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert helped.returncode == 0 and "lora-sweep serve" in helped.stdout
    for setting in ("host: 127.0.0.1", "port: 7860", "max_queued_per_key: 5", "allow_webhooks: false", "api_keys_file"):
        assert setting in helped.stdout, setting
