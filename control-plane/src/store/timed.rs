//! Every store call timed into `keycap_control_store_query_duration_seconds`,
//! labelled by the `Store` method (bounded: the trait's own names). A
//! decorator, so both databases and every query are measured the same way
//! and no query site carries timing code. It adds nothing else.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{BudgetLevel, RevokedKey, SealedCredential, Store, StoreResult, VendorWrite};
use crate::approval::{Approval, ApprovalFilter};
use crate::credential::{CredentialProbe, CredentialVersion, Promotion};
use crate::domain::EnforcedTerms;
use crate::domain::{
    AdminToken, AuditEntry, AuditQuery, Change, FleetNode, IssuerToken, KeyFilter, KeySpend,
    LeaseGrant, LeaseGrantRequest, NodeLease, SpendEvent, SpendReport, SpendReportQuery,
    SpendSummary, VaultKey, Vendor, VendorLoadError,
};
use crate::hooks::StoredHook;
use crate::ledger::{Checkpoint, Retention};
use crate::webhook::{
    Attempt, AttemptOutcome, ClaimedDelivery, Delivery, WebhookEndpoint, WebhookEvent,
};

/// A store whose calls are timed.
pub struct TimedStore<S>(pub S);

async fn timed<T>(op: &'static str, call: impl std::future::Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let out = call.await;
    crate::metrics::METRICS.store_query(op, started.elapsed());
    out
}

#[async_trait]
impl<S: Store> Store for TimedStore<S> {
    fn change_feed(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.0.change_feed()
    }

    async fn migrate(&self) -> StoreResult<()> {
        timed("migrate", self.0.migrate()).await
    }

    async fn ensure_admin_token(&self, token: &AdminToken) -> StoreResult<()> {
        timed("ensure_admin_token", self.0.ensure_admin_token(token)).await
    }

    async fn insert_admin_token(&self, token: &AdminToken) -> StoreResult<()> {
        timed("insert_admin_token", self.0.insert_admin_token(token)).await
    }

    async fn find_admin_token(&self, token_hash: &[u8; 32]) -> StoreResult<Option<AdminToken>> {
        timed("find_admin_token", self.0.find_admin_token(token_hash)).await
    }

    async fn get_admin_token(&self, id: &str) -> StoreResult<Option<AdminToken>> {
        timed("get_admin_token", self.0.get_admin_token(id)).await
    }

    async fn list_admin_tokens(&self) -> StoreResult<Vec<AdminToken>> {
        timed("list_admin_tokens", self.0.list_admin_tokens()).await
    }

    async fn revoke_admin_token(&self, id: &str, now: DateTime<Utc>) -> StoreResult<AdminToken> {
        timed("revoke_admin_token", self.0.revoke_admin_token(id, now)).await
    }

    async fn insert_issuer_token(&self, token: &IssuerToken) -> StoreResult<()> {
        timed("insert_issuer_token", self.0.insert_issuer_token(token)).await
    }

    async fn find_issuer_token(&self, token_hash: &[u8; 32]) -> StoreResult<Option<IssuerToken>> {
        timed("find_issuer_token", self.0.find_issuer_token(token_hash)).await
    }

    async fn get_issuer_token(&self, id: &str) -> StoreResult<Option<IssuerToken>> {
        timed("get_issuer_token", self.0.get_issuer_token(id)).await
    }

    async fn list_issuer_tokens(&self, key_id: &str) -> StoreResult<Vec<IssuerToken>> {
        timed("list_issuer_tokens", self.0.list_issuer_tokens(key_id)).await
    }

    async fn revoke_issuer_token(&self, id: &str, now: DateTime<Utc>) -> StoreResult<IssuerToken> {
        timed("revoke_issuer_token", self.0.revoke_issuer_token(id, now)).await
    }

    async fn put_vendor(&self, write: VendorWrite) -> StoreResult<(Vendor, bool)> {
        timed("put_vendor", self.0.put_vendor(write)).await
    }

    async fn get_vendor(&self, name: &str) -> StoreResult<Option<Vendor>> {
        timed("get_vendor", self.0.get_vendor(name)).await
    }

    async fn get_vendor_credential(&self, name: &str) -> StoreResult<Option<(i64, Vec<u8>)>> {
        timed("get_vendor_credential", self.0.get_vendor_credential(name)).await
    }

    async fn list_vendors(&self) -> StoreResult<Vec<Vendor>> {
        timed("list_vendors", self.0.list_vendors()).await
    }

    async fn sealed_credentials(&self) -> StoreResult<Vec<SealedCredential>> {
        timed("sealed_credentials", self.0.sealed_credentials()).await
    }

    async fn replace_sealed_credential(
        &self,
        name: &str,
        version: i64,
        expected: &[u8],
        sealed: &[u8],
    ) -> StoreResult<bool> {
        timed(
            "replace_sealed_credential",
            self.0
                .replace_sealed_credential(name, version, expected, sealed),
        )
        .await
    }

    async fn stage_credential(
        &self,
        vendor: &str,
        version: i64,
        sealed: &[u8],
        now: DateTime<Utc>,
    ) -> StoreResult<CredentialVersion> {
        timed(
            "stage_credential",
            self.0.stage_credential(vendor, version, sealed, now),
        )
        .await
    }

    async fn list_credentials(&self, vendor: &str) -> StoreResult<Vec<CredentialVersion>> {
        timed("list_credentials", self.0.list_credentials(vendor)).await
    }

    async fn get_credential(
        &self,
        vendor: &str,
        version: i64,
    ) -> StoreResult<Option<(CredentialVersion, Option<Vec<u8>>)>> {
        timed("get_credential", self.0.get_credential(vendor, version)).await
    }

    async fn record_credential_probe(
        &self,
        vendor: &str,
        version: i64,
        probe: &CredentialProbe,
    ) -> StoreResult<CredentialVersion> {
        timed(
            "record_credential_probe",
            self.0.record_credential_probe(vendor, version, probe),
        )
        .await
    }

    async fn promote_credential(
        &self,
        vendor: &str,
        version: i64,
        grace: chrono::TimeDelta,
        now: DateTime<Utc>,
    ) -> StoreResult<Promotion> {
        timed(
            "promote_credential",
            self.0.promote_credential(vendor, version, grace, now),
        )
        .await
    }

    async fn retire_credentials(&self, now: DateTime<Utc>) -> StoreResult<Vec<(String, i64)>> {
        timed("retire_credentials", self.0.retire_credentials(now)).await
    }

    async fn delete_vendor(&self, name: &str, now: DateTime<Utc>) -> StoreResult<()> {
        timed("delete_vendor", self.0.delete_vendor(name, now)).await
    }

    async fn insert_key(&self, key: &VaultKey) -> StoreResult<()> {
        timed("insert_key", self.0.insert_key(key)).await
    }

    async fn get_key(&self, id: &str) -> StoreResult<Option<VaultKey>> {
        timed("get_key", self.0.get_key(id)).await
    }

    async fn find_key_by_hash(&self, key_hash: &[u8; 32]) -> StoreResult<Option<VaultKey>> {
        timed("find_key_by_hash", self.0.find_key_by_hash(key_hash)).await
    }

    async fn list_keys(
        &self,
        filter: &KeyFilter,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<VaultKey>> {
        timed("list_keys", self.0.list_keys(filter, now)).await
    }

    async fn keys_by_id(&self, ids: &[String]) -> StoreResult<Vec<VaultKey>> {
        timed("keys_by_id", self.0.keys_by_id(ids)).await
    }

    async fn run_keys(&self, labels: &[String]) -> StoreResult<Vec<VaultKey>> {
        timed("run_keys", self.0.run_keys(labels)).await
    }

    async fn revoke_key(&self, id: &str, now: DateTime<Utc>) -> StoreResult<RevokedKey> {
        timed("revoke_key", self.0.revoke_key(id, now)).await
    }

    async fn revoke_run(
        &self,
        agent_run_label: &str,
        vendors: Option<&[String]>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<String>> {
        timed(
            "revoke_run",
            self.0.revoke_run(agent_run_label, vendors, now),
        )
        .await
    }

    async fn roll_key(
        &self,
        id: &str,
        successor: &VaultKey,
        retire_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<VaultKey> {
        timed("roll_key", self.0.roll_key(id, successor, retire_at, now)).await
    }

    async fn enforce_key(&self, id: &str, terms: &EnforcedTerms) -> StoreResult<VaultKey> {
        timed("enforce_key", self.0.enforce_key(id, terms)).await
    }

    async fn due_retirements(&self, now: DateTime<Utc>, limit: u32) -> StoreResult<Vec<String>> {
        timed("due_retirements", self.0.due_retirements(now, limit)).await
    }

    async fn key_spend(&self, id: &str, day: &str) -> StoreResult<KeySpend> {
        timed("key_spend", self.0.key_spend(id, day)).await
    }

    async fn budgets_spent_on(
        &self,
        budget_ids: &[String],
        day: &str,
    ) -> StoreResult<Vec<(String, keycap_proto::Micros)>> {
        timed("budgets_spent_on", self.0.budgets_spent_on(budget_ids, day)).await
    }

    async fn budget_levels(
        &self,
        key_id: &str,
        day: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<BudgetLevel>> {
        timed("budget_levels", self.0.budget_levels(key_id, day, now)).await
    }

    async fn latest_version(&self) -> StoreResult<i64> {
        timed("latest_version", self.0.latest_version()).await
    }

    async fn changes_since(&self, after: i64, limit: u32) -> StoreResult<Vec<Change>> {
        timed("changes_since", self.0.changes_since(after, limit)).await
    }

    async fn prune_changes(&self, through: i64) -> StoreResult<u64> {
        timed("prune_changes", self.0.prune_changes(through)).await
    }

    async fn oldest_version(&self) -> StoreResult<i64> {
        timed("oldest_version", self.0.oldest_version()).await
    }

    async fn policy_keys(&self, expired_after: DateTime<Utc>) -> StoreResult<Vec<VaultKey>> {
        timed("policy_keys", self.0.policy_keys(expired_after)).await
    }

    async fn register_fleet_node(
        &self,
        node: &str,
        replica: &str,
        stream: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        timed(
            "register_fleet_node",
            self.0.register_fleet_node(node, replica, stream, now),
        )
        .await
    }

    async fn unregister_fleet_node(&self, node: &str, stream: &str) -> StoreResult<()> {
        timed(
            "unregister_fleet_node",
            self.0.unregister_fleet_node(node, stream),
        )
        .await
    }

    async fn ack_policy(&self, node: &str, version: i64) -> StoreResult<bool> {
        timed("ack_policy", self.0.ack_policy(node, version)).await
    }

    async fn heartbeat_fleet_nodes(
        &self,
        replica: &str,
        now: DateTime<Utc>,
        forget_before: DateTime<Utc>,
    ) -> StoreResult<()> {
        timed(
            "heartbeat_fleet_nodes",
            self.0.heartbeat_fleet_nodes(replica, now, forget_before),
        )
        .await
    }

    async fn fleet_nodes(&self) -> StoreResult<Vec<FleetNode>> {
        timed("fleet_nodes", self.0.fleet_nodes()).await
    }

    async fn report_vendor_errors(
        &self,
        node: &str,
        errors: &[(String, String)],
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        timed(
            "report_vendor_errors",
            self.0.report_vendor_errors(node, errors, at),
        )
        .await
    }

    async fn vendor_load_errors(&self, vendor: Option<&str>) -> StoreResult<Vec<VendorLoadError>> {
        timed("vendor_load_errors", self.0.vendor_load_errors(vendor)).await
    }

    async fn grant_lease(
        &self,
        req: &LeaseGrantRequest,
        now: DateTime<Utc>,
    ) -> StoreResult<LeaseGrant> {
        timed("grant_lease", self.0.grant_lease(req, now)).await
    }

    async fn return_lease(
        &self,
        lease_id: &str,
        node: Option<&str>,
        spent: keycap_proto::Micros,
    ) -> StoreResult<()> {
        timed("return_lease", self.0.return_lease(lease_id, node, spent)).await
    }

    async fn shrink_lease(
        &self,
        lease_id: &str,
        node: Option<&str>,
        from: keycap_proto::Micros,
        to: keycap_proto::Micros,
    ) -> StoreResult<bool> {
        timed(
            "shrink_lease",
            self.0.shrink_lease(lease_id, node, from, to),
        )
        .await
    }

    async fn lease_holders(
        &self,
        key_ids: &[String],
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<String>> {
        timed("lease_holders", self.0.lease_holders(key_ids, now)).await
    }

    async fn node_leases(
        &self,
        node: &str,
        counted_after: DateTime<Utc>,
    ) -> StoreResult<Vec<NodeLease>> {
        timed("node_leases", self.0.node_leases(node, counted_after)).await
    }

    async fn fence_leases(
        &self,
        node_ids: &[String],
        key_ids: &[String],
        now: DateTime<Utc>,
    ) -> StoreResult<keycap_proto::Micros> {
        timed("fence_leases", self.0.fence_leases(node_ids, key_ids, now)).await
    }

    async fn apply_spend(&self, events: &[SpendEvent]) -> StoreResult<Vec<bool>> {
        timed("apply_spend", self.0.apply_spend(events)).await
    }

    async fn outstanding_leases(
        &self,
        now: DateTime<Utc>,
    ) -> StoreResult<(i64, keycap_proto::Micros)> {
        timed("outstanding_leases", self.0.outstanding_leases(now)).await
    }

    async fn query_audit(&self, q: &AuditQuery) -> StoreResult<Vec<AuditEntry>> {
        timed("query_audit", self.0.query_audit(q)).await
    }

    async fn audit_chain(
        &self,
        after_seq: i64,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        limit: u32,
    ) -> StoreResult<Vec<AuditEntry>> {
        timed(
            "audit_chain",
            self.0.audit_chain(after_seq, since, until, limit),
        )
        .await
    }

    async fn ledger_head(&self) -> StoreResult<(i64, [u8; 32])> {
        timed("ledger_head", self.0.ledger_head()).await
    }

    async fn insert_checkpoint(&self, cp: &Checkpoint) -> StoreResult<bool> {
        timed("insert_checkpoint", self.0.insert_checkpoint(cp)).await
    }

    async fn checkpoints(
        &self,
        signed_by: Option<&[[u8; 32]]>,
        limit: u32,
    ) -> StoreResult<Vec<Checkpoint>> {
        timed("checkpoints", self.0.checkpoints(signed_by, limit)).await
    }

    async fn ledger_signing_keys(&self) -> StoreResult<Vec<(String, Vec<u8>, Vec<u8>)>> {
        timed("ledger_signing_keys", self.0.ledger_signing_keys()).await
    }

    async fn insert_ledger_signing_key(
        &self,
        id: &str,
        public_key: &[u8],
        sealed_private: &[u8],
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        timed(
            "insert_ledger_signing_key",
            self.0
                .insert_ledger_signing_key(id, public_key, sealed_private, at),
        )
        .await
    }

    async fn spend_summary(&self, agent_run_label: &str) -> StoreResult<SpendSummary> {
        timed("spend_summary", self.0.spend_summary(agent_run_label)).await
    }

    async fn spend_report(&self, q: &SpendReportQuery) -> StoreResult<SpendReport> {
        timed("spend_report", self.0.spend_report(q)).await
    }

    async fn ensure_audit_partitions(&self) -> StoreResult<()> {
        timed("ensure_audit_partitions", self.0.ensure_audit_partitions()).await
    }

    async fn drop_audit_partitions(
        &self,
        before: chrono::NaiveDate,
        covered: i64,
    ) -> StoreResult<Vec<String>> {
        timed(
            "drop_audit_partitions",
            self.0.drop_audit_partitions(before, covered),
        )
        .await
    }

    async fn record_export(&self, through_seq: i64) -> StoreResult<()> {
        timed("record_export", self.0.record_export(through_seq)).await
    }

    async fn ledger_retention(&self) -> StoreResult<Retention> {
        timed("ledger_retention", self.0.ledger_retention()).await
    }

    async fn insert_webhook_endpoint(
        &self,
        endpoint: &WebhookEndpoint,
        sealed_secret: &[u8],
    ) -> StoreResult<()> {
        timed(
            "insert_webhook_endpoint",
            self.0.insert_webhook_endpoint(endpoint, sealed_secret),
        )
        .await
    }

    async fn list_webhook_endpoints(&self) -> StoreResult<Vec<WebhookEndpoint>> {
        timed("list_webhook_endpoints", self.0.list_webhook_endpoints()).await
    }

    async fn get_webhook_endpoint(&self, id: &str) -> StoreResult<Option<WebhookEndpoint>> {
        timed("get_webhook_endpoint", self.0.get_webhook_endpoint(id)).await
    }

    async fn delete_webhook_endpoint(&self, id: &str) -> StoreResult<()> {
        timed(
            "delete_webhook_endpoint",
            self.0.delete_webhook_endpoint(id),
        )
        .await
    }

    async fn enqueue_webhook_event(
        &self,
        event: &WebhookEvent,
        dedupe: Option<&str>,
        endpoint_ids: &[String],
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        timed(
            "enqueue_webhook_event",
            self.0
                .enqueue_webhook_event(event, dedupe, endpoint_ids, now),
        )
        .await
    }

    async fn claim_webhook_deliveries(
        &self,
        worker: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<ClaimedDelivery>> {
        timed(
            "claim_webhook_deliveries",
            self.0
                .claim_webhook_deliveries(worker, now, lease_until, limit),
        )
        .await
    }

    async fn finish_webhook_attempt(
        &self,
        seq: i64,
        worker: &str,
        attempt: &Attempt,
        outcome: AttemptOutcome,
    ) -> StoreResult<bool> {
        timed(
            "finish_webhook_attempt",
            self.0.finish_webhook_attempt(seq, worker, attempt, outcome),
        )
        .await
    }

    async fn webhook_deliveries(
        &self,
        endpoint_id: &str,
        limit: u32,
    ) -> StoreResult<Vec<Delivery>> {
        timed(
            "webhook_deliveries",
            self.0.webhook_deliveries(endpoint_id, limit),
        )
        .await
    }

    async fn refusal_counts(
        &self,
        q: &super::RefusalCountQuery,
    ) -> StoreResult<Vec<super::RefusalCount>> {
        timed("refusal_counts", self.0.refusal_counts(q)).await
    }

    async fn lineage_spend(
        &self,
        key_ids: &[String],
        day: &str,
    ) -> StoreResult<Vec<super::LineageSpend>> {
        timed("lineage_spend", self.0.lineage_spend(key_ids, day)).await
    }

    async fn insert_approval(&self, approval: &Approval) -> StoreResult<()> {
        timed("insert_approval", self.0.insert_approval(approval)).await
    }

    async fn get_approval(&self, id: &str) -> StoreResult<Option<Approval>> {
        timed("get_approval", self.0.get_approval(id)).await
    }

    async fn list_approvals(
        &self,
        filter: &ApprovalFilter,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<Approval>> {
        timed("list_approvals", self.0.list_approvals(filter, now)).await
    }

    async fn decide_approval(
        &self,
        id: &str,
        approved: bool,
        by: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        timed(
            "decide_approval",
            self.0.decide_approval(id, approved, by, reason, now),
        )
        .await
    }

    async fn insert_hook(&self, hook: &StoredHook) -> StoreResult<()> {
        timed("insert_hook", self.0.insert_hook(hook)).await
    }

    async fn list_hooks(&self) -> StoreResult<Vec<StoredHook>> {
        timed("list_hooks", self.0.list_hooks()).await
    }

    async fn get_hook(&self, id: &str) -> StoreResult<Option<StoredHook>> {
        timed("get_hook", self.0.get_hook(id)).await
    }

    async fn set_hook_secrets(&self, id: &str, sealed_secrets: &[u8]) -> StoreResult<()> {
        timed(
            "set_hook_secrets",
            self.0.set_hook_secrets(id, sealed_secrets),
        )
        .await
    }

    async fn rewrap_hook_secrets(
        &self,
        id: &str,
        old: (&[u8], &[u8]),
        new: (&[u8], &[u8]),
    ) -> StoreResult<bool> {
        timed(
            "rewrap_hook_secrets",
            self.0.rewrap_hook_secrets(id, old, new),
        )
        .await
    }

    async fn delete_hook(&self, id: &str) -> StoreResult<()> {
        timed("delete_hook", self.0.delete_hook(id)).await
    }

    async fn claim_hook_event(
        &self,
        hook_id: &str,
        event_id: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> StoreResult<bool> {
        timed(
            "claim_hook_event",
            self.0.claim_hook_event(hook_id, event_id, now, until),
        )
        .await
    }

    async fn consume_approval(
        &self,
        id: &str,
        key_id: &str,
        fingerprint: &[u8; 32],
        amount: keycap_proto::Micros,
        event_id: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        timed(
            "consume_approval",
            self.0
                .consume_approval(id, key_id, fingerprint, amount, event_id, now),
        )
        .await
    }

    async fn settle_hook_event(
        &self,
        hook_id: &str,
        event_id: &str,
        keep_until: Option<DateTime<Utc>>,
    ) -> StoreResult<()> {
        timed(
            "settle_hook_event",
            self.0.settle_hook_event(hook_id, event_id, keep_until),
        )
        .await
    }
}
