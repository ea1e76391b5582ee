"""Control-request handlers: one method per op, each returning its typed reply (ipc/records.py).

Handlers change the scheduler's state and stage journal writes; the server commits the batch
once per loop turn and only then sends the replies (group commit: nothing is acknowledged
before it is durable).
"""

from __future__ import annotations

import os
import time
from typing import Any

from effectd import __version__
from effectd.daemon.core import Effect
from effectd.daemon.flow import ReadCredits, total_inflight
from effectd.daemon.host import Host
from effectd.daemon.intake import INLINE_BATCH
from effectd.daemon.waits import Waiter, WaitOutcome
from effectd.ipc import codec
from effectd.ipc import records as r
from effectd.ipc import request_args as ra
from effectd.ipc.errors import (
    InvalidState,
    NotFound,
    QueueFull,
    RequestKeyGone,
    TooLarge,
    Unavailable,
)
from effectd.ipc.schema import (
    CAPABILITIES,
    FINAL_STATES,
    MAX_PROTOCOL_VERSION,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    EffectState,
    Request,
    check_effect_spec,
)

RECORDS_BUDGET = codec.MAX_REPLY_BYTES - 1024 * 1024
"""Encoded records per reply; the rest of the limit is for the envelope and ``done`` (10 000 ids)."""

RESULT_FIELDS = ("id", "state", "reason", "exit_code", "signal", "result", "error", "attempt",
                 "sizes", "truncated", "leaked_processes")


class RequestHandlers:
    def __init__(self, host: Host) -> None:
        self.d = host
        self.credits = ReadCredits(total_inflight())

    def dispatch(self, ident: bytes, req: Request[ra.Args]) -> r.Reply | None:
        """The reply, or None when the request was parked (wait). Each handler is annotated with
        its op's arguments struct: parse_request built ``req.args`` as OPS[req.op].args (a test
        checks every annotation against OPS)."""
        self.credits.request_from(ident)
        method = getattr(self, f"op_{req.op}")
        return method(ident, req)  # type: ignore[no-any-return]

    # ---- helpers --------------------------------------------------------------------------

    def record(self, effect_id: str) -> dict[str, Any] | None:
        eff = self.d.sched.effects.get(effect_id)
        if eff is not None:
            rec = eff.to_record()
            if eff.state is EffectState.RUNNING:
                rec["sizes"] = self.d.outputs.sizes(effect_id)
            return rec
        return self.d.journal.get(effect_id)

    def packed_records(self, ids: list[str]) -> tuple[list[r.PackedRecord], list[str]]:
        """The records of the distinct ``ids`` (first occurrence order), each encoded once within
        the reply budget, and the ids among them that are final. Raises NotFound / TooLarge.

        Naming one id a thousand times costs one record; many large records cost at most the
        budget before the request is refused, never a reply the size of their sum."""
        distinct = list(dict.fromkeys(ids))
        self.check_exist(distinct)
        out: list[r.PackedRecord] = []
        done: list[str] = []
        size = 0
        for eid in distinct:
            state, item = self.packed_record(eid)
            size += len(item)
            if size > RECORDS_BUDGET:
                raise TooLarge(f"the records of these {len(distinct)} effects exceed the reply limit of "
                               f"{codec.MAX_REPLY_BYTES} bytes after {len(out)} of them; ask for fewer ids")
            out.append(r.PackedRecord(item))
            if state in FINAL_STATES:
                done.append(eid)
        return out, done

    def packed_record(self, effect_id: str) -> tuple[EffectState, bytes]:
        """One record, encoded: live effects from memory, the others as the journal stores them
        (already msgpack: neither decoded nor encoded again)."""
        eff = self.d.sched.effects.get(effect_id)
        if eff is not None:
            return eff.state, codec.pack(self.record(effect_id))
        stored = self.d.journal.get_packed(effect_id)
        if stored is None:
            raise NotFound(f"no effect with id {effect_id}")
        return EffectState(stored[0]), stored[1]

    def check_exist(self, ids: list[str]) -> None:
        """NotFound naming (up to 10 of) the ids no effect has; loads no record."""
        missing = [eid for eid in dict.fromkeys(ids) if self.state_of(eid) is None]
        if missing:
            raise NotFound(f"no effect with id {', '.join(missing[:10])}")

    def state_of(self, effect_id: str) -> EffectState | None:
        eff = self.d.sched.effects.get(effect_id)
        if eff is not None:
            return eff.state
        state = self.d.journal.state(effect_id)
        return None if state is None else EffectState(state)

    # ---- ops ------------------------------------------------------------------------------

    def op_hello(self, ident: bytes, req: Request[ra.HelloArgs]) -> r.HelloReply:
        d = self.d
        return r.HelloReply(
            protocol=PROTOCOL_VERSION,
            min_protocol=MIN_PROTOCOL_VERSION,
            max_protocol=MAX_PROTOCOL_VERSION,
            capabilities=list(CAPABILITIES),
            daemon_version=__version__,
            instance=d.instance,
            pid=os.getpid(),
            uptime=time.monotonic() - d.started,
            journal_commits=d.journal.commits,
            counts=d.journal.counts(),
            workers=[
                r.WorkerInfo(id=w.id, pid=w.pid, state=w.state.value, effects=len(w.effects),
                             effects_done=w.effects_done, rss=w.rss)
                for w in d.sched.live_workers()
            ],
            worker_crashes=d.crashes.failures,
            worker_crashes_recent=d.crashes.recent(),
            spawn_backoff=d.crashes.remaining(),
            draining=d.draining,
            loop=r.LoopInfo(worst_turn=round(d.worst_turn, 4), deaf_seconds=round(d.hearing.deaf_total, 3)),
            read_inflight=self.credits.inflight,
            read_busy=self.credits.busy_answers,
            managed_by=d.managed_by,
            runtime_dir=str(d.config.runtime_dir),
            state_dir=str(d.config.state_dir),
            limits=r.LimitsInfo(parallel=d.config.parallel, max_workers=d.config.max_workers,
                                max_queued=d.config.max_queued, max_output_bytes=d.config.max_output_bytes),
        )

    def new_effect(self, spec: dict[str, Any], now: float) -> Effect:
        """A new effect for a validated spec (its dependencies must exist); not yet added or journaled."""
        for dep in spec.get("after") or []:
            if self.state_of(dep) is None:
                raise NotFound(f"after: no effect with id {dep}")
        if spec.get("stdin_from") and self.state_of(spec["stdin_from"]) is None:
            raise NotFound(f"stdin_from: no effect with id {spec['stdin_from']}")
        if "max_output_bytes" not in spec:
            spec["max_output_bytes"] = self.d.config.max_output_bytes
        return Effect(id=self.d.ids.new(now), spec=spec, submitted_at=now)

    def ids_for_key(self, request_key: str) -> list[str] | None:
        """The ids a request key was answered with, None if the key is unknown. Raises
        RequestKeyGone when those effects were collected: running them again would be a silent
        second run of a retried submit."""
        known = self.d.journal.ids_for_request_key(request_key)
        if known is not None and any(self.state_of(eid) is None for eid in known):
            raise RequestKeyGone(f"request_key {request_key} was used for effects that have been "
                                 "garbage-collected; send a new key to run them again")
        return known

    def _submit(self, specs: list[dict[str, Any]], request_key: str | None) -> list[str]:
        d = self.d
        if d.draining:
            raise Unavailable("the daemon is shutting down and accepts no new effects")
        if request_key is not None:
            known = self.ids_for_key(request_key)
            if known is not None:
                return known
        if d.sched.queue_full(len(specs) + d.intake.pending_effects):
            raise QueueFull(f"{len(d.sched.effects)} effects are queued or running "
                            f"(limit --max-queued {d.config.max_queued})")
        now = time.time()
        effects = [self.new_effect(spec, now) for spec in specs]  # validate all before writing any
        for eff in effects:
            d.sched.add(eff)
            d.journal.put_effect(eff.to_record(), "submitted", new=True)
        if request_key is not None:
            d.journal.put_request_key(request_key, [e.id for e in effects])
        return [e.id for e in effects]

    def op_submit(self, ident: bytes, req: Request[ra.SubmitArgs]) -> r.SubmitReply:
        ids = self._submit([req.args.effect], req.args.request_key)
        return r.SubmitReply(id=ids[0], state=self.state_of(ids[0]).value)  # type: ignore[union-attr]

    def op_submit_many(self, ident: bytes, req: Request[ra.SubmitManyArgs]) -> r.SubmitManyReply | None:
        """A small batch is taken in now; a big one over several loop turns (daemon/intake.py),
        answered once all of it is durable (None: the reply comes later)."""
        specs = req.args.effects  # the server parses requests with check_batch=False
        if len(specs) > INLINE_BATCH or self.d.intake.admitting(req.args.request_key):
            if self.d.draining:
                raise Unavailable("the daemon is shutting down and accepts no new effects")
            self.d.intake.admit(ident, req)
            return None
        checked = [check_effect_spec(spec, f"effects[{i}].") for i, spec in enumerate(specs)]
        return r.SubmitManyReply(ids=self._submit(checked, req.args.request_key))

    def op_status(self, ident: bytes, req: Request[ra.StatusArgs]) -> r.StatusReply[r.PackedRecord]:
        return r.StatusReply(effects=self.packed_records(req.args.ids)[0])

    def op_list(self, ident: bytes, req: Request[ra.ListArgs]) -> r.ListReply[r.PackedRecord]:
        """A page ends at ``limit`` records or at the reply budget (``truncated``), whichever
        comes first; the client continues with ``before`` = the last id it got."""
        a = req.args
        out: list[r.PackedRecord] = []
        size = 0
        truncated = False
        for eid, item in self.d.journal.list_packed(states=a.states, labels=a.labels, name=a.name,
                                                    limit=a.limit, before=a.before):
            if eid in self.d.sched.effects:  # live: memory is ahead of the journal
                item = codec.pack(self.record(eid))
            size += len(item)
            if size > RECORDS_BUDGET:
                if not out:
                    raise TooLarge(f"effect {eid}'s record exceeds the reply limit of "
                                   f"{codec.MAX_REPLY_BYTES} bytes")
                truncated = True
                break
            out.append(r.PackedRecord(item))
        return r.ListReply(effects=out, truncated=truncated)

    def _wait_done(self, ids: list[str], first: bool) -> bool:
        finals = [self.state_of(i) in FINAL_STATES for i in ids]
        return any(finals) if first else all(finals)

    def wait_reply(self, ids: list[str], timed_out: bool) -> r.WaitReply[r.PackedRecord]:
        # The same records as status/list (protocol.md §7.1); the reply budget bounds their size.
        recs, done = self.packed_records(ids)
        return r.WaitReply(effects=recs, done=done, timed_out=timed_out)

    def op_wait(self, ident: bytes, req: Request[ra.WaitArgs]) -> r.WaitReply[r.PackedRecord] | None:
        ids = list(dict.fromkeys(req.args.ids))
        self.check_exist(ids)  # NotFound before parking
        first = req.args.return_when == "first"
        if self._wait_done(ids, first) or req.args.timeout == 0:
            return self.wait_reply(ids, timed_out=not self._wait_done(ids, first))
        pending = {i for i in ids if self.state_of(i) not in FINAL_STATES}
        self.d.waits.park(Waiter(ident, req.id, ids, first, time.monotonic() + req.args.timeout, pending))
        return None

    def answer_waits(self, now: float) -> None:
        """Answer the waits the wait table says are due (daemon/waits.py)."""
        for w in self.d.waits.due(now):
            try:
                if w.outcome is WaitOutcome.NOT_FOUND:
                    self.check_exist(w.ids)  # raises NotFound naming the ids gc deleted
                self.d.reply(w.ident, w.request_id, self.wait_reply(w.ids, timed_out=not w.satisfied))
            except NotFound as exc:  # garbage-collected meanwhile
                self.d.reply_error(w.ident, w.request_id, exc)

    def op_result(self, ident: bytes, req: Request[ra.ResultArgs]) -> r.ResultReply:
        rec = self.record(req.args.id)
        if rec is None:
            raise NotFound(f"no effect with id {req.args.id}")
        if EffectState(rec["state"]) not in FINAL_STATES:
            raise InvalidState(f"effect {rec['id']} is {rec['state']}; its result is not known yet")
        fields: dict[str, Any] = {k: rec.get(k) for k in RESULT_FIELDS}
        return r.ResultReply(**fields)

    def op_cancel(self, ident: bytes, req: Request[ra.CancelArgs]) -> r.CancelReply:
        d = self.d
        self.check_exist(req.args.ids)
        reason = req.args.reason or "cancelled"
        results: list[r.CancelOutcome] = []
        for eid in req.args.ids:
            eff = d.sched.effects.get(eid)
            if eff is None:
                results.append(r.CancelOutcome(id=eid, state=self.state_of(eid).value,  # type: ignore[union-attr]
                                               cancelled=False))
                continue
            d.cancel_effect(eff, reason)
            results.append(r.CancelOutcome(id=eid, state=eff.state.value, cancelled=True))
        return r.CancelReply(effects=results)

    def op_read_output(self, ident: bytes, req: Request[ra.ReadOutputArgs]) -> r.ReadOutputReply:
        a = req.args
        state = self.state_of(a.id)
        if state is None:
            raise NotFound(f"no effect with id {a.id}")
        final = state in FINAL_STATES
        # Size first, then data: with the worker appending concurrently, data may extend past
        # the size we report but never the other way round.
        size = self.d.outputs.size(a.id, a.stream)
        # Flow control: replies not yet read by their clients are bounded in total (flow.py).
        allowed = self.credits.grant(ident, min(a.max_bytes, max(0, size - a.offset)) or 1)
        data = self.d.outputs.read(a.id, a.stream, a.offset, allowed)
        next_offset = a.offset + len(data)
        if data:  # the file grew between the two reads: the bytes returned are part of it
            size = max(size, next_offset)
        self.credits.charge(ident, len(data), last=final and next_offset >= size)
        # An offset past the end reads nothing and must not be reported as the stream's size.
        return r.ReadOutputReply(id=a.id, stream=a.stream, offset=a.offset, data=data,
                                 next_offset=next_offset, size=size, state=state.value,
                                 final=final, eof=final and next_offset >= size)

    def op_group_set(self, ident: bytes, req: Request[ra.GroupSetArgs]) -> r.GroupSetReply:
        name, parallel = req.args.name, req.args.parallel
        limits = self.d.sched.group_limits
        if parallel is None:
            limits.pop(name, None)
        else:
            limits[name] = parallel
        self.d.journal.set_meta("group_limits", dict(limits))
        return r.GroupSetReply(name=name, parallel=parallel)

    def op_groups(self, ident: bytes, req: Request[ra.GroupsArgs]) -> r.GroupsReply:
        stats = {name: r.GroupInfo(name=name, parallel=limit) for name, limit in self.d.sched.group_limits.items()}
        for eff in self.d.sched.effects.values():
            if eff.group:
                g = stats.setdefault(eff.group, r.GroupInfo(name=eff.group, parallel=None))
                if eff.state is EffectState.RUNNING:
                    g.running += 1
                elif eff.state is EffectState.QUEUED:
                    g.queued += 1
        return r.GroupsReply(groups=sorted(stats.values(), key=lambda g: g.name))

    def op_gc(self, ident: bytes, req: Request[ra.GcArgs]) -> r.GcReply:
        a = req.args
        return r.GcReply(**self.d.retention.collect(retain_days=a.retain_days, retain_count=a.retain_count,
                                                    retain_bytes=a.retain_bytes))

    def op_shutdown(self, ident: bytes, req: Request[ra.ShutdownArgs]) -> r.ShutdownReply:
        self.d.begin_shutdown(drain=req.args.drain)
        return r.ShutdownReply(stopping=True, drain=req.args.drain)
