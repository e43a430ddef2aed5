//! The leader's chores and the one loop that drives them all. A chore runs on its beat (and,
//! if it asks, whenever the scheduler is woken) while this hub leads; when the hub does not
//! lead, it is told so instead, to forget what only a leader keeps. The chores:
//! `scheduler::Scheduling` (placement passes), `liveness::Liveness` (nodes down, drains
//! overdue), `timers::Deadlines` (task timeouts), `retention::Retention` (finished work
//! expired) and `Housekeeping` below (a signing key, the bootstrap admin token).

use std::{future::Future, time::Duration};

use flotilla_common::jwt::SigningKey;
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

/// File in the data dir holding a bootstrap admin token (mode 0600).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// What only the leader does once: make sure a signing key exists, and leave a bootstrap
/// admin token in the data dir for the operator.
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
        let path = hub.config().data_dir.join(ADMIN_TOKEN_FILE);
        if !path.exists() {
            match crate::auth::issue_agent_token(
                hub,
                "admin",
                flotilla_common::jwt::DEFAULT_TENANT,
                vec!["*".into()],
                365 * 24 * 3600,
                (None, None),
            ) {
                Ok((token, _)) => {
                    if let Err(e) = flotilla_common::pki::write_secret(&path, token.as_bytes()) {
                        tracing::error!(error = %e, "cannot write the admin token");
                    } else {
                        tracing::info!(path = %path.display(), "wrote a bootstrap admin token");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot issue the admin token yet"),
            }
        }
        self.done = true;
    }
}
