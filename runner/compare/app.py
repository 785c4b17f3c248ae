"""The HTTP surface of `lora-sweep compare`: the voting page, its images, and three JSON routes.

    GET  /                  the page (page.html + page.js, package files)
    GET  /image/{id}        the PNG of a finished image the board knows (looked up by id, never a path)
    GET  /api/pair?voter=   the voter's pair: {"pair": {left, right, prompt, seed} | null, votes, yours, ...}
    POST /api/vote          {"left", "right", "choice": left|right|tie|skip, "voter"} -> {vote, revealed, next, ...}
    POST /api/undo          {"vote": id, "voter"} -> {undone, next: the undone pair again, ...}
    GET  /health            {"status": "ok", "images": n, "votes": n} (the one route open without a token)

Errors are one line of JSON, {"error": "..."}: 400 for a bad body, 413 for one over compare.max_body_bytes,
415 for a POST that is not application/json (which also keeps other web pages from posting votes), 401 without
a valid token where tokens are set, 404 for anything else.
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from runner.compare.board import Board, Refused
from runner.server.app import BodyTooLarge, read_json
from runner.server.auth import KeyCheck

log = logging.getLogger("lora_sweep.compare")
COOKIE = "lora_sweep_compare"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def package_text(name: str) -> str:
    return resources.files("runner.compare").joinpath(name).read_text(encoding="utf-8")


def given_token(request: Request) -> str | None:
    """The token of a request: a bearer header, the page's cookie, or `?token=` (the link one is given)."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.cookies.get(COOKIE) or request.query_params.get("token")


def allowed_host(request: Request, port: int) -> bool:
    """Without tokens only loopback names may reach the page: a web page that rebinds its DNS name to 127.0.0.1 may not."""
    return request.headers.get("host", "") in {f"{name}:{port}" for name in LOOPBACK_NAMES}


def create_app(board: Board, keys: KeyCheck, max_body_bytes: int, port: int, sweep: str) -> FastAPI:
    app = FastAPI(title="lora-sweep compare", description="Blind pairwise votes on a sweep's images (README, Voting).")
    page = package_text("page.html").replace("{{sweep}}", sweep.replace("&", "&amp;").replace("<", "&lt;"))
    script = package_text("page.js")

    @app.middleware("http")
    async def gate(request: Request, call_next: Any) -> Response:
        if keys.open_access and not allowed_host(request, port):
            return error("this page answers to 127.0.0.1 or localhost only", 403)
        token = given_token(request)
        if keys.owner(token) is None and request.url.path != "/health":
            return error("this voting page needs a token: open it as http://HOST:PORT/?token=YOUR_TOKEN", 401)
        if request.method == "POST" and request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return error("send the body as application/json", 415)
        if request.url.path == "/" and "token" in request.query_params and not keys.open_access:
            reply = RedirectResponse("/", status_code=303)  # the token leaves the address bar and lives in a cookie
            reply.set_cookie(COOKIE, token or "", httponly=True, samesite="strict")
            return reply
        return await call_next(request)

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = await read_json(request, max_body_bytes)
        except (ValueError, UnicodeDecodeError):
            raise Refused("the body must be JSON") from None
        if not isinstance(body, dict):
            raise Refused("the body must be a JSON object")
        return body

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"cache-control": "no-store"})

    @app.get("/page.js")
    async def page_js() -> Response:
        return Response(script, media_type="text/javascript", headers={"cache-control": "no-store"})

    @app.get("/image/{image_id}", response_model=None)
    async def image(image_id: str) -> FileResponse | JSONResponse:
        path = board.image_file(image_id)
        if path is None:
            return error("no such image", 404)
        return FileResponse(path, media_type="image/png", headers={"cache-control": "private, max-age=86400"})

    @app.get("/api/pair")
    async def pair(voter: str = "") -> dict[str, Any]:
        name = board.voter_name(voter)
        chosen = await run_in_threadpool(board.next_pair, name)
        return {"pair": board.describe_pair(chosen), "voter": name, **board.counts(name)}

    @app.post("/api/vote")
    async def vote(request: Request) -> dict[str, Any]:
        return await run_in_threadpool(board.vote, await body_of(request))

    @app.post("/api/undo")
    async def undo(request: Request) -> dict[str, Any]:
        return await run_in_threadpool(board.undo, await body_of(request))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        counts = board.counts("")  # open to all (a probe needs no token): counts only
        return {"status": "ok", "images": counts["images"], "votes": counts["votes"]}

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> JSONResponse:
        return error(str(exc), 400)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return error(f"request body over {max_body_bytes} bytes", 413)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(str(exc.detail), exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc)
        return error("internal server error; see the server's log", 500)

    return app
