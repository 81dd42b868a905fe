//! What an admin token may do: scopes, the vendors it is restricted to, and
//! the one table (`required`) that says which scopes each admin operation
//! needs.
//!
//! Both front ends name the `Operation` they serve and `Control::authorize`
//! checks it against this table, so gRPC and REST can never disagree about
//! what a scope allows. Nothing here grants access to the proxy: admin tokens
//! are never vault keys, and no scope skips a key's budget.

use std::collections::BTreeSet;
use std::fmt;

use crate::domain::{invalid, InvalidInput, VendorName};
use crate::error::ApiError;

/// One permission an admin token can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    VendorsRead,
    VendorsWrite,
    /// Setting or replacing a vendor's real credential.
    CredentialsWrite,
    KeysRead,
    KeysIssue,
    KeysRevoke,
    /// Audit entries and spend summaries.
    AuditRead,
    /// Reserved for fleet-level admin calls; no admin call needs it yet
    /// (proxies use the fleet token, never an admin token).
    FleetRead,
    /// Reserved, like `FleetRead`.
    FleetWrite,
    TokensRead,
    /// Creating and revoking admin tokens.
    TokensWrite,
    /// Alert webhook endpoints and their deliveries (events about every
    /// vendor's keys, so a vendor-restricted token cannot hold them).
    WebhooksRead,
    /// Registering, deleting and testing alert webhook endpoints.
    WebhooksWrite,
    /// Approving or denying a call held for approval (docs/approvals.md).
    /// Reading approvals needs `keys:read`.
    ApprovalsDecide,
    /// Every scope, including ones added later.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 15] = [
        Scope::VendorsRead,
        Scope::VendorsWrite,
        Scope::CredentialsWrite,
        Scope::KeysRead,
        Scope::KeysIssue,
        Scope::KeysRevoke,
        Scope::AuditRead,
        Scope::FleetRead,
        Scope::FleetWrite,
        Scope::TokensRead,
        Scope::TokensWrite,
        Scope::WebhooksRead,
        Scope::WebhooksWrite,
        Scope::ApprovalsDecide,
        Scope::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::VendorsRead => "vendors:read",
            Scope::VendorsWrite => "vendors:write",
            Scope::CredentialsWrite => "credentials:write",
            Scope::KeysRead => "keys:read",
            Scope::KeysIssue => "keys:issue",
            Scope::KeysRevoke => "keys:revoke",
            Scope::AuditRead => "audit:read",
            Scope::FleetRead => "fleet:read",
            Scope::FleetWrite => "fleet:write",
            Scope::TokensRead => "tokens:read",
            Scope::TokensWrite => "tokens:write",
            Scope::WebhooksRead => "webhooks:read",
            Scope::WebhooksWrite => "webhooks:write",
            Scope::ApprovalsDecide => "approvals:decide",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|c| c.as_str() == s)
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of scopes. Holding `admin` means holding every scope.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Scopes(u16);

impl Scopes {
    pub const ADMIN: Scopes = Scopes(1 << (Scope::Admin as u16));

    /// Parses scope names; at least one, each a known name.
    pub fn parse_list<S: AsRef<str>>(names: &[S]) -> Result<Scopes, InvalidInput> {
        if names.is_empty() {
            return Err(invalid(
                "scopes",
                format!(
                    "at least one scope is required, e.g. \"keys:issue\"; known scopes: {}",
                    known()
                ),
            ));
        }
        let mut set = Scopes::default();
        for n in names {
            let n = n.as_ref().trim();
            let scope = Scope::parse(n).ok_or_else(|| {
                invalid(
                    "scopes",
                    format!("unknown scope {n:?}; known scopes: {}", known()),
                )
            })?;
            set = set.with(scope);
        }
        Ok(set)
    }

    pub fn with(self, s: Scope) -> Scopes {
        Scopes(self.0 | s.bit())
    }

    pub fn is_admin(self) -> bool {
        self.0 & Scope::Admin.bit() != 0
    }

    pub fn has(self, s: Scope) -> bool {
        self.is_admin() || self.0 & s.bit() != 0
    }

    /// The first scope of `wanted` this set does not hold.
    pub fn first_missing(self, wanted: Scopes) -> Option<Scope> {
        Scope::ALL
            .into_iter()
            .find(|&s| wanted.0 & s.bit() != 0 && !self.has(s))
    }

    /// Canonical names, in `Scope::ALL` order; just `["admin"]` when it
    /// holds `admin`.
    pub fn names(self) -> Vec<&'static str> {
        if self.is_admin() {
            return vec![Scope::Admin.as_str()];
        }
        Scope::ALL
            .into_iter()
            .filter(|&s| self.0 & s.bit() != 0)
            .map(Scope::as_str)
            .collect()
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.names()).finish()
    }
}

fn known() -> String {
    Scope::ALL.map(Scope::as_str).join(", ")
}

/// The vendors an admin token may act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VendorScope {
    All,
    /// Never empty.
    Only(BTreeSet<String>),
}

impl VendorScope {
    /// An empty list means every vendor; otherwise each entry must be a valid
    /// vendor name (the vendor need not exist yet).
    pub fn parse_list<S: AsRef<str>>(names: &[S]) -> Result<VendorScope, InvalidInput> {
        if names.is_empty() {
            return Ok(VendorScope::All);
        }
        if names.len() > 256 {
            return Err(invalid("vendors", "at most 256 vendors"));
        }
        let mut set = BTreeSet::new();
        for n in names {
            let name = VendorName::parse(n.as_ref().trim())
                .map_err(|e| invalid("vendors", format!("{:?}: {}", n.as_ref(), e.reason)))?;
            set.insert(name.as_str().to_string());
        }
        Ok(VendorScope::Only(set))
    }

    pub fn allows(&self, vendor: &str) -> bool {
        match self {
            VendorScope::All => true,
            VendorScope::Only(set) => set.contains(vendor),
        }
    }

    /// `None` when every vendor `other` allows is allowed here; otherwise a
    /// vendor it allows that this does not (`"*"` for "every vendor").
    pub fn first_uncovered(&self, other: &VendorScope) -> Option<String> {
        match (self, other) {
            (VendorScope::All, _) => None,
            (VendorScope::Only(_), VendorScope::All) => Some("*".to_string()),
            (VendorScope::Only(mine), VendorScope::Only(theirs)) => {
                theirs.difference(mine).next().cloned()
            }
        }
    }

    /// `VendorNotAllowed` naming `vendor` unless it is allowed.
    pub fn check(&self, vendor: &str) -> Result<(), ApiError> {
        if self.allows(vendor) {
            Ok(())
        } else {
            Err(ApiError::VendorNotAllowed(vendor.to_string()))
        }
    }

    /// `VendorNotAllowed` (`"*"`) unless every vendor is allowed: for
    /// operations that touch all vendors at once.
    pub fn check_all(&self) -> Result<(), ApiError> {
        match self {
            VendorScope::All => Ok(()),
            VendorScope::Only(_) => Err(ApiError::VendorNotAllowed("*".to_string())),
        }
    }

    /// The restriction as a list; `None` for every vendor.
    pub fn list(&self) -> Option<Vec<String>> {
        match self {
            VendorScope::All => None,
            VendorScope::Only(set) => Some(set.iter().cloned().collect()),
        }
    }
}

/// Every admin call there is. Both front ends map each of their calls (and
/// REST routes) to one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Put a vendor without touching its credential.
    PutVendor,
    /// Put a vendor and set or replace its credential, or change where a
    /// stored credential goes (base URL, profile) or what calls cost
    /// (prices, currency rates).
    PutVendorWithCredential,
    GetVendor,
    ListVendors,
    DeleteVendor,
    CreateKey,
    GetKey,
    ListKeys,
    RevokeKey,
    RevokeRun,
    QueryAudit,
    SpendSummary,
    /// Recompute the audit ledger's hash chain (every vendor's entries).
    VerifyAudit,
    /// Read the ledger's signed checkpoints.
    ListCheckpoints,
    CreateAdminToken,
    ListAdminTokens,
    RevokeAdminToken,
    /// Mint an issuer token for a key.
    CreateIssuerToken,
    ListIssuerTokens,
    RevokeIssuerToken,
    /// Re-wrap every vendor credential under the current master key.
    RotateKek,
    /// Replace a vendor's prices with a table converted from LiteLLM's
    /// price file: a price change, so it needs what one needs.
    ImportVendorPrices,
    CreateWebhook,
    ListWebhooks,
    DeleteWebhook,
    /// Send a test event to an endpoint.
    TestWebhook,
    /// An endpoint's deliveries and their attempts.
    ListWebhookDeliveries,
    /// Calls held for approval, and one of them.
    ListApprovals,
    GetApproval,
    /// Approve or deny a held call.
    DecideApproval,
    /// A dry run of a key's call: its price and what the proxy would
    /// decide, reserving nothing (a read of the key and its budget).
    Simulate,
    /// Register an inbound hook (it holds a vendor signing secret).
    CreateHook,
    ListHooks,
    DeleteHook,
    /// Add or remove an inbound hook's vendor signing secret.
    RollHookSecret,
    /// An enforcing policy suggested from a key's audit entries.
    SuggestPolicy,
    /// Add a credential version to a vendor without using it.
    StageCredential,
    /// A vendor's credential versions (never their material).
    ListCredentials,
    /// One authenticated read against the vendor with a version.
    ProbeCredential,
    /// Make a version the one proxies inject (or roll back to one).
    PromoteCredential,
    /// Mint a key's successor (same policy and budget) and revoke the key
    /// after a grace.
    RollKey,
    /// Switch a key in observe mode to enforcing, possibly with new caps
    /// and endpoints.
    EnforceKey,
}

impl Operation {
    pub const ALL: [Operation; 42] = [
        Operation::PutVendor,
        Operation::PutVendorWithCredential,
        Operation::GetVendor,
        Operation::ListVendors,
        Operation::DeleteVendor,
        Operation::CreateKey,
        Operation::GetKey,
        Operation::ListKeys,
        Operation::RevokeKey,
        Operation::RevokeRun,
        Operation::QueryAudit,
        Operation::SpendSummary,
        Operation::VerifyAudit,
        Operation::ListCheckpoints,
        Operation::CreateAdminToken,
        Operation::ListAdminTokens,
        Operation::RevokeAdminToken,
        Operation::CreateIssuerToken,
        Operation::ListIssuerTokens,
        Operation::RevokeIssuerToken,
        Operation::RotateKek,
        Operation::ImportVendorPrices,
        Operation::CreateWebhook,
        Operation::ListWebhooks,
        Operation::DeleteWebhook,
        Operation::TestWebhook,
        Operation::ListWebhookDeliveries,
        Operation::ListApprovals,
        Operation::GetApproval,
        Operation::DecideApproval,
        Operation::Simulate,
        Operation::CreateHook,
        Operation::ListHooks,
        Operation::DeleteHook,
        Operation::RollHookSecret,
        Operation::SuggestPolicy,
        Operation::StageCredential,
        Operation::ListCredentials,
        Operation::ProbeCredential,
        Operation::PromoteCredential,
        Operation::RollKey,
        Operation::EnforceKey,
    ];
}

/// The scope table: what each admin operation needs. A token must hold
/// every scope listed (or `admin`).
pub fn required(op: Operation) -> &'static [Scope] {
    use Operation as O;
    use Scope as S;
    match op {
        O::PutVendor => &[S::VendorsWrite],
        O::PutVendorWithCredential | O::ImportVendorPrices => {
            &[S::VendorsWrite, S::CredentialsWrite]
        }
        O::GetVendor | O::ListVendors => &[S::VendorsRead],
        O::DeleteVendor => &[S::VendorsWrite],
        // An issuer token mints keys, so making one is issuing.
        O::CreateKey | O::CreateIssuerToken => &[S::KeysIssue],
        O::ListIssuerTokens => &[S::KeysRead],
        O::RevokeIssuerToken => &[S::KeysRevoke],
        O::GetKey | O::ListKeys | O::Simulate => &[S::KeysRead],
        O::SuggestPolicy => &[S::KeysRead, S::AuditRead],
        O::RevokeKey | O::RevokeRun => &[S::KeysRevoke],
        // A roll issues a key and revokes one.
        O::RollKey => &[S::KeysIssue, S::KeysRevoke],
        // It sets the caps and endpoints the key spends under, as minting does.
        O::EnforceKey => &[S::KeysIssue],
        O::QueryAudit | O::SpendSummary | O::VerifyAudit | O::ListCheckpoints => &[S::AuditRead],
        O::CreateAdminToken | O::RevokeAdminToken => &[S::TokensWrite],
        O::ListAdminTokens => &[S::TokensRead],
        O::RotateKek => &[S::CredentialsWrite],
        O::CreateWebhook | O::DeleteWebhook | O::TestWebhook => &[S::WebhooksWrite],
        O::ListWebhooks | O::ListWebhookDeliveries => &[S::WebhooksRead],
        // An approval is one of a key's calls: reading it is reading keys.
        O::ListApprovals | O::GetApproval => &[S::KeysRead],
        O::DecideApproval => &[S::ApprovalsDecide],
        // An inbound hook holds a vendor's signing secret: a credential.
        O::CreateHook | O::RollHookSecret => &[S::WebhooksWrite, S::CredentialsWrite],
        O::DeleteHook => &[S::WebhooksWrite],
        O::ListHooks => &[S::WebhooksRead],
        O::StageCredential | O::PromoteCredential => &[S::VendorsWrite, S::CredentialsWrite],
        O::ListCredentials => &[S::VendorsRead],
        // A probe sends the credential to the vendor.
        O::ProbeCredential => &[S::CredentialsWrite],
    }
}

/// The first scope `op` needs that `held` lacks.
pub fn missing_for(held: Scopes, op: Operation) -> Option<Scope> {
    required(op).iter().copied().find(|&s| !held.has(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scopes(names: &[&str]) -> Scopes {
        Scopes::parse_list(names).unwrap()
    }

    #[test]
    fn every_operation_needs_a_scope_and_admin_grants_all() {
        for op in Operation::ALL {
            assert!(!required(op).is_empty(), "{op:?} needs nothing");
            assert_eq!(missing_for(Scopes::ADMIN, op), None, "{op:?}");
            assert_eq!(missing_for(Scopes::default(), op), Some(required(op)[0]));
            assert!(
                !required(op).contains(&Scope::Admin),
                "{op:?} should name the scope it needs, not admin"
            );
        }
    }

    #[test]
    fn the_table_maps_calls_to_their_scopes() {
        let cases: &[(Operation, &[&str], Option<Scope>)] = &[
            (Operation::CreateKey, &["keys:issue"], None),
            (
                Operation::CreateKey,
                &["keys:read", "keys:revoke"],
                Some(Scope::KeysIssue),
            ),
            (Operation::ListKeys, &["keys:issue"], Some(Scope::KeysRead)),
            (Operation::GetKey, &["keys:read"], None),
            (
                Operation::RevokeKey,
                &["keys:read"],
                Some(Scope::KeysRevoke),
            ),
            (Operation::RevokeRun, &["keys:revoke"], None),
            (Operation::RollKey, &["keys:issue"], Some(Scope::KeysRevoke)),
            (Operation::RollKey, &["keys:revoke"], Some(Scope::KeysIssue)),
            (Operation::RollKey, &["keys:issue", "keys:revoke"], None),
            (Operation::PutVendor, &["vendors:write"], None),
            (
                Operation::PutVendorWithCredential,
                &["vendors:write"],
                Some(Scope::CredentialsWrite),
            ),
            (
                Operation::PutVendorWithCredential,
                &["credentials:write"],
                Some(Scope::VendorsWrite),
            ),
            (
                Operation::PutVendorWithCredential,
                &["vendors:write", "credentials:write"],
                None,
            ),
            (
                Operation::ListVendors,
                &["vendors:write"],
                Some(Scope::VendorsRead),
            ),
            (
                Operation::DeleteVendor,
                &["vendors:read"],
                Some(Scope::VendorsWrite),
            ),
            (
                Operation::ImportVendorPrices,
                &["vendors:write"],
                Some(Scope::CredentialsWrite),
            ),
            (
                Operation::ImportVendorPrices,
                &["vendors:write", "credentials:write"],
                None,
            ),
            (Operation::SpendSummary, &["audit:read"], None),
            (
                Operation::QueryAudit,
                &["keys:read"],
                Some(Scope::AuditRead),
            ),
            (
                Operation::CreateAdminToken,
                &["tokens:read"],
                Some(Scope::TokensWrite),
            ),
            (
                Operation::ListAdminTokens,
                &["tokens:write"],
                Some(Scope::TokensRead),
            ),
            (Operation::RevokeAdminToken, &["tokens:write"], None),
            (
                Operation::CreateIssuerToken,
                &["keys:read", "tokens:write"],
                Some(Scope::KeysIssue),
            ),
            (Operation::CreateIssuerToken, &["keys:issue"], None),
            (Operation::ListIssuerTokens, &["keys:read"], None),
            (
                Operation::RevokeIssuerToken,
                &["keys:issue"],
                Some(Scope::KeysRevoke),
            ),
        ];
        for (op, held, missing) in cases {
            assert_eq!(
                missing_for(scopes(held), *op),
                *missing,
                "{op:?} with {held:?}"
            );
        }
    }

    #[test]
    fn names_parse_back_and_unknown_names_are_refused() {
        for s in Scope::ALL {
            assert_eq!(Scope::parse(s.as_str()), Some(s));
        }
        let set = scopes(&["keys:read", "audit:read", "keys:read"]);
        assert_eq!(set.names(), vec!["keys:read", "audit:read"]);
        assert_eq!(Scopes::parse_list(&set.names()).unwrap(), set);
        assert_eq!(scopes(&["admin", "keys:read"]).names(), vec!["admin"]);
        let err = Scopes::parse_list(&["keys:write"]).unwrap_err();
        assert_eq!(err.field, "scopes");
        assert!(err.reason.contains("keys:write") && err.reason.contains("keys:issue"));
        assert!(Scopes::parse_list::<&str>(&[]).is_err());
    }

    #[test]
    fn a_subset_is_within_and_a_superset_names_what_is_missing() {
        let mine = scopes(&["keys:issue", "keys:read", "tokens:write"]);
        assert_eq!(mine.first_missing(scopes(&["keys:read"])), None);
        assert_eq!(
            mine.first_missing(scopes(&["keys:read", "keys:revoke"])),
            Some(Scope::KeysRevoke)
        );
        assert_eq!(mine.first_missing(Scopes::ADMIN), Some(Scope::Admin));
        assert_eq!(Scopes::ADMIN.first_missing(mine), None);
    }

    #[test]
    fn vendor_restrictions_cover_only_their_vendors() {
        let ab = VendorScope::parse_list(&["a", "b"]).unwrap();
        let a = VendorScope::parse_list(&["a"]).unwrap();
        let ac = VendorScope::parse_list(&["a", "c"]).unwrap();
        assert_eq!(
            VendorScope::parse_list::<&str>(&[]).unwrap(),
            VendorScope::All
        );
        assert!(ab.allows("a") && ab.allows("b") && !ab.allows("c"));
        assert!(VendorScope::All.allows("anything"));
        assert_eq!(ab.first_uncovered(&a), None);
        assert_eq!(ab.first_uncovered(&ac), Some("c".to_string()));
        assert_eq!(ab.first_uncovered(&VendorScope::All), Some("*".to_string()));
        assert_eq!(VendorScope::All.first_uncovered(&ab), None);
        assert_eq!(
            VendorScope::parse_list(&["Bad Name"]).unwrap_err().field,
            "vendors"
        );
    }
}
