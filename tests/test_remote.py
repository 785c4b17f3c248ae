"""`engine=remote`: whole sweeps against an imitation of the provider served on 127.0.0.1."""

from __future__ import annotations

import signal
import time

import numpy as np
import pandas as pd
import pytest
from fake_provider import KEY, Behaviour, FakeProviderServer
from helpers import mlflow_runs, start_run, wait_for_results
from PIL import Image

FAST = [
    "engine.eta_min_s=0.01",
    "engine.eta_max_s=0.05",
    "engine.poll_initial_s=0.02",
    "engine.poll_max_s=0.05",
    "engine.backoff_initial_s=0.02",
    "engine.backoff_max_s=0.1",
    "engine.deadline_s=10",
    "engine.request_timeout_s=5",
]
SWEEP = {
    "name": "remote",
    "base": {"prompt": "a red fox", "width": 64, "height": 64, "num_inference_steps": 31, "model_id": "f222-diffusion"},
    "grid": {"lora_model": ["ganyu-lora", "ganyu-lora,stripes"], "lora_strength": [0.5], "seed": [1, 2, 3]},
}
ENV = {"MODELSLAB_API_KEY": KEY}


@pytest.fixture
def provider():
    with FakeProviderServer() as server:
        yield server


def remote(ws, server, *overrides, tracking="tracking=none"):
    """`lora-sweep run ... engine=remote` as a user runs it."""
    path = ws.sweep("remote", SWEEP)
    return ws.cli("run", f"sweep={path}", "engine=remote", f"engine.base_url={server.url}", tracking, *FAST, *overrides, env=ENV)


def remote_here(ws, server, monkeypatch, *overrides, key=KEY):
    """The same run in this process, for what the remote engine does with the provider's replies."""
    monkeypatch.setenv("MODELSLAB_API_KEY", key)
    path = ws.sweep("remote", SWEEP)
    return ws.run(f"sweep={path}", "engine=remote", f"engine.base_url={server.url}", "tracking=none", *FAST, *overrides)


def test_remote_sweep_end_to_end(workspace, provider):
    result = remote(workspace, provider, "engine.max_in_flight=2", "engine.max_steps=30", tracking="tracking=sqlite")
    assert result.code == 0, result.err
    assert "sending 6 requests" in result.out and "done: 6 ok, 0 failed, 0 skipped of 6 images" in result.out
    p = provider.provider
    assert len(p.submits) == 6 and p.max_in_flight_seen <= 2
    sent = p.submits[0]
    assert sent["width"] == "64" and sent["samples"] == "1" and sent["num_inference_steps"] == "30"  # clamped, as a string
    assert sent["enhance_prompt"] == "no" and sent["safety_checker"] == "no" and isinstance(sent["seed"], int)
    assert {s["lora_model"] for s in p.submits} == {"ganyu-lora", "ganyu-lora,stripes"}
    assert {s["lora_strength"] for s in p.submits} == {"0.5", "0.5,0.5"}
    folder = workspace.outputs / "remote"
    results = pd.read_parquet(folder / "results.parquet")
    plan = pd.read_parquet(folder / "plan.parquet").set_index("id")
    assert set(results["status"]) == {"ok"} and (results["meta.remote_id"] != "").all()
    assert results["notes"].str.contains("num_inference_steps clamped to the provider's 30").all()
    row = results.iloc[0]
    request = plan.loc[row["id"]]
    expected = Image.open(
        __import__("io").BytesIO(
            p.image_png(
                {"prompt": request["prompt"], "seed": int(request["seed"]), "lora_model": request["lora_model"], "width": 64, "height": 64}
            )
        )
    )
    assert np.array_equal(np.asarray(Image.open(folder / row["file"]).convert("RGB")), np.asarray(expected.convert("RGB")))
    _, children = mlflow_runs(workspace.outputs, "remote")
    assert len(children) == 6 and set(children["tags.engine"]) == {"remote"}
    assert children["tags.meta.remote_id"].str.len().min() > 0 and set(children["tags.meta.seed"]) == {"1", "2", "3"}


QUIRKS = {
    "http-200-rate-limit-with-retry_after": Behaviour(rate_limit_first=3),
    "http-429-messege": Behaviour(http_429_first=2),
    "5xx-burst-and-non-json": Behaviour(errors_5xx_first=3),
    "output-empty-string-while-queued": Behaviour(processing_polls=3),
    "immediate-success": Behaviour(immediate_success=True),
    "inline-data-url": Behaviour(output="inline_data", immediate_success=True),
    "inline-raw-base64": Behaviour(output="inline_raw"),
    "url-to-base64-text": Behaviour(output="base64_url"),
    "url-to-base64-data-url": Behaviour(output="base64_data_url"),
    "proxy-links-only": Behaviour(output="proxy_only"),
    "fetch-by-request-id-only": Behaviour(fetch_form="body"),
}


@pytest.mark.parametrize("behaviour", QUIRKS.values(), ids=QUIRKS.keys())
def test_provider_quirks_are_handled(workspace, provider, behaviour, monkeypatch):
    provider.provider.behaviour = behaviour
    result = remote_here(workspace, provider, monkeypatch, "sweep.grid.seed=[1]")
    result.assert_all_ok()
    assert "done: 2 ok, 0 failed" in result.out
    retries = behaviour.rate_limit_first + behaviour.http_429_first + behaviour.errors_5xx_first
    assert len(provider.provider.submits) == 2 + retries
    for file in (workspace.outputs / "remote" / "images").glob("*.png"):
        with Image.open(file) as image:
            assert image.size == (64, 64)


@pytest.mark.parametrize(
    "overrides, key, message",
    [
        ([], "sk-wrong-key", "Invalid API key"),
        (["sweep.base.model_id=no-such-model"], KEY, "Model not found: no-such-model"),
    ],
    ids=["invalid-key", "model-not-found"],
)
def test_fatal_errors_fail_at_once_without_retry(workspace, provider, overrides, key, message, monkeypatch):
    provider.provider.behaviour = Behaviour(fail_models=("no-such-model",))
    result = remote_here(workspace, provider, monkeypatch, *overrides, key=key)
    assert result.summary.failed == 6  # the command's exit code 1
    assert "done: 0 ok, 6 failed" in result.out
    assert len(provider.provider.submits) == 6, "fatal errors are not retried"
    results = pd.read_parquet(workspace.outputs / "remote" / "results.parquet")
    assert results["error"].str.contains(message).all()


def test_timeout_keeps_remote_id_and_the_next_run_fetches_instead_of_paying(workspace, provider, monkeypatch):
    provider.provider.behaviour = Behaviour(processing_polls=-1)  # the queue never finishes
    first = remote_here(workspace, provider, monkeypatch, "sweep.grid.seed=[1]", "engine.deadline_s=0.5")
    assert first.summary.failed == 2 and "done: 0 ok, 2 failed" in first.out
    results = pd.read_parquet(workspace.outputs / "remote" / "results.parquet")
    assert results["error"].str.contains("the next run fetches it").all()
    assert (results["meta.remote_id"] != "").all()
    provider.provider.behaviour = Behaviour(processing_polls=0)  # now the results are ready
    second = remote_here(workspace, provider, monkeypatch, "sweep.grid.seed=[1]")
    second.assert_all_ok()
    assert "done: 2 ok, 0 failed" in second.out
    assert len(provider.provider.submits) == 2, "nothing was paid for twice"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupted_run_fetches_submitted_requests_on_the_next_run(workspace, provider, sig):
    provider.provider.behaviour = Behaviour(processing_polls=-1)
    path = workspace.sweep("remote", SWEEP)
    overrides = [
        "engine=remote",
        f"engine.base_url={provider.url}",
        "tracking=none",
        *FAST,
        "engine.deadline_s=60",
        "engine.max_in_flight=6",
    ]
    proc = start_run(workspace, f"sweep={path}", *overrides, env=ENV)
    wait_for_results(workspace.outputs / "remote", 6, proc, timeout=60)  # six "submitted" records journalled
    proc.send_signal(sig)
    stopped = time.monotonic()
    proc.communicate(timeout=30)
    assert time.monotonic() - stopped < 10, "waiting requests stop at once"
    assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    assert len(provider.provider.submits) == 6
    provider.provider.behaviour = Behaviour(processing_polls=0)
    again = remote(workspace, provider)
    assert again.code == 0, again.err
    assert "done: 6 ok, 0 failed" in again.out
    assert len(provider.provider.submits) == 6, "submitted requests are fetched by their remote id, not sent again"


def test_missing_key_is_refused_before_any_request(workspace, provider):
    path = workspace.sweep("remote", SWEEP)
    result = workspace.cli("run", f"sweep={path}", "engine=remote", f"engine.base_url={provider.url}", env={"MODELSLAB_API_KEY": ""})
    assert result.code == 2
    assert result.err_lines == [
        "error: engine.api_key_env: the remote engine needs an API key; set it with: export MODELSLAB_API_KEY=YOUR_KEY "
        "(or set engine.api_key_file=PATH)"
    ]
    assert provider.provider.submits == []


def test_plan_shows_the_request_count_without_sending(workspace, provider):
    path = workspace.sweep("remote", SWEEP)
    result = workspace.cli("plan", f"sweep={path}", "engine=remote", f"engine.base_url={provider.url}", env={"MODELSLAB_API_KEY": ""})
    assert result.code == 0, result.err
    assert "6 requests on a remote engine" in result.out
    assert provider.provider.submits == []


def test_the_key_appears_nowhere(workspace, provider):
    result = remote(workspace, provider, "sweep.grid.seed=[1]", tracking="tracking=sqlite")
    assert result.code == 0, result.err
    assert KEY not in result.out + result.err
    for file in workspace.outputs.rglob("*"):
        if file.is_file():
            assert KEY.encode() not in file.read_bytes(), f"key found in {file}"
