// @keycap/sdk against the real `keycap dev` and `keycap-mock-vendor`
// binaries (from CARGO_TARGET_DIR, else target/; build them with `cargo
// build --workspace --bins`), on 127.0.0.1 only: register a vendor, mint a
// key, call the vendor through the proxy with the official `openai` client
// at the key's baseUrl, meet the cap refusal, revoke the run, read the
// audit and the spend; then the errors: keycap's code and field, one error
// for a wrong token or an unreachable control plane, no secret or token in
// any error or serialised value.

import assert from "node:assert/strict";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer, connect } from "node:net";
import { tmpdir } from "node:os";
import { dirname, isAbsolute, join, resolve } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { inspect } from "node:util";

import OpenAI from "openai";

import * as keycap from "../src/index.js";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../../..");
const CREDENTIAL = "sk-proj-KeycapTypeScriptSdkCredentialDoNotLeak";
const CHAT = ["POST /v1/chat/completions"];
const STARTUP_MS = 60_000;
const SPEND_SETTLES_MS = 20_000;

function binary(name: string): string {
  const target = process.env.CARGO_TARGET_DIR ?? "target";
  return join(isAbsolute(target) ? target : join(ROOT, target), "debug", name);
}

async function freePort(): Promise<number> {
  return new Promise((done, fail) => {
    const s = createServer();
    s.once("error", fail);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => done(port));
    });
  });
}

async function until<T>(what: string, ms: number, probe: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await probe().catch(() => undefined);
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`${what} not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const listening = (port: number) =>
  new Promise<true | undefined>((done) => {
    const c = connect(port, "127.0.0.1", () => { c.end(); done(true); });
    c.on("error", () => done(undefined));
  });

let workdir: string;
const children: ChildProcess[] = [];
let control: string;
let proxy: string;
let mockUrl: string;
let adminToken: string;

function start(args: string[], log: string): void {
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("KEYCAP_")));
  const out = openSync(join(workdir, log), "w");
  children.push(spawn(args[0]!, args.slice(1), { stdio: ["ignore", out, out], env: { ...env, KEYCAP_LOG: "warn" } }));
}

before(async () => {
  workdir = mkdtempSync(join(tmpdir(), "keycap-ts-sdk-"));
  const [mock, proxyPort, controlPort, sandbox] = [await freePort(), await freePort(), await freePort(), await freePort()];
  mockUrl = `http://127.0.0.1:${mock}`;
  proxy = `http://127.0.0.1:${proxyPort}`;
  control = `http://127.0.0.1:${controlPort}`;
  start([binary("keycap-mock-vendor"), "--listen", `127.0.0.1:${mock}`, "--credential", CREDENTIAL], "mock.log");
  start([binary("keycap"), "dev", "--data-dir", join(workdir, "dev"),
    "--proxy-listen", `127.0.0.1:${proxyPort}`, "--control-listen", `127.0.0.1:${controlPort}`,
    "--sandbox-listen", `127.0.0.1:${sandbox}`], "dev.log");
  await until("keycap-mock-vendor", STARTUP_MS, () => listening(mock));
  await until("keycap dev", STARTUP_MS, async () => ((await fetch(`${proxy}/healthz`)).ok ? true : undefined));
  adminToken = readFileSync(join(workdir, "dev", "admin-token"), "utf8").trim();
});

after(() => {
  for (const c of children) c.kill();
  rmSync(workdir, { recursive: true, force: true });
});

async function chat(ai: OpenAI): Promise<void> {
  const r = await ai.chat.completions.create({ model: "gpt-4o", max_tokens: 10, messages: [{ role: "user", content: "hi" }] });
  assert.equal(r.choices[0]?.message.content, "Hello from the mock.");
}

test("a TypeScript team walks the whole flow", async () => {
  const kc = new keycap.Client({ addr: control, token: adminToken });
  const written = await kc.vendors.put("ts-openai", { profile: "openai", baseUrl: mockUrl, credential: CREDENTIAL });
  assert.ok(written.created && written.confirmation.allConfirmed);
  assert.equal((await kc.vendors.get("ts-openai")).profile, "openai");
  assert.ok((await kc.vendors.list()).some((v) => v.name === "ts-openai"));

  const run = "ts-sdk/run-1";
  const created = await kc.keys.create({
    vendor: "ts-openai", dailyUsdCap: "1.5", perCallUsdCap: "0.5", allowedEndpoints: CHAT,
    expiresIn: "1h", agentRunLabel: run,
  });
  assert.match(created.key, /^kc_/);
  assert.equal(created.info.dailyUsdCap, "1.5");
  assert.equal(created.info.perCallUsdCap, "0.5");
  assert.ok(created.expiresAt !== null && created.expiresAt.getTime() - Date.now() > 59 * 60_000);
  assert.ok(!JSON.stringify(created).includes(created.key));
  assert.ok(!inspect(created).includes(created.key));

  const ai = new OpenAI({ baseURL: created.baseUrl(proxy), apiKey: created.key, maxRetries: 0 });
  await chat(ai);
  const spent = await until("the call's spend", SPEND_SETTLES_MS, async () => {
    const k = await kc.keys.get(created.id);
    return k.callsToday === 1 ? k : undefined;
  });
  assert.notEqual(spent.spentTodayUsd, "0");

  const tiny = await kc.keys.create({ vendor: "ts-openai", dailyUsdCap: "0.0001", allowedEndpoints: CHAT, expiresIn: 3600, agentRunLabel: run });
  await assert.rejects(chat(new OpenAI({ baseURL: tiny.baseUrl(proxy), apiKey: tiny.key, maxRetries: 0 })),
    (e: unknown) => e instanceof OpenAI.RateLimitError && e.code === "daily_cap_exceeded");

  const revoked = await kc.keys.revokeRun(run);
  assert.deepEqual([...revoked.revokedIds].sort(), [created.id, tiny.id].sort());
  assert.ok(revoked.confirmation.allConfirmed);
  await assert.rejects(chat(ai), (e: unknown) => e instanceof OpenAI.AuthenticationError && e.code === "key_revoked");
  assert.equal((await kc.keys.get(created.id)).status, "revoked");
  assert.equal((await kc.keys.list({ agentRunLabel: run })).length, 0);
  assert.equal((await kc.keys.list({ agentRunLabel: run, includeInactive: true })).length, 2);

  const spend = await kc.spend(run);
  assert.equal(spend.totalUsd, spent.spentTodayUsd);
  assert.equal(spend.calls, 1);
  const entries = [];
  for await (const e of kc.audit.query({ agentRunLabel: run })) entries.push(e);
  const billed = entries.filter((e) => e.keyId === created.id && e.costUsd !== "0");
  assert.equal(billed.length, 1);
  assert.equal(billed[0]!.costUsd, spend.totalUsd);
  assert.equal(billed[0]!.path, "/v1/chat/completions");

  // The spend report: grouped by key over a range, typed like the REST body.
  const report = await kc.spendReport({ groupBy: ["key"], agentRunLabel: run, since: new Date(Date.now() - 86_400_000), top: 5 });
  assert.deepEqual(report.groupBy, ["key"]);
  assert.equal(report.calls, 1);
  assert.equal(report.totalUsd, spend.totalUsd);
  assert.equal(report.groups[0]!.keyId, created.id);
  assert.equal(report.groups[0]!.vendor, undefined);
  assert.equal(report.more, false);
  await assert.rejects(kc.spendReport({ groupBy: ["colour"] }),
    (e: unknown) => e instanceof keycap.InvalidRequest && e.field === "group_by");

  // The export, streamed a page at a time, verifies on its own.
  const pieces: Uint8Array[] = [];
  for await (const piece of kc.audit.export({ format: "jsonl" })) pieces.push(piece);
  const file = join(workdir, "audit.jsonl");
  writeFileSync(file, Buffer.concat(pieces));
  const verified = spawnSync("python3", [join(ROOT, "docs", "verify_ledger.py"), file], { encoding: "utf8" });
  assert.equal(verified.status, 0, verified.stdout + verified.stderr);
  assert.match(verified.stdout, /^OK \d+ entries, head seq \d+ hash [0-9a-f]{64}/);

  assert.ok((await kc.vendors.delete("ts-openai")).allConfirmed);
  await assert.rejects(kc.vendors.get("ts-openai"), (e: unknown) => e instanceof keycap.NotFound && e.code === "not_found");
});

test("the server's refusal carries its code and field", async () => {
  const kc = new keycap.Client({ addr: control, token: adminToken });
  await assert.rejects(
    kc.keys.create({ vendor: "openai", dailyUsdCap: "0", allowedEndpoints: CHAT, expiresIn: "1h" }),
    (e: unknown) => e instanceof keycap.InvalidRequest && e.code === "invalid_request"
      && e.field === "daily_cap_micros" && e.message.includes("must be greater than 0"));
  // Money is a decimal string, never a float.
  assert.throws(() => keycap.micros("daily_usd_cap", "0.1234567"), keycap.InvalidRequest);
  assert.equal(keycap.micros("x", "12.5"), 12_500_000n);
  assert.equal(keycap.usd(12_500_000n), "12.5");
});

test("a wrong token and an unreachable server are one clear error each, without the token", async () => {
  const token = "kcadm_live_a-token-keycap-never-issued";
  const stranger = new keycap.Client({ addr: control, token });
  const denied = await stranger.vendors.list().then(() => undefined, (e: unknown) => e);
  assert.ok(denied instanceof keycap.Unauthenticated, String(denied));
  assert.equal(denied.message, "unauthenticated: missing or invalid token");
  assert.ok(!inspect(denied).includes(token) && !JSON.stringify(stranger).includes(token));

  const addr = `http://127.0.0.1:${await freePort()}`;
  const lost = await new keycap.Client({ addr, token: adminToken, timeout: 2 }).keys.list().then(() => undefined, (e: unknown) => e);
  assert.ok(lost instanceof keycap.Unavailable, String(lost));
  assert.equal(lost.message, `unavailable: the control plane at ${addr} is unreachable`);
  assert.ok(!inspect(lost).includes(adminToken));
});

test("admin tokens, issuer tokens, audit verify and checkpoints", async () => {
  const kc = new keycap.Client({ addr: control, token: adminToken });
  const minted = await kc.adminTokens.create({ name: "ts reader", scopes: ["keys:read"], vendors: ["openai"], expiresIn: "1h" });
  assert.match(minted.token, /^kcadm_/);
  assert.ok(!JSON.stringify(minted).includes(minted.token) && !inspect(minted).includes(minted.token));
  assert.deepEqual(minted.info.scopes, ["keys:read"]);
  assert.equal(minted.info.status, "active");
  assert.ok((await kc.adminTokens.list()).some((t) => t.id === minted.id));
  const reader = new keycap.Client({ addr: control, token: minted.token });
  assert.ok(Array.isArray(await reader.keys.list()));
  await assert.rejects(reader.vendors.list(),
    (e: unknown) => e instanceof keycap.PermissionDenied && e.code === "missing_scope" && !e.message.includes(minted.token));
  assert.equal((await kc.adminTokens.revoke(minted.id)).status, "revoked");
  assert.ok(!(await kc.adminTokens.list()).some((t) => t.id === minted.id));
  assert.ok((await kc.adminTokens.list({ includeInactive: true })).some((t) => t.id === minted.id));
  await assert.rejects(reader.keys.list(), (e: unknown) => e instanceof keycap.Unauthenticated);
  await assert.rejects(kc.adminTokens.create({ name: "typo", scopes: ["keys:reed"] }),
    (e: unknown) => e instanceof keycap.InvalidRequest && e.field === "scopes");

  await kc.vendors.put("ts-audit", { profile: "openai", baseUrl: mockUrl, credential: CREDENTIAL });
  const parent = await kc.keys.create({ vendor: "ts-audit", dailyUsdCap: "5", allowedEndpoints: CHAT, expiresIn: "1h", agentRunLabel: "ts-sdk/audit" });
  const issuer = await kc.keys.createIssuerToken(parent.id, { name: "scenario", expiresIn: "30m" });
  assert.match(issuer.token, /^kciss_/);
  assert.equal(issuer.info.keyId, parent.id);
  assert.deepEqual((await kc.keys.listIssuerTokens(parent.id)).map((t) => t.id), [issuer.id]);
  assert.equal((await kc.keys.revokeIssuerToken(issuer.id)).status, "revoked");
  assert.deepEqual(await kc.keys.listIssuerTokens(parent.id), []);

  await chat(new OpenAI({ baseURL: parent.baseUrl(proxy), apiKey: parent.key, maxRetries: 0 }));
  await until("the call's audit entry", SPEND_SETTLES_MS, async () => {
    for await (const e of kc.audit.query({ keyId: parent.id })) return e;
    return undefined;
  });
  let newest = 0;
  for await (const e of kc.audit.query()) newest = Math.max(newest, e.seq);
  const verified = await kc.audit.verify();
  assert.ok(verified.ok && verified.broken === null, JSON.stringify(verified));
  assert.equal(verified.headSeq, newest);
  assert.match(verified.headHash ?? "", /^[0-9a-f]{64}$/);
  assert.equal((await kc.audit.verify({ fromSeq: newest })).checked, 1);
  assert.ok((await kc.audit.verify({ checkpoint: `${newest}:${verified.headHash}` })).ok);
  const other = await kc.audit.verify({ checkpoint: `${newest}:${"ab".repeat(32)}` });
  assert.equal(other.broken?.seq, newest, JSON.stringify(other));
  for (const cp of await kc.audit.checkpoints({ limit: 5 })) {
    assert.ok(cp.seq <= newest);
    assert.match(cp.hash, /^[0-9a-f]{64}$/);
    assert.match(cp.signature, /^[0-9a-f]{128}$/);
  }
});

test("a dry run answers before the call, and a policy is suggested after it", async () => {
  const kc = new keycap.Client({ addr: control, token: adminToken });
  await kc.vendors.put("ts-dry", { profile: "openai", baseUrl: mockUrl, credential: CREDENTIAL });
  const created = await kc.keys.create({
    vendor: "ts-dry", dailyUsdCap: "1", allowedEndpoints: CHAT, expiresIn: "1h", agentRunLabel: "ts-sdk/dry-run",
  });
  const request = {
    method: "POST", path: "/v1/chat/completions", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model: "gpt-4o", max_tokens: 10, messages: [{ role: "user", content: "hi" }] }),
  };
  const dry = await kc.keys.simulate(created.id, request);
  assert.equal(dry.allowed, true);
  assert.equal(dry.quote?.kind, "openai_chat");
  assert.equal(dry.dailyRemainingUsd, "1");
  assert.ok(!JSON.stringify(dry).includes(CREDENTIAL));
  const refused = await kc.keys.simulate(created.id, { ...request, path: "/v1/embeddings" });
  assert.equal(refused.allowed, false);
  assert.equal(refused.refusal?.code, "endpoint_not_allowed");

  const ai = new OpenAI({ baseURL: created.baseUrl(proxy), apiKey: created.key, maxRetries: 0 });
  await chat(ai);
  const suggestion = await until("a suggestion", SPEND_SETTLES_MS, async () => kc.keys.suggest(created.id));
  assert.deepEqual(suggestion.allowedEndpoints, ["POST /v1/chat/completions"]);
  assert.equal(suggestion.marginPercent, 25);
  assert.equal(suggestion.vendor, "ts-dry");
});

test("an observed key forwards what enforcement would refuse, then enforces in place", async () => {
  const kc = new keycap.Client({ addr: control, token: adminToken });
  await kc.vendors.put("ts-observe", { profile: "openai", baseUrl: mockUrl, credential: CREDENTIAL });
  const created = await kc.keys.create({
    vendor: "ts-observe", dailyUsdCap: "5", allowedEndpoints: CHAT, expiresIn: "1h",
    agentRunLabel: "ts-sdk/observe", observeCeilingUsd: "1",
  });
  assert.equal(created.info.mode, "observe");
  assert.equal(created.info.observeCeilingUsd, "1");
  const ai = new OpenAI({ baseURL: created.baseUrl(proxy), apiKey: created.key, maxRetries: 0 });
  // Off the allowlist: forwarded while observing.
  await ai.embeddings.create({ model: "text-embedding-3-small", input: "hi" });
  const switched = await kc.keys.enforce(created.id, { dailyUsdCap: "2" });
  assert.equal(switched.key.mode, "enforce");
  assert.equal(switched.key.id, created.id);
  assert.equal(switched.key.dailyUsdCap, "2");
  assert.deepEqual(switched.confirmation.unconfirmedNodes, []);
  await assert.rejects(
    ai.embeddings.create({ model: "text-embedding-3-small", input: "hi" }),
    (e: unknown) => e instanceof OpenAI.PermissionDeniedError,
  );
  await chat(ai);
});

test("a held call is approved with the SDK and its retry is forwarded once", async () => {
  const kc = new keycap.Client({ addr: control, token: adminToken });
  await kc.vendors.put("ts-approve", { profile: "openai", baseUrl: mockUrl, credential: CREDENTIAL });
  const created = await kc.keys.create({
    vendor: "ts-approve", dailyUsdCap: "5", allowedEndpoints: CHAT, expiresIn: "1h",
    agentRunLabel: "ts-sdk/approval", approvalAboveUsd: "0.000001",
  });
  const ai = new OpenAI({ baseURL: created.baseUrl(proxy), apiKey: created.key, maxRetries: 0 });
  let approvalId = "";
  await assert.rejects(chat(ai), (e: unknown) => {
    if (!(e instanceof OpenAI.PermissionDeniedError)) return false;
    approvalId = String((e.error as Record<string, unknown>)["approval_id"] ?? "");
    return approvalId.startsWith("apr_");
  });
  const pending = await kc.approvals.list({ state: "pending", keyId: created.id });
  assert.deepEqual(pending.map((a) => a.id), [approvalId]);
  const approved = await kc.approvals.approve(approvalId, "the weekly digest");
  assert.equal(approved.state, "approved");
  const retry = new OpenAI({
    baseURL: created.baseUrl(proxy), apiKey: created.key, maxRetries: 0,
    defaultHeaders: { "Keycap-Approval": approvalId },
  });
  await chat(retry);
  await assert.rejects(chat(retry), (e: unknown) => e instanceof OpenAI.PermissionDeniedError);
  assert.equal((await kc.approvals.get(approvalId)).state, "used");
});
