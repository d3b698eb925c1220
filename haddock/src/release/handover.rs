//! The hand-over: the spec's `container.handover` command, run inside the instances a release
//! replaces once their replacements take every new session, so that a stateful service moves
//! a role (the optimizer: its cache volume's writer) while both still run, instead of the slow
//! way when the old instance is stopped.

use super::Deployer;
use crate::docker::Managed;
use std::time::{Duration, Instant};

/// The longest a hand-over command may run (it waits for writes in flight, then the successor).
const TIMEOUT: Duration = Duration::from_secs(30);

/// Which way the role moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    /// After the promotion: from the old instances to the release's new ones.
    ToNew,
    /// After an abort past the promotion: from the new instances back to the old ones.
    ToOld,
}

/// Runs the hand-over command in every running instance of `direction`'s leaving side, on each
/// host that has running instances of the arriving side, `{successors}` being those. Each
/// outcome is a progress line; a failure is reported and never stops the release: stopping
/// the instance later hands the role over anyway, only more slowly.
pub(super) async fn run(d: &Deployer, service: &str, release: &str, direction: Direction) {
    let command = &d.spec.container.handover;
    if command.is_empty() {
        return;
    }
    let port = &d.spec.service.port.to_string();
    let per_host = d.hosts.iter().map(|h| async move {
        let containers = match h.find(service, None).await {
            Ok(c) => c,
            Err(e) => return vec![format!("hand-over skipped on {}: {e}", h.name)],
        };
        let (new, old): (Vec<Managed>, Vec<Managed>) = containers
            .into_iter()
            .filter(|c| c.running)
            .partition(|c| c.release == release);
        let (leaving, arriving) = match direction {
            Direction::ToNew => (old, new),
            Direction::ToOld => (new, old),
        };
        if arriving.is_empty() {
            return Vec::new();
        }
        let successors: Vec<&str> = arriving.iter().map(|c| c.instance.as_str()).collect();
        let successors = successors.join(",");
        let cmd: Vec<String> = command
            .iter()
            .map(|a| a.replace("{successors}", &successors).replace("{port}", port))
            .collect();
        let mut lines = Vec::new();
        for c in leaving {
            let t = Instant::now();
            let line = match h.exec(&c.id, &cmd, TIMEOUT).await {
                Ok((0, out)) => format!(
                    "hand-over in {} → {successors}: {} ({} ms)",
                    c.instance,
                    last_line(&out),
                    t.elapsed().as_millis()
                ),
                Ok((code, out)) => {
                    tracing::warn!(instance = %c.instance, code, output = %out, "hand-over command failed");
                    format!(
                        "hand-over in {} failed (exit {code}): {}; the role moves when it stops",
                        c.instance,
                        last_line(&out)
                    )
                }
                Err(e) => {
                    tracing::warn!(instance = %c.instance, error = %e, "hand-over command could not run");
                    format!(
                        "hand-over in {} could not run: {e}; the role moves when it stops",
                        c.instance
                    )
                }
            };
            lines.push(line);
        }
        lines
    });
    for line in futures_util::future::join_all(per_host)
        .await
        .into_iter()
        .flatten()
    {
        d.out.step(&line, None);
    }
}

/// The last non-empty line of a command's output, at most 300 characters: what it concluded.
fn last_line(out: &str) -> String {
    let line = out
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no output");
    line.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_conclusion_is_the_last_line_cut_short() {
        assert_eq!(super::last_line("a\n{\"x\":1}\n\n"), "{\"x\":1}");
        assert_eq!(super::last_line(""), "no output");
        assert_eq!(super::last_line(&"é".repeat(400)).chars().count(), 300);
    }
}
