//! How a task runs (retry, deadlines, placement, fan-out), from `call` flags or a workflow
//! file, as the proto's `TaskOptions`.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use clap::Args;
use flotilla_proto as pb;
use serde::Deserialize;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Retry {
    max_attempts: u32,
    backoff_ms: u64,
    max_backoff_ms: u64,
    /// node_lost, timeout, tool_error
    on: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Timeouts {
    queue_ms: u64,
    attempt_ms: u64,
    total_ms: u64,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Place {
    zone: String,
    region: String,
    require: BTreeMap<String, String>,
    prefer: BTreeMap<String, String>,
}

/// A task's options as a file or flags give them.
#[derive(Clone, Debug, Default)]
pub(crate) struct Options {
    pub(crate) retry: Option<Retry>,
    pub(crate) timeouts: Option<Timeouts>,
    pub(crate) placement: Option<Place>,
    pub(crate) replicas: u32,
    /// all, first, majority or quorum:K
    pub(crate) aggregate: Option<String>,
}

fn failure_kind(s: &str) -> anyhow::Result<i32> {
    Ok(match s.trim() {
        "node_lost" => pb::FailureKind::NodeLost,
        "timeout" => pb::FailureKind::Timeout,
        "tool_error" => pb::FailureKind::ToolError,
        other => bail!("unknown failure kind {other:?}: use node_lost, timeout or tool_error"),
    } as i32)
}

impl Options {
    pub(crate) fn to_proto(&self) -> anyhow::Result<Option<pb::TaskOptions>> {
        let mut o = pb::TaskOptions {
            replicas: self.replicas,
            ..Default::default()
        };
        if let Some(r) = &self.retry {
            o.retry = Some(pb::RetryPolicy {
                max_attempts: r.max_attempts,
                initial_backoff_ms: r.backoff_ms,
                max_backoff_ms: r.max_backoff_ms,
                retry_on: r
                    .on
                    .iter()
                    .map(|k| failure_kind(k))
                    .collect::<anyhow::Result<_>>()?,
            });
        }
        if let Some(t) = &self.timeouts {
            o.deadlines = Some(pb::Deadlines {
                queue_timeout_ms: t.queue_ms,
                attempt_timeout_ms: t.attempt_ms,
                total_timeout_ms: t.total_ms,
            });
        }
        if let Some(p) = &self.placement {
            o.placement = Some(pb::PlacementConstraints {
                region: p.region.clone(),
                zone: p.zone.clone(),
                required_labels: p.require.clone().into_iter().collect(),
                preferred_labels: p.prefer.clone().into_iter().collect(),
            });
        }
        if let Some(a) = &self.aggregate {
            let (kind, quorum) = match a.split_once(':') {
                Some(("quorum", k)) => (
                    pb::Aggregation::Quorum,
                    k.parse()
                        .with_context(|| format!("quorum:{k}: not a number"))?,
                ),
                _ => (
                    match a.as_str() {
                        "all" => pb::Aggregation::All,
                        "first" => pb::Aggregation::First,
                        "majority" => pb::Aggregation::Majority,
                        other => bail!(
                            "unknown aggregation {other:?}: use all, first, majority or quorum:K"
                        ),
                    },
                    0,
                ),
            };
            o.aggregation = kind as i32;
            o.quorum = quorum;
        }
        Ok((o != pb::TaskOptions::default()).then_some(o))
    }
}

fn key_value(s: &str) -> anyhow::Result<(String, String)> {
    let (k, v) = s
        .split_once('=')
        .with_context(|| format!("{s:?} is not KEY=VALUE"))?;
    Ok((k.to_owned(), v.to_owned()))
}

/// Placement, retry, deadline and fan-out flags of `flotilla call`.
#[derive(Args, Clone, Debug, Default)]
pub(crate) struct OptionFlags {
    /// Run on N distinct nodes and aggregate their results.
    #[arg(long, default_value_t = 0)]
    replicas: u32,
    /// How replicas' results combine: all, first, majority or quorum:K.
    #[arg(long)]
    aggregate: Option<String>,
    /// Attempts in all (the first included).
    #[arg(long, default_value_t = 0)]
    max_attempts: u32,
    /// Which failures are retried: node_lost, timeout, tool_error (comma-separated).
    #[arg(long, value_delimiter = ',')]
    retry_on: Vec<String>,
    /// First retry backoff (doubles, with jitter).
    #[arg(long, default_value_t = 0)]
    backoff_ms: u64,
    /// Fail if not placed within this long.
    #[arg(long, default_value_t = 0)]
    queue_timeout_ms: u64,
    /// Each attempt may run this long.
    #[arg(long, default_value_t = 0)]
    attempt_timeout_ms: u64,
    /// The whole task must end within this long.
    #[arg(long, default_value_t = 0)]
    timeout_ms: u64,
    /// Prefer nodes in this zone (label `zone`).
    #[arg(long, default_value = "")]
    zone: String,
    /// Prefer nodes in this region (label `region`).
    #[arg(long, default_value = "")]
    region: String,
    /// Only nodes with this label, KEY=VALUE (repeatable).
    #[arg(long = "require", value_parser = key_value)]
    require: Vec<(String, String)>,
    /// Prefer nodes with this label, KEY=VALUE (repeatable).
    #[arg(long = "prefer", value_parser = key_value)]
    prefer: Vec<(String, String)>,
}

impl OptionFlags {
    pub(crate) fn to_proto(&self) -> anyhow::Result<Option<pb::TaskOptions>> {
        let retry = (self.max_attempts > 0 || !self.retry_on.is_empty()).then(|| Retry {
            max_attempts: self.max_attempts,
            backoff_ms: self.backoff_ms,
            max_backoff_ms: 0,
            on: self.retry_on.clone(),
        });
        let timeouts = (self.queue_timeout_ms + self.attempt_timeout_ms + self.timeout_ms > 0)
            .then_some(Timeouts {
                queue_ms: self.queue_timeout_ms,
                attempt_ms: self.attempt_timeout_ms,
                total_ms: self.timeout_ms,
            });
        let placement = (!self.zone.is_empty()
            || !self.region.is_empty()
            || !self.require.is_empty()
            || !self.prefer.is_empty())
        .then(|| Place {
            zone: self.zone.clone(),
            region: self.region.clone(),
            require: self.require.iter().cloned().collect(),
            prefer: self.prefer.iter().cloned().collect(),
        });
        Options {
            retry,
            timeouts,
            placement,
            replicas: self.replicas,
            aggregate: self.aggregate.clone(),
        }
        .to_proto()
    }
}
