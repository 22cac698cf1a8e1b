"""`pagedlab serve` / `python -m pagedlab.entrypoints.openai.api_server`: an OpenAI-compatible HTTP server.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models (bearer auth with --api-key),
POST /tokenize, GET /health, GET /metrics (Prometheus), GET /stats (KV memory as JSON, for a dashboard).
"""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException

from pagedlab.engine.async_engine import AsyncLLMEngine
from pagedlab.engine.llm import DEFAULT_MODEL, kv_budget_line
from pagedlab.entrypoints.generate import add_engine_args, engine_kwargs
from pagedlab.entrypoints.openai.metrics import EngineMetrics, engine_stats
from pagedlab.entrypoints.openai.protocol import (
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse, ErrorResponse, ModelCard,
    ModelList, TokenizeRequest, TokenizeResponse)
from pagedlab.entrypoints.openai.serving import OpenAIError, OpenAIServing

logger = logging.getLogger("pagedlab")
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 500)}


def build_app(engine: AsyncLLMEngine, served_model_name: str, api_key: str | None = None) -> FastAPI:
    serving = OpenAIServing(engine, served_model_name)
    registry = CollectorRegistry()
    EngineMetrics(engine.engine, registry)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if hasattr(engine.engine, "kv_budget"):
            logger.info("KV cache: %s", kv_budget_line(engine.engine.kv_budget))
        yield

    app = FastAPI(title="pagedlab", summary="OpenAI-compatible API over the paged KV-cache engine",
                  lifespan=lifespan)
    bearer = HTTPBearer(auto_error=False)

    async def check_api_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise OpenAIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                              code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)] if api_key else [], responses=ERRORS)

    def respond(result):
        return StreamingResponse(result, media_type="text/event-stream") if isinstance(result, AsyncIterator) \
            else result

    @v1.post("/completions", response_model=CompletionResponse)
    async def create_completion(body: CompletionRequest, raw_request: Request):
        return respond(await serving.completions(body, raw_request))

    @v1.post("/chat/completions", response_model=ChatCompletionResponse)
    async def create_chat_completion(body: ChatCompletionRequest, raw_request: Request):
        return respond(await serving.chat(body, raw_request))

    @v1.get("/models")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=served_model_name, root=engine.engine.config.model.model,
                                         max_model_len=serving.max_model_len)])

    app.include_router(v1)

    @app.post("/tokenize", responses=ERRORS)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        return serving.tokenize(body)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.is_running else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/stats")
    async def stats() -> dict:
        return await engine.run(engine_stats)

    @app.exception_handler(OpenAIError)
    async def openai_error(_request: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body.model_dump(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI answers 422 with its own shape; OpenAI (and vLLM) answer 400 with theirs."""
        errors = exc.errors()
        where = [".".join(str(part) for part in e["loc"] if part != "body") for e in errors]
        message = "; ".join(f"{w}: {e['msg']}" if w else e["msg"] for w, e in zip(where, errors))
        return await openai_error(_request, OpenAIError(400, message, param=next(filter(None, where), None)))

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return await openai_error(_request, OpenAIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        return await openai_error(_request, OpenAIError(500, f"{type(exc).__name__}: {exc}"))

    return app


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local HF directory or .gguf file (default: the embedded tiny model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--served-model-name", default=None, help="the model name clients use (default: --model)")
    add_engine_args(p)


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    add_serve_args(p)
    p.set_defaults(func=run_server)


def run_server(args: argparse.Namespace) -> int:
    import uvicorn

    engine = AsyncLLMEngine.build(args.model, **engine_kwargs(args))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    name = args.served_model_name or args.model or os.path.basename(DEFAULT_MODEL)
    try:
        uvicorn.run(build_app(engine, name, args.api_key), host=args.host, port=args.port)
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m pagedlab.entrypoints.openai.api_server", description=__doc__)
    add_serve_args(parser)
    sys.exit(run_server(parser.parse_args()))
