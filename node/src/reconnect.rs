//! Where a node goes when its session with a hub ends, and how long it waits first. Pure
//! (no sockets, no clock of its own), so the rules are tested without a hub:
//!
//! - a hub that is not the leader names the leader: go there at once;
//! - a hub with no leader yet (an election) is asked again shortly;
//! - an unreachable hub is skipped for the next one the node knows, at once, and only a
//!   whole round of unreachable hubs waits (with a growing, capped backoff);
//! - a session the hub closed is reopened after a short pause;
//! - a session that lasted a while starts the backoff over.

use std::time::Duration;

/// The longest pause between reconnection attempts (plus up to half of it as jitter).
/// Capped low: after a failover the node must reach the new leader well within the
/// hub's node TTL, or its running work is treated as lost.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How soon to ask a hub again while it has no leader (an election takes about a second).
pub const NO_LEADER_RETRY: Duration = Duration::from_millis(150);
/// The first backoff, and the pause before reopening a session the hub closed.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// A session that lasted this long was healthy: the next failure starts the backoff over.
const HEALTHY: Duration = Duration::from_secs(10);

/// How a session ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Ended {
    /// The hub closed it.
    Closed,
    /// It failed: `leader` when the hub named the leader, `no_leader` during an election,
    /// `unreachable` when the hub could not be reached or the connection broke.
    Failed {
        leader: Option<String>,
        no_leader: bool,
        unreachable: bool,
    },
}

/// The hub to talk to next and the pause before it.
#[derive(Debug)]
pub struct Reconnect {
    endpoints: Vec<String>,
    next: usize,
    target: String,
    backoff: Duration,
    unreachable_in_a_row: usize,
}

impl Reconnect {
    /// Starts with the first of `endpoints` (the configured hub, then the others it knows).
    pub fn new(endpoints: Vec<String>) -> Self {
        assert!(!endpoints.is_empty(), "a node knows at least one hub");
        Self {
            target: endpoints[0].clone(),
            endpoints,
            next: 0,
            backoff: FIRST_BACKOFF,
            unreachable_in_a_row: 0,
        }
    }

    /// The hub to open the next session with.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The session with `target()` ended as `how` after `lasted`: moves the target on and
    /// returns the pause before the next attempt (`None`: at once; jitter is the caller's).
    pub fn ended(&mut self, how: &Ended, lasted: Duration) -> Option<Duration> {
        if lasted > HEALTHY {
            self.backoff = FIRST_BACKOFF;
        }
        let pause = match how {
            Ended::Closed => {
                tracing::info!(hub = %self.target, "hub closed the session; reconnecting");
                self.unreachable_in_a_row = 0;
                Some(FIRST_BACKOFF)
            }
            Ended::Failed {
                leader: Some(leader),
                ..
            } if *leader != self.target => {
                tracing::info!(from = %self.target, to = %leader, "following the leader");
                self.target = leader.clone();
                self.unreachable_in_a_row = 0;
                None
            }
            Ended::Failed {
                no_leader: true, ..
            } => {
                tracing::debug!(hub = %self.target, "no leader yet; asking again shortly");
                self.unreachable_in_a_row = 0;
                Some(NO_LEADER_RETRY)
            }
            Ended::Failed {
                unreachable: true, ..
            } => {
                self.next = (self.next + 1) % self.endpoints.len();
                self.target = self.endpoints[self.next].clone();
                self.unreachable_in_a_row += 1;
                if self.unreachable_in_a_row < self.endpoints.len() {
                    None
                } else {
                    self.unreachable_in_a_row = 0;
                    Some(self.backoff)
                }
            }
            Ended::Failed { .. } => Some(self.backoff),
        };
        if pause == Some(self.backoff) {
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        }
        pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hubs() -> Reconnect {
        Reconnect::new(vec!["a".into(), "b".into(), "c".into()])
    }

    fn unreachable() -> Ended {
        Ended::Failed {
            leader: None,
            no_leader: false,
            unreachable: true,
        }
    }

    fn refused() -> Ended {
        Ended::Failed {
            leader: None,
            no_leader: false,
            unreachable: false,
        }
    }

    const BRIEF: Duration = Duration::from_millis(5);

    #[test]
    fn an_unreachable_hub_is_skipped_at_once_and_only_a_whole_round_waits() {
        let mut r = hubs();
        assert_eq!(r.ended(&unreachable(), BRIEF), None);
        assert_eq!(r.target(), "b");
        assert_eq!(r.ended(&unreachable(), BRIEF), None);
        assert_eq!(r.target(), "c");
        // Every hub failed in a row: wait, then start the round again.
        assert_eq!(r.ended(&unreachable(), BRIEF), Some(FIRST_BACKOFF));
        assert_eq!(r.target(), "a");
        assert_eq!(r.ended(&unreachable(), BRIEF), None);
        assert_eq!(r.ended(&unreachable(), BRIEF), None);
        assert_eq!(r.ended(&unreachable(), BRIEF), Some(FIRST_BACKOFF * 2));
    }

    #[test]
    fn a_named_leader_is_followed_at_once_even_one_the_node_did_not_know() {
        let mut r = hubs();
        let to = |l: &str| Ended::Failed {
            leader: Some(l.into()),
            no_leader: false,
            unreachable: false,
        };
        assert_eq!(r.ended(&to("https://new-hub:7443"), BRIEF), None);
        assert_eq!(r.target(), "https://new-hub:7443");
        // A hub naming itself is not a redirect: it failed, and the node backs off.
        assert_eq!(
            r.ended(&to("https://new-hub:7443"), BRIEF),
            Some(FIRST_BACKOFF)
        );
        assert_eq!(r.target(), "https://new-hub:7443");
    }

    #[test]
    fn during_an_election_the_same_hub_is_asked_again_soon_without_backing_off() {
        let mut r = hubs();
        let election = Ended::Failed {
            leader: None,
            no_leader: true,
            unreachable: false,
        };
        for _ in 0..5 {
            assert_eq!(r.ended(&election, BRIEF), Some(NO_LEADER_RETRY));
            assert_eq!(r.target(), "a");
        }
        assert_eq!(r.ended(&refused(), BRIEF), Some(FIRST_BACKOFF));
    }

    #[test]
    fn the_backoff_grows_to_its_cap_and_a_healthy_session_starts_it_over() {
        let mut r = hubs();
        let pauses: Vec<Duration> = (0..6).filter_map(|_| r.ended(&refused(), BRIEF)).collect();
        assert_eq!(
            pauses,
            [100, 200, 400, 800, 1000, 1000].map(Duration::from_millis)
        );
        assert_eq!(
            r.ended(&refused(), Duration::from_secs(60)),
            Some(FIRST_BACKOFF)
        );
        assert_eq!(r.ended(&Ended::Closed, BRIEF), Some(FIRST_BACKOFF));
    }
}
