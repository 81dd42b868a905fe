//! Stripe's API, operation by operation: the table every Stripe write is
//! routed by.
//!
//! Owns `operations.tsv` (every POST and DELETE of Stripe's published v1
//! API, derived from stripe-python by `scripts/stripe-operations`, with
//! keycap's classification), its parsing, matching a request path to one
//! operation, and the parameter checks that follow from it: a request may
//! carry only the parameters its operation has, and no money parameter its
//! classification does not handle.
//!
//! It must never let a write through that the table does not classify: a
//! path no operation matches, an operation marked `unclassified`, and
//! anything under `/v2/` are refused. A money parameter (`MONEY_PARAMS`) on
//! an operation that is not priced by a rule that reads it must be guarded
//! or listed in `HARMLESS` with the reason; the tests below hold the table
//! to that.

use std::collections::{BTreeSet, HashMap};
use std::sync::LazyLock;

use super::{clip, unreadable, Params, PricingError};

/// The table, as checked in.
const TABLE: &str = include_str!("operations.tsv");

/// Parameters that can make Stripe move money when a write carries them,
/// and how. An operation that carries one must handle it: its pricing rule
/// reads it, its guard refuses it (or its dangerous values), or `HARMLESS`
/// says why it moves nothing there.
pub(super) const MONEY_PARAMS: &[(&str, &str)] = &[
    ("amount", "it states an amount to charge, to add to an invoice or to move"),
    ("amount_to_capture", "it takes money from an authorization"),
    ("amount_to_confirm", "it confirms an amount other than the one keycap read"),
    ("auto_advance", "Stripe finalizes an auto-advancing invoice and charges it on its own, out of keycap's sight"),
    ("automatically_finalizes_at", "Stripe finalizes the invoice at that time and charges it on its own"),
    ("balance", "a customer's balance is added to their next invoice, which Stripe may charge on its own"),
    ("billing_cycle_anchor", "resetting a billing cycle invoices and charges at once"),
    ("capture", "it captures a charge"),
    ("collection_method", "charge_automatically makes Stripe charge the invoice on its own"),
    ("confirm", "it confirms a payment"),
    ("invoice_now", "it invoices and charges at once"),
    ("off_session", "it charges a saved payment method without the customer present"),
    ("pay", "it pays"),
    ("payment_behavior", "it attempts a payment"),
    ("proration_behavior", "always_invoice invoices and charges prorations at once"),
    ("prorate", "it adds proration items to an invoice Stripe may charge on its own"),
    ("subscription", "it ties the object to a subscription, which charges every period"),
    ("trial_end", "ending a trial now invoices and charges at once"),
];

/// Money parameters an operation carries that move nothing there:
/// (method, path, parameter, why).
pub(super) const HARMLESS: &[(&str, &str, &str, &str)] = &[
    (
        "POST",
        "/v1/charges/{charge}/capture",
        "amount",
        "a capture takes at most what the charge authorized, counted when the charge was made",
    ),
    (
        "POST",
        "/v1/payment_intents/{intent}/capture",
        "amount_to_capture",
        "a capture takes at most what the confirmation authorized, counted then",
    ),
    (
        "POST",
        "/v1/refunds",
        "amount",
        "a refund returns money counted when it was charged; keycap never counts it as spend",
    ),
    (
        "POST",
        "/v1/setup_intents",
        "confirm",
        "confirming a SetupIntent saves a payment method; it never charges",
    ),
    (
        "POST",
        "/v1/invoices/create_preview",
        "subscription",
        "a preview creates nothing",
    ),
];

/// How a priced operation is priced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PricedRule {
    /// `amount` and `currency` of a charge.
    Charge,
    /// `amount` and `currency` of a new PaymentIntent, settled by status.
    PaymentIntent,
    /// The amount of the intent read from Stripe.
    PaymentIntentConfirm,
    /// What the invoice read from Stripe has left to pay.
    InvoicePay,
    /// Line items, shipping and tax of a Checkout Session.
    CheckoutSession,
}

/// A check a free operation must pass before it is forwarded at 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FreeRule {
    /// An invoice is created only if Stripe will not charge it on its own.
    ManualInvoice,
    /// An invoice item only goes on a draft invoice Stripe will not charge
    /// on its own (read from Stripe first).
    ItemOnDraft,
    /// An invoice is finalized only with `auto_advance=false`, so Stripe
    /// never collects it on its own: it is paid through `/pay`, priced.
    ManualFinalize,
}

/// Why an operation is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    Subscription,
    LaterCharge,
    MovesMoney,
    NotPriced,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    Priced(PricedRule),
    Free(Option<FreeRule>),
    Refused(Refused),
    /// New in the spec and not looked at yet: refused.
    Unclassified,
}

impl PricedRule {
    const ALL: [(&'static str, PricedRule); 5] = [
        ("charge", PricedRule::Charge),
        ("payment_intent", PricedRule::PaymentIntent),
        ("payment_intent_confirm", PricedRule::PaymentIntentConfirm),
        ("invoice_pay", PricedRule::InvoicePay),
        ("checkout_session", PricedRule::CheckoutSession),
    ];

    /// The money parameters the rule reads (or whose effect it settles
    /// by: a payment intent is settled by the status its confirmation
    /// leaves it in).
    pub(super) fn handles(self) -> &'static [&'static str] {
        match self {
            PricedRule::Charge => &["amount", "capture"],
            PricedRule::PaymentIntent => &["amount", "confirm", "off_session"],
            PricedRule::PaymentIntentConfirm | PricedRule::InvoicePay => &["off_session"],
            PricedRule::CheckoutSession => &[],
        }
    }
}

impl FreeRule {
    const ALL: [(&'static str, FreeRule); 3] = [
        ("invoice_create", FreeRule::ManualInvoice),
        ("invoice_item", FreeRule::ItemOnDraft),
        ("invoice_finalize", FreeRule::ManualFinalize),
    ];

    pub(super) fn handles(self) -> &'static [&'static str] {
        match self {
            FreeRule::ManualInvoice => &["collection_method"],
            FreeRule::ItemOnDraft => &["amount"],
            FreeRule::ManualFinalize => &["auto_advance"],
        }
    }
}

impl Refused {
    const ALL: [(&'static str, Refused); 4] = [
        ("subscription", Refused::Subscription),
        ("later_charge", Refused::LaterCharge),
        ("moves_money", Refused::MovesMoney),
        ("not_priced", Refused::NotPriced),
    ];

    pub(super) fn message(self) -> &'static str {
        match self {
            Refused::Subscription => {
                "subscriptions charge again every period, out of keycap's sight; keycap refuses \
                 them (and their items, schedules, usage, discounts and quotes) by whatever path"
            }
            Refused::LaterCharge => {
                "this call lets Stripe charge later, out of keycap's sight (it finalizes or adds to \
                 an invoice Stripe may charge on its own, raises what a subscription charges, or \
                 makes a payment page anyone can pay); pay invoices with POST \
                 /v1/invoices/{id}/pay, which keycap prices"
            }
            Refused::MovesMoney => {
                "this call moves money keycap does not price (transfers, payouts, top-ups, \
                 issuing, treasury, terminal payments, disputes, credit notes, ...)"
            }
            Refused::NotPriced => {
                "keycap does not price this Stripe call (it prices charges, payment intents, \
                 invoice payments and checkout sessions, and lets through writes that move no money)"
            }
        }
    }
}

fn named<T: Copy>(all: &[(&str, T)], name: &str) -> Option<T> {
    all.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// A money parameter an operation refuses: always, or unless it has one
/// of `allowed` values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Guard {
    pub name: &'static str,
    pub allowed: Vec<&'static str>,
}

/// One row of the table.
#[derive(Debug, Clone)]
pub(super) struct Operation {
    pub method: &'static str,
    pub path: &'static str,
    pub legacy: bool,
    pub class: Class,
    pub guard: Vec<Guard>,
    pub params: BTreeSet<&'static str>,
    /// The path's segments after the leading '/', `None` for a `{name}`.
    segments: Vec<Option<&'static str>>,
}

/// The parsed table and the version of Stripe's API it describes.
pub(super) struct Table {
    pub api_version: &'static str,
    pub operations: Vec<Operation>,
    /// Rows by method and resource (the segment after `/v1/`), so a request
    /// is matched against a handful of templates, not all of them.
    by_resource: HashMap<(&'static str, &'static str), Vec<usize>>,
}

fn list(text: &'static str) -> impl Iterator<Item = &'static str> {
    text.split(',').filter(|s| !s.is_empty() && *s != "-")
}

fn parse_row(line: &'static str) -> Result<Operation, String> {
    let cols: Vec<&'static str> = line.split('\t').collect();
    let [method, path, source, class, rule, guard, params] = cols[..] else {
        return Err(format!("{line:?}: expected 7 tab-separated columns"));
    };
    if !matches!(method, "POST" | "DELETE") || !path.starts_with("/v1/") {
        return Err(format!("{method} {path}: only POST and DELETE under /v1/"));
    }
    let legacy = match source {
        "spec" => false,
        "legacy" => true,
        other => return Err(format!("{method} {path}: unknown source {other:?}")),
    };
    let unknown = |what: &str| format!("{method} {path}: unknown {what} {rule:?}");
    let class = match class {
        "priced" => Class::Priced(named(&PricedRule::ALL, rule).ok_or_else(|| unknown("rule"))?),
        "free" if rule == "-" => Class::Free(None),
        "free" => Class::Free(Some(
            named(&FreeRule::ALL, rule).ok_or_else(|| unknown("check"))?,
        )),
        "refused" => Class::Refused(named(&Refused::ALL, rule).ok_or_else(|| unknown("reason"))?),
        "unclassified" => Class::Unclassified,
        other => return Err(format!("{method} {path}: unknown class {other:?}")),
    };
    let guard = list(guard)
        .map(|g| match g.split_once('=') {
            None => Guard {
                name: g,
                allowed: Vec::new(),
            },
            Some((name, values)) => Guard {
                name,
                allowed: values.split('|').collect(),
            },
        })
        .collect();
    let segments = path[1..]
        .split('/')
        .map(|s| (!(s.starts_with('{') && s.ends_with('}'))).then_some(s))
        .collect();
    Ok(Operation {
        method,
        path,
        legacy,
        class,
        guard,
        params: list(params).collect(),
        segments,
    })
}

fn parse(text: &'static str) -> Result<Table, String> {
    let mut api_version = None;
    let mut operations = Vec::new();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("# api_version: ") {
            api_version = Some(v.trim());
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        operations.push(parse_row(line)?);
    }
    let mut by_resource: HashMap<_, Vec<usize>> = HashMap::new();
    for (i, op) in operations.iter().enumerate() {
        let Some(Some(resource)) = op.segments.get(1) else {
            return Err(format!(
                "{} {}: the segment after /v1/ must be a resource name",
                op.method, op.path
            ));
        };
        by_resource
            .entry((op.method, *resource))
            .or_default()
            .push(i);
    }
    Ok(Table {
        api_version: api_version.ok_or("the table does not name its api_version")?,
        operations,
        by_resource,
    })
}

static PARSED: LazyLock<Result<Table, String>> = LazyLock::new(|| parse(TABLE));

/// The table, or why it could not be read (a build that ships a broken
/// table refuses to load a Stripe vendor rather than guess).
pub(super) fn table() -> Result<&'static Table, PricingError> {
    PARSED
        .as_ref()
        .map_err(|e| PricingError::Config(format!("Stripe operation table: {e}")))
}

/// The names of every guarded parameter: parameters pricing must read.
pub(super) static GUARDED: LazyLock<BTreeSet<&'static str>> = LazyLock::new(|| {
    table()
        .map(|t| {
            t.operations
                .iter()
                .flat_map(|op| op.guard.iter().map(|g| g.name))
                .collect()
        })
        .unwrap_or_default()
});

impl Table {
    /// The operation a request is, by method and path. Where two templates
    /// match (`/v1/invoices/create_preview` and `/v1/invoices/{invoice}`),
    /// the one with a literal segment where the other has a parameter,
    /// first from the left, wins.
    pub(super) fn find(&self, method: &str, path: &str) -> Option<&Operation> {
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let rows = self.by_resource.get(&(method, *segs.get(1)?))?;
        let mut best: Option<(&Operation, Vec<bool>)> = None;
        for op in rows.iter().map(|&i| &self.operations[i]) {
            if op.segments.len() != segs.len() {
                continue;
            }
            let fits = op.segments.iter().zip(&segs).all(|(t, s)| match t {
                Some(lit) => lit == s,
                None => !s.is_empty(),
            });
            if !fits {
                continue;
            }
            let literal: Vec<bool> = op.segments.iter().map(Option::is_some).collect();
            if best.as_ref().is_none_or(|(_, b)| literal > *b) {
                best = Some((op, literal));
            }
        }
        best.map(|(op, _)| op)
    }
}

impl Operation {
    /// Whether a money parameter of this operation is guarded, read by its
    /// rule, or harmless here.
    pub(super) fn handles(&self, param: &str) -> bool {
        let by_rule = match self.class {
            Class::Priced(r) => r.handles().contains(&param),
            Class::Free(Some(r)) => r.handles().contains(&param),
            _ => false,
        };
        by_rule
            || self.guard.iter().any(|g| g.name == param)
            || HARMLESS
                .iter()
                .any(|(m, p, name, _)| *m == self.method && *p == self.path && *name == param)
    }

    /// Refuses parameters the operation does not have, and guarded money
    /// parameters with a value that could move money.
    pub(super) fn check(&self, p: &Params, api_version: &str) -> Result<(), PricingError> {
        if let Some(name) = p.names().find(|n| !self.params.contains(n.as_str())) {
            return Err(unreadable(format!(
                "{} {} has no parameter {:?} in Stripe's API version {api_version}; keycap refuses \
                 parameters it does not know, since another API version could give them a meaning \
                 keycap does not price",
                self.method,
                self.path,
                clip(name)
            )));
        }
        // The table's tests keep this from happening; a row edited by hand
        // that would let an unhandled money parameter through is refused.
        if let Some((name, why)) = MONEY_PARAMS
            .iter()
            .find(|(name, _)| p.has(name) && !self.handles(name))
        {
            return Err(unreadable(format!(
                "{} {} with {name} is refused: {why}",
                self.method, self.path
            )));
        }
        for g in &self.guard {
            if !p.has(g.name) {
                continue;
            }
            let value = p.get(g.name);
            if value.is_some_and(|v| g.allowed.contains(&v)) {
                continue;
            }
            let why = MONEY_PARAMS
                .iter()
                .find(|(n, _)| *n == g.name)
                .map_or("it changes an amount keycap reads elsewhere", |(_, why)| {
                    why
                });
            let unless = if g.allowed.is_empty() {
                String::new()
            } else {
                format!(" (allowed: {})", g.allowed.join(", "))
            };
            return Err(unreadable(format!(
                "{} {} with {}{unless} is refused: {why}",
                self.method, self.path, g.name
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops() -> &'static [Operation] {
        &table().expect("the table parses").operations
    }

    #[test]
    fn the_table_names_its_api_version_and_every_operation_once() {
        let t = table().unwrap();
        assert_eq!(t.api_version, "2026-10-28.endive");
        assert!(ops().len() > 300, "{}", ops().len());
        let mut seen = BTreeSet::new();
        for op in ops() {
            assert!(
                seen.insert((op.method, op.path)),
                "{} {} twice",
                op.method,
                op.path
            );
        }
    }

    #[test]
    fn every_operation_is_classified() {
        let open: Vec<String> = ops()
            .iter()
            .filter(|op| op.class == Class::Unclassified)
            .map(|op| format!("{} {}", op.method, op.path))
            .collect();
        assert!(
            open.is_empty(),
            "classify these in operations.tsv (priced, free or refused): {open:?}"
        );
    }

    #[test]
    fn no_operation_forwarded_carries_an_unhandled_money_parameter() {
        let mut unhandled = Vec::new();
        for op in ops() {
            if matches!(op.class, Class::Refused(_) | Class::Unclassified) {
                continue;
            }
            for (name, _) in MONEY_PARAMS {
                if op.params.contains(name) && !op.handles(name) {
                    unhandled.push(format!("{} {} {name}", op.method, op.path));
                }
            }
        }
        assert!(
            unhandled.is_empty(),
            "money parameters on operations keycap forwards must be guarded, read by the \
             operation's rule, or listed in HARMLESS with the reason: {unhandled:?}"
        );
    }

    #[test]
    fn guards_and_exemptions_name_parameters_the_operation_has() {
        for op in ops() {
            for g in &op.guard {
                assert!(
                    op.params.contains(g.name),
                    "{} {} guards {} it does not have",
                    op.method,
                    op.path,
                    g.name
                );
            }
        }
        for (m, p, name, _) in HARMLESS {
            let op = ops()
                .iter()
                .find(|op| op.method == *m && op.path == *p)
                .unwrap_or_else(|| panic!("HARMLESS names {m} {p}, not in the table"));
            assert!(op.params.contains(name), "{m} {p} has no {name}");
            assert!(
                MONEY_PARAMS.iter().any(|(n, _)| n == name),
                "{name} is not a money parameter"
            );
            assert!(!matches!(op.class, Class::Refused(_)), "{m} {p} is refused");
        }
    }

    #[test]
    fn every_template_finds_its_own_row() {
        let t = table().unwrap();
        for op in ops() {
            let path = op
                .segments
                .iter()
                .map(|s| s.unwrap_or("x_1"))
                .collect::<Vec<_>>()
                .join("/");
            let found = t.find(op.method, &format!("/{path}")).unwrap();
            assert_eq!((found.method, found.path), (op.method, op.path));
        }
    }

    #[test]
    fn literal_segments_win_over_parameters() {
        let t = table().unwrap();
        let op = t.find("POST", "/v1/invoices/create_preview").unwrap();
        assert_eq!(op.path, "/v1/invoices/create_preview");
        let op = t.find("POST", "/v1/invoices/in_123").unwrap();
        assert_eq!(op.path, "/v1/invoices/{invoice}");
        assert!(t.find("POST", "/v1/charges/").is_none());
        assert!(t.find("POST", "/v2/core/events").is_none());
        assert!(t.find("PUT", "/v1/charges").is_none());
    }

    #[test]
    fn subscriptions_are_refused_by_every_path_that_reaches_them() {
        let t = table().unwrap();
        for (m, path) in [
            ("POST", "/v1/subscriptions"),
            ("POST", "/v1/subscriptions/sub_1"),
            ("DELETE", "/v1/subscriptions/sub_1"),
            ("DELETE", "/v1/subscriptions/sub_1/discount"),
            ("POST", "/v1/subscription_items"),
            ("DELETE", "/v1/subscription_items/si_1"),
            ("POST", "/v1/subscription_schedules"),
            ("POST", "/v1/customers/cus_1/subscriptions"),
            ("POST", "/v1/customers/cus_1/subscriptions/sub_1"),
            ("DELETE", "/v1/customers/cus_1/subscriptions/sub_1"),
            ("DELETE", "/v1/customers/cus_1/subscriptions/sub_1/discount"),
            ("POST", "/v1/subscription_items/si_1/usage_records"),
        ] {
            let op = t.find(m, path).unwrap_or_else(|| panic!("{m} {path}"));
            assert_eq!(
                op.class,
                Class::Refused(Refused::Subscription),
                "{m} {path}"
            );
        }
    }
}
