// The checked-in generated code (src/gen) matches a fresh generation from
// proto/ (scripts/gen-sdks writes it), and the package ships the license its
// manifest declares.

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

const PACKAGE = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const GENERATED = "src/gen/keycap/v1/admin_pb.ts";

test("the checked-in generated code is fresh", () => {
  const out = mkdtempSync(join(tmpdir(), "keycap-ts-gen-"));
  try {
    const r = spawnSync(join(PACKAGE, "node_modules/.bin/buf"),
      ["generate", "../../proto", "--template", "buf.gen.yaml", "--path", "../../proto/keycap/v1/admin.proto", "-o", out],
      { cwd: PACKAGE, encoding: "utf8" });
    assert.equal(r.status, 0, r.stderr);
    assert.ok(readFileSync(join(out, GENERATED), "utf8") === readFileSync(join(PACKAGE, GENERATED), "utf8"),
      "src/gen is stale: run scripts/gen-sdks");
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});

test("the package ships the project's license", () => {
  const manifest = JSON.parse(readFileSync(join(PACKAGE, "package.json"), "utf8")) as { license: string };
  assert.equal(manifest.license, "Apache-2.0");
  assert.equal(readFileSync(join(PACKAGE, "LICENSE"), "utf8"), readFileSync(join(PACKAGE, "../../LICENSE"), "utf8"));
  assert.match(readFileSync(join(PACKAGE, "LICENSE"), "utf8"), /Apache License\s+Version 2\.0/);
  // What `npm pack` puts in the tarball, not what the manifest hopes.
  const r = spawnSync("npm", ["pack", "--dry-run", "--json", "--ignore-scripts"], { cwd: PACKAGE, encoding: "utf8" });
  assert.equal(r.status, 0, r.stderr);
  const files = (JSON.parse(r.stdout) as { files: { path: string }[] }[])[0]!.files.map((f) => f.path);
  assert.ok(files.includes("LICENSE") && files.includes("dist/src/index.js"), files.join(", "));
});
