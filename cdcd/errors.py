"""The one exception tree of cdcd.

    CdcdError                  base; ``code``/``error`` map it onto the API envelope
    ├── RequestError           400: the request is malformed (names the field)
    ├── AuthError              401: missing or wrong bearer token
    ├── NotFoundError          404: no such task
    ├── ConflictError          409: operation conflicts with the task's state
    ├── RequestTimeout         408: the body did not arrive within body_read_timeout_s
    ├── PayloadTooLarge        413: body over the configured limit
    ├── TargetUnavailable      502: a request had to reach a server that did not answer
    ├── TooManyConnections     503: max_connections connections are open already
    └── MigrationError         a task stops on it
        ├── EndpointError      a source/target server failed or refused (retryable)
        │   └── TopologyChanged  a cluster said MOVED/ASK: retried at once, new shape
        ├── StoreError         503: the metadata store cannot be read or written; an outage
        │                      of the tasks (retryable), the only MigrationError the API shows
        └── FatalTaskError     retrying cannot help (bad payload, rejected key, ...)

Errors become envelope codes in exactly one place: ``cdcd.server``.
"""

from __future__ import annotations


class CdcdError(Exception):
    code = 500
    error = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RequestError(CdcdError):
    code = 400
    error = "invalid_request"


class AuthError(CdcdError):
    code = 401
    error = "unauthorized"


class NotFoundError(CdcdError):
    code = 404
    error = "task_not_found"


class ConflictError(CdcdError):
    code = 409
    error = "conflict"


class PayloadTooLarge(CdcdError):
    code = 413
    error = "payload_too_large"


class RequestTimeout(CdcdError):
    """408: the request body did not arrive within ``body_read_timeout_s``.

    This and TooManyConnections are HTTP-layer errors: only cdcd.server raises them.
    """

    code = 408
    error = "request_timeout"


class TargetUnavailable(CdcdError):
    """502: an API request needed a source or target server that could not be reached."""

    code = 502
    error = "target_unavailable"


class TooManyConnections(CdcdError):
    """503: ``max_connections`` connections are open already."""

    code = 503
    error = "too_many_connections"


class MigrationError(CdcdError):
    """A task's pipeline stopped; ``retryable`` says whether reconnecting may help."""

    retryable = True


class EndpointError(MigrationError):
    """A server could not be reached, refused us, or dropped the link."""


class TopologyChanged(EndpointError):
    """A cluster answered MOVED/ASK: its slots moved (a resharding, a failover). Nothing
    of the refused transaction was applied; the task goes on at once with the new shape."""


class StoreError(MigrationError):
    """The metadata store cannot be written (disk full, read-only, I/O error) or read."""

    code = 503
    error = "store_unavailable"


class FatalTaskError(MigrationError):
    """Retrying cannot help: the operator must change something."""

    retryable = False
