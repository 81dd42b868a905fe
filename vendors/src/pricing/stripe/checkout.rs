//! Checkout Sessions: what a customer can be charged through one.
//!
//! Owns the bound a `POST /v1/checkout/sessions` reserves: its line items
//! (unit amount times quantity, from `price_data` or from the Price read
//! from Stripe), the exclusive tax of each line item's tax rates (read from
//! Stripe), and the dearest of its shipping options (given inline or read
//! from Stripe), all in one currency.
//!
//! It must never reserve less than the customer can be asked to pay: what
//! it cannot bound from the request and the objects it names — automatic
//! tax, optional items, adjustable quantities, amounts in other currencies,
//! decimal unit amounts, prices that are not a fixed amount — is refused
//! with what to do instead, and subscription mode (charged every period) is
//! refused outright.

use serde_json::{json, Map, Value};

use super::super::{clip, free_quote, mul_div_ceil, Looked, PricingError, Quote};
use super::{
    currency_code, is_object_id, looked_object, object_int, parse_amount, unreadable, Params,
    StripeOp, StripePricing, MAX_LOOKUPS,
};

/// The lookup path of an object a session names by id (`/v1/prices/...`).
fn object_path(kind: &str, what: &str, id: &str) -> Result<String, PricingError> {
    if !is_object_id(id) {
        return Err(unreadable(format!(
            "{what} {:?} is not a Stripe id",
            clip(id)
        )));
    }
    Ok(format!("/v1/{kind}/{id}"))
}

/// `line_items[i][f]`, `shipping_options[j][f]`.
fn field(list: &str, i: &str, f: &str) -> String {
    format!("{list}[{i}][{f}]")
}

/// The objects a session names, to be read from Stripe before it is priced:
/// prices and tax rates of its line items, and its shipping rates.
pub(super) fn lookups(p: &Params) -> Result<Vec<String>, PricingError> {
    let mut paths: Vec<String> = Vec::new();
    let mut add = |path: String| {
        if !paths.contains(&path) {
            paths.push(path);
        }
    };
    for i in p.indices("line_items") {
        if let Some(price) = p.get(&field("line_items", &i, "price")) {
            add(object_path("prices", "line item price", price)?);
        }
        for rate in tax_rates(p, &i) {
            add(object_path("tax_rates", "tax rate", rate)?);
        }
    }
    for j in p.indices("shipping_options") {
        if let Some(rate) = p.get(&field("shipping_options", &j, "shipping_rate")) {
            add(object_path("shipping_rates", "shipping rate", rate)?);
        }
    }
    if paths.len() > MAX_LOOKUPS {
        return Err(unreadable(format!(
            "a checkout session may name at most {MAX_LOOKUPS} distinct prices, tax rates and \
             shipping rates"
        )));
    }
    Ok(paths)
}

/// The tax rate ids of line item `i` (`line_items[i][tax_rates][k]`).
fn tax_rates<'p>(p: &'p Params, i: &str) -> Vec<&'p str> {
    let list = format!("line_items[{i}][tax_rates]");
    p.indices(&list)
        .iter()
        .filter_map(|k| p.get(&format!("{list}[{k}]")))
        .collect()
}

/// A tax rate's percentage as an exact decimal `num / 10^scale`, read from
/// its shortest decimal text ("8.25").
fn percentage(rate: &Map<String, Value>) -> Option<(i128, u32)> {
    let text = match rate.get("percentage")? {
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    let (int, frac) = text.split_once('.').unwrap_or((&text, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || !(frac.is_empty() || digits(frac)) || frac.len() > 12 {
        return None;
    }
    let num: i128 = format!("{int}{frac}").parse().ok()?;
    Some((num, u32::try_from(frac.len()).ok()?))
}

/// One currency for the whole session.
struct Currency(Option<String>);

impl Currency {
    fn meet(&mut self, cur: String, what: &str) -> Result<(), PricingError> {
        match &self.0 {
            None => self.0 = Some(cur),
            Some(c) if *c == cur => {}
            Some(c) => {
                return Err(unreadable(format!(
                    "{what} is in {cur}, the session in {c}: a checkout session is priced in \
                     one currency"
                )))
            }
        }
        Ok(())
    }
}

fn too_large() -> PricingError {
    unreadable("amount is too large to price")
}

impl StripePricing {
    /// A checkout session's bound: line items times quantities, plus their
    /// exclusive tax, plus the dearest shipping option, in one currency.
    pub(super) fn checkout_quote(
        &self,
        p: &Params,
        looked: &[Looked],
    ) -> Result<Quote, PricingError> {
        let mode = p.get("mode").unwrap_or("payment");
        match mode {
            // A setup session saves a payment method; nothing is charged.
            "setup" => return Ok(free_quote(false)),
            "payment" => {}
            "subscription" => {
                return Err(unreadable(
                    "a subscription charges again every period; keycap does not price it",
                ))
            }
            other => {
                return Err(unreadable(format!(
                    "checkout mode {:?} is not one keycap prices",
                    clip(other)
                )))
            }
        }
        if p.get("automatic_tax[enabled]") == Some("true") {
            return Err(unreadable(
                "automatic tax is worked out from the customer's address after the session is \
                 made, so keycap cannot bound it; give line_items[][tax_rates] (priced), or \
                 include the tax in the unit amounts",
            ));
        }
        if p.has("optional_items") {
            return Err(unreadable(
                "optional items let the customer add to the total; list them as line_items",
            ));
        }
        let mut currency = Currency(None);
        if let Some(c) = p.get("currency") {
            currency.meet(currency_code(c)?, "currency")?;
        }
        let items = p.indices("line_items");
        if items.is_empty() {
            return Err(unreadable(
                "a checkout session is priced from its line_items; none were given",
            ));
        }
        let (mut items_amount, mut tax_amount) = (0i64, 0i64);
        for i in &items {
            let amount = line_item(p, i, looked, &mut currency)?;
            items_amount = items_amount.checked_add(amount).ok_or_else(too_large)?;
            tax_amount = tax_amount
                .checked_add(line_item_tax(p, i, amount, looked)?)
                .ok_or_else(too_large)?;
        }
        let options = p.indices("shipping_options");
        let mut shipping_amount = 0i64;
        for j in &options {
            shipping_amount = shipping_amount.max(shipping_option(p, j, looked, &mut currency)?);
        }
        let total = items_amount
            .checked_add(tax_amount)
            .and_then(|t| t.checked_add(shipping_amount))
            .ok_or_else(too_large)?;
        let currency = currency.0.expect("at least one line item");
        let mut detail = json!({
            "mode": mode,
            "line_items": items.len(),
            "items_amount": items_amount,
            "tax_amount": tax_amount,
            "shipping_amount": shipping_amount,
        });
        if options.len() > 1 {
            detail["customer_chooses_shipping"] = true.into();
        }
        self.charge_quote(StripeOp::Checkout, total, currency, detail)
    }
}

/// Line item `i`'s unit amount times its quantity.
fn line_item(
    p: &Params,
    i: &str,
    looked: &[Looked],
    currency: &mut Currency,
) -> Result<i64, PricingError> {
    let f = |name: &str| field("line_items", i, name);
    if p.get(&f("adjustable_quantity][enabled")) == Some("true") {
        return Err(unreadable(
            "an adjustable quantity lets the customer pay more than the session states; \
             give a fixed quantity",
        ));
    }
    let quantity = match p.get(&f("quantity")) {
        None => 1,
        Some(q) => parse_amount(q)?,
    };
    let unit = if let Some(price) = p.get(&f("price")) {
        let path = object_path("prices", "line item price", price)?;
        let obj = looked_object(looked, &path, "the line item's price")?;
        if obj.get("recurring").is_some_and(|r| !r.is_null()) {
            return Err(unreadable(format!(
                "price {} is recurring: a subscription charges every period, which keycap \
                 does not price",
                clip(price)
            )));
        }
        let unit = object_int(&obj, "unit_amount").ok_or_else(|| {
            unreadable(format!(
                "price {} has no fixed unit_amount (tiered or customer-chosen prices are not priced)",
                clip(price)
            ))
        })?;
        let cur = obj
            .get("currency")
            .and_then(Value::as_str)
            .ok_or_else(|| unreadable("the line item's price has no currency"))?;
        currency.meet(currency_code(cur)?, "a line item's price")?;
        unit
    } else {
        if p.get(&f("price_data][unit_amount_decimal")).is_some() {
            return Err(unreadable(
                "unit_amount_decimal is not priced; give unit_amount in minor units",
            ));
        }
        if p.any_under(&f("price_data][recurring")) {
            return Err(unreadable(
                "a recurring line item charges every period, which keycap does not price",
            ));
        }
        let cur = p.currency(&f("price_data][currency"), "a line item")?;
        currency.meet(cur, "a line item")?;
        p.int(&f("price_data][unit_amount"), "a line item")?
    };
    unit.checked_mul(quantity).ok_or_else(too_large)
}

/// The exclusive tax line item `i`'s tax rates add to its `amount`, each
/// rounded up (Stripe rounds each to the nearest minor unit, never more).
fn line_item_tax(p: &Params, i: &str, amount: i64, looked: &[Looked]) -> Result<i64, PricingError> {
    let mut tax = 0i64;
    for id in tax_rates(p, i) {
        let path = object_path("tax_rates", "tax rate", id)?;
        let rate = looked_object(looked, &path, "the line item's tax rate")?;
        if rate.get("inclusive") == Some(&Value::Bool(true)) {
            // Included in the unit amount: it adds nothing.
            continue;
        }
        let (num, scale) = percentage(&rate)
            .ok_or_else(|| unreadable(format!("tax rate {} has no percentage", clip(id))))?;
        let divisor = 100 * 10i128.pow(scale);
        let t = mul_div_ceil(i128::from(amount), num, divisor).ok_or_else(too_large)?;
        tax = tax.checked_add(t).ok_or_else(too_large)?;
    }
    Ok(tax)
}

/// What shipping option `j` costs: its inline fixed amount, or that of the
/// shipping rate read from Stripe.
fn shipping_option(
    p: &Params,
    j: &str,
    looked: &[Looked],
    currency: &mut Currency,
) -> Result<i64, PricingError> {
    let f = |name: &str| field("shipping_options", j, name);
    if let Some(rate) = p.get(&f("shipping_rate")) {
        let path = object_path("shipping_rates", "shipping rate", rate)?;
        let obj = looked_object(looked, &path, "the shipping rate")?;
        let fixed = obj
            .get("fixed_amount")
            .and_then(Value::as_object)
            .filter(|_| obj.get("type").and_then(Value::as_str) == Some("fixed_amount"));
        let Some(fixed) = fixed else {
            return Err(unreadable(format!(
                "shipping rate {} is not a fixed amount",
                clip(rate)
            )));
        };
        if fixed
            .get("currency_options")
            .is_some_and(|o| o.as_object().is_some_and(|o| !o.is_empty()))
        {
            return Err(currency_options());
        }
        let amount = object_int(fixed, "amount")
            .ok_or_else(|| unreadable("the shipping rate has no amount"))?;
        let cur = fixed
            .get("currency")
            .and_then(Value::as_str)
            .ok_or_else(|| unreadable("the shipping rate has no currency"))?;
        currency.meet(currency_code(cur)?, "a shipping rate")?;
        return Ok(amount);
    }
    let data = |name: &str| f(&format!("shipping_rate_data][{name}"));
    if p.get(&data("type")).is_some_and(|t| t != "fixed_amount") {
        return Err(unreadable("only fixed-amount shipping rates are priced"));
    }
    if p.any_under(&format!("{}[", data("fixed_amount][currency_options"))) {
        return Err(currency_options());
    }
    let cur = p.currency(&data("fixed_amount][currency"), "a shipping option")?;
    currency.meet(cur, "a shipping option")?;
    p.int(&data("fixed_amount][amount"), "a shipping option")
}

fn currency_options() -> PricingError {
    unreadable(
        "shipping amounts in other currencies (currency_options) let the total depend on the \
         currency the customer pays in; give one fixed amount",
    )
}
