//! The write token: the one credential of every mutation (object PUT and DELETE, chunk
//! uploads, pulls). Reads stay public: objects are what the service serves to everyone.
//!
//! One bearer token on the one listener, rather than a second, internal listener for the
//! mutating routes: users PUT objects through the public proxy (the demo's and the proof's
//! load does), so the public listener must take authenticated mutations anyway, and a deploy
//! spec has one port. The token comes from `OPTIMIZER_WRITE_TOKEN` (a deploy spec's `env`) or
//! from `--write-token-file` (a mounted secret), never from a flag (argv is world-readable in
//! /proc). Readers forward mutations to the writer with the same token, so every instance on
//! one cache volume must be given the same one.

use std::path::Path;

use http::HeaderValue;
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};

/// Environment variable holding the token itself.
pub const TOKEN_ENV: &str = "OPTIMIZER_WRITE_TOKEN";
/// Shortest accepted token: 16 bytes, like the proxy's cookie key, so that a guessable word
/// is refused at startup instead of protecting nothing.
pub const MIN_TOKEN_LEN: usize = 16;

/// The configured write token. Only its BLAKE3 hash is compared, in constant time: comparing
/// two 32-byte hashes leaks neither the content nor the length of the token.
pub struct WriteToken {
    secret: String,
    digest: [u8; 32],
}

impl std::fmt::Debug for WriteToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteToken(<redacted>)")
    }
}

impl WriteToken {
    /// Checks a token: at least [`MIN_TOKEN_LEN`] bytes of visible ASCII (it travels in a
    /// header).
    pub fn new(secret: &str) -> Result<WriteToken> {
        if secret.len() < MIN_TOKEN_LEN {
            return Err(Error::Config(format!(
                "the write token must be at least {MIN_TOKEN_LEN} bytes long"
            )));
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::Config(
                "the write token must be visible ASCII (no spaces or control characters)".into(),
            ));
        }
        Ok(WriteToken {
            secret: secret.to_owned(),
            digest: *blake3::hash(secret.as_bytes()).as_bytes(),
        })
    }

    /// The token as `serve` and `handover` read it: from `file`, or from the environment's
    /// [`TOKEN_ENV`] when set and not empty (see [`WriteToken::load`]).
    pub fn from_file_or_env(file: Option<&Path>) -> Result<Option<WriteToken>> {
        WriteToken::load(
            file,
            std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()),
        )
    }

    /// The token from `file` or from the value of [`TOKEN_ENV`] (exactly one of them), or
    /// `None` when neither is set. A file's trailing newline is not part of the token.
    pub fn load(file: Option<&Path>, env: Option<String>) -> Result<Option<WriteToken>> {
        match (file, env) {
            (Some(_), Some(_)) => Err(Error::Config(format!(
                "both --write-token-file and {TOKEN_ENV} are set; set one"
            ))),
            (Some(path), None) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    Error::Config(format!("write token file {}: {e}", path.display()))
                })?;
                WriteToken::new(text.trim_end_matches(['\n', '\r'])).map(Some)
            }
            (None, Some(value)) => WriteToken::new(&value).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// Whether an `Authorization` header carries this token as `Bearer <token>`.
    pub fn admits(&self, header: Option<&HeaderValue>) -> bool {
        let Some(presented) = header
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
        else {
            return false;
        };
        let digest = blake3::hash(presented.as_bytes());
        bool::from(digest.as_bytes().ct_eq(&self.digest))
    }

    /// The `Authorization` header value this instance sends when it forwards a mutation.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "0123456789abcdef-token";

    #[test]
    fn admits_only_its_bearer_token() {
        let t = WriteToken::new(GOOD).unwrap();
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert!(t.admits(Some(&h(&format!("Bearer {GOOD}")))));
        assert!(t.admits(Some(&h(&format!("bearer {GOOD}")))));
        assert!(t.admits(Some(&h(&t.bearer()))));
        for bad in [
            String::new(),
            GOOD.to_owned(),
            format!("Basic {GOOD}"),
            format!("Bearer {GOOD}x"),
            format!("Bearer {}", &GOOD[..GOOD.len() - 1]),
            "Bearer ".to_owned(),
        ] {
            assert!(!t.admits(Some(&h(&bad))), "{bad:?}");
        }
        assert!(!t.admits(None));
        assert!(!format!("{t:?}").contains(GOOD));
    }

    #[test]
    fn weak_or_double_configuration_is_refused() {
        for weak in ["", "short", "has a space in it!", "tab\there-0123456789"] {
            assert!(WriteToken::new(weak).is_err(), "{weak:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, format!("{GOOD}\n")).unwrap();
        let from_file = WriteToken::load(Some(&file), None).unwrap().unwrap();
        assert!(from_file.admits(Some(
            &HeaderValue::from_str(&format!("Bearer {GOOD}")).unwrap()
        )));
        assert!(WriteToken::load(Some(&file), Some(GOOD.into())).is_err());
        assert!(WriteToken::load(Some(&dir.path().join("absent")), None).is_err());
        assert!(WriteToken::load(None, None).unwrap().is_none());
    }
}
