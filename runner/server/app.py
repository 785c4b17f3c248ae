"""The HTTP surface of `serve`: the provider's text2img routes, image files, health and the OpenAPI document.

Replies follow the provider (../shared/spec/remote-api.md): HTTP 200 with `"status": "error"` for
request errors (bad key, bad field, rate limit), because that is what its clients read; only a
body over `serve.max_body_bytes` (413), an unknown route or image (404) and an unexpected fault
(500, one line, never a traceback) use other codes.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from runner.request import FIELDS
from runner.server.service import Service, error_reply

log = logging.getLogger("lora_sweep.serve")

JSON_TYPES = {
    "str": ["string"],
    "optional_str": ["string", "null"],
    "int": ["integer", "string"],
    "float": ["number", "string"],
    "bool": ["boolean", "string"],
    "seed": ["integer", "string", "null"],
    "loras": ["string", "null"],
    "strengths": ["number", "string", "null"],
}


def request_schema() -> dict[str, Any]:
    """The text2img body as JSON schema, loose types included (numbers as strings, "yes"/"no" flags)."""
    properties: dict[str, Any] = {"key": {"type": "string", "description": "your API key"}}
    for name, spec in FIELDS.items():
        properties[name] = {"type": JSON_TYPES.get(spec.kind, ["string", "number", "boolean", "null"])}
        if spec.doc:
            properties[name]["description"] = spec.doc
    properties["track_id"] = {"type": ["integer", "string", "null"], "description": "echoed in the webhook call"}
    return {"type": "object", "required": ["key", "prompt"], "properties": properties}


def fetch_schema(with_id: bool) -> dict[str, Any]:
    properties: dict[str, Any] = {"key": {"type": "string"}}
    if with_id:
        properties["request_id"] = {"type": ["integer", "string"]}
    return {"type": "object", "required": ["key", *(["request_id"] if with_id else [])], "properties": properties}


def body_extra(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


class BodyTooLarge(Exception):
    pass


async def read_json(request: Request, limit: int) -> Any:
    """The JSON body, read no further than `limit` bytes (the declared length is checked before reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return json.loads(b"".join(chunks) or b"null")


def create_app(service: Service) -> FastAPI:
    app = FastAPI(
        title="lora-sweep text2img API",
        version="6",
        description="The provider's v6 text2img API (ModelsLab) over lora-sweep's local engine. See README, Serving.",
    )
    limit = int(service.settings.max_body_bytes)

    async def body_or_reply(request: Request) -> tuple[dict[str, Any] | None, JSONResponse | None]:
        try:
            body = await read_json(request, limit)
        except BodyTooLarge:
            return None, JSONResponse(error_reply(f"request body over {limit} bytes; send a smaller request"), status_code=413)
        except (ValueError, UnicodeDecodeError):
            return None, JSONResponse(error_reply("the body must be JSON: the text2img request as an object"))
        if not isinstance(body, dict):
            return None, JSONResponse(error_reply("the body must be a JSON object: the text2img request"))
        return body, None

    def base_url(request: Request) -> str:
        return str(request.base_url)

    @app.post("/api/v6/images/text2img", openapi_extra=body_extra(request_schema()))
    async def text2img(request: Request) -> JSONResponse:
        body, refused = await body_or_reply(request)
        if refused is not None:
            return refused
        return JSONResponse(await run_in_threadpool(service.submit, body, base_url(request)))

    @app.post("/api/v6/images/fetch/{request_id}", openapi_extra=body_extra(fetch_schema(False)))
    async def fetch_by_path(request_id: str, request: Request) -> JSONResponse:
        body, refused = await body_or_reply(request)
        if refused is not None:
            return refused
        return JSONResponse(await run_in_threadpool(service.fetch, body, request_id, base_url(request)))

    @app.post("/api/v6/images/fetch", openapi_extra=body_extra(fetch_schema(True)))
    async def fetch_by_body(request: Request) -> JSONResponse:
        body, refused = await body_or_reply(request)
        if refused is not None:
            return refused
        return JSONResponse(await run_in_threadpool(service.fetch, body, body.get("request_id"), base_url(request)))

    @app.get("/images/{name}", response_model=None)
    async def image(name: str) -> FileResponse | PlainTextResponse | JSONResponse:
        path = service.image_file(name)
        if path is None:
            return JSONResponse(error_reply("no such image"), status_code=404)
        if name.endswith(".base64"):  # the provider's base64 form: a URL whose body is the PNG as base64 text
            return PlainTextResponse(base64.b64encode(path.read_bytes()).decode())
        return FileResponse(path, media_type="image/png")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return await run_in_threadpool(service.health)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_reply(str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc)
        return JSONResponse(error_reply("Internal server error. Please try again."), status_code=500)

    return app
