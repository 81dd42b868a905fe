//! The control plane's one error type at its API boundary.
//!
//! `ApiError` is what gRPC and REST handlers return. Its messages are safe
//! to show a client; internal causes are logged where they are handled (in
//! `From<StoreError>`) and replaced by a generic message, so a database error
//! or a file path never reaches a response.

use crate::domain::InvalidInput;
use crate::scope::Scope;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Invalid(InvalidInput),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// Missing or wrong credential. Never says which.
    #[error("missing or invalid token")]
    Unauthenticated,
    /// A known admin token without a scope the call needs.
    #[error("this admin token lacks the {0} scope")]
    MissingScope(Scope),
    /// A known admin token restricted to other vendors. `"*"` stands for
    /// "every vendor" (an unrestricted token asked for by a restricted one).
    #[error("this admin token may not act on vendor {0:?}")]
    VendorNotAllowed(String),
    /// A valid issuer token used for anything but minting a child of its
    /// own key.
    #[error(
        "an issuer token may only mint child keys of its own key (POST /vault/keys or CreateKey)"
    )]
    IssuerScope,
    /// Too many calls of a rate-limited operation (dry runs) from one
    /// token; retry after this many seconds.
    #[error("too many calls from this token; retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    /// A roll of a key that was already rolled: a key has one successor,
    /// so the chain stays one line and its budget one budget.
    #[error("{0}")]
    KeyAlreadyRolled(String),
    /// Something failed inside keycap; details went to the log.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// Stable code for JSON bodies.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Invalid(_) => "invalid_request",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::Unauthenticated => "unauthenticated",
            ApiError::MissingScope(_) => "missing_scope",
            ApiError::VendorNotAllowed(_) => "vendor_not_allowed",
            ApiError::IssuerScope => "issuer_scope",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::KeyAlreadyRolled(_) => "key_already_rolled",
            ApiError::Internal => "internal",
        }
    }

    pub fn http_status(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            ApiError::Invalid(_) => S::BAD_REQUEST,
            ApiError::NotFound(_) => S::NOT_FOUND,
            ApiError::Conflict(_) | ApiError::KeyAlreadyRolled(_) => S::CONFLICT,
            ApiError::Unauthenticated => S::UNAUTHORIZED,
            ApiError::MissingScope(_) | ApiError::VendorNotAllowed(_) | ApiError::IssuerScope => {
                S::FORBIDDEN
            }
            ApiError::RateLimited { .. } => S::TOO_MANY_REQUESTS,
            ApiError::Internal => S::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<InvalidInput> for ApiError {
    fn from(e: InvalidInput) -> Self {
        ApiError::Invalid(e)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => ApiError::NotFound(format!("{what} not found")),
            StoreError::Conflict(why) => ApiError::Conflict(why),
            StoreError::Invalid(why) => crate::domain::invalid("events", why).into(),
            other => {
                tracing::error!(error = %other, "store operation failed");
                ApiError::Internal
            }
        }
    }
}

/// gRPC metadata carrying keycap's stable error code (the REST body's
/// `error`), so every client names an error the same way over both APIs.
pub const CODE_METADATA: &str = "keycap-error";
/// gRPC metadata naming the input field an `invalid_request` is about (the
/// REST body's `field`).
pub const FIELD_METADATA: &str = "keycap-field";

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let msg = e.to_string();
        let code = e.code();
        let field = match &e {
            ApiError::Invalid(i) => Some(i.field),
            _ => None,
        };
        let mut status = match e {
            ApiError::Invalid(_) => tonic::Status::invalid_argument(msg),
            ApiError::NotFound(_) => tonic::Status::not_found(msg),
            ApiError::Conflict(_) | ApiError::KeyAlreadyRolled(_) => {
                tonic::Status::failed_precondition(msg)
            }
            ApiError::Unauthenticated => tonic::Status::unauthenticated(msg),
            ApiError::MissingScope(_) | ApiError::VendorNotAllowed(_) | ApiError::IssuerScope => {
                tonic::Status::permission_denied(msg)
            }
            ApiError::RateLimited { .. } => tonic::Status::resource_exhausted(msg),
            ApiError::Internal => tonic::Status::internal(msg),
        };
        let metadata = status.metadata_mut();
        metadata.insert(
            CODE_METADATA,
            tonic::metadata::MetadataValue::from_static(code),
        );
        if let Some(field) = field {
            metadata.insert(
                FIELD_METADATA,
                tonic::metadata::MetadataValue::from_static(field),
            );
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::invalid;

    #[test]
    fn grpc_status_carries_the_rest_code_and_field() {
        let s = tonic::Status::from(ApiError::from(invalid(
            "daily_usd_cap",
            "must be greater than 0",
        )));
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(s.metadata().get(CODE_METADATA).unwrap(), "invalid_request");
        assert_eq!(s.metadata().get(FIELD_METADATA).unwrap(), "daily_usd_cap");
        assert_eq!(s.message(), "daily_usd_cap: must be greater than 0");
        let s = tonic::Status::from(ApiError::Unauthenticated);
        assert_eq!(s.metadata().get(CODE_METADATA).unwrap(), "unauthenticated");
        assert!(s.metadata().get(FIELD_METADATA).is_none());
    }
}
