//! The one error type of the service and its HTTP mapping.
//!
//! Every failure a client can see is a variant here, so the status code and the stable
//! machine-readable `code` live in one place (`Error::status`, `Error::code`) and every error
//! body has the same shape: `{ "error": { "code": "...", "message": "..." } }`.

use http::StatusCode;

/// Errors of the optimizer, each mapped to one HTTP status and one stable error code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object key is empty, too long or contains characters outside `[A-Za-z0-9._-]`.
    #[error("invalid object key {0:?}: use 1..=256 characters from [A-Za-z0-9._-], not . or ..")]
    InvalidKey(String),
    /// A chunk hash is not 64 lowercase hex digits.
    #[error("invalid chunk hash {0:?}: expected 64 hex digits (BLAKE3)")]
    InvalidHash(String),
    /// The request is malformed (bad JSON, bad query, bad chunk encoding, ...).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// An uploaded chunk does not hash to the hash it was uploaded under; nothing was stored.
    #[error("chunk hash mismatch: uploaded as {expected} but its content hashes to {actual}")]
    HashMismatch { expected: String, actual: String },
    /// The request body exceeds the configured limit.
    #[error("request body exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    /// No such object or chunk.
    #[error("{0} not found")]
    NotFound(String),
    /// The requested byte range lies outside the object.
    #[error("range not satisfiable for an object of {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    /// A mutation (object PUT/DELETE, chunk upload, pull) without the write token, or with a
    /// wrong one. One answer for both, so that a client learns nothing about the token.
    #[error("this request needs the write token: send Authorization: Bearer <token>")]
    Unauthorized,
    /// A pull names a peer that is not among the known ones (`--peer`, or discovered from the
    /// locator): the server fetches only from peers its operator named or its locator lists,
    /// never from a URL a client chose.
    #[error("{0:?} is not a known peer (see --peer and --locator)")]
    UnknownPeer(String),
    /// The route exists but not with this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A stored chunk failed verification against its hash; it is never served as data.
    #[error("chunk {hash} failed verification: {reason}")]
    CorruptChunk { hash: String, reason: String },
    /// A manifest references a chunk the store does not hold.
    #[error("chunk {0} referenced by the object is missing from the store")]
    MissingChunk(String),
    /// RocksDB failed.
    #[error("storage error: {0}")]
    Storage(rocksdb::Error),
    /// Local I/O failed (cache directory, writer.json).
    #[error("i/o error: {0}")]
    Io(std::io::Error),
    /// The cache volume is full (ENOSPC, e.g. a volume with a `size`): nothing of the request
    /// was stored, and what was stored before stays readable.
    #[error("the cache volume is full: {0}")]
    Full(String),
    /// The peer of a pull (or the writer of a forwarded request) could not be reached.
    #[error("peer {peer} unreachable: {reason}")]
    PeerUnreachable { peer: String, reason: String },
    /// The peer answered, but not with what the protocol expects. `message` is ours: a peer's
    /// own answer body is never copied into it (it would reach the client).
    #[error("peer {peer} answered {status}: {message}")]
    PeerError {
        peer: String,
        status: u16,
        message: String,
    },
    /// This instance is a reader and the request needs the writer, which is not available
    /// (failover in progress longer than the forwarding deadline).
    #[error("no writer available on the cache volume: {0}")]
    WriterUnavailable(String),
    /// A forwarded mutating request reached an instance that is not (or no longer) the writer.
    #[error("this instance is not the writer of the cache volume")]
    NotWriter,
    /// The cache is not open yet.
    #[error("cache not open yet")]
    NotReady,
    /// The cache volume's on-disk format is one this build cannot read (see `format`): refused
    /// before anything on the volume is touched.
    #[error("incompatible cache volume: {0}")]
    IncompatibleFormat(String),
    /// A `Content-Type` this service does not store (see `manifest::content_type`).
    #[error("invalid content type: {0}")]
    InvalidContentType(String),
    /// The command line or environment is unusable (reported at startup, never on the wire).
    #[error("configuration: {0}")]
    Config(String),
    /// An invariant broke (a bug or an injected fault).
    #[error("internal error: {0}")]
    Internal(String),
}

/// ENOSPC as RocksDB words it (its status keeps only the text of the OS error).
const NO_SPACE: &str = "No space left on device";

impl From<rocksdb::Error> for Error {
    fn from(e: rocksdb::Error) -> Error {
        if e.as_ref().contains(NO_SPACE) {
            Error::Full(e.into_string())
        } else {
            Error::Storage(e)
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        if e.kind() == std::io::ErrorKind::StorageFull {
            Error::Full(e.to_string())
        } else {
            Error::Io(e)
        }
    }
}

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The error of a blocking task that did not finish. A panic's text is logged, never answered:
/// it may quote data (it once quoted a slice bound derived from a peer's manifest) and says
/// nothing useful to a client.
pub fn task_failed(e: tokio::task::JoinError) -> Error {
    tracing::error!(error = %e, "a blocking task failed");
    Error::Internal("a task failed; see the instance's log".into())
}

impl Error {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::InvalidKey(_)
            | Error::InvalidHash(_)
            | Error::BadRequest(_)
            | Error::HashMismatch { .. }
            | Error::UnknownPeer(_)
            | Error::InvalidContentType(_) => StatusCode::BAD_REQUEST,
            Error::Unauthorized => StatusCode::UNAUTHORIZED,
            Error::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            Error::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Error::PeerUnreachable { .. } | Error::PeerError { .. } => StatusCode::BAD_GATEWAY,
            Error::WriterUnavailable(_)
            | Error::NotWriter
            | Error::NotReady
            | Error::IncompatibleFormat(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Full(_) => StatusCode::INSUFFICIENT_STORAGE,
            Error::CorruptChunk { .. }
            | Error::MissingChunk(_)
            | Error::Storage(_)
            | Error::Io(_)
            | Error::Config(_)
            | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code of the error body.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidKey(_) => "invalid_key",
            Error::InvalidHash(_) => "invalid_hash",
            Error::BadRequest(_) => "bad_request",
            Error::HashMismatch { .. } => "hash_mismatch",
            Error::TooLarge { .. } => "body_too_large",
            Error::NotFound(_) => "not_found",
            Error::RangeNotSatisfiable { .. } => "range_not_satisfiable",
            Error::MethodNotAllowed => "method_not_allowed",
            Error::Unauthorized => "unauthorized",
            Error::UnknownPeer(_) => "unknown_peer",
            Error::Config(_) => "config",
            Error::CorruptChunk { .. } => "corrupt_chunk",
            Error::MissingChunk(_) => "missing_chunk",
            Error::Storage(_) => "storage",
            Error::Io(_) => "io",
            Error::Full(_) => "storage_full",
            Error::PeerUnreachable { .. } => "peer_unreachable",
            Error::PeerError { .. } => "peer_error",
            Error::WriterUnavailable(_) => "writer_unavailable",
            Error::NotWriter => "not_writer",
            Error::NotReady => "not_ready",
            Error::IncompatibleFormat(_) => "incompatible_format",
            Error::InvalidContentType(_) => "invalid_content_type",
            Error::Internal(_) => "internal",
        }
    }

    /// The JSON body `{ "error": { "code", "message" } }`.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": { "code": self.code(), "message": self.to_string() } })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_code_and_message() {
        let e = Error::CorruptChunk {
            hash: "ab".into(),
            reason: "hash differs".into(),
        };
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = e.body();
        assert_eq!(body["error"]["code"], "corrupt_chunk");
        assert!(body["error"]["message"].as_str().unwrap().contains("ab"));
    }

    #[test]
    fn a_full_volume_is_507_whichever_layer_saw_it() {
        let io: Error = std::io::Error::from(std::io::ErrorKind::StorageFull).into();
        assert_eq!(io.status(), StatusCode::INSUFFICIENT_STORAGE);
        assert_eq!(io.code(), "storage_full");
        let other: Error = std::io::Error::from(std::io::ErrorKind::PermissionDenied).into();
        assert_eq!(other.code(), "io");
    }

    #[tokio::test]
    async fn a_panic_is_answered_without_its_text() {
        let e = tokio::task::spawn_blocking(|| panic!("secret detail 42"))
            .await
            .map_err(task_failed)
            .unwrap_err();
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            !e.body().to_string().contains("secret detail"),
            "{}",
            e.body()
        );
    }

    #[test]
    fn statuses() {
        assert_eq!(
            Error::TooLarge { limit: 1 }.status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            Error::InvalidKey("".into()).status(),
            StatusCode::BAD_REQUEST
        );
        let peer = Error::PeerUnreachable {
            peer: "http://x".into(),
            reason: "refused".into(),
        };
        assert_eq!(peer.status(), StatusCode::BAD_GATEWAY);
    }
}
