//! gRPC `SimulateService`: the same dry run as REST's `POST /vault/simulate`.

use keycap_proto::pb;
use keycap_proto::time::to_proto;
use tonic::{Request, Response, Status};

use super::Api;
use crate::domain::invalid;
use crate::error::ApiError;
use crate::scope::Operation;
use crate::service::simulate::{DryRun, DryRunAnswer};

pub fn answer_to_pb(a: &DryRunAnswer) -> pb::SimulateResponse {
    let refusal = a.refusal.as_ref();
    let would = a.would_refuse.as_ref();
    pb::SimulateResponse {
        allowed: a.allowed,
        refusal_code: refusal.map(|r| r.code.to_string()).unwrap_or_default(),
        rule: refusal.map(|r| r.rule.to_string()).unwrap_or_default(),
        message: refusal.map(|r| r.message.clone()).unwrap_or_default(),
        quote: a.quote.as_ref().map(|q| pb::SimulatedQuote {
            reserve_micros: q.reserve.0,
            kind: q.kind.to_string(),
            rule: q.rule.clone(),
            detail_json: q.detail.to_string(),
            streaming: q.streaming,
        }),
        budget: Some(pb::SimulatedBudget {
            daily_remaining_micros: a.budget.daily_remaining.0,
            lifetime_remaining_micros: a.budget.lifetime_remaining.map_or(0, |m| m.0),
            has_lifetime_cap: a.budget.lifetime_remaining.is_some(),
            unleased_micros: a.budget.unleased.0,
            resets_at: Some(to_proto(a.budget.resets_at)),
        }),
        not_checked: a.not_checked.iter().map(|s| s.to_string()).collect(),
        lookups: a.lookups.clone(),
        would_refuse_code: would.map(|r| r.code.to_string()).unwrap_or_default(),
        would_refuse_rule: would.map(|r| r.rule.to_string()).unwrap_or_default(),
        would_refuse_message: would.map(|r| r.message.clone()).unwrap_or_default(),
    }
}

impl TryFrom<pb::SimulateRequest> for DryRun {
    type Error = ApiError;

    fn try_from(r: pb::SimulateRequest) -> Result<Self, ApiError> {
        let call = r
            .request
            .ok_or_else(|| invalid("request", "the call to simulate is required"))?;
        let headers: Vec<(String, String)> = call
            .headers
            .into_iter()
            .map(|h| (h.name, h.value))
            .collect();
        Ok(DryRun::new(
            &r.key_id,
            &call.method,
            &call.path,
            &headers,
            call.body,
        )?)
    }
}

#[tonic::async_trait]
impl pb::simulate_service_server::SimulateService for Api {
    async fn simulate(
        &self,
        req: Request<pb::SimulateRequest>,
    ) -> Result<Response<pb::SimulateResponse>, Status> {
        let caller = self.admin(&req, Operation::Simulate).await?;
        let run = DryRun::try_from(req.into_inner())?;
        let answer = self.control.simulate(&caller, run).await?;
        Ok(Response::new(answer_to_pb(&answer)))
    }
}
