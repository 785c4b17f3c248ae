"""`lora-sweep compare`: blind pairwise votes on a sweep folder's images, served on loopback (votes.jsonl).

pairs.py   which two images to show next (pure: the plan's groups and cells, what was shown, the ranking so far)
board.py   the folder's voting state: finished images, votes that stand, the background Bradley-Terry fit
app.py     the HTTP routes (FastAPI on uvicorn), the token gate and the body limits
page.html, page.js   the voting page (offline: nothing is fetched from elsewhere)
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from runner.errors import UserError
from runner.server import port_problem, stop_on_sigterm
from runner.server.auth import AuthSetupError, KeyCheck

SETTING_NAMES = {"serve.api_keys_file": "compare.tokens_file", "serve.allow_no_auth": "compare.host", "serve.host": "compare.host"}


def token_check(settings: Any) -> KeyCheck:
    """serve's key check with compare's settings: open on loopback without tokens; any other address needs them."""
    try:
        return KeyCheck.from_settings(str(settings.tokens_env), settings.tokens_file, allow_no_auth=True, host=str(settings.host))
    except AuthSetupError as exc:
        message = str(exc)
        for serve_name, compare_name in SETTING_NAMES.items():
            message = message.replace(serve_name, compare_name)
        raise UserError(message.replace("a server without keys", "a voting page without tokens")) from None


def compare(folder: str, settings: Any) -> None:
    """Serve the voting page on one sweep folder until Ctrl-C / SIGTERM (settings: the `compare` config)."""
    import uvicorn  # here, not at the top: only this command needs them

    from runner.compare.app import create_app
    from runner.compare.board import Board, open_folder

    store = open_folder(folder)
    host, port = str(settings.host), int(settings.port)
    keys = token_check(settings)
    problem = port_problem(host, port)
    if problem:
        raise UserError(problem.replace("serve.port", "compare.port"))
    board = Board(store, str(settings.voter), int(settings.bootstrap))
    counts = board.counts("")
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    link = f"http://{shown}:{port}/" + ("" if keys.open_access else "?token=YOUR_TOKEN")
    images, pairs, votes = counts["images"], counts["pairs"], counts["votes"]
    print(f"lora-sweep compare: {images} images, {pairs} pairs in {store.root}; {votes} votes so far", flush=True)
    print(f"  open {link}   keys: ← left, → right, ↓ tie, space skip, u undo", flush=True)
    print(f"  votes go to {store.votes_path} (one line each, on disk before the page moves on); Ctrl-C stops", flush=True)
    app = create_app(board, keys, int(settings.max_body_bytes), port, store.root.name)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:
        pass
    print("lora-sweep compare: stopped", file=sys.stderr, flush=True)
