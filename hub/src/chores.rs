//! The leader's chores and the one loop that drives them all. A chore runs on its beat (and,
//! if it asks, whenever the scheduler is woken) while this hub leads; when the hub does not
//! lead, it is told so instead, to forget what only a leader keeps. The chores:
//! `scheduler::Scheduling` (placement passes), `liveness::Liveness` (nodes down, drains
//! overdue), `timers::Deadlines` (task timeouts), `retention::Retention` (finished work
//! expired) and `Housekeeping` below (a signing key). Every hub, leader or not, keeps a
//! bootstrap admin token in its data dir (`keep_admin_token`).

use std::{future::Future, time::Duration};

use flotilla_common::jwt::{Claims, SigningKey};
use tokio::sync::watch;

use crate::{cluster::Hub, state::Command};

/// Something only the leader does, again and again.
pub(crate) trait Chore: Send + 'static {
    /// Time between beats: the resolution of whatever the chore watches for.
    fn period(&self) -> Duration;

    /// Also run as soon as the scheduler is woken (something changed), not only on the beat.
    fn on_wake(&self) -> bool {
        false
    }

    /// One beat while this hub leads.
    fn run(&mut self, hub: &Hub) -> impl Future<Output = ()> + Send;

    /// One beat while this hub does not lead.
    fn idle(&mut self, _hub: &Hub) {}

    /// Done for good: the driver stops.
    fn finished(&self) -> bool {
        false
    }
}

/// Runs `chore` until the hub stops (or the chore is finished).
pub(crate) async fn drive(hub: Hub, mut chore: impl Chore, mut stop: watch::Receiver<bool>) {
    let mut beat = tokio::time::interval(chore.period());
    // A beat that ran long delays the next rather than bunching the missed ones up.
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let wakes = chore.on_wake();
    loop {
        tokio::select! {
            _ = beat.tick() => {}
            _ = hub.wake_signal().notified(), if wakes => {}
            _ = stop.changed() => return,
        }
        if hub.is_leader() {
            chore.run(&hub).await;
        } else {
            chore.idle(&hub);
        }
        if chore.finished() {
            return;
        }
    }
}

/// Raises the cluster's command level (`state::COMMAND_LEVEL`) to the lowest any member
/// (voter or learner) reports, once that is above it: commands of a new build are written
/// only when every hub can apply them, so a rolling upgrade never puts an entry an older
/// hub cannot read into the log. A member that cannot be asked now holds the level where
/// it is until the next beat. Done once the level is this hub's own.
#[derive(Default)]
pub(crate) struct ClusterLevel {
    done: bool,
    /// The lowest level last seen, to say so once when it holds the cluster back.
    seen: Option<u32>,
}

impl Chore for ClusterLevel {
    fn period(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn finished(&self) -> bool {
        self.done
    }

    async fn run(&mut self, hub: &Hub) {
        let current = hub.state().cluster_level;
        let mine = crate::raft::peer::HubVersion::this().command_level;
        if current >= mine {
            self.done = true;
            return;
        }
        let view = hub.local_view();
        let members =
            |v: &crate::raft::peer::ClusterView| v.members.iter().map(|m| m.id).collect::<Vec<_>>();
        let mut lowest = (mine, view.this_hub);
        for m in view.members.iter().filter(|m| m.id != view.this_hub) {
            match hub.hub_version(&m.raft).await {
                Some(v) if v.command_level < lowest.0 => lowest = (v.command_level, m.id),
                Some(_) => {}
                None => {
                    // It may come back on an older build: the level stays until it answers
                    // (or is removed with `cluster remove-hub`).
                    if self.seen != Some(0) {
                        tracing::warn!(hub = m.id, "cannot ask a hub its build; the command level stays where it is until it answers or is removed");
                        self.seen = Some(0);
                    }
                    return;
                }
            }
        }
        // A hub added while the others were asked was not asked: next beat.
        if members(&hub.local_view()) != members(&view) {
            return;
        }
        let (level, held_by) = lowest;
        if level < mine && self.seen != Some(level) {
            tracing::warn!(hub = held_by, level, this_build = mine, "a hub runs an older build: commands it cannot apply wait until every hub is upgraded");
        }
        self.seen = Some(level);
        // Level 1 is what every build applies: never written (a build before levels could
        // not read `SetClusterLevel` itself).
        if level >= 2 && level > current {
            match hub.write(Command::SetClusterLevel { level }).await {
                Ok(_) => tracing::info!(level, "every hub can apply commands of this level"),
                Err(e) => {
                    tracing::warn!(error = %e, "could not raise the cluster's command level yet")
                }
            }
        }
    }
}

/// File in the data dir holding a bootstrap admin token (mode 0600).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// What only the leader does once: make sure a signing key exists.
#[derive(Default)]
pub(crate) struct Housekeeping {
    done: bool,
}

impl Chore for Housekeeping {
    fn period(&self) -> Duration {
        Duration::from_millis(200)
    }

    fn finished(&self) -> bool {
        self.done
    }

    async fn run(&mut self, hub: &Hub) {
        if hub.state().signing_keys.is_empty() {
            let key = match SigningKey::generate(flotilla_common::now_ms()) {
                Ok(k) => k,
                Err(e) => {
                    tracing::error!(error = %e, "cannot generate a signing key");
                    return;
                }
            };
            if let Err(e) = hub.write(Command::AddSigningKey(key)).await {
                tracing::warn!(error = %e, "could not store the signing key yet");
                return;
            }
            tracing::info!("created the agent token signing key");
        }
        self.done = true;
    }
}

/// Keeps a valid admin token in the hub's data dir (`admin.token`), for the operator of
/// the machine it runs on (`flotilla admin-token --data-dir`): short-lived
/// (`[agent_tokens] bootstrap_admin_hours`), renewed once half its life has passed, or at
/// once when it is missing, unreadable, signed by a key that no longer verifies, or
/// revoked. Every hub keeps its own, leader or not; a hub does this only once the cluster
/// has a signing key.
pub(crate) async fn keep_admin_token(hub: Hub, mut stop: watch::Receiver<bool>) {
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let path = hub.config().data_dir.join(ADMIN_TOKEN_FILE);
    // The token on disk as this hub last read or wrote it, with its claims.
    let mut current: Option<(String, Claims)> = None;
    // When the admin client certificate on disk is due for renewal (ms).
    let mut cert_due: Option<i64> = None;
    loop {
        tokio::select! {
            _ = beat.tick() => {}
            _ = stop.changed() => return,
        }
        let now = flotilla_common::now_ms();
        if hub.config().agent_tokens.require_client_certificate {
            keep_admin_certificate(&hub, now, &mut cert_due);
        }
        if hub.state().active_signing_key().is_none() {
            continue;
        }
        if current.is_none() {
            current = read_admin_token(&hub, &path);
        }
        // Good while the cluster accepts it (key, lifetime, revocations) and less than
        // half its life has passed.
        let good = current.as_ref().is_some_and(|(token, c)| {
            now < (c.iat + (c.exp - c.iat) / 2) * 1000
                && crate::auth::check_token(&hub, token).is_ok()
        });
        if good && path.exists() {
            continue;
        }
        let hours = hub.config().agent_tokens.bootstrap_admin_hours;
        let issued = crate::auth::issue_agent_token(
            &hub,
            "admin",
            flotilla_common::jwt::DEFAULT_TENANT,
            (vec!["*".into()], Vec::new()),
            hours * 3600,
            (None, None),
        );
        match issued {
            Ok((token, _)) => match flotilla_common::pki::write_secret(&path, token.as_bytes()) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), hours, "wrote a bootstrap admin token");
                    current = read_admin_token(&hub, &path);
                }
                Err(e) => tracing::error!(error = %e, "cannot write the admin token"),
            },
            Err(e) => tracing::warn!(error = %e, "cannot issue the admin token yet"),
        }
    }
}

/// A certificate for this hub from `ca`, valid for `hub_cert_lifetime_s`.
pub(crate) fn issue_hub_certificate(
    config: &flotilla_common::config::HubConfig,
    ca: &flotilla_common::pki::Ca,
) -> Result<flotilla_common::pki::CertifiedKey, flotilla_common::pki::PkiError> {
    ca.issue_hub_for(
        &format!("hub-{}", config.id),
        &config.tls_names,
        Duration::from_secs(config.hub_cert_lifetime_s),
    )
}

/// Renews this hub's own certificate in place at two thirds of its life: every handshake
/// from then on (agents, nodes, other hubs, in either direction) sees the new one, and
/// connections already open go on. Without it a hub that runs longer than its
/// certificate's life would be refused by every peer. Every hub does this, leader or not.
pub(crate) async fn keep_hub_certificate(
    hub: Hub,
    identity: std::sync::Arc<flotilla_common::tls::LiveIdentity>,
    mut stop: watch::Receiver<bool>,
) {
    let lifetime = Duration::from_secs(hub.config().hub_cert_lifetime_s);
    let mut wait = lifetime * 2 / 3;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        let renewed = issue_hub_certificate(hub.config(), hub.ca())
            .map_err(|e| e.to_string())
            .and_then(|k| {
                identity
                    .replace(&k, hub.ca().cert_pem())
                    .map_err(|e| e.to_string())
            });
        wait = match renewed {
            Ok(()) => {
                tracing::info!(
                    valid_for_s = lifetime.as_secs(),
                    "renewed the hub's certificate"
                );
                lifetime * 2 / 3
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot renew the hub's certificate; trying again soon");
                (lifetime / 20).min(Duration::from_secs(60))
            }
        };
    }
}

/// Where agents must present a client certificate, keeps one for `admin` (the bootstrap
/// token's subject) in the data dir (`admin.pem`, `admin.key`), made from the CA this hub
/// holds, renewed at two thirds of its life.
fn keep_admin_certificate(hub: &Hub, now_ms: i64, due: &mut Option<i64>) {
    let dir = &hub.config().data_dir;
    if due.is_none() {
        // Due now unless the pair on disk reads back, matches, and is from the CA that
        // signs now (after a CA rotation it is made again).
        let current = |k: &flotilla_common::pki::CertifiedKey| {
            flotilla_common::tls::parse_certs(&k.cert_pem)
                .ok()
                .and_then(|c| c.into_iter().next())
                .is_some_and(|der| flotilla_common::pki::issued_by(&der, hub.ca().cert_pem()))
        };
        *due = flotilla_common::pki::CertifiedKey::read(dir, "admin")
            .ok()
            .flatten()
            .filter(flotilla_common::pki::CertifiedKey::pair_matches)
            .filter(current)
            .and_then(|k| flotilla_common::pki::pem_validity(&k.cert_pem))
            .map(|(from, to)| (from + (to - from) * 2 / 3) * 1000);
    }
    if due.is_some_and(|d| now_ms < d) {
        return;
    }
    // The key first: a crash between the two leaves a new key beside an old certificate,
    // which the next start replaces (the pair is checked), never the other way round.
    let made = hub
        .ca()
        .issue_client("admin")
        .map_err(|e| e.to_string())
        .and_then(|k| {
            flotilla_common::pki::write_secret(&dir.join("admin.key"), k.key_pem.as_bytes())
                .and_then(|()| {
                    flotilla_common::pki::write_whole(
                        &dir.join("admin.pem"),
                        k.cert_pem.as_bytes(),
                        0o644,
                    )
                })
                .map_err(|e| e.to_string())
        });
    match made {
        Ok(()) => {
            tracing::info!(dir = %dir.display(), "wrote the admin client certificate");
            *due = None;
        }
        Err(e) => tracing::error!(error = %e, "cannot write the admin client certificate"),
    }
}

/// The admin token in `path` and its claims, if this cluster accepts it now.
fn read_admin_token(hub: &Hub, path: &std::path::Path) -> Option<(String, Claims)> {
    let token = std::fs::read_to_string(path).ok()?.trim().to_owned();
    let claims = crate::auth::check_token(hub, &token).ok()?;
    Some((token, claims))
}
