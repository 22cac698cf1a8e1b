"""`pagedlab serve` / `python -m pagedlab.entrypoints.openai.api_server`: an OpenAI-compatible HTTP server.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models (bearer auth with --api-key),
POST /tokenize, GET /health (503 once the engine core is gone), GET /metrics (Prometheus), GET /stats (KV memory as
JSON, for a dashboard), GET /stats/steps?since=STEP (the recent steps' statistics after STEP); and from extra_routes:
POST /detokenize, GET /version, GET|POST /ping.

Processes: the engine core runs in its own process (engine/core_proc.py); this one parses HTTP, tokenizes in a
worker thread, decodes and streams. `--api-server-count N` runs N such API servers on one listening socket against
one core. SIGTERM (or Ctrl-C) drains: no new connections, requests in flight run to their end, then everything stops.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from multiprocessing.connection import Connection

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from pagedlab.engine.arg_utils import engine_kwargs
from pagedlab.engine.async_engine import AsyncLLMEngine, EngineDeadError
from pagedlab.engine.core_proc import CoreConnection, CoreProcess
from pagedlab.engine.llm import DEFAULT_MODEL, load_tokenizer
from pagedlab.entrypoints.openai import extra_routes
from pagedlab.entrypoints.openai.cli_args import DEFAULT_MAX_BODY_BYTES, add_arguments
from pagedlab.entrypoints.openai.metrics import with_vllm_names
from pagedlab.entrypoints.openai.protocol import (
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse, ErrorResponse, ModelCard,
    ModelList, TokenizeRequest, TokenizeResponse)
from pagedlab.entrypoints.openai.serving import OpenAIError, OpenAIServing

logger = logging.getLogger("pagedlab")
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 500, 503)}


def build_app(engine: AsyncLLMEngine, served_model_name: str, api_key: str | None = None,
              enable_auto_tool_choice: bool = False, tool_call_parser: str | None = None,
              metrics_prefixes: tuple[str, ...] = ("pagedlab",),
              max_request_body_size: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    serving = OpenAIServing(engine, served_model_name, enable_auto_tool_choice, tool_call_parser)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.client.start()       # on the serving loop: the core's outputs and its death are seen from now on
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
        return ModelList(data=[ModelCard(id=served_model_name, root=engine.config.model.model,
                                         max_model_len=serving.max_model_len)])

    app.include_router(v1)
    extra_routes.install(app, serving, lambda: engine.is_running, max_request_body_size)

    @app.post("/tokenize", responses=ERRORS)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        return await serving.tokenize(body)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.is_running else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        text = await engine.metrics()
        if "vllm" in metrics_prefixes:
            text = with_vllm_names(text, served_model_name)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/stats")
    async def stats() -> dict:
        return await engine.stats()

    @app.get("/stats/steps")
    async def steps(since: int = 0) -> dict:
        return {"steps": await engine.steps(since)}

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

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_request: Request, exc: EngineDeadError) -> JSONResponse:
        return await openai_error(_request, OpenAIError(503, str(exc)))

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return await openai_error(_request, OpenAIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        return await openai_error(_request, OpenAIError(500, f"{type(exc).__name__}: {exc}"))

    return app


def raise_open_file_limit() -> None:
    """One socket per connection: the usual soft limit of 1024 open files is too few for a thousand clients."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _exit_on_sigterm() -> None:
    """SIGTERM ends the process through `finally` blocks. While uvicorn serves it takes the signal itself, drains,
    then raises it again, which lands here."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


def _serve(engine: AsyncLLMEngine, args: argparse.Namespace, sock: socket.socket | None = None) -> None:
    import uvicorn

    name = engine.config.model.served_model_name or args.model or os.path.basename(DEFAULT_MODEL)
    config = uvicorn.Config(build_app(engine, name, args.api_key, **extra_routes.api_options(args)),
                            host=args.host, port=args.port,
                            log_level="info", access_log=not args.disable_uvicorn_access_log)
    uvicorn.Server(config).run(sockets=None if sock is None else [sock])


def run_server(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.api_server_count < 1:
        raise SystemExit(f"--api-server-count must be >= 1, got {args.api_server_count}")
    _exit_on_sigterm()
    raise_open_file_limit()
    try:
        if args.api_server_count == 1:
            engine = AsyncLLMEngine.build(args.model, **engine_kwargs(args))
            try:
                _serve(engine, args)
            finally:
                engine.shutdown()
        else:
            _run_api_servers(args)
    except KeyboardInterrupt:
        pass
    return 0


def _run_api_servers(args: argparse.Namespace) -> None:
    """One core, N API server processes accepting on one socket; SIGTERM is passed on to them, and the core stops
    once they have drained."""
    # Bound now (a port in use fails before the engine loads), listened on by the API servers once they serve.
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    core = CoreProcess(args.model, args.api_server_count, wait=False, **engine_kwargs(args))
    context = multiprocessing.get_context("spawn")
    servers, senders = [], []
    try:
        for index in range(args.api_server_count):     # they load the tokenizer while the core loads the model
            receiver, sender = context.Pipe(duplex=False)
            servers.append(context.Process(target=_api_server_main, name=f"pagedlab-api-server-{index}",
                                           args=(core.connection(index), receiver, sock, args)))
            servers[-1].start()
            receiver.close()
            senders.append(sender)
        sock.close()
        for lifeline in core.lifelines:     # the API servers hold them now
            lifeline.close()
        info = core.wait_ready()
        for sender in senders:
            sender.send(info)
            sender.close()

        def stop(*_) -> None:
            for server in servers:
                if server.is_alive():
                    server.terminate()
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        for server in servers:
            server.join()
    finally:
        for server in servers:
            if server.is_alive():
                server.terminate()
                server.join()
        core.shutdown()


def _api_server_main(connection: CoreConnection, info: Connection, sock: socket.socket,
                     args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _exit_on_sigterm()
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # the launcher passes Ctrl-C on as SIGTERM
    tokenizer = load_tokenizer(args.tokenizer or args.model or DEFAULT_MODEL)
    try:
        connection.info = info.recv()
    except EOFError:
        return          # the core did not start; the launcher says why
    engine = AsyncLLMEngine(connection, tokenizer=tokenizer)
    try:
        _serve(engine, args, sock)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m pagedlab.entrypoints.openai.api_server", description=__doc__)
    add_arguments(parser)
    sys.exit(run_server(parser.parse_args()))
