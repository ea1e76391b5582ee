"""The table of parked ``wait`` requests (pure: no sockets, no journal).

A wait names effects and returns when the first / all of them are final, at its deadline, or
at once with ``not_found`` when gc deletes one of them. The table indexes waits by effect so
that a final state wakes only the waits on that effect: work per loop turn is proportional to
the waits answered, not to all effects waited on. The loop answers what :meth:`WaitTable.due`
returns (``requests.py`` builds the replies).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from effectd.ipc.errors import TooManyWaits


class WaitOutcome(str, Enum):
    DONE = "done"            # the first / all of its effects are final
    TIMED_OUT = "timed_out"  # its deadline passed first (or the daemon stops)
    NOT_FOUND = "not_found"  # gc deleted one of its effects


@dataclass(eq=False)
class Waiter:
    """A parked ``wait``: answered when its effects are final, or at its deadline."""

    ident: bytes
    request_id: Any
    ids: list[str]
    first: bool
    deadline: float
    pending: set[str] = field(default_factory=set)
    """Ids not final yet."""
    gone: set[str] = field(default_factory=set)
    """Ids gc deleted while it was parked."""

    @property
    def satisfied(self) -> bool:
        return len(self.pending) < len(set(self.ids)) if self.first else not self.pending

    @property
    def outcome(self) -> WaitOutcome:
        if self.gone:
            return WaitOutcome.NOT_FOUND
        return WaitOutcome.DONE if self.satisfied else WaitOutcome.TIMED_OUT


class WaitTable:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._waiters: list[Waiter] = []
        self._by_effect: dict[str, list[Waiter]] = {}
        """Every id of every parked wait (not only pending ones: gc deletes final effects)."""
        self._ready: list[Waiter] = []

    def __len__(self) -> int:
        return len(self._waiters)

    def park(self, waiter: Waiter) -> None:
        """Raises TooManyWaits at the limit (``--max-waits``)."""
        if len(self._waiters) >= self.limit:
            raise TooManyWaits(f"{len(self._waiters)} waits are parked (limit {self.limit})")
        self._waiters.append(waiter)
        for eid in set(waiter.ids):
            self._by_effect.setdefault(eid, []).append(waiter)

    def effect_final(self, effect_id: str) -> None:
        """An effect's final state is journaled: wakes only the waits on it that it satisfies."""
        for waiter in self._by_effect.get(effect_id, ()):
            if effect_id in waiter.pending:
                waiter.pending.discard(effect_id)
                if waiter.satisfied:
                    self._ready.append(waiter)

    def effects_deleted(self, ids: list[str]) -> None:
        """gc deleted these effects: waits naming one are answered now, not at their deadline."""
        for effect_id in ids:
            for waiter in self._by_effect.get(effect_id, ()):
                waiter.gone.add(effect_id)
                self._ready.append(waiter)

    def next_deadline(self) -> float:
        return min((w.deadline for w in self._waiters), default=float("inf"))

    def cap_deadlines(self, deadline: float) -> None:
        """Nobody should wait on a daemon that is going away: answer every wait by then."""
        for w in self._waiters:
            w.deadline = min(w.deadline, deadline)

    def due(self, now: float) -> list[Waiter]:
        """The waits to answer now (woken, or past their deadline); they leave the table."""
        if not self._ready and (not self._waiters or now < self.next_deadline()):
            return []
        woken = {id(w) for w in self._ready}
        self._ready = []
        due = [w for w in self._waiters if id(w) in woken or now >= w.deadline]
        if due:
            self._remove(due)
        return due

    def take_all(self) -> list[Waiter]:
        """Every parked wait (the daemon stops); the table is empty afterwards."""
        out, self._waiters, self._by_effect, self._ready = self._waiters, [], {}, []
        return out

    def _remove(self, waiters: list[Waiter]) -> None:
        gone = {id(w) for w in waiters}
        self._waiters = [w for w in self._waiters if id(w) not in gone]
        for w in waiters:
            for eid in set(w.ids):
                lst = self._by_effect.get(eid)
                if lst is not None:
                    lst[:] = [x for x in lst if x is not w]
                    if not lst:
                        del self._by_effect[eid]
