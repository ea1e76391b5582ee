"""The arguments of every control request, as declared types: one struct per op.

schema.py validates a request against its op's Field table (whose error messages name the field
the way the protocol promises) and hands the handlers the op's struct, so they read
``req.args.ids`` instead of indexing a dict by string. The structs carry no constraints of their
own: the Field tables are the one definition of what is valid, and tests/test_typed_messages.py
checks that every struct has exactly its table's fields, required-ness and defaults.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

import msgspec

DEFAULT_READ_BYTES = 1024 * 1024
"""``read_output`` without ``max_bytes`` (schema.py re-exports it)."""


class Args(msgspec.Struct, kw_only=True):
    """Base of every op's arguments (absent optional fields are None)."""


def wire_args(args: Args) -> dict[str, Any]:
    """The fields of ``args`` in declared order, for schema.build_request (which leaves out the
    None ones): the same map, so the same bytes, as the dicts clients built before the structs."""
    return msgspec.structs.asdict(args)


class HelloArgs(Args):
    client: str | None = None


class SubmitArgs(Args):
    effect: dict[str, Any]
    """A checked effect specification (schema.check_effect_spec)."""
    request_key: str | None = None


class SubmitManyArgs(Args):
    effects: list[dict[str, Any]]
    """Checked only to be maps when the server parses: the daemon checks them in slices (intake.py)."""
    request_key: str | None = None


class StatusArgs(Args):
    ids: list[str]


class ListArgs(Args):
    states: list[str] | None = None
    labels: dict[str, str] | None = None
    name: str | None = None
    limit: int = 100
    before: str | None = None


class WaitArgs(Args):
    ids: list[str]
    timeout: float = 30.0
    return_when: Literal["all", "first"] = "all"


class ResultArgs(Args):
    id: str


class CancelArgs(Args):
    ids: list[str]
    reason: str | None = None


class ReadOutputArgs(Args):
    id: str
    stream: str
    offset: int = 0
    max_bytes: int = DEFAULT_READ_BYTES


class GroupSetArgs(Args):
    name: str
    parallel: int | None = None


class GroupsArgs(Args):
    pass


class GcArgs(Args):
    retain_days: float | None = None
    retain_count: int | None = None
    retain_bytes: int | None = None


class ShutdownArgs(Args):
    drain: bool = True


A = TypeVar("A", bound=Args)


class Request(msgspec.Struct, Generic[A], frozen=True):
    """A validated control request: ``args`` is the struct of its op (schema.OPS[op].args).

    Handlers are annotated with their op's struct (``Request[StatusArgs]``); the server reaches
    them through the op name, which parse_request checked to match ``args``."""

    op: str
    id: Any
    version: int
    args: A
