//! The run directory: where pingora puts the upgrade socket (`upgrade.sock`) and the pid file.
//!
//! Whoever can create `upgrade.sock` before a graceful upgrade is handed the proxy's listening
//! sockets, and whoever can replace the pid file points signals elsewhere, so the directory
//! must be private. It is `--state-dir` when given, else `$XDG_RUNTIME_DIR/haddock-proxy-<service>`
//! (systemd's per-user runtime directory), else `/tmp/haddock-proxy-<uid>-<service>` — never the
//! shared temporary directory itself, and one per service: proxies of two services run by one
//! user must not share an upgrade socket (an `--upgrade` of one would take over the other's
//! listening sockets). A missing directory is created with mode 0700; an existing one that
//! another user owns or that other users may write to (group or everyone) is refused (on a
//! shared `/tmp` another user could have created it first).

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::ProxyError;

/// The default run directory of `service`'s proxy under `runtime_dir` (`$XDG_RUNTIME_DIR`) or,
/// without one, under `tmp` with the user id in its name. `service` is a checked service name
/// ([`crate::config::service_name`]: no `/`).
pub fn default_run_dir(runtime_dir: Option<&Path>, tmp: &Path, uid: u32, service: &str) -> PathBuf {
    match runtime_dir {
        Some(dir) if dir.is_absolute() => dir.join(format!("haddock-proxy-{service}")),
        _ => tmp.join(format!("haddock-proxy-{uid}-{service}")),
    }
}

/// The effective user id of this process (`geteuid`; not the owner of `/proc/self`, which is
/// root for a process that is not dumpable, as one with file capabilities).
pub fn current_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Creates `dir` (mode 0700) if missing, and checks that it is a directory (not a symlink)
/// owned by `uid` that no other user may write to (neither its group nor everyone).
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
    if mode & 0o022 != 0 {
        return unsafe_dir(format!("writable by other users (mode {mode:o})"));
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
            default_run_dir(Some(runtime), Path::new("/tmp"), 1000, "svc"),
            runtime.join("haddock-proxy-svc")
        );
        // Without a runtime dir (or with a relative one, which would depend on the cwd).
        for r in [None, Some(Path::new("relative"))] {
            assert_eq!(
                default_run_dir(r, Path::new("/tmp"), 1000, "svc"),
                Path::new("/tmp/haddock-proxy-1000-svc")
            );
        }
        // One per service: another service's proxy never shares the upgrade socket.
        assert_ne!(
            default_run_dir(Some(runtime), Path::new("/tmp"), 1000, "svc"),
            default_run_dir(Some(runtime), Path::new("/tmp"), 1000, "other")
        );
    }

    #[test]
    fn the_uid_is_the_effective_one() {
        // Not derived from /proc/self (root-owned for a non-dumpable process): the kernel's.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let uids = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap();
        let euid: u32 = uids.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert_eq!(current_uid(), euid);
    }

    #[test]
    fn a_missing_dir_is_created_with_mode_0700() {
        let tmp = tempfile::tempdir().unwrap();
        let uid = current_uid();
        let dir = default_run_dir(None, tmp.path(), uid, "svc");
        ensure_private_dir(&dir, uid).unwrap();
        assert_eq!(mode(&dir), 0o700);
        // An existing private dir is accepted as it is.
        ensure_private_dir(&dir, uid).unwrap();
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn a_dir_others_may_write_to_or_someone_else_owns_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let uid = current_uid();
        // Writable by everyone, or by the group (its other members are other users).
        for (name, mode) in [
            ("shared", 0o1777),
            ("group", 0o770),
            ("group-sticky", 0o1730),
        ] {
            let dir = tmp.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = ensure_private_dir(&dir, uid).unwrap_err();
            assert!(
                matches!(err, ProxyError::UnsafeRunDir { .. }),
                "{mode:o}: {err}"
            );
            assert!(err.to_string().contains("writable by other users"), "{err}");
        }
        // Readable by the group is fine (mode 0750: nobody else may create the socket).
        let readable = tmp.path().join("readable");
        std::fs::create_dir(&readable).unwrap();
        std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o750)).unwrap();
        ensure_private_dir(&readable, uid).unwrap();

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
