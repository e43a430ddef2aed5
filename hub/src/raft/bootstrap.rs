//! How a hub whose data dir holds no cluster yet starts when hub.toml says `bootstrap`.
//! With no `peers` it starts a cluster of one. With a member list (a StatefulSet's, a
//! compose file's) it asks the other listed hubs what they hold, and believes only a
//! leader's answer about the cluster:
//! - the leader counts this hub as a voter: this hub is late to a cluster started from the
//!   list (or lost its data); it waits for the leader to bring it up to date;
//! - the leader does not count it as a voter (the list grew: `hub.replicas` raised): it asks
//!   the leader to add it, a learner until it has caught up, then a voter;
//! - every listed hub answered and none holds a cluster: a new cluster. Every hub
//!   initializes the same members, so whichever does it first, they agree;
//! - otherwise (a listed hub did not answer, no leader now): it asks again, each second. A
//!   hub that cannot reach the others never starts a cluster of its own beside theirs.
//!
//! It goes on, across restarts (a `joining` file in the data dir), until this hub's own
//! membership counts it as a voter: a join whose promotion failed (another membership
//! change in progress, a new leader, a broken connection) is asked again. A hub that
//! started with a cluster and no such file does nothing here: a hub removed from the
//! cluster and restarted stays out. The Raft port answers while this runs: the other hubs
//! of a new cluster ask this one too.

use std::{collections::BTreeMap, time::Duration};

use tokio::sync::watch;

use super::{
    network::{decode, encode},
    peer::{ClusterView, MembershipChange, PeerError},
    HubNode,
};
use crate::cluster::Hub;

/// What a hub not yet a voter does, from what the other listed hubs answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Start {
    /// Start the cluster of the list.
    Initialize,
    /// The leader counts this hub as a voter: it will replicate to it.
    Member,
    /// The leader (its Raft address) does not count this hub as a voter: ask it to add it.
    Join { leader: String },
    /// Ask again later: not every hub answered, or no leader answered.
    Wait,
}

/// `views`: the answers of the other listed hubs that answered (`others` of them are
/// listed), and of the leader they name.
pub(crate) fn decide(me: u64, others: usize, views: &[ClusterView]) -> Start {
    let held: Vec<&ClusterView> = views.iter().filter(|v| !v.members.is_empty()).collect();
    if held.is_empty() {
        return if views.len() >= others {
            Start::Initialize
        } else {
            Start::Wait
        };
    }
    // A follower's view may be stale (it may still list a hub the leader removed).
    let Some(leader) = held.iter().find(|v| v.leader_id == Some(v.this_hub)) else {
        return Start::Wait;
    };
    if leader
        .members
        .iter()
        .any(|m| m.id == me && m.role != "learner")
    {
        return Start::Member;
    }
    match leader.members.iter().find(|m| m.id == leader.this_hub) {
        Some(m) => Start::Join {
            leader: m.raft.clone(),
        },
        None => Start::Wait,
    }
}

const ASK_TIMEOUT: Duration = Duration::from_secs(2);
const AGAIN: Duration = Duration::from_secs(1);
const JOIN_TIMEOUT: Duration = Duration::from_secs(600);
/// In the data dir while this hub is on its way into a cluster.
const JOINING: &str = "joining";

/// Whether this hub's own membership counts it as a voter.
fn a_voter(hub: &Hub) -> bool {
    let me = hub.config().id;
    hub.raft()
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .any(|id| id == me)
}

/// Runs until this hub is a voter of a cluster (or the hub stops).
pub(crate) async fn start(hub: Hub, mut stop: watch::Receiver<bool>) {
    let c = hub.config().clone();
    if !c.bootstrap {
        return;
    }
    let marker = c.data_dir.join(JOINING);
    let held = match hub.raft().is_initialized().await {
        Ok(held) => held,
        Err(e) => {
            tracing::error!(error = %e, "cannot tell whether this hub holds a cluster");
            return;
        }
    };
    if held && !marker.exists() {
        return;
    }
    if c.peers.is_empty() {
        let alone = HubNode {
            api: c.advertise.clone(),
            raft: c.raft_advertise.clone(),
        };
        initialize(&hub, BTreeMap::from([(c.id, alone)])).await;
        return;
    }
    let members: BTreeMap<u64, HubNode> = c
        .peers
        .iter()
        .map(|p| {
            (
                p.id,
                HubNode {
                    api: p.api.clone(),
                    raft: p.raft.clone(),
                },
            )
        })
        .collect();
    if let Err(e) = std::fs::write(&marker, b"") {
        tracing::warn!(error = %e, path = %marker.display(), "cannot note that this hub is joining");
    }
    let others: Vec<String> = c
        .peers
        .iter()
        .filter(|p| p.id != c.id)
        .map(|p| p.raft.clone())
        .collect();
    let mut said = None;
    loop {
        if a_voter(&hub) {
            let _ = std::fs::remove_file(&marker);
            tracing::info!(hub = c.id, "a voter of the cluster");
            return;
        }
        let mut views: Vec<ClusterView> =
            futures::future::join_all(others.iter().map(|raft| ask_status(&hub, raft)))
                .await
                .into_iter()
                .flatten()
                .collect();
        // The leader a follower names may be none of the listed hubs (the list shrank).
        let named = views
            .iter()
            .filter(|v| v.leader_id.is_some() && v.leader_id != Some(v.this_hub))
            .find_map(|v| {
                let id = v.leader_id?;
                v.members
                    .iter()
                    .find(|m| m.id == id)
                    .map(|m| m.raft.clone())
            });
        if !views.iter().any(|v| v.leader_id == Some(v.this_hub)) {
            if let Some(view) = match named {
                Some(raft) if !others.contains(&raft) => ask_status(&hub, &raft).await,
                _ => None,
            } {
                views.push(view);
            }
        }
        let held = !matches!(hub.raft().is_initialized().await, Ok(false));
        let start = match decide(c.id, others.len(), &views) {
            // This hub holds a log already (it was a learner): never initialize again.
            Start::Initialize if held => Start::Wait,
            s => s,
        };
        match &start {
            Start::Initialize => initialize(&hub, members.clone()).await,
            Start::Member => {
                if said != Some(start.clone()) {
                    tracing::info!(
                        hub = c.id,
                        "the cluster counts this hub as a voter: waiting for its leader"
                    );
                }
            }
            Start::Join { leader } => match ask_to_join(&hub, leader).await {
                Ok(()) => tracing::info!(hub = c.id, "added to the existing cluster"),
                Err(e) => {
                    tracing::warn!(hub = c.id, leader = %leader, error = %e, "asking to join the existing cluster failed; asking again")
                }
            },
            Start::Wait => {
                if said != Some(start.clone()) {
                    tracing::info!(
                        hub = c.id,
                        answered = views.len(),
                        listed = others.len(),
                        "waiting for every listed hub, or a leader, to answer"
                    );
                }
            }
        }
        said = Some(start);
        tokio::select! {
            _ = tokio::time::sleep(AGAIN) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn initialize(hub: &Hub, members: BTreeMap<u64, HubNode>) {
    let ids: Vec<u64> = members.keys().copied().collect();
    match hub.raft().initialize(members).await {
        Ok(()) => {
            tracing::info!(hub = hub.config().id, voters = ?ids, "bootstrapped a new cluster")
        }
        // Another peer initialized first with the same members: nothing to do.
        Err(e) => tracing::info!(hub = hub.config().id, error = %e, "cluster already initialized"),
    }
}

/// What the hub at `raft` holds; `None` when it does not answer now.
async fn ask_status(hub: &Hub, raft: &str) -> Option<ClusterView> {
    let mut client = hub.net().client(raft).ok()?;
    let reply = tokio::time::timeout(ASK_TIMEOUT, client.status(encode(&())))
        .await
        .ok()?
        .ok()?;
    decode(reply.get_ref()).ok()
}

/// Asks the leader at `raft` to add this hub (a learner until caught up, then a voter).
/// The leader asks this hub's build first, on its Raft port, which is open by now.
async fn ask_to_join(hub: &Hub, raft: &str) -> Result<(), String> {
    let c = hub.config();
    let change = MembershipChange::Add {
        id: c.id,
        node: HubNode {
            api: c.advertise.clone(),
            raft: c.raft_advertise.clone(),
        },
    };
    let mut client = hub.net().client(raft).map_err(|e| e.to_string())?;
    // Catching up from a snapshot of a large history store takes a while; a leader that
    // lost its quorum mid-way answers within this.
    let reply = tokio::time::timeout(JOIN_TIMEOUT, client.change_membership(encode(&change)))
        .await
        .map_err(|_| format!("no answer within {} s", JOIN_TIMEOUT.as_secs()))?
        .map_err(|s| s.message().to_owned())?;
    match decode::<Result<(), PeerError>>(reply.get_ref()) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("undecodable answer: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::peer::MemberView;

    /// Hub `this`'s view: `leader` leads, `members` with their roles.
    fn view(this: u64, leader: Option<u64>, members: &[(u64, &str)]) -> ClusterView {
        ClusterView {
            this_hub: this,
            leader_id: leader,
            members: members
                .iter()
                .map(|(id, role)| MemberView {
                    id: *id,
                    raft: format!("https://hub-{id}:7444"),
                    role: (*role).into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_hub_starts_a_cluster_only_when_every_listed_hub_says_none_exists() {
        let empty = ClusterView::default();
        // A new cluster: both others answered, neither holds one.
        assert_eq!(
            decide(1, 2, &[empty.clone(), empty.clone()]),
            Start::Initialize
        );
        // One did not answer: never a cluster of its own.
        assert_eq!(decide(1, 2, std::slice::from_ref(&empty)), Start::Wait);
        assert_eq!(decide(1, 2, &[]), Start::Wait);
        // Late to a cluster started from the list (or its data lost): the leader says it
        // is a voter; wait to be replicated.
        let three = [(1, "follower"), (2, "leader"), (3, "follower")];
        let led = view(2, Some(2), &three);
        assert_eq!(decide(1, 2, &[empty.clone(), led.clone()]), Start::Member);
        // The list grew: hub 4 asks the leader to add it.
        assert_eq!(
            decide(4, 4, std::slice::from_ref(&led)),
            Start::Join {
                leader: "https://hub-2:7444".into()
            }
        );
        // Added as a learner but never promoted: asks again (adding is idempotent).
        let learner = view(
            2,
            Some(2),
            &[
                (1, "follower"),
                (2, "leader"),
                (3, "follower"),
                (4, "learner"),
            ],
        );
        assert!(matches!(decide(4, 4, &[learner]), Start::Join { .. }));
        // Only the leader is believed: a follower still listing hub 4, which the leader
        // removed, does not make it wait for replication that never comes.
        let stale = view(
            3,
            Some(2),
            &[
                (1, "follower"),
                (2, "leader"),
                (3, "follower"),
                (4, "follower"),
            ],
        );
        assert_eq!(decide(4, 4, std::slice::from_ref(&stale)), Start::Wait);
        assert!(matches!(decide(4, 4, &[stale, led]), Start::Join { .. }));
        // A cluster with no leader now: wait, rather than start another.
        let leaderless = view(
            1,
            None,
            &[(1, "follower"), (2, "follower"), (3, "follower")],
        );
        assert_eq!(decide(4, 4, &[leaderless, empty]), Start::Wait);
    }
}
