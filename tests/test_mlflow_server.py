"""Tracking against a real `mlflow server` on 127.0.0.1, as a team would share one."""

from __future__ import annotations

import pytest
from helpers import free_port, start_mlflow_server

pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    proc = start_mlflow_server(tmp_path, port)
    yield f"http://127.0.0.1:{port}", tmp_path
    proc.terminate()
    proc.wait(timeout=20)


def test_run_logs_to_a_real_mlflow_server(workspace, small_sweep, mlflow_server):
    url, server_dir = mlflow_server
    result = workspace.cli("run", f"sweep={small_sweep}", f"tracking.uri={url}", "sweep.grid.seed=[1]")
    assert result.code == 0, result.err
    assert not (workspace.outputs / "mlflow.db").exists(), "nothing goes to the local store when a server is set"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("small")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 5 and len(children) == 4, [(r.info.run_name, r.info.status, r.data.tags.get("lora_sweep.role")) for r in runs]
    artifacts = [a.path for a in client.list_artifacts(children[0].info.run_id)]
    assert set(artifacts) == {f"{children[0].data.tags['lora_sweep.id']}.png", "images"}  # the PNG and the chart view's copy
    assert any((server_dir / "server-artifacts").rglob("*.png")), "artifacts went through the server"
    assert {f"{r.data.tags['lora_sweep.id']}.png" for r in children} == {
        a.path for r in children for a in client.list_artifacts(r.info.run_id) if a.path.endswith(".png")
    }, "each run has its own image (requests to the server overlap)"
    assert "View run" not in result.out, "no per-image links from MLflow's client in the terminal"


def test_unreachable_tracking_server_is_one_line_before_any_image(workspace, small_sweep):
    result = workspace.cli(
        "run",
        f"sweep={small_sweep}",
        f"tracking.uri=http://127.0.0.1:{free_port()}",
        env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"},
    )
    assert result.code == 2, result.out + result.err
    assert "Traceback" not in result.err
    lines = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: tracking.uri: cannot use MLflow at http://127.0.0.1")
    assert not (workspace.outputs / "small" / "images").exists()
