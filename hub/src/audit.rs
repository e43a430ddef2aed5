//! The audit trail, on each hub: what it saw that is not a command of its own (refusals of
//! credentials, tokens issued, hub membership changes) is gathered here, refusals alike
//! coalesced into one record with a count, and committed once a second as one `Audit`
//! entry; admin commands are committed `Audited` with who asked (`write_as`). The records
//! live in the replicated state (`state::audit`), so every hub answers `flotilla audit` the
//! same. A flood is bounded twice: at most `PENDING` distinct records wait here (the rest
//! are counted in one more), and the state keeps refusals in a ring of their own, so they
//! never push an admin's actions out.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use flotilla_common::jwt::Claims;
use tokio::sync::watch;

use crate::{
    cluster::Hub,
    error::HubResult,
    state::{self, audit::AuditRecord, Command},
};

/// Distinct records waiting for the next commit, at most.
const PENDING: usize = 200;

#[derive(Default)]
pub struct AuditBuffer {
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    records: HashMap<(String, String, String, String, String), AuditRecord>,
    /// Refusals that found no room.
    dropped: u64,
}

impl AuditBuffer {
    fn add(&self, rec: AuditRecord) {
        let rec = rec.bounded();
        let key = (
            rec.kind.clone(),
            rec.actor.clone(),
            rec.target.clone(),
            rec.outcome.clone(),
            rec.source.clone(),
        );
        let mut p = self.pending.lock().expect("audit buffer lock");
        let room = p.records.len() < PENDING;
        match p.records.get_mut(&key) {
            Some(r) => r.count += rec.count,
            None if room => {
                p.records.insert(key, rec);
            }
            None => p.dropped += rec.count,
        }
    }

    /// A refusal: who (as far as known), of what, why, from where.
    pub fn denied(&self, hub: u64, actor: &str, tenant: &str, what: &str, why: &str, source: &str) {
        self.add(AuditRecord {
            at_ms: flotilla_common::now_ms(),
            kind: "denied".into(),
            actor: actor.into(),
            tenant: tenant.into(),
            target: what.into(),
            outcome: why.into(),
            hub,
            source: source.into(),
            count: 1,
            ..Default::default()
        });
    }

    /// Something done that is not a replicated command (a token issued, a hub added).
    pub fn event(&self, hub: u64, kind: &str, actor: &str, target: &str) {
        self.add(AuditRecord {
            at_ms: flotilla_common::now_ms(),
            kind: kind.into(),
            actor: actor.into(),
            target: target.into(),
            outcome: "ok".into(),
            hub,
            count: 1,
            ..Default::default()
        });
    }

    /// Records that could not be committed go back, for the next try (as room allows).
    fn put_back(&self, records: Vec<AuditRecord>) {
        for r in records {
            self.add(r);
        }
    }

    fn take(&self, hub: u64) -> Vec<AuditRecord> {
        let mut p = self.pending.lock().expect("audit buffer lock");
        let mut records: Vec<AuditRecord> = p.records.drain().map(|(_, r)| r).collect();
        records.sort_by_key(|r| r.at_ms);
        if p.dropped > 0 {
            records.push(AuditRecord {
                at_ms: flotilla_common::now_ms(),
                kind: "denied".into(),
                actor: "unauthenticated".into(),
                outcome: "more refusals than the audit trail records per second".into(),
                hub,
                count: std::mem::take(&mut p.dropped),
                ..Default::default()
            });
        }
        records
    }
}

/// Commits what this hub gathered, once a second, until the hub stops. What cannot be
/// committed now (no leader) waits for the next second, in the same bounded buffer.
pub(crate) async fn flush(hub: Hub, mut stop: watch::Receiver<bool>) {
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = beat.tick() => {}
            _ = stop.changed() => return,
        }
        let records = hub.audit.take(hub.id());
        if records.is_empty() {
            continue;
        }
        let n = records.len();
        let cmd = Command::Audit {
            records: records.clone(),
            at_ms: flotilla_common::now_ms(),
        };
        if let Err(e) = hub.write(cmd).await {
            // A write whose outcome is unknown may have landed: a record may then show
            // twice, which an audit trail prefers to missing.
            tracing::warn!(records = n, error = %e, "could not commit audit records yet; trying again");
            hub.audit.put_back(records);
        }
    }
}

/// Commits `cmd` as asked by `by`, recorded in the audit trail with what came of it.
pub async fn write_as(hub: &Hub, by: &str, cmd: Command) -> HubResult<state::Response> {
    hub.write(Command::Audited {
        by: by.to_owned(),
        at_ms: flotilla_common::now_ms(),
        cmd: Box::new(cmd),
    })
    .await
}

/// [`write_as`] for an admin's token.
pub async fn write_by(hub: &Hub, claims: &Claims, cmd: Command) -> HubResult<state::Response> {
    write_as(hub, &claims.sub, cmd).await
}
