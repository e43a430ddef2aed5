//! How a hub whose data dir holds no cluster yet starts when hub.toml says `bootstrap`.
//! With no `peers` it starts a cluster of one. With a member list (a StatefulSet's, a
//! compose file's) it first asks every other listed hub what it holds:
//! - a hub holds a cluster in which this one is a voter: this hub is late to a cluster
//!   started from the list (or lost its data); it waits for the leader to bring it up to date;
//! - a hub holds a cluster in which this one is not a voter (the list grew: `hub.replicas`
//!   raised): it asks that cluster's leader to add it, a learner until it has caught up,
//!   then a voter;
//! - every listed hub answered and none holds a cluster: a new cluster. Every hub
//!   initializes the same members, so whichever does it first, they agree;
//! - otherwise (a listed hub did not answer): it asks again, each second. A hub that cannot
//!   reach the others never starts a cluster of its own beside theirs.
//!
//! The Raft port answers while this runs: the other hubs of a new cluster ask this one too.

use std::{collections::BTreeMap, time::Duration};

use tokio::sync::watch;

use super::{
    network::{decode, encode},
    peer::{ClusterView, MembershipChange, PeerError},
    HubNode,
};
use crate::cluster::Hub;

/// What a hub not yet in a cluster does, from what the other listed hubs answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Start {
    /// Start the cluster of the list.
    Initialize,
    /// A cluster counts this hub as a voter: its leader will replicate to it.
    Member,
    /// A cluster exists without this hub as a voter: ask its leader (its Raft address) to
    /// add it.
    Join { leader: String },
    /// Ask again later: not every hub answered, or the cluster has no leader now.
    Wait,
}

/// `views`: the answers of the `others` other listed hubs that answered.
pub(crate) fn decide(me: u64, others: usize, views: &[ClusterView]) -> Start {
    let held: Vec<&ClusterView> = views.iter().filter(|v| !v.members.is_empty()).collect();
    if held.is_empty() {
        return if views.len() >= others {
            Start::Initialize
        } else {
            Start::Wait
        };
    }
    let voter = held
        .iter()
        .any(|v| v.members.iter().any(|m| m.id == me && m.role != "learner"));
    if voter {
        return Start::Member;
    }
    held.iter()
        .find_map(|v| {
            let leader = v.leader_id?;
            let m = v.members.iter().find(|m| m.id == leader)?;
            Some(Start::Join {
                leader: m.raft.clone(),
            })
        })
        .unwrap_or(Start::Wait)
}

const ASK_TIMEOUT: Duration = Duration::from_secs(2);
const AGAIN: Duration = Duration::from_secs(1);

/// Runs until this hub is in a cluster, or knows a cluster will bring it in.
pub(crate) async fn start(hub: Hub, mut stop: watch::Receiver<bool>) {
    let c = hub.config().clone();
    if !c.bootstrap {
        return;
    }
    let members: BTreeMap<u64, HubNode> = if c.peers.is_empty() {
        BTreeMap::from([(
            c.id,
            HubNode {
                api: c.advertise.clone(),
                raft: c.raft_advertise.clone(),
            },
        )])
    } else {
        c.peers
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
            .collect()
    };
    let others: Vec<String> = c
        .peers
        .iter()
        .filter(|p| p.id != c.id)
        .map(|p| p.raft.clone())
        .collect();
    let mut said = None;
    loop {
        match hub.raft().is_initialized().await {
            Ok(false) => {}
            Ok(true) => return,
            Err(e) => {
                tracing::error!(error = %e, "cannot tell whether this hub holds a cluster");
                return;
            }
        }
        let views = if others.is_empty() {
            Vec::new()
        } else {
            futures::future::join_all(others.iter().map(|raft| ask_status(&hub, raft)))
                .await
                .into_iter()
                .flatten()
                .collect()
        };
        let start = decide(c.id, others.len(), &views);
        match &start {
            Start::Initialize => {
                let ids: Vec<u64> = members.keys().copied().collect();
                match hub.raft().initialize(members).await {
                    Ok(()) => {
                        tracing::info!(hub = c.id, voters = ?ids, "bootstrapped a new cluster")
                    }
                    // Another peer initialized first with the same members: nothing to do.
                    Err(e) => {
                        tracing::info!(hub = c.id, error = %e, "cluster already initialized")
                    }
                }
                return;
            }
            Start::Member => {
                tracing::info!(
                    hub = c.id,
                    "the cluster of the member list counts this hub: waiting for its leader"
                );
                return;
            }
            Start::Join { leader } => match ask_to_join(&hub, leader).await {
                Ok(()) => {
                    tracing::info!(hub = c.id, "added to the existing cluster");
                    return;
                }
                Err(e) => {
                    tracing::warn!(hub = c.id, leader = %leader, error = %e, "asking to join the existing cluster failed; asking again")
                }
            },
            Start::Wait => {
                if said != Some(views.len()) {
                    tracing::info!(
                        hub = c.id,
                        answered = views.len(),
                        listed = others.len(),
                        "waiting for every listed hub to answer before starting a cluster"
                    );
                    said = Some(views.len());
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(AGAIN) => {}
            _ = stop.changed() => return,
        }
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
    let reply = client
        .change_membership(encode(&change))
        .await
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

    fn view(leader: Option<u64>, members: &[(u64, &str)]) -> ClusterView {
        ClusterView {
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
        // Late to a cluster started from the list (or its data lost): wait to be replicated.
        let three = view(Some(2), &[(1, "follower"), (2, "leader"), (3, "follower")]);
        assert_eq!(decide(1, 2, &[empty.clone(), three.clone()]), Start::Member);
        // The list grew: hub 4 asks the leader to add it, whoever answered.
        assert_eq!(
            decide(4, 4, std::slice::from_ref(&three)),
            Start::Join {
                leader: "https://hub-2:7444".into()
            }
        );
        // Added as a learner but never promoted: asks again (adding is idempotent).
        let learner = view(
            Some(2),
            &[
                (1, "follower"),
                (2, "leader"),
                (3, "follower"),
                (4, "learner"),
            ],
        );
        assert!(matches!(decide(4, 4, &[learner]), Start::Join { .. }));
        // A cluster with no leader now: wait, rather than start another.
        let leaderless = view(None, &[(1, "follower"), (2, "follower"), (3, "follower")]);
        assert_eq!(decide(4, 4, &[leaderless, empty]), Start::Wait);
    }
}
