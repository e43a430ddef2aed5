//! Retention of finished work, on the leader: once a second, when the history store holds
//! records past `retention_s` (or more than `retention_max_tasks`), commits an
//! `ExpireHistory` through Raft, naming the cut (end time and record) below which finished
//! work goes, at most `history::EXPIRE_BATCH` records at a time. Every hub then expires the
//! same records at the same log index.

use std::time::Duration;

use crate::{chores::Chore, cluster::Hub, state::Command};

const TICK: Duration = Duration::from_secs(1);

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
