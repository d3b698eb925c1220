//! Release hooks (`[hooks]` in the spec): commands run before a release, after each canary
//! step, and after the release is done or rolled back, with the release's facts in their
//! environment — what Kamal calls hooks and Flagger webhooks.
//!
//! `pre_release` is a gate: it runs after every check passed and before anything changes, and
//! a failure (non-zero exit, a timeout, a command that cannot start) stops the release with
//! exit 2, nothing changed. The other hooks are notifications: a failure is reported on the
//! release's progress and in the log, and the release goes on (a chat server being down must
//! not hold users on a half-shifted canary).

use crate::error::{Error, Result};
use crate::output::Output;
use crate::spec::HooksSection;
use std::process::Stdio;
use tokio::process::Command;

/// When a hook runs; its name in the spec and in `HADDOCK_HOOK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    PreRelease,
    PostStep,
    PostRelease,
    PostRollback,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::PreRelease => "pre_release",
            Hook::PostStep => "post_step",
            Hook::PostRelease => "post_release",
            Hook::PostRollback => "post_rollback",
        }
    }

    fn command(self, hooks: &HooksSection) -> &[String] {
        match self {
            Hook::PreRelease => &hooks.pre_release,
            Hook::PostStep => &hooks.post_step,
            Hook::PostRelease => &hooks.post_release,
            Hook::PostRollback => &hooks.post_rollback,
        }
    }
}

/// The facts a hook is given, as `HADDOCK_*` environment variables.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub service: String,
    pub release: Option<String>,
    pub from_version: Option<String>,
    pub to_version: String,
    pub who: String,
    /// The weight just applied (`post_step`).
    pub weight: Option<u32>,
    /// Why the release rolled back (`post_rollback`).
    pub reason: Option<String>,
}

impl Facts {
    fn env(&self, hook: Hook) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("HADDOCK_HOOK", hook.name().to_string()),
            ("HADDOCK_SERVICE", self.service.clone()),
            ("HADDOCK_TO_VERSION", self.to_version.clone()),
            (
                "HADDOCK_FROM_VERSION",
                self.from_version.clone().unwrap_or_default(),
            ),
            ("HADDOCK_RELEASE", self.release.clone().unwrap_or_default()),
            ("HADDOCK_WHO", self.who.clone()),
        ];
        if let Some(w) = self.weight {
            env.push(("HADDOCK_WEIGHT", w.to_string()));
        }
        if let Some(r) = &self.reason {
            env.push(("HADDOCK_REASON", r.clone()));
        }
        env
    }
}

/// Runs `hook` if the spec has one: `Ok` when it exited 0 (or there is none), else why not.
async fn run(hooks: &HooksSection, hook: Hook, facts: &Facts) -> std::result::Result<(), String> {
    let Some((program, args)) = hook.command(hooks).split_first() else {
        return Ok(());
    };
    let child = Command::new(program)
        .args(args)
        .envs(facts.env(hook))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {program:?}: {e}"))?;
    let out = tokio::time::timeout(hooks.timeout, child.wait_with_output())
        .await
        .map_err(|_| {
            format!(
                "{program:?} did not finish within {} (killed)",
                crate::output::fmt_duration(hooks.timeout)
            )
        })?
        .map_err(|e| format!("waiting for {program:?}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    let said = said.trim();
    Err(format!(
        "{program:?} exited with {}{}",
        out.status
            .code()
            .map_or("a signal".to_string(), |c| format!("status {c}")),
        if said.is_empty() {
            String::new()
        } else {
            format!(": {}", said.lines().last().unwrap_or_default())
        }
    ))
}

/// The `pre_release` gate: a failure is an [`Error::Hook`] (exit 2, nothing changed).
pub async fn gate(hooks: &HooksSection, facts: &Facts, out: &Output) -> Result<()> {
    if hooks.pre_release.is_empty() {
        return Ok(());
    }
    run(hooks, Hook::PreRelease, facts)
        .await
        .map_err(|why| Error::Hook {
            hook: Hook::PreRelease.name(),
            why,
        })?;
    out.step("hook pre_release passed", None);
    Ok(())
}

/// A notification hook: a failure is reported, never an error of the release.
pub async fn notify(hooks: &HooksSection, hook: Hook, facts: &Facts, out: &Output) {
    if hook.command(hooks).is_empty() {
        return;
    }
    if let Err(why) = run(hooks, hook, facts).await {
        tracing::warn!(hook = hook.name(), %why, "hook failed; the release goes on");
        out.step(
            &format!("hook {} failed (the release goes on): {why}", hook.name()),
            None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn hooks(pre: &[&str]) -> HooksSection {
        HooksSection {
            pre_release: pre.iter().map(|s| s.to_string()).collect(),
            timeout: Duration::from_secs(5),
            ..HooksSection::default()
        }
    }

    fn facts() -> Facts {
        Facts {
            service: "svc".into(),
            to_version: "2".into(),
            from_version: Some("1".into()),
            who: "ci".into(),
            ..Facts::default()
        }
    }

    #[tokio::test]
    async fn a_failing_gate_says_why_and_the_facts_reach_the_command() {
        let out = Output::new(true);
        let ok = hooks(&[
            "sh",
            "-c",
            "test \"$HADDOCK_HOOK $HADDOCK_FROM_VERSION $HADDOCK_TO_VERSION\" = 'pre_release 1 2'",
        ]);
        gate(&ok, &facts(), &out).await.unwrap();
        let bad = hooks(&["sh", "-c", "echo migrations pending >&2; exit 4"]);
        let e = gate(&bad, &facts(), &out).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("exited with status 4: migrations pending"),
            "{e}"
        );
        assert_eq!(e.exit_code(), crate::error::exit::BAD_INPUT);
        let missing = hooks(&["/nonexistent/hook"]);
        assert!(gate(&missing, &facts(), &out)
            .await
            .unwrap_err()
            .to_string()
            .contains("cannot start"));
        let slow = HooksSection {
            timeout: Duration::from_millis(200),
            ..hooks(&["sleep", "5"])
        };
        assert!(gate(&slow, &facts(), &out)
            .await
            .unwrap_err()
            .to_string()
            .contains("did not finish within"));
    }
}
