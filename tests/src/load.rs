//! Load: agents submitting calls without pause while a test breaks things, and the check
//! that every acknowledged call ran exactly once.

use std::{collections::BTreeMap, path::Path, time::Duration};

use flotilla_proto as pb;

use crate::{record_call, result_text, wait_until, Agent, Cluster, READY};

/// Agents submitting `record` calls continuously, spread over every hub; on a failure
/// they retry the same idempotency key on the next hub, as a client behind a load balancer
/// would. `stop()` returns every acknowledged key with its task id.
pub struct Load {
    stop: tokio::sync::watch::Sender<bool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
    pub acked: std::sync::Arc<std::sync::Mutex<BTreeMap<String, String>>>,
}

impl Load {
    pub fn start(c: &Cluster, workers: usize) -> Self {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let acked: std::sync::Arc<std::sync::Mutex<BTreeMap<String, String>>> = Default::default();
        let handles = (0..workers)
            .map(|w| {
                let agents: Vec<Agent> = c
                    .hubs
                    .iter()
                    .map(|h| c.agent_at(h.id, &c.admin_token))
                    .collect();
                let acked = acked.clone();
                let rx = rx.clone();
                tokio::spawn(async move {
                    let mut hub = w;
                    let mut n = 0u64;
                    while !*rx.borrow() {
                        let key = format!("w{w}-{n}");
                        let req = record_call(&key);
                        let mut tries = 0;
                        loop {
                            let mut a = agents[hub % agents.len()].clone();
                            match tokio::time::timeout(
                                Duration::from_secs(10),
                                a.submit_task(req.clone()),
                            )
                            .await
                            {
                                Ok(Ok(r)) => {
                                    acked
                                        .lock()
                                        .expect("acked")
                                        .insert(key.clone(), r.into_inner().task_id);
                                    break;
                                }
                                _ => {
                                    tries += 1;
                                    hub += 1;
                                    assert!(tries < 600, "submission {key} never succeeded");
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                            }
                        }
                        n += 1;
                    }
                })
            })
            .collect();
        Self {
            stop,
            workers: handles,
            acked,
        }
    }

    pub fn count(&self) -> usize {
        self.acked.lock().expect("acked").len()
    }

    /// Waits until `more` further submissions were acknowledged.
    pub async fn wait_more(&self, more: usize) -> anyhow::Result<()> {
        let target = self.count() + more;
        wait_until(
            &format!("{more} more acknowledged submissions"),
            READY,
            || {
                let n = self.count();
                async move { (n >= target).then_some(()) }
            },
        )
        .await
    }

    pub async fn stop(self) -> anyhow::Result<BTreeMap<String, String>> {
        let _ = self.stop.send(true);
        for w in self.workers {
            w.await?;
        }
        let acked = self.acked.lock().expect("acked").clone();
        Ok(acked)
    }
}

/// The core invariant: every acknowledged task succeeded exactly once, with the result of
/// the call that ran, and the tool's own record shows every one of them ran.
pub async fn check_every_acknowledged_task_ran_once(
    c: &Cluster,
    hub: u64,
    acked: &BTreeMap<String, String>,
    record: &Path,
) -> anyhow::Result<()> {
    let ids: std::collections::BTreeSet<&String> = acked.values().collect();
    anyhow::ensure!(
        ids.len() == acked.len(),
        "idempotency keys map to distinct tasks"
    );
    let mut agent = c.agent_at(hub, &c.admin_token);
    for (key, id) in acked {
        let t = c.wait_task(&mut agent, id).await?;
        anyhow::ensure!(t.state == pb::TaskState::Succeeded as i32, "{key}: {t:?}");
        anyhow::ensure!(
            result_text(&t) == format!("recorded {key}"),
            "{key}: {}",
            result_text(&t)
        );
        let produced = t
            .attempts
            .iter()
            .filter(|a| a.finished_at_ms != 0 && a.error.is_empty())
            .count();
        anyhow::ensure!(
            produced == 1,
            "{key}: exactly one attempt produced the result: {:?}",
            t.attempts
        );
    }
    let lines = std::fs::read_to_string(record)?;
    let ran: std::collections::BTreeSet<&str> = lines.lines().collect();
    for key in acked.keys() {
        anyhow::ensure!(
            ran.contains(key.as_str()),
            "acknowledged task {key} never ran"
        );
    }
    Ok(())
}
