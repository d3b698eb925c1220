//! Real second Docker engines on this machine, for tests that release across several hosts:
//! a thin owner of `ci/testhosts.sh` (docs/development.md, "Test hosts"). Shared by haddock's
//! Docker tests (included by path) and the end-to-end crate, so it depends on std only.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

fn repo_root() -> PathBuf {
    // Both crates that include this file sit one level below the repository root.
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Real second Docker engines on this machine (`ci/testhosts.sh`): host `i` (1-based) is a
/// dockerd in its own network namespace at `tcp://10.213.<i>.2:2376`, reached over TLS with
/// client certificates like a remote host. Started empty: [`TestHosts::load`] copies images from
/// the machine's engine. Dropping it runs `ci/testhosts.sh down` (also when the test panics),
/// which removes the engines with every container and all their state.
///
/// The hosts have fixed names and addresses, so one test at a time on the whole machine: the
/// script's lock is held for this value's life (by a `flock` child; a killed test releases it).
#[derive(Debug)]
pub struct TestHosts {
    pub n: u32,
    lock: Child,
}

impl TestHosts {
    pub const STATE_DIR: &'static str = "/var/tmp/haddock-testhosts";
    const LOCK: &'static str = "/run/lock/haddock-testhosts.lock";

    fn script(args: &[&str]) -> std::process::Output {
        Command::new(repo_root().join("ci/testhosts.sh"))
            .args(args)
            .env("HADDOCK_TESTHOSTS_LOCK_HELD", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("ci/testhosts.sh {args:?}: {e}"))
    }

    /// Brings up hosts 1..=n (after clearing whatever a killed earlier run left).
    pub fn up(n: u32) -> TestHosts {
        use std::io::BufRead;
        let mut lock = Command::new("flock")
            .args([
                "-w",
                "900",
                Self::LOCK,
                "-c",
                "echo locked; exec cat >/dev/null",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("flock runs (util-linux)");
        let mut line = String::new();
        std::io::BufReader::new(lock.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked", "no lock on {} in 15 min", Self::LOCK);
        // From here on Drop runs `down`, whatever fails below.
        let hosts = TestHosts { n, lock };
        let down = Self::script(&["down"]);
        assert!(down.status.success(), "{}", text(&down));
        let t = Instant::now();
        let up = Self::script(&["up", &n.to_string()]);
        assert!(up.status.success(), "ci/testhosts.sh up {n}: {}", text(&up));
        eprintln!("{n} test host(s) up in {:?}", t.elapsed());
        hosts
    }

    /// The address of host `i` (also its published ports' address).
    pub fn ip(&self, i: u32) -> std::net::Ipv4Addr {
        assert!((1..=self.n).contains(&i), "test host {i} of {}", self.n);
        std::net::Ipv4Addr::new(10, 213, i as u8, 2)
    }

    /// The `host` string of host `i`.
    pub fn host(&self, i: u32) -> String {
        format!("tcp://{}:2376", self.ip(i))
    }

    /// The client certificate directory (`ca.pem`, `cert.pem`, `key.pem`: `DOCKER_CERT_PATH`).
    pub fn cert_dir(&self) -> PathBuf {
        Path::new(Self::STATE_DIR).join("client")
    }

    /// A `[[targets]]` table for host `i`.
    pub fn target(&self, i: u32, instances: u32) -> String {
        let file = |f: &str| self.cert_dir().join(f).display().to_string();
        format!(
            "\n[[targets]]\nhost = \"{}\"\ninstances = {instances}\ntls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\" }}\n",
            self.host(i),
            file("ca.pem"),
            file("cert.pem"),
            file("key.pem"),
        )
    }

    /// Copies images from the machine's engine onto every host (`docker save | docker load`
    /// over TLS).
    pub fn load(&self, images: &[&str]) {
        let mut args = vec!["load"];
        args.extend_from_slice(images);
        let out = Self::script(&args);
        assert!(out.status.success(), "ci/testhosts.sh load: {}", text(&out));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for TestHosts {
    fn drop(&mut self) {
        // Never panic here (a panic while unwinding aborts): report and go on.
        match Self::script(&["down"]) {
            out if out.status.success() => {}
            out => eprintln!("ci/testhosts.sh down failed: {}", text(&out)),
        }
        drop(self.lock.stdin.take()); // `cat` ends, `flock` exits: lock released
        let _ = self.lock.wait();
    }
}

impl TestHosts {
    /// The machine's own address on host `i`'s link (`10.213.<i>.1`): where services on the
    /// machine (a locator, a registry) are reached from that host's containers.
    pub fn machine_ip(&self, i: u32) -> std::net::Ipv4Addr {
        assert!((1..=self.n).contains(&i), "test host {i} of {}", self.n);
        std::net::Ipv4Addr::new(10, 213, i as u8, 1)
    }

    /// The `docker` CLI against host `i` (over TLS, with the client certificates).
    pub fn docker(&self, i: u32, args: &[String]) -> std::process::Output {
        Command::new("docker")
            .args(args)
            .env("DOCKER_HOST", self.host(i))
            .env("DOCKER_TLS_VERIFY", "1")
            .env("DOCKER_CERT_PATH", self.cert_dir())
            .output()
            .expect("docker CLI runs")
    }

    /// Takes host `i` off the network (`cut`) or puts it back (`heal`): a host lost
    /// mid-release, its engine and containers still running.
    pub fn link(&self, i: u32, up: bool) {
        let verb = if up { "heal" } else { "cut" };
        let out = Self::script(&[verb, &i.to_string()]);
        assert!(
            out.status.success(),
            "ci/testhosts.sh {verb} {i}: {}",
            text(&out)
        );
    }
}
