"""``effectctl bridge --stdio``: the effectd protocol as JSON lines on stdin/stdout.

For programs that cannot speak ZeroMQ/msgpack (editors, Node, shell scripts): start the bridge
as a child process, write one JSON request per line to its stdin, read one JSON line per reply
and per stream event from its stdout. The bridge is one :class:`~effectd.client.aio.AsyncClient`
(autostarting the daemon unless ``--no-autostart``), so it inherits its timeouts, resends and
exact streams.

Requests and replies
--------------------
A request is a JSON object on one line: ``{"id": <any JSON value>, "op": "<op>", ...fields}``.
``op`` is a control op of the wire protocol (``hello submit submit_many status list wait result
cancel read_output group_set groups gc shutdown``) with exactly the wire fields (see
``effectd.ipc.schema.OPS``; ``v`` and ``rid`` are the bridge's business and refused), or one of
the bridge's own ops ``subscribe`` and ``unsubscribe``. The reply carries the same ``id``::

    {"id": 7, "ok": true, ...the wire reply's fields}
    {"id": 7, "ok": false, "error": {"code": "not_found", "message": "no effect with id ..."}}

* Error codes are the wire codes (``bad_request unknown_op too_large unsupported_version
  not_found invalid_state unavailable queue_full disk_full too_many_waits internal``), plus
  ``cancelled`` for a request cut short because the bridge is stopping (signal).
  ``unavailable`` also means no daemon answered within the client's timeouts.
* A line that is not a JSON object, not UTF-8, or has no string ``op`` is answered with
  ``{"id": null, "ok": false, "error": {"code": "bad_request", ...}}`` (with the request's
  ``id`` when one could be read); a line longer than :data:`MAX_LINE_BYTES` with
  ``too_large``. The bridge keeps running. Blank lines are ignored.
* Requests run concurrently: replies come in completion order, not request order (a parked
  ``wait`` does not hold up later lines). Match them by ``id``. At most :data:`MAX_IN_FLIGHT`
  requests run at once; beyond that the bridge stops reading stdin until one finishes.
* ``submit``/``submit_many`` without ``request_key`` get a fresh one, so the client's resends
  are idempotent. Effect specs are passed as given: a shell effect without ``cwd``/``env``
  gets the daemon's (unlike the Python helpers, which send the caller's).
* ``id`` is always the request id. The wire ops that name one effect ``id`` (``result``,
  ``read_output``) take it as ``effect`` over the bridge, and a wire reply's own ``id`` field
  (``submit``, ``read_output``: the effect id) comes back as ``effect``. ``hello``'s reply
  also has ``bridge: {protocol, pid, ops}``.
* ``wait`` is answered when the daemon answers (``timeout`` defaults to 30 s, at most 3600).
* Bytes are never written raw. ``read_output`` replies carry ``data`` as text plus
  ``"encoding": "utf-8"`` when the bytes are valid UTF-8, else base64 with
  ``"encoding": "base64"``. Bytes nested anywhere else (a python effect's ``result`` or
  ``args``) become ``{"data": ..., "encoding": ...}`` objects. Non-finite floats become the
  strings ``"nan"``, ``"inf"``, ``"-inf"``. Output is ASCII-only JSON (``\\uXXXX`` escapes).

Subscriptions
-------------
``{"id": S, "op": "subscribe", "effect": ID, "streams": ["stdout", "stderr"], "from_offset": 0}``
(``streams`` any of ``stdout stderr value``, default ``["stdout", "stderr"]``; ``from_offset``
default 0; ``id`` required and not already an active subscription) is acknowledged at once with
``{"id": S, "ok": true, "subscription": S}``. Then come events tagged with ``subscription: S``::

    {"event": "chunk", "subscription": S, "effect": ID, "stream": "stdout", "offset": 0,
     "data": "1\\n2\\n", "encoding": "utf-8"}
    {"event": "end", "subscription": S, "effect": ID, "cause": "final", "state": "succeeded",
     "exit_code": 0, "signal": null}

Chunks are exact: per stream, every byte from ``from_offset`` exactly once and in order (each
chunk's ``offset`` equals the previous chunk's ``offset`` plus its byte length), replayed from
the store and then live, with gaps filled from the store. Decode each chunk's ``data`` per its
own ``encoding`` *before* concatenating: a chunk boundary may split a UTF-8 character, and such
a chunk is sent as base64. Every acknowledged subscription ends with exactly one ``end`` event,
its last event, whose ``cause`` is ``final`` (the effect is final and everything was sent;
``state``/``exit_code``/``signal`` are its outcome), ``unsubscribed``, ``error`` (with an
``error`` object, e.g. ``not_found`` for an unknown effect) or ``closed`` (the bridge stopped).
``{"id": U, "op": "unsubscribe", "subscription": S}`` ends subscription S: its ``end`` event
(``cause: "unsubscribed"``) is written before the reply ``{"id": U, "ok": true,
"subscription": S}``; ``not_found`` if S is not active (it may just have ended).

Stdout, stderr, exit
--------------------
stdout carries nothing but these lines (each a complete JSON object followed by ``\\n``, never
interleaved). The command moves file descriptor 1 to stderr for everything else, and logs to
stderr (``--log-level``). Writes to stdout block: a parent must read stdout while it writes
stdin (a bridge whose stdout pipe is full stops reading stdin).

When stdin reaches EOF the bridge stops reading, **finishes** the requests in flight (their
replies are written; each is bounded by its timeout), then gives open subscriptions up to
``--eof-grace`` seconds (default 5) to end by themselves, ends the rest (``cause: "closed"``)
and exits 0. So ``printf '<subscribe>\\n<wait>\\n' | effectctl bridge --stdio`` gets the whole
stream. On SIGINT/SIGTERM it cancels everything at once (requests are answered ``cancelled``,
subscriptions end ``closed``) and exits 128+signal. If its stdout is closed, it cancels
everything and exits 1.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import stat
import sys
from collections.abc import AsyncGenerator, Callable
from typing import IO, TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    import asyncio
    import logging

    from effectd.client.aio import AsyncClient

# effectctl imports this module to register the command: asyncio, logging and the client are
# imported where they are used, so the other effectctl commands do not pay for them (~35 ms).


def _log() -> logging.Logger:
    import logging

    return logging.getLogger("effectd.bridge")

BRIDGE_PROTOCOL = 1
MAX_LINE_BYTES = 16 * 1024 * 1024
"""Longest request line accepted (the daemon's own request limit)."""
MAX_IN_FLIGHT = 1000
"""Requests running at once; beyond that stdin is not read until one finishes."""
DEFAULT_EOF_GRACE = 5.0
READ_SIZE = 64 * 1024
DEFAULT_WAIT_TIMEOUT = 30.0
BRIDGE_OPS = ("subscribe", "unsubscribe")
DEFAULT_STREAMS = ("stdout", "stderr")


class _RequestFailed(Exception):
    """A request the bridge refuses itself, with a wire error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def encode_bytes(data: bytes) -> tuple[str, str]:
    """``(text, "utf-8")`` when ``data`` is valid UTF-8, else ``(base64, "base64")``."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        import base64

        return base64.b64encode(data).decode("ascii"), "base64"


def to_json(value: Any) -> Any:
    """A JSON-safe copy of a decoded msgpack value (see "Bytes" in the module docstring)."""
    if isinstance(value, dict):
        return {k if isinstance(k, str) else _key_text(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        data, encoding = encode_bytes(bytes(value))
        return {"data": data, "encoding": encoding}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _key_text(key: Any) -> str:
    if isinstance(key, (bytes, bytearray)):
        return bytes(key).decode("utf-8", errors="replace")
    return str(key)


def _id_key(request_id: Any) -> str:
    """A hashable, canonical form of a JSON request id (ids may be objects or arrays)."""
    return json.dumps(request_id, sort_keys=True, separators=(",", ":"))


class _Subscription:
    def __init__(self, request_id: Any, key: str, effect: str, streams: tuple[str, ...],
                 from_offset: int) -> None:
        self.id = request_id
        self.key = key
        self.effect = effect
        self.streams = streams
        self.from_offset = from_offset
        self.cause: str | None = None
        self.task: asyncio.Task[None] | None = None


class Bridge:
    """The JSON-lines protocol over one AsyncClient. ``write_line`` gets complete lines."""

    def __init__(self, client: AsyncClient, write_line: Callable[[str], None], *,
                 max_in_flight: int = MAX_IN_FLIGHT) -> None:
        import asyncio

        self.client = client
        self._write_line = write_line
        self.requests: set[asyncio.Task[None]] = set()
        self.subscriptions: dict[str, _Subscription] = {}
        self.slots = asyncio.Semaphore(max_in_flight)
        self.broken = asyncio.Event()
        """Set when stdout can no longer be written."""

    # ---- output ---------------------------------------------------------------------------

    def emit(self, obj: dict[str, Any]) -> None:
        """Write one protocol line (never raises; a dead stdout sets :attr:`broken`)."""
        if self.broken.is_set():
            return
        try:
            line = json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:  # to_json makes this unreachable; be safe
            _log().error("unserialisable reply for id %r: %s", obj.get("id"), exc)
            line = json.dumps({"id": to_json(obj.get("id")), "ok": False,
                               "error": {"code": "internal", "message": f"unserialisable reply: {exc}"}})
        try:
            self._write_line(line + "\n")
        except (OSError, ValueError) as exc:  # BrokenPipeError, or the file was closed
            _log().warning("stdout is closed (%s): stopping", exc)
            self.broken.set()

    def _error(self, request_id: Any, code: str, message: str) -> None:
        self.emit({"id": request_id, "ok": False, "error": {"code": code, "message": message}})

    # ---- input ----------------------------------------------------------------------------

    def handle_line(self, raw: bytes | None) -> bool:
        """Act on one input line (None: an over-long line). Returns True when a request task
        was started (it releases its :attr:`slots` entry when done), False otherwise."""
        import asyncio

        if raw is None:
            self._error(None, "too_large", f"request line longer than {MAX_LINE_BYTES} bytes")
            return False
        if not raw.strip():
            return False
        try:
            msg = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            self._error(None, "bad_request", f"not a JSON line: {str(exc)[:200]}")
            return False
        if not isinstance(msg, dict):
            self._error(None, "bad_request", f"a request must be a JSON object, got {type(msg).__name__}")
            return False
        request_id = to_json(msg.get("id"))  # JSON's NaN/Infinity literals: echoed as strings
        op = msg.get("op")
        if not isinstance(op, str):
            self._error(request_id, "bad_request", "op: required, a string")
            return False
        fields = {k: v for k, v in msg.items() if k not in ("id", "op")}
        if op == "subscribe":
            try:
                self._subscribe(request_id, fields)
            except _RequestFailed as exc:
                self._error(request_id, exc.code, exc.message)
            return False
        task = asyncio.get_running_loop().create_task(self._run_request(request_id, op, fields))
        self.requests.add(task)
        task.add_done_callback(self._request_done)
        return True

    def _request_done(self, task: asyncio.Task[None]) -> None:
        self.requests.discard(task)
        self.slots.release()

    async def _run_request(self, request_id: Any, op: str, fields: dict[str, Any]) -> None:
        import asyncio

        from effectd.ipc.errors import EffectdError

        try:
            if op == "unsubscribe":
                reply = await self._unsubscribe(fields)
            else:
                reply = await self._wire_request(op, fields)
        except asyncio.CancelledError:
            self._error(request_id, "cancelled", "the bridge is stopping")
            raise
        except _RequestFailed as exc:
            self._error(request_id, exc.code, exc.message)
        except EffectdError as exc:
            self._error(request_id, exc.code, exc.message)
        except Exception as exc:
            _log().exception("request %r (%s) failed", request_id, op)
            self._error(request_id, "internal", f"{type(exc).__name__}: {exc}")
        else:
            self.emit({"id": request_id, "ok": True, **reply})

    async def _wire_request(self, op: str, fields: dict[str, Any]) -> dict[str, Any]:
        from effectd.ipc import codec
        from effectd.ipc.schema import OPS

        spec = OPS.get(op)
        if spec is None:
            known = ", ".join(sorted([*OPS, *BRIDGE_OPS]))
            raise _RequestFailed("unknown_op", f"unknown op {op[:64]!r}; known: {known}")
        allowed = {f.name for f in spec.fields}
        effect_is_id = "id" in allowed  # result, read_output: the request owns "id"
        if effect_is_id:
            allowed = (allowed - {"id"}) | {"effect"}
        for name in fields:
            if name not in allowed:
                raise _RequestFailed("bad_request", f"{name[:64]}: unknown field")
        if effect_is_id and "effect" in fields:
            fields["id"] = fields.pop("effect")
        if op in ("submit", "submit_many") and fields.get("request_key") is None:
            fields["request_key"] = f"bridge-{os.getpid()}-{os.urandom(8).hex()}"
        if op == "hello" and fields.get("client") is None:
            fields["client"] = f"effectd.bridge/{os.getpid()}"
        try:
            codec.pack(fields)
        except (TypeError, ValueError, OverflowError) as exc:
            raise _RequestFailed("bad_request", f"a field cannot be encoded: {exc}") from exc
        reply_timeout = None
        if op == "wait":
            t = fields.get("timeout")
            wait = DEFAULT_WAIT_TIMEOUT
            if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0:
                wait = float(t)
            reply_timeout = wait + self.client.timeout
        reply = await self.client.request(op, fields, reply_timeout=reply_timeout)
        out = {k: v for k, v in reply.items() if k not in ("v", "rid", "ok", "id")}
        if op == "read_output":
            out["data"], out["encoding"] = encode_bytes(bytes(reply["data"]))
        if "id" in reply:  # submit / read_output answer with the effect's id: keep it apart
            out["effect"] = reply["id"]
        if op == "hello":
            out["bridge"] = {"protocol": BRIDGE_PROTOCOL, "pid": os.getpid(),
                             "ops": sorted([*OPS, *BRIDGE_OPS])}
        converted: dict[str, Any] = to_json(out)
        return converted

    # ---- subscriptions --------------------------------------------------------------------

    def _subscribe(self, request_id: Any, fields: dict[str, Any]) -> None:
        import asyncio

        from effectd.ipc.errors import BadRequest
        from effectd.ipc.schema import OUTPUT_STREAMS, Field, check_fields

        if request_id is None:
            raise _RequestFailed("bad_request", "id: a subscription needs a request id")
        try:
            args = check_fields((Field("effect", "id", required=True),
                                 Field("streams", "list", items="str", min=1, max_len=16),
                                 Field("from_offset", "int", min=0, max=1 << 62, default=0)), fields)
        except BadRequest as exc:
            raise _RequestFailed(exc.code, exc.message) from exc
        streams = tuple(args["streams"] or DEFAULT_STREAMS)
        for name in streams:
            if name not in OUTPUT_STREAMS:
                raise _RequestFailed("bad_request", f"streams: {name[:32]!r} is not one of "
                                                    f"{', '.join(OUTPUT_STREAMS)}")
        if len(set(streams)) != len(streams):
            raise _RequestFailed("bad_request", "streams: duplicates")
        key = _id_key(request_id)
        if key in self.subscriptions:
            raise _RequestFailed("bad_request", f"id: subscription {key[:64]} is already active")
        sub = _Subscription(request_id, key, args["effect"], streams, args["from_offset"])
        self.subscriptions[key] = sub
        self.emit({"id": request_id, "ok": True, "subscription": request_id})
        sub.task = asyncio.get_running_loop().create_task(self._follow(sub))

    async def _follow(self, sub: _Subscription) -> None:
        import asyncio

        from effectd.ipc.errors import EffectdError

        end: dict[str, Any] = {"event": "end", "subscription": sub.id, "effect": sub.effect,
                               "cause": "final", "state": None, "exit_code": None, "signal": None}
        try:
            chunks = self.client.stream(sub.effect, sub.from_offset, sub.streams)
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    data, encoding = encode_bytes(chunk.data)
                    self.emit({"event": "chunk", "subscription": sub.id, "effect": sub.effect,
                               "stream": chunk.stream, "offset": chunk.offset, "data": data,
                               "encoding": encoding})
            rec = await self.client.status(sub.effect)
            end.update(state=rec.state.value, exit_code=rec.exit_code, signal=rec.signal)
        except asyncio.CancelledError:
            end["cause"] = sub.cause or "closed"
            raise
        except EffectdError as exc:
            end.update(cause="error", error={"code": exc.code, "message": exc.message})
        except Exception as exc:
            _log().exception("subscription %s failed", sub.key)
            end.update(cause="error", error={"code": "internal", "message": f"{type(exc).__name__}: {exc}"})
        finally:
            self.subscriptions.pop(sub.key, None)
            self.emit(to_json(end))

    async def _unsubscribe(self, fields: dict[str, Any]) -> dict[str, Any]:
        import asyncio

        for name in fields:
            if name != "subscription":
                raise _RequestFailed("bad_request", f"{name[:64]}: unknown field")
        if "subscription" not in fields:
            raise _RequestFailed("bad_request", "subscription: required field missing")
        sub = self.subscriptions.get(_id_key(fields["subscription"]))
        if sub is None or sub.task is None:
            raise _RequestFailed("not_found", "no active subscription with that id")
        sub.cause = "unsubscribed"
        sub.task.cancel()
        await asyncio.wait((sub.task,))
        return {"subscription": sub.id}

    # ---- ending ---------------------------------------------------------------------------

    async def cancel_all(self) -> None:
        """Cancel every request and subscription; each still writes its final line."""
        import asyncio

        tasks = [*self.requests, *(s.task for s in self.subscriptions.values() if s.task)]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def finish(self, eof_grace: float) -> None:
        """After EOF: let requests finish, give subscriptions ``eof_grace`` seconds, end them."""
        import asyncio

        while self.requests and not self.broken.is_set():
            await _first((asyncio.wait(set(self.requests)), self.broken.wait()))
        subs = [s.task for s in self.subscriptions.values() if s.task]
        if subs and not self.broken.is_set():
            await _first((asyncio.wait(subs, timeout=eof_grace), self.broken.wait()))
        await self.cancel_all()


async def _first(awaitables: tuple[Any, ...]) -> None:
    """Until the first of ``awaitables`` is done (re-raising its exception); the others are
    cancelled."""
    import asyncio

    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in done:
        t.result()


# ---- stdin ----------------------------------------------------------------------------------


def _pollable_fd(stream: IO[Any]) -> int | None:
    """The fd of a pipe, socket or terminal (reads may block: poll them); None for files,
    other devices (/dev/null) and in-memory streams (reads never block, and epoll refuses
    files and most devices)."""
    try:
        fd = stream.fileno()
        mode = os.fstat(fd).st_mode
    except (OSError, ValueError, io.UnsupportedOperation):
        return None
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd):
        return fd
    return None


async def _read_chunks(stdin: IO[Any]) -> AsyncGenerator[bytes, None]:
    """Bytes from ``stdin`` until EOF without blocking the loop: pipes, sockets and terminals
    through the loop's reader; files and in-memory streams in a thread (they never block)."""
    import asyncio

    loop = asyncio.get_running_loop()
    fd = _pollable_fd(stdin)
    if fd is not None:
        was_blocking = os.get_blocking(fd)
        reader = asyncio.StreamReader(limit=READ_SIZE, loop=loop)
        pipe = os.fdopen(os.dup(fd), "rb", buffering=0)
        try:
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader, loop=loop), pipe)
        except (OSError, ValueError):  # e.g. /dev/null: epoll says EPERM
            pipe.close()
            os.set_blocking(fd, was_blocking)
        else:
            try:
                while chunk := await reader.read(READ_SIZE):
                    yield chunk
            finally:
                transport.close()
                with contextlib.suppress(OSError):
                    os.set_blocking(fd, was_blocking)  # O_NONBLOCK is shared with our parent
            return
    read: Callable[[int], Any] = getattr(stdin, "read1", None) or stdin.read
    while True:
        data = await asyncio.to_thread(read, READ_SIZE)
        if not data:
            return
        yield data.encode() if isinstance(data, str) else bytes(data)


async def read_lines(stdin: IO[Any], max_line: int = MAX_LINE_BYTES) -> AsyncGenerator[bytes | None, None]:
    """Lines of ``stdin`` without their newline; None stands for a line longer than
    ``max_line`` (its bytes are skipped). A last line without newline counts."""
    buf = bytearray()
    skipping = False
    async with contextlib.aclosing(_read_chunks(stdin)) as chunks:
        async for chunk in chunks:
            start = 0
            while True:
                nl = chunk.find(b"\n", start)
                piece = chunk[start:] if nl < 0 else chunk[start:nl]
                if not skipping:
                    buf += piece
                    if len(buf) > max_line:
                        buf.clear()
                        skipping = True
                        yield None
                if nl < 0:
                    break
                if skipping:
                    skipping = False
                else:
                    line = bytes(buf)
                    buf.clear()
                    yield line
                start = nl + 1
    if buf and not skipping:
        yield bytes(buf)


def line_writer(stdout: IO[Any]) -> Callable[[str], None]:
    """Write-and-flush of whole lines to a text or binary stream."""
    if isinstance(stdout, io.TextIOBase):
        def write_text(line: str) -> None:
            stdout.write(line)
            stdout.flush()

        return write_text

    def write_bytes(line: str) -> None:
        stdout.write(line.encode("ascii"))
        stdout.flush()

    return write_bytes


# ---- entry points ---------------------------------------------------------------------------


async def run_bridge(stdin: IO[Any], stdout: IO[Any], client: AsyncClient | None = None, *,
                     eof_grace: float = DEFAULT_EOF_GRACE, max_in_flight: int = MAX_IN_FLIGHT,
                     **client_options: Any) -> int:
    """Serve the JSON-lines protocol until stdin's EOF; returns the exit status (0, or 1 if
    stdout broke). ``stdin``/``stdout`` may be binary or text streams. Without ``client``, an
    :class:`AsyncClient` is made from ``client_options`` (``runtime``, ``state``,
    ``autostart``, ``timeout``, ``retries``) and closed at the end. Cancelling the coroutine
    cancels everything in flight (each still writes its last line) and re-raises."""
    import asyncio

    from effectd.client.aio import AsyncClient

    own = client is None
    active = AsyncClient(**client_options) if client is None else client
    bridge = Bridge(active, line_writer(stdout), max_in_flight=max_in_flight)

    async def pump() -> None:
        async with contextlib.aclosing(read_lines(stdin)) as lines:
            async for line in lines:
                await bridge.slots.acquire()
                if not bridge.handle_line(line):
                    bridge.slots.release()

    try:
        await _first((pump(), bridge.broken.wait()))
        if not bridge.broken.is_set():
            await bridge.finish(eof_grace)
        else:
            await bridge.cancel_all()
        return 1 if bridge.broken.is_set() else 0
    except asyncio.CancelledError:
        await asyncio.shield(bridge.cancel_all())
        raise
    finally:
        if own:
            await active.aclose()


def _protocol_streams() -> tuple[IO[Any], IO[Any], Callable[[], None]]:
    """Binary stdin, and a private stdout for protocol lines. When fd 1 is a real descriptor it
    is duplicated for the protocol and fd 1 itself (and ``sys.stdout``) is pointed at stderr,
    so nothing else in the process can write to the protocol stream."""
    stdin = sys.stdin.buffer
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError, io.UnsupportedOperation):
        return stdin, sys.stdout.buffer, lambda: None  # in-memory stdout (e.g. click's runner)
    sys.stdout.flush()
    proto = os.fdopen(os.dup(fd), "wb")
    saved = os.dup(fd)
    os.dup2(sys.stderr.fileno(), fd)
    real_stdout = sys.stdout
    sys.stdout = sys.stderr

    def restore() -> None:
        with contextlib.suppress(OSError, ValueError):
            proto.close()
        os.dup2(saved, fd)
        os.close(saved)
        sys.stdout = real_stdout

    return stdin, proto, restore


async def _serve(stdin: IO[Any], stdout: IO[Any], eof_grace: float, **client_options: Any) -> int:
    import asyncio

    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    received: list[int] = []

    def on_signal(signum: int) -> None:
        _log().info("signal %d: stopping", signum)
        received.append(signum)
        main_task.cancel()

    handled = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, RuntimeError):  # not the main thread
            loop.add_signal_handler(signum, on_signal, signum)
            handled.append(signum)
    try:
        return await run_bridge(stdin, stdout, eof_grace=eof_grace, **client_options)
    except asyncio.CancelledError:
        if received:
            return 128 + received[0]
        raise
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)


@click.command("bridge", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--stdio", is_flag=True, default=True,
              help="Speak JSON lines on stdin/stdout (the only transport, and the default).")
@click.option("--timeout", type=float, default=5.0, show_default=True,
              help="Seconds to wait for each daemon reply before resending (wait: plus its timeout).")
@click.option("--retries", type=int, default=2, show_default=True,
              help="Resends before a request fails with 'unavailable'.")
@click.option("--no-autostart", is_flag=True, help="Do not start a daemon if none runs.")
@click.option("--eof-grace", type=float, default=DEFAULT_EOF_GRACE, show_default=True,
              help="After stdin's EOF and the last reply, seconds open subscriptions may still run.")
@click.option("--log-level", default=os.environ.get("EFFECTD_BRIDGE_LOG_LEVEL", "WARNING"),
              show_default=True, type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="Logging to stderr (env EFFECTD_BRIDGE_LOG_LEVEL).")
def bridge(stdio: bool, timeout: float, retries: int, no_autostart: bool, eof_grace: float,
           log_level: str) -> None:
    """Serve the effectd protocol as JSON lines on stdin/stdout (see docs/protocol.md).

    One request per line in, one line per reply and per stream event out. Exit 0 when stdin
    closes (after answering the requests in flight), 128+N on signal N, 1 if stdout closes."""
    import asyncio
    import logging

    logging.basicConfig(stream=sys.stderr, level=log_level.upper(),
                        format="effectd.bridge: %(levelname)s %(name)s: %(message)s")
    stdin, stdout, restore = _protocol_streams()
    try:
        status = asyncio.run(_serve(stdin, stdout, eof_grace, autostart=not no_autostart,
                                    timeout=timeout, retries=retries))
    finally:
        restore()
    sys.exit(status)


def main() -> None:
    """``python -m effectd.bridge [--stdio] ...``"""
    bridge(prog_name="effectd.bridge")


if __name__ == "__main__":
    main()
