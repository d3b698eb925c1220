//! `haddock plan SERVICE TAG`: what a release would do, host by host and step by step, found
//! by the same checks the release runs first and changing nothing.
//!
//! A release that would be refused (a tag missing, a volume that differs from the spec, the
//! service locked, another release active, a DNS accessory not running) makes the plan fail
//! with the very error and exit code the release would end with; otherwise the [`Preview`]
//! lists the images to copy or pull, the volumes to create, the containers to start, the
//! weights of every canary step, and the containers that would be drained and removed.

use super::{is_driven, steps_to_walk, weights_for, Deployer};
use crate::error::{Error, Result};
use crate::plan::ContainerPlan;
use serde::Serialize;
use std::collections::BTreeMap;

/// Stands for the release id in the planned container names: the locator assigns it when
/// the release is created.
pub const RELEASE_PLACEHOLDER: &str = "REL";

/// What `haddock plan` prints (`--json`: this object).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Preview {
    pub service: String,
    pub from_version: Option<String>,
    pub to_version: String,
    pub image: String,
    /// `release` (a new one), `continue` (the active release to this version, from its
    /// recorded state) or `already_current` (nothing to do).
    pub action: String,
    /// The active release `continue` would drive, and its state.
    pub continues: Option<String>,
    pub images: Vec<Row>,
    pub volumes: Vec<Row>,
    pub containers: Vec<Row>,
    pub steps: Vec<StepPreview>,
    /// Running containers of other versions: drained (no new sessions, live ones finish) and
    /// removed once their sessions expire or `sessions.max_drain` passes.
    pub drain: Vec<Row>,
}

/// One thing on one host.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Row {
    pub host: String,
    pub what: String,
    pub detail: String,
}

/// One canary step: the weights it sets and how long it bakes.
#[derive(Debug, Clone, Serialize)]
pub struct StepPreview {
    pub weight: u32,
    pub pause_ms: u64,
    pub weights: BTreeMap<String, u8>,
    pub primary: bool,
}

impl Preview {
    /// The lines a person reads.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![format!(
            "plan for {} {} → {} (image {}), nothing changed:",
            self.service,
            self.from_version.as_deref().unwrap_or("(none)"),
            self.to_version,
            self.image
        )];
        match self.action.as_str() {
            "already_current" => {
                out.push(format!(
                    "  {} already runs {}: nothing to do",
                    self.service, self.to_version
                ));
                return out;
            }
            "continue" => out.push(format!(
                "  continue release {} from its recorded state",
                self.continues.as_deref().unwrap_or("?")
            )),
            _ => {}
        }
        let rows = [
            ("image", &self.images),
            ("volume", &self.volumes),
            ("start", &self.containers),
        ];
        for (verb, list) in rows {
            for r in list {
                out.push(format!(
                    "  {verb:<6} {} on {}: {}",
                    r.what, r.host, r.detail
                ));
            }
        }
        for s in &self.steps {
            let weights: Vec<String> = s
                .weights
                .iter()
                .map(|(v, w)| format!("{v} {w} %"))
                .collect();
            let bake = if s.pause_ms > 0 {
                format!(
                    ", bake {}",
                    crate::output::fmt_duration(std::time::Duration::from_millis(s.pause_ms))
                )
            } else {
                String::new()
            };
            out.push(format!(
                "  step   {} %: {}{}{}",
                s.weight,
                weights.join(" / "),
                if s.primary { " (primary)" } else { "" },
                bake
            ));
        }
        for r in &self.drain {
            out.push(format!("  drain  {} on {}: {}", r.what, r.host, r.detail));
        }
        out
    }
}

impl Deployer {
    /// `haddock plan`: the release of `version` as [`Deployer::release`] would walk it, from
    /// the same checks, changing nothing.
    pub async fn preview(&self, version: &str) -> Result<Preview> {
        let supply = self.check_before(version).await?;
        let mut p = Preview {
            service: self.service().to_string(),
            to_version: version.to_string(),
            image: self.spec.image_ref(version),
            action: "release".into(),
            ..Preview::default()
        };
        let current = match self.client.service(self.service()).await {
            Ok(s) => Some(s),
            Err(e) if e.status().is_some_and(|s| s.as_u16() == 404) => None,
            Err(e) => return Err(e.into()),
        };
        if let Some(active) = self.client.active_release(self.service()).await? {
            if active.to_version != version || is_driven(&active) {
                return Err(super::active_error(&active));
            }
            p.action = "continue".into();
            p.continues = Some(format!("{} (state {})", active.id, active.state));
            p.from_version = active.from_version.clone();
        } else {
            if let Some(lock) = current.as_ref().and_then(|s| s.lock.as_ref()) {
                return Err(Error::locked(self.service(), lock));
            }
            p.from_version = current.as_ref().and_then(|s| s.primary_version.clone());
        }
        let mut running_new = false;
        let mut old = Vec::new();
        for h in &self.hosts {
            for c in h.find(self.service(), None).await? {
                if c.version == version {
                    running_new |= c.running;
                } else if c.running {
                    old.push(Row {
                        host: h.name.clone(),
                        what: c.name.clone(),
                        detail: format!(
                            "version {}: drained, then removed once its sessions expire (at most {})",
                            c.version,
                            crate::output::fmt_duration(self.spec.sessions.max_drain)
                        ),
                    });
                }
            }
        }
        if p.action == "release" && p.from_version.as_deref() == Some(version) && running_new {
            p.action = "already_current".into();
            return Ok(p);
        }
        let missing = supply.missing();
        for h in &self.hosts {
            let detail = if supply.pulls() {
                "pulled from its registry".to_string()
            } else if missing.contains(&h.index) {
                format!("copied from {}", supply.source().unwrap_or("?"))
            } else {
                "present".to_string()
            };
            p.images.push(Row {
                host: h.name.clone(),
                what: p.image.clone(),
                detail,
            });
        }
        for v in crate::volume::list(&self.hosts, &self.spec).await? {
            p.volumes.push(Row {
                detail: if v.exists {
                    "exists".into()
                } else {
                    let spec = self
                        .spec
                        .container
                        .volumes
                        .iter()
                        .find(|s| s.name == v.name);
                    format!(
                        "created ({})",
                        spec.map(crate::volume::describe).unwrap_or_default()
                    )
                },
                host: v.host,
                what: v.name,
            });
        }
        for h in &self.hosts {
            for n in 0..h.instances {
                let c = ContainerPlan::new(&self.spec, version, RELEASE_PLACEHOLDER, h.index, n);
                let mut detail = format!(
                    "memory {}, cpu_shares {}",
                    bytesize::ByteSize(c.memory).to_string_as(true),
                    c.cpu_shares
                );
                if !c.dns.is_empty() {
                    detail.push_str(&format!(", dns {}", c.dns.join(",")));
                }
                if let Some(net) = &c.network {
                    detail.push_str(&format!(", network {net}"));
                }
                p.containers.push(Row {
                    host: h.name.clone(),
                    what: c.name,
                    detail,
                });
            }
        }
        let from = p.from_version.clone();
        let from = from.as_deref().filter(|f| *f != version);
        for (weight, pause) in steps_to_walk(&self.spec, from) {
            let w = weights_for(from, version, weight);
            p.steps.push(StepPreview {
                weight,
                pause_ms: super::ms(pause),
                weights: w.weights,
                primary: w.primary_version.is_some(),
            });
        }
        p.drain = old;
        Ok(p)
    }
}
