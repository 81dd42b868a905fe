//! `keycap simulate`: a dry run of one vendor call of a key, over gRPC's
//! `SimulateService` — what the proxy would do, the price quote, what the
//! key has left — printed in the REST answer's shape. Nothing is forwarded
//! or reserved. And `keycap key suggest`, over `SuggestService`: a policy
//! drawn from what a key was seen doing.

use anyhow::{bail, Context};
use clap::Args;
use keycap_client::{pb, AdminClient};
use keycap_control::rest::SimulateAnswer;

#[derive(Args)]
pub struct SimulateArgs {
    /// The key whose call is simulated (key_...).
    #[arg(long = "key")]
    key_id: String,
    /// The HTTP method (POST, GET, ...).
    method: String,
    /// The path as the vendor sees it, with its query if any
    /// (`/v1/payment_intents`).
    path: String,
    /// A request header, `Name: value`; repeat for more.
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// The request body; `@file` reads it from a file, `@-` from standard
    /// input.
    #[arg(short = 'd', long = "data")]
    data: Option<String>,
}

fn body(data: Option<String>) -> anyhow::Result<Vec<u8>> {
    Ok(match data {
        None => Vec::new(),
        Some(d) if d == "@-" => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                .context("cannot read the body from standard input")?;
            buf
        }
        Some(d) => match d.strip_prefix('@') {
            Some(path) => std::fs::read(path).with_context(|| format!("cannot read {path}"))?,
            None => d.into_bytes(),
        },
    })
}

pub async fn run(c: &mut AdminClient, args: SimulateArgs) -> anyhow::Result<()> {
    let mut headers = Vec::with_capacity(args.headers.len());
    for h in &args.headers {
        let Some((name, value)) = h.split_once(':') else {
            bail!("--header {h:?}: expected `Name: value`");
        };
        headers.push(pb::SimulatedHeader {
            name: name.trim().to_string(),
            value: value.trim().to_string(),
        });
    }
    let r = c
        .simulate
        .simulate(pb::SimulateRequest {
            key_id: args.key_id,
            request: Some(pb::SimulatedCall {
                method: args.method,
                path: args.path,
                headers,
                body: body(args.data)?,
            }),
        })
        .await?
        .into_inner();
    crate::print(crate::to_json(SimulateAnswer::from(&r)));
    Ok(())
}

/// `keycap key suggest`: an enforcing policy from a key's observed calls.
#[derive(Args)]
pub struct SuggestArgs {
    /// The key whose calls the policy is drawn from (key_...).
    id: String,
    /// Percent added to the observed maxima (default 25).
    #[arg(long = "margin")]
    margin_percent: Option<u32>,
}

pub async fn suggest(c: &mut AdminClient, args: SuggestArgs) -> anyhow::Result<()> {
    let r = c
        .suggest
        .suggest_policy(pb::SuggestPolicyRequest {
            key_id: args.id.clone(),
            margin_percent: args.margin_percent,
        })
        .await?
        .into_inner();
    crate::print(crate::to_json(
        keycap_control::rest::SuggestAnswer::from_pb(&args.id, &r),
    ));
    Ok(())
}
