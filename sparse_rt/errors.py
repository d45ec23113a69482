"""Exception types. Each says what was expected, what came, and what to do.

Callers catch :class:`SparseRtError` for anything a user can fix (bad input,
bad options, a peer's refusal); any other exception is a bug in sparse-rt.
"""
from __future__ import annotations


def printable(text: object) -> str:
    """``text`` with every control character escaped (a newline as \\n), for logging what a peer sent.

    A peer's string written raw could forge a log line of its own.
    """
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


class SparseRtError(Exception):
    """Base class for errors caused by input, configuration or a peer."""


class WireError(SparseRtError):
    """A message on the wire does not follow docs/PROTOCOL.md.

    ``code`` is the short machine-readable reason sent back in an error reply;
    ``request_id`` is the id of the offending request once its header was read,
    so the error reply can be matched by the sender.
    """

    def __init__(self, message: str, code: str = "bad_message", request_id: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id
        self.version: int | None = None  # the protocol version to answer in, when not this peer's own (a v1 peer)


class SplitError(SparseRtError):
    """A model cannot be cut where the user asked."""


class DataError(SparseRtError):
    """A dataset does not fit the pipeline (shape, dtype, labels, missing file)."""


class ConfigError(SparseRtError):
    """An option or a pipeline name is not valid."""


class RemoteError(SparseRtError):
    """The peer answered a request with an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"peer refused the request ({code}): {message}")
        self.code = code
        self.reason = message
