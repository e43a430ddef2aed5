//! How a task asks to run: placement constraints, retry policy, deadlines and fan-out. Part
//! of the replicated task record, so every rule here must be deterministic.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Attempts a read-only or idempotent tool gets after node losses when its own policy allows
/// fewer: enough to ride out a couple of failures, not enough to loop forever.
pub const NODE_LOSS_RERUNS: u32 = 3;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TaskSpec {
    #[serde(skip_serializing_if = "super::is_default")]
    pub placement: Constraints,
    #[serde(skip_serializing_if = "super::is_default")]
    pub retry: RetryPolicy,
    #[serde(skip_serializing_if = "super::is_default")]
    pub deadlines: Deadlines,
    /// Distinct nodes to run on; 0 and 1 both mean one.
    #[serde(skip_serializing_if = "super::is_default")]
    pub replicas: u32,
    #[serde(skip_serializing_if = "super::is_default")]
    pub aggregation: Aggregation,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Constraints {
    /// Where the caller is; nodes nearby score higher.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Labels a node must carry.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub required: BTreeMap<String, String>,
    /// Labels that count in a node's favour.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub preferred: BTreeMap<String, String>,
}

impl Constraints {
    pub fn admits(&self, labels: &BTreeMap<String, String>) -> bool {
        self.required.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    NodeLost,
    Timeout,
    ToolError,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub retry_on: Vec<FailureKind>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 1,
            initial_backoff_ms: 500,
            max_backoff_ms: 30_000,
            retry_on: Vec::new(),
        }
    }
}

impl RetryPolicy {
    /// Whether a task that has made `attempts` attempts may try again after `kind`.
    pub fn allows(&self, kind: FailureKind, attempts: usize) -> bool {
        self.retry_on.contains(&kind) && attempts < self.max_attempts.max(1) as usize
    }

    /// The wait before attempt `next` (2 for the first retry): doubling from the initial
    /// backoff up to the cap, then "equal jitter" (half fixed, half spread) so that tasks
    /// failing together do not come back together. The spread is a hash of the task id and
    /// attempt, so every hub computes the same wait.
    pub fn backoff_ms(&self, next: u32, task_id: &str) -> u64 {
        let doublings = next.saturating_sub(2).min(32);
        let base = self
            .initial_backoff_ms
            .saturating_mul(1u64 << doublings)
            .min(self.max_backoff_ms.max(self.initial_backoff_ms));
        let half = base / 2;
        let spread = if half == 0 {
            0
        } else {
            fnv1a(task_id.as_bytes(), next) % (half + 1)
        };
        base - half + spread
    }
}

fn fnv1a(bytes: &[u8], salt: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes.iter().chain(&salt.to_le_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// 0 means no limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Deadlines {
    pub queue_timeout_ms: u64,
    pub attempt_timeout_ms: u64,
    pub total_timeout_ms: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    #[default]
    All,
    First,
    Majority,
    Quorum(u32),
}

impl Aggregation {
    /// How many agreeing results decide a fan-out of `n`, for the voting kinds.
    pub fn needed(self, n: usize) -> Option<usize> {
        match self {
            Self::Majority => Some(n / 2 + 1),
            Self::Quorum(k) => Some(k as usize),
            Self::All | Self::First => None,
        }
    }

    pub fn describe(self) -> String {
        match self {
            Self::All => "all".into(),
            Self::First => "first".into(),
            Self::Majority => "majority".into(),
            Self::Quorum(k) => format!("quorum({k})"),
        }
    }
}

/// Which task kind is late, for `Command::TimeoutTask`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Timeout {
    Queue,
    Attempt,
    Total,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_bounded_jitter() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
            retry_on: vec![FailureKind::ToolError],
        };
        for (next, base) in [(2, 100), (3, 200), (4, 400), (5, 800), (6, 1000), (9, 1000)] {
            let b = p.backoff_ms(next, "task");
            assert!(
                b >= base / 2 && b <= base,
                "attempt {next}: {b} not in [{}, {base}]",
                base / 2
            );
            assert_eq!(b, p.backoff_ms(next, "task"), "deterministic");
        }
        let spread: std::collections::BTreeSet<u64> =
            (0..50).map(|i| p.backoff_ms(4, &format!("t{i}"))).collect();
        assert!(spread.len() > 10, "jitter spreads tasks: {spread:?}");
    }

    #[test]
    fn retry_allows_only_listed_failures_up_to_max_attempts() {
        let p = RetryPolicy {
            max_attempts: 3,
            retry_on: vec![FailureKind::Timeout],
            ..Default::default()
        };
        assert!(p.allows(FailureKind::Timeout, 1));
        assert!(p.allows(FailureKind::Timeout, 2));
        assert!(!p.allows(FailureKind::Timeout, 3));
        assert!(!p.allows(FailureKind::ToolError, 1));
        assert!(!RetryPolicy::default().allows(FailureKind::ToolError, 1));
    }

    #[test]
    fn voting_thresholds() {
        assert_eq!(Aggregation::Majority.needed(3), Some(2));
        assert_eq!(Aggregation::Majority.needed(4), Some(3));
        assert_eq!(Aggregation::Quorum(2).needed(5), Some(2));
        assert_eq!(Aggregation::First.needed(3), None);
    }
}
