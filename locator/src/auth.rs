//! Bearer tokens with names, roles and scopes: `read` (dashboards), `proxy` (session reports),
//! `deploy` (haddock).
//!
//! `deploy` and `proxy` imply `read`. Every token has a name, and a mutation is recorded under
//! the name of the token that made it (`who` in releases, locks, limit changes and operator
//! actions), not under whatever the client claims: `$USER` on a CI runner says nothing. A token
//! may be scoped to some services: it then changes nothing of any other service (reads stay
//! open to it, as to any token). Tokens come from a TOML file and/or the environment;
//! with none configured the locator never runs open: it creates a deploy token in its data
//! directory (mode 0600) on first start and logs where. Presented tokens are compared with
//! every known token in constant time, so timing does not reveal how much of a guess matched.

use crate::error::Error;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use subtle::{ConditionallySelectable, ConstantTimeEq};

/// What a route requires (spelled in lowercase in the tokens file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
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

/// The tokens file: named tokens (`[[token]]` with `name`, `role`, `secret` and optionally
/// `services`), and the older unnamed lists `deploy = ["…"]`, `read = ["…"]`, `proxy = ["…"]`
/// (their tokens are named `deploy-1`, `deploy-2`, … in file order).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensFile {
    #[serde(default)]
    pub deploy: Vec<String>,
    #[serde(default)]
    pub read: Vec<String>,
    #[serde(default)]
    pub proxy: Vec<String>,
    #[serde(default)]
    pub token: Vec<NamedToken>,
}

/// One `[[token]]` of the tokens file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedToken {
    pub name: String,
    pub role: Role,
    pub secret: String,
    /// The services it may change; all when absent.
    #[serde(default)]
    pub services: Option<Vec<String>>,
}

/// Who presented a valid token: its name and what it may change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    /// The services it may change; `None`: all.
    pub services: Option<Vec<String>>,
}

impl Identity {
    /// Whether this identity may change `service`.
    pub fn may_change(&self, service: &str) -> bool {
        self.services
            .as_ref()
            .is_none_or(|list| list.iter().any(|s| s == service))
    }
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
    #[error("token name {0:?}: 1..=64 characters of letters, digits, '-', '_', '.' and '@'")]
    BadName(String),
    #[error("token name {0:?} is given twice")]
    DuplicateName(String),
}

/// One known token.
#[derive(Clone)]
struct Entry {
    secret: Vec<u8>,
    role: Role,
    identity: Identity,
}

/// The known tokens.
#[derive(Clone, Default)]
pub struct Tokens {
    entries: Vec<Entry>,
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

    /// Adds an unnamed token: it is named after its role and position (`deploy-2`).
    pub fn add(&mut self, role: Role, token: &str) -> Result<(), TokensError> {
        let n = self.entries.iter().filter(|e| e.role == role).count() + 1;
        let name = format!("{}-{n}", role.name());
        self.add_named(role, token, &name, None)
    }

    /// Adds a token under `name`, limited to `services` when given.
    pub fn add_named(
        &mut self,
        role: Role,
        token: &str,
        name: &str,
        services: Option<Vec<String>>,
    ) -> Result<(), TokensError> {
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokensError::BadToken(name.to_string()));
        }
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
        {
            return Err(TokensError::BadName(name.to_string()));
        }
        if self.entries.iter().any(|e| e.identity.name == name) {
            return Err(TokensError::DuplicateName(name.to_string()));
        }
        self.entries.push(Entry {
            secret: token.as_bytes().to_vec(),
            role,
            identity: Identity {
                name: name.to_string(),
                services,
            },
        });
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
            for t in parsed.token {
                tokens.add_named(t.role, &t.secret, &t.name, t.services)?;
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

    /// Checks an `Authorization` header value against `need`; who presented it.
    pub fn check(&self, authorization: Option<&[u8]>, need: Role) -> Result<Identity, Error> {
        let presented = authorization
            .and_then(|h| {
                h.strip_prefix(b"Bearer ")
                    .or_else(|| h.strip_prefix(b"bearer "))
            })
            .map(|t| t.trim_ascii())
            .filter(|t| !t.is_empty())
            .ok_or(Error::Unauthorized)?;
        // Look at every entry, without early exit, accumulating the roles that match and
        // remembering the first entry that matched (an index, selected in constant time).
        let mut roles = 0u8;
        let mut found = u32::MAX;
        for (i, e) in self.entries.iter().enumerate() {
            let hit = e.secret.as_slice().ct_eq(presented);
            roles |= u8::conditional_select(&0, &e.role.bit(), hit);
            let first = hit & found.ct_eq(&u32::MAX);
            found = u32::conditional_select(&found, &(i as u32), first);
        }
        if roles == 0 {
            return Err(Error::Unauthorized);
        }
        let ok = match need {
            Role::Read => true,
            Role::Deploy | Role::Proxy => roles & need.bit() != 0,
        };
        if ok {
            Ok(self.entries[found as usize].identity.clone())
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
    fn named_and_scoped_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens.toml");
        std::fs::write(
            &file,
            "deploy = [\"old\"]\n\
             [[token]]\nname = \"ci\"\nrole = \"deploy\"\nsecret = \"s1\"\nservices = [\"opt\"]\n\
             [[token]]\nname = \"alice@ops\"\nrole = \"deploy\"\nsecret = \"s2\"\n",
        )
        .unwrap();
        let (t, _) = Tokens::load(Some(&file), |_| None, dir.path()).unwrap();
        let ci = t.check(Some(b"Bearer s1"), Role::Deploy).unwrap();
        assert_eq!(ci.name, "ci");
        assert!(ci.may_change("opt") && !ci.may_change("other"));
        let alice = t.check(Some(b"Bearer s2"), Role::Deploy).unwrap();
        assert_eq!(alice.name, "alice@ops");
        assert!(alice.may_change("anything"));
        assert_eq!(
            t.check(Some(b"Bearer old"), Role::Deploy).unwrap().name,
            "deploy-1"
        );
        for (bad, says) in [
            ("[[token]]\nname = \"a b\"\nrole = \"read\"\nsecret = \"x\"\n", "token name"),
            ("[[token]]\nname = \"a\"\nrole = \"admin\"\nsecret = \"x\"\n", "unknown variant"),
            ("[[token]]\nname = \"a\"\nrole = \"read\"\nsecret = \"x\"\n[[token]]\nname = \"a\"\nrole = \"read\"\nsecret = \"y\"\n", "twice"),
            ("[[token]]\nname = \"a\"\nrole = \"read\"\n", "missing field"),
        ] {
            std::fs::write(&file, bad).unwrap();
            let err = Tokens::load(Some(&file), |_| None, dir.path()).unwrap_err();
            assert!(err.to_string().contains(says), "{bad}: {err}");
        }
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
