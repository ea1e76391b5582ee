"""systemd service notifications (``sd_notify``) with the standard library only.

Why not libsystemd or a binding: the protocol is a few newline-separated ``KEY=VALUE``
assignments in one ``AF_UNIX`` datagram sent to ``$NOTIFY_SOCKET`` (``man sd_notify``), and
effectd must run the same with or without systemd, on machines without libsystemd headers.
A ``SystemdNotifier`` built outside systemd (no ``NOTIFY_SOCKET``) is disabled and every method
is a cheap no-op, so the daemon calls it unconditionally.

What the daemon gets from it:

* ``ready()`` once clients can connect (``Type=notify`` units wait for it),
* ``status(text)`` for ``systemctl status``; deduplicated and rate-limited so a busy loop can
  call it on every change without flooding PID 1,
* ``tick()`` from *every* iteration of the daemon's main loop. It sends ``WATCHDOG=1`` every
  half ``WatchdogSec`` and flushes a held-back status. Pinging from the loop rather than from a
  timer thread is the point: if the loop wedges (deadlock, a blocking call, a busy loop), the
  pings stop and systemd aborts and restarts the daemon; a thread would keep a dead daemon
  looking alive.
* ``seconds_until_due()`` to bound the loop's poll timeout, so an idle loop still wakes up
  in time to ping,
* ``stopping()`` when the drain starts, ``extend_timeout()`` during a long start or drain.

Sending never raises: a notification is advisory and a broken, full or vanished socket must
not take the daemon down. Failures are logged at debug level and the daemon carries on (a failed
watchdog ping or status is retried by a ``tick()`` at least ``RETRY_INTERVAL`` later).

Children must not inherit ``NOTIFY_SOCKET``/``WATCHDOG_*``: an effect that happens to speak
sd_notify (or a nested effectd) would otherwise report to the daemon's unit. Start workers and
effects with ``child_environ()``, or call ``scrub_environ(os.environ)`` once at startup.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping

__all__ = ["NOTIFY_ENV_VARS", "RETRY_INTERVAL", "STATUS_MIN_INTERVAL", "SystemdNotifier"]

log = logging.getLogger(__name__)

NOTIFY_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
"""Variables systemd sets for the service's main process and nobody else should see."""

STATUS_MIN_INTERVAL = 1.0
"""Seconds between two ``STATUS=`` sends; later changes are held and sent by ``tick()``."""

RETRY_INTERVAL = 1.0
"""Seconds before ``tick()`` retries a watchdog ping or status whose send failed (at most the
watchdog interval), so a broken socket neither spins the main loop nor floods the debug log."""


def _socket_address(value: str) -> str | None:
    """``NOTIFY_SOCKET`` as an ``AF_UNIX`` address, or None if it is not one we can use."""
    if value.startswith("@") and len(value) > 1:
        # Abstract namespace: systemd writes a leading "@" for the leading NUL byte.
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # Empty, relative, or another transport (newer systemd also knows "vsock:...").
    return None


def _parse_watchdog(environ: Mapping[str, str], pid: int) -> float | None:
    """Ping interval in seconds from ``WATCHDOG_USEC``/``WATCHDOG_PID``, or None."""
    raw_usec = environ.get("WATCHDOG_USEC", "").strip()
    if not raw_usec:
        return None
    try:
        usec = int(raw_usec)
    except ValueError:
        log.debug("ignoring malformed WATCHDOG_USEC=%r", raw_usec)
        return None
    if usec <= 0:
        return None
    raw_pid = environ.get("WATCHDOG_PID", "").strip()
    if raw_pid:
        try:
            watchdog_pid = int(raw_pid)
        except ValueError:
            log.debug("ignoring watchdog: malformed WATCHDOG_PID=%r", raw_pid)
            return None
        if watchdog_pid != pid:
            # The variables were inherited from some other process's unit: not ours to ping.
            return None
    # Half the timeout, as sd_watchdog_enabled(3) recommends: one late ping is not fatal.
    return usec / 2 / 1_000_000


def _one_line(text: str) -> str:
    """A value on one line: a newline would start a new assignment in the datagram."""
    return " ".join(text.splitlines()) if ("\n" in text or "\r" in text) else text


class SystemdNotifier:
    """Sends sd_notify messages to the service manager; a no-op when not run by systemd.

    Build it with :meth:`from_environ`. All methods are safe to call whether or not it is
    enabled, and none of them raises because of the socket. Methods may be called from any
    thread; ``now`` arguments are ``time.monotonic()`` seconds (tests pass their own).
    """

    enabled: bool
    """False when ``NOTIFY_SOCKET`` is unset (or unusable): every method is a no-op."""

    watchdog_interval: float | None
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``); None: no watchdog."""

    def __init__(
        self,
        address: str | None,
        *,
        watchdog_interval: float | None = None,
        pid: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``address``: an ``AF_UNIX`` datagram address (``"\\0name"`` for abstract) or None."""
        self._address = address
        self.enabled = address is not None
        self.watchdog_interval = watchdog_interval if self.enabled else None
        self.pid = os.getpid() if pid is None else pid
        self._clock = clock
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        # Times are monotonic seconds; None means "at the first opportunity".
        self._next_ping: float | None = None
        self._status_sent: str | None = None
        self._next_status: float | None = None
        self._status_pending: str | None = None

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, *, pid: int | None = None
    ) -> SystemdNotifier:
        """A notifier configured from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC``, ``WATCHDOG_PID``.

        ``environ`` defaults to ``os.environ``, ``pid`` to ``os.getpid()``. The watchdog is
        enabled only if ``WATCHDOG_PID`` is unset or equals ``pid``.
        """
        env = os.environ if environ is None else environ
        own_pid = os.getpid() if pid is None else pid
        raw_socket = env.get("NOTIFY_SOCKET", "")
        address = _socket_address(raw_socket) if raw_socket else None
        if raw_socket and address is None:
            log.debug("ignoring unsupported NOTIFY_SOCKET=%r", raw_socket)
        watchdog = _parse_watchdog(env, own_pid) if address is not None else None
        return cls(address, watchdog_interval=watchdog, pid=own_pid)

    # -- environment of children ----------------------------------------------------------

    @staticmethod
    def child_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """A copy of ``environ`` (default ``os.environ``) without the notify variables."""
        env = os.environ if environ is None else environ
        return {k: v for k, v in env.items() if k not in NOTIFY_ENV_VARS}

    @staticmethod
    def scrub_environ(environ: MutableMapping[str, str]) -> None:
        """Remove the notify variables from ``environ`` in place (e.g. ``os.environ``).

        Call after :meth:`from_environ` so that nothing forked later inherits them.
        """
        for key in NOTIFY_ENV_VARS:
            environ.pop(key, None)

    # -- messages --------------------------------------------------------------------------

    def ready(self, status: str | None = None, *, now: float | None = None) -> None:
        """``READY=1`` with ``MAINPID=`` and, if given, ``STATUS=`` (sent at once)."""
        if not self.enabled:
            return
        fields = ["READY=1"]
        with self._lock:
            if status is not None:
                fields.append("STATUS=" + _one_line(status))
            fields.append(f"MAINPID={self.pid}")
            if self._send(fields) and status is not None:
                self._mark_status_sent(status, self._now(now))

    def status(self, text: str, *, now: float | None = None) -> None:
        """``STATUS=text``, only if changed and at most once per ``STATUS_MIN_INTERVAL``.

        A change that comes too soon is held; the next :meth:`tick` at or after the interval
        sends the latest held text (intermediate ones are dropped).
        """
        if not self.enabled:
            return
        with self._lock:
            t = self._now(now)
            if text == self._status_sent:
                self._status_pending = None  # back to what systemd already shows
                return
            if self._status_due(t):
                self._status_pending = None
                self._send_status(text, t)
            else:
                self._status_pending = text

    def tick(self, now: float | None = None) -> None:
        """Call on every main-loop iteration: watchdog ping when due, held status flush.

        Only this method pings, so a main loop that stops iterating stops the pings and
        systemd's watchdog restarts the daemon. That is intended; do not call it from a
        separate timer thread.
        """
        if not self.enabled:
            return
        with self._lock:
            t = self._now(now)
            if self._watchdog_due(t):
                self._ping(t)
            pending = self._status_pending
            if pending is not None and self._status_due(t) and self._send_status(pending, t):
                self._status_pending = None

    def watchdog_ping(self, now: float | None = None) -> None:
        """``WATCHDOG=1`` now, regardless of cadence (e.g. before a known long blocking step).

        No-op without a watchdog. Prefer :meth:`extend_timeout` during start and stop.
        """
        if not self.enabled or self.watchdog_interval is None:
            return
        with self._lock:
            self._ping(self._now(now))

    def seconds_until_due(self, now: float | None = None) -> float | None:
        """How long the main loop may block before :meth:`tick` has work; None: indefinitely.

        Use it to bound the loop's poll timeout (``min(own_timeout, this)``): an idle daemon
        blocked in poll for longer than the watchdog interval would be killed by systemd.
        """
        if not self.enabled:
            return None
        with self._lock:
            t = self._now(now)
            deadlines: list[float] = []
            if self.watchdog_interval is not None:
                deadlines.append(t if self._next_ping is None else self._next_ping)
            if self._status_pending is not None:
                deadlines.append(t if self._next_status is None else self._next_status)
            if not deadlines:
                return None
            return max(0.0, min(deadlines) - t)

    def stopping(self, status: str | None = None, *, now: float | None = None) -> None:
        """``STOPPING=1`` (and ``STATUS=``, not rate-limited): the drain has begun."""
        if not self.enabled:
            return
        fields = ["STOPPING=1"]
        with self._lock:
            if status is not None:
                fields.append("STATUS=" + _one_line(status))
            if self._send(fields) and status is not None:
                self._status_pending = None
                self._mark_status_sent(status, self._now(now))

    def extend_timeout(self, seconds: float) -> None:
        """``EXTEND_TIMEOUT_USEC=``: the current start/stop may take ``seconds`` more from now.

        systemd lets the job run until at least now + ``seconds`` even past
        ``TimeoutStartSec=``/``TimeoutStopSec=``; send it again before that runs out.
        """
        if not self.enabled:
            return
        if seconds <= 0:
            raise ValueError(f"extend_timeout needs a positive duration, got {seconds!r}")
        with self._lock:
            self._send([f"EXTEND_TIMEOUT_USEC={round(seconds * 1_000_000)}"])

    def notify(self, *assignments: str) -> bool:
        """Send raw ``KEY=VALUE`` assignments in one datagram; True if it was sent.

        For messages this class has no method for (e.g. ``RELOADING=1``, ``ERRNO=``).
        """
        if not self.enabled:
            return False
        with self._lock:
            return self._send(list(assignments))

    def close(self) -> None:
        """Close the socket; a later message reopens it."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __repr__(self) -> str:
        return (
            f"SystemdNotifier(enabled={self.enabled}, "
            f"watchdog_interval={self.watchdog_interval}, pid={self.pid})"
        )

    # -- internals (called with self._lock held) ------------------------------------------

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    def _watchdog_due(self, t: float) -> bool:
        if self.watchdog_interval is None:
            return False
        return self._next_ping is None or t >= self._next_ping

    def _ping(self, t: float) -> None:
        interval = self.watchdog_interval
        if interval is None:
            return
        if self._send(["WATCHDOG=1"]):
            self._next_ping = t + interval
        else:
            self._next_ping = t + min(interval, RETRY_INTERVAL)

    def _status_due(self, t: float) -> bool:
        return self._next_status is None or t >= self._next_status

    def _mark_status_sent(self, text: str, t: float) -> None:
        self._status_sent = text
        self._next_status = t + STATUS_MIN_INTERVAL

    def _send_status(self, text: str, t: float) -> bool:
        if self._send(["STATUS=" + _one_line(text)]):
            self._mark_status_sent(text, t)
            return True
        # Not sent: keep it for a later tick(), not before the retry interval.
        self._status_pending = text
        self._next_status = t + RETRY_INTERVAL
        return False

    def _send(self, fields: list[str]) -> bool:
        """One datagram; True on success. Never raises for socket trouble."""
        address = self._address
        if address is None:
            return False
        payload = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # Never block the main loop on a full receive queue: drop and retry later.
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(payload, address)
        except OSError as exc:
            log.debug("sd_notify %r to %r failed: %s", fields, self._address, exc)
            if self._sock is not None:
                # A fresh socket next time, in case this one is what is broken.
                self._sock.close()
                self._sock = None
            return False
        return True
