// Unit tests of the §9 gap-fill loop (followEffect) with scripted live messages and an
// in-memory store: no daemon needed.   node --test test/follow_unit_test.js

import assert from "node:assert/strict";
import { test } from "node:test";

import { encode } from "@msgpack/msgpack";

import { EffectdClient, MAX_SUBSCRIPTION_TOPIC_BYTES, followEffect } from "../index.js";

const ID = "01M848HB4626J12A19R3GWX886";

/** An in-memory daemon: output files that grow, a state, and a script of live messages. */
class FakeDaemon {
  constructor() {
    /** @type {Record<string, Buffer>} */
    this.files = { stdout: Buffer.alloc(0), stderr: Buffer.alloc(0), value: Buffer.alloc(0) };
    this.state = "queued";
    /** @type {(() => Buffer[]|null|undefined)[]} each step returns a message, null (timeout) or undefined (nothing: next step) */
    this.script = [];
    this.reads = 0;
    this.receives = 0;
  }

  /** Bytes are written to the store before they are published (§8.4). */
  write(stream, text) {
    const offset = this.files[stream].length;
    this.files[stream] = Buffer.concat([this.files[stream], Buffer.from(text)]);
    return offset;
  }

  static msg(header, data = Buffer.alloc(0)) {
    return [Buffer.from(ID, "latin1"), Buffer.from(encode(header)), Buffer.from(data)];
  }

  // -- script steps
  subscribed() {
    this.script.push(() => FakeDaemon.msg({ stream: "event", event: "subscribed", state: this.state }));
    return this;
  }
  /** Write and publish a chunk; `drop` loses it on the way (PUB semantics). */
  chunk(stream, text, { drop = false } = {}) {
    this.script.push(() => {
      const offset = this.write(stream, text);
      return drop ? undefined : FakeDaemon.msg({ stream, offset, attempt: 1 }, Buffer.from(text));
    });
    return this;
  }
  /** Write without publishing yet (the chunk is still in flight). */
  writeOnly(stream, text) {
    this.script.push(() => { this.write(stream, text); return undefined; });
    return this;
  }
  /** Re-deliver stored bytes [offset, offset+len) as a live chunk (duplicate or overlap). */
  replay(stream, offset, len) {
    this.script.push(() => FakeDaemon.msg({ stream, offset, attempt: 1 }, this.files[stream].subarray(offset, offset + len)));
    return this;
  }
  finished(state = "succeeded", { drop = false } = {}) {
    this.script.push(() => {
      this.state = state;
      if (drop) return undefined;
      const sizes = { stdout: this.files.stdout.length, stderr: this.files.stderr.length, value: this.files.value.length };
      return FakeDaemon.msg({ stream: "event", event: "finished", state, attempt: 1, sizes });
    });
    return this;
  }
  running() {
    this.script.push(() => { this.state = "running"; return FakeDaemon.msg({ stream: "event", event: "started", state: "running", attempt: 1, time: 1.5 }); });
    return this;
  }
  idle() {
    this.script.push(() => null);
    return this;
  }
  raw(frames) {
    this.script.push(() => frames);
    return this;
  }

  // -- the client side
  async receive() {
    this.receives += 1;
    if (this.receives > 1000) throw new Error("follower does not terminate");
    while (this.script.length) {
      const m = this.script.shift()();
      if (m !== undefined) return m;
    }
    return null; // nothing more: the live stream is silent
  }
  ops() {
    const final = () => ["succeeded", "failed", "cancelled", "timed_out", "lost"].includes(this.state);
    return {
      readOutput: async (id, stream, offset = 0, maxBytes = 1 << 20) => {
        assert.equal(id, ID);
        this.reads += 1;
        const file = this.files[stream];
        const data = file.subarray(offset, offset + maxBytes);
        const next_offset = offset + data.length;
        return { id, stream, offset, data, next_offset, size: Math.max(file.length, next_offset), state: this.state,
          final: final(), eof: final() && next_offset >= file.length };
      },
      status: async (ids) => ids.map((id) => ({ id, state: this.state })),
    };
  }
}

/** Run the follower; check contiguity; return delivered bytes per stream and sources. */
async function run(fake, { streams = ["stdout", "stderr"], fromOffset = 0 } = {}) {
  const out = Object.fromEntries(streams.map((s) => [s, []]));
  const next = Object.fromEntries(streams.map((s) => [s, fromOffset]));
  const sources = { live: 0, store: 0 };
  const gen = followEffect(fake.ops(), ID, { receive: (ms) => fake.receive(ms), streams, fromOffset, idleMs: 1 });
  for await (const c of gen) {
    assert.equal(c.offset, next[c.stream], `contiguous ${c.stream}`);
    next[c.stream] += c.data.length;
    assert.ok(c.data.length > 0, "no empty chunks");
    out[c.stream].push(Buffer.from(c.data));
    sources[c.source] += c.data.length;
  }
  const joined = Object.fromEntries(streams.map((s) => [s, Buffer.concat(out[s]).toString()]));
  return { out: joined, sources };
}

test("in-order live chunks are delivered live, once", async () => {
  const fake = new FakeDaemon().subscribed().running().chunk("stdout", "hello ").chunk("stdout", "world\n")
    .chunk("stderr", "warn\n").finished();
  const { out, sources } = await run(fake);
  assert.deepEqual(out, { stdout: "hello world\n", stderr: "warn\n" });
  assert.equal(sources.store, 0);
});

test("a dropped chunk is filled from the store before the next one is applied", async () => {
  const fake = new FakeDaemon().subscribed().running().chunk("stdout", "aaa").chunk("stdout", "bbb", { drop: true })
    .chunk("stdout", "ccc").finished();
  const { out, sources } = await run(fake);
  assert.equal(out.stdout, "aaabbbccc");
  assert.equal(sources.store, 3);
  assert.equal(sources.live, 6);
});

test("duplicates are dropped and overlaps contribute only their new bytes", async () => {
  const fake = new FakeDaemon().subscribed().running().chunk("stdout", "0123").replay("stdout", 0, 4)
    .replay("stdout", 1, 2).writeOnly("stdout", "4567").replay("stdout", 2, 6).finished();
  const { out } = await run(fake);
  assert.equal(out.stdout, "01234567");
});

test("'finished' overtaking the last chunks: the rest is read from the store", async () => {
  const fake = new FakeDaemon().subscribed().running().chunk("stdout", "first\n").writeOnly("stdout", "last\n")
    .writeOnly("stderr", "err\n").finished().replay("stdout", 6, 5);
  const { out, sources } = await run(fake);
  assert.deepEqual(out, { stdout: "first\nlast\n", stderr: "err\n" });
  assert.equal(sources.store, 9);
});

test("a dropped 'finished' is noticed by the idle check", async () => {
  const fake = new FakeDaemon().subscribed().running().chunk("stdout", "x").chunk("stdout", "y", { drop: true })
    .finished("failed", { drop: true });
  const { out } = await run(fake);
  assert.equal(out.stdout, "xy");
});

test("late join: an effect that finished before the subscription is replayed from the store", async () => {
  const fake = new FakeDaemon();
  fake.write("stdout", "done\n");
  fake.write("stderr", "e\n");
  fake.state = "succeeded";
  fake.subscribed();
  const { out, sources } = await run(fake);
  assert.deepEqual(out, { stdout: "done\n", stderr: "e\n" });
  assert.equal(sources.live, 0);
});

test("no 'subscribed' at all (dropped): still exact", async () => {
  const fake = new FakeDaemon().idle().chunk("stdout", "a", { drop: true }).chunk("stdout", "b").finished();
  const { out } = await run(fake);
  assert.equal(out.stdout, "ab");
});

test("output written before the subscription is caught up from the store, then live continues", async () => {
  const fake = new FakeDaemon();
  fake.state = "running";
  fake.write("stdout", "early ");
  fake.subscribed().chunk("stdout", "live\n").finished();
  const { out, sources } = await run(fake);
  assert.equal(out.stdout, "early live\n");
  assert.equal(sources.store, 6);
  assert.equal(sources.live, 5);
});

test("fromOffset and a single stream", async () => {
  const fake = new FakeDaemon().subscribed().running().chunk("stdout", "0123456789").chunk("stderr", "ignored")
    .finished();
  const { out } = await run(fake, { streams: ["stdout"], fromOffset: 4 });
  assert.deepEqual(out, { stdout: "456789" });
});

test("malformed messages and other topics are ignored", async () => {
  const fake = new FakeDaemon().subscribed().running()
    .raw([Buffer.from(ID), Buffer.from([0xc1])]) // two frames
    .raw([Buffer.from(ID), Buffer.from([0xc1]), Buffer.alloc(0)]) // header not msgpack
    .raw([Buffer.from(ID), Buffer.from(encode([1, 2])), Buffer.alloc(0)]) // header not a map
    .raw([Buffer.from("01M848HB4626J12A19R3GWX887"), Buffer.from(encode({ stream: "stdout", offset: 0 })), Buffer.from("zz")])
    .raw([Buffer.from(ID), Buffer.from(encode({ stream: "event", event: "some_future_event" })), Buffer.alloc(0)])
    .raw([Buffer.from(ID), Buffer.from(encode({ stream: "stdout", offset: 1.5 })), Buffer.from("q")])
    .chunk("stdout", "ok\n").finished();
  const { out } = await run(fake);
  assert.equal(out.stdout, "ok\n");
});

test("many chunks with random drops, duplicates and interleaving stay exact", async () => {
  let seed = 42;
  const rnd = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
  const fake = new FakeDaemon().subscribed().running();
  for (let i = 0; i < 400; i++) {
    const s = rnd() < 0.7 ? "stdout" : "stderr";
    fake.chunk(s, `${s}-${i}-${"x".repeat(Math.floor(rnd() * 50))}\n`, { drop: rnd() < 0.3 });
    if (rnd() < 0.1) fake.script.push(() => {
      const file = fake.files.stdout;
      const off = Math.floor(rnd() * file.length);
      return FakeDaemon.msg({ stream: "stdout", offset: off, attempt: 1 }, file.subarray(off, off + 30));
    });
    if (rnd() < 0.05) fake.idle();
  }
  fake.finished();
  const { out } = await run(fake);
  assert.equal(out.stdout, fake.files.stdout.toString());
  assert.equal(out.stderr, fake.files.stderr.toString());
});

test("a message received when the idle check is due is still handled (§9 step 5)", async () => {
  // Progress events never advance a stream: each one arrives after a quiet period, with the
  // store check due. The check must run and the message must still be handled, not dropped.
  const realNow = Date.now;
  let now = realNow();
  Date.now = () => now;
  try {
    const fake = new FakeDaemon().subscribed().running();
    for (let i = 1; i <= 4; i++) {
      fake.idle();
      fake.script.push(() => { now += 10_000; return FakeDaemon.msg({ stream: "event", event: "progress", message: `step ${i}` }); });
    }
    fake.chunk("stdout", "done\n").finished();
    const progress = [];
    const gen = followEffect(fake.ops(), ID, { receive: (ms) => fake.receive(ms), events: true, idleMs: 1 });
    for await (const c of gen) if (c.stream === "event" && c.event === "progress") progress.push(c.header.message);
    assert.deepEqual(progress, ["step 1", "step 2", "step 3", "step 4"]);
  } finally {
    Date.now = realNow;
  }
});

test("a subscription topic over the stream socket's limit is refused before subscribing", async () => {
  const client = new EffectdClient({ runtimeDir: "/nonexistent-effectd", checkRuntimeDir: false });
  try {
    await assert.rejects(client.stream("X".repeat(MAX_SUBSCRIPTION_TOPIC_BYTES + 1)).next(),
      (err) => err.code === "bad_request" && err.message.includes(`longer than ${MAX_SUBSCRIPTION_TOPIC_BYTES} bytes`));
  } finally {
    client.close();
  }
});
