/**
 * keycap's TypeScript SDK: a typed client for keycap's admin API over gRPC
 * (@connectrpc/connect-node, code generated from proto/ by
 * @bufbuild/protoc-gen-es into src/gen). Values are named like keycap's REST
 * bodies; money is a decimal string of US dollars ("1.5"), never a JS
 * number (counts are numbers); times are `Date`s. Every failure is a `KeycapError` carrying
 * keycap's stable code and the server's message; the client checks no rule
 * of the server's itself, and no token appears in an error.
 */

import { create } from "@bufbuild/protobuf";
import { timestampDate, timestampFromDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type Client as RpcClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { readFileSync } from "node:fs";

import * as pb from "./gen/keycap/v1/admin_pb.js";

export { pb };

/** A US dollar amount as a decimal string ("5", "0.25"), or a bigint of whole dollars. */
export type Money = string | bigint;
/** Whole seconds, or keycap's text: "90s", "15m", "2h", "7d", "1h30m". */
export type Duration = number | string;

// ------------------------------------------------------------------ errors

/** Any error keycap answered, or the failure to reach it. */
export class KeycapError extends Error {
  /** keycap's stable code: the REST body's `error` ("invalid_request", "not_found", ...). */
  readonly code: string;
  /** The input an `invalid_request` is about. */
  readonly field: string | undefined;

  constructor(code: string, message: string, field?: string) {
    super(`${code}: ${message}`);
    this.name = new.target.name;
    this.code = code;
    this.field = field;
  }
}
export class InvalidRequest extends KeycapError {}
export class NotFound extends KeycapError {}
export class Conflict extends KeycapError {}
export class Unauthenticated extends KeycapError {}
/** A valid token that may not do this: missing_scope, vendor_not_allowed, issuer_scope. */
export class PermissionDenied extends KeycapError {}
/** The control plane could not be reached or did not answer in time. */
export class Unavailable extends KeycapError {}

const BY_CODE: Record<string, typeof KeycapError> = {
  invalid_request: InvalidRequest,
  not_found: NotFound,
  conflict: Conflict,
  key_already_rolled: Conflict,
  unauthenticated: Unauthenticated,
  missing_scope: PermissionDenied,
  vendor_not_allowed: PermissionDenied,
  issuer_scope: PermissionDenied,
};

function keycapError(e: unknown, addr: string): KeycapError {
  if (e instanceof KeycapError) return e;
  const err = ConnectError.from(e);
  const code = err.metadata.get("keycap-error");
  if (code !== null) {
    const Cls = BY_CODE[code] ?? KeycapError;
    return new Cls(code, err.rawMessage, err.metadata.get("keycap-field") ?? undefined);
  }
  switch (err.code) {
    case Code.Unavailable:
    case Code.DeadlineExceeded:
    case Code.Unknown:
      return new Unavailable("unavailable", `the control plane at ${addr} is unreachable`);
    case Code.Unauthenticated:
      return new Unauthenticated("unauthenticated", err.rawMessage);
    default:
      return new KeycapError("internal", err.rawMessage || "the control plane failed the call");
  }
}

// ------------------------------------------------------------- conversions

const MICROS_PER_USD = 1_000_000n;

/** Integer micro-dollars as a decimal string of dollars: 1500000n -> "1.5". */
export function usd(micros: bigint): string {
  const sign = micros < 0n ? "-" : "";
  const abs = micros < 0n ? -micros : micros;
  const whole = abs / MICROS_PER_USD;
  const frac = (abs % MICROS_PER_USD).toString().padStart(6, "0").replace(/0+$/, "");
  return `${sign}${whole}${frac ? "." + frac : ""}`;
}

/** Dollars as integer micro-dollars, exactly; anything else is an `InvalidRequest` naming `field`. */
export function micros(field: string, amount: Money): bigint {
  if (typeof amount === "bigint") return amount * MICROS_PER_USD;
  const m = /^(-?)(\d+)(?:\.(\d{1,6}))?$/.exec(typeof amount === "string" ? amount.trim() : "");
  if (m === null) {
    throw new InvalidRequest("invalid_request",
      `${field}: give US dollars as a decimal string with at most 6 decimals`, field);
  }
  const value = BigInt(m[2]!) * MICROS_PER_USD + BigInt((m[3] ?? "").padEnd(6, "0"));
  return m[1] === "-" ? -value : value;
}

const UNITS: Record<string, number> = { s: 1, m: 60, h: 3600, d: 86400, w: 604800 };

export function seconds(field: string, d: Duration): bigint {
  if (typeof d === "number" && Number.isInteger(d)) return BigInt(d);
  if (typeof d === "string") {
    const text = d.replace(/\s+/g, "");
    const parts = [...text.matchAll(/(\d+)([smhdw])/g)];
    if (parts.length > 0 && parts.map((p) => p[0]).join("") === text) {
      return BigInt(parts.reduce((sum, p) => sum + Number(p[1]) * UNITS[p[2]!]!, 0));
    }
  }
  throw new InvalidRequest("invalid_request", `${field}: not a duration (e.g. "30m", "2h", "7d")`, field);
}

const date = (t: Timestamp | undefined): Date | null => (t === undefined ? null : timestampDate(t));

const STATUS: Record<number, string> = {
  [pb.KeyStatus.ACTIVE]: "active",
  [pb.KeyStatus.EXPIRED]: "expired",
  [pb.KeyStatus.REVOKED]: "revoked",
};

export interface Confirmation {
  version: number;
  allConfirmed: boolean;
  confirmedNodes: string[];
  unconfirmedNodes: string[];
  unconfirmedLeaseUsd: string;
}

function confirmation(c: pb.FleetConfirmation | undefined): Confirmation {
  return {
    version: Number(c?.version ?? 0n),
    allConfirmed: (c?.unconfirmedNodes.length ?? 0) === 0,
    confirmedNodes: c?.confirmedNodes ?? [],
    unconfirmedNodes: c?.unconfirmedNodes ?? [],
    unconfirmedLeaseUsd: usd(c?.unconfirmedLeaseMicros ?? 0n),
  };
}

export interface Vendor {
  name: string;
  profile: string;
  baseUrl: string;
  currencyRates: Record<string, string>;
  createdAt: Date | null;
  updatedAt: Date | null;
  proxyErrors: { nodeId: string; error: string; at: Date | null }[];
}

function vendor(v: pb.Vendor | undefined): Vendor {
  return {
    name: v?.name ?? "",
    profile: v?.profile ?? "",
    baseUrl: v?.baseUrl ?? "",
    currencyRates: { ...(v?.currencyRates ?? {}) },
    createdAt: date(v?.createdAt),
    updatedAt: date(v?.updatedAt),
    proxyErrors: (v?.proxyErrors ?? []).map((e) => ({ nodeId: e.nodeId, error: e.error, at: date(e.at) })),
  };
}

/** A vault key as keycap stores it: never its secret. */
export interface Key {
  id: string;
  keyPrefix: string;
  vendor: string;
  status: string;
  allowedEndpoints: string[];
  dailyUsdCap: string;
  perCallUsdCap: string | null;
  lifetimeUsdCap: string | null;
  spentTodayUsd: string;
  remainingTodayUsd: string;
  spentLifetimeUsd: string;
  callsToday: number;
  expiresAt: Date | null;
  createdAt: Date | null;
  revokedAt: Date | null;
  agentRunLabel: string;
  metadata: Record<string, string>;
  rateLimitPerMinute: number | null;
  allowedCidrs: string[];
  zone: string;
  parentId: string;
  /** Calls reserving more than this need a person's approval; null: none. */
  approvalAboveUsd: string | null;
  /** The key this one succeeded in a roll; empty if none. */
  rolledFrom: string;
  /** The key that succeeded this one; empty until it is rolled. */
  successor: string;
  /** When this rolled key is revoked; null if it was not rolled. */
  graceEndsAt: Date | null;
  /** The budget the key spends: its roll chain's first key. */
  budgetId: string;
  /**
   * "enforce", or "observe" (docs/observe.md): the caps, endpoints and rate
   * limit then only mark the calls they would refuse.
   */
  mode: string;
  /** Observe mode's hard daily ceiling; null when enforcing. */
  observeCeilingUsd: string | null;
}

function key(k: pb.VaultKey | undefined): Key {
  const m = k ?? create(pb.VaultKeySchema);
  return {
    id: m.id,
    keyPrefix: m.keyPrefix,
    vendor: m.vendor,
    status: STATUS[m.status] ?? "unknown",
    allowedEndpoints: m.allowedEndpoints,
    dailyUsdCap: usd(m.dailyCapMicros),
    perCallUsdCap: m.perCallCapMicros ? usd(m.perCallCapMicros) : null,
    lifetimeUsdCap: m.lifetimeCapMicros ? usd(m.lifetimeCapMicros) : null,
    spentTodayUsd: usd(m.spentTodayMicros),
    remainingTodayUsd: usd(m.remainingTodayMicros),
    spentLifetimeUsd: usd(m.spentLifetimeMicros),
    callsToday: Number(m.callsToday),
    expiresAt: date(m.expiresAt),
    createdAt: date(m.createdAt),
    revokedAt: date(m.revokedAt),
    agentRunLabel: m.agentRunLabel,
    metadata: { ...m.metadata },
    rateLimitPerMinute: m.rateLimitPerMinute || null,
    allowedCidrs: m.allowedCidrs,
    zone: m.zone,
    parentId: m.parentId,
    approvalAboveUsd: m.approvalAboveMicros ? usd(m.approvalAboveMicros) : null,
    rolledFrom: m.rolledFrom,
    successor: m.successor,
    graceEndsAt: date(m.graceEndsAt),
    budgetId: m.budgetId || m.id,
    mode: m.mode || "enforce",
    observeCeilingUsd: m.observeCeilingMicros ? usd(m.observeCeilingMicros) : null,
  };
}

/**
 * The base URL an official vendor SDK takes to call `vendor` through the
 * proxy: `{proxy}/{vendor}/v1` for the OpenAI SDKs (they expect the version
 * in it), `{proxy}/{vendor}` for the others.
 */
export function baseUrl(proxy: string, vendor: string, sdk = "openai"): string {
  const root = `${proxy.replace(/\/+$/, "")}/${vendor}`;
  return sdk === "openai" ? `${root}/v1` : root;
}

/** A newly minted key. `key` is its secret, shown once; not enumerable, so JSON and inspect leave it out. */
export class CreatedKey {
  declare readonly key: string;
  constructor(secret: string, readonly info: Key, readonly confirmation: Confirmation) {
    Object.defineProperty(this, "key", { value: secret, enumerable: false });
  }
  get id(): string {
    return this.info.id;
  }
  get expiresAt(): Date | null {
    return this.info.expiresAt;
  }
  /** `new OpenAI({ baseURL: created.baseUrl(proxy), apiKey: created.key })`. */
  baseUrl(proxy: string, sdk = "openai"): string {
    return baseUrl(proxy, this.info.vendor, sdk);
  }
}

export interface AuditEntry {
  seq: number;
  eventId: string;
  keyId: string;
  agentRunLabel: string;
  vendor: string;
  method: string;
  path: string;
  upstreamStatus: number;
  reservedUsd: string;
  costUsd: string;
  outcome: string;
  at: Date | null;
  nodeId: string;
  detail: unknown;
  /** For outcome "refused": the error code the calls got ("" otherwise). */
  refusalReason: string;
  /** For outcome "refused": the calls of the key in that minute it stands for. */
  refusedCalls: number;
  /** For a call forwarded under an approval: its id, who decided it and why ("" otherwise). */
  approvalId: string;
  approvalDecidedBy: string;
  approvalReason: string;
}

export interface Spend {
  agentRunLabel: string;
  totalUsd: string;
  calls: number;
  vendors: { vendor: string; totalUsd: string; calls: number }[];
}

/** An issuer token: mints child keys of one key. Never its secret. */
export interface IssuerToken {
  id: string;
  keyId: string;
  name: string;
  tokenPrefix: string;
  status: string;
  createdAt: Date | null;
  expiresAt: Date | null;
  revokedAt: Date | null;
}

function issuerToken(t: pb.IssuerToken | undefined): IssuerToken {
  const m = t ?? create(pb.IssuerTokenSchema);
  return {
    id: m.id, keyId: m.keyId, name: m.name, tokenPrefix: m.tokenPrefix,
    status: STATUS[m.status] ?? "unknown",
    createdAt: date(m.createdAt), expiresAt: date(m.expiresAt), revokedAt: date(m.revokedAt),
  };
}

/** An admin token as keycap stores it: never its secret. `vendors` is empty for every vendor. */
export interface AdminToken {
  id: string;
  name: string;
  scopes: string[];
  vendors: string[];
  tokenPrefix: string;
  status: string;
  createdAt: Date | null;
  expiresAt: Date | null;
  revokedAt: Date | null;
}

function adminToken(t: pb.AdminToken | undefined): AdminToken {
  const m = t ?? create(pb.AdminTokenSchema);
  return {
    id: m.id, name: m.name, scopes: m.scopes, vendors: m.vendors, tokenPrefix: m.tokenPrefix,
    status: STATUS[m.status] ?? "unknown",
    createdAt: date(m.createdAt), expiresAt: date(m.expiresAt), revokedAt: date(m.revokedAt),
  };
}

/** A newly minted token. `token` is its secret, shown once; not enumerable, so JSON and inspect leave it out. */
export class CreatedToken<T extends { id: string; expiresAt: Date | null }> {
  declare readonly token: string;
  constructor(secret: string, readonly info: T) {
    Object.defineProperty(this, "token", { value: secret, enumerable: false });
  }
  get id(): string {
    return this.info.id;
  }
  get expiresAt(): Date | null {
    return this.info.expiresAt;
  }
}

/** Whether the audit ledger's hash chain holds; `broken` names the first entry that breaks it. */
export interface Verification {
  ok: boolean;
  checked: number;
  legacy: number;
  headSeq: number | null;
  /** Hex SHA-256 of the last entry checked. */
  headHash: string | null;
  broken: { seq: number; reason: string; message: string } | null;
  checkpointSeq: number | null;
}

/** A signed checkpoint of the ledger's head (hex hash, Ed25519 public key and signature). */
export interface Checkpoint {
  seq: number;
  hash: string;
  at: Date | null;
  publicKey: string;
  signature: string;
}

/** What a price import priced, skipped and left out, with the vendor as it now is. */
export interface PriceImport {
  vendor: Vendor;
  asOf: string;
  entries: number;
  models: string[];
  embeddings: string[];
  images: string[];
  skipped: { name: string; reason: string }[];
  unusedPrices: { kind: string; reason: string; entries: number }[];
}

/** A call to simulate, as the agent would send it through the proxy. */
export interface SimulatedCall {
  method: string;
  /** The path as the vendor sees it, with its query if any. */
  path: string;
  headers?: Record<string, string>;
  body?: string | Uint8Array;
}

/** What the proxy would do with a simulated call; nothing was forwarded or reserved. */
export interface Simulation {
  allowed: boolean;
  /** The code the proxy answers (or "quote_needs_lookup") and the rule behind it. */
  refusal: { code: string; rule: string; message: string } | null;
  /** The quote the proxy's pricing makes. */
  quote: { reserveUsd: string; kind: string; rule: string; detail: unknown; streaming: boolean } | null;
  dailyRemainingUsd: string;
  lifetimeRemainingUsd: string | null;
  unleasedUsd: string;
  resetsAt: Date | null;
  notChecked: string[];
  lookups: string[];
}

/** An enforcing policy suggested from a key's observed calls (a `CreateKey` without expiry). */
export interface PolicySuggestion {
  vendor: string;
  allowedEndpoints: string[];
  dailyUsdCap: string;
  perCallUsdCap: string;
  marginPercent: number;
  observedCalls: number;
  maxDailyUsd: string;
  maxCallUsd: string;
}

/** A master key rotation: not done while `failedVendors` is not empty. */
export interface KekRotation {
  kekId: string;
  rewrapped: number;
  alreadyCurrent: number;
  failedVendors: string[];
}

const hex = (b: Uint8Array): string => Buffer.from(b).toString("hex");

/** One group of a spend report: the dimensions grouped by (absent for the others). */
export interface SpendGroup {
  agentRunLabel?: string;
  keyId?: string;
  vendor?: string;
  day?: string;
  totalUsd: string;
  calls: number;
  refusedCalls: number;
}

/** Spend grouped as asked, largest first; the totals cover every entry in range. */
export interface SpendReport {
  groupBy: string[];
  groups: SpendGroup[];
  totalUsd: string;
  calls: number;
  refusedCalls: number;
  /** Groups beyond `top` were left out. */
  more: boolean;
}

export interface SpendReportQuery {
  /** Any of "run_label", "key", "vendor", "day" (UTC). */
  groupBy?: string[];
  /** Entries at or after this time. */
  since?: Date;
  /** Entries before this time. */
  until?: Date;
  /** The top N groups by spend. */
  top?: number;
  agentRunLabel?: string;
}

export interface CreateKey {
  vendor: string;
  dailyUsdCap: Money;
  allowedEndpoints: string[];
  expiresIn: Duration;
  agentRunLabel?: string;
  perCallUsdCap?: Money;
  lifetimeUsdCap?: Money;
  metadata?: Record<string, string>;
  rateLimitPerMinute?: number;
  allowedCidrs?: string[];
  zone?: string;
  parentId?: string;
  /** Calls reserving more than this need a person's approval (docs/approvals.md). */
  approvalAboveUsd?: Money;
  /** Mint the key in observe mode (docs/observe.md) with this hard daily ceiling. */
  observeCeilingUsd?: Money;
}

/** What a key in observe mode enforces once switched; each part left out keeps the key's own. */
export interface Enforce {
  dailyUsdCap?: Money;
  perCallUsdCap?: Money;
  lifetimeUsdCap?: Money;
  allowedEndpoints?: string[];
}

// ------------------------------------------------------------------ client

export interface ClientOptions {
  /** `http://host:port` or `https://host:port`; else KEYCAP_ADDR, else http://127.0.0.1:8081. */
  addr?: string;
  /** An admin token; else KEYCAP_ADMIN_TOKEN. */
  token?: string;
  /** PEM CAs trusted for https; else KEYCAP_CACERT; else the system's roots. */
  caFile?: string;
  /** Seconds per call (default 10). */
  timeout?: number;
}

/** keycap's admin API. All methods return promises. */
export class Client {
  readonly addr: string;
  readonly vendors: Vendors;
  readonly keys: Keys;
  readonly audit: Audit;
  readonly adminTokens: AdminTokens;
  readonly approvals: Approvals;
  readonly #audit: RpcClient<typeof pb.AuditService>;
  readonly #call: Call;

  constructor(options: ClientOptions = {}) {
    const env = process.env;
    this.addr = options.addr ?? env.KEYCAP_ADDR ?? env.KEYCAP_CONTROL_URL ?? "http://127.0.0.1:8081";
    const token = options.token ?? env.KEYCAP_ADMIN_TOKEN;
    if (!token) {
      throw new Unauthenticated("unauthenticated", "an admin token is required: token or KEYCAP_ADMIN_TOKEN");
    }
    const caFile = options.caFile ?? env.KEYCAP_CACERT ?? env.KEYCAP_CA;
    const bearer = `Bearer ${token}`;
    const auth: Interceptor = (next) => (req) => {
      req.header.set("authorization", bearer);
      return next(req);
    };
    const transport = createGrpcTransport({
      baseUrl: this.addr,
      interceptors: [auth],
      defaultTimeoutMs: (options.timeout ?? 10) * 1000,
      ...(caFile ? { nodeOptions: { ca: readFileSync(caFile) } } : {}),
    });
    const addr = this.addr;
    this.#call = async <T>(call: () => Promise<T>): Promise<T> => {
      try {
        return await call();
      } catch (e) {
        throw keycapError(e, addr);
      }
    };
    this.vendors = new Vendors(createClient(pb.VendorService, transport), this.#call);
    this.keys = new Keys(createClient(pb.KeyService, transport), this.#call,
      createClient(pb.SimulateService, transport), createClient(pb.SuggestService, transport));
    this.#audit = createClient(pb.AuditService, transport);
    this.audit = new Audit(this.#audit, this.#call);
    this.adminTokens = new AdminTokens(createClient(pb.AdminTokenService, transport), this.#call);
    this.approvals = new Approvals(createClient(pb.ApprovalService, transport), this.#call);
  }

  /** What an agent run spent, in total and per vendor. */
  async spend(agentRunLabel: string): Promise<Spend> {
    const r = await this.#call(() => this.#audit.spendSummary({ agentRunLabel }));
    return {
      agentRunLabel: r.agentRunLabel,
      totalUsd: usd(r.totalMicros),
      calls: Number(r.calls),
      vendors: r.vendors.map((v) => ({ vendor: v.vendor, totalUsd: usd(v.totalMicros), calls: Number(v.calls) })),
    };
  }

  /** Spend, calls and refused calls grouped by run label, key, vendor and/or UTC day. */
  async spendReport(q: SpendReportQuery = {}): Promise<SpendReport> {
    const r = await this.#call(() => this.#audit.spendReport({
      groupBy: q.groupBy ?? [],
      ...(q.since ? { from: timestampFromDate(q.since) } : {}),
      ...(q.until ? { to: timestampFromDate(q.until) } : {}),
      top: q.top ?? 0,
      agentRunLabel: q.agentRunLabel ?? "",
    }));
    const by = new Set(r.groupBy);
    const dim = (name: string, value: string) => (by.has(name) ? value : undefined);
    return {
      groupBy: r.groupBy,
      groups: r.groups.map((g) => {
        const group: SpendGroup = {
          totalUsd: usd(g.totalMicros), calls: Number(g.calls), refusedCalls: Number(g.refusedCalls),
        };
        const dims = {
          agentRunLabel: dim("run_label", g.agentRunLabel), keyId: dim("key", g.keyId),
          vendor: dim("vendor", g.vendor), day: dim("day", g.day),
        };
        for (const [k, v] of Object.entries(dims)) {
          if (v !== undefined) (group as unknown as Record<string, string>)[k] = v;
        }
        return group;
      }),
      totalUsd: usd(r.totalMicros),
      calls: Number(r.calls),
      refusedCalls: Number(r.refusedCalls),
      more: r.more,
    };
  }

  toJSON(): { addr: string } {
    return { addr: this.addr };
  }
}

type Call = <T>(call: () => Promise<T>) => Promise<T>;

export class Vendors {
  constructor(readonly rpc: RpcClient<typeof pb.VendorService>, private readonly call: Call) {}

  /** Creates or replaces a vendor; `credential` is required on creation. */
  async put(name: string, v: { profile: string; baseUrl: string; credential?: string; currencyRates?: Record<string, string> }):
    Promise<{ vendor: Vendor; created: boolean; confirmation: Confirmation }> {
    const r = await this.call(() => this.rpc.putVendor({
      name, profile: v.profile, baseUrl: v.baseUrl, credential: v.credential ?? "",
      currencyRates: v.currencyRates ?? {},
    }));
    return { vendor: vendor(r.vendor), created: r.created, confirmation: confirmation(r.confirmation) };
  }

  async get(name: string): Promise<Vendor> {
    return vendor((await this.call(() => this.rpc.getVendor({ name }))).vendor);
  }

  async list(): Promise<Vendor[]> {
    return (await this.call(() => this.rpc.listVendors({}))).vendors.map(vendor);
  }

  async delete(name: string): Promise<Confirmation> {
    return confirmation((await this.call(() => this.rpc.deleteVendor({ name }))).confirmation);
  }

  /** Replaces the vendor's prices with those of LiteLLM's price file (its JSON text as published). */
  async importPrices(name: string, litellmJson: string): Promise<PriceImport> {
    const r = await this.call(() => this.rpc.importVendorPrices({ name, litellmJson }));
    const report = r.report ?? create(pb.PriceImportReportSchema);
    return {
      vendor: vendor(r.vendor), asOf: report.asOf, entries: report.entries, models: report.models,
      embeddings: report.embeddings, images: report.images,
      skipped: report.skipped.map((e) => ({ name: e.name, reason: e.reason })),
      unusedPrices: report.unusedPrices.map((u) => ({ kind: u.kind, reason: u.reason, entries: u.entries })),
    };
  }

  /** Re-wraps every vendor credential under the answering control plane's primary master key. */
  async rotateKek(): Promise<KekRotation> {
    const r = await this.call(() => this.rpc.rotateKek({}));
    return { kekId: r.kekId, rewrapped: r.rewrapped, alreadyCurrent: r.alreadyCurrent, failedVendors: r.failedVendors };
  }
}

/** A call held for a person's approval (docs/approvals.md). */
export interface Approval {
  id: string;
  keyId: string;
  agentRunLabel: string;
  vendor: string;
  method: string;
  path: string;
  fingerprint: string;
  quoteUsd: string;
  /** "pending", "approved", "denied", "expired" or "used". */
  state: string;
  requestedAt: Date | null;
  expiresAt: Date | null;
  decidedBy: string;
  reason: string;
  decidedAt: Date | null;
  consumedAt: Date | null;
  nodeId: string;
  approvalUrl: string;
}

function approval(a: pb.Approval | undefined): Approval {
  const m = a ?? create(pb.ApprovalSchema);
  return {
    id: m.id,
    keyId: m.keyId,
    agentRunLabel: m.agentRunLabel,
    vendor: m.vendor,
    method: m.method,
    path: m.path,
    fingerprint: m.fingerprint,
    quoteUsd: usd(m.quoteMicros),
    state: m.state,
    requestedAt: date(m.requestedAt),
    expiresAt: date(m.expiresAt),
    decidedBy: m.decidedBy,
    reason: m.reason,
    decidedAt: date(m.decidedAt),
    consumedAt: date(m.consumedAt),
    nodeId: m.nodeId,
    approvalUrl: m.approvalUrl,
  };
}

export class Approvals {
  constructor(readonly rpc: RpcClient<typeof pb.ApprovalService>, private readonly call: Call) {}

  /** Held calls, newest first (needs keys:read). */
  async list(filter: { state?: string; keyId?: string; limit?: number } = {}): Promise<Approval[]> {
    const r = await this.call(() => this.rpc.listApprovals({
      state: filter.state ?? "", keyId: filter.keyId ?? "", limit: filter.limit ?? 0,
    }));
    return r.approvals.map(approval);
  }

  async get(id: string): Promise<Approval> {
    return approval((await this.call(() => this.rpc.getApproval({ id }))).approval);
  }

  /** Approves a held call (needs approvals:decide); the agent's identical retry with Keycap-Approval is forwarded once. */
  async approve(id: string, reason: string): Promise<Approval> {
    return approval((await this.call(() => this.rpc.approveApproval({ id, reason }))).approval);
  }

  /** Denies a held call (needs approvals:decide). */
  async deny(id: string, reason: string): Promise<Approval> {
    return approval((await this.call(() => this.rpc.denyApproval({ id, reason }))).approval);
  }
}

export class AdminTokens {
  constructor(readonly rpc: RpcClient<typeof pb.AdminTokenService>, private readonly call: Call) {}

  /** Mints an admin token with `scopes` (restricted to `vendors` when given); its secret is `.token`, once. */
  async create(t: { name: string; scopes: string[]; vendors?: string[]; expiresIn?: Duration }):
    Promise<CreatedToken<AdminToken>> {
    const r = await this.call(() => this.rpc.createAdminToken({
      name: t.name, scopes: t.scopes, vendors: t.vendors ?? [],
      expiresInSeconds: t.expiresIn === undefined ? 0n : seconds("expires_in", t.expiresIn),
    }));
    return new CreatedToken(r.secret, adminToken(r.token));
  }

  async list(filter: { includeInactive?: boolean } = {}): Promise<AdminToken[]> {
    const r = await this.call(() => this.rpc.listAdminTokens({ includeInactive: filter.includeInactive ?? false }));
    return r.tokens.map(adminToken);
  }

  async revoke(id: string): Promise<AdminToken> {
    return adminToken((await this.call(() => this.rpc.revokeAdminToken({ id }))).token);
  }
}

export class Keys {
  constructor(readonly rpc: RpcClient<typeof pb.KeyService>, private readonly call: Call,
    private readonly dryRuns: RpcClient<typeof pb.SimulateService>,
    private readonly suggestions: RpcClient<typeof pb.SuggestService>) {}

  /**
   * An enforcing policy drawn from the key's forwarded calls: endpoint
   * templates, daily and per-call caps from the observed maxima plus
   * `marginPercent` (default 25). Spread it into `create` with `expiresIn`.
   */
  async suggest(keyId: string, options: { marginPercent?: number } = {}): Promise<PolicySuggestion> {
    const r = await this.call(() => this.suggestions.suggestPolicy({
      keyId, ...(options.marginPercent === undefined ? {} : { marginPercent: options.marginPercent }),
    }));
    const o = r.observed;
    return {
      vendor: r.vendor,
      allowedEndpoints: r.allowedEndpoints,
      dailyUsdCap: usd(r.dailyCapMicros),
      perCallUsdCap: usd(r.perCallCapMicros),
      marginPercent: r.marginPercent,
      observedCalls: Number(o?.calls ?? 0n),
      maxDailyUsd: usd(o?.maxDailyMicros ?? 0n),
      maxCallUsd: usd(o?.maxCallMicros ?? 0n),
    };
  }

  /**
   * A dry run: what the proxy would do with this call of the key (`path` as
   * the vendor sees it, "/v1/payment_intents"), without forwarding or
   * reserving anything (docs/simulate.md).
   */
  async simulate(keyId: string, call: SimulatedCall): Promise<Simulation> {
    const body = call.body === undefined ? new Uint8Array()
      : typeof call.body === "string" ? new TextEncoder().encode(call.body) : call.body;
    const r = await this.call(() => this.dryRuns.simulate({
      keyId,
      request: {
        method: call.method,
        path: call.path,
        headers: Object.entries(call.headers ?? {}).map(([name, value]) => ({ name, value })),
        body,
      },
    }));
    const b = r.budget;
    return {
      allowed: r.allowed,
      refusal: r.refusalCode ? { code: r.refusalCode, rule: r.rule, message: r.message } : null,
      quote: r.quote ? {
        reserveUsd: usd(r.quote.reserveMicros), kind: r.quote.kind, rule: r.quote.rule,
        detail: JSON.parse(r.quote.detailJson || "null"), streaming: r.quote.streaming,
      } : null,
      dailyRemainingUsd: usd(b?.dailyRemainingMicros ?? 0n),
      lifetimeRemainingUsd: b?.hasLifetimeCap ? usd(b.lifetimeRemainingMicros) : null,
      unleasedUsd: usd(b?.unleasedMicros ?? 0n),
      resetsAt: b?.resetsAt ? timestampDate(b.resetsAt) : null,
      notChecked: r.notChecked,
      lookups: r.lookups,
    };
  }

  /** Mints a vault key; the answer carries its secret (`.key`) once. */
  async create(k: CreateKey): Promise<CreatedKey> {
    const req = {
      vendor: k.vendor,
      dailyCapMicros: micros("daily_usd_cap", k.dailyUsdCap),
      allowedEndpoints: k.allowedEndpoints,
      expiresInSeconds: seconds("expires_in", k.expiresIn),
      agentRunLabel: k.agentRunLabel ?? "",
      perCallCapMicros: k.perCallUsdCap === undefined ? 0n : micros("per_call_usd_cap", k.perCallUsdCap),
      lifetimeCapMicros: k.lifetimeUsdCap === undefined ? 0n : micros("lifetime_usd_cap", k.lifetimeUsdCap),
      metadata: k.metadata ?? {},
      rateLimitPerMinute: k.rateLimitPerMinute ?? 0,
      allowedCidrs: k.allowedCidrs ?? [],
      zone: k.zone ?? "",
      parentId: k.parentId ?? "",
      approvalAboveMicros:
        k.approvalAboveUsd === undefined ? 0n : micros("approval_above_usd", k.approvalAboveUsd),
      mode: k.observeCeilingUsd === undefined ? "" : "observe",
      observeCeilingMicros:
        k.observeCeilingUsd === undefined ? 0n : micros("observe_ceiling_usd", k.observeCeilingUsd),
    };
    const r = await this.call(() => this.rpc.createKey(req));
    return new CreatedKey(r.secret, key(r.key), confirmation(r.confirmation));
  }

  async get(id: string): Promise<Key> {
    return key((await this.call(() => this.rpc.getKey({ id }))).key);
  }

  async list(filter: { agentRunLabel?: string; vendor?: string; includeInactive?: boolean } = {}): Promise<Key[]> {
    const r = await this.call(() => this.rpc.listKeys({
      agentRunLabel: filter.agentRunLabel ?? "", vendor: filter.vendor ?? "",
      includeInactive: filter.includeInactive ?? false,
    }));
    return r.keys.map(key);
  }

  /** Revokes a key; resolves once the proxies confirmed (or the wait ended). */
  async revoke(id: string): Promise<{ key: Key; confirmation: Confirmation }> {
    const r = await this.call(() => this.rpc.revokeKey({ id }));
    return { key: key(r.key), confirmation: confirmation(r.confirmation) };
  }

  /**
   * Rolls a key: a successor with the same policy that spends the same
   * budget, resolved once the proxies serve it (its secret is `.key`, shown
   * once). The rolled key keeps working for `grace` (default 10 minutes, at
   * most 24 hours), then is revoked.
   */
  async roll(id: string, opts: { grace?: Duration } = {}):
    Promise<{ created: CreatedKey; rolled: Key }> {
    const grace = opts.grace === undefined ? "" : `${seconds("grace", opts.grace)}s`;
    const r = await this.call(() => this.rpc.rollKey({ id, grace }));
    return {
      created: new CreatedKey(r.secret, key(r.key), confirmation(r.confirmation)),
      rolled: key(r.rolled),
    };
  }

  /**
   * Switches a key in observe mode to enforcing, in place (same id, secret
   * and budget); resolves once the proxies enforce it.
   */
  async enforce(id: string, e: Enforce = {}): Promise<{ key: Key; confirmation: Confirmation }> {
    const cap = (field: string, v: Money | undefined) => (v === undefined ? 0n : micros(field, v));
    const r = await this.call(() => this.rpc.enforceKey({
      id,
      dailyCapMicros: cap("daily_usd_cap", e.dailyUsdCap),
      perCallCapMicros: cap("per_call_usd_cap", e.perCallUsdCap),
      lifetimeCapMicros: cap("lifetime_usd_cap", e.lifetimeUsdCap),
      allowedEndpoints: e.allowedEndpoints ?? [],
    }));
    return { key: key(r.key), confirmation: confirmation(r.confirmation) };
  }

  /** Revokes every key of an agent run. */
  async revokeRun(agentRunLabel: string): Promise<{ revokedIds: string[]; confirmation: Confirmation }> {
    const r = await this.call(() => this.rpc.revokeRun({ agentRunLabel }));
    return { revokedIds: r.revokedIds, confirmation: confirmation(r.confirmation) };
  }

  /** An issuer token for a key: its secret (`token`, shown once) and what keycap stores (`info`). */
  async createIssuerToken(keyId: string, t: { name: string; expiresIn: Duration }):
    Promise<CreatedToken<IssuerToken>> {
    const r = await this.call(() => this.rpc.createIssuerToken({
      keyId, name: t.name, expiresInSeconds: seconds("expires_in", t.expiresIn),
    }));
    return new CreatedToken(r.secret, issuerToken(r.token));
  }

  async listIssuerTokens(keyId: string, filter: { includeInactive?: boolean } = {}): Promise<IssuerToken[]> {
    const r = await this.call(() => this.rpc.listIssuerTokens({ keyId, includeInactive: filter.includeInactive ?? false }));
    return r.tokens.map(issuerToken);
  }

  async revokeIssuerToken(id: string): Promise<IssuerToken> {
    return issuerToken((await this.call(() => this.rpc.revokeIssuerToken({ id }))).token);
  }
}

export class Audit {
  constructor(readonly rpc: RpcClient<typeof pb.AuditService>, private readonly call: Call) {}

  /** Every matching entry, newest first, fetching page after page. */
  async *query(filter: {
    keyId?: string; agentRunLabel?: string; vendor?: string; since?: Date; until?: Date;
    /** Only the entries of the call with this trace id. */
    traceId?: string;
    /** "key=value": only entries whose agent context has it. */
    context?: string;
    /** "refused": the recorded refusals. */
    outcome?: string;
    /** Only refusals with this error code. */
    refusalReason?: string;
  } = {}):
    AsyncGenerator<AuditEntry> {
    let pageToken = "";
    for (;;) {
      const r = await this.call(() => this.rpc.queryAudit({
        keyId: filter.keyId ?? "",
        agentRunLabel: filter.agentRunLabel ?? "",
        vendor: filter.vendor ?? "",
        ...(filter.since ? { since: timestampFromDate(filter.since) } : {}),
        ...(filter.until ? { until: timestampFromDate(filter.until) } : {}),
        traceId: filter.traceId ?? "",
        context: filter.context ?? "",
        outcome: filter.outcome ?? "",
        refusalReason: filter.refusalReason ?? "",
        pageSize: 500,
        pageToken,
      }));
      for (const e of r.entries) {
        yield {
          seq: Number(e.seq), eventId: e.eventId, keyId: e.keyId, agentRunLabel: e.agentRunLabel,
          vendor: e.vendor, method: e.method, path: e.path, upstreamStatus: e.upstreamStatus,
          reservedUsd: usd(e.reservedMicros), costUsd: usd(e.costMicros), outcome: e.outcome,
          at: date(e.at), nodeId: e.nodeId, detail: e.detailJson ? JSON.parse(e.detailJson) : null,
          refusalReason: e.refusalReason, refusedCalls: Number(e.refusedCalls),
          approvalId: e.approvalId, approvalDecidedBy: e.approvalDecidedBy, approvalReason: e.approvalReason,
        };
      }
      if (!r.nextPageToken) return;
      pageToken = r.nextPageToken;
    }
  }

  /**
   * Recomputes the ledger's hash chain (from `fromSeq`, trusting the hash
   * stored before it) and holds its end against the latest checkpoint
   * keycap signed and against `checkpoint`, one kept from earlier as
   * "SEQ:HASH" (hash in hex).
   */
  async verify(options: { fromSeq?: number; checkpoint?: string } = {}): Promise<Verification> {
    const r = await this.call(() =>
      this.rpc.verifyAudit({ fromSeq: BigInt(options.fromSeq ?? 0), checkpoint: options.checkpoint ?? "" }),
    );
    const head = r.headHash.length > 0;
    return {
      ok: r.ok, checked: Number(r.checked), legacy: Number(r.legacy),
      headSeq: head ? Number(r.headSeq) : null,
      headHash: head ? hex(r.headHash) : null,
      broken: r.ok ? null : { seq: Number(r.brokenSeq), reason: r.brokenReason, message: r.brokenMessage },
      checkpointSeq: r.checkpointSeq ? Number(r.checkpointSeq) : null,
    };
  }

  /** The ledger's signed checkpoints, newest first. */
  async checkpoints(options: { limit?: number } = {}): Promise<Checkpoint[]> {
    const r = await this.call(() => this.rpc.listCheckpoints({ limit: options.limit ?? 0 }));
    return r.checkpoints.map((c) => ({
      seq: Number(c.seq), hash: hex(c.hash), at: date(c.at), publicKey: hex(c.publicKey), signature: hex(c.signature),
    }));
  }

  /**
   * The ledger oldest first with its chain fields, as JSON Lines ("jsonl") or
   * CSV ("csv"), a page of records per piece as the server streams it: write
   * each piece as it comes (docs/verify_ledger.py checks a JSON Lines export
   * on its own). `timeoutMs` bounds the whole export (default: the client's).
   */
  async *export(options: { format?: "jsonl" | "csv"; since?: Date; until?: Date; timeoutMs?: number } = {}):
    AsyncGenerator<Uint8Array> {
    const pieces = this.rpc.exportAudit({
      format: options.format ?? "jsonl",
      ...(options.since ? { from: timestampFromDate(options.since) } : {}),
      ...(options.until ? { to: timestampFromDate(options.until) } : {}),
    }, options.timeoutMs !== undefined ? { timeoutMs: options.timeoutMs } : {});
    const iterator = pieces[Symbol.asyncIterator]();
    for (;;) {
      const next = await this.call(() => iterator.next());
      if (next.done) return;
      yield next.value.data;
    }
  }
}
