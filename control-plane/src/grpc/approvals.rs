//! gRPC `ApprovalService` (the same operations as REST's
//! `/vault/approvals`) and the fleet's two approval calls, which
//! `FleetService` forwards here: wire <-> domain conversions only.

use chrono::Utc;
use keycap_proto::pb;
use keycap_proto::time::{opt_to_proto, to_proto};
use keycap_proto::Micros;
use tonic::{Request, Response, Status};

use super::Api;
use crate::approval::{self, Approval, ApprovalFilter};
use crate::error::ApiError;
use crate::scope::Operation;
use crate::service::HeldCall;

pub fn approval_to_pb(a: &Approval, url: String) -> pb::Approval {
    let d = a.decision.as_ref();
    pb::Approval {
        id: a.id.clone(),
        key_id: a.key_id.clone(),
        vendor: a.vendor.clone(),
        method: a.method.clone(),
        path: a.path.clone(),
        fingerprint: hex::encode(a.fingerprint),
        quote_micros: a.quote.0,
        requested_at: Some(to_proto(a.requested_at)),
        expires_at: Some(to_proto(a.expires_at)),
        state: a.state(Utc::now()).as_str().to_string(),
        decided_by: d.map(|d| d.by.clone()).unwrap_or_default(),
        reason: d.map(|d| d.reason.clone()).unwrap_or_default(),
        decided_at: opt_to_proto(d.map(|d| d.at)),
        consumed_at: opt_to_proto(a.consumed_at),
        node_id: a.node_id.clone(),
        agent_run_label: a.agent_run_label.clone(),
        approval_url: url,
    }
}

impl TryFrom<pb::ListApprovalsRequest> for ApprovalFilter {
    type Error = crate::domain::InvalidInput;

    fn try_from(r: pb::ListApprovalsRequest) -> Result<Self, Self::Error> {
        Ok(ApprovalFilter {
            state: match r.state.as_str() {
                "" => None,
                s => Some(approval::ApprovalState::parse(s)?),
            },
            key_id: (!r.key_id.is_empty()).then_some(r.key_id),
            limit: r.limit,
        })
    }
}

impl Api {
    async fn decide(
        &self,
        req: Request<pb::DecideApprovalRequest>,
        approve: bool,
    ) -> Result<Response<pb::DecideApprovalResponse>, Status> {
        let caller = self.admin(&req, Operation::DecideApproval).await?;
        let r = req.into_inner();
        let a = self
            .control
            .decide_approval(&caller, &r.id, approve, &r.reason)
            .await?;
        let url = self.control.approval_url(&a.id);
        Ok(Response::new(pb::DecideApprovalResponse {
            approval: Some(approval_to_pb(&a, url)),
        }))
    }

    pub(super) async fn fleet_request_approval(
        &self,
        req: Request<pb::RequestApprovalRequest>,
    ) -> Result<Response<pb::RequestApprovalResponse>, Status> {
        self.fleet(&req, &req.get_ref().node_id)?;
        let r = req.into_inner();
        let call = HeldCall::new(
            r.key_id,
            r.method,
            r.path,
            &r.fingerprint,
            Micros(r.quote_micros),
        )
        .map_err(ApiError::from)?;
        let a = self.control.request_approval(&r.node_id, call).await?;
        Ok(Response::new(pb::RequestApprovalResponse {
            approval_url: self.control.approval_url(&a.id),
            approval_id: a.id,
            expires_at: Some(to_proto(a.expires_at)),
        }))
    }

    pub(super) async fn fleet_consume_approval(
        &self,
        req: Request<pb::ConsumeApprovalRequest>,
    ) -> Result<Response<pb::ConsumeApprovalResponse>, Status> {
        self.fleet(&req, &req.get_ref().node_id)?;
        let r = req.into_inner();
        let answer = match self
            .control
            .consume_approval(
                &r.node_id,
                &r.approval_id,
                &r.key_id,
                &r.fingerprint,
                Micros(r.amount_micros),
                &r.event_id,
            )
            .await?
        {
            Ok(a) => {
                let d = a.decision.unwrap_or_else(|| unreachable_decision(&a.id));
                pb::ConsumeApprovalResponse {
                    refusal: String::new(),
                    decided_by: d.by,
                    reason: d.reason,
                    quote_micros: a.quote.0,
                }
            }
            Err(why) => pb::ConsumeApprovalResponse {
                refusal: why.code().to_string(),
                ..Default::default()
            },
        };
        Ok(Response::new(answer))
    }
}

/// A used approval was approved (the store's update requires it); a row
/// saying otherwise is logged and answered with an empty decision.
fn unreachable_decision(id: &str) -> approval::Decision {
    tracing::error!(approval = %id, "a used approval has no decision");
    approval::Decision {
        approved: true,
        by: String::new(),
        reason: String::new(),
        at: Utc::now(),
    }
}

#[tonic::async_trait]
impl pb::approval_service_server::ApprovalService for Api {
    async fn list_approvals(
        &self,
        req: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ListApprovalsResponse>, Status> {
        let caller = self.admin(&req, Operation::ListApprovals).await?;
        let filter = ApprovalFilter::try_from(req.into_inner()).map_err(ApiError::from)?;
        let all = self
            .control
            .list_approvals(&caller.vendors, &filter)
            .await?;
        Ok(Response::new(pb::ListApprovalsResponse {
            approvals: all
                .iter()
                .map(|a| approval_to_pb(a, self.control.approval_url(&a.id)))
                .collect(),
        }))
    }

    async fn get_approval(
        &self,
        req: Request<pb::GetApprovalRequest>,
    ) -> Result<Response<pb::GetApprovalResponse>, Status> {
        let caller = self.admin(&req, Operation::GetApproval).await?;
        let a = self
            .control
            .get_approval(&caller.vendors, &req.get_ref().id)
            .await?;
        Ok(Response::new(pb::GetApprovalResponse {
            approval: Some(approval_to_pb(&a, self.control.approval_url(&a.id))),
        }))
    }

    async fn approve_approval(
        &self,
        req: Request<pb::DecideApprovalRequest>,
    ) -> Result<Response<pb::DecideApprovalResponse>, Status> {
        self.decide(req, true).await
    }

    async fn deny_approval(
        &self,
        req: Request<pb::DecideApprovalRequest>,
    ) -> Result<Response<pb::DecideApprovalResponse>, Status> {
        self.decide(req, false).await
    }
}
