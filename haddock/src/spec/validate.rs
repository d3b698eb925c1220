//! The semantic rules a spec must satisfy after it has the right shape.
//!
//! Each rule yields `(key path, message)`; the caller turns the path into `file:line:col`.
//! All rules run, so a user sees every problem at once.

use super::{RestartPolicy, Spec};
use std::time::Duration;

/// The smallest memory cap a spec may set.
const MIN_MEMORY: u64 = 16 * 1024 * 1024;
/// Docker's smallest memory cap: an accessory (dnsmasq needs a few MiB) may go that low.
const MIN_ACCESSORY_MEMORY: u64 = 6 * 1024 * 1024;
/// The smallest `size` of a volume: a tmpfs smaller than this holds nothing useful.
const MIN_VOLUME_SIZE: u64 = 1024 * 1024;

pub(super) fn check(spec: &Spec) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut bad = |path: &str, msg: String| out.push((path.to_string(), msg));

    // [service]
    let s = &spec.service;
    if !is_dns_label(&s.name) {
        bad(
            "service.name",
            format!("{:?} is not a valid service name (lowercase letters, digits and '-', 1..=63 chars)", s.name),
        );
    }
    if let Some(msg) = image_repository_problem(&s.image) {
        bad("service.image", msg);
    }
    if s.port == 0 {
        bad("service.port", "0 is not a port (1..=65535)".into());
    }
    // The locator's own rule, so that a spec it would refuse fails here, at its line.
    if let Err(msg) = s.routes().checked() {
        let field = if msg.starts_with("hosts") {
            "service.hosts"
        } else if msg.starts_with("hsts_max_age") {
            "service.hsts_max_age"
        } else {
            "service.path_prefix"
        };
        bad(field, msg);
    }
    // A browser's max-age is whole seconds: "500ms" would be sent as 0, which tells it to
    // forget the policy.
    if let Some(age) = s.hsts_max_age.filter(|a| a.subsec_nanos() != 0) {
        bad(
            "service.hsts_max_age",
            format!("{age:?} is not whole seconds (HSTS max-age has no fractions)"),
        );
    }
    for key in s.env.keys() {
        if key.is_empty() || key.contains('=') {
            bad(
                &format!("service.env.{key}"),
                format!("{key:?} is not an environment variable name"),
            );
        }
    }

    // [container]
    let c = &spec.container;
    if c.memory.as_u64() < MIN_MEMORY {
        bad(
            "container.memory",
            format!("{} is below the minimum memory cap of 16MiB", c.memory),
        );
    }
    if !(2..=262_144).contains(&c.cpu_shares) {
        bad(
            "container.cpu_shares",
            format!("{} is not a CPU share (2..=262144)", c.cpu_shares),
        );
    }
    if let Err(msg) = c.restart.parse::<RestartPolicy>() {
        bad("container.restart", msg);
    }
    if let Some(net) = &c.network {
        if let Some(msg) = network_problem(net) {
            bad("container.network", msg);
        }
    }
    for (i, v) in c.volumes.iter().enumerate() {
        if let Some(msg) = volume_name_problem(&v.name) {
            bad(&format!("container.volumes[{i}].name"), msg);
        }
        if !v.mount.starts_with('/') {
            bad(
                &format!("container.volumes[{i}].mount"),
                format!("{:?} is not an absolute path", v.mount),
            );
        }
        if c.volumes[..i].iter().any(|o| o.mount == v.mount) {
            bad(
                &format!("container.volumes[{i}].mount"),
                format!("{:?} is mounted twice", v.mount),
            );
        }
        // Docker mounts one volume at two paths fine; two entries that say how to make it
        // could say it differently.
        if c.volumes[..i]
            .iter()
            .any(|o| o.name == v.name && (o.declares_creation() || v.declares_creation()))
        {
            bad(
                &format!("container.volumes[{i}].name"),
                format!(
                    "volume {:?} has another entry, and one of them says how to make it \
                     (driver, driver_opts, size): say it in one entry per volume",
                    v.name
                ),
            );
        }
        if let Some(driver) = &v.driver {
            if driver.is_empty()
                || !driver
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "_.-/:".contains(ch))
            {
                bad(
                    &format!("container.volumes[{i}].driver"),
                    format!("{driver:?} is not a volume driver name"),
                );
            }
        }
        for key in v.driver_opts.keys() {
            if key.is_empty() || key.contains('=') {
                bad(
                    &format!("container.volumes[{i}].driver_opts"),
                    format!("{key:?} is not a driver option name"),
                );
            }
        }
        if let Some(size) = v.size {
            // Only the local driver enforces a capacity that haddock can ask for through the
            // Engine API (as a tmpfs); any other size would be a promise nothing keeps.
            if v.driver() != "local" || !v.driver_opts.is_empty() {
                bad(
                    &format!("container.volumes[{i}].size"),
                    "size is enforced only with the local driver and no driver_opts (haddock \
                     makes the volume a tmpfs of that size); give other drivers their size in \
                     driver_opts as the driver documents it"
                        .into(),
                );
            } else if size.as_u64() < MIN_VOLUME_SIZE {
                bad(
                    &format!("container.volumes[{i}].size"),
                    format!("{size} is below the smallest volume size, 1MiB"),
                );
            }
        }
    }

    if c.handover.first().is_some_and(|p| p.trim().is_empty()) {
        bad(
            "container.handover",
            "the first element is the program to run inside the container; it is empty".into(),
        );
    }
    for (i, arg) in c.handover.iter().enumerate() {
        let unknown = arg
            .match_indices('{')
            .map(|(at, _)| &arg[at..])
            .find(|rest| !rest.starts_with("{successors}") && !rest.starts_with("{port}"));
        if let Some(rest) = unknown {
            let word: String = rest
                .chars()
                .take_while(|c| *c != '}')
                .chain(Some('}'))
                .collect();
            bad(
                &format!("container.handover[{i}]"),
                format!("{word} is not a placeholder here: use {{successors}} or {{port}}"),
            );
        }
    }
    for (i, d) in c.dns.iter().enumerate() {
        let path = format!("container.dns[{i}]");
        match d.strip_prefix("accessory:") {
            None if d.parse::<std::net::IpAddr>().is_ok() => {}
            None => bad(
                &path,
                format!("{d:?} is neither an IP address nor accessory:NAME"),
            ),
            Some(name) => match spec.accessory(name) {
                None => bad(&path, format!("no accessory is called {name:?}")),
                Some(a) if a.ip.is_none() => bad(
                    &path,
                    format!(
                        "accessory {name:?} has no ip: give it a fixed one, so that a reboot \
                         keeps the address the instances were told"
                    ),
                ),
                Some(a) if a.network(spec) != c.network.as_deref() => bad(
                    &path,
                    format!("accessory {name:?} is not on the service's network"),
                ),
                Some(a) => {
                    if let Some(t) = spec.targets.iter().find(|t| !a.runs_on(&t.host)) {
                        bad(
                            &path,
                            format!(
                                "accessory {name:?} does not run on target {:?}, whose \
                                 instances would have no DNS server",
                                t.host
                            ),
                        );
                    }
                }
            },
        }
    }

    // [[accessories]]
    for (i, a) in spec.accessories.iter().enumerate() {
        let at = |key: &str| format!("accessories[{i}].{key}");
        if !is_dns_label(&a.name) {
            bad(
                &at("name"),
                format!("{:?} is not a valid accessory name (lowercase letters, digits and '-', 1..=63 chars)", a.name),
            );
        } else if spec.accessories[..i].iter().any(|o| o.name == a.name) {
            bad(&at("name"), format!("{:?} is declared twice", a.name));
        }
        match a.image.rsplit_once(':') {
            Some((repo, tag))
                if !repo.is_empty()
                    && !tag.contains('/')
                    && image_repository_problem(repo).is_none()
                    && !tag.is_empty()
                    && tag
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || "_.-".contains(ch)) => {}
            _ => bad(
                &at("image"),
                format!(
                    "{:?} is not an image reference with a tag (repo:tag)",
                    a.image
                ),
            ),
        }
        for key in a.env.keys() {
            if key.is_empty() || key.contains('=') {
                bad(
                    &at(&format!("env.{key}")),
                    format!("{key:?} is not an environment variable name"),
                );
            }
        }
        for (j, p) in a.ports.iter().enumerate() {
            if let Err(msg) = super::parse_port(p) {
                bad(&at(&format!("ports[{j}]")), msg);
            }
        }
        for (j, v) in a.volumes.iter().enumerate() {
            if let Some(msg) = volume_name_problem(&v.name) {
                bad(&at(&format!("volumes[{j}].name")), msg);
            }
            if !v.mount.starts_with('/') {
                bad(
                    &at(&format!("volumes[{j}].mount")),
                    format!("{:?} is not an absolute path", v.mount),
                );
            }
        }
        if a.memory.as_u64() < MIN_ACCESSORY_MEMORY {
            bad(
                &at("memory"),
                format!("{} is below Docker's minimum memory cap of 6MiB", a.memory),
            );
        }
        if let Err(msg) = a.restart.parse::<RestartPolicy>() {
            bad(&at("restart"), msg);
        }
        if let Some(net) = &a.network {
            if let Some(msg) = network_problem(net) {
                bad(&at("network"), msg);
            }
        }
        if a.ip.is_some() && a.network(spec).is_none() {
            bad(
                &at("ip"),
                "a fixed ip needs a user-defined network (set network here or in [container])"
                    .into(),
            );
        }
        for (j, h) in a.hosts.iter().enumerate() {
            if !spec.targets.iter().any(|t| &t.host == h) {
                bad(
                    &at(&format!("hosts[{j}]")),
                    format!("{h:?} is not the host of any [[targets]] entry"),
                );
            }
        }
    }

    // [hooks]
    let hk = &spec.hooks;
    for (key, cmd) in [
        ("pre_release", &hk.pre_release),
        ("post_step", &hk.post_step),
        ("post_release", &hk.post_release),
        ("post_rollback", &hk.post_rollback),
    ] {
        if cmd.first().is_some_and(|p| p.trim().is_empty()) {
            bad(
                &format!("hooks.{key}"),
                "the first element is the program to run; it is empty".into(),
            );
        }
    }
    positive(&mut bad, "hooks.timeout", hk.timeout);

    // [health]
    let h = &spec.health;
    if !h.path.starts_with('/') {
        bad(
            "health.path",
            format!("{:?} is not an HTTP path (must start with '/')", h.path),
        );
    }
    positive(&mut bad, "health.interval", h.interval);
    positive(&mut bad, "health.timeout", h.timeout);
    positive(&mut bad, "health.start_deadline", h.start_deadline);
    if h.rise < 1 {
        bad("health.rise", "must be at least 1".into());
    }
    if h.fall < 1 {
        bad("health.fall", "must be at least 1".into());
    }
    if h.start_deadline < h.interval {
        bad(
            "health.start_deadline",
            format!(
                "{} is shorter than health.interval ({}): the instance could never be checked",
                humantime::format_duration(h.start_deadline),
                humantime::format_duration(h.interval)
            ),
        );
    }

    // [rollout]
    let r = &spec.rollout;
    if r.steps.is_empty() {
        bad(
            "rollout.steps",
            "at least one step is required, the last with weight = 100".into(),
        );
    }
    for (i, step) in r.steps.iter().enumerate() {
        let path = format!("rollout.steps[{i}].weight");
        if step.weight > 100 {
            bad(
                &path,
                format!("{} is not a percentage (0..=100)", step.weight),
            );
        } else if i > 0 && step.weight <= r.steps[i - 1].weight {
            bad(
                &path,
                format!(
                    "{} does not increase on the previous step's {}",
                    step.weight,
                    r.steps[i - 1].weight
                ),
            );
        }
    }
    if let Some(last) = r.steps.last() {
        if last.weight != 100 {
            bad(
                &format!("rollout.steps[{}].weight", r.steps.len() - 1),
                format!("the last step must reach 100, not {}", last.weight),
            );
        }
    }
    let a = &r.analysis;
    if !(0.0..=1.0).contains(&a.max_5xx_ratio) {
        bad(
            "rollout.analysis.max_5xx_ratio",
            format!("{} is not a ratio (0.0..=1.0)", a.max_5xx_ratio),
        );
    }
    positive(&mut bad, "rollout.analysis.max_p99", a.max_p99);
    if let Some(points) = a.max_5xx_over_stable {
        if !(0.0..=1.0).contains(&points) {
            bad(
                "rollout.analysis.max_5xx_over_stable",
                format!("{points} is not a difference of ratios (0.0..=1.0; 0.01 is one point)"),
            );
        }
    }
    if let Some(factor) = a.max_p99_vs_stable {
        if !(factor >= 1.0 && factor.is_finite()) {
            bad(
                "rollout.analysis.max_p99_vs_stable",
                format!("{factor} is not a factor of at least 1.0 (1.5: half again as slow)"),
            );
        }
    }

    if let Some(url) = &a.prometheus {
        if let Some(msg) = http_url_problem(url) {
            bad("rollout.analysis.prometheus", msg);
        }
    }
    for (i, c) in a.checks.iter().enumerate() {
        let at = |key: &str| format!("rollout.analysis.checks[{i}].{key}");
        if c.name.trim().is_empty() || c.name.chars().any(char::is_control) {
            bad(&at("name"), format!("{:?} is not a check name", c.name));
        } else if a.checks[..i].iter().any(|o| o.name == c.name) {
            bad(&at("name"), format!("{:?} is named twice", c.name));
        }
        match (&c.http, &c.prometheus) {
            (Some(_), Some(_)) | (None, None) => bad(
                &at("name"),
                "a check has exactly one of `http` (a URL) and `prometheus` (a query)".into(),
            ),
            (Some(url), None) => {
                let facts = crate::check::Facts {
                    service: "x".into(),
                    version: "1.0.0".into(),
                    old_version: "0.9.0".into(),
                    weight: 10,
                };
                let sample = crate::check::fill(url, &facts, "127.0.0.1:1");
                if let Some(msg) = http_url_problem(&sample) {
                    bad(&at("http"), msg);
                }
                if let Some(p) = &c.json_pointer {
                    if !p.starts_with('/') {
                        bad(
                            &at("json_pointer"),
                            format!("{p:?} is not a JSON pointer (it starts with '/')"),
                        );
                    } else if c.min.is_none() && c.max.is_none() {
                        bad(
                            &at("json_pointer"),
                            "a JSON field is checked against `min` and/or `max`; neither is set"
                                .into(),
                        );
                    }
                }
            }
            (None, Some(query)) => {
                if a.prometheus.is_none() {
                    bad(
                        &at("prometheus"),
                        "a Prometheus check needs `rollout.analysis.prometheus` (the server's URL)"
                            .into(),
                    );
                }
                if query.trim().is_empty() {
                    bad(&at("prometheus"), "the query is empty".into());
                }
                if c.json_pointer.is_some() {
                    bad(
                        &at("json_pointer"),
                        "only an `http` check reads a JSON field".into(),
                    );
                }
                if c.min.is_none() && c.max.is_none() {
                    bad(
                        &at("prometheus"),
                        "a query's values are checked against `min` and/or `max`; neither is set"
                            .into(),
                    );
                }
            }
        }
        for (key, bound) in [("min", c.min), ("max", c.max)] {
            if bound.is_some_and(|b| !b.is_finite()) {
                bad(&at(key), "a bound is a finite number".into());
            }
        }
        if let (Some(lo), Some(hi)) = (c.min, c.max) {
            if lo > hi {
                bad(&at("max"), format!("{hi} is below `min` ({lo})"));
            }
        }
        if c.interval < Duration::from_millis(100) {
            bad(
                &at("interval"),
                "a check is measured at most every 100ms".into(),
            );
        }
        if c.failure_limit == 0 {
            bad(
                &at("failure_limit"),
                "0 failures would fail every step; 1 or more".into(),
            );
        }
    }

    // [sessions]
    let se = &spec.sessions;
    if se.cookie.is_empty()
        || !se
            .cookie
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "_-".contains(ch))
    {
        bad(
            "sessions.cookie",
            format!(
                "{:?} is not a cookie name (letters, digits, '_' and '-')",
                se.cookie
            ),
        );
    }
    positive(&mut bad, "sessions.idle_ttl", se.idle_ttl);
    if se.max_drain < se.idle_ttl {
        bad(
            "sessions.max_drain",
            format!(
                "{} is shorter than sessions.idle_ttl ({}): sessions would be cut before they expire",
                humantime::format_duration(se.max_drain),
                humantime::format_duration(se.idle_ttl)
            ),
        );
    }

    // [[targets]]
    if spec.targets.is_empty() {
        bad("targets", "at least one Docker host is required".into());
    }
    // Instances without an address register at their container IP, which other hosts' proxies
    // and optimizers cannot reach: with several targets, all have one or none does.
    let addressed = spec.targets.iter().filter(|t| t.address.is_some()).count();
    if addressed > 0 && addressed < spec.targets.len() {
        if let Some(i) = spec.targets.iter().position(|t| t.address.is_none()) {
            bad(
                &format!("targets[{i}]"),
                "has no address while other targets have one: every target needs one (the instances of a target without it register at their container IP, which the other hosts cannot reach)".into(),
            );
        }
    }
    for (i, t) in spec.targets.iter().enumerate() {
        if let Some(msg) = docker_host_problem(&t.host, t.tls.is_some()) {
            bad(&format!("targets[{i}].host"), msg);
        }
        if t.instances < 1 {
            bad(
                &format!("targets[{i}].instances"),
                "must be at least 1".into(),
            );
        }
        if let Some(msg) = t.address.as_deref().and_then(address_problem) {
            bad(&format!("targets[{i}].address"), msg);
        }
        if let Some(tls) = &t.tls {
            for (key, file) in [("ca", &tls.ca), ("cert", &tls.cert), ("key", &tls.key)] {
                if !file.is_file() {
                    bad(
                        &format!("targets[{i}].tls.{key}"),
                        format!("{} is not a readable file", file.display()),
                    );
                }
            }
        }
    }
    out
}

/// Why a target's `address` cannot be dialled as `address:port`, if it cannot: an IP literal
/// or a DNS name, without scheme or port (the port is the one Docker publishes).
fn address_problem(address: &str) -> Option<String> {
    if address.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    let name = address.strip_suffix('.').unwrap_or(address);
    let labels_ok = !name.is_empty()
        && name.len() <= 253
        && name
            .split('.')
            .all(|l| is_dns_label(&l.to_ascii_lowercase()));
    if labels_ok {
        return None;
    }
    Some(format!(
        "{address:?} is not an address: give an IP or a DNS name without scheme or port (e.g. \"10.0.0.2\" or \"host-b.internal\"); the port is the one Docker publishes"
    ))
}

fn positive(bad: &mut impl FnMut(&str, String), path: &str, d: Duration) {
    if d.is_zero() {
        bad(path, "must be longer than 0s".into());
    }
}

fn volume_name_problem(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "_.-".contains(ch));
    (!ok).then(|| format!("{name:?} is not a Docker volume name"))
}

/// Why `url` is not an `http://` or `https://` URL with a host, if it is not.
fn http_url_problem(url: &str) -> Option<String> {
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => None,
        Ok(u) => Some(format!(
            "{url:?} is not an http(s) URL (scheme {:?})",
            u.scheme()
        )),
        Err(e) => Some(format!("{url:?} is not a URL: {e}")),
    }
}

fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn image_repository_problem(image: &str) -> Option<String> {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.is_empty() {
        Some("the image repository is empty".into())
    } else if last.contains(':') || image.contains('@') {
        Some(format!("{image:?} carries a tag or digest; give the repository only (the tag comes at release time)"))
    } else if !image
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/:".contains(c))
    {
        Some(format!(
            "{image:?} is not an image repository (lowercase letters, digits, '.', '_', '-', '/')"
        ))
    } else {
        None
    }
}

fn docker_host_problem(host: &str, has_tls: bool) -> Option<String> {
    if let Some(path) = host.strip_prefix("unix://") {
        if !path.starts_with('/') {
            return Some(format!(
                "{host:?}: a unix socket needs an absolute path (unix:///var/run/docker.sock)"
            ));
        }
        if has_tls {
            return Some("TLS files only apply to tcp:// hosts".into());
        }
        return None;
    }
    if let Some(addr) = host.strip_prefix("tcp://") {
        let ok = addr
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !ok {
            return Some(format!("{host:?}: expected tcp://host:port"));
        }
        return None;
    }
    Some(format!(
        "{host:?} is not a Docker host (expected unix:///path or tcp://host:port)"
    ))
}

/// Why a `container.network` cannot carry a release, if it cannot.
///
/// Each instance must have an address of its own that the proxies and the health probe reach
/// on the service port: `host` shares the host's ports between old and new (the second binds
/// fail), `none` has no address at all, and `container:<id>` borrows another container's
/// stack, which dies with it.
fn network_problem(net: &str) -> Option<String> {
    if net.is_empty() {
        return Some("the network name is empty".into());
    }
    let mode = match net {
        "host" => "host networking shares the host's ports, so old and new instances would collide on the service port",
        "none" => "an instance without a network cannot be reached by the proxy or the health probe",
        _ if net.starts_with("container:") => {
            "an instance must have its own address; `container:` borrows another container's network and dies with it"
        }
        _ => return None,
    };
    Some(format!(
        "{net:?} is not usable: {mode} (name a bridge or overlay network, e.g. \"haddock\")"
    ))
}

#[cfg(test)]
mod tests {
    use crate::spec::{Spec, SpecError, SpecIssue};

    /// The shipped example: every rule test below breaks exactly one thing in it.
    const GOOD: &str = crate::spec::EXAMPLE;

    fn issues(text: &str) -> Vec<SpecIssue> {
        match Spec::parse("t.toml", text) {
            Ok(_) => panic!("spec was accepted:\n{text}"),
            Err(SpecError::Invalid(v)) => v,
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    /// Replaces `from` (which must occur) in the good spec and expects one issue at `path`
    /// whose message contains `says`.
    fn rejects(from: &str, to: &str, path: &str, says: &str) -> SpecIssue {
        assert!(GOOD.contains(from), "test spec lacks {from:?}");
        let found = issues(&GOOD.replacen(from, to, 1));
        let hit = found
            .iter()
            .find(|i| i.path == path)
            .unwrap_or_else(|| panic!("no issue at {path}; got {found:#?}"));
        assert!(hit.message.contains(says), "{hit} does not say {says:?}");
        hit.clone()
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let spec = Spec::parse("optimizer.toml", GOOD).unwrap();
        assert_eq!(spec.service.name, "optimizer");
        assert_eq!(spec.rollout.steps.last().unwrap().weight, 100);
    }

    #[test]
    fn weight_over_100_names_file_line_col_and_range() {
        let text = GOOD.replacen("weight = 50", "weight = 150", 1);
        let hit = issues(&text)
            .into_iter()
            .find(|i| i.path == "rollout.steps[1].weight")
            .unwrap();
        let line = text
            .lines()
            .position(|l| l.contains("weight = 150"))
            .unwrap()
            + 1;
        let col = text.lines().nth(line - 1).unwrap().find("150").unwrap() + 1;
        assert_eq!((hit.line, hit.col), (line, col));
        assert_eq!(
            hit.to_string(),
            format!(
                "t.toml:{line}:{col}: rollout.steps[1].weight: 150 is not a percentage (0..=100)"
            )
        );
    }

    #[test]
    fn a_syntax_error_without_a_parser_message_still_says_what_is_wrong() {
        // A lone carriage return: the toml parser's own message for it is empty.
        let found = issues("\r");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].message, "invalid TOML syntax", "{found:?}");
        assert_eq!((found[0].line, found[0].col), (1, 1));
    }

    #[test]
    fn network_modes_without_an_own_address_are_refused() {
        for (net, says) in [
            ("host", "shares the host's ports"),
            ("none", "cannot be reached"),
            ("container:db", "borrows another container's network"),
            ("", "empty"),
        ] {
            let hit = rejects(
                "network = \"haddock\"",
                &format!("network = {net:?}"),
                "container.network",
                says,
            );
            assert!(hit.line > 1 && hit.col > 1, "{hit}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected_with_position() {
        let hit = rejects(
            "[health]\n",
            "[health]\nretries = 3\n",
            "health.retries",
            "unknown field `retries`",
        );
        assert!(hit.line > 1);
    }

    #[test]
    fn wrong_types_and_syntax_errors_have_positions() {
        let hit = rejects(
            "port = 8080",
            "port = \"eighty\"",
            "service.port",
            "invalid type",
        );
        assert!(hit.line > 1 && hit.col > 1);
        let found = issues(&GOOD.replacen("[health]", "[health", 1));
        assert!(found[0].line > 1, "{found:?}");
        rejects(
            "interval = \"1s\"",
            "interval = \"soon\"",
            "health.interval",
            "",
        );
        // rollout.max_parallel_hosts is a count of hosts: no negative or fractional batches.
        for bad in ["-1", "1.5", "\"two\""] {
            let hit = rejects(
                "manual = false",
                &format!("manual = false\nmax_parallel_hosts = {bad}"),
                "rollout.max_parallel_hosts",
                "",
            );
            assert!(hit.line > 1 && hit.col > 1, "{bad}: {hit}");
        }
    }

    #[test]
    fn missing_required_keys_are_named() {
        let found = issues(&GOOD.replacen("path = \"/readyz\"\n", "", 1));
        assert!(
            found[0].message.contains("missing field `path`"),
            "{found:?}"
        );
    }

    #[test]
    fn weights_must_strictly_increase() {
        rejects(
            "weight = 50",
            "weight = 10",
            "rollout.steps[1].weight",
            "does not increase",
        );
    }

    #[test]
    fn last_weight_must_be_100() {
        rejects(
            "weight = 100",
            "weight = 90",
            "rollout.steps[2].weight",
            "must reach 100",
        );
    }

    #[test]
    fn steps_cannot_be_empty() {
        let start = GOOD.find("steps = [").unwrap();
        let end = start + GOOD[start..].find("]\n").unwrap() + 2;
        let text = format!("{}steps = []\n{}", &GOOD[..start], &GOOD[end..]);
        let found = issues(&text);
        assert!(found
            .iter()
            .any(|i| i.path == "rollout.steps" && i.message.contains("at least one")));
    }

    #[test]
    fn ratio_must_be_between_0_and_1() {
        rejects(
            "max_5xx_ratio = 0.05",
            "max_5xx_ratio = 1.5",
            "rollout.analysis.max_5xx_ratio",
            "not a ratio",
        );
    }

    #[test]
    fn p99_threshold_must_be_positive() {
        rejects(
            "max_p99 = \"500ms\"",
            "max_p99 = \"0s\"",
            "rollout.analysis.max_p99",
            "longer than 0s",
        );
    }

    #[test]
    fn rise_and_fall_at_least_one() {
        rejects("rise = 1", "rise = 0", "health.rise", "at least 1");
        rejects("fall = 3", "fall = 0", "health.fall", "at least 1");
    }

    #[test]
    fn health_durations_must_be_positive_and_consistent() {
        rejects(
            "timeout = \"1s\"",
            "timeout = \"0s\"",
            "health.timeout",
            "longer than 0s",
        );
        rejects(
            "interval = \"1s\"",
            "interval = \"0s\"",
            "health.interval",
            "longer than 0s",
        );
        rejects(
            "start_deadline = \"60s\"",
            "start_deadline = \"500ms\"",
            "health.start_deadline",
            "shorter than health.interval",
        );
        rejects(
            "path = \"/readyz\"",
            "path = \"readyz\"",
            "health.path",
            "must start with '/'",
        );
    }

    #[test]
    fn memory_cap_at_least_16mib() {
        rejects(
            "memory = \"256MiB\"",
            "memory = \"8MiB\"",
            "container.memory",
            "16MiB",
        );
    }

    #[test]
    fn cpu_shares_in_range() {
        rejects(
            "cpu_shares = 512",
            "cpu_shares = 1",
            "container.cpu_shares",
            "not a CPU share",
        );
    }

    #[test]
    fn restart_policy_is_known() {
        rejects(
            "restart = \"unless-stopped\"",
            "restart = \"sometimes\"",
            "container.restart",
            "not a restart policy",
        );
        rejects(
            "restart = \"unless-stopped\"",
            "restart = \"on-failure:0\"",
            "container.restart",
            "N >= 1",
        );
    }

    /// The shipped spec with a DNS accessory appended and the instances pointed at it.
    fn with_dns_accessory() -> String {
        GOOD.replacen(
            "stop_grace = \"10s\"\n",
            "stop_grace = \"10s\"\ndns = [\"accessory:resolver\"]\n",
            1,
        ) + "\n[[accessories]]\nname = \"resolver\"\nimage = \"haddock/dnsmasq:2.90\"\n\
             args = [\"--cache-size=1000\"]\nports = [\"5353:53/udp\"]\nmemory = \"16MiB\"\n\
             ip = \"10.77.0.53\"\n"
    }

    #[test]
    fn an_accessory_named_in_dns_gives_the_instances_its_ip() {
        let spec = Spec::parse("t.toml", &with_dns_accessory()).unwrap();
        assert_eq!(spec.dns_servers(), vec!["10.77.0.53".to_string()]);
        assert_eq!(spec.dns_accessories().len(), 1);
        let a = spec.accessory("resolver").unwrap();
        assert_eq!(a.network(&spec), Some("haddock"), "the service's network");
        assert_eq!(crate::spec::parse_port(&a.ports[0]), Ok((5353, 53, "udp")));
    }

    #[test]
    fn accessory_mistakes_are_refused_where_they_are() {
        let good = with_dns_accessory();
        let refused = |from: &str, to: &str, path: &str, says: &str| {
            assert!(good.contains(from), "{from:?}");
            let found = issues(&good.replacen(from, to, 1));
            let hit = found
                .iter()
                .find(|i| i.path == path)
                .unwrap_or_else(|| panic!("no issue at {path}; got {found:#?}"));
            assert!(hit.message.contains(says), "{hit} does not say {says:?}");
            assert!(hit.line > 1, "{hit}");
        };
        refused(
            "haddock/dnsmasq:2.90",
            "haddock/dnsmasq",
            "accessories[0].image",
            "with a tag",
        );
        refused(
            "5353:53/udp",
            "53/udp",
            "accessories[0].ports[0]",
            "HOST:CONTAINER",
        );
        refused(
            "5353:53/udp",
            "5353:53/sctp",
            "accessories[0].ports[0]",
            "HOST:CONTAINER",
        );
        refused(
            "memory = \"16MiB\"",
            "memory = \"1MiB\"",
            "accessories[0].memory",
            "6MiB",
        );
        refused(
            "name = \"resolver\"",
            "name = \"Resolver 1\"",
            "accessories[0].name",
            "accessory name",
        );
        refused(
            "ip = \"10.77.0.53\"\n",
            "ip = \"10.77.0.53\"\nhosts = [\"tcp://elsewhere:2376\"]\n",
            "accessories[0].hosts[0]",
            "not the host of any",
        );
        refused("ip = \"10.77.0.53\"\n", "", "container.dns[0]", "has no ip");
        refused(
            "accessory:resolver",
            "accessory:cache",
            "container.dns[0]",
            "no accessory",
        );
        refused(
            "accessory:resolver",
            "resolver.local",
            "container.dns[0]",
            "neither an IP",
        );
        refused(
            "ip = \"10.77.0.53\"\n",
            "ip = \"10.77.0.53\"\nnetwork = \"other\"\n",
            "container.dns[0]",
            "not on the service's network",
        );
        // A malformed IP is a type error, still positioned at the key.
        refused("10.77.0.53", "10.77.0.999", "accessories[0].ip", "");
        let twice = good.clone() + "\n[[accessories]]\nname = \"resolver\"\nimage = \"x/y:1\"\n";
        let found = issues(&twice);
        assert!(
            found
                .iter()
                .any(|i| i.path == "accessories[1].name" && i.message.contains("twice")),
            "{found:#?}"
        );
    }

    #[test]
    fn judgement_and_hook_keys_are_checked_where_they_are() {
        let analysis = "min_requests = 50";
        for (extra, path, says) in [
            (
                "max_5xx_over_stable = 1.5",
                "rollout.analysis.max_5xx_over_stable",
                "difference of ratios",
            ),
            (
                "max_p99_vs_stable = 0.5",
                "rollout.analysis.max_p99_vs_stable",
                "at least 1.0",
            ),
            (
                "on_inconclusive = \"shrug\"",
                "rollout.analysis.on_inconclusive",
                "",
            ),
            (
                "post_promotion = \"soon\"",
                "rollout.analysis.post_promotion",
                "",
            ),
            (
                "prometheus = \"ftp://metrics\"",
                "rollout.analysis.prometheus",
                "not an http(s) URL",
            ),
            (
                "[[rollout.analysis.checks]]\nname = \"q\"\nprometheus = \"up\"\nmax = 1",
                "rollout.analysis.checks[0].prometheus",
                "needs `rollout.analysis.prometheus`",
            ),
            (
                "prometheus = \"http://p:9090\"\n[[rollout.analysis.checks]]\nname = \"q\"\nprometheus = \"up\"",
                "rollout.analysis.checks[0].prometheus",
                "neither is set",
            ),
            (
                "[[rollout.analysis.checks]]\nname = \"both\"\nhttp = \"http://x/\"\nprometheus = \"up\"",
                "rollout.analysis.checks[0].name",
                "exactly one of",
            ),
            (
                "[[rollout.analysis.checks]]\nname = \"h\"\nhttp = \"x/{instance}\"",
                "rollout.analysis.checks[0].http",
                "not a URL",
            ),
            (
                "[[rollout.analysis.checks]]\nname = \"h\"\nhttp = \"http://x/\"\njson_pointer = \"a/b\"\nmax = 1",
                "rollout.analysis.checks[0].json_pointer",
                "not a JSON pointer",
            ),
            (
                "[[rollout.analysis.checks]]\nname = \"h\"\nhttp = \"http://x/\"\nmin = 2\nmax = 1\njson_pointer = \"/a\"",
                "rollout.analysis.checks[0].max",
                "below `min`",
            ),
            (
                "[[rollout.analysis.checks]]\nname = \"h\"\nhttp = \"http://x/\"\ninterval = \"1ms\"",
                "rollout.analysis.checks[0].interval",
                "at most every 100ms",
            ),
            (
                "[[rollout.analysis.checks]]\nname = \"h\"\nhttp = \"http://x/\"\n[[rollout.analysis.checks]]\nname = \"h\"\nhttp = \"http://y/\"",
                "rollout.analysis.checks[1].name",
                "named twice",
            ),
            (
                "[[rollout.analysis.checks]]\nname = \"h\"\nhttp = \"http://x/\"\nfailure_limit = 0",
                "rollout.analysis.checks[0].failure_limit",
                "1 or more",
            ),
            (
                "[[rollout.analysis.checks]]\nname = \"h\"\nurl = \"http://x/\"",
                "rollout.analysis.checks[0].url",
                "",
            ),
        ] {
            rejects(analysis, &format!("{analysis}\n{extra}"), path, says);
        }
        rejects(
            "handover = [\"/optimizer\"",
            "handover = [\" \"",
            "container.handover",
            "program to run",
        );
        rejects(
            "\"{successors}\"]",
            "\"{successor}\"]",
            "container.handover[5]",
            "{successor} is not a placeholder",
        );
        let with_hooks = |hooks: &str| format!("{GOOD}\n[hooks]\n{hooks}\n");
        for (hooks, path, says) in [
            (
                "pre_release = [\"\", \"x\"]",
                "hooks.pre_release",
                "program to run",
            ),
            ("timeout = \"0s\"", "hooks.timeout", "longer than 0s"),
            ("pre_deploy = [\"x\"]", "hooks.pre_deploy", ""),
        ] {
            let found = issues(&with_hooks(hooks));
            let hit = found
                .iter()
                .find(|i| i.path == path)
                .unwrap_or_else(|| panic!("no issue at {path}; got {found:#?}"));
            assert!(hit.message.contains(says), "{hit}");
        }
        let ok = Spec::parse(
            "t.toml",
            &with_hooks("post_step = [\"notify\", \"--quiet\"]"),
        )
        .unwrap();
        assert_eq!(ok.hooks.post_step, ["notify", "--quiet"]);
    }

    #[test]
    fn volumes_are_named_and_absolute() {
        rejects(
            "mount = \"/cache\"",
            "mount = \"cache\"",
            "container.volumes[0].mount",
            "absolute",
        );
        rejects(
            "name = \"optimizer-cache\"",
            "name = \"bad name\"",
            "container.volumes[0].name",
            "volume name",
        );
    }

    #[test]
    fn volume_creation_keys_are_checked() {
        let vol = "{ name = \"optimizer-cache\", mount = \"/cache\" }";
        let with =
            |extra: &str| format!("{{ name = \"optimizer-cache\", mount = \"/cache\", {extra} }}");
        rejects(
            vol,
            &with("size = \"64MiB\", driver = \"rexray\""),
            "container.volumes[0].size",
            "only with the local driver",
        );
        rejects(
            vol,
            &with("size = \"64MiB\", driver_opts = { type = \"nfs\" }"),
            "container.volumes[0].size",
            "no driver_opts",
        );
        rejects(
            vol,
            &with("size = \"1KiB\""),
            "container.volumes[0].size",
            "smallest volume size",
        );
        rejects(
            vol,
            &with("size = \"lots\""),
            "container.volumes[0].size",
            "",
        );
        rejects(
            vol,
            &with("driver = \"bad driver\""),
            "container.volumes[0].driver",
            "not a volume driver",
        );
        rejects(
            vol,
            &with("read_only = \"yes\""),
            "container.volumes[0].read_only",
            "",
        );
        rejects(
            vol,
            &with("sise = \"64MiB\""),
            "container.volumes[0].sise",
            "unknown field",
        );
        rejects(
            vol,
            &format!(
                "{vol}, {{ name = \"optimizer-cache\", mount = \"/other\", size = \"8MiB\" }}"
            ),
            "container.volumes[1].name",
            "one entry per volume",
        );
        // The same volume at two paths, neither saying how to make it: Docker's business.
        let twice = GOOD.replace(
            vol,
            &format!("{vol}, {{ name = \"optimizer-cache\", mount = \"/other\" }}"),
        );
        assert!(crate::spec::Spec::parse("optimizer.toml", &twice).is_ok());
        let spec = crate::spec::Spec::parse(
            "optimizer.toml",
            &GOOD.replace(vol, &with("size = \"96MiB\", read_only = true")),
        )
        .unwrap();
        let v = &spec.container.volumes[0];
        assert!(v.declares_creation() && v.read_only);
        assert_eq!(v.driver(), "local");
        assert_eq!(v.creation_opts()["type"], "tmpfs");
        assert_eq!(v.creation_opts()["o"], format!("size={}", 96 << 20));
    }

    #[test]
    fn session_ttl_positive_and_drain_at_least_ttl() {
        rejects(
            "idle_ttl = \"20s\"",
            "idle_ttl = \"0s\"",
            "sessions.idle_ttl",
            "longer than 0s",
        );
        rejects(
            "max_drain = \"2m\"",
            "max_drain = \"10s\"",
            "sessions.max_drain",
            "shorter than sessions.idle_ttl",
        );
        rejects(
            "cookie = \"haddock_session\"",
            "cookie = \"a b\"",
            "sessions.cookie",
            "cookie name",
        );
    }

    #[test]
    fn service_fields_are_checked() {
        rejects(
            "name = \"optimizer\"",
            "name = \"Optimizer!\"",
            "service.name",
            "service name",
        );
        rejects(
            "image = \"haddock/optimizer\"",
            "image = \"haddock/optimizer:1.0\"",
            "service.image",
            "tag",
        );
        rejects("port = 8080", "port = 0", "service.port", "not a port");
        rejects(
            "port = 8080",
            "port = 8080\nhosts = [\"shop.example.com\", \"bad host\"]",
            "service.hosts",
            "not a host name",
        );
        rejects(
            "port = 8080",
            "port = 8080\nhosts = [\"shop.example.com\"]\npath_prefix = \"api/\"",
            "service.path_prefix",
            "not a path",
        );
        rejects(
            "port = 8080",
            "port = 8080\nhsts_max_age = \"3y\"",
            "service.hsts_max_age",
            "at most 63115200 seconds",
        );
        rejects(
            "port = 8080",
            "port = 8080\nhsts_max_age = \"1500ms\"",
            "service.hsts_max_age",
            "not whole seconds",
        );
    }

    #[test]
    fn a_services_https_policy_reaches_its_routes() {
        let spec = GOOD.replacen(
            "port = 8080",
            "port = 8080\nredirect_https = true\nhsts_max_age = \"2y\"",
            1,
        );
        let routes = Spec::parse("optimizer.toml", &spec)
            .unwrap()
            .service
            .routes();
        assert!(routes.redirect_https);
        assert_eq!(routes.hsts_max_age_s, Some(2 * 31_557_600));
        assert!(crate::spec::example().service.routes().is_empty());
    }

    #[test]
    fn image_source_defaults_to_local_and_refuses_unknown_values_with_position() {
        use crate::spec::ImageSource;
        assert_eq!(
            crate::spec::example().service.image_source,
            ImageSource::Local
        );
        let copy = GOOD.replacen(
            "image = \"haddock/optimizer\"",
            "image = \"haddock/optimizer\"\nimage_source = \"copy\"",
            1,
        );
        let spec = Spec::parse("t.toml", &copy).unwrap();
        assert_eq!(spec.service.image_source, ImageSource::Copy);
        let hit = rejects(
            "image = \"haddock/optimizer\"",
            "image = \"haddock/optimizer\"\nimage_source = \"ftp\"",
            "service.image_source",
            "unknown variant `ftp`, expected one of `local`, `copy`, `registry`",
        );
        let text = copy.replacen("\"copy\"", "\"ftp\"", 1);
        let line = text
            .lines()
            .position(|l| l.starts_with("image_source"))
            .unwrap()
            + 1;
        assert_eq!((hit.line, hit.col), (line, "image_source = ".len() + 1));
    }

    #[test]
    fn docker_hosts_are_parsed() {
        rejects(
            "host = \"unix:///var/run/docker.sock\"",
            "host = \"ssh://box\"",
            "targets[0].host",
            "not a Docker host",
        );
        rejects(
            "host = \"unix:///var/run/docker.sock\"",
            "host = \"tcp://box\"",
            "targets[0].host",
            "tcp://host:port",
        );
        rejects(
            "instances = 1",
            "instances = 0",
            "targets[0].instances",
            "at least 1",
        );
    }

    #[test]
    fn target_addresses_are_ips_or_dns_names() {
        let with = |a: &str| {
            GOOD.replacen(
                "instances = 1",
                &format!("instances = 1\naddress = \"{a}\""),
                1,
            )
        };
        for good in [
            "10.213.1.2",
            "fd00::2",
            "host-b.internal",
            "Host-B.example.com.",
        ] {
            let spec = Spec::parse("t.toml", &with(good)).unwrap();
            assert_eq!(spec.targets[0].address.as_deref(), Some(good));
        }
        for bad in ["", "10.0.0.2:8080", "http://host", "host_b", "-x.example"] {
            let found = issues(&with(bad));
            let hit = found.iter().find(|i| i.path == "targets[0].address");
            assert!(
                hit.is_some_and(|i| i.message.contains("not an address")),
                "{bad:?}: {found:#?}"
            );
        }
    }

    #[test]
    fn addresses_are_given_to_every_target_or_none() {
        let two = format!(
            "{GOOD}\n[[targets]]\nhost = \"tcp://10.0.0.3:2376\"\naddress = \"10.0.0.3\"\n"
        );
        let found = issues(&two);
        let hit = found.iter().find(|i| i.path == "targets[0]");
        assert!(
            hit.is_some_and(|i| i.message.contains("every target needs one")),
            "{found:#?}"
        );
        let both = two.replacen("instances = 1", "instances = 1\naddress = \"10.0.0.2\"", 1);
        Spec::parse("t.toml", &both).unwrap();
    }

    #[test]
    fn tls_files_must_exist() {
        rejects(
            "host = \"unix:///var/run/docker.sock\"",
            "host = \"tcp://10.0.0.2:2376\"\ntls = { ca = \"/nonexistent/ca.pem\", cert = \"/nonexistent/c.pem\", key = \"/nonexistent/k.pem\" }",
            "targets[0].tls.ca",
            "not a readable file",
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = GOOD.replacen("rise = 1", "rise = 0", 1).replacen(
            "memory = \"256MiB\"",
            "memory = \"1MiB\"",
            1,
        );
        let paths: Vec<_> = issues(&text).into_iter().map(|i| i.path).collect();
        assert!(
            paths.contains(&"health.rise".to_string())
                && paths.contains(&"container.memory".to_string())
        );
    }
}
