//! Every way a request can fail, each with its HTTP status and stable error code.
//!
//! Clients match on the code (`illegal_transition`, `release_active`, …), never on the message,
//! so codes never change once published. Internal failures (disk, database) are logged in full
//! where they happen and reach the client only as a generic `internal`/`unavailable` answer.

use crate::api::{ErrorBody, ErrorDetail, Revision};
use http::StatusCode;

/// Why the locator refused or failed a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// 400 `invalid_json`: the body is not JSON of the expected shape (includes unknown fields).
    #[error("{0}")]
    InvalidJson(String),
    /// 400 `invalid_input`: well-formed, but a value breaks a rule (a name, a TTL, a state).
    #[error("{0}")]
    InvalidInput(String),
    /// 400 `invalid_address`: an instance address is not `host:port`.
    #[error("{0}")]
    InvalidAddress(String),
    /// 400 `invalid_weights`: weights out of range, not summing to 100, or on a version
    /// without a ready instance.
    #[error("{0}")]
    InvalidWeights(String),
    /// 401 `unauthorized`: no bearer token, or one the locator does not know.
    #[error("a valid bearer token is required")]
    Unauthorized,
    /// 403 `forbidden`: the token is valid but lacks the role this route needs.
    #[error("this route needs a token with the `{0}` role")]
    Forbidden(&'static str),
    /// 403 `out_of_scope`: the token is limited to other services than the one this changes.
    #[error("token `{token}` may not change service `{service}` (it is scoped to other services)")]
    OutOfScope { token: String, service: String },
    /// 404 `unknown_service`.
    #[error("unknown service `{0}`")]
    UnknownService(String),
    /// 404 `unknown_instance`.
    #[error("unknown instance `{0}`")]
    UnknownInstance(String),
    /// 404 `unknown_release`.
    #[error("unknown release `{0}`")]
    UnknownRelease(String),
    /// 404 `not_found`: no such route.
    #[error("no route for {0}")]
    NotFound(String),
    /// 405 `method_not_allowed`.
    #[error("method {0} not allowed here")]
    MethodNotAllowed(String),
    /// 409 `illegal_transition`: the state machine forbids this move (names both states).
    #[error("cannot move {what} `{id}` from {from} to {to}")]
    IllegalTransition {
        what: &'static str,
        id: String,
        from: String,
        to: String,
    },
    /// 409 `release_active`: the service already has an unfinished release (named).
    #[error("service `{service}` already has an active release {id} ({state})")]
    ReleaseActive {
        service: String,
        id: String,
        state: String,
    },
    /// 409 `route_taken`: another service already answers this host and path prefix.
    #[error("host `{host}` (path prefix {prefix}) is already routed to service `{service}`")]
    RouteTaken {
        host: String,
        prefix: String,
        service: String,
    },
    /// 409 `service_locked`: someone holds the service's deploy lock (`haddock lock`): no new
    /// release, and no second lock, until it is released. Names who and why.
    #[error("service `{service}` is locked by {who}: {message}")]
    ServiceLocked {
        service: String,
        who: String,
        message: String,
    },
    /// 409 `full_report_needed`: a session report of changes only, from a proxy whose previous
    /// report this locator does not hold (it restarted, the report aged out, or the proxy moved
    /// to another replica). Nothing was counted; send the whole report.
    #[error("no live report of proxy `{proxy}` for service `{service}` to apply changes to; send the whole report")]
    FullReportNeeded { proxy: String, service: String },
    /// 409 `release_finished`: a finished release is history and cannot change.
    #[error("release {0} is finished and cannot change")]
    ReleaseFinished(String),
    /// 409 `instance_exists`: an instance with this id exists with different attributes.
    #[error("instance `{0}` is already registered with different attributes")]
    InstanceExists(String),
    /// 409 `state_conflict`: a release update expected to leave a state the release is no
    /// longer in (another process moved it first); names both.
    #[error("release {id} is {actual}, not {expected} as this update expected")]
    StateConflict {
        id: String,
        expected: String,
        actual: String,
    },
    /// 409 `lease_held`: another process drives this release and renewed its lease
    /// `age_ms` ago (a lease lapses after `api::LEASE_MS`).
    #[error("release {id} is driven by {holder} (lease renewed {age_ms} ms ago)")]
    LeaseHeld {
        id: String,
        holder: String,
        age_ms: u64,
    },
    /// 409 `control_refused`: the operator control means nothing in the release's state
    /// (names the state and why).
    #[error("release {id} is {state}: {why}")]
    ControlRefused {
        id: String,
        state: String,
        why: String,
    },
    /// 412 `revision_mismatch`: `If-Match` named a revision the service is no longer at.
    #[error("service `{service}` is at revision {actual}, not {expected}")]
    RevisionMismatch {
        service: String,
        expected: Revision,
        actual: Revision,
    },
    /// 408 `request_timeout`: the request body did not arrive within the read timeout (a
    /// client trickling its body would otherwise hold its connection and a handler forever).
    #[error("the request body did not arrive within {0:?}")]
    RequestTimeout(std::time::Duration),
    /// 413 `payload_too_large`.
    #[error("request body larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// 503 `unavailable`: the store cannot commit right now (disk failed, database down).
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// 503 `too_many_connections`: the locator already holds its maximum of open connections
    /// (`--max-connections`); this one is closed right after the answer. Retry.
    #[error("the locator already holds its maximum of {0} connections; retry later")]
    TooManyConnections(usize),
    /// 500 `internal`: a bug or an unexpected failure; details are in the locator's log.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn status(&self) -> StatusCode {
        use Error::*;
        match self {
            InvalidJson(_) | InvalidInput(_) | InvalidAddress(_) | InvalidWeights(_) => {
                StatusCode::BAD_REQUEST
            }
            Unauthorized => StatusCode::UNAUTHORIZED,
            Forbidden(_) | OutOfScope { .. } => StatusCode::FORBIDDEN,
            UnknownService(_) | UnknownInstance(_) | UnknownRelease(_) | NotFound(_) => {
                StatusCode::NOT_FOUND
            }
            MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            IllegalTransition { .. }
            | ReleaseActive { .. }
            | ServiceLocked { .. }
            | RouteTaken { .. }
            | ReleaseFinished(_)
            | InstanceExists(_)
            | StateConflict { .. }
            | LeaseHeld { .. }
            | ControlRefused { .. }
            | FullReportNeeded { .. } => StatusCode::CONFLICT,
            RevisionMismatch { .. } => StatusCode::PRECONDITION_FAILED,
            RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Unavailable(_) | TooManyConnections(_) => StatusCode::SERVICE_UNAVAILABLE,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        use Error::*;
        match self {
            InvalidJson(_) => "invalid_json",
            InvalidInput(_) => "invalid_input",
            InvalidAddress(_) => "invalid_address",
            InvalidWeights(_) => "invalid_weights",
            Unauthorized => "unauthorized",
            Forbidden(_) => "forbidden",
            OutOfScope { .. } => "out_of_scope",
            UnknownService(_) => "unknown_service",
            UnknownInstance(_) => "unknown_instance",
            UnknownRelease(_) => "unknown_release",
            NotFound(_) => "not_found",
            MethodNotAllowed(_) => "method_not_allowed",
            IllegalTransition { .. } => "illegal_transition",
            ReleaseActive { .. } => "release_active",
            ServiceLocked { .. } => "service_locked",
            RouteTaken { .. } => "route_taken",
            ReleaseFinished(_) => "release_finished",
            InstanceExists(_) => "instance_exists",
            StateConflict { .. } => "state_conflict",
            LeaseHeld { .. } => "lease_held",
            ControlRefused { .. } => "control_refused",
            FullReportNeeded { .. } => "full_report_needed",
            RevisionMismatch { .. } => "revision_mismatch",
            RequestTimeout(_) => "request_timeout",
            PayloadTooLarge(_) => "payload_too_large",
            Unavailable(_) => "unavailable",
            TooManyConnections(_) => "too_many_connections",
            Internal(_) => "internal",
        }
    }

    /// The body sent to the client. Internal details stay in the log: the caller logged them
    /// when it built the error, and the client only learns that something went wrong.
    pub fn body(&self) -> ErrorBody {
        let message = match self {
            Error::Internal(_) => "internal error; see the locator's log".to_string(),
            Error::Unavailable(_) => "the store is unavailable; retry later".to_string(),
            other => other.to_string(),
        };
        ErrorBody {
            error: ErrorDetail {
                code: self.code().to_string(),
                message,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internals_are_not_leaked() {
        let e = Error::Internal("disk /var/lib/x exploded".into());
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!e.body().error.message.contains("/var/lib"));
    }

    #[test]
    fn illegal_transition_names_both_states() {
        let e = Error::IllegalTransition {
            what: "instance",
            id: "a".into(),
            from: "draining".into(),
            to: "ready".into(),
        };
        let msg = e.body().error.message;
        assert!(msg.contains("draining") && msg.contains("ready"), "{msg}");
        assert_eq!(e.code(), "illegal_transition");
    }
}
