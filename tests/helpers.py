"""The tests' shared helpers, one copy each (conftest.py holds the fixtures built from them).

Imported as `from helpers import ...` (tests/ is on sys.path, as for tiny_models and ldm_layout).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

# ---------------------------------------------------------------- the CLI, as a user runs it


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> CliResult:
    """Run `lora-sweep ARGS` as a user would: a separate process, its exit code, stdout and stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "runner.cli", *args],
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@dataclass
class Workspace:
    """A temp project directory with its own outputs/ and sweeps/, sharing the session's assets."""

    root: Path
    assets: Path

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def paths(self) -> list[str]:
        """The overrides that point a command at this workspace."""
        return [f"paths.outputs={self.outputs}", f"paths.assets={self.assets}"]

    def sweep(self, name: str, body: str | dict) -> Path:
        path = self.root / "sweeps" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(body, sort_keys=False) if isinstance(body, dict) else textwrap.dedent(body))
        return path

    def cli(self, command: str, *overrides: str, env: dict[str, str] | None = None, timeout: float = 300) -> CliResult:
        return run_cli(command, *self.paths, *overrides, cwd=self.root, env=env, timeout=timeout)

    def start(self, command: str, *overrides: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """`lora-sweep COMMAND` started in the background (to be interrupted, killed, or waited for)."""
        return subprocess.Popen(
            [sys.executable, "-m", "runner.cli", command, *self.paths, *overrides],
            cwd=self.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        )

    def config(self, *overrides: str):
        """The config `lora-sweep plan|run OVERRIDES` composes, composed in this process (see `cli_config`)."""
        return cli_config([*self.paths, *overrides])

    def run(self, *overrides: str) -> RunResult:
        """`lora-sweep run OVERRIDES` in this process (which has torch imported already: about 8 s less than a CLI run
        on 2 cores), for tests of what the images are rather than of the command line; refuses with the UserError."""
        import io

        from runner.run import run_sweep

        out = io.StringIO()
        summary = run_sweep(self.config(*overrides), out=out)
        return RunResult(summary, out.getvalue())

    def folder_command(self, command: str, folder: Path, *overrides: str) -> str:
        """`lora-sweep report|score FOLDER OVERRIDES` in this process (see run); returns what it printed."""
        import io

        from runner import folder_commands

        out = io.StringIO()
        if command == "report":
            assert not overrides, "report takes no overrides"
            folder_commands.report_folder(str(folder), out=out)
        else:
            folder_commands.score_folder(str(folder), list(overrides), out=out)
        return out.getvalue()


@dataclass
class RunResult:
    summary: Any  # runner.sweep.Summary
    out: str

    def assert_all_ok(self) -> None:
        s = self.summary
        assert not s.interrupted and s.failed == 0 and s.ok + s.skipped == s.planned, self.out


def cli_config(argv: list[str]):
    """The config runner/cli.py composes for `plan` or `run` with these overrides, composed in this process.

    A failure is the CLI's one line (the UserError it prints as `error:` lines). The CLI composes once more
    before that (precheck_composition, which also creates the run folder): test_validation.py calls it itself.
    """
    from runner.cli import compose_config

    return compose_config(argv)


def start_run(ws: Workspace, *overrides: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`lora-sweep run` in the background."""
    return ws.start("run", *overrides, env=env)


def journal_lines(folder: Path) -> int:
    journal = folder / "results.jsonl"
    return len(journal.read_text().splitlines()) if journal.exists() else 0


def wait_for_results(folder: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the sweep folder's journal holds `count` lines; fails if the run ends first or nothing comes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if journal_lines(folder) >= count:
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended early: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"fewer than {count} results appeared in {timeout:.0f} s")


# ---------------------------------------------------------------- sweeps and what they leave

SMALL_SWEEP = {
    "name": "small",
    "base": {"prompt": "a red fox", "negative_prompt": "blurry", "width": 64, "height": 64, "num_inference_steps": 4},
    "grid": {
        "lora_model": ["sunset", "sunset,stripes"],
        "lora_strength": [0.5, 1.0],
        "seed": [1, 2],
    },
    "report": {"grid": {"x": "lora_strength", "y": "lora_model"}},
}

SLOW_SWEEP = {  # 12 images slow enough (128 px, 8 steps) to be interrupted midway
    "name": "long",
    "base": {"prompt": "a red fox", "width": 128, "height": 128, "num_inference_steps": 8},
    "grid": {"lora_model": ["sunset", "stripes"], "seed": {"start": 0, "count": 6}},
}


def sweep_images(outputs: Path, sweep: str):
    """The sweep's results (ok rows) joined with their plan rows, and a function giving an image's pixels."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    folder = outputs / sweep
    results = pd.read_parquet(folder / "results.parquet")
    plan = pd.read_parquet(folder / "plan.parquet").drop(columns=["seed", "notes"], errors="ignore")
    rows = plan.merge(results, on="id")
    rows = rows.astype(object).where(rows.notna(), None)  # None, not NaN, where a request field is unset

    def pixels(image_id: str):
        with Image.open(folder / "images" / f"{image_id}.png") as image:
            return np.asarray(image.convert("RGB"), dtype=np.int16)

    return rows, pixels


def assert_complete(ws: Workspace, name: str, plan_size: int) -> None:
    """Every planned image once: whole PNGs, no temp files, one finished MLflow run each under one parent."""
    import pandas as pd
    from PIL import Image

    folder = ws.outputs / name
    results = pd.read_parquet(folder / "results.parquet")
    plan = pd.read_parquet(folder / "plan.parquet")
    assert len(plan) == plan_size
    assert results["id"].is_unique and sorted(results["id"]) == sorted(plan["id"])
    assert set(results["status"]) == {"ok"}
    for image_id in plan["id"]:
        with Image.open(folder / "images" / f"{image_id}.png") as image:
            image.load()  # a truncated PNG raises here
    assert not list((folder / "images").glob(".*.tmp")), "no half-written files are left"
    parent, children = mlflow_runs(ws.outputs, name)
    assert len(parent) == 1
    assert children["tags.lora_sweep.id"].is_unique and len(children) == plan_size
    assert set(children["status"]) == {"FINISHED"}


def mlflow_runs(outputs: Path, experiment: str, uri: str | None = None):
    """(parent run, image and trial runs) of an experiment in the outputs' MLflow store (or `uri`), as data frames."""
    import mlflow

    mlflow.set_tracking_uri(uri or f"sqlite:///{outputs / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="pandas")
    parent = runs[runs["tags.lora_sweep.role"] == "parent"]
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    return parent, children


def fake_hub_cache(root: Path, repo_id: str, folder: Path) -> None:
    """The Hugging Face cache layout (refs/main -> snapshots/<commit>/...) holding `folder`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


# ---------------------------------------------------------------- the engine interface, in process


def demo_engine(assets: Path, device: str = "cpu", loras: dict[str, Path] | None = None, **settings):
    """A LocalEngine over the demo's model and LoRAs (or `loras`: id -> file), for tests of the engine interface itself."""
    from runner.engines.local import LocalEngine
    from runner.registry import HashCache, Registry, resolve_lora, resolve_model

    cache = HashCache(None)
    model, problem = resolve_model("tiny-sd", {"source": str(assets / "tiny-sd")}, cache)
    assert problem is None, problem
    if loras is None:
        loras = {name: assets / "loras" / f"{name}.safetensors" for name in ("sunset", "stripes", "star")}
    resolved = {}
    for name, path in loras.items():
        resolved[name], problem = resolve_lora(name, str(path), None, cache)
        assert problem is None, problem
    if device == "cpu":
        settings.setdefault("dtype", "float32")
    return LocalEngine(registry=Registry(models={"tiny-sd": model}, loras=resolved), device=device, **settings)


def engine_rows(blends: list[tuple[str, str]], seeds: list[int], size: int = 64, steps: int = 4):
    """Plan rows as the engine receives them (validated columns included): each blend x each seed."""
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "id": f"{blend}@{strength}#{seed}",
                "model_id": "tiny-sd",
                "prompt": "a red circle on a blue background",
                "negative_prompt": "",
                "width": size,
                "height": size,
                "num_inference_steps": steps,
                "guidance_scale": 7.5,
                "seed": seed,
                "lora_model": blend,
                "lora_strength": strength,
                "scheduler_used": "EulerDiscreteScheduler",
                "use_karras_sigmas": False,
                "algorithm_type": None,
                "clip_skip": 1,
                "vae": None,
                "embeddings_model": None,
                "pipeline_used": "text2img",
                "upscale": False,
            }
            for blend, strength in blends
            for seed in seeds
        ]
    )


# ---------------------------------------------------------------- servers on 127.0.0.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Outage:
    """A port in front of a server that goes down (connections refused, open ones cut) and comes back, as a tracking
    server's network does, without restarting the server behind it (a restart costs a server start on 2 cores)."""

    def __init__(self, target_port: int):
        self.port, self.target = free_port(), target_port
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self.up()

    def up(self) -> None:
        import threading

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for conn in self._open:
            with contextlib.suppress(OSError):
                conn.close()
        self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by down()
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self._open += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for conn in (source, sink):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout: float, what: str, log: Any = None) -> None:
    """Until GET url answers 200; fails (and kills proc) if the process exits or the time runs out."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}: {log() if log else ''}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"{what} did not start: {log() if log else ''}")


def start_mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:port with its store in `folder`; waits until it answers."""
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(folder / "server-artifacts")]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until_healthy(f"http://127.0.0.1:{port}/health", proc, 90, "mlflow server")
    return proc


# ---------------------------------------------------------------- the demo model as diffusers runs it (hand-merge references)


def demo_pipeline(assets: Path):
    """The demo's tiny SD pipeline loaded by diffusers itself, with the scheduler a sweep uses by default (UniPC)."""
    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler

    pipe = StableDiffusionPipeline.from_pretrained(assets / "tiny-sd", safety_checker=None)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, prompt: str, seed: int, size: int = 64, steps: int = 4, guidance: float = 7.5):
    """One image of `pipe` as a sweep row asks for it (empty negative, a CPU generator), as int16 pixels."""
    import numpy as np
    import torch

    with torch.no_grad():
        image = pipe(
            prompt,
            negative_prompt="",
            width=size,
            height=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
        ).images[0]
    return (np.clip(image, 0, 1) * 255).round().astype(np.int16)


def two_lora_sweep(name: str, scores: list[str], description: str = "", **base: Any) -> dict[str, Any]:
    """The report and page tests' sweep: the demo's sunset and star LoRAs x strengths 0.5, 1 x seeds 0, 1, plus the two
    no-LoRA baseline images (10 images, 5 cells), as lora_strength (x) by lora_model (y); `base` overrides the request."""
    request = {"prompt": "a red circle on a blue background", "width": 64, "height": 64, "num_inference_steps": 4}
    return {
        "name": name,
        "description": description,
        "base": request | base,
        "grid": {"lora_model": {"each": ["sunset", "star"]}, "lora_strength": [0.5, 1.0], "seed": [0, 1]},
        "report": {"grid": {"x": "lora_strength", "y": "lora_model"}, "baseline": True},
        "scores": scores,
    }


# ---------------------------------------------------------------- `lora-sweep compare`, a real server


@dataclass
class Compare:
    """A running `lora-sweep compare` server: its process, URL, folder and log."""

    proc: subprocess.Popen
    url: str
    folder: Path
    log: Path

    def post(self, path: str, body: object, **kwargs) -> Any:
        import httpx

        return httpx.post(f"{self.url}{path}", json=body, timeout=30, **kwargs)

    def get(self, path: str, **kwargs) -> Any:
        import httpx

        return httpx.get(f"{self.url}{path}", timeout=30, **kwargs)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def start_compare(folder: Path, *overrides: str, port: int | None = None, env: dict[str, str] | None = None) -> Compare:
    """`lora-sweep compare FOLDER` in its own process, on 127.0.0.1; returns once /health answers."""
    port = port or free_port()
    log = folder.parent / f"compare-{port}-{time.monotonic_ns()}.log"
    args = [sys.executable, "-m", "runner.cli", "compare", str(folder), f"compare.port={port}", *overrides]
    with open(log, "w") as sink:
        proc = subprocess.Popen(args, cwd=folder.parent, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    server = Compare(proc, f"http://127.0.0.1:{port}", folder, log)
    wait_until_healthy(f"{server.url}/health", proc, 90, "compare", log=log.read_text)
    return server
