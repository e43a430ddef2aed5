//! Credentials in the replicated state, and their ends: join tokens (made, revoked, gone once
//! they can no longer be used), the keys that sign agent tokens (added, rotated with an
//! overlap, retired), revoked agent tokens and subjects, and nodes removed for good (their
//! certificates stop working because the node's record, which lists the certificates it
//! may present, is gone).
//!
//! Everything here is bounded: a revocation is kept only while a token it covers could still
//! be valid (`keep_until_ms`, which the hub sets from the longest lifetime it accepts), a
//! join token only until it expires, a retired key only until its tokens have expired; each
//! kind also has a cap, past which a new one is refused with a clear reason. What expired
//! goes when the next credential command is applied (at that command's time, so every hub
//! drops the same entries).

use std::collections::BTreeMap;

use flotilla_common::jwt::{self, Claims, SigningKey};
use serde::{Deserialize, Serialize};

use super::{JoinTokenRecord, Rejection, Response, State, TaskStatus};

/// Join tokens that can still be used, at most.
pub const MAX_JOIN_TOKENS: usize = 10_000;
/// Signing keys held at once (the active one and those still verifying older tokens).
pub const MAX_SIGNING_KEYS: usize = 16;
/// Certificates a node may hold at once (the one it connected with and renewals since).
pub const MAX_NODE_CERTIFICATES: usize = 4;
/// Revoked token ids, and revoked subjects, held at once (each kind).
pub const MAX_REVOCATIONS: usize = 100_000;

/// How far apart the hubs' clocks may be, as token checks allow (`nbf`, `exp`).
pub(super) const CLOCK_LEEWAY_MS: i64 = 5_000;

/// Agent tokens refused before their expiry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Revocations {
    /// A token's `jti` → until when the revocation is kept.
    pub tokens: BTreeMap<String, Revoked>,
    /// A subject → its tokens issued at or before `at_ms` are refused.
    pub subjects: BTreeMap<String, Revoked>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    pub at_ms: i64,
    /// No token it covers is valid after this: the entry goes then.
    pub keep_until_ms: i64,
}

impl Revocations {
    /// Why `claims` is refused, if it is revoked.
    pub fn refuses(&self, claims: &Claims) -> Option<String> {
        if self.tokens.contains_key(&claims.jti) {
            return Some(format!("token {} was revoked", claims.jti));
        }
        let r = self.subjects.get(&claims.sub)?;
        // Issue and revocation times come from the clocks of different hubs: tokens issued
        // up to `CLOCK_LEEWAY_MS` after the revocation are covered too.
        (claims.iat.saturating_mul(1000) <= r.at_ms + CLOCK_LEEWAY_MS).then(|| {
            format!(
                "every token of {:?} issued before {} was revoked; ask for a new one",
                claims.sub, r.at_ms
            )
        })
    }
}

impl State {
    pub(super) fn create_join_token(
        &mut self,
        rec: &JoinTokenRecord,
    ) -> Result<Response, Rejection> {
        self.prune_credentials(rec.created_at_ms);
        if self.join_tokens.len() >= MAX_JOIN_TOKENS {
            return Err(Rejection::TooMany(format!(
                "{MAX_JOIN_TOKENS} join tokens are held until they expire (revoked ones too); make fewer, shorter-lived ones"
            )));
        }
        self.join_tokens.insert(rec.id.clone(), rec.clone());
        Ok(Response::Done)
    }

    /// No node may join with the token any more; it stays listed (as revoked) until it
    /// would have expired.
    pub(super) fn revoke_join_token(
        &mut self,
        id: &str,
        at_ms: i64,
    ) -> Result<Response, Rejection> {
        self.prune_credentials(at_ms);
        let t = self
            .join_tokens
            .get_mut(id)
            .ok_or_else(|| Rejection::NoSuchJoinToken(id.to_owned()))?;
        t.uses_left = 0;
        t.revoked_at_ms.get_or_insert(at_ms);
        Ok(Response::Done)
    }

    /// A signing key for agent tokens (one with the same key id is not added again).
    pub(super) fn add_signing_key(&mut self, key: &SigningKey) -> Response {
        if !self.signing_keys.iter().any(|k| k.kid == key.kid) {
            self.signing_keys.push(key.clone());
        }
        Response::Done
    }

    /// `key` signs from now on; the keys before it verify what they signed until
    /// `retire_old_at_ms` (no token of theirs is valid after it), then go.
    pub(super) fn rotate_signing_key(
        &mut self,
        key: &SigningKey,
        retire_old_at_ms: i64,
    ) -> Result<Response, Rejection> {
        if self.signing_keys.iter().any(|k| k.kid == key.kid) {
            return Ok(Response::Done);
        }
        // Keys retired at once (a leak) go before the cap is counted: an emergency rotation
        // is never refused for room.
        let retire = |keys: &mut Vec<SigningKey>| {
            for k in keys {
                let until = k
                    .retire_at_ms
                    .map_or(retire_old_at_ms, |t| t.min(retire_old_at_ms));
                k.retire_at_ms = Some(until);
            }
        };
        let mut keys = self.signing_keys.clone();
        retire(&mut keys);
        keys.retain(|k| k.live_at(key.created_at_ms));
        if keys.len() >= MAX_SIGNING_KEYS {
            return Err(Rejection::TooMany(format!(
                "{MAX_SIGNING_KEYS} signing keys are held; rotate again once older ones retire, or with --retire-now"
            )));
        }
        self.prune_credentials(key.created_at_ms);
        retire(&mut self.signing_keys);
        self.signing_keys.push(key.clone());
        Ok(Response::Done)
    }

    /// The key new tokens are signed with: the one no rotation has retired (the last
    /// added; never chosen by its clock time, which another hub's clock set).
    pub fn active_signing_key(&self) -> Option<&SigningKey> {
        self.signing_keys
            .iter()
            .rev()
            .find(|k| k.retire_at_ms.is_none())
            .or_else(|| self.signing_keys.last())
    }

    /// The keys that verify tokens at `now_ms`.
    pub fn verifying_keys(&self, now_ms: i64) -> Vec<SigningKey> {
        self.signing_keys
            .iter()
            .filter(|k| k.live_at(now_ms))
            .cloned()
            .collect()
    }

    /// Refuses one agent token (by `jti`), or every token of a subject issued so far.
    pub(super) fn revoke_agent_tokens(
        &mut self,
        jti: Option<&str>,
        subject: Option<&str>,
        keep_until_ms: i64,
        at_ms: i64,
    ) -> Result<Response, Rejection> {
        self.prune_credentials(at_ms);
        let entry = Revoked {
            at_ms,
            keep_until_ms,
        };
        let r = &mut self.revoked;
        // Both checked before either is written: a refused command changes nothing.
        for (map, key) in [(&r.tokens, jti), (&r.subjects, subject)] {
            if key.is_some_and(|k| map.len() >= MAX_REVOCATIONS && !map.contains_key(k)) {
                return Err(Rejection::TooMany(format!(
                    "{MAX_REVOCATIONS} revocations of this kind are held; rotate the signing key instead"
                )));
            }
        }
        for (map, key) in [(&mut r.tokens, jti), (&mut r.subjects, subject)] {
            let Some(key) = key else { continue };
            // A later revocation of a subject covers more; a token's stays as it was.
            let e = map.entry(key.to_owned()).or_insert_with(|| entry.clone());
            e.at_ms = e.at_ms.max(entry.at_ms);
            e.keep_until_ms = e.keep_until_ms.max(entry.keep_until_ms);
        }
        Ok(Response::Done)
    }

    /// A node removed for good: its unfinished tasks go as when a node is lost, and its
    /// record (with the certificates it may present) goes, so no certificate it holds opens
    /// a session again. It may come back only by joining anew, with a new certificate.
    pub(super) fn remove_node(&mut self, node_id: &str, at_ms: i64) -> Result<Response, Rejection> {
        self.prune_credentials(at_ms);
        if !self.nodes.contains_key(node_id) {
            return Err(Rejection::NoSuchNode(node_id.to_owned()));
        }
        let (requeued, lost) = self.release_tasks(node_id, at_ms, false, TaskStatus::Lost, || {
            format!(
                "node {node_id} was removed before the task finished; the tool is not marked idempotent and the retry policy does not cover node loss, so it was not re-run"
            )
        });
        if let Some(node) = self.nodes.remove(node_id) {
            self.index.unlink_node(&node);
        }
        for per_node in self.tool_stats.values_mut() {
            per_node.remove(node_id);
        }
        self.tool_stats.retain(|_, per_node| !per_node.is_empty());
        let prefix = super::breaker_key(node_id, "");
        self.breakers.retain(|k, _| !k.starts_with(&prefix));
        self.effects.removed_nodes.push(node_id.to_owned());
        Ok(Response::NodeWentDown { requeued, lost })
    }

    /// The node renewed its certificate with the one it `presented`: that one, those issued
    /// after it (a connection keeps presenting the certificate it was opened with, so the
    /// node may hold a newer one than it shows) and the new `serial` open its session from
    /// now on, at most `MAX_NODE_CERTIFICATES`; any older one is refused.
    pub(super) fn renew_node_certificate(
        &mut self,
        node_id: &str,
        presented: &str,
        serial: &str,
    ) -> Result<Response, Rejection> {
        let node = self.node_mut(node_id)?;
        if !node.holds_certificate(presented) {
            return Err(Rejection::Stale);
        }
        let from = node
            .cert_serials
            .iter()
            .position(|s| s == presented)
            .unwrap_or(node.cert_serials.len());
        let mut kept: Vec<String> = node.cert_serials.split_off(from);
        if kept.is_empty() {
            kept.push(presented.to_owned());
        }
        kept.push(serial.to_owned());
        // Over the cap, the presented one stays and the oldest after it go.
        while kept.len() > MAX_NODE_CERTIFICATES {
            kept.remove(1);
        }
        node.cert_serials = kept;
        Ok(Response::Done)
    }

    /// Drops what can no longer matter at `now_ms`: join tokens past their expiry, retired
    /// signing keys (never the active one), revocations past their keep.
    fn prune_credentials(&mut self, now_ms: i64) {
        self.join_tokens.retain(|_, t| t.expires_at_ms > now_ms);
        let active = self.active_signing_key().map(|k| k.kid.clone());
        self.signing_keys
            .retain(|k| k.live_at(now_ms) || Some(&k.kid) == active.as_ref());
        self.revoked.tokens.retain(|_, r| r.keep_until_ms > now_ms);
        self.revoked
            .subjects
            .retain(|_, r| r.keep_until_ms > now_ms);
    }
}

/// Most roles an admin may define, and scopes in one.
pub const MAX_ROLES: usize = 256;
pub const MAX_ROLE_SCOPES: usize = 64;

impl State {
    /// The scopes `role` grants now: a built-in role's, a defined one's, or none.
    pub fn role_scopes(&self, role: &str) -> Vec<String> {
        match jwt::BUILTIN_ROLES.iter().find(|(name, _)| *name == role) {
            Some((_, scopes)) => scopes.iter().map(|s| s.to_string()).collect(),
            None => self.roles.get(role).cloned().unwrap_or_default(),
        }
    }

    /// Whether `role` exists (built in or defined).
    pub fn role_exists(&self, role: &str) -> bool {
        jwt::BUILTIN_ROLES.iter().any(|(name, _)| *name == role) || self.roles.contains_key(role)
    }

    pub(super) fn set_role(
        &mut self,
        name: &str,
        scopes: &[String],
    ) -> Result<Response, Rejection> {
        if jwt::BUILTIN_ROLES.iter().any(|(n, _)| *n == name) {
            return Err(Rejection::BuiltinRole(name.to_owned()));
        }
        if !self.roles.contains_key(name) && self.roles.len() >= MAX_ROLES {
            return Err(Rejection::TooMany(format!("roles (at most {MAX_ROLES})")));
        }
        if scopes.len() > MAX_ROLE_SCOPES {
            return Err(Rejection::TooMany(format!(
                "scopes in a role (at most {MAX_ROLE_SCOPES})"
            )));
        }
        self.roles.insert(name.to_owned(), scopes.to_vec());
        Ok(Response::Done)
    }

    pub(super) fn delete_role(&mut self, name: &str) -> Result<Response, Rejection> {
        if jwt::BUILTIN_ROLES.iter().any(|(n, _)| *n == name) {
            return Err(Rejection::BuiltinRole(name.to_owned()));
        }
        self.roles
            .remove(name)
            .map(|_| Response::Done)
            .ok_or_else(|| Rejection::NoSuchRole(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, NodeRecord, NodeStatus, TaskRecord};

    fn token(id: &str, expires_at_ms: i64) -> Command {
        token_at(id, expires_at_ms, 0)
    }

    fn token_at(id: &str, expires_at_ms: i64, created_at_ms: i64) -> Command {
        Command::CreateJoinToken(JoinTokenRecord {
            id: id.into(),
            secret_hash: "h".into(),
            expires_at_ms,
            uses_left: 2,
            description: String::new(),
            created_at_ms,
            may_add_tools: false,
            created_by: "admin".into(),
            revoked_at_ms: None,
        })
    }

    fn register(node: &str, serial: &str, at_ms: i64) -> Command {
        Command::RegisterNode {
            node_id: node.into(),
            token_id: "tok".into(),
            secret_hash: "h".into(),
            labels: Default::default(),
            at_ms,
            cert_serial: serial.into(),
            key_pin: String::new(),
        }
    }

    fn claims(sub: &str, jti: &str, iat_s: i64) -> Claims {
        Claims {
            sub: sub.into(),
            jti: jti.into(),
            iat: iat_s,
            exp: iat_s + 60,
            ..Default::default()
        }
    }

    #[test]
    fn a_revoked_join_token_admits_no_node_and_expired_tokens_go() {
        let mut s = State::default();
        s.apply(1, &token("tok", 100_000));
        s.apply(2, &token("old", 50));
        assert_eq!(s.apply(3, &register("a", "s1", 10)), Response::Done);
        let revoke = Command::RevokeJoinToken {
            token_id: "tok".into(),
            at_ms: 20,
        };
        assert_eq!(s.apply(4, &revoke), Response::Done);
        assert_eq!(s.join_tokens["tok"].revoked_at_ms, Some(20));
        assert!(matches!(
            s.apply(5, &register("b", "s2", 30)),
            Response::Rejected(Rejection::BadJoinToken)
        ));
        // The next credential command, at 60, drops the token that expired at 50.
        s.apply(6, &token_at("new", 100_000, 60));
        assert!(!s.join_tokens.contains_key("old"));
        assert!(
            s.join_tokens.contains_key("tok"),
            "revoked, listed until it expires"
        );
        assert!(matches!(
            s.apply(
                7,
                &Command::RevokeJoinToken {
                    token_id: "nope".into(),
                    at_ms: 70
                }
            ),
            Response::Rejected(Rejection::NoSuchJoinToken(_))
        ));
    }

    #[test]
    fn join_tokens_are_capped() {
        let mut s = State::default();
        for i in 0..MAX_JOIN_TOKENS {
            s.apply(1, &token(&format!("t{i}"), 1_000));
        }
        assert!(matches!(
            s.apply(2, &token("one-more", 1_000)),
            Response::Rejected(Rejection::TooMany(_))
        ));
    }

    #[test]
    fn a_removed_node_loses_its_tasks_and_records_and_only_a_new_certificate_comes_back() {
        let mut s = State::default();
        s.apply(1, &token("tok", 100_000));
        s.apply(2, &register("n1", "aa", 10));
        assert!(s.nodes["n1"].holds_certificate("aa"));
        assert!(!s.nodes["n1"].holds_certificate("bb"));
        s.apply(
            3,
            &Command::SubmitTask(Box::new(TaskRecord::new(
                "t1",
                "echo",
                "t",
                "a",
                serde_json::json!({}),
                11,
            ))),
        );
        s.apply(
            4,
            &Command::AssignTask {
                task_id: "t1".into(),
                node_id: "n1".into(),
                server: "demo".into(),
                at_ms: 12,
            },
        );
        s.take_effects();
        let remove = Command::RemoveNode {
            node_id: "n1".into(),
            at_ms: 20,
        };
        // `echo` is not in the catalogue, so not known safe to re-run: it ends lost.
        assert_eq!(
            s.apply(5, &remove),
            Response::NodeWentDown {
                requeued: vec![],
                lost: vec!["t1".into()]
            }
        );
        assert!(!s.nodes.contains_key("n1"));
        assert!(!s.index.on_node.contains_key("n1"));
        let fx = s.take_effects();
        assert_eq!(fx.removed_nodes, vec!["n1".to_string()]);
        assert_eq!(fx.stopped.len(), 1, "the node is told to stop it");
        assert!(matches!(
            s.apply(6, &remove),
            Response::Rejected(Rejection::NoSuchNode(_))
        ));
        // Joining again under the same name: only the new certificate opens a session.
        assert_eq!(s.apply(7, &register("n1", "cc", 30)), Response::Done);
        assert!(s.nodes["n1"].holds_certificate("cc"));
        assert!(!s.nodes["n1"].holds_certificate("aa"));
        assert_eq!(s.nodes["n1"].status, NodeStatus::Ready);
        // A record from before serials were kept accepts the name's certificates.
        assert!(NodeRecord::new("old", Default::default(), 0).holds_certificate("any"));
    }

    #[test]
    fn a_renewal_keeps_the_presented_certificate_and_newer_ones_and_drops_older_ones() {
        let mut s = State::default();
        s.apply(1, &token("tok", 100_000));
        s.apply(2, &register("n1", "a", 10));
        let renew = |presented: &str, serial: &str| Command::RenewNodeCertificate {
            node_id: "n1".into(),
            presented: presented.into(),
            serial: serial.into(),
            at_ms: 20,
        };
        assert_eq!(s.apply(3, &renew("a", "b")), Response::Done);
        assert_eq!(s.nodes["n1"].cert_serials, vec!["a", "b"]);
        // Renewed again over the connection still showing `a`: `b` stays (the node may
        // hold it if this answer is lost).
        s.apply(4, &renew("a", "c"));
        assert_eq!(s.nodes["n1"].cert_serials, vec!["a", "b", "c"]);
        // Connected with `c` now: `a` and `b` go.
        s.apply(5, &renew("c", "d"));
        assert_eq!(s.nodes["n1"].cert_serials, vec!["c", "d"]);
        assert!(!s.nodes["n1"].holds_certificate("a"));
        // A certificate no longer held cannot renew.
        assert_eq!(
            s.apply(6, &renew("a", "e")),
            Response::Rejected(Rejection::Stale)
        );
        for (i, serial) in ["e", "f", "g", "h"].into_iter().enumerate() {
            s.apply(7 + i as u64, &renew("c", serial));
        }
        assert_eq!(s.nodes["n1"].cert_serials, vec!["c", "f", "g", "h"]);
    }

    #[test]
    fn rotated_keys_verify_until_they_retire_and_then_go_but_the_active_key_stays() {
        let mut s = State::default();
        let k1 = SigningKey::generate(0).unwrap();
        s.apply(1, &Command::AddSigningKey(k1.clone()));
        let k2 = SigningKey::generate(100).unwrap();
        let rotate = |key: &SigningKey, retire| Command::RotateSigningKey {
            key: key.clone(),
            retire_old_at_ms: retire,
        };
        assert_eq!(s.apply(2, &rotate(&k2, 1_000)), Response::Done);
        assert_eq!(s.active_signing_key().unwrap().kid, k2.kid);
        let kids = |keys: Vec<SigningKey>| keys.into_iter().map(|k| k.kid).collect::<Vec<_>>();
        assert_eq!(
            kids(s.verifying_keys(999)),
            vec![k1.kid.clone(), k2.kid.clone()]
        );
        assert_eq!(kids(s.verifying_keys(1_000)), vec![k2.kid.clone()]);
        // A second rotation never lets an older key live longer than it was to.
        let k3 = SigningKey::generate(200).unwrap();
        s.apply(3, &rotate(&k3, 5_000));
        assert_eq!(s.signing_keys[0].retire_at_ms, Some(1_000));
        assert_eq!(s.signing_keys[1].retire_at_ms, Some(5_000));
        // At 6,000 (the next rotation's time) the two oldest keys are past: gone. This
        // rotation retires the one before it at once (a key that leaked): it is held until
        // the next credential command but verifies nothing.
        let k4 = SigningKey::generate(6_000).unwrap();
        s.apply(4, &rotate(&k4, 6_000));
        assert_eq!(
            kids(s.signing_keys.clone()),
            vec![k3.kid.clone(), k4.kid.clone()]
        );
        assert_eq!(kids(s.verifying_keys(6_000)), vec![k4.kid.clone()]);
        // Capped.
        for i in 0..MAX_SIGNING_KEYS {
            let k = SigningKey::generate(7_000 + i as i64).unwrap();
            s.apply(5, &rotate(&k, 1_000_000));
        }
        assert_eq!(s.signing_keys.len(), MAX_SIGNING_KEYS);
        let extra = SigningKey::generate(9_000).unwrap();
        assert!(matches!(
            s.apply(6, &rotate(&extra, 1_000_000)),
            Response::Rejected(Rejection::TooMany(_))
        ));
        // An emergency rotation (the old keys retire at once) is never refused for room.
        assert_eq!(s.apply(7, &rotate(&extra, 9_000)), Response::Done);
        assert_eq!(kids(s.verifying_keys(9_000)), vec![extra.kid.clone()]);
        assert_eq!(s.active_signing_key().unwrap().kid, extra.kid);
    }

    #[test]
    fn revocations_refuse_what_they_cover_until_kept_no_longer() {
        let mut s = State::default();
        let revoke =
            |jti: Option<&str>, sub: Option<&str>, at_ms, keep| Command::RevokeAgentTokens {
                jti: jti.map(Into::into),
                subject: sub.map(Into::into),
                keep_until_ms: keep,
                at_ms,
            };
        s.apply(1, &revoke(Some("j1"), None, 10_000, 50_000));
        assert!(s.revoked.refuses(&claims("alice", "j1", 5)).is_some());
        assert!(s.revoked.refuses(&claims("alice", "j2", 5)).is_none());
        s.apply(2, &revoke(None, Some("bob"), 20_000, 60_000));
        // Bob's tokens issued at or before 20 s (and 5 s of clock leeway) are refused; one
        // issued after is not.
        assert!(s.revoked.refuses(&claims("bob", "x", 20)).is_some());
        assert!(
            s.revoked.refuses(&claims("bob", "x", 25)).is_some(),
            "clock leeway"
        );
        assert!(s.revoked.refuses(&claims("bob", "x", 26)).is_none());
        // A later revocation of bob covers the tokens issued since.
        s.apply(3, &revoke(None, Some("bob"), 30_000, 70_000));
        assert!(s.revoked.refuses(&claims("bob", "x", 33)).is_some());
        // Entries go once nothing they cover can be valid.
        s.apply(4, &revoke(Some("j9"), None, 55_000, 90_000));
        assert!(!s.revoked.tokens.contains_key("j1"));
        assert!(s.revoked.subjects.contains_key("bob"));
        s.apply(5, &revoke(Some("j10"), None, 75_000, 90_000));
        assert!(!s.revoked.subjects.contains_key("bob"));
    }

    #[test]
    fn two_state_machines_applying_the_same_credential_commands_agree() {
        let k1 = SigningKey::generate(0).unwrap();
        let k2 = SigningKey::generate(10).unwrap();
        let cmds = [
            Command::AddSigningKey(k1),
            token("tok", 1_000),
            register("n1", "aa", 5),
            Command::RotateSigningKey {
                key: k2,
                retire_old_at_ms: 500,
            },
            Command::RevokeAgentTokens {
                jti: Some("j".into()),
                subject: Some("s".into()),
                keep_until_ms: 800,
                at_ms: 20,
            },
            Command::RemoveNode {
                node_id: "n1".into(),
                at_ms: 30,
            },
            token("later", 5_000),
        ];
        let run = || {
            let mut s = State::default();
            let answers: Vec<Response> = cmds
                .iter()
                .enumerate()
                .map(|(i, c)| s.apply(i as u64 + 1, c))
                .collect();
            (s, answers)
        };
        let (a, ra) = run();
        let (b, rb) = run();
        assert_eq!(ra, rb);
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&b).unwrap()
        );
    }
}

#[cfg(test)]
mod role_tests {
    use super::super::Command;
    use super::*;

    #[test]
    fn roles_grant_scopes_built_in_ones_stay_and_the_count_is_bounded() {
        let mut s = State::default();
        assert_eq!(s.role_scopes("viewer"), vec![jwt::ADMIN_READ]);
        assert!(s.role_scopes("nobody").is_empty());
        let set = |name: &str, scopes: &[&str]| Command::SetRole {
            name: name.into(),
            scopes: scopes.iter().map(|x| x.to_string()).collect(),
        };
        assert_eq!(
            s.apply(1, &set("billing", &["tools:billing"])),
            Response::Done
        );
        assert_eq!(s.role_scopes("billing"), vec!["tools:billing"]);
        assert!(s.role_exists("billing") && s.role_exists("operator"));
        assert_eq!(
            s.apply(2, &set("viewer", &["*"])),
            Response::Rejected(Rejection::BuiltinRole("viewer".into()))
        );
        assert_eq!(
            s.apply(
                3,
                &Command::DeleteRole {
                    name: "admin".into()
                }
            ),
            Response::Rejected(Rejection::BuiltinRole("admin".into()))
        );
        assert_eq!(
            s.apply(
                4,
                &Command::DeleteRole {
                    name: "billing".into()
                }
            ),
            Response::Done
        );
        assert!(s.role_scopes("billing").is_empty());
        for i in 0..MAX_ROLES {
            assert_eq!(
                s.apply(5 + i as u64, &set(&format!("r{i}"), &["x"])),
                Response::Done
            );
        }
        assert!(matches!(
            s.apply(9999, &set("one-more", &["x"])),
            Response::Rejected(Rejection::TooMany(_))
        ));
        // Changing one that exists is still allowed at the cap.
        assert_eq!(s.apply(10_000, &set("r0", &["y"])), Response::Done);
    }
}
