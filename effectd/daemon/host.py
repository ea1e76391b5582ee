"""What the request handlers and the batch intake may see of the daemon, and do through it.

``requests.py`` and ``intake.py`` are given this narrow view instead of the ``Daemon`` class, so
neither imports ``server.py`` (no import cycle) and what they depend on is listed in one place:
the state they read and decide on, and the few actions that belong to the loop (replies are
sent after the batch commits; cancels and shutdown involve workers).
"""

from __future__ import annotations

from typing import Any, Protocol

from effectd.daemon.config import DaemonConfig
from effectd.daemon.core import Effect, Scheduler
from effectd.daemon.ids import UlidGenerator
from effectd.daemon.liveness import HearingClock
from effectd.daemon.policy import CrashBackoff
from effectd.daemon.retention import Retention
from effectd.daemon.waits import WaitTable
from effectd.ipc import records
from effectd.ipc.errors import EffectdError
from effectd.ipc.request_args import SubmitManyArgs
from effectd.ipc.schema import Request
from effectd.journal import Journal, OutputStore


class Admissions(Protocol):
    """Batch intake as the handlers see it (``intake.Intake``)."""

    @property
    def pending_effects(self) -> int: ...

    def admitting(self, request_key: str | None) -> bool: ...

    def admit(self, ident: bytes, req: Request[SubmitManyArgs]) -> None: ...


class Host(Protocol):
    config: DaemonConfig
    sched: Scheduler
    journal: Journal
    outputs: OutputStore
    retention: Retention
    ids: UlidGenerator
    waits: WaitTable
    hearing: HearingClock
    instance: str
    started: float
    managed_by: str
    worst_turn: float

    @property
    def draining(self) -> bool: ...

    @property
    def intake(self) -> Admissions: ...

    @property
    def crashes(self) -> CrashBackoff: ...

    def reply(self, ident: bytes, request_id: Any, reply: records.Reply, durable: bool = True) -> None: ...

    def reply_error(self, ident: bytes, request_id: Any, exc: EffectdError) -> None: ...

    def cancel_effect(self, eff: Effect, reason: str) -> None: ...

    def begin_shutdown(self, drain: bool) -> None: ...
