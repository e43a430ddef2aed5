//! Three hubs in their own network namespaces (own addresses, fixed ports) on a private
//! bridge, bootstrapped from a static member list. iptables inside the leader's namespace
//! cuts it off from the other hubs: the majority elects a new leader and keeps serving, the
//! old leader commits nothing, and after healing the cluster converges. Needs root (CI and
//! the development machine run as root).

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use flotilla_common::{
    config::{HubFile, McpServerConfig, NodeFile, PeerFile},
    tls,
};
use flotilla_proto as pb;
use flotilla_tests::{
    flotilla_bin, record_call, result_text, submit_until_acknowledged, wait_done, wait_state,
    wait_status, wait_until, AdminServiceClient, Agent, AgentServiceClient, Bearer, Proc, READY,
};

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{:?} failed: {}",
        args,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A bridge and one namespace per hub, removed on drop.
struct Net {
    tag: String,
    hubs: usize,
}

impl Net {
    fn ns(&self, i: usize) -> String {
        format!("{}-h{i}", self.tag)
    }
    fn ip(&self, i: usize) -> String {
        format!("10.213.{}.{}", self.subnet(), i)
    }
    fn subnet(&self) -> u32 {
        std::process::id() % 200 + 20
    }
    fn bridge(&self) -> String {
        format!("{}br", self.tag)
    }

    fn create(hubs: usize) -> anyhow::Result<Self> {
        let net = Self {
            tag: format!("flt{}", std::process::id() % 100_000),
            hubs,
        };
        let br = net.bridge();
        sh(&["ip", "link", "add", &br, "type", "bridge"])?;
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("10.213.{}.254/24", net.subnet()),
            "dev",
            &br,
        ])?;
        sh(&["ip", "link", "set", &br, "up"])?;
        // Docker sets the FORWARD policy to DROP and has bridged traffic go through
        // iptables: let traffic cross our own bridge.
        sh(&[
            "iptables", "-I", "FORWARD", "-i", &br, "-o", &br, "-j", "ACCEPT",
        ])?;
        for i in 1..=hubs {
            let ns = net.ns(i);
            let host_if = format!("{}v{i}", net.tag);
            sh(&["ip", "netns", "add", &ns])?;
            sh(&[
                "ip", "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            sh(&["ip", "link", "set", &host_if, "master", &br, "up"])?;
            sh(&[
                "ip",
                "netns",
                "exec",
                &ns,
                "ip",
                "addr",
                "add",
                &format!("{}/24", net.ip(i)),
                "dev",
                "eth0",
            ])?;
            sh(&[
                "ip", "netns", "exec", &ns, "ip", "link", "set", "eth0", "up",
            ])?;
            sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    /// Drops all traffic between hub `i` and the other hubs (clients can still reach it).
    fn isolate(&self, i: usize) -> anyhow::Result<()> {
        let ns = self.ns(i);
        for j in (1..=self.hubs).filter(|j| *j != i) {
            let ip = self.ip(j);
            sh(&[
                "ip", "netns", "exec", &ns, "iptables", "-A", "INPUT", "-s", &ip, "-j", "DROP",
            ])?;
            sh(&[
                "ip", "netns", "exec", &ns, "iptables", "-A", "OUTPUT", "-d", &ip, "-j", "DROP",
            ])?;
        }
        Ok(())
    }

    fn heal(&self, i: usize) -> anyhow::Result<()> {
        sh(&["ip", "netns", "exec", &self.ns(i), "iptables", "-F"])
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for i in 1..=self.hubs {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(i)])
                .stderr(Stdio::null())
                .status();
            let host_if = format!("{}v{i}", self.tag);
            let _ = Command::new("ip")
                .args(["link", "del", &host_if])
                .stderr(Stdio::null())
                .status();
        }
        let br = self.bridge();
        let _ = Command::new("iptables")
            .args(["-D", "FORWARD", "-i", &br, "-o", &br, "-j", "ACCEPT"])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &br])
            .stderr(Stdio::null())
            .status();
    }
}

fn spawn_in(ns: &str, name: &str, args: &[&str], log: &Path) -> anyhow::Result<Proc> {
    let bin = flotilla_bin().display().to_string();
    let mut full = vec!["netns", "exec", ns, bin.as_str()];
    full.extend_from_slice(args);
    Proc::spawn_program("ip", name, &full, &[], log)
}

#[tokio::test]
async fn a_partitioned_leader_commits_nothing_and_the_majority_carries_on() -> anyhow::Result<()> {
    let net = Net::create(3)?;
    let dir = tempfile::Builder::new()
        .prefix("flotilla-partition-")
        .disable_cleanup(std::env::var_os("FLOTILLA_KEEP_TEST_DIRS").is_some())
        .tempdir()?;
    let pki = dir.path().join("pki");
    let ca = flotilla_common::pki::Ca::load_or_generate(&pki, "partition")?;
    let peers: Vec<PeerFile> = (1..=3)
        .map(|i| PeerFile {
            id: i as u64,
            api: format!("https://{}:7443", net.ip(i)),
            raft: format!("https://{}:7444", net.ip(i)),
        })
        .collect();
    // Every hub gets the same static member list and bootstraps from it.
    let mut hubs = BTreeMap::new();
    for i in 1..=3usize {
        let hub_dir = dir.path().join(format!("hub-{i}"));
        std::fs::create_dir_all(&hub_dir)?;
        let cfg = HubFile {
            id_from_hostname: false,
            id: i as u64,
            data_dir: hub_dir.clone(),
            listen: format!("{}:7443", net.ip(i)),
            advertise: None,
            raft_listen: format!("{}:7444", net.ip(i)),
            raft_advertise: None,
            http_listen: "127.0.0.1:0".into(),
            otlp_endpoint: None,
            http_advertise: None,
            http_tls_cert: None,
            http_tls_key: None,
            bootstrap: true,
            peers: peers.clone(),
            ca_cert: Some(pki.join("ca.pem")),
            ca_key: Some(pki.join("ca.key")),
            ca_trust: None,
            cluster_name: "partition".into(),
            tls_names: vec![],
            node_ttl_ms: flotilla_tests::NODE_TTL_MS,
            raft_heartbeat_ms: flotilla_common::config::defaults::RAFT_HEARTBEAT_MS,
            raft_election_timeout_ms: flotilla_common::config::defaults::RAFT_ELECTION_TIMEOUT_MS,
            snapshot_logs: flotilla_common::config::defaults::SNAPSHOT_LOGS,
            breaker_failures: flotilla_common::config::defaults::BREAKER_FAILURES,
            breaker_cooldown_ms: 2_000,
            storage_cache_mb: flotilla_common::config::defaults::STORAGE_CACHE_MB,
            retention_s: flotilla_common::config::defaults::RETENTION_S,
            retention_max_tasks: flotilla_common::config::defaults::RETENTION_MAX_TASKS,
            limits: Default::default(),
            audit: Default::default(),
            agent_tokens: Default::default(),
            // Its own nodes, started just above: their tools are usable at once.
            node_cert_lifetime_s: flotilla_common::config::defaults::NODE_CERT_LIFETIME_S,
            hub_cert_lifetime_s: flotilla_common::config::defaults::NODE_CERT_LIFETIME_S,
            trust_node_tools: true,
        };
        let toml_path = hub_dir.join("hub.toml");
        std::fs::write(&toml_path, toml::to_string(&cfg)?)?;
        let p = spawn_in(
            &net.ns(i),
            &format!("hub-{i}"),
            &["hub", "--config", toml_path.to_str().unwrap_or_default()],
            &hub_dir.join("hub.log"),
        )?;
        hubs.insert(i, (p, hub_dir));
    }
    let channel = |i: usize| -> anyhow::Result<tonic::transport::Channel> {
        Ok(tls::channel(
            &peers[i - 1].api,
            tls::client_config(ca.cert_pem(), None)?,
        )?)
    };
    // The first leader leaves an admin token in its data dir.
    let token = wait_until("an admin token from the first leader", READY, || {
        let t = hubs.values().find_map(|(_, d)| {
            std::fs::read_to_string(d.join("admin.token"))
                .ok()
                .filter(|t| !t.is_empty())
        });
        async move { t }
    })
    .await?;
    let admin = |i: usize| -> anyhow::Result<flotilla_tests::Admin> {
        Ok(AdminServiceClient::with_interceptor(
            channel(i)?,
            Bearer::new(&token),
        ))
    };
    let agent = |i: usize| -> anyhow::Result<Agent> {
        Ok(AgentServiceClient::with_interceptor(
            channel(i)?,
            Bearer::new(&token),
        ))
    };
    let status = wait_status(&admin(1)?, "a leader", |s| s.leader_id != 0).await?;
    assert_eq!(
        status.members.len(),
        3,
        "bootstrapped from the static member list"
    );
    let leader = status.leader_id as usize;

    // A node on the host, joined through any hub.
    let join = admin(1)?
        .create_join_token(pb::CreateJoinTokenRequest {
            ttl_seconds: 600,
            uses: 1,
            description: String::new(),
            may_add_tools: false,
        })
        .await?
        .into_inner()
        .token;
    let node_dir = dir.path().join("edge-1");
    std::fs::create_dir_all(&node_dir)?;
    let record = dir.path().join("edge-1.record");
    let node_cfg = NodeFile {
        name: "edge-1".into(),
        data_dir: node_dir.clone(),
        hub: peers[0].api.clone(),
        join_token: Some(join),
        labels: Default::default(),
        heartbeat_ms: 200,
        stop_grace_ms: 25_000,
        tenants: Vec::new(),
        cpu_high_water_percent: 0.0,
        http_listen: "127.0.0.1:0".into(),
        otlp_endpoint: None,
        http_advertise: None,
        http_tls_cert: None,
        http_tls_key: None,
        servers: vec![McpServerConfig {
            name: "demo".into(),
            command: flotilla_bin().display().to_string(),
            args: vec!["mcp-demo".into()],
            env: [(
                "FLOTILLA_DEMO_RECORD".to_string(),
                record.display().to_string(),
            )]
            .into_iter()
            .collect(),
            max_concurrency: 8,
            scope: "tools".into(),
        }],
    };
    let node_toml = node_dir.join("node.toml");
    std::fs::write(&node_toml, toml::to_string(&node_cfg)?)?;
    let _node = Proc::spawn(
        "edge-1",
        &["node", "--config", node_toml.to_str().unwrap_or_default()],
        &node_dir.join("node.log"),
    )?;
    let a1 = agent(1)?;
    let before = submit_until_acknowledged(&a1, record_call("before")).await?;
    let t = wait_state(&a1, &before, pb::TaskState::Succeeded).await?;
    assert_eq!(result_text(&t), "recorded before");

    // Cut the leader off from the other hubs.
    net.isolate(leader)?;
    let majority: Vec<usize> = (1..=3).filter(|i| *i != leader).collect();
    let new_status = wait_status(
        &admin(majority[0])?,
        "the majority to elect a new leader",
        |s| s.leader_id != 0 && s.leader_id as usize != leader,
    )
    .await?;
    let new_leader = new_status.leader_id as usize;
    assert!(majority.contains(&new_leader));

    // The majority keeps serving: calls through either majority hub complete.
    let mut ok = Vec::new();
    for (n, i) in majority.iter().cycle().take(6).enumerate() {
        let a = agent(*i)?;
        let key = format!("during-{n}");
        let id = submit_until_acknowledged(&a, record_call(&key)).await?;
        ok.push((key, id, *i));
    }
    // The old leader serves no writes: a submission through it is refused, not acknowledged.
    let mut old = agent(leader)?;
    let refused = tokio::time::timeout(
        Duration::from_secs(30),
        old.submit_task(record_call("to-old-leader")),
    )
    .await?;
    let e = refused.expect_err("the isolated hub must not acknowledge a write");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{}", e.message());

    // Heal: the cluster converges on one leader and one history.
    net.heal(leader)?;
    wait_status(&admin(leader)?, "the old leader to follow", |s| {
        s.leader_id != 0 && s.leader_id as usize != leader && s.members.iter().all(|m| m.lag == 0)
    })
    .await?;
    for (key, id, _) in &ok {
        // Every call made during the partition finishes.
        let t = wait_done(&a1, id).await?;
        assert_eq!(t.state, pb::TaskState::Succeeded as i32, "{key}: {t:?}");
        assert_eq!(result_text(&t), format!("recorded {key}"));
        // The same answer from the old leader once healed.
        let mut o = agent(leader)?;
        let seen = o
            .get_task(pb::GetTaskRequest {
                task_id: id.clone(),
            })
            .await?
            .into_inner();
        assert_eq!(seen.state, t.state);
    }
    let lines = std::fs::read_to_string(&record)?;
    assert!(
        !lines.lines().any(|l| l == "to-old-leader"),
        "the refused write never ran"
    );
    // Stop the hubs before the namespaces go away.
    drop(hubs);
    Ok(())
}
