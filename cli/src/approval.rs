//! `keycap approval`: calls held for a person's approval
//! (docs/approvals.md) — list, show, approve and deny with a reason. Answers
//! print in the REST shape (`ApprovalAnswer`), built from the gRPC answer.

use clap::Subcommand;
use keycap_client::{pb, AdminClient};
use keycap_control::rest::approvals::ApprovalAnswer;
use serde_json::{json, Value};

#[derive(Subcommand)]
pub enum ApprovalCmd {
    /// Held calls, newest first (needs keys:read).
    List {
        /// pending, approved, denied, expired or used; default: all.
        #[arg(long)]
        state: Option<String>,
        /// Only this key's.
        #[arg(long = "key-id")]
        key_id: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// One held call.
    Show { id: String },
    /// Approve a held call (needs approvals:decide); the agent's identical
    /// retry with `Keycap-Approval: <id>` is then forwarded once.
    Approve {
        id: String,
        /// Why; stored with the decision and in the call's audit entry.
        #[arg(long)]
        reason: String,
    },
    /// Deny a held call (needs approvals:decide).
    Deny {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

fn answer(a: Option<&pb::Approval>) -> Value {
    a.map(|a| serde_json::to_value(ApprovalAnswer::from(a)).unwrap_or_default())
        .unwrap_or(Value::Null)
}

pub async fn run(c: &mut AdminClient, cmd: ApprovalCmd) -> anyhow::Result<Value> {
    Ok(match cmd {
        ApprovalCmd::List {
            state,
            key_id,
            limit,
        } => {
            let r = c
                .approvals
                .list_approvals(pb::ListApprovalsRequest {
                    state: state.unwrap_or_default(),
                    key_id: key_id.unwrap_or_default(),
                    limit,
                })
                .await?
                .into_inner();
            json!({"approvals": r.approvals.iter().map(|a| answer(Some(a))).collect::<Vec<_>>()})
        }
        ApprovalCmd::Show { id } => {
            let r = c
                .approvals
                .get_approval(pb::GetApprovalRequest { id })
                .await?
                .into_inner();
            answer(r.approval.as_ref())
        }
        ApprovalCmd::Approve { id, reason } => {
            let r = c
                .approvals
                .approve_approval(pb::DecideApprovalRequest { id, reason })
                .await?
                .into_inner();
            answer(r.approval.as_ref())
        }
        ApprovalCmd::Deny { id, reason } => {
            let r = c
                .approvals
                .deny_approval(pb::DecideApprovalRequest { id, reason })
                .await?
                .into_inner();
            answer(r.approval.as_ref())
        }
    })
}
