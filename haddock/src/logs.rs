//! `haddock logs`: what every instance of a service wrote, on every host, through the Engine
//! API (never the `docker` CLI), interleaved by time, each line named by host, instance and
//! version.
//!
//! Docker stamps each line it stores (`timestamps=true` puts an RFC 3339 time before it), so
//! lines from several containers and hosts are merged by those times, not by when they reach
//! haddock. `--follow` cannot wait for the slowest host to sort: it prints each line as it
//! arrives, which is time order per container and close to it across them.

use crate::docker::{Host, Managed};
use crate::error::{Error, Result};
use bollard::container::LogOutput;
use bollard::query_parameters::LogsOptions;
use futures_util::{stream, Stream, StreamExt};
use serde::Serialize;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What `haddock logs` asks for.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Only the instances of this version.
    pub version: Option<String>,
    /// Only lines written in the last this long.
    pub since: Option<Duration>,
    /// At most this many of each container's last lines.
    pub tail: Option<u64>,
    /// Keep printing new lines until interrupted.
    pub follow: bool,
}

/// One line of one instance.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Line {
    /// As Docker stamped it (RFC 3339, UTC).
    pub time: String,
    pub host: String,
    pub instance: String,
    pub version: String,
    /// `stdout` or `stderr`.
    pub stream: &'static str,
    pub line: String,
}

impl Line {
    /// `TIME HOST/INSTANCE/VERSION | LINE`, what the terminal shows.
    pub fn human(&self) -> String {
        format!(
            "{} {}/{}/{} | {}",
            self.time, self.host, self.instance, self.version, self.line
        )
    }

    fn sort_key(&self) -> (SystemTime, &str, &str) {
        let t = humantime::parse_rfc3339(&self.time).unwrap_or(UNIX_EPOCH);
        (t, &self.host, &self.instance)
    }
}

/// The containers whose logs are read: every container of `service` (running or not: a
/// crashed instance's last words are what an operator looks for) of `query.version`, on every
/// host. None at all is bad input, naming what was looked for.
pub async fn sources<'h>(
    hosts: &'h [Host],
    service: &str,
    query: &Query,
) -> Result<Vec<(&'h Host, Managed)>> {
    let mut found = Vec::new();
    for h in hosts {
        for c in h.find(service, None).await? {
            if query.version.as_ref().is_none_or(|v| *v == c.version) {
                found.push((h, c));
            }
        }
    }
    if found.is_empty() {
        return Err(Error::BadInput(format!(
            "no container of {service}{} on any of its hosts",
            query
                .version
                .as_ref()
                .map(|v| format!(" version {v}"))
                .unwrap_or_default()
        )));
    }
    Ok(found)
}

fn options(query: &Query) -> LogsOptions {
    let since = query.since.map_or(0, |d| {
        let at = SystemTime::now()
            .checked_sub(d)
            .unwrap_or(UNIX_EPOCH)
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        i32::try_from(at.as_secs()).unwrap_or(i32::MAX)
    });
    LogsOptions {
        follow: query.follow,
        stdout: true,
        stderr: true,
        since,
        timestamps: true,
        tail: query
            .tail
            .map_or_else(|| "all".to_string(), |n| n.to_string()),
        ..Default::default()
    }
}

/// Splits one frame of Docker's log stream into stamped lines (a frame may hold several).
fn lines_of(frame: LogOutput, h: &Host, c: &Managed) -> Vec<Line> {
    let (stream, bytes) = match frame {
        LogOutput::StdErr { message } => ("stderr", message),
        LogOutput::StdOut { message } | LogOutput::Console { message } => ("stdout", message),
        LogOutput::StdIn { .. } => return Vec::new(),
    };
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (time, line) = l.split_once(' ').unwrap_or((l, ""));
            Line {
                time: time.to_string(),
                host: h.name.clone(),
                instance: c.name.clone(),
                version: c.version.clone(),
                stream,
                line: line.to_string(),
            }
        })
        .collect()
}

/// The lines of one container, as a stream (ends with the logs, or never with `follow`).
fn of_one<'a>(h: &'a Host, c: &'a Managed, query: &Query) -> impl Stream<Item = Line> + 'a {
    h.engine()
        .logs(&c.id, Some(options(query)))
        .flat_map(move |frame| {
            let lines = match frame {
                Ok(f) => lines_of(f, h, c),
                Err(e) => {
                    tracing::warn!(host = %h.name, container = %c.name, error = %e, "reading logs");
                    Vec::new()
                }
            };
            stream::iter(lines)
        })
}

/// Every line of every source, sorted by Docker's time stamps.
pub async fn collect(sources: &[(&Host, Managed)], query: &Query) -> Vec<Line> {
    let query = Query {
        follow: false,
        ..query.clone()
    };
    let all = futures_util::future::join_all(
        sources
            .iter()
            .map(|(h, c)| of_one(h, c, &query).collect::<Vec<_>>()),
    )
    .await;
    let mut lines: Vec<Line> = all.into_iter().flatten().collect();
    lines.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
    lines
}

/// Every source's lines as they come (`--follow`): the earlier lines first, as `collect`
/// would give them, then new ones in the order they arrive.
pub fn follow<'a>(
    sources: &'a [(&'a Host, Managed)],
    query: &'a Query,
) -> impl Stream<Item = Line> + 'a {
    stream::select_all(sources.iter().map(|(h, c)| Box::pin(of_one(h, c, query))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_counted_back_from_now_and_tail_defaults_to_all() {
        let q = Query {
            since: Some(Duration::from_secs(600)),
            ..Query::default()
        };
        let o = options(&q);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!((now - 600 - i64::from(o.since)).abs() <= 1, "{}", o.since);
        assert_eq!(o.tail, "all");
        assert!(o.timestamps && o.stdout && o.stderr && !o.follow);
        assert_eq!(options(&Query::default()).since, 0, "from the start");
    }

    #[test]
    fn lines_sort_by_their_stamps_not_by_the_text() {
        // RFC 3339 with trimmed nanoseconds does not sort as text: .1 is before .12.
        let line = |time: &str| Line {
            time: time.into(),
            host: "h".into(),
            instance: "i".into(),
            version: "v".into(),
            stream: "stdout",
            line: String::new(),
        };
        let mut v = [
            line("2026-11-29T15:02:38.12Z"),
            line("2026-11-29T15:02:38.1Z"),
        ];
        v.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
        assert_eq!(v[0].time, "2026-11-29T15:02:38.1Z");
    }
}
