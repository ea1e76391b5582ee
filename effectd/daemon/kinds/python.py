"""A python effect: ``module:function`` called in a thread of the worker, its prints captured."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import msgpack

from effectd.daemon.kinds.base import OutputChunk, Phase, Run
from effectd.daemon.proctree import EFFECT_MARKER_ENV, TreeKill
from effectd.ipc import codec
from effectd.progress import install_hook

MAX_RESULT_BYTES = 16 * 1024 * 1024


def _error_info(exc: BaseException) -> dict[str, Any]:
    cls = type(exc)
    return {"type": f"{cls.__module__}.{cls.__qualname__}", "message": str(exc),
            "traceback": "".join(traceback.format_exception(cls, exc, exc.__traceback__))}


def _resolve(target: str) -> Callable[..., Any]:
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target} is not callable")
    return obj  # type: ignore[no-any-return]


class PythonRun(Run):
    """Calls ``module:function`` in a thread of the worker (the worker is exclusive to it).

    Output printed by the function reaches the worker's stdout/stderr pipes, which the worker
    routes here (``feed_output``). Yielded values become ``value`` chunks. The thread cannot be
    interrupted, so cancel and timeout end the whole worker after the report is delivered
    (``poisons_worker``)."""

    def __init__(self, *args: Any, wake: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pid = os.getpid()
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1024)
        self._wake = wake
        self.poisons_worker = False
        self._thread = threading.Thread(target=self._main, name=f"effect-{self.effect_id}", daemon=True)
        self._thread.start()

    def _put(self, item: tuple[str, Any]) -> None:
        self.events.put(item)  # blocks a fast generator when the loop falls behind: backpressure
        self._wake()

    def _main(self) -> None:
        spec = self.spec
        cwd = spec.get("cwd")
        def hook(fraction: float | None, message: str | None) -> None:
            self._put(("progress", (fraction, message)))

        install_hook(hook)
        os.environ[EFFECT_MARKER_ENV] = self.effect_id
        saved_cwd = os.getcwd()
        added_path = bool(cwd) and cwd not in sys.path
        try:
            if cwd:
                if added_path:
                    sys.path.insert(0, cwd)
                os.chdir(cwd)
            func = _resolve(spec["target"])
            value = func(*(spec.get("args") or []), **(spec.get("kwargs") or {}))
            if inspect.isgenerator(value):
                for item in value:
                    self._put(("value", msgpack.packb(item, use_bin_type=True)))
                value = None
            packed = msgpack.packb(value, use_bin_type=True)
            if len(packed) > MAX_RESULT_BYTES:
                raise ValueError(f"result of {len(packed)} bytes exceeds {MAX_RESULT_BYTES}")
            # The report must pass the daemon's decoder limits (string and container sizes,
            # string map keys), or it would be refused and the effect never concluded.
            codec.unpack(packed, max_bytes=MAX_RESULT_BYTES)
            self._flush_stdio()  # printed output must be in the capture pipes before "done"
            self._put(("done", value))
        except BaseException as exc:  # everything the effect raises is its outcome
            if isinstance(exc, TypeError) and "serializ" in str(exc):
                exc = TypeError(f"the return value or a yielded value is not msgpack-serializable: {exc}")
            self._flush_stdio()
            self._put(("error", _error_info(exc)))
        finally:
            install_hook(None)
            os.environ.pop(EFFECT_MARKER_ENV, None)
            with contextlib.suppress(OSError):
                os.chdir(saved_cwd)  # the next effect of this worker starts where the worker was
            if added_path and cwd:
                with contextlib.suppress(ValueError):
                    sys.path.remove(cwd)
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()

    @staticmethod
    def _flush_stdio() -> None:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()

    def feed_output(self, stream: str, data: bytes) -> list[OutputChunk]:
        offset, kept = self.writer.write(stream, data)
        return [OutputChunk(stream, offset, kept)] if kept else []

    def drain_events(self, before_finish: Callable[[], None] | None = None
                     ) -> tuple[list[OutputChunk], list[tuple[float | None, str | None]]]:
        """Apply what the effect's thread queued. ``before_finish`` runs once the outcome is
        dequeued and before the run finishes: the thread flushed its stdio before queueing the
        outcome, so that is when the capture pipes hold all of its output."""
        chunks: list[OutputChunk] = []
        progress: list[tuple[float | None, str | None]] = []
        while self.phase is Phase.RUNNING:
            try:
                kind, payload = self.events.get_nowait()
            except queue.Empty:
                break
            if kind == "value":
                offset, kept = self.writer.write_value(payload)
                if kept:
                    chunks.append(OutputChunk("value", offset, kept))
            elif kind == "progress":
                self.progress.append(payload)
            elif kind == "done":
                if before_finish is not None:
                    before_finish()
                chunks += self._finish("succeeded", result=payload)
            elif kind == "error":
                if before_finish is not None:
                    before_finish()
                chunks += self._finish("failed", reason="exception", error=payload)
        return chunks, progress

    def stop(self, state: str, reason: str) -> None:
        if self.phase is Phase.RUNNING:
            self.end_state, self.end_reason = state, reason
            self.phase = Phase.KILLING

    def tick(self, now: float) -> list[OutputChunk]:
        if self.phase is Phase.RUNNING and self.deadline is not None and time.monotonic() >= self.deadline:
            self.stop("timed_out", "timeout")
        if self.phase is Phase.KILLING:
            # Kill what the function started (it inherited the marker), then give up the worker.
            TreeKill(self.effect_id, None, grace=0.0).start()
            self.poisons_worker = True
            return self._finish(self.end_state or "cancelled", reason=self.end_reason)
        return []
