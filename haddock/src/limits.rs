//! Memory and CPU limits of a service's running instances, changed in place (`haddock update`).
//!
//! A limit is a cgroup setting that Docker changes on a running container (Engine API
//! `POST /containers/{id}/update`): the process keeps running, its connections and its cache
//! stay, so raising a cap as demand grows needs no release. [`Update::plan`] looks at every
//! running instance of the service on every host first and refuses, before anything changes,
//! a memory cap below what an instance uses now: Docker would apply it at once, the kernel
//! would reclaim the page cache and then OOM-kill the process. [`Update::apply`] then changes
//! each instance and checks, by inspecting it again, that the limit holds and the container
//! was not restarted.

use crate::docker::Host;
use crate::error::{Error, Result};
use crate::output::Output;
use locator_wire::api::{InstanceLimits, NewLimitsChange};
use serde::Serialize;

/// The smallest cap `haddock update` sends: Docker's own minimum (it refuses less). A spec
/// asks at least 16MiB to start a service; on a running one the check that matters is the
/// instance's use, which [`Update::plan`] makes.
pub const MIN_MEMORY: u64 = 6 * 1024 * 1024;

/// What `haddock update` sets; `None` leaves a limit as it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Memory cap in bytes.
    pub memory: Option<u64>,
    /// CPUs (Docker's `NanoCpus` / 1e9), e.g. 1.5.
    pub cpus: Option<f64>,
}

impl Limits {
    /// Checks the requested limits themselves (bad input, exit 2, nothing changed).
    pub fn check(&self) -> Result<()> {
        if self.memory.is_none() && self.cpus.is_none() {
            return Err(Error::BadInput(
                "nothing to change: give --memory and/or --cpus".into(),
            ));
        }
        if let Some(m) = self.memory.filter(|m| *m < MIN_MEMORY) {
            return Err(Error::BadInput(format!(
                "--memory {} is below Docker's minimum memory cap of 6MiB",
                bytesize::ByteSize(m).to_string_as(true)
            )));
        }
        if let Some(c) = self
            .cpus
            .filter(|c| !(c.is_finite() && *c >= 0.01 && *c <= 1024.0))
        {
            return Err(Error::BadInput(format!(
                "--cpus {c} is not a CPU count (0.01..=1024)"
            )));
        }
        Ok(())
    }

    fn nano_cpus(&self) -> Option<i64> {
        // In range after `check`: at most 1.024e12, far inside i64.
        self.cpus.map(|c| (c * 1e9).round() as i64)
    }
}

/// One instance's limits before and after (`null` = none set).
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub host: String,
    pub instance: String,
    pub version: String,
    pub memory_before: Option<u64>,
    pub memory_after: Option<u64>,
    pub cpus_before: Option<f64>,
    pub cpus_after: Option<f64>,
    /// What the instance used when the change was planned.
    pub memory_used: Option<u64>,
}

/// The locator's record of applied `changes` (`who`, each instance from → to), for the
/// instances the locator knows (`known`: a container of a failed release may run unregistered).
/// Only the limits `want` changed are recorded; 0 stands for "none set".
pub fn record(changes: &[Change], want: Limits, who: &str, known: &[String]) -> NewLimitsChange {
    let nano = |cpus: Option<f64>| cpus.map_or(0, |c| (c * 1e9).round() as u64);
    NewLimitsChange {
        who: who.to_string(),
        instances: changes
            .iter()
            .filter(|c| known.contains(&c.instance))
            .map(|c| InstanceLimits {
                id: c.instance.clone(),
                memory_from: want.memory.map(|_| c.memory_before.unwrap_or(0)),
                memory_to: want.memory.map(|_| c.memory_after.unwrap_or(0)),
                nano_cpus_from: want.cpus.map(|_| nano(c.cpus_before)),
                nano_cpus_to: want.cpus.map(|_| nano(c.cpus_after)),
            })
            .collect(),
    }
}

/// A checked plan: every running instance of the service, with its limits now.
#[derive(Debug)]
pub struct Update {
    want: Limits,
    targets: Vec<Target>,
}

#[derive(Debug)]
struct Target {
    host: usize,
    id: String,
    change: Change,
    memory_swap: Option<i64>,
    started_at: Option<String>,
}

fn positive(v: Option<i64>) -> Option<u64> {
    v.and_then(|v| u64::try_from(v).ok()).filter(|v| *v > 0)
}

impl Update {
    /// Finds the running instances of `service` on every host and checks `want` against each;
    /// changes nothing. A memory cap below an instance's current use is refused unless `force`.
    pub async fn plan(hosts: &[Host], service: &str, want: Limits, force: bool) -> Result<Update> {
        want.check()?;
        let mut targets = Vec::new();
        for (h, host) in hosts.iter().enumerate() {
            // Docker refuses more CPUs than the host has, but only when applying: ask first.
            if let (Some(want), Some(has)) = (want.cpus, host.cpus().await?) {
                if want > f64::from(has) {
                    return Err(Error::BadInput(format!(
                        "--cpus {want}: Docker host {} has {has} CPU(s); nothing was changed",
                        host.name
                    )));
                }
            }
            for c in host
                .find(service, None)
                .await?
                .into_iter()
                .filter(|c| c.running)
            {
                let Some(inspect) = host.inspect(&c.id).await? else {
                    continue; // removed meanwhile (a release ending): nothing to change
                };
                let hc = inspect.host_config.unwrap_or_default();
                let memory_before = positive(hc.memory);
                let used = host.memory_usage(&c.id).await?;
                if let (Some(cap), false) = (want.memory, force) {
                    let Some(used) = used else {
                        return Err(Error::BadInput(format!(
                            "Docker host {} does not say how much memory instance {} uses, so a \
                             new cap cannot be checked against it. Nothing was changed; --force \
                             applies it anyway",
                            host.name, c.instance
                        )));
                    };
                    if cap <= used {
                        return Err(Error::BadInput(format!(
                            "instance {} on {} uses {} now; a cap of {} below that makes the \
                             kernel reclaim its cache and then OOM-kill it (Docker applies a cap \
                             at once). Nothing was changed; --force applies it anyway",
                            c.instance,
                            host.name,
                            bytesize::ByteSize(used).to_string_as(true),
                            bytesize::ByteSize(cap).to_string_as(true)
                        )));
                    }
                }
                targets.push(Target {
                    host: h,
                    id: c.id.clone(),
                    memory_swap: hc.memory_swap,
                    started_at: inspect.state.and_then(|s| s.started_at),
                    change: Change {
                        host: host.name.clone(),
                        instance: c.instance.clone(),
                        version: c.version.clone(),
                        memory_before,
                        memory_after: want.memory.or(memory_before),
                        cpus_before: positive(hc.nano_cpus).map(|n| n as f64 / 1e9),
                        cpus_after: want.cpus.or(positive(hc.nano_cpus).map(|n| n as f64 / 1e9)),
                        memory_used: used,
                    },
                });
            }
        }
        if targets.is_empty() {
            return Err(Error::BadInput(format!(
                "service {service} has no running instance on its hosts"
            )));
        }
        Ok(Update { want, targets })
    }

    /// Changes every planned instance in place and checks each afterwards: the limits hold and
    /// the container was not restarted (`State.StartedAt` unchanged).
    pub async fn apply(self, hosts: &[Host], out: &Output) -> Result<Vec<Change>> {
        let mut done = Vec::new();
        for t in self.targets {
            let host = &hosts[t.host];
            // The container's swap allowance (Docker sets swap = 2 x memory by default) is
            // kept: a cap raised above the old swap limit is refused unless both move, and
            // unlimited swap (-1, forced where the host has no swap accounting) must be sent
            // again with the new cap.
            let memory = self.want.memory.and_then(|m| i64::try_from(m).ok());
            let memory_swap = match (memory, t.memory_swap, t.change.memory_before) {
                (Some(_), Some(-1), _) => Some(-1),
                (Some(m), Some(swap), Some(before)) if swap > 0 => {
                    Some(m + (swap - i64::try_from(before).unwrap_or(swap)).max(0))
                }
                _ => None,
            };
            if let Err(e) = host
                .update_limits(&t.id, memory, memory_swap, self.want.nano_cpus())
                .await
            {
                // Say which instances already run with the new limits.
                let changed: Vec<&str> =
                    done.iter().map(|c: &Change| c.instance.as_str()).collect();
                return Err(Error::Inconsistent(format!(
                    "{e}; updated before this: {}",
                    if changed.is_empty() {
                        "none".to_string()
                    } else {
                        changed.join(", ")
                    }
                )));
            }
            let after = host.inspect(&t.id).await?.ok_or_else(|| {
                Error::Inconsistent(format!(
                    "container {} vanished on {} during the update",
                    t.change.instance, host.name
                ))
            })?;
            let hc = after.host_config.unwrap_or_default();
            let started_at = after.state.and_then(|s| s.started_at);
            if started_at != t.started_at {
                return Err(Error::Inconsistent(format!(
                    "container {} on {} restarted during the update",
                    t.change.instance, host.name
                )));
            }
            if self.want.memory.is_some() && positive(hc.memory) != self.want.memory {
                return Err(Error::Inconsistent(format!(
                    "container {} on {} reports memory {:?} after the update",
                    t.change.instance, host.name, hc.memory
                )));
            }
            out.step(
                &format!(
                    "{} on {}: memory {} → {}, cpus {} → {}",
                    t.change.instance,
                    host.name,
                    show_bytes(t.change.memory_before),
                    show_bytes(t.change.memory_after),
                    show_cpus(t.change.cpus_before),
                    show_cpus(t.change.cpus_after),
                ),
                None,
            );
            done.push(t.change);
        }
        Ok(done)
    }
}

fn show_bytes(b: Option<u64>) -> String {
    b.map_or("none".into(), |b| bytesize::ByteSize(b).to_string_as(true))
}

fn show_cpus(c: Option<f64>) -> String {
    c.map_or("all".into(), |c| format!("{c}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requested_limits_are_checked_before_any_host_is_asked() {
        let none = Limits {
            memory: None,
            cpus: None,
        };
        assert!(none
            .check()
            .unwrap_err()
            .to_string()
            .contains("nothing to change"));
        let tiny = Limits {
            memory: Some(1 << 20),
            cpus: None,
        };
        assert!(tiny.check().unwrap_err().to_string().contains("6MiB"));
        for cpus in [0.0, -1.0, f64::NAN, 5000.0] {
            let bad = Limits {
                memory: None,
                cpus: Some(cpus),
            };
            assert_eq!(bad.check().unwrap_err().exit_code(), 2, "{cpus}");
        }
        let good = Limits {
            memory: Some(512 << 20),
            cpus: Some(1.5),
        };
        good.check().unwrap();
        assert_eq!(good.nano_cpus(), Some(1_500_000_000));
    }
}
