"""What both command-line tools share (``effectctl`` and ``effectctl babysitter``): the mapping
of effectd errors to messages and documented exit codes, and JSON output.

Both CLIs import this module and neither imports the other's module for it, so there is no cycle
between ``effectd.cli`` (which mounts the babysitter's commands) and ``effectd.babysitter.cli``.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from effectd.ipc.constants import EXIT_FAILED, EXIT_INVALID_STATE, EXIT_NOT_FOUND, EXIT_UNAVAILABLE

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"effectctl: {message}", err=True)
    sys.exit(code)


def handle_errors(func: F) -> F:
    """Map effectd exceptions to messages and documented exit codes."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # Imported when called: a plain ``effectctl --help`` does not load the error classes.
        from effectd.ipc.errors import DaemonUnavailable, EffectdError, InvalidState, NotFound, Unavailable

        try:
            return func(*args, **kwargs)
        except NotFound as exc:
            fail(exc.message, EXIT_NOT_FOUND)
        except InvalidState as exc:
            fail(exc.message, EXIT_INVALID_STATE)
        except (DaemonUnavailable, Unavailable) as exc:
            fail(str(exc), EXIT_UNAVAILABLE)
        except EffectdError as exc:
            fail(str(exc), EXIT_FAILED)

    return wrapper  # type: ignore[return-value]


def json_out(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=json_default))


def json_default(value: Any) -> Any:
    """Bytes as text, anything else unknown to JSON as its str()."""
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", errors="replace")
    return str(value)
