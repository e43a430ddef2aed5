//! What one agent or tenant may use of a hub: a request rate (token buckets per agent and
//! per tenant), open watch streams per agent, and queued tasks per tenant. Overload answers
//! RESOURCE_EXHAUSTED at once with a retry hint, so a flood from one caller costs others
//! nothing. Buckets live in this hub's memory (each hub limits what it serves; a caller
//! spread over three hubs gets at most three times the rate). Slots in use per tenant are
//! the scheduler's business (`scheduler::tenant_cap`).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use flotilla_common::{config::Limits, jwt::Claims};

use crate::error::{HubError, HubResult};

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            at: now,
        }
    }

    fn refill(&mut self, rate: f64, burst: u32, now: Instant) {
        let gained = now.saturating_duration_since(self.at).as_secs_f64() * rate;
        self.tokens = (self.tokens + gained).min(f64::from(burst));
        self.at = now;
    }

    /// Takes one token, or says how long until one is there.
    fn take(&mut self, rate: f64, burst: u32, now: Instant) -> Result<(), Duration> {
        self.refill(rate, burst, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

/// Buckets by key, forgetting the ones that refilled (a full bucket and no bucket are the
/// same), so the map holds only callers active in the last `burst / rate` seconds.
#[derive(Default)]
struct Buckets {
    map: HashMap<String, Bucket>,
    swept: Option<Instant>,
}

impl Buckets {
    /// Takes a token from `key`'s bucket (`rate` per second, `burst` at most; a rate of 0
    /// is no limit), or says how long until one is there.
    fn take(&mut self, key: &str, rate: f64, burst: u32, now: Instant) -> Result<(), Duration> {
        if rate <= 0.0 {
            return Ok(());
        }
        self.sweep(rate, burst, now);
        match self.map.get_mut(key) {
            Some(b) => b.take(rate, burst, now),
            None => {
                let mut b = Bucket::full(burst, now);
                let r = b.take(rate, burst, now);
                self.map.insert(key.to_owned(), b);
                r
            }
        }
    }

    /// How long until `key` has a token, without taking one (`None`: it has one now).
    fn wait(&mut self, key: &str, rate: f64, burst: u32, now: Instant) -> Option<Duration> {
        if rate <= 0.0 {
            return None;
        }
        self.sweep(rate, burst, now);
        let b = self.map.get_mut(key)?;
        b.refill(rate, burst, now);
        (b.tokens < 1.0).then(|| Duration::from_secs_f64((1.0 - b.tokens) / rate))
    }

    /// Forgets full buckets, at most once per refill time.
    fn sweep(&mut self, rate: f64, burst: u32, now: Instant) {
        let refill_s = f64::from(burst) / rate;
        if self
            .swept
            .is_none_or(|t| now.saturating_duration_since(t).as_secs_f64() > refill_s)
        {
            self.map.retain(|_, b| {
                b.refill(rate, burst, now);
                b.tokens < f64::from(burst)
            });
            self.swept = Some(now);
        }
    }
}

struct Inner {
    limits: Limits,
    agents: Mutex<Buckets>,
    tenants: Mutex<Buckets>,
    streams: Mutex<HashMap<String, u32>>,
    joins: Mutex<Buckets>,
    renewals: Mutex<Buckets>,
}

/// The hub's quotas. Cheap to clone.
#[derive(Clone)]
pub struct Quota(Arc<Inner>);

/// An open watch stream, counted against its agent until dropped.
pub struct StreamPermit {
    quota: Quota,
    agent: String,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut m = self.quota.0.streams.lock().expect("stream counts");
        if let Some(n) = m.get_mut(&self.agent) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.agent);
            }
        }
    }
}

fn agent_key(c: &Claims) -> String {
    format!("{}\0{}", c.tenant, c.sub)
}

fn exhausted(what: String, retry_after: Duration) -> HubError {
    HubError::ResourceExhausted {
        message: what,
        retry_after_ms: retry_after.as_millis().max(1) as u64,
    }
}

impl Quota {
    pub fn new(limits: Limits) -> Self {
        Self(Arc::new(Inner {
            limits,
            agents: Mutex::default(),
            tenants: Mutex::default(),
            streams: Mutex::default(),
            joins: Mutex::default(),
            renewals: Mutex::default(),
        }))
    }

    /// Counts one request of `c` against its agent's and its tenant's rate.
    pub fn request(&self, c: &Claims) -> HubResult<()> {
        let l = &self.0.limits;
        let now = Instant::now();
        self.0
            .agents
            .lock()
            .expect("agent buckets")
            .take(
                &agent_key(c),
                f64::from(l.agent_requests_per_s),
                l.agent_burst,
                now,
            )
            .map_err(|wait| {
                exhausted(
                    format!(
                        "agent {:?} is over its rate of {} requests/s (burst {})",
                        c.sub, l.agent_requests_per_s, l.agent_burst
                    ),
                    wait,
                )
            })?;
        self.0
            .tenants
            .lock()
            .expect("tenant buckets")
            .take(
                &c.tenant,
                f64::from(l.tenant_requests_per_s),
                l.tenant_burst,
                now,
            )
            .map_err(|wait| {
                exhausted(
                    format!(
                        "tenant {:?} is over its rate of {} requests/s (burst {})",
                        c.tenant, l.tenant_requests_per_s, l.tenant_burst
                    ),
                    wait,
                )
            })
    }

    /// Admits one more watch stream of `c`'s agent, held until the permit is dropped.
    pub fn stream(&self, c: &Claims) -> HubResult<StreamPermit> {
        let max = self.0.limits.agent_streams;
        let key = agent_key(c);
        let mut m = self.0.streams.lock().expect("stream counts");
        let n = m.entry(key.clone()).or_default();
        if max > 0 && *n >= max {
            return Err(exhausted(
                format!(
                    "agent {:?} has {max} watch streams open, its limit; close one first",
                    c.sub
                ),
                Duration::from_secs(1),
            ));
        }
        *n += 1;
        Ok(StreamPermit {
            quota: self.clone(),
            agent: key,
        })
    }

    fn join_rate(&self) -> (f64, u32) {
        let per_min = self.0.limits.join_failures_per_min;
        (f64::from(per_min) / 60.0, per_min)
    }

    /// Refuses a join from `source` at once while it is over its failed joins per minute.
    pub fn join_allowed(&self, source: &str) -> HubResult<()> {
        let (rate, burst) = self.join_rate();
        match self
            .0
            .joins
            .lock()
            .expect("join buckets")
            .wait(source, rate, burst, Instant::now())
        {
            None => Ok(()),
            Some(wait) => Err(exhausted(
                format!("too many failed joins from {source}"),
                wait,
            )),
        }
    }

    /// Counts a failed join from `source`.
    pub fn join_failed(&self, source: &str) {
        let (rate, burst) = self.join_rate();
        let _ =
            self.0
                .joins
                .lock()
                .expect("join buckets")
                .take(source, rate, burst, Instant::now());
    }

    /// Counts a certificate renewal of `node_id`: on average one a minute or six per
    /// certificate lifetime (`lifetime_s`), whichever is more, three at once (a node renews
    /// at two thirds of its certificate's life; one asking in a loop would otherwise commit
    /// an entry each time).
    pub fn renewal_allowed(&self, node_id: &str, lifetime_s: u64) -> HubResult<()> {
        let rate = (1.0 / 60.0_f64).max(6.0 / lifetime_s.max(1) as f64);
        self.0
            .renewals
            .lock()
            .expect("renewal buckets")
            .take(node_id, rate, 3, Instant::now())
            .map_err(|wait| exhausted(format!("node {node_id} renews too often"), wait))
    }

    /// Refuses a submission of `adding` tasks when the tenant has `queued` waiting already.
    pub fn queue(&self, tenant: &str, queued: usize, adding: usize) -> HubResult<()> {
        let max = self.0.limits.tenant_queued_tasks as usize;
        if max > 0 && queued + adding > max {
            return Err(exhausted(
                format!(
                    "tenant {tenant:?} has {queued} tasks waiting in the queue; the limit is {max}"
                ),
                Duration::from_secs(1),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(sub: &str, tenant: &str) -> Claims {
        Claims {
            sub: sub.into(),
            tenant: tenant.into(),
            ..Claims::default()
        }
    }

    fn limits() -> Limits {
        Limits {
            agent_requests_per_s: 10,
            agent_burst: 5,
            agent_streams: 2,
            tenant_queued_tasks: 3,
            ..Limits::default()
        }
    }

    #[test]
    fn an_agent_over_its_burst_is_refused_with_a_retry_hint_and_others_are_not() {
        let q = Quota::new(limits());
        let a = claims("a", "t");
        for _ in 0..5 {
            q.request(&a).unwrap();
        }
        match q.request(&a) {
            Err(HubError::ResourceExhausted { retry_after_ms, .. }) => {
                assert!((1..=100).contains(&retry_after_ms), "{retry_after_ms}")
            }
            other => panic!("{other:?}"),
        }
        q.request(&claims("b", "t")).unwrap();
    }

    #[test]
    fn buckets_refill_and_full_ones_are_forgotten() {
        let mut b = Buckets::default();
        let t0 = Instant::now();
        for _ in 0..5 {
            b.take("a", 10.0, 5, t0).unwrap();
        }
        assert!(b.take("a", 10.0, 5, t0).is_err());
        assert!(b.wait("a", 10.0, 5, t0).is_some());
        assert!(b
            .take("a", 10.0, 5, t0 + Duration::from_millis(150))
            .is_ok());
        // Long after, a sweep drops the refilled bucket.
        b.take("z", 10.0, 5, t0 + Duration::from_secs(10)).unwrap();
        assert!(!b.map.contains_key("a"));
    }

    #[test]
    fn streams_are_counted_until_their_permit_drops() {
        let q = Quota::new(limits());
        let a = claims("a", "t");
        let p1 = q.stream(&a).unwrap();
        let _p2 = q.stream(&a).unwrap();
        assert!(q.stream(&a).is_err());
        drop(p1);
        assert!(q.stream(&a).is_ok());
    }

    #[test]
    fn failed_joins_are_throttled_per_source() {
        let q = Quota::new(Limits {
            join_failures_per_min: 2,
            ..limits()
        });
        q.join_allowed("10.0.0.1").unwrap();
        q.join_failed("10.0.0.1");
        q.join_failed("10.0.0.1");
        assert!(q.join_allowed("10.0.0.1").is_err());
        q.join_allowed("10.0.0.2").unwrap();
    }

    #[test]
    fn a_tenant_queue_has_a_ceiling() {
        let q = Quota::new(limits());
        q.queue("t", 2, 1).unwrap();
        assert!(q.queue("t", 3, 1).is_err());
        assert!(q.queue("t", 0, 4).is_err());
    }
}
