// Unit tests of §1.1 (resolving and checking the runtime dir): no daemon needed.
//   node --test test/runtime_dir_unit_test.js

import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, rmSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";

import { checkRuntimeDir, resolveRuntimeDir } from "../index.js";

test("the fallback runtime dir honours TMPDIR", () => {
  const uid = process.getuid();
  assert.equal(resolveRuntimeDir({ TMPDIR: "/var/tmp/x" }), `/var/tmp/x/effectd-${uid}`);
  assert.equal(resolveRuntimeDir({}), `/tmp/effectd-${uid}`);
});

test("a symlink at the runtime path is refused, even to a private dir of ours", () => {
  const root = mkdtempSync(join(tmpdir(), "ednode-"));
  try {
    const target = join(root, "private");
    mkdirSync(target, { mode: 0o700 });
    checkRuntimeDir(target); // the real dir is fine
    const link = join(root, "effectd-link");
    symlinkSync(target, link);
    assert.throws(() => checkRuntimeDir(link), (err) => err.code === "unsafe_runtime_dir" && /symlink/.test(err.message));
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});
