//! The audit trail in the replicated state: who did what, and who was refused. Two rings,
//! so a flood of refusals never pushes an admin's actions out: `actions` (admin commands,
//! joins, removals, renewals, revocations, tokens issued) and `denials` (authentication and
//! authorization failures, coalesced by each hub before they are committed). Retention is
//! the leader's hub.toml `[audit]`, committed as `Command::ExpireAudit` (so every hub drops
//! the same records at the same index); whatever it says, a ring never holds more than
//! `AUDIT_RING_MAX`. Until every hub runs a build that knows `ExpireAudit` (cluster level
//! 3), apply keeps the fixed retention older builds have: `FIXED_RING` records, none older
//! than `FIXED_RETENTION_MS`. No record holds a secret or a task's arguments: only names,
//! ids and reasons, each cut to `AUDIT_TEXT` bytes.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::{Command, Response, State};

/// Records a ring holds at most, whatever the retention: the bound on memory and snapshots.
pub const AUDIT_RING_MAX: usize =
    flotilla_common::config::defaults::AUDIT_MAX_RECORDS_LIMIT as usize;
/// Records kept in each ring before the cluster reaches level 3.
pub const FIXED_RING: usize = 10_000;
/// Before the cluster reaches level 3, records older than this (30 days) leave.
pub const FIXED_RETENTION_MS: i64 = 30 * 24 * 3600 * 1000;
/// The cluster level from which retention is `ExpireAudit`'s.
pub const LEVEL_EXPIRE_AUDIT: u32 = 3;
/// The longest text of a record's field.
pub const AUDIT_TEXT: usize = 256;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the trail (the log index of the entry that recorded it, then its place
    /// in that entry): the same on every hub, and increasing.
    #[serde(default)]
    pub seq: u64,
    pub at_ms: i64,
    /// What happened: `revoke_join_token`, `remove_node`, `denied`, ...
    pub kind: String,
    /// Who: an agent token's subject, a node's name, or `unauthenticated`.
    pub actor: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tenant: String,
    /// What it was done to (a node, a token id, a subject, a tool).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target: String,
    /// `ok`, or why it was refused.
    pub outcome: String,
    /// The hub that saw it (denials), or 0.
    #[serde(default)]
    pub hub: u64,
    /// Where from (an address), for denials.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    /// How many like it this record stands for (denials are coalesced).
    #[serde(default = "one")]
    pub count: u64,
}

fn one() -> u64 {
    1
}

fn cut(s: &mut String) {
    if s.len() > AUDIT_TEXT {
        let mut end = AUDIT_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

impl AuditRecord {
    /// The record with every text cut to `AUDIT_TEXT`.
    pub fn bounded(mut self) -> Self {
        for s in [
            &mut self.kind,
            &mut self.actor,
            &mut self.tenant,
            &mut self.target,
            &mut self.outcome,
            &mut self.source,
        ] {
            cut(s);
        }
        self
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditLog {
    pub actions: VecDeque<AuditRecord>,
    pub denials: VecDeque<AuditRecord>,
}

impl AuditLog {
    fn push(ring: &mut VecDeque<AuditRecord>, rec: AuditRecord, cap: usize) {
        ring.push_back(rec.bounded());
        while ring.len() > cap {
            ring.pop_front();
        }
    }

    /// Drops the records made before `through_ms`, then all but the newest `keep` of each
    /// ring.
    fn expire(&mut self, through_ms: i64, keep: usize) {
        for ring in [&mut self.actions, &mut self.denials] {
            while ring.front().is_some_and(|r| r.at_ms < through_ms) {
                ring.pop_front();
            }
            while ring.len() > keep {
                ring.pop_front();
            }
        }
    }

    /// Whether `expire(through_ms, keep)` would drop anything: the leader asks before it
    /// commits one.
    pub fn expiry_due(&self, through_ms: i64, keep: usize) -> bool {
        [&self.actions, &self.denials]
            .iter()
            .any(|ring| ring.len() > keep || ring.front().is_some_and(|r| r.at_ms < through_ms))
    }

    /// Both rings' records, oldest first.
    pub fn all(&self) -> Vec<&AuditRecord> {
        let mut v: Vec<&AuditRecord> = self.actions.iter().chain(self.denials.iter()).collect();
        v.sort_by_key(|r| r.seq);
        v
    }
}

/// The name an audited command is recorded under, and what it was done to.
pub fn kind_and_target(cmd: &Command) -> (&'static str, String) {
    match cmd {
        Command::CreateJoinToken(t) => ("create_join_token", t.id.clone()),
        Command::RevokeJoinToken { token_id, .. } => ("revoke_join_token", token_id.clone()),
        Command::RemoveNode { node_id, .. } => ("remove_node", node_id.clone()),
        Command::SetNodeStatus {
            node_id, status, ..
        } => match status {
            super::NodeStatus::Cordoned => ("cordon_node", node_id.clone()),
            _ => ("uncordon_node", node_id.clone()),
        },
        Command::DrainNode { node_id, .. } => ("drain_node", node_id.clone()),
        Command::SetSchedulingPaused(p) => (
            if *p {
                "pause_scheduling"
            } else {
                "resume_scheduling"
            },
            String::new(),
        ),
        Command::CancelTenantTasks { tenant, .. } => ("cancel_tenant_tasks", tenant.clone()),
        Command::AcceptTool { name } => ("accept_tool", name.clone()),
        Command::SetRole { name, scopes } => ("set_role", format!("{name}: {}", scopes.join(" "))),
        Command::DeleteRole { name } => ("delete_role", name.clone()),
        Command::RotateSigningKey { key, .. } => ("rotate_signing_key", key.kid.clone()),
        Command::RevokeAgentTokens { jti, subject, .. } => (
            "revoke_agent_tokens",
            match (jti, subject) {
                (Some(j), Some(s)) => format!("jti {j}, subject {s}"),
                (Some(j), None) => format!("jti {j}"),
                (None, Some(s)) => format!("subject {s}"),
                (None, None) => String::new(),
            },
        ),
        Command::RegisterNode { node_id, .. } => ("join", node_id.clone()),
        Command::RenewNodeCertificate { node_id, .. } => ("renew_certificate", node_id.clone()),
        _ => ("admin_command", String::new()),
    }
}

/// Kinds of the records a tool call makes (`call_records`).
pub const CALL_KINDS: [&str; 3] = ["submit", "assign", "result"];

/// The audit records of a tool call, read from its task record rather than stored twice:
/// its submission (by the agent's subject), each assignment (by the scheduler, to a node),
/// and each attempt's end (by the node that reported it, or the cluster when it ended an
/// attempt itself: node lost, timed out, cancelled). They live as long as the task does
/// (`retention_s`, `retention_max_tasks`) and are the same on every hub. Like every audit
/// record they hold names, ids and outcomes only: never the arguments, the result or an
/// error's text (which may quote either). `seq` is 0: they are not entries of the trail.
pub fn call_records(t: &super::TaskRecord) -> Vec<AuditRecord> {
    let record = |at_ms, kind: &str, actor: String, target: String, outcome: &str| {
        AuditRecord {
            at_ms,
            kind: kind.to_owned(),
            actor,
            tenant: t.tenant.clone(),
            target,
            outcome: outcome.to_owned(),
            count: 1,
            ..Default::default()
        }
        .bounded()
    };
    let mut out = vec![record(
        t.created_at_ms,
        "submit",
        t.agent.clone(),
        format!("task {} tool {}", t.id, t.tool),
        "ok",
    )];
    let last = t.attempts.len();
    for (i, a) in t.attempts.iter().enumerate() {
        out.push(record(
            a.assigned_at_ms,
            "assign",
            "scheduler".to_owned(),
            format!(
                "task {} attempt {} to node {} server {}",
                t.id, a.number, a.node_id, a.server
            ),
            "ok",
        ));
        let Some(at) = a.finished_at_ms else { continue };
        let outcome = if a.requeued {
            "requeued"
        } else if i + 1 == last && t.status.is_terminal() {
            t.status.as_str()
        } else {
            "retried"
        };
        // The node's report ended the task (a success or a failure); otherwise the
        // cluster ended the attempt (retried it, found the node lost, timed it out, ...).
        let by_node = outcome == "succeeded" || outcome == "failed";
        let actor = if by_node {
            format!("node {}", a.node_id)
        } else {
            "cluster".to_owned()
        };
        out.push(record(
            at,
            "result",
            actor,
            format!("task {} attempt {}", t.id, a.number),
            outcome,
        ));
    }
    out
}

/// Records one `Audit` command may add.
pub const MAX_AUDIT_RECORDS_PER_ENTRY: usize = 1024;

impl State {
    /// Before an audit command adds records: below level 3 every hub cuts by the fixed
    /// retention first (older builds do, and states must not differ); from it, only
    /// `ExpireAudit` cuts. Returns the most records a ring may then hold.
    fn prepare_audit_push(&mut self, at_ms: i64) -> usize {
        if self.cluster_level >= LEVEL_EXPIRE_AUDIT {
            AUDIT_RING_MAX
        } else {
            self.audit
                .expire(at_ms.saturating_sub(FIXED_RETENTION_MS), usize::MAX);
            FIXED_RING
        }
    }

    /// `Command::ExpireAudit`.
    pub(super) fn expire_audit(&mut self, through_ms: i64, max_records: u32) -> Response {
        self.audit
            .expire(through_ms, (max_records as usize).clamp(1, AUDIT_RING_MAX));
        Response::Done
    }

    /// The next record's place: its entry's log index, then its order in the entry.
    fn next_audit_seq(&mut self, index: u64) -> u64 {
        if self.audit_seq.0 != index {
            self.audit_seq = (index, 0);
        }
        let n = self.audit_seq.1;
        self.audit_seq.1 = n.saturating_add(1);
        index << 16 | u64::from(n.min(0xffff))
    }

    /// Records that `by` asked for `cmd` at `at_ms`, and what came of it.
    pub(super) fn audit_action(
        &mut self,
        index: u64,
        by: &str,
        cmd: &Command,
        answer: &Response,
        at_ms: i64,
    ) {
        let (kind, target) = kind_and_target(cmd);
        let outcome = match answer {
            Response::Rejected(r) => format!("refused: {r}"),
            _ => "ok".to_owned(),
        };
        let cap = self.prepare_audit_push(at_ms);
        let seq = self.next_audit_seq(index);
        AuditLog::push(
            &mut self.audit.actions,
            AuditRecord {
                seq,
                at_ms,
                kind: kind.to_owned(),
                actor: by.to_owned(),
                target,
                outcome,
                count: 1,
                ..Default::default()
            },
            cap,
        );
    }

    /// Records that a hub saw and coalesced: refusals, and events that are not commands
    /// (tokens issued, hubs added or removed).
    pub(super) fn audit_records(&mut self, index: u64, records: &[AuditRecord], at_ms: i64) {
        let cap = self.prepare_audit_push(at_ms);
        for r in records.iter().take(MAX_AUDIT_RECORDS_PER_ENTRY) {
            let seq = self.next_audit_seq(index);
            let rec = AuditRecord { seq, ..r.clone() };
            let ring = if rec.kind == "denied" {
                &mut self.audit.denials
            } else {
                &mut self.audit.actions
            };
            AuditLog::push(ring, rec, cap);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{NodeStatus, Rejection};

    fn denial(at_ms: i64, actor: &str) -> AuditRecord {
        AuditRecord {
            at_ms,
            kind: "denied".into(),
            actor: actor.into(),
            outcome: "bad_signature".into(),
            count: 3,
            ..Default::default()
        }
    }

    #[test]
    fn a_tool_call_reads_as_its_submission_assignments_and_results_without_its_data() {
        use crate::state::{AttemptRecord, TaskRecord, TaskStatus};
        let attempt = |number, node: &str, assigned, finished| AttemptRecord {
            number,
            node_id: node.into(),
            server: "demo".into(),
            fence: u64::from(number),
            assigned_at_ms: assigned,
            started_at_ms: None,
            finished_at_ms: finished,
            error: Some("secret from the tool".into()),
            requeued: false,
        };
        let t = TaskRecord {
            status: TaskStatus::Succeeded,
            result: Some(serde_json::json!({"content": "private"})),
            attempts: vec![
                attempt(1, "edge-1", 11, Some(12)),
                attempt(2, "edge-2", 13, Some(14)),
            ],
            ..TaskRecord::new(
                "t1",
                "record",
                "acme",
                "ci",
                serde_json::json!({"password": "hunter2"}),
                10,
            )
        };
        let got: Vec<(i64, String, String, String)> = call_records(&t)
            .into_iter()
            .map(|r| {
                assert_eq!(r.tenant, "acme");
                let all = format!("{r:?}");
                for secret in ["hunter2", "private", "secret from the tool"] {
                    assert!(!all.contains(secret), "{all}");
                }
                (r.at_ms, r.kind, r.actor, r.outcome)
            })
            .collect();
        let want = [
            (10, "submit", "ci", "ok"),
            (11, "assign", "scheduler", "ok"),
            (12, "result", "cluster", "retried"),
            (13, "assign", "scheduler", "ok"),
            (14, "result", "node edge-2", "succeeded"),
        ];
        let want: Vec<(i64, String, String, String)> = want
            .iter()
            .map(|(at, k, a, o)| (*at, k.to_string(), a.to_string(), o.to_string()))
            .collect();
        assert_eq!(got, want);
        // A task still running has no result yet.
        let running = TaskRecord {
            status: TaskStatus::Running,
            attempts: vec![attempt(1, "edge-1", 11, None)],
            ..t
        };
        assert_eq!(call_records(&running).len(), 2);
    }

    #[test]
    fn actions_and_refusals_are_recorded_in_their_own_bounded_rings() {
        // A cluster some of whose hubs predate `ExpireAudit`: the fixed retention.
        let mut s = State::default();
        let cordon = Command::Audited {
            by: "ops".into(),
            at_ms: 5,
            cmd: Box::new(Command::SetNodeStatus {
                node_id: "n1".into(),
                status: NodeStatus::Cordoned,
                at_ms: 5,
            }),
        };
        // The node does not exist: the command is refused, and the trail says so.
        assert!(matches!(
            s.apply(7, &cordon),
            Response::Rejected(Rejection::NoSuchNode(_))
        ));
        s.apply(
            8,
            &Command::Audit {
                records: vec![denial(6, "unauthenticated"), denial(6, "mallory")],
                at_ms: 6,
            },
        );
        let all = s.audit.all();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].kind, "cordon_node");
        assert_eq!(all[0].actor, "ops");
        assert_eq!(all[0].target, "n1");
        assert!(all[0].outcome.starts_with("refused"), "{:?}", all[0]);
        assert_eq!(all[1].seq, 8 << 16);
        assert_eq!(all[2].seq, (8 << 16) + 1);
        assert_eq!(all[2].count, 3);
        // A flood of refusals fills only its own ring.
        let flood: Vec<AuditRecord> = (0..MAX_AUDIT_RECORDS_PER_ENTRY + 10)
            .map(|i| denial(7, &format!("a{i}")))
            .collect();
        for i in 0..12 {
            s.apply(
                100 + i,
                &Command::Audit {
                    records: flood.clone(),
                    at_ms: 7,
                },
            );
        }
        assert_eq!(s.audit.denials.len(), FIXED_RING);
        assert_eq!(s.audit.actions.len(), 1, "the admin's action stays");
        // Records past the retention leave at the next audit command.
        s.apply(
            200,
            &Command::Audit {
                records: vec![],
                at_ms: 8 + FIXED_RETENTION_MS,
            },
        );
        assert!(s.audit.all().is_empty());
        // Texts are bounded.
        let long = AuditRecord {
            actor: "é".repeat(AUDIT_TEXT),
            ..denial(9, "")
        }
        .bounded();
        assert!(long.actor.len() <= AUDIT_TEXT);
    }

    #[test]
    fn once_every_hub_can_apply_it_retention_is_what_the_leader_commits() {
        let mut a = State::default();
        a.apply(1, &Command::SetClusterLevel { level: 3 });
        let flood: Vec<AuditRecord> = (0..MAX_AUDIT_RECORDS_PER_ENTRY)
            .map(|i| denial(i as i64, &format!("a{i}")))
            .collect();
        let mut index = 10;
        let mut apply = |s: &mut State, cmd: &Command| {
            index += 1;
            s.apply(index, cmd)
        };
        for _ in 0..12 {
            apply(
                &mut a,
                &Command::Audit {
                    records: flood.clone(),
                    at_ms: 2_000,
                },
            );
        }
        // Past the fixed 10,000, and no age cut at apply: a year later, nothing left yet.
        assert_eq!(a.audit.denials.len(), 12 * MAX_AUDIT_RECORDS_PER_ENTRY);
        apply(
            &mut a,
            &Command::Audited {
                by: "ops".into(),
                at_ms: 1_500,
                cmd: Box::new(Command::SetSchedulingPaused(true)),
            },
        );
        apply(
            &mut a,
            &Command::Audit {
                records: vec![],
                at_ms: 2_000 + 365 * FIXED_RETENTION_MS,
            },
        );
        assert_eq!(a.audit.denials.len(), 12 * MAX_AUDIT_RECORDS_PER_ENTRY);
        assert!(!a.audit.expiry_due(0, 100_000));
        // The leader's cut: records before 1,000 go, then each ring keeps its newest 5.
        assert!(a.audit.expiry_due(1_000, 100_000));
        let mut b = a.clone();
        let cut = Command::ExpireAudit {
            through_ms: 1_000,
            max_records: 5,
        };
        assert_eq!(apply(&mut a, &cut), Response::Done);
        assert_eq!(apply(&mut b, &cut), Response::Done);
        assert_eq!(a.audit, b.audit, "every hub drops the same records");
        assert_eq!(a.audit.denials.len(), 5);
        assert!(a.audit.denials.iter().all(|r| r.at_ms >= 1_000));
        assert_eq!(
            a.audit.denials.back().map(|r| r.actor.as_str()),
            Some("a1023"),
            "the newest stay"
        );
        assert_eq!(a.audit.actions.len(), 1, "the action is newer than the cut");
        assert!(!a.audit.expiry_due(1_000, 5));
        // An age cut alone.
        apply(
            &mut a,
            &Command::ExpireAudit {
                through_ms: 1_600,
                max_records: 5,
            },
        );
        assert!(a.audit.actions.is_empty());
        // Nothing an entry says keeps a ring above the bound.
        for _ in 0..(AUDIT_RING_MAX / MAX_AUDIT_RECORDS_PER_ENTRY + 2) {
            apply(
                &mut a,
                &Command::Audit {
                    records: flood.clone(),
                    at_ms: 3_000,
                },
            );
        }
        assert_eq!(a.audit.denials.len(), AUDIT_RING_MAX);
    }
}
