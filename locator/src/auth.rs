//! Bearer tokens with roles: `read` (dashboards), `proxy` (session reports), `deploy` (haddock).
//!
//! `deploy` and `proxy` imply `read`. Tokens come from a TOML file and/or the environment;
//! with none configured the locator never runs open: it creates a deploy token in its data
//! directory (mode 0600) on first start and logs where. Presented tokens are compared with
//! every known token in constant time, so timing does not reveal how much of a guess matched.

use crate::error::Error;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use subtle::{ConditionallySelectable, ConstantTimeEq};

/// What a route requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Read,
    Deploy,
    Proxy,
}

impl Role {
    fn bit(self) -> u8 {
        match self {
            Role::Read => 1,
            Role::Deploy => 2,
            Role::Proxy => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Deploy => "deploy",
            Role::Proxy => "proxy",
        }
    }
}

/// The tokens file: `deploy = ["…"]`, `read = ["…"]`, `proxy = ["…"]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensFile {
    #[serde(default)]
    pub deploy: Vec<String>,
    #[serde(default)]
    pub read: Vec<String>,
    #[serde(default)]
    pub proxy: Vec<String>,
}

/// Why tokens could not be loaded (a startup error, reported by `main`).
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}: tokens must be non-empty and printable ASCII without spaces")]
    BadToken(String),
}

/// The known tokens.
#[derive(Clone, Default)]
pub struct Tokens {
    entries: Vec<(Vec<u8>, Role)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        write!(f, "Tokens({} configured)", self.entries.len())
    }
}

impl Tokens {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, role: Role, token: &str) -> Result<(), TokensError> {
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokensError::BadToken(role.name().to_string()));
        }
        self.entries.push((token.as_bytes().to_vec(), role));
        Ok(())
    }

    pub fn with(mut self, role: Role, token: &str) -> Self {
        // Used by tests and the benchmark with fixed, valid tokens.
        self.add(role, token).expect("a valid token");
        self
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Loads tokens from `file` (if given) and the `LOCATOR_{DEPLOY,READ,PROXY}_TOKENS`
    /// variables (comma-separated, read through `env`). With none at all, reads or creates
    /// `<data_dir>/deploy.token`; the second value is then that file's path.
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
        data_dir: &Path,
    ) -> Result<(Tokens, Option<PathBuf>), TokensError> {
        let mut tokens = Tokens::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| TokensError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            let parsed: TokensFile = toml::from_str(&text).map_err(|e| TokensError::Parse {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
            for (role, list) in [
                (Role::Deploy, &parsed.deploy),
                (Role::Read, &parsed.read),
                (Role::Proxy, &parsed.proxy),
            ] {
                for t in list {
                    tokens.add(role, t)?;
                }
            }
        }
        for (role, var) in [
            (Role::Deploy, "LOCATOR_DEPLOY_TOKENS"),
            (Role::Read, "LOCATOR_READ_TOKENS"),
            (Role::Proxy, "LOCATOR_PROXY_TOKENS"),
        ] {
            if let Some(list) = env(var) {
                for t in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                    tokens.add(role, t)?;
                }
            }
        }
        if !tokens.is_empty() {
            return Ok((tokens, None));
        }
        let path = data_dir.join("deploy.token");
        let token = read_or_create_token(&path)?;
        tokens.add(Role::Deploy, &token)?;
        Ok((tokens, Some(path)))
    }

    /// Checks an `Authorization` header value against `need`.
    pub fn check(&self, authorization: Option<&[u8]>, need: Role) -> Result<(), Error> {
        let presented = authorization
            .and_then(|h| {
                h.strip_prefix(b"Bearer ")
                    .or_else(|| h.strip_prefix(b"bearer "))
            })
            .map(|t| t.trim_ascii())
            .filter(|t| !t.is_empty())
            .ok_or(Error::Unauthorized)?;
        // Look at every entry, without early exit, accumulating the roles that match.
        let mut roles = 0u8;
        for (token, role) in &self.entries {
            let hit = token.as_slice().ct_eq(presented);
            roles |= u8::conditional_select(&0, &role.bit(), hit);
        }
        if roles == 0 {
            return Err(Error::Unauthorized);
        }
        let ok = match need {
            Role::Read => true,
            Role::Deploy | Role::Proxy => roles & need.bit() != 0,
        };
        if ok {
            Ok(())
        } else {
            Err(Error::Forbidden(need.name()))
        }
    }
}

fn read_or_create_token(path: &Path) -> Result<String, TokensError> {
    let io = |source| TokensError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(t) => return Ok(t.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(format!("{token}\n").as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    tracing::warn!(path = %path.display(), "no token configured: created a deploy token; give it to haddock (HADDOCK_TOKEN)");
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::new()
            .with(Role::Deploy, "dep")
            .with(Role::Read, "rd")
            .with(Role::Proxy, "px")
    }

    #[test]
    fn roles() {
        let t = tokens();
        assert_eq!(t.check(None, Role::Read), Err(Error::Unauthorized));
        assert_eq!(
            t.check(Some(b"Bearer nope"), Role::Read),
            Err(Error::Unauthorized)
        );
        assert_eq!(
            t.check(Some(b"Basic dep"), Role::Read),
            Err(Error::Unauthorized)
        );
        for tok in ["dep", "rd", "px"] {
            t.check(Some(format!("Bearer {tok}").as_bytes()), Role::Read)
                .unwrap();
        }
        t.check(Some(b"Bearer dep"), Role::Deploy).unwrap();
        assert_eq!(
            t.check(Some(b"Bearer rd"), Role::Deploy),
            Err(Error::Forbidden("deploy"))
        );
        assert_eq!(
            t.check(Some(b"Bearer px"), Role::Deploy),
            Err(Error::Forbidden("deploy"))
        );
        assert_eq!(
            t.check(Some(b"Bearer dep"), Role::Proxy),
            Err(Error::Forbidden("proxy"))
        );
        t.check(Some(b"Bearer px"), Role::Proxy).unwrap();
        assert_eq!(
            t.check(Some(b"Bearer de"), Role::Read),
            Err(Error::Unauthorized)
        );
    }

    #[test]
    fn file_env_and_generated_token() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens.toml");
        std::fs::write(&file, "deploy = [\"a\"]\nread = [\"b\"]\n").unwrap();
        let env = |k: &str| (k == "LOCATOR_PROXY_TOKENS").then(|| "p1, p2".to_string());
        let (t, generated) = Tokens::load(Some(&file), env, dir.path()).unwrap();
        assert!(generated.is_none());
        t.check(Some(b"Bearer p2"), Role::Proxy).unwrap();
        t.check(Some(b"Bearer a"), Role::Deploy).unwrap();

        std::fs::write(&file, "deploy = [\"a\"]\nadmin = [\"b\"]\n").unwrap();
        let err = Tokens::load(Some(&file), |_| None, dir.path()).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");

        let (t, generated) = Tokens::load(None, |_| None, dir.path()).unwrap();
        let path = generated.unwrap();
        let token = std::fs::read_to_string(&path).unwrap();
        t.check(
            Some(format!("Bearer {}", token.trim()).as_bytes()),
            Role::Deploy,
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (again, _) = Tokens::load(None, |_| None, dir.path()).unwrap();
        again
            .check(
                Some(format!("Bearer {}", token.trim()).as_bytes()),
                Role::Deploy,
            )
            .unwrap();
    }
}
