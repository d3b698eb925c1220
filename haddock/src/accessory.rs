//! Accessories: long-lived companion containers beside the service (`[[accessories]]` in the
//! spec; `haddock accessory boot|reboot|remove|status`), such as the DNS cache the optimizer
//! resolves through.
//!
//! An accessory is not released: it has one container per host it runs on, named
//! `SERVICE-NAME-hI` after the target's position, made from its full image reference. Its
//! labels name the accessory and the service that declares it but never carry the service
//! label, so releases, drains and the heartbeat agent, which find the service's instances by
//! that label, never see it: a release leaves it running untouched. `boot` is idempotent
//! (running ones are left alone), `reboot` replaces it host by host with the same fixed `ip`
//! (so instances that use it as their DNS server keep the right address), `remove` is refused
//! while running instances of the service use it as their DNS server.

use crate::docker::{container_ip, Host};
use crate::error::{Error, Result};
use crate::plan::{docker_restart, labels};
use crate::spec::{parse_port, Accessory, Spec};
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, EndpointIpamConfig,
    EndpointSettings, HostConfig, Mount, MountTypeEnum, NetworkingConfig, PortBinding,
};
use bollard::query_parameters::{CreateContainerOptions, StartContainerOptions};
use serde::Serialize;
use std::collections::HashMap;
use std::time::Duration;

/// How long a freshly started accessory must stay up before `boot`/`reboot` call it running:
/// a wrong argument makes most daemons exit at once, and the operator should hear it now.
const SETTLE: Duration = Duration::from_millis(800);

/// One accessory on one host, as `haddock accessory status` shows it (and the other verbs
/// report what they did).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AccessoryRow {
    pub accessory: String,
    pub host: String,
    pub container: String,
    /// Docker's state (`running`, `exited`, …); `None` when there is no container.
    pub state: Option<String>,
    pub image: Option<String>,
    /// Its address on its network.
    pub ip: Option<String>,
    pub started_at: Option<String>,
    /// What the verb did here: `created`, `started`, `running` (left alone), `replaced`,
    /// `removed`, `absent`.
    pub action: String,
}

/// `SERVICE-NAME-hI`: the accessory's container on target `host_index`.
pub fn container_name(service: &str, accessory: &str, host_index: usize) -> String {
    format!("{service}-{accessory}-h{host_index}")
}

/// The create body of accessory `a` of `spec`'s service.
pub fn create_body(spec: &Spec, a: &Accessory) -> ContainerCreateBody {
    let network = a.network(spec).map(String::from);
    let labels = HashMap::from([
        (labels::MANAGED_BY.to_string(), "haddock".to_string()),
        (labels::ACCESSORY.to_string(), a.name.clone()),
        (labels::ACCESSORY_OF.to_string(), spec.service.name.clone()),
    ]);
    let ports: Vec<(u16, u16, &str)> = a.ports.iter().filter_map(|p| parse_port(p).ok()).collect();
    let key = |c: u16, proto: &str| format!("{c}/{proto}");
    ContainerCreateBody {
        image: Some(a.image.clone()),
        cmd: (!a.args.is_empty()).then(|| a.args.clone()),
        env: Some(a.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        labels: Some(labels),
        stop_timeout: Some(i64::try_from(a.stop_grace.as_secs()).unwrap_or(i64::MAX)),
        exposed_ports: (!ports.is_empty()).then(|| {
            ports
                .iter()
                .map(|&(_, c, p)| (key(c, p), HashMap::new()))
                .collect()
        }),
        host_config: Some(HostConfig {
            memory: Some(i64::try_from(a.memory.as_u64()).unwrap_or(i64::MAX)),
            restart_policy: Some(docker_restart(a.restart_policy())),
            network_mode: network.clone(),
            mounts: Some(
                a.volumes
                    .iter()
                    .map(|v| Mount {
                        typ: Some(MountTypeEnum::VOLUME),
                        source: Some(v.name.clone()),
                        target: Some(v.mount.clone()),
                        read_only: Some(v.read_only),
                        ..Default::default()
                    })
                    .collect(),
            ),
            port_bindings: (!ports.is_empty()).then(|| {
                ports
                    .iter()
                    .map(|&(h, c, p)| {
                        let binding = PortBinding {
                            host_ip: None,
                            host_port: Some(h.to_string()),
                        };
                        (key(c, p), Some(vec![binding]))
                    })
                    .collect()
            }),
            ..Default::default()
        }),
        networking_config: network.map(|n| NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                n,
                EndpointSettings {
                    ipam_config: a.ip.map(|ip| EndpointIpamConfig {
                        ipv4_address: Some(ip.to_string()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )])),
        }),
        ..Default::default()
    }
}

/// The accessories a verb acts on: the one named, or every one of the spec.
pub fn select<'a>(spec: &'a Spec, name: Option<&str>) -> Result<Vec<&'a Accessory>> {
    match name {
        None => Ok(spec.accessories.iter().collect()),
        Some(n) => spec.accessory(n).map(|a| vec![a]).ok_or_else(|| {
            let known: Vec<&str> = spec.accessories.iter().map(|a| a.name.as_str()).collect();
            Error::BadInput(format!(
                "the spec of {} declares no accessory {n:?} (it declares: {})",
                spec.service.name,
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ))
        }),
    }
}

/// The hosts `a` runs on.
fn hosts_of<'h>(hosts: &'h [Host], a: &Accessory) -> Vec<&'h Host> {
    hosts.iter().filter(|h| a.runs_on(&h.name)).collect()
}

fn row(
    h: &Host,
    a: &Accessory,
    name: &str,
    c: Option<&ContainerInspectResponse>,
    spec: &Spec,
    action: &str,
) -> AccessoryRow {
    let state = c.and_then(|c| c.state.as_ref());
    AccessoryRow {
        accessory: a.name.clone(),
        host: h.name.clone(),
        container: name.to_string(),
        state: state
            .and_then(|s| s.status)
            .map(|s| s.to_string())
            .filter(|s| !s.is_empty()),
        image: c
            .and_then(|c| c.config.as_ref())
            .and_then(|c| c.image.clone()),
        ip: c
            .and_then(|c| container_ip(c, a.network(spec)))
            .map(|ip| ip.to_string()),
        started_at: state.and_then(|s| s.started_at.clone()),
        action: action.to_string(),
    }
}

fn is_running(c: &ContainerInspectResponse) -> bool {
    c.state
        .as_ref()
        .and_then(|s| s.status)
        .is_some_and(|s| s == ContainerStateStatusEnum::RUNNING)
}

/// Refuses (nothing changed) when a host `a` runs on lacks its image: accessories are made
/// from images the hosts hold (built or loaded there, as `image_source = "local"`).
async fn check_images(hosts: &[Host], a: &Accessory) -> Result<()> {
    for h in hosts_of(hosts, a) {
        if h.image(&a.image).await?.is_none() {
            return Err(Error::BadInput(format!(
                "Docker host {} does not hold image {} of accessory {}: build or load it there \
                 first (the DNS cache: bash ci/build-images.sh --component dnsmasq)",
                h.name, a.image, a.name
            )));
        }
    }
    Ok(())
}

/// Creates and starts `a`'s container on `h`, then checks that it stays up.
async fn create_and_start(h: &Host, spec: &Spec, a: &Accessory, name: &str) -> Result<()> {
    let opts = CreateContainerOptions {
        name: Some(name.to_string()),
        ..Default::default()
    };
    let id = h
        .engine()
        .create_container(Some(opts), create_body(spec, a))
        .await
        .map_err(|e| Error::docker(&h.name, format!("create accessory container {name}"), e))?
        .id;
    start(h, &id, name).await
}

async fn start(h: &Host, id: &str, name: &str) -> Result<()> {
    h.engine()
        .start_container(id, None::<StartContainerOptions>)
        .await
        .map_err(|e| Error::docker(&h.name, format!("start accessory container {name}"), e))?;
    tokio::time::sleep(SETTLE).await;
    match h.inspect(id).await? {
        Some(c) if is_running(&c) => Ok(()),
        _ => Err(Error::BadInput(format!(
            "accessory container {name} on {} stopped right after it started; its log:\n{}",
            h.name,
            h.logs_tail(id, 20).await
        ))),
    }
}

/// `haddock accessory boot`: makes `a` run on every host it runs on. A running container is
/// left alone, a stopped one is started, a missing one is created.
pub async fn boot(hosts: &[Host], spec: &Spec, a: &Accessory) -> Result<Vec<AccessoryRow>> {
    check_images(hosts, a).await?;
    let mut rows = Vec::new();
    for h in hosts_of(hosts, a) {
        let name = container_name(&spec.service.name, &a.name, h.index);
        let action = match h.inspect(&name).await? {
            Some(c) if is_running(&c) => "running",
            Some(_) => {
                start(h, &name, &name).await?;
                "started"
            }
            None => {
                create_and_start(h, spec, a, &name).await?;
                "created"
            }
        };
        tracing::info!(host = %h.name, accessory = %a.name, container = %name, action, "accessory boot");
        let now = h.inspect(&name).await?;
        rows.push(row(h, a, &name, now.as_ref(), spec, action));
    }
    Ok(rows)
}

/// `haddock accessory reboot`: replaces `a`'s container host by host (stop, remove, create,
/// start) from the spec as it is now. With a fixed `ip` the new container has the old one's
/// address; the instances that use it as DNS server miss it only while it is replaced.
pub async fn reboot(hosts: &[Host], spec: &Spec, a: &Accessory) -> Result<Vec<AccessoryRow>> {
    check_images(hosts, a).await?;
    let mut rows = Vec::new();
    for h in hosts_of(hosts, a) {
        let name = container_name(&spec.service.name, &a.name, h.index);
        let existed = h.inspect(&name).await?.is_some();
        h.stop_and_remove(&name, a.stop_grace).await?;
        create_and_start(h, spec, a, &name).await?;
        let action = if existed { "replaced" } else { "created" };
        tracing::info!(host = %h.name, accessory = %a.name, container = %name, action, "accessory reboot");
        let now = h.inspect(&name).await?;
        rows.push(row(h, a, &name, now.as_ref(), spec, action));
    }
    Ok(rows)
}

/// `haddock accessory remove`: stops and removes `a` everywhere. Refused (nothing removed on
/// any host) while a running instance of the service has it as DNS server, unless `force`.
pub async fn remove(
    hosts: &[Host],
    spec: &Spec,
    a: &Accessory,
    force: bool,
) -> Result<Vec<AccessoryRow>> {
    if let (Some(ip), false) = (a.ip, force) {
        let ip = ip.to_string();
        for h in hosts_of(hosts, a) {
            for c in h.find(&spec.service.name, None).await? {
                let Some(inspect) = h.inspect(&c.id).await? else {
                    continue;
                };
                let uses = inspect
                    .host_config
                    .as_ref()
                    .and_then(|hc| hc.dns.as_ref())
                    .is_some_and(|d| d.contains(&ip));
                if c.running && uses {
                    return Err(Error::BadInput(format!(
                        "instance {} on {} uses accessory {} ({ip}) as its DNS server: release \
                         a spec without it first, or remove it anyway with --force",
                        c.name, h.name, a.name
                    )));
                }
            }
        }
    }
    let mut rows = Vec::new();
    for h in hosts_of(hosts, a) {
        let name = container_name(&spec.service.name, &a.name, h.index);
        let action = if h.inspect(&name).await?.is_some() {
            h.stop_and_remove(&name, a.stop_grace).await?;
            "removed"
        } else {
            "absent"
        };
        rows.push(row(h, a, &name, None, spec, action));
    }
    Ok(rows)
}

/// `haddock accessory status`: `a` on every host it runs on.
pub async fn status(hosts: &[Host], spec: &Spec, a: &Accessory) -> Result<Vec<AccessoryRow>> {
    let mut rows = Vec::new();
    for h in hosts_of(hosts, a) {
        let name = container_name(&spec.service.name, &a.name, h.index);
        let c = h.inspect(&name).await?;
        let action = if c.is_some() { "" } else { "absent" };
        rows.push(row(h, a, &name, c.as_ref(), spec, action));
    }
    Ok(rows)
}

/// Refuses a release (nothing changed) while an accessory the instances use as their DNS
/// server is not running on one of the target hosts: they would start with no resolver.
pub async fn check_dns(hosts: &[Host], spec: &Spec) -> Result<()> {
    for a in spec.dns_accessories() {
        for h in hosts_of(hosts, a) {
            let name = container_name(&spec.service.name, &a.name, h.index);
            if !h.inspect(&name).await?.is_some_and(|c| is_running(&c)) {
                return Err(Error::BadInput(format!(
                    "the instances use accessory {} as their DNS server (container.dns), but it \
                     is not running on {}: start it with `haddock accessory boot {} {}`",
                    a.name, h.name, spec.service.name, a.name
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        let text = crate::spec::EXAMPLE.to_string()
            + "\n[[accessories]]\nname = \"dns\"\nimage = \"haddock/dnsmasq:2.90\"\n\
               args = [\"--cache-size=500\"]\nports = [\"5353:53/udp\"]\nmemory = \"16MiB\"\n\
               ip = \"10.77.0.53\"\nvolumes = [{ name = \"dns-leases\", mount = \"/var/lib/misc\" }]\n";
        Spec::parse("t.toml", &text).unwrap()
    }

    #[test]
    fn the_container_is_the_accessory_and_never_an_instance_of_the_service() {
        let spec = spec();
        let a = spec.accessory("dns").unwrap();
        let body = create_body(&spec, a);
        let l = body.labels.as_ref().unwrap();
        assert_eq!(l.get(labels::ACCESSORY).map(String::as_str), Some("dns"));
        assert_eq!(
            l.get(labels::ACCESSORY_OF).map(String::as_str),
            Some("optimizer")
        );
        assert!(
            !l.contains_key(labels::SERVICE),
            "releases find instances by the service label"
        );
        assert_eq!(container_name("optimizer", "dns", 1), "optimizer-dns-h1");
        assert_eq!(body.image.as_deref(), Some("haddock/dnsmasq:2.90"));
        assert_eq!(body.cmd, Some(vec!["--cache-size=500".to_string()]));
        let hc = body.host_config.as_ref().unwrap();
        assert_eq!(hc.memory, Some(16 << 20));
        assert_eq!(hc.network_mode.as_deref(), Some("haddock"));
        let binding = &hc.port_bindings.as_ref().unwrap()["53/udp"];
        assert_eq!(
            binding.as_ref().unwrap()[0].host_port.as_deref(),
            Some("5353")
        );
        assert_eq!(
            hc.mounts.as_ref().unwrap()[0].target.as_deref(),
            Some("/var/lib/misc")
        );
        let endpoint = &body
            .networking_config
            .as_ref()
            .unwrap()
            .endpoints_config
            .as_ref()
            .unwrap()["haddock"];
        assert_eq!(
            endpoint
                .ipam_config
                .as_ref()
                .and_then(|c| c.ipv4_address.as_deref()),
            Some("10.77.0.53")
        );
    }

    #[test]
    fn an_unknown_accessory_is_bad_input_naming_the_known_ones() {
        let spec = spec();
        assert_eq!(select(&spec, None).unwrap().len(), 1);
        let e = select(&spec, Some("cache")).unwrap_err();
        assert!(e.to_string().contains("declares: dns"), "{e}");
        assert_eq!(e.exit_code(), crate::error::exit::BAD_INPUT);
    }
}
