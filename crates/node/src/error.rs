//! The one error type of the request pipeline. Each value says who failed and whether a
//! retry may help; the API edge maps it to each dialect's status and body.

use std::time::Duration;

use crisp_catalog::profiles::ResolveError;

/// Who failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Culprit {
    /// The client sent something wrong; retrying the same request will not help.
    Client,
    /// Every region able to take the request was full or unreachable; retry later.
    Capacity,
    /// A model engine failed.
    Upstream,
    /// crisp itself.
    Internal,
}

/// One region tried for a request and what happened there.
#[derive(Clone, Debug, PartialEq)]
pub struct Attempt {
    pub region: String,
    pub outcome: String,
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PipelineError {
    /// The body could not be read as the API's request.
    #[error("{0}")]
    InvalidRequest(String),
    #[error(
        "the request body is larger than this node's limit of {limit} bytes; send a shorter prompt or raise [limits] max_body_bytes"
    )]
    TooLarge { limit: usize },
    /// The client stopped sending its request body.
    #[error(
        "no byte of the request body arrived for {} ms; send the whole body without pausing (this node waits [limits] body_read_timeout_ms)", .waited.as_millis()
    )]
    BodyTimeout { waited: Duration },
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// Who is calling could not be established.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller may not do this; the reason is a category, never policy text. `allowed`
    /// names IDs of the same model the caller may use instead.
    #[error("access to {profile} is denied: {reason}{}", instead(.allowed))]
    Denied {
        profile: String,
        reason: String,
        allowed: Vec<String>,
    },
    /// No region of the boundary could take the request.
    #[error("{}", exhausted_message(.profile, .attempts, .skipped, .boundary))]
    Exhausted {
        profile: String,
        attempts: Vec<Attempt>,
        skipped: Vec<Attempt>,
        boundary: Vec<String>,
        retry_after: Option<Duration>,
    },
    /// The model rejected the request (e.g. too long for its context).
    #[error("the model rejected the request: {0}")]
    ModelRejected(String),
    #[error("the model stopped answering: {0}")]
    Timeout(String),
    #[error("the model failed: {0}")]
    ModelFailed(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// The audit log cannot take events and the node refuses to serve unaudited.
    #[error(
        "this region cannot record audit events right now ({0}); retry shortly or call another region"
    )]
    AuditUnavailable(String),
}

fn instead(allowed: &[String]) -> String {
    if allowed.is_empty() {
        String::new()
    } else {
        format!(". For this model you may call {}", allowed.join(", "))
    }
}

fn exhausted_message(
    profile: &str,
    attempts: &[Attempt],
    skipped: &[Attempt],
    boundary: &[String],
) -> String {
    let list = |v: &[Attempt]| {
        v.iter()
            .map(|a| format!("{} ({})", a.region, a.outcome))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut m = format!("no region could take this request for {profile}");
    if attempts.is_empty() {
        m.push_str("; no region was tried");
    } else {
        m.push_str(&format!("; tried {}", list(attempts)));
    }
    if !skipped.is_empty() {
        m.push_str(&format!("; skipped {}", list(skipped)));
    }
    m.push_str(&format!(
        ". The profile's boundary [{}] was kept: nothing was sent outside it. Retry after a moment",
        boundary.join(", ")
    ));
    if boundary.len() <= 1 {
        m.push_str(", or call an inference profile (GET /v1/models or ListInferenceProfiles lists them) so other regions can take it");
    }
    m.push('.');
    m
}

impl PipelineError {
    pub fn culprit(&self) -> Culprit {
        match self {
            PipelineError::InvalidRequest(_)
            | PipelineError::TooLarge { .. }
            | PipelineError::BodyTimeout { .. }
            | PipelineError::Resolve(_)
            | PipelineError::Unauthenticated(_)
            | PipelineError::Denied { .. }
            | PipelineError::ModelRejected(_) => Culprit::Client,
            PipelineError::Exhausted { .. } => Culprit::Capacity,
            PipelineError::Timeout(_) | PipelineError::ModelFailed(_) => Culprit::Upstream,
            PipelineError::Internal(_) | PipelineError::AuditUnavailable(_) => Culprit::Internal,
        }
    }

    /// A short name of what went wrong, the same in every dialect: OpenAI's error `code`
    /// and the `outcome` label of the request metrics.
    pub fn code(&self) -> &'static str {
        match self {
            PipelineError::InvalidRequest(_) => "invalid_request",
            PipelineError::TooLarge { .. } => "request_too_large",
            PipelineError::BodyTimeout { .. } => "request_timeout",
            PipelineError::Resolve(ResolveError::Unknown { .. }) => "model_not_found",
            PipelineError::Resolve(ResolveError::NotServedHere { .. }) => {
                "model_not_served_in_region"
            }
            PipelineError::Resolve(_) => "invalid_model",
            PipelineError::Exhausted { .. } => "capacity_exhausted",
            PipelineError::ModelRejected(_) => "model_rejected",
            PipelineError::Unauthenticated(_) => "invalid_api_key",
            PipelineError::Denied { .. } => "access_denied",
            PipelineError::AuditUnavailable(_) => "audit_unavailable",
            PipelineError::Timeout(_) => "timeout",
            PipelineError::ModelFailed(_) => "upstream_error",
            PipelineError::Internal(_) => "internal_error",
        }
    }

    /// Whether the same request may succeed later.
    pub fn retryable(&self) -> bool {
        !matches!(self.culprit(), Culprit::Client)
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            PipelineError::Exhausted { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}
