//! gRPC `WebhookService`: the same operations as REST's `/vault/webhooks`.

use keycap_proto::pb;
use keycap_proto::time::{opt_to_proto, to_proto};
use tonic::{Request, Response, Status};

use super::Api;
use crate::scope::Operation;
use crate::webhook::{Delivery, EndpointRequest, WebhookEndpoint};

pub fn endpoint_to_pb(e: &WebhookEndpoint) -> pb::WebhookEndpoint {
    pb::WebhookEndpoint {
        id: e.id.clone(),
        url: e.url.clone(),
        events: e.events.iter().map(|e| e.as_str().to_string()).collect(),
        thresholds: e.thresholds.iter().map(|&t| u32::from(t)).collect(),
        run_label: e.run_label.clone().unwrap_or_default(),
        key_id: e.key_id.clone().unwrap_or_default(),
        format: e.format.as_str().to_string(),
        description: e.description.clone(),
        created_at: Some(to_proto(e.created_at)),
    }
}

fn delivery_to_pb(d: &Delivery) -> pb::WebhookDelivery {
    pb::WebhookDelivery {
        seq: d.seq,
        event_id: d.event_id.clone(),
        event_type: d.event_type.clone(),
        state: d.state.clone(),
        next_attempt_at: opt_to_proto(d.next_attempt_at),
        created_at: Some(to_proto(d.created_at)),
        attempts: d
            .attempts
            .iter()
            .map(|a| pb::WebhookAttempt {
                attempt: a.attempt,
                at: Some(to_proto(a.at)),
                status: a.status.unwrap_or(0),
                error: a.error.clone(),
                duration_ms: a.duration_ms,
            })
            .collect(),
        payload_json: d.payload.clone(),
    }
}

impl Api {
    /// Webhooks carry events about every vendor's keys: the caller's token
    /// must not be restricted by vendor.
    async fn webhook_caller<T>(&self, req: &Request<T>, op: Operation) -> Result<(), Status> {
        Ok(self.admin(req, op).await?.vendors.check_all()?)
    }
}

#[tonic::async_trait]
impl pb::webhook_service_server::WebhookService for Api {
    async fn create_webhook(
        &self,
        req: Request<pb::CreateWebhookRequest>,
    ) -> Result<Response<pb::CreateWebhookResponse>, Status> {
        self.webhook_caller(&req, Operation::CreateWebhook).await?;
        let r = req.into_inner();
        let (endpoint, secret) = self
            .control
            .create_webhook(&EndpointRequest {
                url: r.url,
                secret: r.secret,
                events: r.events,
                thresholds: r.thresholds,
                run_label: r.run_label,
                key_id: r.key_id,
                format: r.format,
                description: r.description,
            })
            .await?;
        Ok(Response::new(pb::CreateWebhookResponse {
            webhook: Some(endpoint_to_pb(&endpoint)),
            secret,
        }))
    }

    async fn list_webhooks(
        &self,
        req: Request<pb::ListWebhooksRequest>,
    ) -> Result<Response<pb::ListWebhooksResponse>, Status> {
        self.webhook_caller(&req, Operation::ListWebhooks).await?;
        let all = self.control.list_webhooks().await?;
        Ok(Response::new(pb::ListWebhooksResponse {
            webhooks: all.iter().map(endpoint_to_pb).collect(),
        }))
    }

    async fn delete_webhook(
        &self,
        req: Request<pb::DeleteWebhookRequest>,
    ) -> Result<Response<pb::DeleteWebhookResponse>, Status> {
        self.webhook_caller(&req, Operation::DeleteWebhook).await?;
        self.control.delete_webhook(&req.get_ref().id).await?;
        Ok(Response::new(pb::DeleteWebhookResponse {}))
    }

    async fn test_webhook(
        &self,
        req: Request<pb::TestWebhookRequest>,
    ) -> Result<Response<pb::TestWebhookResponse>, Status> {
        self.webhook_caller(&req, Operation::TestWebhook).await?;
        let event = self.control.test_webhook(&req.get_ref().id).await?;
        Ok(Response::new(pb::TestWebhookResponse {
            event_id: event.id,
        }))
    }

    async fn list_webhook_deliveries(
        &self,
        req: Request<pb::ListWebhookDeliveriesRequest>,
    ) -> Result<Response<pb::ListWebhookDeliveriesResponse>, Status> {
        self.webhook_caller(&req, Operation::ListWebhookDeliveries)
            .await?;
        let r = req.get_ref();
        let all = self.control.webhook_deliveries(&r.id, r.limit).await?;
        Ok(Response::new(pb::ListWebhookDeliveriesResponse {
            deliveries: all.iter().map(delivery_to_pb).collect(),
        }))
    }
}
