//! Failpoints: named places where a test stops this hub dead, to reach the states that
//! only timing reaches otherwise. Compiled in only with the `failpoints` feature (the test
//! harness builds the binary with it; release builds do not, and there every
//! `fail_point!` is nothing). `FAILPOINTS=name=actions;...` arms them when the hub starts,
//! in the `fail` crate's syntax: `panic` (the first time it is reached), `2*off->panic`
//! (the third time), `sleep(500)`, ...
//!
//! While any failpoint is armed, a panic stops the whole process at once, as `kill -9` at
//! that line would; otherwise a panic in a spawned task would end that task alone and
//! the hub would carry on with half a step done.

/// After an assignment is committed, before it is sent to its node: the node never hears
/// of work the log says it holds.
pub const ASSIGN_BEFORE_SEND: &str = "hub-assign-before-send";
/// After a node's result is committed, before the node is told: the node sends it again,
/// to whichever hub leads next.
pub const RESULT_BEFORE_ACK: &str = "hub-result-before-ack";
/// After an entry is applied to the state (and the history store), before the apply
/// hook wakes watchers, sessions and the scheduler.
pub const APPLY_BEFORE_HOOK: &str = "hub-apply-before-hook";

/// After the leader found a node gone past its TTL, before it commits the node down: with
/// `sleep(ms)`, the node can come back in between.
pub const LIVENESS_BEFORE_DOWN: &str = "hub-liveness-before-down";

/// A node said it started an attempt of a tool that must not run twice, before the start
/// is committed: with `return`, the start is dropped, as when the leader dies or the
/// session breaks first, so the task stays assigned and the node, never answered, waits.
pub const START_BEFORE_COMMIT: &str = "hub-start-before-commit";

/// After a node's join is committed, before it is answered: the node never gets its
/// certificate and asks again.
pub const JOIN_BEFORE_ANSWER: &str = "hub-join-before-answer";

/// Every failpoint, for the check that `FAILPOINTS` names only real ones.
pub const ALL: [&str; 6] = [
    ASSIGN_BEFORE_SEND,
    RESULT_BEFORE_ACK,
    APPLY_BEFORE_HOOK,
    LIVENESS_BEFORE_DOWN,
    START_BEFORE_COMMIT,
    JOIN_BEFORE_ANSWER,
];

/// A setting a test plays with: in a build with failpoints, the environment variable
/// `var` when it is set and reads as a `T`; otherwise, and in every other build, `default`.
pub fn test_setting<T: std::str::FromStr>(var: &str, default: T) -> T {
    #[cfg(feature = "failpoints")]
    if let Some(v) = std::env::var(var).ok().and_then(|v| v.parse().ok()) {
        return v;
    }
    let _ = var;
    default
}

/// Arms the failpoints `FAILPOINTS` names; a name that is not a failpoint, or actions the
/// `fail` crate cannot read, stop the hub from starting. Without the feature a
/// non-empty `FAILPOINTS` is only logged.
pub fn arm() -> anyhow::Result<()> {
    let spec = std::env::var("FAILPOINTS").unwrap_or_default();
    if spec.trim().is_empty() {
        return Ok(());
    }
    arm_spec(&spec)
}

#[cfg(feature = "failpoints")]
fn arm_spec(spec: &str) -> anyhow::Result<()> {
    for part in spec.split(';').filter(|p| !p.trim().is_empty()) {
        let (name, actions) = part
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("FAILPOINTS: {part:?} is not name=actions"))?;
        let name = name.trim();
        anyhow::ensure!(
            ALL.contains(&name),
            "FAILPOINTS: no failpoint {name:?} (there are {ALL:?})"
        );
        fail::cfg(name, actions.trim()).map_err(|e| anyhow::anyhow!("FAILPOINTS: {name}: {e}"))?;
        tracing::warn!(failpoint = name, actions, "failpoint armed");
    }
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
    Ok(())
}

#[cfg(not(feature = "failpoints"))]
fn arm_spec(spec: &str) -> anyhow::Result<()> {
    tracing::warn!(
        FAILPOINTS = spec,
        "FAILPOINTS is set, but this build has no failpoints (built without --features failpoints); ignored"
    );
    Ok(())
}
