"""`lora-sweep serve`: the provider's text2img API over the local engine (README, "Serving").

auth.py     API keys (sha256 hashes, constant-time compare)
jobs.py     the job database (sqlite): nothing lost on a restart
queue.py    which images each job waits for and which rows the engine makes next (pure bookkeeping)
service.py  request -> checked rows -> queue -> engine -> writer -> job done -> reply / webhook, in a sweep session
app.py      the HTTP routes (FastAPI on uvicorn)
"""

from __future__ import annotations

import signal
import socket
import sys

from omegaconf import DictConfig

from runner.errors import UserError
from runner.server.service import Service


def port_problem(host: str, port: int) -> str | None:
    """A one-line error if the address cannot be bound (uvicorn would log a traceback-like report)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return f"serve.port: cannot listen on {host}:{port} ({exc.strerror}); choose another with serve.port=N or stop what uses it"
    return None


def stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve(cfg: DictConfig) -> None:
    """Load the engine once, then answer requests until Ctrl-C / SIGTERM; unfinished jobs stay queued for the next start."""
    # FastAPI and uvicorn here, not at the top: every command imports this package, only `serve` needs them (0.5 s)
    import uvicorn

    from runner.server.app import create_app

    host, port = str(cfg.serve.host), int(cfg.serve.port)
    problem = port_problem(host, port)
    if problem:
        raise UserError(problem)
    print(f"lora-sweep serve: loading model '{cfg.model.id}' ...", flush=True)
    service = Service(cfg)
    try:
        info = service.describe()
        shown = "localhost" if host in ("127.0.0.1", "::1") else host
        print(
            f"serving the text2img API on http://{shown}:{port}  (model {info['model']} on {info['device']}/{info['dtype']}; "
            f"{len(info['models'])} models, {len(info['loras'])} LoRAs; keys: {info['auth']}; "
            f"webhooks {'on' if info['webhooks'] else 'off'}; MLflow: {info['tracking'] or 'off'})",
            flush=True,
        )
        print(f"  POST http://{shown}:{port}/api/v6/images/text2img   OpenAPI: http://{shown}:{port}/openapi.json", flush=True)
        print(f"  images, results and jobs.db in {service.store.root}; Ctrl-C stops (queued jobs run at the next start)", flush=True)
        config = uvicorn.Config(create_app(service), host=host, port=port, log_level="warning", access_log=False)
        # uvicorn stops gracefully on SIGINT/SIGTERM, then raises the signal again for the previous handler:
        # this one turns SIGTERM into the same clean stop as Ctrl-C, so the jobs and the writer are closed below
        signal.signal(signal.SIGTERM, stop_on_sigterm)
        try:
            uvicorn.Server(config).run()
        except KeyboardInterrupt:  # a normal stop for a server
            pass
    finally:
        service.close()
        print("lora-sweep serve: stopped", file=sys.stderr, flush=True)
