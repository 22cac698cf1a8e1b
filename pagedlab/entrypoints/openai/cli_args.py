"""`pagedlab serve`'s flags (vLLM's names), declared without importing the server: the command line works on a core
install (`pip install pagedlab`), and `serve` without the serve extra says what to install."""
from __future__ import annotations

import argparse

from pagedlab.engine.arg_utils import add_engine_args

DEFAULT_MAX_BODY_BYTES = 64 << 20
# Top-level modules of the `serve` extra: a server import failing on one of them means the extra is missing.
SERVE_EXTRA_MODULES = {"fastapi", "starlette", "uvicorn", "pydantic", "prometheus_client", "zmq", "msgspec", "uvloop",
                       "httptools"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--api-server-count", type=int, default=1,
                   help="API server processes sharing the port, all in front of one engine core")
    p.add_argument("--disable-uvicorn-access-log", action="store_true", help="no log line per HTTP request")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='let tool_choice "auto" parse tool calls out of the output (needs --tool-call-parser)')
    p.add_argument("--tool-call-parser", default=None, choices=["hermes"],
                   help="the format tool calls are parsed from: hermes (<tool_call>{...}</tool_call>)")
    p.add_argument("--metrics-prefix", default="pagedlab", choices=["pagedlab", "vllm"],
                   help="vllm: /metrics also exports vLLM's metric names (vllm:...)")
    p.add_argument("--max-request-body-size", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="bytes; a larger request body is answered 413")
    add_engine_args(p, "serve")


def run(args: argparse.Namespace) -> int:
    try:
        from pagedlab.entrypoints.openai import api_server
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in SERVE_EXTRA_MODULES:
            raise SystemExit(f"pagedlab serve needs the server's packages ({exc.name} is not installed): "
                             "pip install 'pagedlab[serve]'") from None
        raise
    return api_server.run_server(args)
