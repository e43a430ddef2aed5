//! Retention of finished work, on the leader: once a second, when the history store holds
//! records past `retention_s` (or more than `retention_max_tasks`), commits an
//! `ExpireHistory` through Raft, naming the cut (end time and record) below which finished
//! work goes, at most `history::EXPIRE_BATCH` records at a time. Every hub then expires the
//! same records at the same log index.

use std::time::Duration;

use crate::{cluster::Hub, state::Command};

const TICK: Duration = Duration::from_secs(1);

pub async fn run(hub: Hub, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (retention_ms, max) = {
        let c = hub.config();
        (c.retention_s.saturating_mul(1000), c.retention_max_tasks)
    };
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if !hub.is_leader() {
            continue;
        }
        let now_ms = flotilla_common::now_ms();
        let history = hub.state().history.clone();
        let (through_ms, entry) = match history.expiry_due(now_ms, retention_ms, max) {
            Ok(Some(t)) => t,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "reading the history store for retention failed");
                continue;
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
