"""Errors that become HTTP responses in the OpenAI error format.

Every failure a client can cause is an :class:`ApiError` with a status and a message that says what was
expected and what was sent; the body is ``{"error": {"message", "type", "param", "code"}}`` so that the
official clients raise their usual exceptions (``BadRequestError``, ``NotFoundError``...).
"""

from __future__ import annotations

from typing import Any

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         409: "conflict_error",
         413: "invalid_request_error", 500: "server_error", 503: "service_unavailable"}


class ApiError(Exception):
    """A request that cannot be served: ``status`` is the HTTP status, ``param`` the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.extra = status, message, param, code, extra

    def body(self) -> dict[str, Any]:
        """The JSON body: an ``error`` object as the OpenAI API writes it."""
        err = {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
               "param": self.param, "code": self.code}
        err.update(self.extra)
        return {"error": err}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """Shorthand for ``ApiError(...).body()`` where there is nothing to raise."""
    return ApiError(status, message, param, code).body()


class ShuttingDown(ApiError):
    """The server is stopping: a request not finished within the grace period ends with this."""

    def __init__(self) -> None:
        super().__init__(503, "the server is shutting down; the request was cancelled", code="shutting_down")


class EngineFailure(ApiError):
    """The decoding engine failed on a batch; every request in it ends with this (the server goes on)."""

    def __init__(self, detail: str) -> None:
        super().__init__(500, f"generation failed: {detail}", code="engine_error")
