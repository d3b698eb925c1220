//! The proxy's error type (start-up and background failures; the request path answers with
//! HTTP statuses instead of returning these).

use std::path::PathBuf;

/// Everything that can stop the proxy from starting or a background task from making progress.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A cookie key is missing, too short or otherwise unusable.
    #[error("cookie key: {0}")]
    CookieKey(String),
    /// A command-line value is malformed (an address, a duration …).
    #[error("bad configuration: {0}")]
    Config(String),
    /// Reading or writing the persisted routing snapshot failed.
    #[error("state file {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The run directory (upgrade socket, pid file) could be taken over by another user.
    #[error(
        "run directory {path} is not private: {why} (use a directory only this user may write to)"
    )]
    UnsafeRunDir { path: PathBuf, why: String },
    /// The persisted routing snapshot is not valid JSON of the expected shape.
    #[error("state file {path} is corrupt: {message}")]
    CorruptState { path: PathBuf, message: String },
    /// The locator could not be reached or refused a call.
    #[error(transparent)]
    Locator(#[from] locator_wire::client::ClientError),
    /// An ACME account or order failed (the CA's problem, or writing the result).
    #[error("ACME ({host}): {message}")]
    Acme { host: String, message: String },
    /// Pingora refused to set up a listener or the server.
    #[error("server: {0}")]
    Server(String),
}
