//! The command line: verbs, their arguments and the exit codes CI pipelines rely on.
//!
//! Every verb documented in docs/operations.md; flags are a stable interface.

use crate::error::{exit, Error};
use crate::heartbeat;
use crate::output::{self, Output};
use crate::release::{self, Deployer, Outcome};
use crate::spec::{Spec, SpecError};
use clap::{Args, Parser, Subcommand};
use locator_wire::api::{Control, Release};
use locator_wire::client::Client;
use locator_wire::logging::LogFormat;
use std::path::{Path, PathBuf};

#[derive(Debug, Parser)]
#[command(
    name = "haddock",
    version,
    about = "Zero-downtime blue-green and canary releases of services in Docker"
)]
pub struct Cli {
    /// Log format. Logs (one event per release step and transition) go to stderr; RUST_LOG
    /// filters (default: warn with pretty, whose steps are on stdout already; info with json).
    /// `--json` is the result on stdout and is independent of this.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the locator is.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// Locator base URL; several replicas separated by commas (haddock moves to the next when
    /// one fails).
    #[arg(long, env = "HADDOCK_LOCATOR", default_value = "http://127.0.0.1:7070")]
    pub locator: String,
    /// Bearer token (role `deploy` for changes, `read` is enough for status and history).
    #[arg(long, env = "HADDOCK_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print one JSON object (the result) on stdout; progress goes to stderr.
    #[arg(long)]
    pub json: bool,
}

impl Conn {
    fn client(&self) -> Client {
        // A release outlives a locator restart: refused connections are retried this long.
        Client::new(&self.locator, self.token.clone())
            .with_connect_retry(std::time::Duration::from_secs(30))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a deploy spec: prints "ok" or every problem as file:line:col.
    Check {
        /// Path to the spec, e.g. deploy-specs/optimizer.toml.
        spec: PathBuf,
    },
    /// Release SERVICE at image tag TAG (continues the active release if it is to TAG).
    Release {
        service: String,
        tag: String,
        /// Deploy spec [default: deploy-specs/SERVICE.toml].
        #[arg(long)]
        spec: Option<PathBuf>,
        /// Release TAG again through the whole canary, as version TAG+N, when the service
        /// already runs it: for spec changes that need new containers (args, env, volumes,
        /// network). Limits alone change in place with `haddock update`.
        #[arg(long)]
        redeploy: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// What `release SERVICE TAG` would do — images, volumes, containers per host, the weights
    /// of every step, what would be drained — from the same checks, changing nothing.
    Plan {
        service: String,
        tag: String,
        #[arg(long)]
        spec: Option<PathBuf>,
        /// Plan the `release --redeploy` of TAG.
        #[arg(long)]
        redeploy: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Continue SERVICE's active release from its recorded state (after haddock was killed),
    /// or un-pause it when another haddock is still driving it.
    Resume {
        service: String,
        #[arg(long)]
        spec: Option<PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Release the version before the current one, or VERSION, any version the service has
    /// run (same steps and safety as a release).
    Rollback {
        service: String,
        /// A version from `haddock history SERVICE` [default: the one before the current].
        version: Option<String>,
        #[arg(long)]
        spec: Option<PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Skip the remaining canary bake of the active release (or of release id) and go to 100 %.
    Promote {
        /// Service name or release id.
        target: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Roll the active release back now.
    Abort {
        target: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Freeze the active release's bake timer (weights stay as they are).
    Pause {
        target: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Instances, versions, weights, live sessions and the active release.
    Status {
        service: Option<String>,
        /// Redraw every second until interrupted (with --json: one JSON line per second).
        #[arg(long, short)]
        watch: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Past releases, newest first.
    History {
        service: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Change the memory and CPU limits of SERVICE's running instances in place, on every
    /// host, without a restart or a release. Refuses a memory cap below what an instance uses.
    Update {
        service: String,
        /// New memory cap, e.g. 512MiB (at least Docker's minimum, 6MiB).
        #[arg(long)]
        memory: Option<bytesize::ByteSize>,
        /// New CPU limit in CPUs, e.g. 1.5 (Docker's --cpus).
        #[arg(long)]
        cpus: Option<f64>,
        /// Apply a memory cap even below an instance's current use.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        spec: Option<PathBuf>,
        /// Where the change is recorded (`--json`: one JSON object, the changes, on stdout).
        #[command(flatten)]
        conn: Conn,
    },
    /// The spec's volumes on every host: list, inspect, remove.
    Volume {
        #[command(subcommand)]
        verb: VolumeVerb,
    },
    /// The logs of every instance of SERVICE on every host, merged by time, each line
    /// prefixed with host/instance/version.
    Logs {
        service: String,
        /// Only the instances of this version.
        #[arg(long)]
        version: Option<String>,
        /// Only lines written in the last DURATION, e.g. 10m, 1h.
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// At most N lines of each container (its last ones).
        #[arg(long)]
        tail: Option<u64>,
        /// Keep printing new lines until interrupted.
        #[arg(long, short)]
        follow: bool,
        #[arg(long)]
        spec: Option<PathBuf>,
        /// One JSON object per line (time, host, instance, version, stream, line).
        #[arg(long)]
        json: bool,
    },
    /// The service's deploy lock: while it is held, no release of the service starts.
    Lock {
        #[command(subcommand)]
        verb: LockVerb,
    },
    /// The spec's accessories (companion containers such as a DNS cache) on their hosts.
    Accessory {
        #[command(subcommand)]
        verb: AccessoryVerb,
    },
    /// Keep heartbeating SERVICE's running instances (between releases; runs until killed).
    Heartbeat {
        service: String,
        #[arg(long)]
        spec: Option<PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `haddock volume …`: each acts on the volumes SERVICE's spec names, on every target host.
#[derive(Debug, Subcommand)]
pub enum VolumeVerb {
    /// Each spec volume on each host: driver, options, size, who mounts it, drift from the spec.
    Ls {
        service: String,
        #[arg(long)]
        spec: Option<PathBuf>,
        /// Print one JSON array on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Docker's own description of volume NAME on every host (JSON).
    Inspect {
        service: String,
        name: String,
        #[arg(long)]
        spec: Option<PathBuf>,
    },
    /// Remove volume NAME from every host; refused while any container mounts it. Its data is
    /// lost.
    Rm {
        service: String,
        name: String,
        #[arg(long)]
        spec: Option<PathBuf>,
    },
}

/// `haddock lock …`: the deploy lock the locator keeps per service (CI pipelines that run into
/// it get exit 2 and the holder's message).
#[derive(Debug, Subcommand)]
pub enum LockVerb {
    /// Take it (exit 2, with who holds it and why, when someone does).
    Acquire {
        service: String,
        /// Why: shown to everyone whose release it stops.
        #[arg(long, short)]
        message: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Give it up (whoever took it).
    Release {
        service: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Who holds it, since when and why (exit 0 either way; `--json`: the lock or null).
    Status {
        service: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `haddock accessory …`: each acts on SERVICE's spec's `[[accessories]]` (all of them when
/// NAME is left out, for boot and status), on every host each runs on.
#[derive(Debug, Subcommand)]
pub enum AccessoryVerb {
    /// Start what is not running (create missing containers, start stopped ones).
    Boot(AccessoryArgs),
    /// Replace the container on each host in turn, from the spec as it is now.
    Reboot(AccessoryArgs),
    /// Stop and remove it everywhere; refused while running instances use it as their DNS
    /// server (`--force` removes it anyway).
    Remove {
        #[command(flatten)]
        args: AccessoryArgs,
        #[arg(long)]
        force: bool,
    },
    /// Its container on each host: state, image, address, since when.
    Status(AccessoryArgs),
}

#[derive(Debug, Clone, Args)]
pub struct AccessoryArgs {
    pub service: String,
    /// The accessory (required by reboot and remove).
    pub name: Option<String>,
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Print one JSON array (a row per accessory and host) on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs a parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> u8 {
    if let Command::Check { spec } = &cli.command {
        return check(spec);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return exit::INFRA;
        }
    };
    rt.block_on(run_async(cli.command))
}

fn check(path: &Path) -> u8 {
    match Spec::load(path) {
        Ok(_) => {
            println!("ok");
            exit::OK
        }
        Err(e @ (SpecError::Invalid(_) | SpecError::Read { .. })) => {
            eprintln!("{e}");
            exit::BAD_INPUT
        }
    }
}

/// A Docker image tag (what `docker tag` accepts): a redeploy's `+N` is haddock's to add.
fn check_tag(tag: &str) -> Result<(), Error> {
    let ok = tag.len() <= 128
        && tag
            .bytes()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_')
        && tag
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(Error::BadInput(format!(
            "{tag:?} is not an image tag (1 to 128 letters, digits, `_`, `.` and `-`, not \
             starting with `.` or `-`); to release a tag again as a new version use --redeploy"
        )))
    }
}

fn spec_path(service: &str, spec: Option<PathBuf>) -> PathBuf {
    spec.unwrap_or_else(|| PathBuf::from(format!("deploy-specs/{service}.toml")))
}

fn load_spec(service: &str, spec: Option<PathBuf>) -> Result<Spec, Error> {
    let spec = Spec::load(&spec_path(service, spec))?;
    if spec.service.name != service {
        return Err(Error::BadInput(format!(
            "the spec describes service {:?}, not {service:?}",
            spec.service.name
        )));
    }
    Ok(spec)
}

/// [`fail`], and with `json` also the one JSON object a `--json` verb owes its caller.
fn fail_with_json(service: &str, e: &Error, json: bool) -> u8 {
    if json {
        let v = serde_json::json!({
            "service": service, "error": e.kind(), "reason": e.to_string(),
            "exit_code": e.exit_code(),
        });
        println!("{v}");
    }
    fail(e)
}

/// Prints an error for a human (stderr) and returns its exit code.
fn fail(e: &Error) -> u8 {
    eprintln!("error: {e}");
    e.exit_code()
}

async fn run_async(command: Command) -> u8 {
    match command {
        Command::Check { spec } => check(&spec),
        Command::Release {
            service,
            tag,
            spec,
            redeploy,
            conn,
        } => {
            let out = Output::new(conn.json);
            let mut version = tag.clone();
            let result = async {
                check_tag(&tag)?;
                let d =
                    Deployer::new(conn.client(), load_spec(&service, spec)?, out.clone()).await?;
                if redeploy {
                    version = d.redeploy_version(&tag).await?;
                }
                d.release(&version).await
            }
            .await;
            finish(&service, &version, result, &out)
        }
        Command::Plan {
            service,
            tag,
            spec,
            redeploy,
            conn,
        } => {
            let out = Output::new(true);
            let result = async {
                check_tag(&tag)?;
                let d = Deployer::new(conn.client(), load_spec(&service, spec)?, out).await?;
                let version = if redeploy {
                    d.redeploy_version(&tag).await?
                } else {
                    tag.clone()
                };
                d.preview(&version).await
            }
            .await;
            match result {
                Ok(p) if conn.json => {
                    println!("{}", serde_json::to_string(&p).unwrap_or_default());
                    exit::OK
                }
                Ok(p) => {
                    for line in p.lines() {
                        println!("{line}");
                    }
                    exit::OK
                }
                Err(e) => fail_with_json(&service, &e, conn.json),
            }
        }
        Command::Rollback {
            service,
            version,
            spec,
            conn,
        } => {
            let out = Output::new(conn.json);
            let mut tag = version.clone().unwrap_or_default();
            let result = async {
                let d =
                    Deployer::new(conn.client(), load_spec(&service, spec)?, out.clone()).await?;
                tag = match &version {
                    Some(v) => d.earlier_version(v).await?,
                    None => d.previous_version().await?,
                };
                out.step(&format!("rolling {service} back to {tag}"), None);
                d.release(&tag).await
            }
            .await;
            finish(&service, &tag, result, &out)
        }
        Command::Resume {
            service,
            spec,
            conn,
        } => {
            let out = Output::new(conn.json);
            let client = conn.client();
            let active = match client.active_release(&service).await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    return fail(&Error::BadInput(format!(
                        "service {service} has no active release"
                    )))
                }
                Err(e) => return fail(&e.into()),
            };
            if active.paused {
                if let Err(e) = client.control(&active.id, Control::Resume).await {
                    return fail(&e.into());
                }
                out.step(&format!("release {} resumed", active.id), None);
            }
            if release::is_driven(&active) {
                out.step(
                    &format!(
                        "release {} is being driven by {}",
                        active.id,
                        active
                            .status
                            .driver
                            .as_ref()
                            .map_or("?", |l| l.who.as_str())
                    ),
                    None,
                );
                return exit::OK;
            }
            let tag = active.to_version.clone();
            let result = async {
                let d = Deployer::new(client, load_spec(&service, spec)?, out.clone()).await?;
                d.resume().await.map(|r| (Outcome::Released, Some(r)))
            }
            .await;
            finish(&service, &tag, result, &out)
        }
        Command::Promote { target, conn } => control(&conn, &target, Control::Promote).await,
        Command::Abort { target, conn } => control(&conn, &target, Control::Abort).await,
        Command::Pause { target, conn } => control(&conn, &target, Control::Pause).await,
        Command::Status {
            service,
            watch,
            conn,
        } => status(&conn, service.as_deref(), watch).await,
        Command::History { service, conn } => history(&conn, service.as_deref()).await,
        Command::Update {
            service,
            memory,
            cpus,
            force,
            spec,
            conn,
        } => {
            let want = crate::limits::Limits {
                memory: memory.map(|m| m.as_u64()),
                cpus,
            };
            update(&service, want, force, spec, &conn).await
        }
        Command::Volume { verb } => volume(verb).await,
        Command::Accessory { verb } => accessory(verb).await,
        Command::Lock { verb } => lock(verb).await,
        Command::Logs {
            service,
            version,
            since,
            tail,
            follow,
            spec,
            json,
        } => {
            let query = crate::logs::Query {
                version,
                since,
                tail,
                follow,
            };
            logs(&service, spec, &query, json).await
        }
        Command::Heartbeat {
            service,
            spec,
            conn,
        } => {
            let spec = match load_spec(&service, spec) {
                Ok(s) => s,
                Err(e) => return fail(&e),
            };
            let hosts = match crate::docker::Host::connect_all(&spec).await {
                Ok(h) => h,
                Err(e) => return fail(&e),
            };
            let client = conn.client();
            // Runs until the process is killed: the agent never returns.
            match heartbeat::run_agent(&client, &hosts, &spec).await {}
        }
    }
}

/// `haddock update`: plans on every host first (nothing changes on a refusal), applies, then
/// records the change in the locator (the service's `limit_changes`).
async fn update(
    service: &str,
    want: crate::limits::Limits,
    force: bool,
    spec: Option<PathBuf>,
    conn: &Conn,
) -> u8 {
    let json = conn.json;
    let out = Output::new(json);
    let client = conn.client();
    let result = async {
        want.check()?;
        let spec = load_spec(service, spec)?;
        // Before anything changes: a locator that cannot take the record refuses now.
        let known: Vec<String> = client
            .instances(service)
            .await?
            .into_iter()
            .map(|i| i.id)
            .collect();
        let hosts = crate::docker::Host::connect_all(&spec).await?;
        let plan = crate::limits::Update::plan(&hosts, service, want, force).await?;
        let changes = plan.apply(&hosts, &out).await?;
        let record = crate::limits::record(&changes, want, &release::operator(), &known);
        if !record.instances.is_empty() {
            client.record_limits(service, &record).await.map_err(|e| {
                Error::Inconsistent(format!(
                    "the limits of {} instance(s) were changed but the locator did not record \
                     it: {e}",
                    changes.len()
                ))
            })?;
        }
        Ok::<_, Error>(changes)
    }
    .await;
    match result {
        Ok(changes) => {
            if json {
                let v = serde_json::json!({ "service": service, "updated": changes });
                println!("{v}");
            } else {
                println!(
                    "updated {} instance(s) of {service} in place",
                    changes.len()
                );
            }
            exit::OK
        }
        Err(e) => fail_with_json(service, &e, json),
    }
}

async fn volume(verb: VolumeVerb) -> u8 {
    let (service, spec) = match &verb {
        VolumeVerb::Ls { service, spec, .. }
        | VolumeVerb::Inspect { service, spec, .. }
        | VolumeVerb::Rm { service, spec, .. } => (service.clone(), spec.clone()),
    };
    let result = async {
        let spec = load_spec(&service, spec)?;
        let hosts = crate::docker::Host::connect_all(&spec).await?;
        match &verb {
            VolumeVerb::Ls { json, .. } => {
                let rows = crate::volume::list(&hosts, &spec).await?;
                if *json {
                    println!("{}", serde_json::to_string(&rows).unwrap_or_default());
                }
                for r in rows.iter().filter(|_| !*json) {
                    let size = r
                        .size
                        .map(|s| bytesize::ByteSize(s).to_string_as(true))
                        .unwrap_or_else(|| "-".into());
                    println!(
                        "{:<28} {:<30} {:<8} size {:<10} {} {}{}",
                        r.name,
                        r.host,
                        r.driver.as_deref().unwrap_or("missing"),
                        size,
                        if r.managed_by_haddock {
                            "haddock's"
                        } else {
                            "found"
                        },
                        if r.mounted_by.is_empty() {
                            "unmounted".to_string()
                        } else {
                            format!("mounted by {}", r.mounted_by.join(","))
                        },
                        if r.drift.is_empty() {
                            String::new()
                        } else {
                            format!("  DRIFT: {}", r.drift.join("; "))
                        }
                    );
                }
            }
            VolumeVerb::Inspect { name, .. } => {
                let v = crate::volume::inspect_everywhere(&hosts, &spec, name).await?;
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            }
            VolumeVerb::Rm { name, .. } => {
                let removed = crate::volume::remove(&hosts, &spec, name).await?;
                if removed.is_empty() {
                    println!("volume {name} exists on no host");
                } else {
                    println!("removed volume {name} from {}", removed.join(", "));
                }
            }
        }
        Ok::<(), Error>(())
    }
    .await;
    match result {
        Ok(()) => exit::OK,
        Err(e) => fail(&e),
    }
}

async fn lock(verb: LockVerb) -> u8 {
    let (service, conn) = match &verb {
        LockVerb::Acquire { service, conn, .. }
        | LockVerb::Release { service, conn }
        | LockVerb::Status { service, conn } => (service.clone(), conn.clone()),
    };
    let client = conn.client();
    let result = async {
        let svc = match &verb {
            LockVerb::Acquire { message, .. } => {
                let new = locator_wire::api::NewLock {
                    who: release::operator(),
                    message: message.clone(),
                };
                match client.lock(&service, &new).await {
                    Err(e) if e.code() == Some("service_locked") => {
                        let held = client.service(&service).await?.lock;
                        return Err(held.map_or(e.into(), |l| Error::locked(&service, &l)));
                    }
                    other => other?,
                }
            }
            LockVerb::Release { .. } => client.unlock(&service).await?,
            LockVerb::Status { .. } => client.service(&service).await?,
        };
        Ok::<_, Error>(svc.lock)
    }
    .await;
    match result {
        Ok(lock) => {
            if conn.json {
                println!("{}", serde_json::to_string(&lock).unwrap_or_default());
            } else {
                match (&verb, &lock) {
                    (LockVerb::Release { .. }, _) => println!("{service} is unlocked"),
                    (_, Some(l)) => println!("{}", Error::locked(&service, l)),
                    (_, None) => println!("{service} is not locked"),
                }
            }
            exit::OK
        }
        Err(e) => fail_with_json(&service, &e, conn.json),
    }
}

/// `haddock logs`: merged by time (or, with `--follow`, as lines arrive).
async fn logs(service: &str, spec: Option<PathBuf>, query: &crate::logs::Query, json: bool) -> u8 {
    use futures_util::StreamExt;
    let print = |l: &crate::logs::Line| {
        if json {
            println!("{}", serde_json::to_string(l).unwrap_or_default());
        } else {
            println!("{}", l.human());
        }
    };
    let result = async {
        let spec = load_spec(service, spec)?;
        let hosts = crate::docker::Host::connect_all(&spec).await?;
        let sources = crate::logs::sources(&hosts, service, query).await?;
        if query.follow {
            let mut lines = std::pin::pin!(crate::logs::follow(&sources, query));
            while let Some(l) = lines.next().await {
                print(&l);
            }
        } else {
            for l in crate::logs::collect(&sources, query).await {
                print(&l);
            }
        }
        Ok::<_, Error>(())
    }
    .await;
    match result {
        Ok(()) => exit::OK,
        Err(e) => fail(&e),
    }
}

async fn accessory(verb: AccessoryVerb) -> u8 {
    let (args, what) = match &verb {
        AccessoryVerb::Boot(a) => (a, "boot"),
        AccessoryVerb::Reboot(a) => (a, "reboot"),
        AccessoryVerb::Remove { args, .. } => (args, "remove"),
        AccessoryVerb::Status(a) => (a, "status"),
    };
    let result = async {
        let spec = load_spec(&args.service, args.spec.clone())?;
        if args.name.is_none() && matches!(what, "reboot" | "remove") {
            return Err(Error::BadInput(format!(
                "accessory {what} needs the accessory's name"
            )));
        }
        let chosen = crate::accessory::select(&spec, args.name.as_deref())?;
        let hosts = crate::docker::Host::connect_all(&spec).await?;
        let mut rows = Vec::new();
        for a in chosen {
            rows.extend(match &verb {
                AccessoryVerb::Boot(_) => crate::accessory::boot(&hosts, &spec, a).await?,
                AccessoryVerb::Reboot(_) => crate::accessory::reboot(&hosts, &spec, a).await?,
                AccessoryVerb::Remove { force, .. } => {
                    crate::accessory::remove(&hosts, &spec, a, *force).await?
                }
                AccessoryVerb::Status(_) => crate::accessory::status(&hosts, &spec, a).await?,
            });
        }
        Ok::<_, Error>(rows)
    }
    .await;
    match result {
        Ok(rows) => {
            if args.json {
                println!("{}", serde_json::to_string(&rows).unwrap_or_default());
            } else {
                for r in &rows {
                    println!(
                        "{:<12} {:<30} {:<28} {:<8} {:<16} {} {}",
                        r.accessory,
                        r.host,
                        r.container,
                        r.state.as_deref().unwrap_or("absent"),
                        r.ip.as_deref().unwrap_or("-"),
                        r.image.as_deref().unwrap_or("-"),
                        r.action
                    );
                }
            }
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

/// Prints the result of a release verb and returns its exit code.
fn finish(
    service: &str,
    tag: &str,
    result: crate::error::Result<(Outcome, Option<Release>)>,
    out: &Output,
) -> u8 {
    let named = result.as_ref().map(|(o, rec)| (o.as_str(), rec.as_ref()));
    let report = output::report(service, tag, named, out);
    if out.json() {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
        if let Err(e) = &result {
            eprintln!("error: {e}");
        }
        return report.exit_code;
    }
    match &result {
        Ok((Outcome::AlreadyCurrent, _)) => println!("{service} already runs {tag}"),
        Ok((Outcome::Released, _)) => println!(
            "released {service} {tag} (release {}, {:.2}s)",
            report.release.as_deref().unwrap_or("?"),
            out.elapsed().as_secs_f64()
        ),
        Err(e) => eprintln!("error: {e}"),
    }
    report.exit_code
}

/// Finds the release a control verb means: the service's active release, or a release id.
async fn resolve(client: &Client, target: &str) -> Result<Release, Error> {
    if let Some(r) = client.active_release(target).await? {
        return Ok(r);
    }
    match client.release(target).await {
        Ok(r) => Ok(r),
        Err(e) if e.status().is_some_and(|s| s.as_u16() == 404) => Err(Error::BadInput(format!(
            "{target} is neither a service with an active release nor a release id"
        ))),
        Err(e) => Err(e.into()),
    }
}

async fn control(conn: &Conn, target: &str, c: Control) -> u8 {
    let client = conn.client();
    let result = async {
        let r = resolve(&client, target).await?;
        if r.state.is_terminal() {
            return Err(Error::BadInput(format!(
                "release {} is already {}",
                r.id, r.state
            )));
        }
        // The locator refuses a control that means nothing in the release's state (abort
        // while the old containers are being removed, pause after promotion): bad input,
        // with its reason, and nothing changed.
        match client.control(&r.id, c).await {
            Ok(r) => Ok(r),
            Err(e) if matches!(e.code(), Some("control_refused" | "release_finished")) => {
                Err(Error::BadInput(format!("{c:?} refused: {}", e.message())))
            }
            Err(e) => Err(e.into()),
        }
    }
    .await;
    match result {
        Ok(r) => {
            if conn.json {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
            } else {
                println!(
                    "{c:?} sent to release {} ({} → {}, state {})",
                    r.id,
                    r.from_version.as_deref().unwrap_or("-"),
                    r.to_version,
                    r.state
                );
            }
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

/// `haddock status [SERVICE] [--watch]`.
async fn status(conn: &Conn, service: Option<&str>, watch: bool) -> u8 {
    let client = conn.client();
    loop {
        let frame = async {
            let snap = client.snapshot().await?;
            render_status(&snap, service, conn.json)
        }
        .await;
        match frame {
            Ok(text) if watch && !conn.json => {
                // Home, clear, then the frame: a view that updates in place.
                print!(
                    "\x1b[H\x1b[2J{}  (every {}s; Ctrl-C to stop)\n\n{text}",
                    humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
                    WATCH_EVERY.as_secs()
                );
            }
            Ok(text) => print!("{text}"),
            Err(e) => return fail(&e),
        }
        if !watch {
            return exit::OK;
        }
        let _ = std::io::Write::flush(&mut std::io::stdout());
        tokio::time::sleep(WATCH_EVERY).await;
    }
}

/// How often `status --watch` redraws.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// What `haddock status` prints for one snapshot: a line per service, instance, lock and
/// active release (its bake and last analysis too), or with `json` one JSON array line.
fn render_status(
    snap: &locator_wire::api::Snapshot,
    service: Option<&str>,
    json: bool,
) -> Result<String, Error> {
    use std::fmt::Write;
    let services: Vec<_> = snap
        .services
        .iter()
        .filter(|s| service.is_none_or(|n| n == s.name))
        .collect();
    if let Some(name) = service {
        if services.is_empty() {
            return Err(Error::BadInput(format!(
                "the locator knows no service {name}"
            )));
        }
    }
    if json {
        let v: Vec<_> = services
            .iter()
            .map(|s| {
                serde_json::json!({
                    "service": s,
                    "instances": snap.instances_of(&s.name).collect::<Vec<_>>(),
                    "active_release": snap.active_release(&s.name),
                    "traffic": snap.traffic.get(&s.name),
                })
            })
            .collect();
        return Ok(format!(
            "{}\n",
            serde_json::to_string(&v).unwrap_or_default()
        ));
    }
    let mut out = String::new();
    for s in services {
        let weights: Vec<String> = s.weights.iter().map(|(v, w)| format!("{v}={w}%")).collect();
        let _ = writeln!(
            out,
            "{}  primary {}  weights {}",
            s.name,
            s.primary_version.as_deref().unwrap_or("-"),
            if weights.is_empty() {
                "-".to_string()
            } else {
                weights.join(" ")
            }
        );
        for i in snap.instances_of(&s.name) {
            let _ = writeln!(
                out,
                "  {:<40} {:<10} {:<9} {:<21} sessions {:<5} in-flight {}",
                i.id,
                i.version,
                i.state.to_string(),
                i.address,
                i.load.live_sessions,
                i.load.in_flight
            );
        }
        if let Some(c) = s.limit_changes.last() {
            let _ = writeln!(out, "  limits {}", limits_line(c));
        }
        if let Some(lock) = &s.lock {
            let _ = writeln!(out, "  LOCKED {}", Error::locked(&s.name, lock));
        }
        if let Some(r) = snap.active_release(&s.name) {
            let _ = writeln!(
                out,
                "  release {} {} → {}: {} step {}{}",
                r.id,
                r.from_version.as_deref().unwrap_or("-"),
                r.to_version,
                r.state,
                r.step,
                if r.paused { " (paused)" } else { "" }
            );
            if let Some(b) = &r.status.bake {
                // A running bake ends at `until_ms`; a paused one keeps its frozen remainder.
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                let left = b
                    .until_ms
                    .map_or(b.remaining_ms, |until| until.saturating_sub(now));
                let _ = writeln!(
                    out,
                    "    bake at {} %: {} of {} left{}",
                    b.weight,
                    output::fmt_duration(std::time::Duration::from_millis(left)),
                    output::fmt_duration(std::time::Duration::from_millis(b.pause_ms)),
                    if b.until_ms.is_none() {
                        " (paused)"
                    } else {
                        ""
                    }
                );
            }
            if let Some(a) = &r.status.analysis {
                let _ = writeln!(out, "    analysis {a}");
            }
            if let Some(w) = &r.status.waiting_for {
                let _ = writeln!(out, "    waiting for {w}");
            }
        }
    }
    Ok(out)
}

/// One in-place limits change for a person: when, who, and each instance from → to.
fn limits_line(c: &locator_wire::api::LimitsChange) -> String {
    let bytes = |b: u64| {
        if b == 0 {
            "none".to_string()
        } else {
            bytesize::ByteSize(b).to_string_as(true)
        }
    };
    let cpus = |n: u64| {
        if n == 0 {
            "none".to_string()
        } else {
            format!("{}", n as f64 / 1e9)
        }
    };
    let moves: Vec<String> = c
        .instances
        .iter()
        .map(|i| {
            let mut parts = Vec::new();
            if let (Some(f), Some(t)) = (i.memory_from, i.memory_to) {
                parts.push(format!("memory {} → {}", bytes(f), bytes(t)));
            }
            if let (Some(f), Some(t)) = (i.nano_cpus_from, i.nano_cpus_to) {
                parts.push(format!("cpus {} → {}", cpus(f), cpus(t)));
            }
            format!("{}: {}", i.id, parts.join(", "))
        })
        .collect();
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(c.at);
    format!(
        "changed {} by {}: {}",
        humantime::format_rfc3339_seconds(at),
        c.who,
        moves.join("; ")
    )
}

async fn history(conn: &Conn, service: Option<&str>) -> u8 {
    let list = match conn.client().history(service).await {
        Ok(l) => l,
        Err(e) => return fail(&e.into()),
    };
    // In-place limit changes are kept with the service, not as releases.
    let changes: Vec<(String, locator_wire::api::LimitsChange)> = match service {
        Some(_) if conn.json => Vec::new(),
        Some(name) => match conn.client().service(name).await {
            Ok(s) => s
                .limit_changes
                .into_iter()
                .map(|c| (s.name.clone(), c))
                .collect(),
            Err(e) if e.status().is_some_and(|s| s.as_u16() == 404) => Vec::new(),
            Err(e) => return fail(&e.into()),
        },
        None => Vec::new(),
    };
    if conn.json {
        // The releases, as always (a stable interface); limit changes are in `status --json`,
        // with their service.
        println!("{}", serde_json::to_string(&list).unwrap_or_default());
        return exit::OK;
    }
    for (name, c) in changes.iter().rev() {
        println!("limits     {name:<12} {}", limits_line(c));
    }
    for r in list {
        let took = r.finished_at.map(|f| f.saturating_sub(r.created_at));
        println!(
            "{:<10} {:<12} {:>8} → {:<8} {:<12} {:>8}  {}{}",
            r.id,
            r.service,
            r.from_version.as_deref().unwrap_or("-"),
            r.to_version,
            r.state.to_string(),
            took.map(|t| format!("{:.1}s", t as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
            r.who,
            r.reason
                .map(|x| format!("  {}", x.lines().next().unwrap_or("")))
                .unwrap_or_default()
        );
        for a in &r.actions {
            println!(
                "{:<10} {:?} by {} at {}",
                "",
                a.control,
                a.who,
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(a.at)
                )
            );
        }
    }
    exit::OK
}
