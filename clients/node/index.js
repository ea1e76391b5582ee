// Node.js client for effectd, written from docs/protocol.md (protocol version 1).
//
// Control requests go over one DEALER socket to control.sock (so several requests, including
// parked `wait`s, can be in flight at once; replies are matched by `rid`). Output is followed
// with a SUB socket on stream.sock and the gap-fill algorithm of §9.

import { randomBytes } from "node:crypto";
import { lstatSync } from "node:fs";
import { join } from "node:path";

import { Decoder, decode, encode } from "@msgpack/msgpack";
import { Dealer, Subscriber } from "zeromq";

/** Protocol version this client speaks (§4). */
export const PROTOCOL_VERSION = 1;
/** Final effect states (§7.2). Unknown states are treated as "not final". */
export const FINAL_STATES = Object.freeze(["succeeded", "failed", "cancelled", "timed_out", "lost"]);
/** Largest control request frame the daemon accepts (§2.3); larger ones get no reply at all. */
export const MAX_REQUEST_BYTES = 16 * 1024 * 1024;
/** `sun_path` limit for an ipc socket path (§1.1). */
export const MAX_SOCKET_PATH_BYTES = 107;
/**
 * Longest subscription topic the daemon's stream socket accepts (§8.1): its 4096-byte message
 * limit minus the 10 bytes of the ZMTP 3.1 SUBSCRIBE command name. A longer subscription gets
 * the SUB socket disconnected on every reconnect, silently and for good.
 */
export const MAX_SUBSCRIPTION_TOPIC_BYTES = 4096 - 10;
/** Effect ids: 26-character upper-case Crockford base32 ULIDs (§5). */
export const EFFECT_ID_RE = /^[0-9A-HJKMNP-TV-Z]{26}$/;

const MIB = 1024 * 1024;
const READ_CHUNK = MIB; // §9 fill(): 1 MiB when reading to the current end
const READ_MAX = 8 * MIB; // read_output.max_bytes upper limit (§5.9)
const WAIT_MAX = 3600; // wait.timeout upper limit (§5.6)
const WAIT_SLICE = 30; // long waits are done in slices (§5.6)
const WAIT_MARGIN = 5; // client reply timeout = wait.timeout + margin (§5.6, §10.3)
const SUBSCRIBE_WAIT_MS = 2000; // §9 step 2
const IDLE_MS = 1000; // §9 step 5
const FORCED_CHECK_MS = 5000; // see stream(): store check even if messages keep arriving

/** Error codes that the daemon's documentation (§3.3) says are worth retrying later. */
const RETRYABLE = new Set(["unavailable", "queue_full", "disk_full", "too_many_waits", "journal_lost", "busy"]);
const BUSY_GIVE_UP_MS = 60_000; // retry a read_output answered `busy` this long (§5.9)

/**
 * An error reported by the daemon (`code` is the protocol's `error.code`, §3.3) or a local
 * condition. Local codes: `unavailable` (no reply after all retries, or no runtime dir),
 * `too_large` (request over 16 MiB, not sent), `unsupported_version` (no common protocol
 * version), `missing_capability` (the daemon does not announce a needed capability),
 * `unsafe_runtime_dir`, `invalid_runtime_dir`, `bad_request` (caught before sending),
 * `protocol` (the daemon sent something this client cannot understand), `closed`.
 * Unknown daemon codes are passed through unchanged.
 */
export class EffectdError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {{rid?: unknown, reply?: unknown, cause?: unknown}} [extra]
   */
  constructor(code, message, extra = {}) {
    super(message, extra.cause === undefined ? undefined : { cause: extra.cause });
    this.name = "EffectdError";
    /** @type {string} */
    this.code = code;
    /** @type {unknown} */
    this.rid = extra.rid;
    /** @type {unknown} the whole error reply, if the daemon sent one */
    this.reply = extra.reply;
  }

  /** True for codes where §3.3 says "back off and retry" (a submit keeps its `request_key`). */
  get retryable() {
    return RETRYABLE.has(this.code);
  }
}

/** @param {string|undefined|null} state */
export function isFinalState(state) {
  return typeof state === "string" && FINAL_STATES.includes(state);
}

/**
 * Resolve the runtime dir exactly as §1.1 says.
 * @param {NodeJS.ProcessEnv} [env]
 * @returns {string}
 */
export function resolveRuntimeDir(env = process.env) {
  if (env.EFFECTD_RUNTIME_DIR) return env.EFFECTD_RUNTIME_DIR;
  if (env.XDG_RUNTIME_DIR) return join(env.XDG_RUNTIME_DIR, "effectd");
  const uid = typeof process.getuid === "function" ? process.getuid() : 0;
  return join(env.TMPDIR || "/tmp", `effectd-${uid}`);
}

/**
 * §1.1: the runtime dir must exist, be a directory and not a symlink (lstat: a symlink planted at
 * the /tmp fallback could later be pointed elsewhere), belong to us and not be writable by group
 * or others (otherwise another local user could impersonate the daemon).
 * @param {string} dir
 */
export function checkRuntimeDir(dir) {
  let st;
  try {
    st = lstatSync(dir);
  } catch (err) {
    throw new EffectdError("unavailable", `runtime dir ${dir} does not exist: no daemon runs there`, { cause: err });
  }
  if (st.isSymbolicLink()) throw new EffectdError("unsafe_runtime_dir", `runtime dir ${dir} is a symlink`);
  if (!st.isDirectory()) throw new EffectdError("unsafe_runtime_dir", `runtime dir ${dir} is not a directory`);
  const uid = typeof process.getuid === "function" ? process.getuid() : st.uid;
  if (st.uid !== uid) {
    throw new EffectdError("unsafe_runtime_dir", `runtime dir ${dir} is owned by uid ${st.uid}, not by this user (${uid})`);
  }
  if (st.mode & 0o022) {
    throw new EffectdError("unsafe_runtime_dir",
      `runtime dir ${dir} is writable by group or others (mode ${(st.mode & 0o777).toString(8)})`);
  }
}

/** @param {string} dir @param {string} name */
function endpoint(dir, name) {
  const path = join(dir, name);
  if (Buffer.byteLength(path) > MAX_SOCKET_PATH_BYTES) {
    throw new EffectdError("invalid_runtime_dir",
      `socket path ${path} is longer than ${MAX_SOCKET_PATH_BYTES} bytes: no daemon can use this runtime dir`);
  }
  return `ipc://${path}`;
}

/**
 * Refuse a subscription topic the daemon would answer by disconnecting the SUB socket (§8.1).
 * @param {unknown} topic
 */
export function checkTopic(topic) {
  if (typeof topic !== "string") return;
  const bytes = Buffer.byteLength(topic);
  if (bytes > MAX_SUBSCRIPTION_TOPIC_BYTES) {
    throw new EffectdError("bad_request", `subscription topic is ${bytes} bytes, longer than ` +
      `${MAX_SUBSCRIPTION_TOPIC_BYTES} bytes: the daemon would disconnect the SUB socket for good`);
  }
}

/** @param {unknown} v @returns {v is Record<string, unknown>} */
function isPlainMap(v) {
  return typeof v === "object" && v !== null && !Array.isArray(v) && !(v instanceof Uint8Array);
}

/** @param {unknown} v @returns {Buffer} */
function toBuffer(v) {
  if (Buffer.isBuffer(v)) return v;
  if (v instanceof Uint8Array) return Buffer.from(v.buffer, v.byteOffset, v.byteLength);
  return Buffer.alloc(0);
}

/** @param {unknown} err */
function isEagain(err) {
  return typeof err === "object" && err !== null && /** @type {any} */ (err).code === "EAGAIN";
}

/** @param {string|string[]} ids */
function idList(ids) {
  const list = typeof ids === "string" ? [ids] : Array.from(ids);
  if (list.length === 0) throw new EffectdError("bad_request", "ids: at least one id is required");
  return list;
}

/**
 * The gap-fill state of one followed effect (§9), independent of sockets so that it can be
 * driven by the live stream and by store reads alike.
 */
class Follower {
  /**
   * @param {{readOutput: EffectdClient["readOutput"], status: EffectdClient["status"]}} client
   * @param {string} id
   * @param {string[]} streams
   * @param {number} fromOffset
   */
  constructor(client, id, streams, fromOffset) {
    this.client = client;
    this.id = id;
    /** @type {Record<string, number>} next offset to deliver, per followed stream */
    this.expected = Object.fromEntries(streams.map((s) => [s, fromOffset]));
    this.streams = streams;
    /** @type {Record<string, number>|null} */
    this.finalSizes = null;
  }

  /**
   * Read the store from `expected[s]`, up to `until` (or the current end when `until` is null).
   * @param {string} s
   * @param {number|null} until
   * @returns {AsyncGenerator<StreamChunk>}
   */
  async *fill(s, until) {
    while (until === null || this.expected[s] < until) {
      const want = until === null ? READ_CHUNK : Math.min(until - this.expected[s], READ_MAX);
      const r = await this.client.readOutput(this.id, s, this.expected[s], want);
      const data = r.data;
      const at = this.expected[s];
      if (data.length > 0 && r.offset <= at && at < r.offset + data.length) {
        this.expected[s] = r.offset + data.length;
        yield { stream: s, offset: at, data: data.subarray(at - r.offset), source: /** @type {const} */ ("store") };
      }
      if (data.length === 0) return; // nothing more stored yet
      if (until === null && r.next_offset >= r.size) return;
    }
  }

  /**
   * Apply one live chunk: drop duplicates, fill gaps from the store, deliver only new bytes.
   * @param {string} s
   * @param {number} offset
   * @param {Buffer} data
   */
  async *apply(s, offset, data) {
    const end = offset + data.length;
    if (end <= this.expected[s]) return; // duplicate
    if (offset > this.expected[s]) {
      yield* this.fill(s, offset); // gap [expected, offset)
      if (end <= this.expected[s]) return;
      // The store did not (yet) have the gap: never deliver past a hole. These bytes are
      // read from the store later (idle check or final sizes). Cannot happen while the
      // daemon writes before it publishes (§8.4).
      if (offset > this.expected[s]) return;
    }
    const at = this.expected[s];
    this.expected[s] = end;
    yield { stream: s, offset: at, data: data.subarray(at - offset), source: /** @type {const} */ ("live") };
  }

  /** Authoritative final sizes (§9 store_sizes). */
  async storeSizes() {
    const replies = await Promise.all(this.streams.map((s) => this.client.readOutput(this.id, s, 0, 1)));
    /** @type {Record<string, number>} */
    const sizes = {};
    this.streams.forEach((s, i) => { sizes[s] = replies[i].size; });
    return sizes;
  }

  /** Catch up with the store and take the final sizes if the effect is final (§9 steps 3, 5). */
  async *checkStore() {
    for (const s of this.streams) yield* this.fill(s, null);
    if (this.finalSizes === null) {
      const [record] = await this.client.status([this.id]);
      if (isFinalState(record?.state)) this.finalSizes = await this.storeSizes();
    }
  }

  /** Read every stream to its final size (§9 step 4). */
  async *finish() {
    const sizes = /** @type {Record<string, number>} */ (this.finalSizes);
    for (const s of this.streams) yield* this.fill(s, sizes[s]);
  }
}

/**
 * The gap-fill loop of §9, steps 2 to 6, over an already subscribed live stream. `stream()`
 * drives it with a SUB socket; it is exported so that it can be tested with scripted messages.
 * @param {{readOutput: EffectdClient["readOutput"], status: EffectdClient["status"]}} ops
 * @param {string} id
 * @param {{receive: (timeoutMs: number) => Promise<Buffer[]|null>, streams?: string[],
 *   fromOffset?: number, events?: boolean, subscribeWaitMs?: number, idleMs?: number}} opts
 *   `receive` returns the next message's frames, or null after `timeoutMs` without one
 * @returns {AsyncGenerator<StreamChunk | {stream: "event", event: string, header: Record<string, any>}>}
 */
export async function* followEffect(ops, id, opts) {
  const { receive } = opts;
  const streams = opts.streams ?? ["stdout", "stderr"];
  const idleMs = opts.idleMs ?? IDLE_MS;
  const f = new Follower(ops, id, streams, opts.fromOffset ?? 0);

  // 2. wait (bounded) for the first message, normally 'subscribed'; keep it for the loop.
  /** @type {Buffer[][]} */
  const early = [];
  const first = await receive(opts.subscribeWaitMs ?? SUBSCRIBE_WAIT_MS);
  if (first) early.push(first);

  // 3. catch up from the store, then check whether the effect is already final.
  yield* f.checkStore();
  let lastCheck = Date.now();

  for (;;) {
    if (f.finalSizes !== null) { // 4. end: read every stream up to its final size
      yield* f.finish();
      return;
    }
    const msg = early.length ? /** @type {Buffer[]} */ (early.shift()) : await receive(idleMs);
    // 5. idle check (a dropped chunk or 'finished' must not stall us). Also done every few
    // seconds while messages keep coming but none advances this effect's streams (e.g.
    // repeated 'subscribed' events caused by other subscribers of this id).
    if (msg === null || Date.now() - lastCheck >= FORCED_CHECK_MS) {
      yield* f.checkStore();
      lastCheck = Date.now();
      if (msg === null) continue;
    }
    if (msg.length !== 3 || msg[0].toString("latin1") !== id) continue;
    let header;
    try {
      header = decode(msg[1]);
    } catch {
      continue;
    }
    if (!isPlainMap(header)) continue;
    if (header.stream === "event") {
      if (opts.events && typeof header.event === "string") {
        yield /** @type {any} */ ({ stream: "event", event: header.event, header });
      }
      if (header.event === "finished" && f.finalSizes === null) f.finalSizes = await f.storeSizes();
      continue; // started / progress / subscribed: informational
    }
    const s = header.stream;
    if (typeof s !== "string" || !(s in f.expected)) continue;
    if (!Number.isSafeInteger(header.offset) || /** @type {number} */ (header.offset) < 0) continue;
    const before = f.expected[s];
    yield* f.apply(s, /** @type {number} */ (header.offset), toBuffer(msg[2]));
    if (f.expected[s] !== before) lastCheck = Date.now();
  }
}

/**
 * @typedef {object} ClientOptions
 * @property {string} [runtimeDir] default: resolved from the environment (§1.1)
 * @property {number} [timeout] seconds per request attempt (default 5, §10.3)
 * @property {number} [retries] resends after a timeout (default 2, i.e. 3 attempts, §10.3)
 * @property {string} [clientName] sent as `hello.client`
 * @property {boolean} [checkRuntimeDir] check ownership and mode of the runtime dir (default true)
 * @property {number} [streamHwm] SUB receive high-water mark (default $EFFECTD_STREAM_HWM or 256)
 */

/**
 * @typedef {object} StreamChunk
 * @property {string} stream `stdout`, `stderr` or `value`
 * @property {number} offset byte offset of `data[0]` in the stream
 * @property {Buffer} data
 * @property {"live"|"store"} source whether the bytes came from the live stream or from
 *   `read_output` (replay, gap fill, final read); informational
 */

export class EffectdClient {
  /** @param {ClientOptions} [options] */
  constructor(options = {}) {
    this.runtimeDir = options.runtimeDir || resolveRuntimeDir();
    this.timeout = options.timeout ?? 5;
    this.retries = options.retries ?? 2;
    this.clientName = options.clientName ?? "effectd-node/0.1.0";
    this.checkDir = options.checkRuntimeDir ?? true;
    const hwm = Number.parseInt(process.env.EFFECTD_STREAM_HWM ?? "", 10);
    this.streamHwm = options.streamHwm ?? (Number.isFinite(hwm) && hwm > 0 ? hwm : 256);

    /** @type {Dealer|null} */
    this._dealer = null;
    /** @type {Map<string, (reply: Record<string, unknown>) => void>} rid -> reply handler */
    this._pending = new Map();
    /** @type {Set<(err: EffectdError) => void>} fail the requests in flight (close) */
    this._aborts = new Set();
    /** @type {Promise<void>} sends are serialised: a zeromq socket allows one pending send */
    this._sendChain = Promise.resolve();
    /** @type {Set<Subscriber>} */
    this._subs = new Set();
    this._ridPrefix = `${process.pid}-${randomBytes(4).toString("hex")}`;
    this._ridCounter = 0;
    /** @type {Record<string, any>|null} last successful hello reply */
    this.info = null;
    /** @type {Promise<Record<string, any>>|null} */
    this._negotiating = null;
    /** @type {Record<string, unknown>|null} an error reply that carried no rid (§3.2) */
    this._orphanError = null;
    this.closed = false;
  }

  // ---- control channel -------------------------------------------------------------------

  _control() {
    if (this.closed) throw new EffectdError("closed", "client is closed");
    if (this._dealer === null) {
      const address = endpoint(this.runtimeDir, "control.sock");
      if (this.checkDir) checkRuntimeDir(this.runtimeDir);
      // Not `immediate` (§1.2): with it, replies already received but not yet read are dropped
      // when the daemon disconnects (e.g. the answers to parked waits of a daemon that stops).
      const dealer = new Dealer({ linger: 0, sendTimeout: Math.ceil(this.timeout * 1000) });
      dealer.connect(address);
      this._dealer = dealer;
      this._receiveReplies(dealer);
    }
    return this._dealer;
  }

  /** @param {Dealer} dealer */
  async _receiveReplies(dealer) {
    try {
      for await (const frames of dealer) {
        // Replies arrive as ["", reply]; tolerate a reply without the delimiter.
        const body = frames.length === 2 && frames[0].length === 0 ? frames[1] : frames.length === 1 ? frames[0] : null;
        if (body === null) continue;
        let reply;
        try {
          reply = decode(body);
        } catch {
          continue;
        }
        if (!isPlainMap(reply)) continue;
        const rid = reply.rid;
        const resolve = typeof rid === "string" || typeof rid === "number" ? this._pending.get(String(rid)) : undefined;
        if (resolve) resolve(reply);
        else if (rid === null || rid === undefined) this._orphanError = reply; // reported on timeout
        // else: a late reply to an attempt already answered or abandoned: drop (§10.3 rule 5)
      }
    } catch {
      // socket closed under us: pending requests time out or were rejected by close()
    }
  }

  /**
   * Send one request and return the successful reply; Lazy Pirate retries (§10.3): on timeout
   * resend the very same bytes (same `rid`, same `request_key`), give up with `unavailable`.
   * @param {string} op
   * @param {Record<string, unknown>} [fields]
   * @param {{timeout?: number, retries?: number, v?: number}} [opts]
   * @returns {Promise<Record<string, any>>}
   */
  async request(op, fields = {}, opts = {}) {
    const dealer = this._control();
    const rid = `${this._ridPrefix}-${++this._ridCounter}`;
    const message = { v: opts.v ?? PROTOCOL_VERSION, rid, op, ...fields };
    let body;
    try {
      body = encode(message, { ignoreUndefined: true, useBigInt64: true });
    } catch (err) {
      throw new EffectdError("bad_request", `cannot encode ${op} request: ${/** @type {Error} */ (err).message}`, { cause: err });
    }
    if (body.byteLength > MAX_REQUEST_BYTES) {
      // libzmq would silently disconnect us (§2.3): refuse locally.
      throw new EffectdError("too_large", `${op} request is ${body.byteLength} bytes, over the 16 MiB limit`, { rid });
    }
    const timeoutMs = Math.ceil((opts.timeout ?? this.timeout) * 1000);
    const attempts = 1 + (opts.retries ?? this.retries);

    /** @type {Record<string, any>|null} */
    let reply = null;
    const replied = new Promise((resolve) => {
      this._pending.set(rid, (r) => { reply = r; resolve(r); });
    });
    /** @type {(e: EffectdError) => void} */
    let abort = () => {};
    const aborted = new Promise((_, reject) => { abort = reject; });
    aborted.catch(() => {});
    this._aborts.add(abort);
    try {
      for (let attempt = 1; attempt <= attempts && reply === null; attempt++) {
        const state = { abandoned: false };
        const sent = this._enqueueSend(dealer, body, state);
        /** @type {NodeJS.Timeout|undefined} */
        let timer;
        const timedOut = new Promise((resolve) => { timer = setTimeout(resolve, timeoutMs, null); });
        try {
          await Promise.race([replied, timedOut, aborted, sent.then(() => new Promise(() => {}), () => null)]);
        } finally {
          clearTimeout(timer);
          state.abandoned = true;
        }
      }
    } finally {
      this._pending.delete(rid);
      this._aborts.delete(abort);
    }
    if (reply === null) {
      const orphan = this._orphanError;
      const extra = isPlainMap(orphan) && isPlainMap(orphan.error)
        ? ` (the daemon sent an error without rid meanwhile: ${orphan.error.code}: ${orphan.error.message})` : "";
      throw new EffectdError("unavailable",
        `no reply to ${op} from the daemon at ${this.runtimeDir} after ${attempts} attempt(s) of ${timeoutMs / 1000}s${extra}`, { rid });
    }
    const r = /** @type {Record<string, any>} */ (reply);
    if (r.ok === true) return r;
    const error = isPlainMap(r.error) ? r.error : {};
    const code = typeof error.code === "string" ? error.code : "protocol";
    const text = typeof error.message === "string" ? error.message : "error reply without a message";
    throw new EffectdError(code, `${op}: ${code}: ${text}`, { rid, reply: r });
  }

  /**
   * @param {Dealer} dealer
   * @param {Uint8Array} body
   * @param {{abandoned: boolean}} state
   * @returns {Promise<void>} rejects if this send failed (no daemon connected: EAGAIN)
   */
  _enqueueSend(dealer, body, state) {
    const sent = this._sendChain.then(async () => {
      if (state.abandoned || dealer.closed) return;
      await dealer.send(["", body]);
    });
    this._sendChain = sent.catch(() => {});
    return sent;
  }

  // ---- version negotiation and capabilities (§4) -------------------------------------------

  /**
   * `hello` (§5.1): version negotiation and daemon identity; also a liveness probe.
   * @param {{client?: string, timeout?: number, retries?: number}} [opts]
   */
  async hello(opts = {}) {
    const reply = await this.request("hello", { client: opts.client ?? this.clientName },
      { timeout: opts.timeout, retries: opts.retries }).catch((err) => {
      if (err instanceof EffectdError && err.code === "unsupported_version") {
        const m = /speaks (\d+)\.\.(\d+)/.exec(err.message);
        throw new EffectdError("unsupported_version",
          `this client speaks protocol ${PROTOCOL_VERSION}, the daemon ${m ? `${m[1]}..${m[2]}` : "another range"}`,
          { rid: err.rid, reply: err.reply, cause: err });
      }
      throw err;
    });
    const min = reply.min_protocol ?? reply.protocol;
    const max = reply.max_protocol ?? reply.protocol;
    if (!(min <= PROTOCOL_VERSION && PROTOCOL_VERSION <= max)) {
      throw new EffectdError("unsupported_version",
        `this client speaks protocol ${PROTOCOL_VERSION}, the daemon ${min}..${max}`, { reply });
    }
    this.info = reply;
    return reply;
  }

  /** The daemon's hello, fetched once (any later request first negotiates, §4). */
  async _ready() {
    if (this.info) return this.info;
    if (!this._negotiating) {
      this._negotiating = this.hello().finally(() => { this._negotiating = null; });
    }
    return this._negotiating;
  }

  /** @param {string} capability */
  async hasCapability(capability) {
    const info = await this._ready();
    return Array.isArray(info.capabilities) && info.capabilities.includes(capability);
  }

  /** @param {string} capability @param {string} what */
  async _require(capability, what) {
    if (!(await this.hasCapability(capability))) {
      throw new EffectdError("missing_capability", `${what} needs the daemon capability '${capability}', which it does not announce`);
    }
  }

  /** @param {Record<string, unknown>} effect @param {string} where */
  async _checkSpec(effect, where) {
    if (!isPlainMap(effect) || typeof effect.kind !== "string") {
      throw new EffectdError("bad_request", `${where}: an effect spec is a map with a 'kind'`);
    }
    if (effect.group !== undefined && effect.group !== null) await this._require("groups", `${where}.group`);
    if (effect.stdin_from !== undefined && effect.stdin_from !== null) await this._require("stdin_from", `${where}.stdin_from`);
  }

  /** @param {string|null|false|undefined} requestKey @returns {Promise<string|undefined>} */
  async _requestKey(requestKey) {
    if (requestKey === false || requestKey === null) return undefined;
    if (requestKey !== undefined) {
      await this._require("idempotent_submit", "request_key");
      return requestKey;
    }
    // §10.2: a fresh key per logical submit, reused by every retry of it.
    if (!(await this.hasCapability("idempotent_submit"))) return undefined;
    return `${process.pid}-${randomBytes(8).toString("hex")}`;
  }

  // ---- operations (§5) ----------------------------------------------------------------------

  /**
   * Journal one effect (§5.2). Resolves with `{id, state}` once the effect is committed.
   * @param {Record<string, unknown>} effect spec with the wire field names of §6 (`kind`, `command`, ...)
   * @param {{requestKey?: string|null|false}} [opts] idempotency key; by default a fresh one is generated
   * @returns {Promise<{id: string, state: string}>}
   */
  async submit(effect, opts = {}) {
    await this._checkSpec(effect, "effect");
    const request_key = await this._requestKey(opts.requestKey);
    const r = await this.request("submit", { effect, request_key });
    return { id: r.id, state: r.state };
  }

  /**
   * Journal several effects in one transaction (§5.3).
   * @param {Record<string, unknown>[]} effects
   * @param {{requestKey?: string|null|false}} [opts]
   * @returns {Promise<string[]>} the ids
   */
  async submitMany(effects, opts = {}) {
    await this._require("submit_many", "submitMany");
    for (const [i, e] of effects.entries()) await this._checkSpec(e, `effects[${i}]`);
    const request_key = await this._requestKey(opts.requestKey);
    const r = await this.request("submit_many", { effects, request_key });
    return r.ids;
  }

  /**
   * Submit a shell effect: a string runs as `/bin/sh -c`, an array is an argv (§6.2).
   * @param {string|string[]} commandOrArgv
   * @param {Record<string, unknown> & {requestKey?: string|null|false}} [opts] other effect
   *   fields by their wire names (`name`, `labels`, `env`, `cwd`, `timeout`, `retries`, ...)
   */
  async submitShell(commandOrArgv, opts = {}) {
    const { requestKey, ...fields } = opts;
    const effect = typeof commandOrArgv === "string"
      ? { kind: "shell", command: commandOrArgv, ...fields }
      : { kind: "shell", argv: Array.from(commandOrArgv), ...fields };
    return this.submit(effect, { requestKey });
  }

  /**
   * Effect records (§5.4, §7.1).
   * @param {string|string[]} ids
   * @returns {Promise<Record<string, any>[]>} in the order of `ids`
   */
  async status(ids) {
    await this._ready();
    const r = await this.request("status", { ids: idList(ids) });
    return r.effects;
  }

  /**
   * List effect records, newest first (§5.5).
   * @param {{states?: string[], labels?: Record<string,string>, name?: string, limit?: number, before?: string}} [filter]
   */
  async list(filter = {}) {
    await this._ready();
    const r = await this.request("list", { ...filter });
    return r.effects;
  }

  /**
   * Wait until the effects are final (§5.6). `timeout` in seconds (default 30; `Infinity` or
   * `null` waits forever). Long waits are sent as slices of 30 s, each with a reply timeout
   * of slice + 5 s, which also notices a dead daemon within one slice.
   * @param {string|string[]} ids
   * @param {{timeout?: number|null, returnWhen?: "all"|"first"}} [opts]
   * @returns {Promise<{effects: Record<string, any>[], done: string[], timed_out: boolean}>}
   */
  async wait(ids, opts = {}) {
    await this._ready();
    const list = idList(ids);
    const returnWhen = opts.returnWhen ?? "all";
    if (returnWhen !== "all") await this._require("wait_first", "returnWhen 'first'");
    let total = opts.timeout === undefined ? 30 : opts.timeout;
    if (total === null) total = Infinity;
    if (!(total >= 0)) throw new EffectdError("bad_request", "wait timeout must be >= 0");
    const deadline = Date.now() + total * 1000;
    for (;;) {
      const remaining = Math.max(0, (deadline - Date.now()) / 1000);
      const slice = total <= WAIT_SLICE ? remaining : Math.min(remaining, WAIT_SLICE, WAIT_MAX);
      const r = await this.request("wait", {
        ids: list,
        timeout: slice,
        return_when: returnWhen === "all" ? undefined : returnWhen,
      }, { timeout: slice + WAIT_MARGIN });
      if (!r.timed_out || slice >= remaining) {
        return { effects: r.effects, done: r.done, timed_out: r.timed_out };
      }
    }
  }

  /**
   * Outcome of a final effect (§5.7); `invalid_state` while queued or running.
   * @param {string} id
   */
  async result(id) {
    await this._ready();
    const { v, rid, ok, ...rest } = await this.request("result", { id });
    return rest;
  }

  /**
   * Cancel effects (§5.8). Idempotent.
   * @param {string|string[]} ids
   * @param {{reason?: string}} [opts]
   * @returns {Promise<{id: string, state: string, cancelled: boolean}[]>}
   */
  async cancel(ids, opts = {}) {
    await this._ready();
    const r = await this.request("cancel", { ids: idList(ids), reason: opts.reason });
    return r.effects;
  }

  /**
   * Stored output of one stream (§5.9). `data` is returned as a Buffer.
   * @param {string} id
   * @param {string} stream `stdout`, `stderr` or `value`
   * @param {number} [offset]
   * @param {number} [maxBytes] 1..8 MiB (daemon default 1 MiB)
   * @returns {Promise<{id: string, stream: string, offset: number, data: Buffer, next_offset: number,
   *   size: number, state: string, final: boolean, eof: boolean}>}
   */
  async readOutput(id, stream, offset = 0, maxBytes = undefined) {
    await this._require("read_output", "readOutput");
    // `busy` (§5.9): the daemon's read budget is held by replies other readers have not read
    // yet; retry after 10 ms doubling to 250 ms, with jitter, for up to BUSY_GIVE_UP_MS.
    let delay = 10;
    const giveUp = Date.now() + BUSY_GIVE_UP_MS;
    for (;;) {
      try {
        const { v, rid, ok, ...rest } = await this.request("read_output", { id, stream, offset, max_bytes: maxBytes });
        return /** @type {any} */ ({ ...rest, data: toBuffer(rest.data) });
      } catch (err) {
        if (!(err instanceof EffectdError) || err.code !== "busy" || Date.now() >= giveUp) throw err;
      }
      await new Promise((resolve) => setTimeout(resolve, delay * (0.5 + Math.random() / 2)));
      delay = Math.min(delay * 2, 250);
    }
  }

  /**
   * Follow an effect's output exactly (§9): every byte of each followed stream from
   * `fromOffset` to its final size, once, in offset order per stream. Ends when the effect is
   * final and everything was delivered. Works for effects that already finished (late join).
   * @param {string} id
   * @param {{fromOffset?: number, streams?: string[], events?: boolean}} [opts] `events: true`
   *   also yields `{stream: "event", event, header}` for the lifecycle events received live
   *   (informational: events may be lost)
   * @returns {AsyncGenerator<StreamChunk | {stream: "event", event: string, header: Record<string, any>}>}
   */
  async *stream(id, opts = {}) {
    checkTopic(id);
    if (typeof id !== "string" || !EFFECT_ID_RE.test(id)) {
      throw new EffectdError("bad_request", `not an effect id: ${JSON.stringify(id)}`);
    }
    const streams = opts.streams ?? ["stdout", "stderr"];
    const fromOffset = opts.fromOffset ?? 0;
    await this._require("read_output", "stream");
    await this._require("stream_offsets", "stream");
    if (this.closed) throw new EffectdError("closed", "client is closed");

    const sub = new Subscriber({ linger: 0, receiveHighWaterMark: this.streamHwm });
    this._subs.add(sub);
    try {
      sub.connect(endpoint(this.runtimeDir, "stream.sock"));
      sub.subscribe(id); // §9 step 1: subscribe FIRST, before anything is read from the store
      /** @param {number} ms @returns {Promise<Buffer[]|null>} */
      const receive = async (ms) => {
        sub.receiveTimeout = ms;
        try {
          return await sub.receive();
        } catch (err) {
          if (sub.closed || this.closed) throw new EffectdError("closed", "client closed while streaming", { cause: err });
          if (isEagain(err)) return null;
          throw err;
        }
      };
      yield* followEffect(this, id, { receive, streams, fromOffset, events: opts.events });
    } finally {
      this._subs.delete(sub);
      sub.close();
    }
  }

  /**
   * Follow the `value` stream of a python generator effect and decode it (§8.6).
   * @param {string} id
   * @param {{fromOffset?: number}} [opts] `fromOffset` must be the start of a value
   * @returns {AsyncGenerator<unknown>}
   */
  async *values(id, opts = {}) {
    const chunks = this.stream(id, { streams: ["value"], fromOffset: opts.fromOffset ?? 0 });
    const bytes = (async function* () {
      for await (const c of chunks) if ("data" in c) yield c.data;
    })();
    yield* new Decoder().decodeStream(bytes);
  }

  /** Close every socket; pending requests fail with `closed`, open streams end with `closed`. */
  close() {
    if (this.closed) return;
    this.closed = true;
    for (const abort of this._aborts) abort(new EffectdError("closed", "client closed"));
    this._aborts.clear();
    for (const sub of this._subs) sub.close();
    this._subs.clear();
    if (this._dealer) this._dealer.close();
    this._dealer = null;
  }
}

export default EffectdClient;
