//! gRPC for inbound hooks: what proxies get of an endpoint in the policy
//! stream (`fleet_hook_to_pb`), and `FleetHookService`, the fleet-wide
//! claim of an event id before a proxy relays it.

use keycap_proto::pb;
use tonic::{Request, Response, Status};

use super::Api;
use crate::hooks::FleetHook;

pub fn fleet_hook_to_pb(h: &FleetHook) -> pb::FleetHook {
    pb::FleetHook {
        id: h.endpoint.id.clone(),
        vendor: h.endpoint.vendor.as_str().to_string(),
        signing_secrets: h.signing_secrets.clone(),
        destination_url: h.endpoint.destination_url.clone(),
        public_url: h.endpoint.public_url.clone(),
        tolerance_secs: h.endpoint.tolerance_secs,
        relay_secret: h.relay_secret.clone(),
        allow_private_destination: h.allow_private_destination,
    }
}

#[tonic::async_trait]
impl pb::fleet_hook_service_server::FleetHookService for Api {
    async fn claim_hook_event(
        &self,
        req: Request<pb::ClaimHookEventRequest>,
    ) -> Result<Response<pb::ClaimHookEventResponse>, Status> {
        self.fleet(&req, &req.get_ref().node_id)?;
        let r = req.into_inner();
        let claimed = self
            .control
            .claim_hook_event(&r.node_id, &r.hook_id, &r.event_id)
            .await?;
        Ok(Response::new(pb::ClaimHookEventResponse { claimed }))
    }

    async fn settle_hook_event(
        &self,
        req: Request<pb::SettleHookEventRequest>,
    ) -> Result<Response<pb::SettleHookEventResponse>, Status> {
        self.fleet(&req, &req.get_ref().node_id)?;
        let r = req.into_inner();
        self.control
            .settle_hook_event(&r.node_id, &r.hook_id, &r.event_id, r.relayed)
            .await?;
        Ok(Response::new(pb::SettleHookEventResponse {}))
    }
}
