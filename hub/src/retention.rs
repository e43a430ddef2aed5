//! Retention of finished work, on the leader: once a second, when the history store holds
//! records past `retention_s` (or more than `retention_max_tasks`), commits an
//! `ExpireHistory` through Raft, naming the cut (end time and record) below which finished
//! work goes, at most `history::EXPIRE_BATCH` records at a time. Every hub then expires the
//! same records at the same log index.
//!
//! An expired record stays on disk (a tombstone) until this hub's next snapshot covers its
//! expiry; `purge_sooner` makes that snapshot once enough of them wait, so under a steady
//! load the data dir holds the retention's worth of records, not the retention's worth plus
//! whatever expired since the last snapshot `snapshot_logs` entries ago.

use std::time::Duration;

use tokio::sync::watch;

use crate::{chores::Chore, cluster::Hub, state::Command};

const TICK: Duration = Duration::from_secs(1);

/// Tombstones that make a hub snapshot before `snapshot_logs` says so (about 5 MB of
/// `echo` calls: what a snapshot frees outweighs what it costs).
pub(crate) const TOMBSTONES_FOR_SNAPSHOT: u64 = 4_096;

/// Least time between the end of one snapshot `purge_sooner` asked for and the next
/// request; at least ten times what the last one took, so a hub with a large live state
/// (serialized under the state lock) spends at most a tenth of its time on them.
const SNAPSHOT_GAP: Duration = Duration::from_secs(2);

/// How long a requested snapshot is waited for before asking may start again.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(60);

/// On every hub: asks Raft for a snapshot (which purges the tombstones it covers) once
/// `TOMBSTONES_FOR_SNAPSHOT` expired records wait for one.
pub(crate) async fn purge_sooner(hub: Hub, mut stop: watch::Receiver<bool>) {
    let mut beat = tokio::time::interval(TICK);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The clone follows the store across snapshot installs.
    let history = hub.state().history.clone();
    let mut metrics = hub.raft().metrics();
    let mut not_before = tokio::time::Instant::now();
    // A test lowers it, to reach it with a few calls.
    let threshold =
        crate::faults::test_setting("FLOTILLA_TOMBSTONES_FOR_SNAPSHOT", TOMBSTONES_FOR_SNAPSHOT);
    loop {
        tokio::select! {
            _ = beat.tick() => {}
            _ = stop.changed() => return,
        }
        let waiting = history.tombstones();
        if waiting < threshold || tokio::time::Instant::now() < not_before {
            continue;
        }
        let before = metrics.borrow().snapshot;
        let asked = tokio::time::Instant::now();
        // Ignored by Raft while a snapshot is being built already (its end is awaited
        // below all the same, and it purges as well).
        if let Err(e) = hub.raft().trigger().snapshot().await {
            tracing::warn!(error = %e, "asking for a snapshot failed");
            not_before = asked + SNAPSHOT_WAIT;
            continue;
        }
        tracing::debug!(
            tombstones = waiting,
            "snapshot asked for to purge expired work"
        );
        let built = metrics.wait_for(|m| m.snapshot != before);
        tokio::select! {
            _ = tokio::time::timeout(SNAPSHOT_WAIT, built) => {}
            _ = stop.changed() => return,
        }
        let took = asked.elapsed();
        not_before = tokio::time::Instant::now() + SNAPSHOT_GAP.max(took * 10);
    }
}

/// The chore that expires finished work past the retention.
pub(crate) struct Retention {
    retention_ms: u64,
    max: u64,
}

impl Retention {
    pub(crate) fn new(c: &flotilla_common::config::HubConfig) -> Self {
        Self {
            retention_ms: c.retention_s.saturating_mul(1000),
            max: c.retention_max_tasks,
        }
    }
}

impl Chore for Retention {
    fn period(&self) -> Duration {
        TICK
    }

    async fn run(&mut self, hub: &Hub) {
        let (retention_ms, max) = (self.retention_ms, self.max);
        let now_ms = flotilla_common::now_ms();
        let history = hub.state().history.clone();
        let (through_ms, entry) = match history.expiry_due(now_ms, retention_ms, max) {
            Ok(Some(t)) => t,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "reading the history store for retention failed");
                return;
            }
        };
        let before = history.len();
        let cmd = Command::ExpireHistory {
            through_ms,
            through_entry: Some(entry),
            at_ms: now_ms,
        };
        match hub.write(cmd).await {
            Ok(_) => tracing::debug!(
                through_ms,
                expired = before.saturating_sub(history.len()),
                "finished work expired"
            ),
            Err(e) => tracing::warn!(error = %e, "expiring finished work not committed"),
        }
    }
}

/// The chore that applies hub.toml's `[audit]` to the audit trail's own records: once a
/// second, when a ring holds a record past `retention_s` or more than `max_records`,
/// commits an `ExpireAudit` with this hub's settings. Not before every hub can apply it
/// (until then, apply keeps the fixed retention of older builds).
pub(crate) struct AuditRetention {
    retention_ms: i64,
    max_records: u32,
}

impl AuditRetention {
    pub(crate) fn new(c: &flotilla_common::config::HubConfig) -> Self {
        Self {
            retention_ms: i64::try_from(c.audit.retention_s.saturating_mul(1000))
                .unwrap_or(i64::MAX),
            max_records: c.audit.max_records,
        }
    }
}

impl Chore for AuditRetention {
    fn period(&self) -> Duration {
        TICK
    }

    async fn run(&mut self, hub: &Hub) {
        let through_ms = flotilla_common::now_ms().saturating_sub(self.retention_ms);
        let due = {
            let s = hub.state();
            s.cluster_level >= crate::state::audit::LEVEL_EXPIRE_AUDIT
                && s.audit.expiry_due(through_ms, self.max_records as usize)
        };
        if !due {
            return;
        }
        let cmd = Command::ExpireAudit {
            through_ms,
            max_records: self.max_records,
        };
        if let Err(e) = hub.write(cmd).await {
            tracing::warn!(error = %e, "expiring audit records not committed");
        }
    }
}
