//! A real Prometheus server (Debian's `prometheus` package) scraping the given targets every
//! second, from its own temp dir, stopped on drop. The custom-checks test queries it the way
//! haddock does in production.

use crate::eventually;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Prometheus {
    pub url: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`host:port`, metrics at `/metrics`) and waits
    /// until it has scraped each of them once. Panics with instructions when it is not
    /// installed: the test must fail, never skip.
    pub async fn scraping(targets: &[String]) -> Prometheus {
        let bin = which("prometheus").unwrap_or_else(|| {
            panic!("prometheus not found: `apt-get install -y prometheus` (ci/setup.sh does)")
        });
        let dir = tempfile::tempdir().expect("temp dir");
        let list = targets
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: proxies\n    static_configs:\n      - targets: [{list}]\n"
            ),
        )
        .unwrap();
        let port = crate::stack::free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        let url = format!("http://127.0.0.1:{port}");
        let prometheus = Prometheus {
            url,
            child,
            _dir: dir,
        };
        let up = format!("{}/api/v1/query?query=up", prometheus.url);
        let want = targets.len();
        eventually(
            "Prometheus scraping every target",
            Duration::from_secs(60),
            || async {
                let v: serde_json::Value = reqwest::get(&up).await.ok()?.json().await.ok()?;
                let scraped = v["data"]["result"]
                    .as_array()?
                    .iter()
                    .filter(|r| r["value"][1] == "1")
                    .count();
                (scraped == want).then_some(())
            },
        )
        .await;
        prometheus
    }

    /// The server's log (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}
