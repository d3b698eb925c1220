//! The spec's volumes on every Docker host: created before the first container that mounts
//! them, listed, inspected and removed by `haddock volume`.
//!
//! A volume outlives every release (the old and the new version share it), so haddock never
//! removes one by itself: only `haddock volume rm`, and only while no container on any host
//! mounts it. A volume the spec says how to make (`driver`, `driver_opts`, `size`) is created
//! with exactly that, labelled as haddock's; one that exists already must match, because Docker
//! cannot change a volume's driver or options in place and a silent mismatch would leave the
//! service on a volume that is not what its spec promises (a `size` never enforced). A volume
//! the spec only names accepts whatever volume of that name exists, as before.

use crate::docker::Host;
use crate::error::{Error, Result};
use crate::plan::labels;
use crate::spec::{Spec, VolumeMount};
use bollard::models::{Volume, VolumeCreateOptions};
use bollard::query_parameters::{ListContainersOptions, RemoveVolumeOptions};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// What [`ensure`] found on a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    /// The volume was missing and is now created as the spec says.
    Created,
    /// A volume of that name exists (and matches what the spec declares).
    Existing,
}

/// One spec volume on one host, as `haddock volume ls` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeRow {
    pub host: String,
    pub name: String,
    pub mount: String,
    pub exists: bool,
    pub driver: Option<String>,
    pub options: BTreeMap<String, String>,
    /// The capacity the volume enforces (a tmpfs `size=`), when it has one.
    pub size: Option<u64>,
    /// Created by haddock (labelled), or found as it was.
    pub managed_by_haddock: bool,
    /// Containers (any service's, running or not) that mount it on this host.
    pub mounted_by: Vec<String>,
    /// Differences between the spec and the volume on this host (empty when they agree).
    pub drift: Vec<String>,
}

/// Makes `v` exist on `host`: creates it as the spec declares when missing, and refuses
/// (nothing changed) when an existing volume differs from what the spec declares.
pub async fn ensure(host: &Host, service: &str, v: &VolumeMount) -> Result<Ensured> {
    if let Some(found) = inspect(host, &v.name).await? {
        let drift = drift(v, &found);
        if drift.is_empty() {
            return Ok(Ensured::Existing);
        }
        return Err(mismatch(host, service, v, &drift));
    }
    let req = VolumeCreateOptions {
        name: Some(v.name.clone()),
        driver: Some(v.driver().to_string()),
        driver_opts: Some(v.creation_opts().into_iter().collect()),
        labels: Some(HashMap::from([
            (labels::MANAGED_BY.to_string(), "haddock".to_string()),
            (labels::SERVICE.to_string(), service.to_string()),
        ])),
        ..Default::default()
    };
    host.engine()
        .create_volume(req)
        .await
        .map_err(|e| Error::docker(&host.name, format!("create volume {}", v.name), e))?;
    tracing::info!(host = %host.name, volume = %v.name, driver = v.driver(), size = ?v.size.map(|s| s.as_u64()), "volume created");
    Ok(Ensured::Created)
}

/// Ensures every volume of the spec on `host`, and says which were created.
pub async fn ensure_all(host: &Host, spec: &Spec) -> Result<Vec<String>> {
    let mut created = Vec::new();
    for v in &spec.container.volumes {
        if ensure(host, &spec.service.name, v).await? == Ensured::Created {
            created.push(describe(v));
        }
    }
    Ok(created)
}

/// Refuses, changing nothing, when a spec volume exists on `host` as something else.
pub async fn check_all(host: &Host, spec: &Spec) -> Result<()> {
    for v in &spec.container.volumes {
        if let Some(found) = inspect(host, &v.name).await? {
            let drift = drift(v, &found);
            if !drift.is_empty() {
                return Err(mismatch(host, &spec.service.name, v, &drift));
            }
        }
    }
    Ok(())
}

fn mismatch(host: &Host, service: &str, v: &VolumeMount, drift: &[String]) -> Error {
    Error::BadInput(format!(
        "volume {} on Docker host {} is not what the spec declares: {}; Docker cannot \
         change a volume in place: remove it with `haddock volume rm {service} {}` (its \
         data is lost) or declare what it is (nothing was changed)",
        v.name,
        host.name,
        drift.join("; "),
        v.name
    ))
}

/// `cache (local, tmpfs of 96.0 MiB)`, for progress lines.
pub fn describe(v: &VolumeMount) -> String {
    match v.size {
        Some(size) => format!(
            "{} ({}, tmpfs of {})",
            v.name,
            v.driver(),
            size.to_string_as(true)
        ),
        None => format!("{} ({})", v.name, v.driver()),
    }
}

/// What differs between what the spec declares and an existing volume.
fn drift(v: &VolumeMount, found: &Volume) -> Vec<String> {
    if !v.declares_creation() {
        return Vec::new();
    }
    let mut out = Vec::new();
    if found.driver != v.driver() {
        out.push(format!(
            "driver {} (the spec says {})",
            found.driver,
            v.driver()
        ));
    }
    let have: BTreeMap<_, _> = found.options.clone().into_iter().collect();
    let want = v.creation_opts();
    if have != want {
        out.push(format!("options {have:?} (the spec means {want:?})"));
    }
    out
}

async fn inspect(host: &Host, name: &str) -> Result<Option<Volume>> {
    match host.engine().inspect_volume(name).await {
        Ok(v) => Ok(Some(v)),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(Error::docker(
            &host.name,
            format!("inspect volume {name}"),
            e,
        )),
    }
}

/// Names of the containers on `host` (running or not) that mount volume `name`.
async fn mounted_by(host: &Host, name: &str) -> Result<Vec<String>> {
    let opts = ListContainersOptions {
        all: true,
        filters: Some(HashMap::from([(
            "volume".to_string(),
            vec![name.to_string()],
        )])),
        ..Default::default()
    };
    let list = host
        .engine()
        .list_containers(Some(opts))
        .await
        .map_err(|e| Error::docker(&host.name, format!("list containers using {name}"), e))?;
    Ok(list
        .into_iter()
        .filter_map(|c| c.names?.into_iter().next())
        .map(|n| n.trim_start_matches('/').to_string())
        .collect())
}

/// Every spec volume on every host.
pub async fn list(hosts: &[Host], spec: &Spec) -> Result<Vec<VolumeRow>> {
    let mut rows = Vec::new();
    for host in hosts {
        for v in &spec.container.volumes {
            let found = inspect(host, &v.name).await?;
            let options: BTreeMap<String, String> = found
                .as_ref()
                .map(|f| f.options.clone().into_iter().collect())
                .unwrap_or_default();
            let size = (options.get("type").map(String::as_str) == Some("tmpfs"))
                .then(|| tmpfs_size(options.get("o")?))
                .flatten();
            rows.push(VolumeRow {
                host: host.name.clone(),
                name: v.name.clone(),
                mount: v.mount.clone(),
                exists: found.is_some(),
                driver: found.as_ref().map(|f| f.driver.clone()),
                managed_by_haddock: found.as_ref().is_some_and(|f| {
                    f.labels.get(labels::MANAGED_BY).map(String::as_str) == Some("haddock")
                }),
                drift: found.as_ref().map(|f| drift(v, f)).unwrap_or_default(),
                mounted_by: if found.is_some() {
                    mounted_by(host, &v.name).await?
                } else {
                    Vec::new()
                },
                options,
                size,
            });
        }
    }
    Ok(rows)
}

/// Docker's own inspect of a spec volume on every host (`null` where it does not exist).
pub async fn inspect_everywhere(
    hosts: &[Host],
    spec: &Spec,
    name: &str,
) -> Result<serde_json::Value> {
    spec_volume(spec, name)?;
    let mut out = serde_json::Map::new();
    for host in hosts {
        let v = inspect(host, name).await?;
        out.insert(
            host.name.clone(),
            serde_json::to_value(v).unwrap_or_default(),
        );
    }
    Ok(serde_json::Value::Object(out))
}

/// Removes a spec volume from every host that has it. Refused, with nothing removed anywhere,
/// while any container on any host mounts it. Returns the hosts it was removed from.
pub async fn remove(hosts: &[Host], spec: &Spec, name: &str) -> Result<Vec<String>> {
    spec_volume(spec, name)?;
    let mut present = Vec::new();
    for host in hosts {
        if inspect(host, name).await?.is_none() {
            continue;
        }
        let users = mounted_by(host, name).await?;
        if !users.is_empty() {
            return Err(Error::BadInput(format!(
                "volume {name} is mounted by {} on Docker host {}: remove refused (nothing was \
                 removed on any host); remove those containers first",
                users.join(", "),
                host.name
            )));
        }
        present.push(host);
    }
    let mut removed = Vec::new();
    for host in present {
        host.engine()
            .remove_volume(name, None::<RemoveVolumeOptions>)
            .await
            .map_err(|e| Error::docker(&host.name, format!("remove volume {name}"), e))?;
        tracing::info!(host = %host.name, volume = %name, "volume removed");
        removed.push(host.name.clone());
    }
    Ok(removed)
}

/// The verbs act on the spec's volumes only: a typo must not reach another service's data.
fn spec_volume<'a>(spec: &'a Spec, name: &str) -> Result<&'a VolumeMount> {
    spec.container
        .volumes
        .iter()
        .find(|v| v.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = spec
                .container
                .volumes
                .iter()
                .map(|v| v.name.as_str())
                .collect();
            Error::BadInput(format!(
                "{name:?} is not a volume of {}'s spec (its volumes: {})",
                spec.service.name,
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            ))
        })
}

/// The bytes of a tmpfs `o=` option's `size=` (as haddock writes it, or with a k/m/g suffix).
fn tmpfs_size(o: &str) -> Option<u64> {
    let v = o.split(',').find_map(|p| p.strip_prefix("size="))?;
    let (digits, unit) = match v.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => v.split_at(i),
        None => (v, ""),
    };
    let n: u64 = digits.parse().ok()?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(extra: &str) -> VolumeMount {
        let text = crate::spec::EXAMPLE.replace(
            "{ name = \"optimizer-cache\", mount = \"/cache\" }",
            &format!("{{ name = \"optimizer-cache\", mount = \"/cache\"{extra} }}"),
        );
        crate::spec::Spec::parse("optimizer.toml", &text)
            .unwrap()
            .container
            .volumes
            .remove(0)
    }

    fn found(driver: &str, opts: &[(&str, &str)]) -> Volume {
        Volume {
            name: "optimizer-cache".into(),
            driver: driver.into(),
            options: opts
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_named_only_volume_accepts_what_exists() {
        let v = volume("");
        assert!(drift(&v, &found("rexray", &[("size", "5")])).is_empty());
    }

    #[test]
    fn a_declared_volume_must_match_driver_and_options() {
        let v = volume(", size = \"96MiB\"");
        let same = found(
            "local",
            &[
                ("type", "tmpfs"),
                ("device", "tmpfs"),
                ("o", &format!("size={}", 96u64 << 20)),
            ],
        );
        assert!(drift(&v, &same).is_empty());
        let plain = found("local", &[]);
        let d = drift(&v, &plain);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].contains("tmpfs"), "{d:?}");
        let other = volume(", driver = \"nfs-driver\"");
        assert!(drift(&other, &plain)[0].contains("driver local"));
    }

    #[test]
    fn tmpfs_sizes_are_read_in_any_unit() {
        assert_eq!(tmpfs_size("size=1048576"), Some(1 << 20));
        assert_eq!(tmpfs_size("uid=1,size=64m"), Some(64 << 20));
        assert_eq!(tmpfs_size("size=2G"), Some(2 << 30));
        assert_eq!(tmpfs_size("size=12x"), None);
        assert_eq!(tmpfs_size("nr_inodes=5"), None);
    }

    #[test]
    fn verbs_refuse_a_volume_the_spec_does_not_name() {
        let spec = crate::spec::example();
        let e = spec_volume(&spec, "someone-elses-data").unwrap_err();
        assert!(e.to_string().contains("optimizer-cache"), "{e}");
        assert!(spec_volume(&spec, "optimizer-cache").is_ok());
    }
}
