// Many Node followers of one effect while the daemon answers reads `busy` (its read budget is
// set tiny by the test that runs this): every follower must still get every byte (§5.9, §9).
//
//   EFFECTD_RUNTIME_DIR=/path/to/runtime node test/busy_test.js <followers> <bytes>
//
// Prints one JSON line: {"ok": true, "exact": n, ...} and exits 0, or {"ok": false, "reason": ...}.

import { createHash } from "node:crypto";

import { EffectdClient } from "../index.js";

const followers = Number(process.argv[2] || 20);
const size = Number(process.argv[3] || 4_000_000);
const line = "0123456789abcdefghijklmnopqrstuvwxyz\n";

function expectedDigest() {
  const text = line.repeat(Math.ceil(size / line.length)).slice(0, size);
  return createHash("sha256").update(text).digest("hex");
}

async function follow(id) {
  const client = new EffectdClient({ timeout: 30 });
  const hash = createHash("sha256");
  let next = 0;
  try {
    for await (const chunk of client.stream(id, { streams: ["stdout"] })) {
      if (chunk.offset !== next) throw new Error(`chunk at ${chunk.offset}, expected ${next}`);
      next += chunk.data.length;
      hash.update(chunk.data);
    }
    return hash.digest("hex");
  } finally {
    client.close();
  }
}

async function main() {
  const client = new EffectdClient({ timeout: 30 });
  try {
    const { id } = await client.submit({ kind: "shell", command: `yes ${line.trim()} | head -c ${size}` });
    const digests = await Promise.all(Array.from({ length: followers }, () => follow(id)));
    const want = expectedDigest();
    const exact = digests.filter((d) => d === want).length;
    return { ok: exact === followers, exact, followers };
  } finally {
    client.close();
  }
}

main().then(
  (result) => { console.log(JSON.stringify(result)); process.exit(result.ok ? 0 : 1); },
  (err) => {
    console.log(JSON.stringify({ ok: false, reason: `${err?.code ? `${err.code}: ` : ""}${err?.message ?? err}` }));
    process.exit(1);
  },
);
