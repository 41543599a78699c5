"""OpenAI-style errors: {"error": {"message", "type", "code"}} and the HTTP status of each stack error code."""

from __future__ import annotations

from typing import Any

from common.client import FastServeError
from common.protocol import ErrorCode

# protocol error code -> (HTTP status, OpenAI error type); docs/HTTP.md has the same table
STATUS: dict[str, tuple[int, str]] = {
    ErrorCode.INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorCode.CONTEXT_TOO_LONG: (400, "invalid_request_error"),
    ErrorCode.CANNOT_FIT: (400, "invalid_request_error"),
    ErrorCode.OVERLOADED: (429, "rate_limit_error"),
    ErrorCode.UNAVAILABLE: (503, "service_unavailable_error"),
    ErrorCode.TIMEOUT: (504, "timeout_error"),
    ErrorCode.UNSUPPORTED_VERSION: (500, "server_error"),  # this front door and ingress disagree: our bug
    ErrorCode.CANCELLED: (500, "server_error"),  # only the stack cancels on its own, when it stops
    ErrorCode.INTERNAL: (500, "server_error"),
}


class ApiError(Exception):
    """A request the front door answers with an error status and an OpenAI-style body."""

    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type_
        self.param = param  # the request field at fault, when one is

    @classmethod
    def invalid(cls, message: str, code: str = ErrorCode.INVALID_REQUEST, param: str | None = None) -> "ApiError":
        return cls(400, message, code, param=param)

    @classmethod
    def from_stack(cls, error: FastServeError) -> "ApiError":
        status, type_ = STATUS.get(error.code, (500, "server_error"))  # an unknown code is a failure
        return cls(status, error.message, error.code or ErrorCode.INTERNAL, type_)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def from_validation(errors: list[dict[str, Any]]) -> ApiError:
    """A 400 naming the fields pydantic refused (at most five), from RequestValidationError.errors()."""
    if errors and errors[0].get("type") == "json_invalid":
        where = errors[0].get("loc", ("body", "?"))[-1]
        return ApiError.invalid(f"the body is not valid JSON: {errors[0].get('ctx', {}).get('error', '')} "
                                f"(at character {where})")
    parts, params = [], []
    for error in errors[:5]:
        loc = [str(x) for x in error.get("loc", ()) if x != "body"]
        field = ".".join(loc) or "body"
        kind = error.get("type")
        msg = "unknown field (not part of this API)" if kind == "extra_forbidden" else error.get("msg", "invalid")
        parts.append(f"{field}: {msg}")
        params.append(loc[0] if loc else None)
    return ApiError.invalid("; ".join(parts) or "invalid request body", param=params[0] if params else None)
