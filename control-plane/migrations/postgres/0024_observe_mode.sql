-- Observe mode (docs/observe.md). A key with observe_ceiling set is in
-- observe mode: its caps, allowlist and rate limit are what enforcement
-- would apply, and calls they would refuse are forwarded and marked; the
-- ceiling is the daily cap actually enforced (leases and grants use it).
-- NULL: the key enforces its own caps. Switching to enforcement sets it to
-- NULL in place (same id, same budget).
ALTER TABLE vault_keys ADD COLUMN observe_ceiling BIGINT;
-- The refusal code enforcement would have answered a forwarded call of an
-- observe key with ("endpoint_not_allowed", "rate_limited",
-- "per_call_cap_exceeded", "daily_cap_exceeded", "lifetime_cap_exceeded");
-- empty for every other entry.
ALTER TABLE audit ADD COLUMN would_refuse TEXT NOT NULL DEFAULT '';
-- The per-minute alert counters were replaced by the proxies' refusal
-- records (cap.refusals counts those); nothing reads or writes them.
DROP TABLE alert_counters;
