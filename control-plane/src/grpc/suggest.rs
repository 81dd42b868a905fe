//! gRPC `SuggestService`: the same suggestion as REST's
//! `GET /vault/keys/{id}/suggest`.

use keycap_proto::pb;
use keycap_proto::time::opt_to_proto;
use tonic::{Request, Response, Status};

use super::Api;
use crate::scope::Operation;
use crate::service::suggest::Suggestion;

pub fn suggestion_to_pb(s: &Suggestion) -> pb::SuggestPolicyResponse {
    let o = &s.observed;
    pb::SuggestPolicyResponse {
        vendor: s.vendor.clone(),
        allowed_endpoints: s.allowed_endpoints.clone(),
        daily_cap_micros: s.daily_cap.0,
        per_call_cap_micros: s.per_call_cap.0,
        margin_percent: s.margin_percent,
        observed: Some(pb::ObservedUsage {
            calls: o.calls,
            days: o.days,
            max_daily_micros: o.max_daily.0,
            max_call_micros: o.max_call.0,
            first_at: opt_to_proto(o.first_at),
            last_at: opt_to_proto(o.last_at),
            truncated: o.truncated,
        }),
    }
}

#[tonic::async_trait]
impl pb::suggest_service_server::SuggestService for Api {
    async fn suggest_policy(
        &self,
        req: Request<pb::SuggestPolicyRequest>,
    ) -> Result<Response<pb::SuggestPolicyResponse>, Status> {
        let caller = self.admin(&req, Operation::SuggestPolicy).await?;
        let r = req.into_inner();
        let s = self
            .control
            .suggest_policy(&caller, &r.key_id, r.margin_percent)
            .await?;
        Ok(Response::new(suggestion_to_pb(&s)))
    }
}
