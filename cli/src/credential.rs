//! `keycap vendor credential ...`: a vendor's credential versions over the
//! admin gRPC API (docs/rotation.md). Prints the REST answers' JSON shapes;
//! never a credential (a new one is read from the flag, standard input or
//! KEYCAP_VENDOR_CREDENTIAL and only sent).

use clap::Subcommand;
use keycap_client::{pb, AdminClient};
use keycap_control::rest::CredentialAnswer;
use serde_json::{json, Value};

use crate::{confirmation_json, credential_from_stdin, print, warn_unconfirmed};

#[derive(Subcommand)]
pub enum CredentialCmd {
    /// Stage a new credential version without using it; prints its version.
    Add {
        vendor: String,
        /// The real API key, or `-` to read it from standard input, or set
        /// KEYCAP_VENDOR_CREDENTIAL.
        #[arg(long, env = "KEYCAP_VENDOR_CREDENTIAL", hide_env_values = true)]
        credential: String,
    },
    /// List the vendor's versions: state, age, probe result.
    List { vendor: String },
    /// One cheap authenticated read against the vendor with a version.
    Probe { vendor: String, version: i64 },
    /// Make a version the one every proxy injects (or roll back to the
    /// previous one within its grace).
    Promote {
        vendor: String,
        version: i64,
        /// How long the version active before stays usable, e.g. 1h
        /// (default 10m; 0s retires it at once).
        #[arg(long)]
        grace: Option<String>,
    },
}

fn answer(c: Option<&pb::CredentialVersion>) -> Value {
    c.map(|c| json!(CredentialAnswer::from(c)))
        .unwrap_or(Value::Null)
}

pub async fn run(c: &mut AdminClient, cmd: CredentialCmd) -> anyhow::Result<()> {
    match cmd {
        CredentialCmd::Add { vendor, credential } => {
            let credential = if credential == "-" {
                credential_from_stdin()?
            } else {
                credential
            };
            let r = c
                .credentials
                .stage_credential(pb::StageCredentialRequest { vendor, credential })
                .await?
                .into_inner();
            print(answer(r.credential.as_ref()));
        }
        CredentialCmd::List { vendor } => {
            let r = c
                .credentials
                .list_credentials(pb::ListCredentialsRequest {
                    vendor: vendor.clone(),
                })
                .await?
                .into_inner();
            print(json!({
                "vendor": vendor,
                "credentials": r.credentials.iter().map(|c| answer(Some(c))).collect::<Vec<_>>(),
            }));
        }
        CredentialCmd::Probe { vendor, version } => {
            let r = c
                .credentials
                .probe_credential(pb::ProbeCredentialRequest { vendor, version })
                .await?
                .into_inner();
            print(answer(r.credential.as_ref()));
        }
        CredentialCmd::Promote {
            vendor,
            version,
            grace,
        } => {
            let r = c
                .credentials
                .promote_credential(pb::PromoteCredentialRequest {
                    vendor,
                    version,
                    grace: grace.unwrap_or_default(),
                    ack_timeout_ms: 0,
                })
                .await?
                .into_inner();
            print(json!({
                "credential": answer(r.credential.as_ref()),
                "previous": answer(r.previous.as_ref()),
                "confirmation": confirmation_json(r.confirmation.as_ref()),
            }));
            warn_unconfirmed("credential promoted", r.confirmation.as_ref());
        }
    }
    Ok(())
}
