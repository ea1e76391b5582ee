// End-to-end test of the Node client against a running daemon.
//
//   EFFECTD_RUNTIME_DIR=/path/to/runtime node test/stream_test.js
//
// Prints one JSON line: {"ok": true, ...} and exits 0, or {"ok": false, "reason": ...} and exits 1.

import { setTimeout as sleep } from "node:timers/promises";

import { EffectdClient, EffectdError } from "../index.js";

const OVERALL_TIMEOUT_MS = Number(process.env.EFFECTD_NODE_TEST_TIMEOUT_MS || 240_000);

class Failure extends Error {}

/** @param {unknown} cond @param {string} reason */
function check(cond, reason) {
  if (!cond) throw new Failure(reason);
}

/** "1\n2\n...\nn\n" */
function seqText(n) {
  const parts = [];
  for (let i = 1; i <= n; i++) parts.push(`${i}\n`);
  return parts.join("");
}

/** First differing byte index of two buffers, for readable failures. */
function firstDiff(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return n;
}

/**
 * Follow an effect and reassemble its streams, checking that every stream's chunks are
 * contiguous (each chunk starts where the previous one ended).
 * @param {EffectdClient} client
 * @param {string} id
 * @param {{fromOffset?: number, streams?: string[], delayMs?: number}} [opts]
 */
async function follow(client, id, opts = {}) {
  const fromOffset = opts.fromOffset ?? 0;
  const streams = opts.streams ?? ["stdout", "stderr"];
  /** @type {Record<string, Buffer[]>} */
  const parts = Object.fromEntries(streams.map((s) => [s, []]));
  /** @type {Record<string, number>} */
  const next = Object.fromEntries(streams.map((s) => [s, fromOffset]));
  const counts = { live: 0, store: 0, chunks: 0 };
  for await (const chunk of client.stream(id, { fromOffset, streams })) {
    check(chunk.offset === next[chunk.stream],
      `${chunk.stream} chunk at offset ${chunk.offset}, expected ${next[chunk.stream]}`);
    next[chunk.stream] += chunk.data.length;
    parts[chunk.stream].push(Buffer.from(chunk.data));
    counts[chunk.source] += chunk.data.length;
    counts.chunks += 1;
    if (opts.delayMs) await sleep(opts.delayMs); // a slow consumer: the SUB queue overflows
  }
  /** @type {Record<string, Buffer>} */
  const out = {};
  for (const s of streams) out[s] = Buffer.concat(parts[s]);
  return { out, counts };
}

/** @param {Buffer} got @param {string} want @param {string} what */
function checkBytes(got, want, what) {
  const w = Buffer.from(want);
  check(got.equals(w),
    `${what}: ${got.length} bytes, expected ${w.length}; first difference at byte ${firstDiff(got, w)}`);
}

async function main() {
  const result = { ok: false };
  const client = new EffectdClient();
  // A second client with a tiny receive high-water mark and a slow consumer, so that live
  // chunks are dropped and the gap-fill path of stream() is exercised.
  const lossy = new EffectdClient({ streamHwm: 1 });
  try {
    // hello
    const hello = await client.hello({ client: "effectd-node-test/1" });
    check(hello.ok === true && hello.protocol === 1, `hello: unexpected reply ${JSON.stringify(hello)}`);
    for (const cap of ["read_output", "stream_offsets"]) {
      check(hello.capabilities.includes(cap), `hello: capability ${cap} missing`);
    }
    result.protocol = hello.protocol;
    result.instance = hello.instance;

    // submit `seq 1 10000` and follow it live
    const N = 10000;
    const want = seqText(N);
    const sub = await client.submitShell(["seq", "1", String(N)], { name: "node-client-seq" });
    check(typeof sub.id === "string" && sub.id.length === 26, `submit: bad id ${JSON.stringify(sub)}`);
    result.id = sub.id;
    const live = await follow(client, sub.id);
    checkBytes(live.out.stdout, want, "live stream stdout");
    check(live.out.stderr.length === 0, `live stream stderr not empty: ${live.out.stderr.length} bytes`);
    result.stdout_bytes = live.out.stdout.length;
    result.stdout_exact = true;
    result.live_bytes = live.counts.live;
    result.store_bytes = live.counts.store;

    // wait for it: succeeded, exit code 0
    const waited = await client.wait(sub.id, { timeout: 60 });
    check(!waited.timed_out, "wait timed out");
    const record = waited.effects[0];
    check(record.id === sub.id, `wait returned record ${record.id}`);
    check(waited.done.includes(sub.id), "wait: id not in done");
    result.state = record.state;
    result.exit_code = record.exit_code;
    check(record.state === "succeeded", `final state ${record.state} (reason ${record.reason})`);
    check(record.exit_code === 0, `exit code ${record.exit_code}`);

    // late join: follow the same effect again now that it is final: everything from the store
    const late = await follow(client, sub.id);
    checkBytes(late.out.stdout, want, "late-join stdout");
    check(late.counts.live === 0, `late join delivered ${late.counts.live} live bytes`);
    const tail = await follow(client, sub.id, { fromOffset: 10, streams: ["stdout"] });
    checkBytes(tail.out.stdout, want.slice(10), "late-join stdout from offset 10");

    // late join on an effect that was started and finished before anyone followed it,
    // with output on both streams and a non-zero exit
    const other = await client.submitShell("printf 'alpha\\nbeta\\n'; printf 'oops\\n' >&2; exit 3");
    const otherDone = await client.wait([other.id], { timeout: 60 });
    const otherRecord = otherDone.effects[0];
    check(otherRecord.state === "failed" && otherRecord.exit_code === 3,
      `second effect: state ${otherRecord.state}, exit code ${otherRecord.exit_code}`);
    const otherOut = await follow(client, other.id);
    checkBytes(otherOut.out.stdout, "alpha\nbeta\n", "late-join stdout of a finished effect");
    checkBytes(otherOut.out.stderr, "oops\n", "late-join stderr of a finished effect");
    result.late_join = true;

    // lossy live follow: ~21 MB through a SUB queue of one message, slow consumer
    const M = 3000000;
    const big = await lossy.submitShell(["seq", "1", String(M)], { name: "node-client-lossy" });
    const lossyOut = await follow(lossy, big.id, { streams: ["stdout"], delayMs: 2 });
    checkBytes(lossyOut.out.stdout, seqText(M), "lossy live stdout");
    const bigDone = await lossy.wait(big.id, { timeout: 60 });
    check(bigDone.effects[0].state === "succeeded", `lossy effect: ${bigDone.effects[0].state}`);
    result.lossy_bytes = lossyOut.out.stdout.length;
    result.lossy_live_bytes = lossyOut.counts.live;
    result.lossy_store_bytes = lossyOut.counts.store;

    // errors carry the protocol code
    try {
      await client.status(["0".repeat(26)]);
      throw new Failure("status of an unknown id did not fail");
    } catch (err) {
      check(err instanceof EffectdError && err.code === "not_found", `unknown id: ${err}`);
    }
    result.error_code = "not_found";

    result.ok = true;
    return result;
  } finally {
    client.close();
    lossy.close();
  }
}

const timer = setTimeout(() => {
  console.log(JSON.stringify({ ok: false, reason: `test did not finish within ${OVERALL_TIMEOUT_MS} ms` }));
  process.exit(1);
}, OVERALL_TIMEOUT_MS);
timer.unref();

main().then(
  (result) => {
    console.log(JSON.stringify(result));
    process.exit(0);
  },
  (err) => {
    const reason = err instanceof Failure ? err.message : `${err?.name ?? "Error"}: ${err?.code ? `${err.code}: ` : ""}${err?.message ?? err}`;
    console.log(JSON.stringify({ ok: false, reason }));
    if (!(err instanceof Failure) && err?.stack) console.error(err.stack);
    process.exit(1);
  },
);
