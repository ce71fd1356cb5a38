"""OpenAI's error body, ``{"error": {"message", "type", "param", "code"}}``, and the one
exception the server raises for it."""
from __future__ import annotations


class APIError(Exception):
    """An error answered as OpenAI does: ``status`` with the error body (and ``headers``)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def server_error(message: str, code: str, status: int = 500, headers: dict | None = None) -> APIError:
    return APIError(status, message, type="server_error", code=code, headers=headers)
