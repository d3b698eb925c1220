//! Every way a haddock verb can fail, and the exit code each one maps to.
//!
//! The exit codes are the contract with CI pipelines (docs/operations.md):
//! 2 = bad input, nothing changed; 3 = infrastructure (Docker or the locator) failed;
//! 1 = the release failed or was rolled back (users are all on the old version again).

use crate::spec::SpecError;
use locator_wire::client::ClientError;

/// Exit codes of every verb (documented in docs/operations.md). They live with [`Error`]
/// because [`Error::exit_code`] is what maps each failure to one; the CLI only returns them.
pub mod exit {
    /// Released, or the check passed.
    pub const OK: u8 = 0;
    /// The release was rolled back (or failed before any user saw it).
    pub const ROLLED_BACK: u8 = 1;
    /// Bad input: a malformed spec, an unknown tag, a bad flag. Nothing was changed.
    pub const BAD_INPUT: u8 = 2;
    /// Infrastructure error: Docker or the locator unreachable.
    pub const INFRA: u8 = 3;
}

/// Why a verb failed. [`Error::exit_code`] says which exit code it ends the process with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The deploy spec could not be read or is invalid (every problem, positioned). Exit 2.
    #[error(transparent)]
    Spec(#[from] SpecError),

    /// `repo:tag` is not present on one of the target Docker hosts. Exit 2, nothing changed.
    #[error("image {image} not found on Docker host {host}: build or load it there first (nothing was changed)")]
    UnknownImage { image: String, host: String },

    /// `image_source = "copy"`: no engine haddock can copy from holds `repo:tag`;
    /// `"registry"`: the registry has no such tag. Exit 2, nothing changed.
    #[error(
        "image {image} not found {looked}: build and push or load it first (nothing was changed)"
    )]
    ImageNowhere { image: String, looked: String },

    /// An image copy or pull did not leave the target with the right image (the export or
    /// the import broke off, or the image id differs from the source's). Exit 3: the release
    /// fails before any container of it starts.
    #[error("image {image} to Docker host {host}: {reason}")]
    ImageTransfer {
        image: String,
        host: String,
        reason: String,
    },

    /// Another release holds the service's release lock. Exit 2, nothing changed.
    #[error(
        "service {service} already has an active release {id} (to {to_version}, state {state}); \
             run `haddock resume {service}` to continue it or `haddock abort {id}` to roll it back"
    )]
    ReleaseActive {
        service: String,
        id: String,
        to_version: String,
        state: String,
    },

    /// Someone holds the service's deploy lock (`haddock lock acquire`): no release starts
    /// until it is released. Exit 2, nothing changed.
    #[error(
        "service {service} is locked by {who} since {since}: {message}; \
             `haddock lock release {service}` when it may be released again"
    )]
    Locked {
        service: String,
        who: String,
        message: String,
        since: String,
    },

    /// The spec's `pre_release` hook failed: the release did not begin. Exit 2, nothing
    /// changed.
    #[error("hook {hook} failed, so the release did not begin (nothing was changed): {why}")]
    Hook { hook: &'static str, why: String },

    /// A request that cannot be honoured as asked (no such release, nothing to roll back to …).
    /// Exit 2, nothing changed.
    #[error("{0}")]
    BadInput(String),

    /// A Docker host could not be reached or refused an operation. Exit 3.
    #[error("Docker host {host}: {what}: {source}")]
    Docker {
        host: String,
        what: String,
        #[source]
        source: bollard::errors::Error,
    },

    /// The locator could not be reached or refused a write. Exit 3.
    #[error(transparent)]
    Locator(#[from] ClientError),

    /// The recorded state and the world disagree in a way haddock will not guess about
    /// (e.g. a container of the release vanished). Exit 3; the release stays resumable.
    #[error("{0}")]
    Inconsistent(String),

    /// A new container never became healthy: the release was recorded `failed`, the container
    /// removed, and no user ever reached it. Exit 1.
    #[error(
        "release {release} failed: container {container} did not become healthy: {reason}\n\
             --- last log lines of {container} ---\n{logs}"
    )]
    Unhealthy {
        release: String,
        container: String,
        reason: String,
        logs: String,
    },

    /// Another haddock drives this release (it holds the lease, or moved the release first):
    /// this process stops without changing anything more. Exit 2.
    #[error("release {release} is driven by another haddock: {detail}; this one stops (`haddock status` follows the release)")]
    Driven { release: String, detail: String },

    /// An operator aborted the release before any user could reach the new version: its
    /// containers are removed and it is recorded `failed`. Exit 1.
    #[error("release {release} aborted by an operator at {state}; its containers are removed")]
    Aborted { release: String, state: String },

    /// The release was rolled back (analysis breach, a container died, or an operator abort):
    /// every user is on the old version again and the new containers are gone. Exit 1.
    #[error("release {release} rolled back: {reason}")]
    RolledBack { release: String, reason: String },
}

impl Error {
    /// The refusal of a release (or a second lock) while `lock` is held.
    pub fn locked(service: &str, lock: &locator_wire::api::DeployLock) -> Error {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(lock.at);
        Error::Locked {
            service: service.to_string(),
            who: lock.who.clone(),
            message: lock.message.clone(),
            since: humantime::format_rfc3339_seconds(at).to_string(),
        }
    }

    /// The process exit code this error ends a verb with.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Spec(_)
            | Error::UnknownImage { .. }
            | Error::ImageNowhere { .. }
            | Error::ReleaseActive { .. }
            | Error::Locked { .. }
            | Error::Hook { .. }
            | Error::BadInput(_)
            | Error::Driven { .. } => exit::BAD_INPUT,
            Error::Docker { .. }
            | Error::ImageTransfer { .. }
            | Error::Locator(_)
            | Error::Inconsistent(_) => exit::INFRA,
            Error::Unhealthy { .. } | Error::RolledBack { .. } | Error::Aborted { .. } => {
                exit::ROLLED_BACK
            }
        }
    }

    /// A short machine-readable name for `--json` output.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Spec(_) => "bad_spec",
            // One kind for "the tag is nowhere": pipelines need not know the image source.
            Error::UnknownImage { .. } | Error::ImageNowhere { .. } => "unknown_image",
            Error::ImageTransfer { .. } => "image_transfer",
            Error::ReleaseActive { .. } => "release_active",
            Error::Locked { .. } => "locked",
            Error::Hook { .. } => "hook_failed",
            Error::BadInput(_) => "bad_input",
            Error::Docker { .. } => "docker",
            Error::Locator(_) => "locator",
            Error::Inconsistent(_) => "inconsistent",
            Error::Unhealthy { .. } => "unhealthy",
            Error::RolledBack { .. } => "rolled_back",
            Error::Driven { .. } => "driven_elsewhere",
            Error::Aborted { .. } => "aborted",
        }
    }

    /// Wraps a bollard error with the host and what haddock was doing.
    pub fn docker(host: &str, what: impl Into<String>, source: bollard::errors::Error) -> Error {
        Error::Docker {
            host: host.to_string(),
            what: what.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_its_documented_exit_code() {
        let unknown = Error::UnknownImage {
            image: "a:b".into(),
            host: "local".into(),
        };
        assert_eq!(unknown.exit_code(), 2);
        assert!(unknown.to_string().contains("nothing was changed"));
        assert_eq!(Error::BadInput("x".into()).exit_code(), 2);
        let nowhere = Error::ImageNowhere {
            image: "a:b".into(),
            looked: "in registry r:5000 (asked through tcp://h:2376)".into(),
        };
        assert_eq!((nowhere.exit_code(), nowhere.kind()), (2, "unknown_image"));
        assert!(nowhere.to_string().contains("nothing was changed"));
        let transfer = Error::ImageTransfer {
            image: "a:b".into(),
            host: "tcp://h:2376".into(),
            reason: "image id differs".into(),
        };
        assert_eq!(transfer.exit_code(), 3);
        let docker = Error::docker("local", "ping", bollard::errors::Error::RequestTimeoutError);
        assert_eq!(docker.exit_code(), 3);
        assert_eq!(Error::Inconsistent("x".into()).exit_code(), 3);
        let rolled = Error::RolledBack {
            release: "r1".into(),
            reason: "5xx".into(),
        };
        assert_eq!(rolled.exit_code(), 1);
        let unhealthy = Error::Unhealthy {
            release: "r1".into(),
            container: "c".into(),
            reason: "deadline".into(),
            logs: "boom".into(),
        };
        assert_eq!(unhealthy.exit_code(), 1);
        assert!(unhealthy.to_string().contains("boom"));
    }
}
