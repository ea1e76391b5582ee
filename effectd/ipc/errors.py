"""The exception hierarchy, grouped by what the caller can do about it.

Every class carries the wire ``code`` it maps to, so the daemon turns an exception into an
error reply and the client turns the reply back into the same exception:

* :class:`RequestError` - the request itself is wrong; fix it, retrying will not help
  (``bad_request``, ``unknown_op``, ``too_large``, ``unsupported_version``).
* :class:`NotFound` - no effect (or group) has that id (:class:`RequestKeyGone`: the effects a
  ``request_key`` names were garbage-collected).
* :class:`InvalidState` - the effect exists but is not in a state that allows the operation.
* :class:`Unavailable` - the daemon cannot take the request now; retry later
  (``unavailable`` while draining, ``queue_full``, ``disk_full``, ``too_many_waits``,
  ``journal_lost``, ``busy``).
  :class:`DaemonUnavailable` is its client-side leaf: no daemon answered at all.
* :class:`InternalError` - a bug in effectd; report it.
"""

from __future__ import annotations


class EffectdError(Exception):
    """Root of every error effectd raises on purpose."""

    code: str = "internal"

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.message else self.code


class RequestError(EffectdError):
    """The request is malformed or not understood; sending it again will fail again."""

    code = "bad_request"


class BadRequest(RequestError):
    """A field is missing, has the wrong type or an out-of-range value (the message names it)."""

    code = "bad_request"


class UnknownOp(RequestError):
    """The ``op`` is not one this daemon implements."""

    code = "unknown_op"


class TooLarge(RequestError):
    """The message (or a part of it) exceeds a documented size limit."""

    code = "too_large"


class UnsupportedVersion(RequestError):
    """The client speaks a protocol version outside the daemon's supported range."""

    code = "unsupported_version"


class NotFound(EffectdError):
    """No effect with that id is known (it never existed or was garbage-collected)."""

    code = "not_found"


class RequestKeyGone(NotFound):
    """A submit's ``request_key`` was already used for effects that retention has deleted.

    The daemon refuses rather than run the effects a second time; a client that really wants
    a new run sends a new key."""

    code = "gone"


class InvalidState(EffectdError):
    """The effect is not in a state that allows this operation (e.g. result of a running effect)."""

    code = "invalid_state"


class Unavailable(EffectdError):
    """The daemon is alive but cannot accept this now (draining, queue full, disk full). Retry later."""

    code = "unavailable"


class QueueFull(Unavailable):
    """The cap on queued effects (``--max-queued``) is reached."""

    code = "queue_full"


class DiskFull(Unavailable):
    """The journal or output store could not be written; nothing was acknowledged."""

    code = "disk_full"


class JournalLost(Unavailable):
    """The journal file was deleted or replaced under the running daemon: nothing in the batch
    was acknowledged, and the daemon exits so that its supervisor restarts it on the journal
    now at that path. Retry once it is back."""

    code = "journal_lost"


class TooManyWaits(Unavailable):
    """The cap on concurrently parked ``wait`` requests is reached."""

    code = "too_many_waits"


class Busy(Unavailable):
    """Too many ``read_output`` bytes are sent and not yet read by their clients; retry after a
    short backoff (the reference clients do so transparently)."""

    code = "busy"


class DaemonUnavailable(Unavailable):
    """No daemon answered (not running, not startable, or not replying within the timeout)."""

    code = "unavailable"


class UnsafeDirectory(DaemonUnavailable):
    """A runtime or state dir is not private to us (a symlink, another owner, or others can
    reach it): nothing is started or connected through it. The message names the dir and why."""

    code = "unavailable"


class InternalError(EffectdError):
    """An unexpected failure inside the daemon; the message says what, please report it."""

    code = "internal"


_BY_CODE: dict[str, type[EffectdError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        UnknownOp,
        TooLarge,
        UnsupportedVersion,
        NotFound,
        RequestKeyGone,
        InvalidState,
        Unavailable,
        QueueFull,
        DiskFull,
        JournalLost,
        TooManyWaits,
        Busy,
        InternalError,
    )
}

ERROR_CODES: frozenset[str] = frozenset(_BY_CODE)


def error_from_wire(code: str, message: str) -> EffectdError:
    """Rebuild the exception a daemon error reply stands for (unknown codes keep their code)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return EffectdError(message, code=code)
    return cls(message)
