"""OpenAIError: an error the client gets as OpenAI's body, {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

from pagedlab.engine.async_engine import EngineDeadError, RequestError, RequestRejected
from pagedlab.entrypoints.openai.protocol import ErrorInfo, ErrorResponse


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorInfo(
            message=message, type="invalid_request_error" if status < 500 else "server_error", param=param,
            code=code))


def engine_error(exc: RequestError | EngineDeadError) -> OpenAIError:
    if isinstance(exc, EngineDeadError):
        return OpenAIError(503, str(exc))
    return OpenAIError(400, str(exc)) if isinstance(exc, RequestRejected) else OpenAIError(500, str(exc))
