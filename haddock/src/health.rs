//! Is a new instance healthy? Docker's view (the container runs; its HEALTHCHECK, when the image
//! has one, is not `unhealthy`) and the HTTP readiness path on the instance address, with the
//! spec's rise/fall thresholds and start deadline.
//!
//! Docker health is a veto, the HTTP probe decides: Docker runs an image's first HEALTHCHECK only
//! one `interval` after start (API 1.41 has no start interval), so waiting for `healthy` would add
//! a whole interval to every release. Until the first successful probe haddock probes every
//! [`FAST_PROBE`] (at most the spec's interval); further successes toward `rise` are spaced by
//! the interval. During the canary the same probe runs every interval, and `fall` consecutive
//! failures count as a breach.
//!
//! Docker's view of a container ([`Liveness`]) is judged here, not in `docker`: it is a health
//! rule (what counts as dead, crashed or unhealthy), and `docker` only fetches the inspect data.

use crate::docker::Host;
use crate::error::Result;
use crate::spec::HealthSection;
use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum, HealthStatusEnum};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Probe period before the first success.
pub const FAST_PROBE: Duration = Duration::from_millis(50);

/// An HTTP readiness probe of one instance.
#[derive(Debug, Clone)]
pub struct Probe {
    http: reqwest::Client,
    url: String,
}

impl Probe {
    pub fn new(addr: SocketAddr, health: &HealthSection) -> Probe {
        Probe {
            http: reqwest::Client::builder()
                .timeout(health.timeout)
                .connect_timeout(health.timeout)
                .no_proxy()
                .build()
                .expect("a client without TLS always builds"),
            url: format!("http://{addr}{}", health.path),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// One probe: `Ok(())` on a 2xx answer, else what went wrong.
    pub async fn check(&self) -> std::result::Result<(), String> {
        match self.http.get(&self.url).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("GET {} answered {}", self.url, r.status())),
            Err(e) => Err(format!("GET {} failed: {}", self.url, root_cause(&e))),
        }
    }
}

pub(crate) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Counts consecutive probe outcomes against rise/fall.
#[derive(Debug, Clone, Default)]
pub struct Streak {
    pub successes: u32,
    pub failures: u32,
}

impl Streak {
    pub fn record(&mut self, ok: bool) {
        if ok {
            self.successes += 1;
            self.failures = 0;
        } else {
            self.failures += 1;
            self.successes = 0;
        }
    }
}

/// Why an instance did not become healthy (the caller adds the log lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotHealthy(pub String);

/// What a container's state says about it, for the health checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// Running; Docker health (when the image has a HEALTHCHECK) is not `unhealthy`.
    Running {
        docker_health: Option<HealthStatusEnum>,
    },
    /// Exited, dead, restarting after a crash, or OOM-killed: the reason.
    Dead(String),
    /// Running but Docker's HEALTHCHECK says unhealthy (after `fall` failed checks).
    Unhealthy(String),
}

fn code(c: Option<i64>) -> String {
    c.map_or_else(|| "?".into(), |c| c.to_string())
}

/// Judges an inspected container.
pub fn liveness(c: &ContainerInspectResponse) -> Liveness {
    let Some(state) = c.state.as_ref() else {
        return Liveness::Dead("no state reported".into());
    };
    if state.oom_killed == Some(true) {
        return Liveness::Dead(format!(
            "killed by the OOM killer (memory cap {:?})",
            c.host_config.as_ref().and_then(|h| h.memory)
        ));
    }
    let restarts = c.restart_count.unwrap_or(0);
    match state.status {
        Some(ContainerStateStatusEnum::RUNNING) if restarts == 0 => {}
        Some(ContainerStateStatusEnum::RUNNING | ContainerStateStatusEnum::RESTARTING) => {
            return Liveness::Dead(format!(
                "crashed and was restarted {restarts} time(s) (last exit code {})",
                code(state.exit_code)
            ));
        }
        other => {
            return Liveness::Dead(format!(
                "not running ({}; exit code {}{})",
                other
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "unknown".into()),
                code(state.exit_code),
                state
                    .error
                    .as_deref()
                    .filter(|e| !e.is_empty())
                    .map(|e| format!("; {e}"))
                    .unwrap_or_default()
            ));
        }
    }
    let health = state.health.as_ref().and_then(|h| h.status);
    if health == Some(HealthStatusEnum::UNHEALTHY) {
        let last = state
            .health
            .as_ref()
            .and_then(|h| h.log.as_ref())
            .and_then(|l| l.last())
            .and_then(|r| r.output.clone())
            .unwrap_or_default();
        return Liveness::Unhealthy(format!(
            "Docker HEALTHCHECK reports unhealthy: {}",
            last.trim()
        ));
    }
    Liveness::Running {
        docker_health: health,
    }
}

/// Waits until the container is running, not Docker-unhealthy, and its readiness path has
/// answered 2xx `rise` times in a row. Fails at once if the container dies, and at the start
/// deadline otherwise (naming the last probe error). `Err(Error)` is an infra error.
pub async fn wait_healthy(
    host: &Host,
    container: &str,
    probe: &Probe,
    health: &HealthSection,
    started: Instant,
) -> Result<std::result::Result<(), NotHealthy>> {
    let deadline = started + health.start_deadline;
    let mut streak = Streak::default();
    let mut last_error = String::from("no probe answered yet");
    loop {
        let Some(c) = host.inspect(container).await? else {
            return Ok(Err(NotHealthy("the container disappeared".into())));
        };
        match liveness(&c) {
            Liveness::Dead(why) | Liveness::Unhealthy(why) => return Ok(Err(NotHealthy(why))),
            Liveness::Running { .. } => {}
        }
        let outcome = probe.check().await;
        streak.record(outcome.is_ok());
        if let Err(e) = outcome {
            last_error = e;
        }
        if streak.successes >= health.rise {
            return Ok(Ok(()));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(Err(NotHealthy(format!(
                "not ready within the start deadline of {}: {last_error}",
                humantime::format_duration(health.start_deadline)
            ))));
        }
        let pause = if streak.successes == 0 {
            FAST_PROBE.min(health.interval)
        } else {
            health.interval
        };
        tokio::time::sleep(pause.min(deadline - now)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streak_resets_on_the_other_outcome() {
        let mut s = Streak::default();
        s.record(true);
        s.record(true);
        assert_eq!((s.successes, s.failures), (2, 0));
        s.record(false);
        assert_eq!((s.successes, s.failures), (0, 1));
        s.record(false);
        s.record(true);
        assert_eq!((s.successes, s.failures), (1, 0));
    }

    #[tokio::test]
    async fn a_probe_of_a_closed_port_names_the_url_and_the_cause() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let h = HealthSection {
            path: "/readyz".into(),
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(200),
            rise: 1,
            fall: 1,
            start_deadline: Duration::from_secs(1),
        };
        let err = Probe::new(addr, &h).check().await.unwrap_err();
        assert!(err.contains(&format!("http://{addr}/readyz")), "{err}");
    }
}
