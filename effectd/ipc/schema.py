"""The wire protocol: the one place that defines every message effectd sends or receives.

Control requests (client -> daemon, REQ/ROUTER) are declared here as tables of :class:`Field`: the
daemon validates every request against them (with error messages that name the field) into the
op's arguments struct (request_args.py), and the client builds its requests through
:func:`build_request`, so both sides share one definition.
Replies and records are typed in records.py, stream headers and worker messages in messages.py.
tests/test_protocol_doc.py checks docs/protocol.md's tables against all of these declarations.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Literal

import msgspec

from effectd.ipc import request_args as ra
from effectd.ipc.errors import BadRequest, UnknownOp, UnsupportedVersion
from effectd.ipc.request_args import DEFAULT_READ_BYTES as DEFAULT_READ_BYTES  # the read_output default
from effectd.ipc.request_args import Request as Request  # re-export: the daemon imports it from here

PROTOCOL_VERSION = 1
MIN_PROTOCOL_VERSION = 1
MAX_PROTOCOL_VERSION = 1

CAPABILITIES: tuple[str, ...] = (
    "submit_many",
    "wait_first",
    "read_output",
    "stream_offsets",
    "python_generators",
    "idempotent_submit",
    "groups",
    "stdin_from",
    "progress",
    "gc",
)


class EffectState(str, Enum):
    """Lifecycle of an effect: ``queued -> running -> <final>``. ``lost`` is the final state of an
    effect whose worker or daemon disappeared and that was not re-adopted or retried."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    LOST = "lost"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset(
    {
        EffectState.SUCCEEDED,
        EffectState.FAILED,
        EffectState.CANCELLED,
        EffectState.TIMED_OUT,
        EffectState.LOST,
    }
)


class EffectKind(str, Enum):
    SHELL = "shell"
    PYTHON = "python"
    SLEEP = "sleep"


class Stream(str, Enum):
    """Streams of one effect. Byte streams carry raw output; ``value`` carries a concatenation of
    msgpack objects (one per value a python generator yielded); ``event`` carries lifecycle and
    progress events and has no offsets."""

    STDOUT = "stdout"
    STDERR = "stderr"
    VALUE = "value"
    EVENT = "event"


OUTPUT_STREAMS: tuple[str, ...] = (Stream.STDOUT.value, Stream.STDERR.value, Stream.VALUE.value)

ULID_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
PYTHON_TARGET_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")

MAX_IDS_PER_REQUEST = 10_000
MAX_READ_BYTES = 8 * 1024 * 1024
MAX_WAIT_SECONDS = 3600.0
MAX_LABELS = 64
MAX_SHORT_STR = 1024
MAX_COMMAND_LEN = 1024 * 1024
MAX_NESTING = 64
"""Deepest nesting accepted inside free-form values (python args/kwargs): replies embed them a
few levels deeper, and msgpack's encoder has its own recursion limit."""


def nesting_depth(value: Any, limit: int = MAX_NESTING + 1) -> int:
    """Depth of nested arrays/maps in ``value`` (stops counting past ``limit``)."""
    depth = 0
    level = [value]
    while level and depth <= limit:
        nxt: list[Any] = []
        for v in level:
            if isinstance(v, dict):
                nxt.extend(v.values())
            elif isinstance(v, list):
                nxt.extend(v)
        if not nxt:
            return depth + (1 if any(isinstance(v, (dict, list)) for v in level) else 0)
        depth += 1
        level = nxt
    return depth


# --------------------------------------------------------------------------------------------
# Field tables


@dataclass(frozen=True)
class Field:
    """One field of a message: its wire type and constraints.

    ``type`` is one of ``str``, ``int``, ``num`` (int or float, finite), ``bool``, ``list``,
    ``map``, ``bin``, ``id`` (an effect id), ``any`` (msgpack-able, unchecked shape).
    ``items`` is the element type of a list or the value type of a map (map keys are strings).
    """

    name: str
    type: str
    required: bool = False
    default: Any = None
    items: str | None = None
    min: float | None = None
    max: float | None = None
    max_len: int | None = None
    choices: tuple[str, ...] | None = None
    doc: str = ""


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "str" or kind == "id":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "num":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "list":
        return isinstance(value, list)
    if kind == "map":
        return isinstance(value, dict)
    if kind == "bin":
        return isinstance(value, (bytes, bytearray))
    return kind == "any"


_TYPE_NAMES = {
    "str": "a string",
    "id": "an effect id",
    "int": "an integer",
    "num": "a number",
    "bool": "a boolean",
    "list": "an array",
    "map": "a map",
    "bin": "binary data",
    "any": "a value",
}


def _check_scalar(where: str, kind: str, value: Any, f: Field) -> Any:
    if not _type_ok(kind, value):
        raise BadRequest(f"{where}: expected {_TYPE_NAMES[kind]}, got {type(value).__name__}")
    if kind == "num" and isinstance(value, float) and not math.isfinite(value):
        raise BadRequest(f"{where}: must be a finite number")
    if kind in ("int", "num"):
        if f.min is not None and value < f.min:
            raise BadRequest(f"{where}: must be >= {f.min:g}")
        if f.max is not None and value > f.max:
            raise BadRequest(f"{where}: must be <= {f.max:g}")
    if kind == "id" and not ULID_RE.match(value):
        raise BadRequest(f"{where}: {value[:40]!r} is not an effect id (26-character ULID)")
    if kind == "str":
        limit = f.max_len if f.max_len is not None else MAX_SHORT_STR
        if len(value) > limit:
            raise BadRequest(f"{where}: longer than {limit} characters")
        if f.choices is not None and value not in f.choices:
            raise BadRequest(f"{where}: must be one of {', '.join(f.choices)}")
    return value


def check_field(f: Field, value: Any, where: str | None = None) -> Any:
    """Validate one value against its field; returns the value. Raises BadRequest naming it."""
    where = where or f.name
    if f.type == "list":
        if not isinstance(value, list):
            raise BadRequest(f"{where}: expected an array, got {type(value).__name__}")
        limit = f.max_len if f.max_len is not None else MAX_IDS_PER_REQUEST
        if len(value) > limit:
            raise BadRequest(f"{where}: more than {limit} items")
        if f.min is not None and len(value) < f.min:
            raise BadRequest(f"{where}: needs at least {int(f.min)} item(s)")
        if f.items and f.items != "any":
            for i, item in enumerate(value):
                _check_scalar(f"{where}[{i}]", f.items, item, f)
        elif f.items == "any" and nesting_depth(value) > MAX_NESTING:
            raise BadRequest(f"{where}: nested deeper than {MAX_NESTING} levels")
        return value
    if f.type == "map":
        if not isinstance(value, dict):
            raise BadRequest(f"{where}: expected a map, got {type(value).__name__}")
        if f.max_len is not None and len(value) > f.max_len:
            raise BadRequest(f"{where}: more than {f.max_len} entries")
        if f.items == "any" and nesting_depth(value) > MAX_NESTING:
            raise BadRequest(f"{where}: nested deeper than {MAX_NESTING} levels")
        if f.items and f.items != "any":
            # One Field for every value (building one per entry was most of a batch's validation).
            value_field = Field(f.name, f.items, max_len=f.max_len and MAX_COMMAND_LEN)
            for key, item in value.items():
                if len(key) > MAX_SHORT_STR:
                    raise BadRequest(f"{where}: key longer than {MAX_SHORT_STR} characters")
                _check_scalar(f"{where}.{key}", f.items, item, value_field)
        return value
    return _check_scalar(where, f.type, value, f)


def check_fields(
    fields: tuple[Field, ...], msg: Mapping[str, Any], *, where: str = "", known: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Validate ``msg`` against ``fields``; unknown keys are refused (except those in ``known``).

    Returns a dict with every declared field (defaults filled in)."""
    out: dict[str, Any] = {}
    declared = {f.name for f in fields}
    for key in msg:
        if key not in declared and key not in known:
            raise BadRequest(f"{where}{key}: unknown field")
    for f in fields:
        value = msg.get(f.name)
        if value is None:
            if f.required:
                raise BadRequest(f"{where}{f.name}: required field missing")
            out[f.name] = f.default() if callable(f.default) else f.default
            continue
        out[f.name] = check_field(f, value, where + f.name)
    return out


# --------------------------------------------------------------------------------------------
# Effect specification (the body of ``submit``)

EFFECT_FIELDS: tuple[Field, ...] = (
    Field("kind", "str", required=True, choices=tuple(k.value for k in EffectKind),
          doc="shell | python | sleep"),
    Field("argv", "list", items="str", min=1, max_len=100_000,
          doc="shell: program and arguments, executed directly"),
    Field("command", "str", max_len=MAX_COMMAND_LEN, doc="shell: a string run with /bin/sh -c"),
    Field("cwd", "str", max_len=4096, doc="shell/python: working directory (default: the daemon's)"),
    Field("env", "map", items="str", max_len=10_000,
          doc="shell: the complete environment of the child (default: the daemon's)"),
    Field("target", "str", max_len=4096, doc='python: "package.module:function"'),
    Field("args", "list", items="any", max_len=100_000, doc="python: positional arguments"),
    Field("kwargs", "map", items="any", max_len=100_000, doc="python: keyword arguments"),
    Field("seconds", "num", min=0, max=10 * 365 * 86400, doc="sleep: duration"),
    Field("name", "str", max_len=256, doc="free-form name"),
    Field("labels", "map", items="str", max_len=MAX_LABELS, doc="string -> string labels"),
    Field("timeout", "num", min=0.001, max=10 * 365 * 86400, doc="seconds; exceeded -> timed_out"),
    Field("retries", "int", min=0, max=100, default=0, doc="extra attempts after failure"),
    Field("retry_backoff", "num", min=0, max=3600, default=1.0, doc="initial backoff seconds"),
    Field("priority", "int", min=-1_000_000, max=1_000_000, default=0, doc="higher runs first"),
    Field("group", "str", max_len=128, doc="scheduling group (per-group parallel limit)"),
    Field("after", "list", items="id", max_len=1000, doc="run only after these succeeded"),
    Field("after_any_outcome", "bool", default=False, doc="with after: run whatever their outcome"),
    Field("stdin_from", "id", doc="shell: feed stdin from this effect's stdout"),
    Field("max_output_bytes", "int", min=1024, max=1 << 40,
          doc="cap per output stream; head and tail kept, middle replaced by a marker"),
    Field("rlimits", "map", items="int", max_len=8, doc="as | cpu | nofile -> limit, set before exec"),
)

_EFFECT_FIELD_NAMES = {f.name for f in EFFECT_FIELDS}
RLIMIT_NAMES = ("as", "cpu", "nofile")


# The typed form of a field table: a msgspec struct generated from the same Fields, so a valid
# spec is checked in one C-level pass (~6x cheaper than check_fields). Its error messages are
# msgspec's, so a spec it refuses is checked again by check_fields, which names the field the
# way the protocol promises (``effect.timeout: must be >= 0.001``). It accepts nothing
# check_fields refuses: the same bounds, lengths, choices and patterns, ints never bools.


def _bounds(f: Field, integral: bool) -> msgspec.Meta:
    if integral:
        return msgspec.Meta(ge=None if f.min is None else math.ceil(f.min),
                            le=None if f.max is None else math.floor(f.max))
    return msgspec.Meta(ge=f.min, le=f.max)


def _typed_scalar(kind: str, f: Field) -> Any:
    if kind == "str":
        if f.choices is not None:
            return Literal[f.choices]
        return Annotated[str, msgspec.Meta(max_length=f.max_len if f.max_len is not None else MAX_SHORT_STR)]
    if kind == "id":
        return Annotated[str, msgspec.Meta(pattern=ULID_RE.pattern)]
    if kind == "int":
        return Annotated[int, _bounds(f, True)]
    if kind == "num":  # finite: every num field of a spec has both bounds, which refuse nan and inf
        assert f.min is not None and f.max is not None, f.name
        return Annotated[int, _bounds(f, True)] | Annotated[float, _bounds(f, False)]
    if kind == "bool":
        return bool
    return Any


def _typed_field(f: Field) -> Any:
    if f.type == "list":
        limits = msgspec.Meta(max_length=f.max_len if f.max_len is not None else MAX_IDS_PER_REQUEST,
                              min_length=None if f.min is None else int(f.min))
        item = Any if f.items in (None, "any") else _typed_scalar(f.items, f)
        return Annotated[list[item], limits]  # type: ignore[valid-type]
    if f.type == "map":
        key = Annotated[str, msgspec.Meta(max_length=MAX_SHORT_STR)]
        value: Any = {"str": Annotated[str, msgspec.Meta(max_length=MAX_COMMAND_LEN)],
                      "int": int}.get(f.items or "", Any)
        if f.items not in ("str", "int", "any", None):
            raise ValueError(f"{f.name}: no typed form for map items {f.items}")
        return Annotated[dict[key, value], msgspec.Meta(max_length=f.max_len)] if f.max_len else dict[key, value]
    return _typed_scalar(f.type, f)


def typed_struct(name: str, fields: tuple[Field, ...]) -> type[msgspec.Struct]:
    """A struct for a field table: every field optional (nil = absent), unknown keys refused."""
    return msgspec.defstruct(name, [(f.name, _typed_field(f) | None, None) for f in fields],
                             kw_only=True, forbid_unknown_fields=True)


EffectSpec = typed_struct("EffectSpec", EFFECT_FIELDS)
_EFFECT_DEFAULTS = tuple((f.name, f.default) for f in EFFECT_FIELDS if f.default is not None)
assert [f.name for f in EFFECT_FIELDS if f.required] == ["kind"]
_CONTAINER_FIELDS = tuple((f.name, list if f.type == "list" else dict, f.items == "any")
                          for f in EFFECT_FIELDS if f.type in ("list", "map"))


def _typed_effect_fields(spec: dict[str, Any]) -> dict[str, Any] | None:
    """``check_fields(EFFECT_FIELDS, spec)`` for a spec it accepts, in one typed pass; None when
    the spec must go through check_fields (to be refused with its precise message)."""
    try:
        typed = msgspec.convert(spec, EffectSpec)
    except msgspec.ValidationError:
        return None
    for name, container, free_form in _CONTAINER_FIELDS:
        value = spec.get(name)
        if value is not None and (not isinstance(value, container)  # convert takes tuples as arrays
                                  or (free_form and nesting_depth(value) > MAX_NESTING)):
            return None
    out: dict[str, Any] = msgspec.structs.asdict(typed)
    if out["kind"] is None:  # the only required field
        return None
    for name, default in _EFFECT_DEFAULTS:
        if out[name] is None:
            out[name] = default
    return out


def _check_exec_strings(out: Mapping[str, Any], where: str) -> None:
    """Refuse, at submit, strings that execve/chdir cannot take: they would be journaled and only
    fail later as ``spawn_failed``. C strings end at NUL; an environment entry is ``KEY=VALUE``, so
    a key cannot be empty or contain ``=``."""
    for name in ("command", "cwd"):
        if out[name] is not None and "\0" in out[name]:
            raise BadRequest(f"{where}{name}: must not contain a NUL character")
    for i, arg in enumerate(out["argv"] or ()):
        if "\0" in arg:
            raise BadRequest(f"{where}argv[{i}]: must not contain a NUL character")
    for key, value in (out["env"] or {}).items():
        if not key or "=" in key or "\0" in key:
            raise BadRequest(f"{where}env: key {key[:64]!r} must be non-empty, without '=' or NUL")
        if "\0" in value:
            raise BadRequest(f"{where}env.{key}: must not contain a NUL character")


def check_effect_spec(spec: Any, where: str = "effect.") -> dict[str, Any]:
    """Validate one effect specification, including the rules that tie fields to its kind."""
    if not isinstance(spec, dict):
        raise BadRequest(f"{where.rstrip('.')}: expected a map")
    out = _typed_effect_fields(spec)
    if out is None:
        out = check_fields(EFFECT_FIELDS, spec, where=where)
    kind = out["kind"]
    given = {k for k, v in spec.items() if v is not None}
    allowed_by_kind = {
        "shell": {"argv", "command", "cwd", "env", "stdin_from", "rlimits"},
        "python": {"target", "args", "kwargs", "cwd"},
        "sleep": {"seconds"},
    }
    specific = {"argv", "command", "cwd", "env", "target", "args", "kwargs", "seconds", "stdin_from",
                "rlimits"}
    stray = (given & specific) - allowed_by_kind[kind]
    if stray:
        raise BadRequest(f"{where}{sorted(stray)[0]}: not valid for kind {kind}")
    if kind == "shell" and (out["argv"] is None) == (out["command"] is None):
        raise BadRequest(f"{where}argv: a shell effect needs exactly one of argv or command")
    if kind == "python":
        if out["target"] is None:
            raise BadRequest(f"{where}target: required for kind python")
        if not PYTHON_TARGET_RE.match(out["target"]):
            raise BadRequest(f'{where}target: must look like "package.module:function"')
    if kind == "sleep" and out["seconds"] is None:
        raise BadRequest(f"{where}seconds: required for kind sleep")
    _check_exec_strings(out, where)
    if out["rlimits"]:
        for key in out["rlimits"]:
            if key not in RLIMIT_NAMES:
                raise BadRequest(f"{where}rlimits.{key}: must be one of {', '.join(RLIMIT_NAMES)}")
    return {k: v for k, v in out.items() if v is not None and k in _EFFECT_FIELD_NAMES}


# --------------------------------------------------------------------------------------------
# Control requests

REQUEST_ENVELOPE: tuple[Field, ...] = (
    Field("v", "int", required=True, min=0, max=1 << 31, doc="protocol version of the sender"),
    Field("rid", "any", doc="request id (string up to 128 chars or integer), echoed in the reply"),
    Field("op", "str", required=True, max_len=64, doc="operation name"),
)


@dataclass(frozen=True)
class OpSpec:
    name: str
    fields: tuple[Field, ...]
    args: type[ra.Args]
    """The struct a valid request's arguments become (its fields are exactly ``fields``)."""
    doc: str
    mutating: bool = False


_IDS = Field("ids", "list", required=True, items="id", min=1, doc="effect ids")

OPS: dict[str, OpSpec] = {
    op.name: op
    for op in (
        OpSpec("hello", (Field("client", "str", max_len=256, doc="client name/version"),),
               ra.HelloArgs, "version negotiation, daemon identity and counts"),
        OpSpec("submit", (Field("effect", "map", required=True, doc="effect specification"),
                          Field("request_key", "str", max_len=128,
                                doc="idempotency key: a retry with the same key returns the same id")),
               ra.SubmitArgs, "journal one effect; answered after the commit", mutating=True),
        OpSpec("submit_many", (Field("effects", "list", required=True, items="map", min=1, max_len=10_000),
                               Field("request_key", "str", max_len=128)),
               ra.SubmitManyArgs, "journal several effects atomically", mutating=True),
        OpSpec("status", (_IDS,), ra.StatusArgs, "records of one or many effects"),
        OpSpec("list", (Field("states", "list", items="str", max_len=16),
                        Field("labels", "map", items="str", max_len=MAX_LABELS),
                        Field("name", "str", max_len=256),
                        Field("limit", "int", min=1, max=10_000, default=100),
                        Field("before", "id", doc="only effects older than this id (paging)")),
               ra.ListArgs, "records, newest first"),
        OpSpec("wait", (_IDS,
                        Field("timeout", "num", min=0, max=MAX_WAIT_SECONDS, default=30.0),
                        Field("return_when", "str", choices=("all", "first"), default="all")),
               ra.WaitArgs, "parked until the effects are final (or the first is), or the timeout"),
        OpSpec("result", (Field("id", "id", required=True),), ra.ResultArgs, "the outcome of a final effect"),
        OpSpec("cancel", (_IDS, Field("reason", "str", max_len=256)),
               ra.CancelArgs, "cancel queued or running effects", mutating=True),
        OpSpec("read_output", (Field("id", "id", required=True),
                               Field("stream", "str", required=True, choices=OUTPUT_STREAMS),
                               Field("offset", "int", min=0, max=1 << 62, default=0),
                               Field("max_bytes", "int", min=1, max=MAX_READ_BYTES,
                                     default=DEFAULT_READ_BYTES)),
               ra.ReadOutputArgs, "stored output bytes from an offset"),
        OpSpec("group_set", (Field("name", "str", required=True, max_len=128),
                             Field("parallel", "int", min=1, max=100_000,
                                   doc="effects of the group running at once; absent = no limit")),
               ra.GroupSetArgs, "set (or clear) a group's parallel limit; persisted", mutating=True),
        OpSpec("groups", (), ra.GroupsArgs, "groups with their limits and running/queued counts"),
        OpSpec("gc", (Field("retain_days", "num", min=0, max=36500),
                      Field("retain_count", "int", min=0, max=100_000_000),
                      Field("retain_bytes", "int", min=0, max=1 << 50)),
               ra.GcArgs, "delete old final effects and their output now (defaults: the daemon's settings)",
               mutating=True),
        OpSpec("shutdown", (Field("drain", "bool", default=True,
                                  doc="let running effects finish up to the drain timeout"),),
               ra.ShutdownArgs, "stop the daemon", mutating=True),
    )
}


OP_OF_ARGS: dict[type[ra.Args], str] = {spec.args: name for name, spec in OPS.items()}
"""The op whose arguments a struct is (a client builds a request from the struct alone)."""
assert len(OP_OF_ARGS) == len(OPS), "one arguments struct per op"


def request_id_of(msg: Any) -> Any:
    """The request id to echo, if one can be recovered from a (possibly invalid) message."""
    if isinstance(msg, dict):
        rid = msg.get("rid")
        if isinstance(rid, int) and not isinstance(rid, bool) and abs(rid) < (1 << 63):
            return rid
        if isinstance(rid, str) and len(rid) <= 128:
            return rid
    return None


def parse_request(msg: Any, *, check_batch: bool = True) -> Request[ra.Args]:
    """Validate a decoded control message. Raises BadRequest / UnknownOp / UnsupportedVersion.

    With ``check_batch=False`` the effect specifications of ``submit_many`` are only checked to be
    maps: the daemon validates them itself, in slices (see daemon/intake.py)."""
    if not isinstance(msg, dict):
        raise BadRequest(f"a request must be a map, got {type(msg).__name__}")
    rid = msg.get("rid")
    if rid is not None and request_id_of(msg) is None:
        raise BadRequest("rid: must be a string of at most 128 characters or an integer")
    env_names = frozenset(f.name for f in REQUEST_ENVELOPE)
    env = check_fields(REQUEST_ENVELOPE, {k: v for k, v in msg.items() if k in env_names})
    version = env["v"]
    if not MIN_PROTOCOL_VERSION <= version <= MAX_PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"protocol version {version} is not supported; this daemon speaks "
            f"{MIN_PROTOCOL_VERSION}..{MAX_PROTOCOL_VERSION}"
        )
    spec = OPS.get(env["op"])
    if spec is None:
        raise UnknownOp(f"unknown op {env['op'][:64]!r}; known: {', '.join(sorted(OPS))}")
    args = check_fields(spec.fields, msg, known=env_names)
    if spec.name == "submit":
        args["effect"] = check_effect_spec(args["effect"])
    elif spec.name == "submit_many" and check_batch:
        args["effects"] = [check_effect_spec(e, f"effects[{i}].") for i, e in enumerate(args["effects"])]
    elif spec.name == "list" and args["states"]:
        valid = {s.value for s in EffectState}
        for s in args["states"]:
            if s not in valid:
                raise BadRequest(f"states: {s[:32]!r} is not a state ({', '.join(sorted(valid))})")
    # Every declared field is in ``args`` (check_fields fills the defaults), checked: the struct
    # is built without a second validation pass.
    return Request(op=spec.name, id=rid, version=version, args=spec.args(**args))


def build_request(op: str, request_id: Any, **args: Any) -> dict[str, Any]:
    """Build (and validate, so mistakes surface at the caller) a control request."""
    msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "rid": request_id, "op": op}
    msg.update({k: v for k, v in args.items() if v is not None})
    parse_request(msg)
    return msg


# --------------------------------------------------------------------------------------------
# Stream headers and worker messages are typed: effectd/ipc/messages.py.
