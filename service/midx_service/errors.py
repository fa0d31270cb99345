"""Exceptions shared by every layer; each front end maps them to its own status codes in one place."""

from __future__ import annotations


class MidxError(Exception):
    """Base class of the errors the service reports to callers."""

    code = "internal"


class InvalidArgumentError(MidxError, ValueError):
    """A request carries a malformed or out-of-range value (REST 400/422, gRPC INVALID_ARGUMENT)."""

    code = "invalid_argument"


class NotFoundError(MidxError, KeyError):
    """The named index does not exist (REST 404, gRPC NOT_FOUND)."""

    code = "not_found"

    def __str__(self) -> str:
        # KeyError quotes its argument; the message is meant to be read as it is.
        return str(self.args[0]) if self.args else ""


class AlreadyExistsError(MidxError):
    """An index with that name exists already (REST 409, gRPC ALREADY_EXISTS)."""

    code = "already_exists"


class FailedPreconditionError(MidxError):
    """The index is not in a state that allows the request, e.g. an unmet min_version (REST 409)."""

    code = "failed_precondition"


class ResourceExhaustedError(MidxError):
    """A request exceeds a configured size limit (REST 413, gRPC RESOURCE_EXHAUSTED)."""

    code = "resource_exhausted"


class UnavailableError(MidxError):
    """The index is not ready or persistence is down (REST 503, gRPC UNAVAILABLE)."""

    code = "unavailable"


class UnauthenticatedError(MidxError):
    """The bearer token is missing or wrong (REST 401, gRPC UNAUTHENTICATED)."""

    code = "unauthenticated"
