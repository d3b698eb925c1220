//! The run directory: where pingora puts the upgrade socket (`upgrade.sock`) and the pid file.
//!
//! Whoever can create `upgrade.sock` before a graceful upgrade is handed the proxy's listening
//! sockets, and whoever can replace the pid file points signals elsewhere, so the directory
//! must be private. It is `--state-dir` when given, else `$XDG_RUNTIME_DIR/haddock-proxy`
//! (systemd's per-user runtime directory), else `/tmp/haddock-proxy-<uid>` — never the shared
//! temporary directory itself. A missing directory is created with mode 0700; an existing one
//! that another user owns or that everyone may write to is refused (on a shared `/tmp` another
//! user could have created it first).

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::ProxyError;

/// The default run directory under `runtime_dir` (`$XDG_RUNTIME_DIR`) or, without one, under
/// `tmp` with the user id in its name.
pub fn default_run_dir(runtime_dir: Option<&Path>, tmp: &Path, uid: u32) -> PathBuf {
    match runtime_dir {
        Some(dir) if dir.is_absolute() => dir.join("haddock-proxy"),
        _ => tmp.join(format!("haddock-proxy-{uid}")),
    }
}

/// The effective user id of this process: the owner of `/proc/self` (the proxy runs on Linux;
/// this avoids an unsafe `geteuid` call, which the workspace forbids).
pub fn current_uid() -> Result<u32, ProxyError> {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .map_err(|source| ProxyError::State {
            path: PathBuf::from("/proc/self"),
            source,
        })
}

/// Creates `dir` (mode 0700) if missing, and checks that it is a directory (not a symlink)
/// owned by `uid` that not everyone may write to.
pub fn ensure_private_dir(dir: &Path, uid: u32) -> Result<(), ProxyError> {
    let io = |source| ProxyError::State {
        path: dir.to_path_buf(),
        source,
    };
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(e)),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(io)?;
    let unsafe_dir = |why: String| {
        Err(ProxyError::UnsafeRunDir {
            path: dir.to_path_buf(),
            why,
        })
    };
    if !meta.file_type().is_dir() {
        return unsafe_dir("not a directory (a symlink is refused too)".into());
    }
    if meta.uid() != uid {
        return unsafe_dir(format!("owned by uid {}, not by us ({uid})", meta.uid()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o002 != 0 {
        return unsafe_dir(format!("writable by every user (mode {mode:o})"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn the_default_is_private_and_never_the_shared_temp_dir() {
        let runtime = Path::new("/run/user/1000");
        assert_eq!(
            default_run_dir(Some(runtime), Path::new("/tmp"), 1000),
            runtime.join("haddock-proxy")
        );
        // Without a runtime dir (or with a relative one, which would depend on the cwd).
        for r in [None, Some(Path::new("relative"))] {
            assert_eq!(
                default_run_dir(r, Path::new("/tmp"), 1000),
                Path::new("/tmp/haddock-proxy-1000")
            );
        }
    }

    #[test]
    fn a_missing_dir_is_created_with_mode_0700() {
        let tmp = tempfile::tempdir().unwrap();
        let uid = current_uid().unwrap();
        let dir = default_run_dir(None, tmp.path(), uid);
        ensure_private_dir(&dir, uid).unwrap();
        assert_eq!(mode(&dir), 0o700);
        // An existing private dir is accepted as it is.
        ensure_private_dir(&dir, uid).unwrap();
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn a_dir_anyone_may_write_to_or_someone_else_owns_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let uid = current_uid().unwrap();
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let err = ensure_private_dir(&shared, uid).unwrap_err();
        assert!(matches!(err, ProxyError::UnsafeRunDir { .. }), "{err}");

        let mine = tmp.path().join("mine");
        std::fs::create_dir(&mine).unwrap();
        let err = ensure_private_dir(&mine, uid + 1).unwrap_err();
        assert!(err.to_string().contains("owned by uid"), "{err}");

        // A symlink planted where the dir should be, even to a private dir of ours.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&mine, &link).unwrap();
        let err = ensure_private_dir(&link, uid).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
    }
}
