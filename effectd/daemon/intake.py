"""Taking in big ``submit_many`` batches without holding the loop.

A valid batch of 10,000 specifications with 64 labels each took ~7 s to validate and journal in
one loop turn on a loaded 2-core machine (label rows alone: 640,000 inserts), during which no
client was answered and no worker heard. A batch of more than :data:`INLINE_BATCH` effects is
therefore taken in across loop turns, at most :data:`TURN_BUDGET` seconds of work per turn,
while every other socket is served in between:

1. *validate*: each specification is checked and becomes an in-memory effect (with its id);
   nothing is written. An invalid one fails the whole batch (``bad_request``/``not_found``).
2. *labels*: the label rows are written in slices, committed with whatever else the loop
   commits (the effects' own rows are only packed). A label row without its effect row is
   invisible to every query; the id range of a batch in this phase is recorded in the journal
   (meta ``intake_pending``) so that rows of a batch interrupted by a crash or a failed commit
   are deleted at the next start.
3. *commit*: in one turn, every effect row, its ``submitted`` event and the request key are
   written in one savepoint, the effects enter the scheduler, and the reply (``ids``) is queued
   to be sent after that commit. So a batch is all-or-nothing: either every effect exists, or
   none does, and the reply is sent only once all of it is durable.

Idempotency: a request with the ``request_key`` of a batch still being taken in (a client's
retry after its reply timeout) is attached to that batch and answered with it; once committed,
the key answers with the same ids as before. Effects of a batch count against ``--max-queued``
from the moment it is admitted.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from effectd.daemon.core import Effect
from effectd.daemon.host import Host
from effectd.ipc.errors import DiskFull, EffectdError, InternalError, QueueFull, Unavailable
from effectd.ipc.records import SubmitManyReply
from effectd.ipc.request_args import SubmitManyArgs
from effectd.ipc.schema import Request, check_effect_spec
from effectd.journal import Journal

log = logging.getLogger("effectd.intake")

INLINE_BATCH = 100
"""Batches up to this many effects are validated and journaled at once, in their own turn."""
TURN_BUDGET = 0.05
"""Seconds of batch intake per loop turn (checked every :data:`SLICE` effects)."""
SLICE = 16
MAX_REPLY_TARGETS = 16
"""Requests (retries) attached to one batch; older ones are no longer answered."""
PENDING_META = "intake_pending"


@dataclass
class Batch:
    key: str | None
    specs: list[dict[str, Any]]
    targets: list[tuple[bytes, Any]]
    """(client identity, request id) of every request answered when the batch is done."""
    effects: list[Effect] = field(default_factory=list)
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    """The effects' journal rows, packed slice by slice along with the labels."""
    phase: str = "validate"
    pos: int = 0
    written_at: int | None = None
    """``journal.commits`` when label rows were last written: if it has not moved on at the
    next turn, that commit failed and the batch cannot be completed."""

    @property
    def token(self) -> str:
        return self.effects[0].id

    def attach(self, ident: bytes, request_id: Any) -> None:
        self.targets.append((ident, request_id))
        del self.targets[:-MAX_REPLY_TARGETS]


class Submissions(Protocol):
    """How a specification becomes an effect, and what a request key was answered with
    (``requests.RequestHandlers``; the same rules as a small submit)."""

    def new_effect(self, spec: dict[str, Any], now: float) -> Effect: ...

    def ids_for_key(self, request_key: str) -> list[str] | None: ...


class Intake:
    def __init__(self, host: Host, submissions: Submissions) -> None:
        self.d = host
        self.submissions = submissions
        self.batches: collections.deque[Batch] = collections.deque()
        self.by_key: dict[str, Batch] = {}

    @property
    def busy(self) -> bool:
        return bool(self.batches)

    @property
    def pending_effects(self) -> int:
        """Effects admitted but not yet in the scheduler (they count against --max-queued)."""
        return sum(len(b.specs) for b in self.batches)

    def admitting(self, request_key: str | None) -> bool:
        """Whether a batch with this request key is being taken in (a retry attaches to it)."""
        return request_key is not None and request_key in self.by_key

    # ---- admission (in the request's turn) ------------------------------------------------

    def admit(self, ident: bytes, req: Request[SubmitManyArgs]) -> None:
        """Start taking in a big batch; its reply comes when it is durable."""
        d = self.d
        key = req.args.request_key
        batch = self.by_key.get(key) if key is not None else None
        if batch is not None:
            batch.attach(ident, req.id)  # a retry of a batch still being taken in
            return
        specs = req.args.effects
        if d.sched.queue_full(len(specs) + self.pending_effects):
            raise QueueFull(f"{len(d.sched.effects) + self.pending_effects} effects are queued, running or "
                            f"being submitted (limit --max-queued {d.config.max_queued})")
        batch = Batch(key, specs, [(ident, req.id)])
        self.batches.append(batch)
        if key is not None:
            self.by_key[key] = batch

    # ---- work (once per loop turn) --------------------------------------------------------

    def step(self) -> None:
        """Advance the oldest batches by at most TURN_BUDGET seconds of work."""
        deadline = time.monotonic() + TURN_BUDGET
        while self.batches and time.monotonic() < deadline:
            batch = self.batches[0]
            try:
                if self.d.draining:
                    raise Unavailable("the daemon is shutting down and accepts no new effects")
                if not self._advance(batch, deadline):
                    return
            except EffectdError as exc:
                self._answer(batch, exc)
            except Exception as exc:  # a bug must not take the loop down with it
                log.exception("batch intake failed")
                self._answer(batch, InternalError(f"{type(exc).__name__}: {exc}"))

    def _advance(self, batch: Batch, deadline: float) -> bool:
        """Work on one batch until the deadline; True when it was answered (done or failed)."""
        if batch.phase == "validate":
            self._validate(batch, deadline)
            return False
        self._check_written(batch)
        if batch.phase == "labels":
            self._write_labels(batch, deadline)
            return False
        self._commit(batch)
        return True

    def _validate(self, batch: Batch, deadline: float) -> None:
        handlers = self.submissions
        now = time.time()
        while batch.pos < len(batch.specs) and time.monotonic() < deadline:
            end = min(batch.pos + SLICE, len(batch.specs))
            for i in range(batch.pos, end):
                eff = handlers.new_effect(check_effect_spec(batch.specs[i], f"effects[{i}]."), now)
                batch.effects.append(eff)
            batch.pos = end
        if batch.pos == len(batch.specs):
            batch.phase, batch.pos = "labels", 0

    def _check_written(self, batch: Batch) -> None:
        if batch.written_at is not None and self.d.journal.commits == batch.written_at:
            raise DiskFull("the journal could not commit part of this batch; nothing of it was submitted")
        batch.written_at = None

    def _write_labels(self, batch: Batch, deadline: float) -> None:
        journal = self.d.journal
        if batch.pos == 0:
            pending = dict(journal.get_meta(PENDING_META) or {})
            pending[batch.token] = [batch.effects[0].id, batch.effects[-1].id]
            journal.set_meta(PENDING_META, pending)
        while batch.pos < len(batch.effects) and time.monotonic() < deadline:
            end = min(batch.pos + SLICE, len(batch.effects))
            records = [e.to_record() for e in batch.effects[batch.pos:end]]
            journal.put_labels(records)
            batch.rows += journal.new_effect_rows(records)
            batch.pos = end
        batch.written_at = journal.commits
        if batch.pos == len(batch.effects):
            batch.phase = "commit"

    def _commit(self, batch: Batch) -> None:
        d = self.d
        if batch.key is not None:
            known = self.submissions.ids_for_key(batch.key)
            if known is not None:  # the same key was committed meanwhile (a small submit_many)
                self._answer(batch, known)
                return
        if len(d.sched.effects) + len(batch.effects) > d.config.max_queued:
            raise QueueFull(f"{len(d.sched.effects)} effects are queued or running "
                            f"(limit --max-queued {d.config.max_queued})")
        journal = d.journal
        journal.savepoint()
        try:
            journal.put_new_effects(batch.rows)
            if batch.key is not None:
                journal.put_request_key(batch.key, [e.id for e in batch.effects])
            pending = dict(journal.get_meta(PENDING_META) or {})
            pending.pop(batch.token, None)
            journal.set_meta(PENDING_META, pending)
        except BaseException:
            journal.rollback_to_savepoint()
            raise
        journal.release_savepoint()
        for eff in batch.effects:
            d.sched.add(eff)
        self._answer(batch, [e.id for e in batch.effects])

    def _answer(self, batch: Batch, outcome: list[str] | EffectdError) -> None:
        self.batches.remove(batch)
        if batch.key is not None and self.by_key.get(batch.key) is batch:
            del self.by_key[batch.key]
        for ident, request_id in batch.targets:
            if isinstance(outcome, EffectdError):
                self.d.reply_error(ident, request_id, outcome)
            else:
                self.d.reply(ident, request_id, SubmitManyReply(ids=outcome), durable=True)

    # ---- start and stop -------------------------------------------------------------------

    def abandon(self, why: EffectdError) -> None:
        """The daemon stops: answer every batch still being taken in (nothing of it exists)."""
        while self.batches:
            self._answer(self.batches[0], why)


def forget_interrupted(journal: Journal) -> None:
    """At start: delete the label rows of batches a crash or a failed commit interrupted."""
    pending = journal.get_meta(PENDING_META) or {}
    if not pending:
        return
    removed = sum(journal.delete_orphan_labels(low, high) for low, high in pending.values())
    journal.set_meta(PENDING_META, {})
    journal.commit()
    log.info("removed %d label rows of %d interrupted batch(es)", removed, len(pending))
