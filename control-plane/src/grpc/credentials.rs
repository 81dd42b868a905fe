//! gRPC `CredentialService`: the same operations as REST's
//! `/vault/vendors/{name}/credentials` (stage, list, probe, promote). No
//! message carries a credential back.

use chrono::Utc;
use keycap_proto::pb;
use keycap_proto::time::{opt_to_proto, to_proto};
use tonic::{Request, Response, Status};

use super::{ack_timeout, confirmation_to_pb, Api};
use crate::credential::{parse_grace, CredentialVersion};
use crate::domain::invalid;
use crate::error::ApiError;
use crate::scope::Operation;
use crate::service::CredentialView;

pub fn credential_to_pb(c: &CredentialVersion, rotation_due: bool) -> pb::CredentialVersion {
    pb::CredentialVersion {
        vendor: c.vendor.clone(),
        version: c.version,
        state: c.state.as_str().to_string(),
        created_at: Some(to_proto(c.created_at)),
        promoted_at: opt_to_proto(c.promoted_at),
        grace_until: opt_to_proto(c.grace_until),
        retired_at: opt_to_proto(c.retired_at),
        age_seconds: (Utc::now() - c.created_at).num_seconds().max(0),
        probe: c.probe.as_ref().map(|p| pb::CredentialProbe {
            ok: p.ok,
            status: p.status.map_or(0, |s| s as i32),
            error: p.error.clone(),
            at: Some(to_proto(p.at)),
        }),
        rotation_due,
    }
}

pub fn view_to_pb(v: &CredentialView) -> pb::CredentialVersion {
    credential_to_pb(&v.credential, v.rotation_due)
}

fn version(v: i64) -> Result<i64, Status> {
    if v < 1 {
        return Err(ApiError::from(invalid(
            "version",
            "a credential version is a number from 1",
        ))
        .into());
    }
    Ok(v)
}

#[tonic::async_trait]
impl pb::credential_service_server::CredentialService for Api {
    async fn stage_credential(
        &self,
        req: Request<pb::StageCredentialRequest>,
    ) -> Result<Response<pb::StageCredentialResponse>, Status> {
        let caller = self.admin(&req, Operation::StageCredential).await?;
        let r = req.into_inner();
        let staged = self
            .control
            .stage_credential(&caller.vendors, &r.vendor, &r.credential)
            .await?;
        Ok(Response::new(pb::StageCredentialResponse {
            credential: Some(credential_to_pb(&staged, false)),
        }))
    }

    async fn list_credentials(
        &self,
        req: Request<pb::ListCredentialsRequest>,
    ) -> Result<Response<pb::ListCredentialsResponse>, Status> {
        let caller = self.admin(&req, Operation::ListCredentials).await?;
        let all = self
            .control
            .list_credentials(&caller.vendors, &req.get_ref().vendor)
            .await?;
        Ok(Response::new(pb::ListCredentialsResponse {
            credentials: all.iter().map(view_to_pb).collect(),
        }))
    }

    async fn probe_credential(
        &self,
        req: Request<pb::ProbeCredentialRequest>,
    ) -> Result<Response<pb::ProbeCredentialResponse>, Status> {
        let caller = self.admin(&req, Operation::ProbeCredential).await?;
        let r = req.into_inner();
        let probed = self
            .control
            .probe_credential(&caller.vendors, &r.vendor, version(r.version)?)
            .await?;
        Ok(Response::new(pb::ProbeCredentialResponse {
            credential: Some(credential_to_pb(&probed, false)),
        }))
    }

    async fn promote_credential(
        &self,
        req: Request<pb::PromoteCredentialRequest>,
    ) -> Result<Response<pb::PromoteCredentialResponse>, Status> {
        let caller = self.admin(&req, Operation::PromoteCredential).await?;
        let r = req.into_inner();
        let grace = parse_grace(&r.grace).map_err(ApiError::from)?;
        let (promotion, confirmation) = self
            .control
            .promote_credential(
                &caller.vendors,
                &r.vendor,
                version(r.version)?,
                grace,
                ack_timeout(r.ack_timeout_ms)?,
            )
            .await?;
        Ok(Response::new(pb::PromoteCredentialResponse {
            credential: Some(credential_to_pb(&promotion.active, false)),
            previous: promotion
                .previous
                .as_ref()
                .map(|p| credential_to_pb(p, false)),
            confirmation: Some(confirmation_to_pb(confirmation)),
        }))
    }
}
