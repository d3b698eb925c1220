//! What one instance's container is made of, decided from the spec alone.
//!
//! A [`ContainerPlan`] is the whole translation of a deploy spec into one container: its
//! deterministic name (also the locator instance id, see [`instance_name`]), the labels by which
//! a later run finds it again, env and args with their placeholders filled in, limits, volumes
//! and the Docker HEALTHCHECK timing. It lives apart from `docker` because it needs no engine:
//! the translation is unit-tested here, and `docker::Host::create_and_start` only sends it.
//! The [`labels`] are defined here too, so that `docker` depends on the plan and not the other
//! way round.

use crate::spec::{RestartPolicy, Spec};
use bollard::models::{
    ContainerCreateBody, EndpointSettings, HealthConfig, HostConfig, Mount, MountTypeEnum,
    NetworkingConfig, PortBinding, RestartPolicy as DockerRestart, RestartPolicyNameEnum,
};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// The labels haddock puts on every container it creates. They are part of the plan (this
/// module decides them); `docker` filters by them to find a release's containers again.
pub mod labels {
    /// Always `haddock`: what makes a container ours.
    pub const MANAGED_BY: &str = "org.haddock.managed-by";
    pub const SERVICE: &str = "org.haddock.service";
    pub const VERSION: &str = "org.haddock.version";
    /// The release that created the container.
    pub const RELEASE: &str = "org.haddock.release";
    /// The instance id registered in the locator (also the container name).
    pub const INSTANCE: &str = "org.haddock.instance";
    /// An accessory's name (`[[accessories]]`). Accessories do not carry [`SERVICE`]: nothing
    /// that looks for the service's instances (releases, heartbeats, drains) may find them.
    pub const ACCESSORY: &str = "org.haddock.accessory";
    /// The service whose spec declares the accessory.
    pub const ACCESSORY_OF: &str = "org.haddock.accessory-of";
}

/// Everything needed to create one instance's container; built from the spec by
/// [`ContainerPlan::new`] so that the translation is unit-tested without Docker.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerPlan {
    /// Unique, deterministic container name; also the locator instance id.
    pub name: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
    pub env: Vec<String>,
    pub cmd: Vec<String>,
    pub memory: u64,
    pub cpu_shares: u32,
    pub restart: RestartPolicy,
    pub network: Option<String>,
    /// `(volume name, mount point, read-only)`.
    pub volumes: Vec<(String, String, bool)>,
    /// Docker HEALTHCHECK timing from the spec: `(interval, timeout, retries, start period)`.
    pub health: (Duration, Duration, u32, Duration),
    pub stop_grace: Duration,
    /// `(host port, container port)`: TCP ports published on every address of the Docker host;
    /// host port 0 is chosen free on the host when the container is made
    /// (`docker::Host::create_and_start`), fixed for the container's life, read back by
    /// `docker::Host::address`. The
    /// service port, when the spec gives the target an `address` (proxies on other hosts reach
    /// the instance there); empty otherwise (reached by its IP on the spec's network).
    pub publish: Vec<(u16, u16)>,
    /// DNS servers (`container.dns`, accessories resolved to their `ip`).
    pub dns: Vec<String>,
}

impl ContainerPlan {
    /// The container of instance `n` (0-based) on target `host_index` for `release` of `tag`.
    pub fn new(spec: &Spec, tag: &str, release: &str, host_index: usize, n: u32) -> ContainerPlan {
        let name = instance_name(&spec.service.name, tag, release, host_index, n);
        let substitute = |s: &str| {
            s.replace("{port}", &spec.service.port.to_string())
                .replace("{instance}", &name)
                .replace("{version}", tag)
        };
        let mut labels: BTreeMap<String, String> = spec.service.labels.clone();
        labels.insert(labels::MANAGED_BY.into(), "haddock".into());
        labels.insert(labels::SERVICE.into(), spec.service.name.clone());
        labels.insert(labels::VERSION.into(), tag.into());
        labels.insert(labels::RELEASE.into(), release.into());
        labels.insert(labels::INSTANCE.into(), name.clone());
        let mut env: Vec<String> = spec
            .service
            .env
            .iter()
            .map(|(k, v)| format!("{k}={}", substitute(v)))
            .collect();
        env.push(format!("HADDOCK_SERVICE={}", spec.service.name));
        env.push(format!("HADDOCK_VERSION={tag}"));
        env.push(format!("HADDOCK_INSTANCE={name}"));
        let target = spec.targets.get(host_index);
        // Which host the instance runs on, as the locator records it (`docker_host`): a
        // service that reads through its peers skips the instances of its own host.
        if let Some(t) = target {
            env.push(format!("HADDOCK_HOST={}", t.host));
        }
        let publish = match target {
            Some(t) if t.address.is_some() => vec![(0, spec.service.port)],
            _ => Vec::new(),
        };
        let h = &spec.health;
        ContainerPlan {
            image: spec.image_ref(tag),
            labels,
            env,
            cmd: spec.service.args.iter().map(|a| substitute(a)).collect(),
            memory: spec.container.memory.as_u64(),
            cpu_shares: spec.container.cpu_shares,
            restart: spec.container.restart_policy(),
            network: spec.container.network.clone(),
            volumes: spec
                .container
                .volumes
                .iter()
                .map(|v| (v.name.clone(), v.mount.clone(), v.read_only))
                .collect(),
            health: (h.interval, h.timeout, h.fall, h.start_deadline),
            stop_grace: spec.container.stop_grace,
            publish,
            dns: spec.dns_servers(),
            name,
        }
    }

    /// The create body. `image_has_healthcheck`: the image's HEALTHCHECK command is kept and only
    /// its timing comes from the spec (an image without one gets none: Docker would need a command).
    pub fn create_body(&self, image_has_healthcheck: bool) -> ContainerCreateBody {
        let ns = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        let (interval, timeout, retries, start) = self.health;
        let restart = docker_restart(self.restart);
        let mounts = self
            .volumes
            .iter()
            .map(|(name, target, read_only)| Mount {
                typ: Some(MountTypeEnum::VOLUME),
                source: Some(name.clone()),
                target: Some(target.clone()),
                read_only: Some(*read_only),
                ..Default::default()
            })
            .collect();
        let port = |p: u16| format!("{p}/tcp");
        let published = !self.publish.is_empty();
        ContainerCreateBody {
            image: Some(self.image.clone()),
            cmd: if self.cmd.is_empty() {
                None
            } else {
                Some(self.cmd.clone())
            },
            env: Some(self.env.clone()),
            labels: Some(self.labels.clone().into_iter().collect()),
            stop_timeout: Some(i64::try_from(self.stop_grace.as_secs()).unwrap_or(i64::MAX)),
            exposed_ports: published.then(|| {
                self.publish
                    .iter()
                    .map(|&(_, c)| (port(c), HashMap::new()))
                    .collect()
            }),
            healthcheck: image_has_healthcheck.then(|| HealthConfig {
                test: None,
                interval: Some(ns(interval)),
                timeout: Some(ns(timeout)),
                retries: Some(i64::from(retries)),
                start_period: Some(ns(start)),
                start_interval: None,
            }),
            host_config: Some(HostConfig {
                memory: Some(i64::try_from(self.memory).unwrap_or(i64::MAX)),
                cpu_shares: Some(i64::from(self.cpu_shares)),
                restart_policy: Some(restart),
                mounts: Some(mounts),
                network_mode: self.network.clone(),
                dns: (!self.dns.is_empty()).then(|| self.dns.clone()),
                port_bindings: published.then(|| {
                    self.publish
                        .iter()
                        .map(|&(h, c)| {
                            // An empty host port is Docker's own pick (what `-p 8080` sends);
                            // haddock fixes one before creating (see `publish`).
                            let host_port = if h == 0 { String::new() } else { h.to_string() };
                            let binding = PortBinding {
                                host_ip: None,
                                host_port: Some(host_port),
                            };
                            (port(c), Some(vec![binding]))
                        })
                        .collect()
                }),
                ..Default::default()
            }),
            networking_config: self.network.as_ref().map(|n| NetworkingConfig {
                endpoints_config: Some(HashMap::from([(n.clone(), EndpointSettings::default())])),
            }),
            ..Default::default()
        }
    }
}

/// A spec restart policy as Docker's create body says it.
pub(crate) fn docker_restart(policy: RestartPolicy) -> DockerRestart {
    let (name, count) = match policy {
        RestartPolicy::No => (RestartPolicyNameEnum::NO, None),
        RestartPolicy::Always => (RestartPolicyNameEnum::ALWAYS, None),
        RestartPolicy::UnlessStopped => (RestartPolicyNameEnum::UNLESS_STOPPED, None),
        RestartPolicy::OnFailure(n) => (RestartPolicyNameEnum::ON_FAILURE, Some(i64::from(n))),
    };
    DockerRestart {
        name: Some(name),
        maximum_retry_count: count,
    }
}

/// `optimizer-1.4.2-<release>-h0-i1`: unique per release, host and instance; only characters
/// Docker accepts in names (anything else becomes `-`).
pub fn instance_name(service: &str, tag: &str, release: &str, host_index: usize, n: u32) -> String {
    let raw = format!("{service}-{tag}-{release}-h{host_index}-i{n}");
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        crate::spec::example()
    }

    #[test]
    fn a_plan_carries_labels_limits_volumes_and_substituted_args() {
        let plan = ContainerPlan::new(&spec(), "1.4.2", "r42", 0, 1);
        assert_eq!(plan.name, "optimizer-1.4.2-r42-h0-i1");
        assert_eq!(plan.image, "haddock/optimizer:1.4.2");
        assert_eq!(plan.labels[labels::MANAGED_BY], "haddock");
        assert_eq!(plan.labels[labels::SERVICE], "optimizer");
        assert_eq!(plan.labels[labels::VERSION], "1.4.2");
        assert_eq!(plan.labels[labels::RELEASE], "r42");
        assert_eq!(plan.labels["org.haddock.team"], "wan");
        assert_eq!(
            plan.cmd,
            [
                "serve",
                "--listen",
                "0.0.0.0:8080",
                "--cache",
                "/cache",
                "--instance-id",
                "optimizer-1.4.2-r42-h0-i1"
            ]
        );
        assert!(plan.env.contains(&"RUST_LOG=info".to_string()));
        assert!(plan.env.contains(&"HADDOCK_VERSION=1.4.2".to_string()));
        // The shipped spec answers /version with the version haddock releases.
        assert!(plan.env.contains(&"OPTIMIZER_VERSION=1.4.2".to_string()));

        let body = plan.create_body(true);
        let hc = body.host_config.as_ref().unwrap();
        assert_eq!(hc.memory, Some(256 * 1024 * 1024));
        assert_eq!(hc.cpu_shares, Some(512));
        assert_eq!(
            hc.restart_policy.as_ref().unwrap().name,
            Some(RestartPolicyNameEnum::UNLESS_STOPPED)
        );
        assert_eq!(hc.network_mode.as_deref(), Some("haddock"));
        let m = &hc.mounts.as_ref().unwrap()[0];
        assert_eq!(
            (m.source.as_deref(), m.target.as_deref()),
            (Some("optimizer-cache"), Some("/cache"))
        );
        assert_eq!(m.typ, Some(MountTypeEnum::VOLUME));
        assert_eq!(m.read_only, Some(false));
        let health = body.healthcheck.as_ref().unwrap();
        assert_eq!(health.test, None, "the image's HEALTHCHECK command is kept");
        assert_eq!(health.interval, Some(1_000_000_000));
        assert_eq!(health.retries, Some(3));
        assert_eq!(body.stop_timeout, Some(10));
        assert!(plan.create_body(false).healthcheck.is_none());
        assert_eq!(body.exposed_ports, None, "a spec publishes no port");
        assert_eq!(hc.port_bindings, None);
    }

    #[test]
    fn published_ports_are_exposed_and_bound() {
        let mut plan = ContainerPlan::new(&spec(), "1", "r", 0, 0);
        plan.publish = vec![(18080, 8080)];
        let body = plan.create_body(false);
        assert!(body.exposed_ports.unwrap().contains_key("8080/tcp"));
        let bindings = body.host_config.unwrap().port_bindings.unwrap();
        let b = bindings["8080/tcp"].as_ref().unwrap();
        assert_eq!(b[0].host_port.as_deref(), Some("18080"));
        assert_eq!(b[0].host_ip, None);
    }

    #[test]
    fn a_target_with_an_address_publishes_the_service_port_on_an_ephemeral_port() {
        let mut s = spec();
        s.targets[0].address = Some("10.213.1.2".into());
        let plan = ContainerPlan::new(&s, "1", "r", 0, 0);
        assert_eq!(plan.publish, [(0, 8080)]);
        assert!(plan
            .env
            .contains(&"HADDOCK_HOST=unix:///var/run/docker.sock".to_string()));
        let bindings = plan
            .create_body(false)
            .host_config
            .unwrap()
            .port_bindings
            .unwrap();
        let b = bindings["8080/tcp"].as_ref().unwrap();
        assert_eq!(b[0].host_port.as_deref(), Some(""), "Docker picks the port");
        // Without an address: reached on the network, nothing published.
        assert!(ContainerPlan::new(&spec(), "1", "r", 0, 0)
            .publish
            .is_empty());
    }

    #[test]
    fn on_failure_restart_keeps_its_retry_count() {
        let mut s = spec();
        s.container.restart = "on-failure:4".into();
        let body = ContainerPlan::new(&s, "1", "r", 0, 0).create_body(false);
        let rp = body.host_config.unwrap().restart_policy.unwrap();
        assert_eq!(rp.name, Some(RestartPolicyNameEnum::ON_FAILURE));
        assert_eq!(rp.maximum_retry_count, Some(4));
    }

    #[test]
    fn instance_names_are_docker_safe() {
        assert_eq!(
            instance_name("svc", "1.0+b/1", "r:1", 2, 0),
            "svc-1.0-b-1-r-1-h2-i0"
        );
    }
}
