"""``effectctl bridge --stdio``: the effectd protocol as JSON lines on stdin/stdout.

For programs that cannot speak ZeroMQ/msgpack (editors, Node, shell scripts): start the bridge
as a child process, write one JSON request per line to its stdin, read one JSON line per reply
and per stream event from its stdout. The bridge is one :class:`~effectd.client.aio.AsyncClient`
(autostarting the daemon unless ``--no-autostart``), so it inherits its timeouts, resends and
exact streams.

What goes over the bridge - requests and replies, error codes, bytes, subscriptions and their
events, concurrency, stdout, EOF, signals and exit codes - is specified in one place:
docs/protocol.md section 14, "The JSON-lines stdio bridge". The limits it names are the
constants below (:data:`MAX_LINE_BYTES`, :data:`MAX_IN_FLIGHT`, :data:`DEFAULT_EOF_GRACE`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

import click

from effectd.bridge.lines import MAX_LINE_BYTES, line_writer, protocol_streams, read_lines

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
MAX_IN_FLIGHT = 1000
"""Requests running at once; beyond that stdin is not read until one finishes."""
DEFAULT_EOF_GRACE = 5.0
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
    stdin, stdout, restore = protocol_streams()
    try:
        status = asyncio.run(_serve(stdin, stdout, eof_grace, autostart=not no_autostart,
                                    timeout=timeout, retries=retries))
    finally:
        restore()
    sys.exit(status)


def main() -> None:
    """``python -m effectd.bridge [--stdio] ...``"""
    bridge(prog_name="effectd.bridge")

