-- Refused calls in the ledger (see docs/ledger.md, "Refusals"): an entry
-- with outcome 'refused' stands for every call of one key refused for one
-- reason within one minute on one proxy; it keeps the reason (the error
-- code the caller got) and how many calls it stands for. Both are hashed
-- into the entry. Spend entries keep '' and 0.
ALTER TABLE audit ADD COLUMN refusal_reason TEXT NOT NULL DEFAULT '';
ALTER TABLE audit ADD COLUMN refused_calls INTEGER NOT NULL DEFAULT 0;
CREATE INDEX audit_refusal_reason ON audit (refusal_reason, seq);
