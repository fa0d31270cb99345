"""The one exception type the client raises, for both transports."""

from __future__ import annotations

# Canonical codes, shared by both transports: the server's error codes plus the client-side ones.
RETRYABLE_CODES = frozenset({"unavailable"})


class SamplerError(Exception):
    """A call to the sampling service failed.

    code: the canonical lowercase code, the same on both transports ("invalid_argument", "not_found",
    "already_exists", "failed_precondition", "resource_exhausted", "unavailable", "unauthenticated",
    "deadline_exceeded", "internal", ...). message: the server's message (what was expected, what
    came, how to fix it). status: the transport's own status, the HTTP status code (int) for REST or
    the gRPC status code name (str, e.g. "INVALID_ARGUMENT") for gRPC; None when no response came.
    """

    def __init__(self, code: str, message: str, status: int | str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status

    def __reduce__(self) -> tuple[type[SamplerError], tuple[str, str, int | str | None]]:
        return type(self), (self.code, self.message, self.status)
