"""vLLM's smaller endpoints and HTTP behaviour: /detokenize, /version, /ping, X-Request-Id echoed on every
response, and a request-body size limit (413 past --max-request-body-size)."""
from __future__ import annotations

from fastapi import APIRouter, FastAPI, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import pagedlab
from pagedlab.entrypoints.openai.protocol import DetokenizeRequest, DetokenizeResponse, ErrorResponse
from pagedlab.entrypoints.openai.cli_args import DEFAULT_MAX_BODY_BYTES
from pagedlab.entrypoints.openai.serving import OpenAIError, OpenAIServing


def install(app: FastAPI, serving: OpenAIServing, is_healthy, max_request_body_size: int = DEFAULT_MAX_BODY_BYTES
            ) -> None:
    router = APIRouter()

    @router.post("/detokenize", responses={400: {"model": ErrorResponse}})
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return await serving.detokenize(body)

    @router.get("/version")
    async def version() -> dict:
        return {"version": pagedlab.__version__}

    @router.get("/ping")
    async def ping() -> Response:
        return Response(status_code=200 if is_healthy() else 503)

    @router.post("/ping")
    async def post_ping() -> Response:
        return await ping()

    app.include_router(router)
    app.add_middleware(RequestIdHeader)
    app.add_middleware(BodySizeLimit, limit=max_request_body_size)


class RequestIdHeader:
    """The request's X-Request-Id comes back on its response (serving uses it as the request id)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), None) \
            if scope["type"] == "http" else None
        if request_id is None:
            return await self.app(scope, receive, send)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)
        await self.app(scope, receive, send_with_id)


class BodySizeLimit:
    """413 for a body over `limit` bytes: at once from Content-Length, or as soon as a chunked body passes it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._too_large(send)
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:       # FastAPI answers an HTTPException met while reading the body
                    raise HTTPException(413, self.message)
            return message
        await self.app(scope, counted, send)

    @property
    def message(self) -> str:
        return f"the request body is larger than the server's limit of {self.limit} bytes (--max-request-body-size)"

    async def _too_large(self, send: Send) -> None:
        body = OpenAIError(413, self.message).body.model_dump_json().encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def api_options(args) -> dict:
    return dict(enable_auto_tool_choice=args.enable_auto_tool_choice, tool_call_parser=args.tool_call_parser,
                metrics_prefixes=("pagedlab", "vllm") if args.metrics_prefix == "vllm" else ("pagedlab",),
                max_request_body_size=args.max_request_body_size)
