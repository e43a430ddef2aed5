//! Credentials with an end, as an operator uses them after a machine or a token was lost:
//! a removed node's certificate is refused by every hub and its work runs elsewhere; revoked
//! join and agent tokens are refused; rotated signing keys keep old tokens working until
//! they retire (or not at all, for a key that leaked); a token that lives longer than the
//! cluster allows is refused. Revocations go through the `flotilla` CLI, as operators type
//! them.

use std::{process::Command, time::Instant};

use base64::Engine as _;
use flotilla_common::{pki, tls};
use flotilla_proto as pb;
use flotilla_tests::{
    flotilla_bin, http_get, wait_done, wait_state, wait_until, Cluster, NodeSpec, READY,
};
use pb::{agent_service_client::AgentServiceClient, node_service_client::NodeServiceClient};
use tonic::Code;

/// Runs the CLI against `c` as an admin; its standard output, or an error with its stderr.
fn cli(c: &Cluster, args: &[&str]) -> anyhow::Result<String> {
    cli_as(c, &c.admin_token, args)
}

fn cli_as(c: &Cluster, token: &str, args: &[&str]) -> anyhow::Result<String> {
    cli_at(c, &c.hub_addr, token, args)
}

fn cli_at(c: &Cluster, hub: &str, token: &str, args: &[&str]) -> anyhow::Result<String> {
    run_cli(c, hub, token, None, args)
}

/// Runs the CLI against `hub` as `token`, presenting the client certificate `cert` (a
/// `NAME.pem` beside its `NAME.key`) when given.
fn run_cli(
    c: &Cluster,
    hub: &str,
    token: &str,
    cert: Option<&std::path::Path>,
    args: &[&str],
) -> anyhow::Result<String> {
    let ca = c.dir.path().join("pki/ca.pem");
    let mut cmd = Command::new(flotilla_bin());
    cmd.args(args)
        .env("FLOTILLA_HUB", hub)
        .env("FLOTILLA_CA", &ca)
        .env("FLOTILLA_TOKEN", token)
        .env_remove("FLOTILLA_CONFIG");
    if let Some(cert) = cert {
        cmd.env("FLOTILLA_CERT", cert)
            .env("FLOTILLA_KEY", cert.with_extension("key"));
    }
    let o = cmd.output()?;
    anyhow::ensure!(
        o.status.success(),
        "flotilla {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8(o.stdout)?)
}

fn json(text: &str) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(text)?)
}

/// A claim of a JWT, read without verifying it (the test's own token).
fn claim(token: &str, name: &str) -> String {
    let part = |i: usize| {
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').nth(i).expect("three parts"))
            .expect("base64url");
        serde_json::from_slice::<serde_json::Value>(&b).expect("json")
    };
    let from = if name == "kid" { part(0) } else { part(1) };
    from[name].as_str().map(str::to_owned).unwrap_or_default()
}

/// What a hub answers a call made with `token`: Ok, or the gRPC code and message.
async fn answer(c: &Cluster, hub: u64, token: &str) -> Result<(), (Code, String)> {
    let mut agent = c.agent_at(hub, token);
    agent
        .list_tools(pb::ListToolsRequest::default())
        .await
        .map(|_| ())
        .map_err(|s| (s.code(), s.message().to_owned()))
}

async fn issue(c: &Cluster, subject: &str, ttl_seconds: u64) -> anyhow::Result<String> {
    Ok(c.admin()
        .issue_agent_token(pb::IssueAgentTokenRequest {
            subject: subject.into(),
            tenant: "t".into(),
            scopes: vec!["tools".into()],
            ttl_seconds,
            ..Default::default()
        })
        .await?
        .into_inner()
        .token)
}

/// Opens a node session on `api` with `key` and sends nothing: a hub that accepts the
/// certificate says the hello is missing (or, not leading, that it is not the leader); one
/// that refuses it says so first.
async fn session_code(c: &Cluster, api: &str, key: &pki::CertifiedKey) -> anyhow::Result<Code> {
    let ch = tls::channel(api, tls::client_config(&c.ca_pem, Some(key))?)?;
    let r = NodeServiceClient::new(ch)
        .session(tokio_stream::iter(Vec::<pb::NodeMessage>::new()))
        .await;
    Ok(match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    })
}

fn last_node(t: &pb::Task) -> &str {
    t.attempts.last().map_or("", |a| a.node_id.as_str())
}

#[tokio::test]
async fn a_removed_node_is_refused_by_every_hub_and_its_work_runs_elsewhere() -> anyhow::Result<()>
{
    let mut c = Cluster::with_hubs(3).await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    c.add_node(NodeSpec::demo("edge-2")).await?;
    let old_key = pki::CertifiedKey::read(&c.node_dir("edge-1").join("identity"), "node")?
        .expect("edge-1 keeps its certificate");
    for h in 1..=3 {
        let code = session_code(&c, &c.hub(h).api.clone(), &old_key).await?;
        // The leader takes it and waits for a hello; a follower sends it to the leader.
        assert!(
            matches!(code, Code::InvalidArgument | Code::Unavailable),
            "hub {h} accepts edge-1 while it is in: {code:?}"
        );
    }

    // A long call running on edge-1 (edge-2 cordoned while it is placed).
    cli(&c, &["nodes", "cordon", "edge-2"])?;
    let agent = c.agent();
    let id = agent
        .clone()
        .submit_task(flotilla_tests::submit(
            "sleep",
            serde_json::json!({"ms": 4000, "steps": 4}),
        ))
        .await?
        .into_inner()
        .task_id;
    let running = wait_state(&agent, &id, pb::TaskState::Running).await?;
    assert_eq!(last_node(&running), "edge-1");
    cli(&c, &["nodes", "uncordon", "edge-2"])?;

    let removed_at = Instant::now();
    let out = json(&cli(&c, &["nodes", "remove", "edge-1", "-o", "json"])?)?;
    assert_eq!(out["requeued"], serde_json::json!([id]), "{out}");

    // Every hub refuses edge-1's certificate from now on.
    for h in 1..=3 {
        let api = c.hub(h).api.clone();
        wait_until(&format!("hub {h} to refuse edge-1"), READY, || {
            let (c, api, key) = (&c, api.clone(), &old_key);
            async move {
                (session_code(c, &api, key).await.ok()? == Code::PermissionDenied).then_some(())
            }
        })
        .await?;
    }
    println!(
        "every hub refused the removed node's certificate {} ms after `nodes remove` returned",
        removed_at.elapsed().as_millis()
    );
    // Its call ran again on edge-2 and succeeded; edge-1 is gone from the list.
    let done = wait_done(&agent, &id).await?;
    assert_eq!(done.state(), pb::TaskState::Succeeded, "{done:?}");
    assert_eq!(last_node(&done), "edge-2");
    let listed = json(&cli(&c, &["nodes", "-o", "json"])?)?;
    let names: Vec<&str> = listed
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    assert_eq!(names, vec!["edge-2"]);
    let log = c.nodes["edge-1"].log_text();
    assert!(
        log.contains("no longer accepted") || log.contains("not registered"),
        "the removed node is told why"
    );

    // It comes back only by joining again: a new certificate, and the old one still refused.
    drop(c.nodes.remove("edge-1"));
    std::fs::remove_dir_all(c.node_dir("edge-1").join("identity"))?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let leader = c.wait_leader().await?;
    let leader_api = c.hub(leader).api.clone();
    assert_eq!(
        session_code(&c, &leader_api, &old_key).await?,
        Code::PermissionDenied
    );
    Ok(())
}

#[tokio::test]
async fn revoked_join_and_agent_tokens_are_refused() -> anyhow::Result<()> {
    let c = Cluster::start().await?;

    // Join tokens: listed without their secrets, refused once revoked.
    let token = cli(&c, &["token", "create", "--description", "for the lab"])?;
    let token = token.trim();
    let id = flotilla_common::token::JoinToken::parse(token)?.id;
    let listed = json(&cli(&c, &["token", "list", "-o", "json"])?)?;
    let entry = listed
        .as_array()
        .expect("a list")
        .iter()
        .find(|t| t["token_id"] == id.as_str())
        .expect("the new token is listed")
        .clone();
    assert_eq!(entry["created_by"], "admin");
    assert_eq!(entry["description"], "for the lab");
    assert!(!listed.to_string().contains(token), "never the secret");
    cli(&c, &["token", "revoke", &id])?;
    let listed = json(&cli(&c, &["token", "list", "-o", "json"])?)?;
    assert!(listed.to_string().contains("revoked_at"));
    let parsed = flotilla_common::token::JoinToken::parse(token)?;
    let (_key, csr) = pki::node_key_and_csr("late-node")?;
    let ch = tls::channel(&c.hub_addr, tls::client_config(&c.ca_pem, None)?)?;
    let refused = NodeServiceClient::new(ch)
        .join(pb::JoinRequest {
            token_id: parsed.id.clone(),
            token_secret: parsed.secret.clone(),
            name: "late-node".into(),
            csr_pem: csr,
        })
        .await
        .expect_err("a revoked join token admits no node");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // Agent tokens: one by its jti, then every token of a subject issued so far.
    let a1 = issue(&c, "alice", 600).await?;
    let a2 = issue(&c, "alice", 600).await?;
    let bob = issue(&c, "bob", 600).await?;
    for t in [&a1, &a2, &bob] {
        assert_eq!(answer(&c, 1, t).await, Ok(()));
    }
    cli(&c, &["agent-token", "revoke", "--jti", &claim(&a1, "jti")])?;
    let (code, msg) = answer(&c, 1, &a1).await.expect_err("revoked by jti");
    assert_eq!(code, Code::Unauthenticated);
    assert!(msg.contains("revoked"), "{msg}");
    assert_eq!(answer(&c, 1, &a2).await, Ok(()), "only that token");
    // A subject's revocation covers the tokens issued before it.
    cli(&c, &["agent-token", "revoke", "--subject", "alice"])?;
    let (code, msg) = answer(&c, 1, &a2)
        .await
        .expect_err("revoked with its subject");
    assert_eq!(code, Code::Unauthenticated);
    assert!(msg.contains("alice"), "{msg}");
    assert_eq!(
        answer(&c, 1, &bob).await,
        Ok(()),
        "another subject is untouched"
    );
    // Tokens issued to alice later work (once past the hubs' clock leeway, 5 s).
    wait_until(
        "a token issued to alice after the revocation to work",
        READY,
        || async {
            let t = issue(&c, "alice", 600).await.ok()?;
            answer(&c, 1, &t).await.ok()
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn rotated_keys_keep_old_tokens_until_they_retire_and_a_leaked_key_retires_at_once(
) -> anyhow::Result<()> {
    let mut c = Cluster::with_hubs(3).await?;
    let old = issue(&c, "alice", 600).await?;
    let old_kid = claim(&old, "kid");
    let rotated = json(&cli(&c, &["keys", "rotate", "-o", "json"])?)?;
    let new_kid = rotated["kid"].as_str().expect("kid").to_owned();
    assert_ne!(new_kid, old_kid);

    // New tokens use the new key; the old token still works, on every hub.
    let new = issue(&c, "alice", 600).await?;
    assert_eq!(claim(&new, "kid"), new_kid);
    for h in 1..=3 {
        for t in [&old, &new] {
            let hub_has_it = || async { answer(&c, h, t).await.ok() };
            wait_until(&format!("hub {h} to accept both tokens"), READY, hub_has_it).await?;
        }
    }
    let keys = json(&cli(&c, &["keys", "list", "-o", "json"])?)?;
    let keys = keys.as_array().expect("a list");
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0]["kid"], new_kid.as_str());
    assert_eq!(keys[0]["active"], true);
    assert!(
        keys[1]["retire_at"].is_string(),
        "the old key says when it retires"
    );

    // The hubs publish both public keys.
    let (status, body) = http_get(&c.hub(2).http()?, "/.well-known/jwks.json").await?;
    assert_eq!(status, 200);
    let jwks = json(&body)?;
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["kid"].as_str())
        .collect();
    assert!(
        kids.contains(&old_kid.as_str()) && kids.contains(&new_kid.as_str()),
        "{jwks}"
    );
    assert!(
        !body.contains("PRIVATE") && !body.contains("\"d\""),
        "public halves only"
    );

    // A key that leaked: rotated out at once, every token it and its predecessors signed is
    // refused (the admin token in the hubs' data dirs too: each hub writes a new one).
    cli(&c, &["keys", "rotate", "--retire-now"])?;
    for h in 1..=3 {
        for t in [&old, &new] {
            let refused = || async {
                matches!(answer(&c, h, t).await, Err((Code::Unauthenticated, _))).then_some(())
            };
            wait_until(
                &format!("hub {h} to refuse the retired key's tokens"),
                READY,
                refused,
            )
            .await?;
        }
    }
    let stale_admin = c.admin_token.clone();
    let file = c.hub(1).dir.join("admin.token");
    let fresh = wait_until("hub 1 to write a new admin token", READY, || {
        let t = std::fs::read_to_string(&file)
            .ok()
            .filter(|t| t.trim() != stale_admin);
        async move { t }
    })
    .await?;
    c.admin_token = fresh.trim().to_owned();
    assert_eq!(answer(&c, 1, &c.admin_token).await, Ok(()));
    let newest = issue(&c, "alice", 600).await?;
    assert_eq!(answer(&c, 3, &newest).await.map_err(|e| e.1), Ok(()));
    Ok(())
}

#[tokio::test]
async fn a_token_that_lives_longer_than_the_cluster_allows_is_refused() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    let long = issue(&c, "alice", 48 * 3600).await?;
    assert_eq!(answer(&c, 1, &long).await, Ok(()));

    // The operator tightens the policy to a day at most.
    let path = c.hub(1).dir.join("hub.toml");
    let mut cfg: toml::Table = toml::from_str(&std::fs::read_to_string(&path)?)?;
    let mut limits = toml::Table::new();
    limits.insert("max_lifetime_hours".into(), 24.into());
    limits.insert("bootstrap_admin_hours".into(), 12.into());
    cfg.insert("agent_tokens".into(), toml::Value::Table(limits));
    std::fs::write(&path, toml::to_string(&cfg)?)?;
    c.restart_hub(false).await?;

    let (code, msg) = answer(&c, 1, &long).await.expect_err("longer than a day");
    assert_eq!(code, Code::Unauthenticated);
    assert!(msg.contains("longer than this cluster allows"), "{msg}");
    let refused = c
        .admin()
        .issue_agent_token(pb::IssueAgentTokenRequest {
            subject: "alice".into(),
            ttl_seconds: 48 * 3600,
            ..Default::default()
        })
        .await
        .expect_err("no token longer than the limit is issued");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("max_lifetime_hours"));
    let day = issue(&c, "alice", 20 * 3600).await?;
    assert_eq!(answer(&c, 1, &day).await, Ok(()));

    // A JWT with no lifetime limit from elsewhere: unknown key, refused as such.
    let mut agent = AgentServiceClient::new(c.channel());
    let mut req = tonic::Request::new(pb::ListToolsRequest::default());
    req.metadata_mut()
        .insert("authorization", "Bearer e30.e30.sig".parse()?);
    let e = agent
        .list_tools(req)
        .await
        .expect_err("not a token of ours");
    assert_eq!(e.code(), Code::Unauthenticated);
    Ok(())
}

#[tokio::test]
async fn a_node_renews_its_certificate_while_a_call_runs_and_the_call_completes(
) -> anyhow::Result<()> {
    // Certificates of a minute (66 s with their backdating): the node renews at two thirds.
    let opts = flotilla_tests::Options {
        node_cert_lifetime_s: 60,
        ..Default::default()
    };
    let mut c = Cluster::with_options(1, opts).await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let identity = c.node_dir("edge-1").join("identity");
    let first = pki::CertifiedKey::read(&identity, "node")?.expect("joined");
    let first_id = pki::pem_identity(&first.cert_pem).expect("a certificate");
    let (from, to) = pki::pem_validity(&first.cert_pem).expect("validity");
    assert_eq!(to - from, 66);

    // A call that runs across the renewal (due about 38 s after joining).
    let agent = c.agent();
    let id = agent
        .clone()
        .submit_task(flotilla_tests::submit(
            "sleep",
            serde_json::json!({"ms": 50_000, "steps": 50}),
        ))
        .await?
        .into_inner()
        .task_id;
    wait_state(&agent, &id, pb::TaskState::Running).await?;
    let renewed = wait_until(
        "edge-1 to renew its certificate",
        std::time::Duration::from_secs(120),
        || {
            let got = pki::CertifiedKey::read(&identity, "node")
                .ok()
                .flatten()
                .filter(|k| k.cert_pem != first.cert_pem);
            async move { got }
        },
    )
    .await?;
    let renewed_id = pki::pem_identity(&renewed.cert_pem).expect("a certificate");
    assert_eq!(renewed_id.common_name, "edge-1");
    assert_ne!(renewed_id.serial, first_id.serial);
    assert_ne!(renewed.key_pem, first.key_pem, "a new key");
    let (_, renewed_to) = pki::pem_validity(&renewed.cert_pem).expect("validity");
    assert!(renewed_to > to);
    // Both the certificate it presented and the new one open a session (the leader takes
    // them and waits for the hello this probe never sends).
    let api = c.hub(1).api.clone();
    for key in [&first, &renewed] {
        assert_eq!(session_code(&c, &api, key).await?, Code::InvalidArgument);
    }
    let task = agent
        .clone()
        .get_task(pb::GetTaskRequest {
            task_id: id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(
        task.state(),
        pb::TaskState::Running,
        "renewed while the call ran"
    );

    // The call completes on its first attempt: the session was never dropped.
    let done = wait_done(&agent, &id).await?;
    assert_eq!(done.state(), pb::TaskState::Succeeded, "{done:?}");
    assert_eq!(done.attempts.len(), 1, "{done:?}");
    let log = c.nodes["edge-1"].log_text();
    assert!(log.contains("renewed the node's certificate"));
    assert!(
        !log.contains("session with the hub ended"),
        "the session went on"
    );

    // The next connection (a restart) uses the new certificate.
    drop(c.nodes.remove("edge-1"));
    let spec = NodeSpec::demo("edge-1");
    let path = c.write_node_config(&spec).await?;
    let proc = flotilla_tests::Proc::spawn(
        "edge-1",
        &["node", "--config", path.to_str().unwrap_or_default()],
        &c.node_dir("edge-1").join("node-2.log"),
    )?;
    c.nodes.insert("edge-1".into(), proc);
    c.wait_node_connected("edge-1").await?;
    let t = c
        .call(
            &mut c.agent(),
            "echo",
            serde_json::json!({"text": "renewed"}),
        )
        .await?;
    assert_eq!(flotilla_tests::result_text(&t), "renewed");
    Ok(())
}

#[tokio::test]
async fn the_audit_trail_shows_refusals_and_admin_actions_on_every_hub_after_a_failover(
) -> anyhow::Result<()> {
    let mut c = Cluster::with_hubs(3).await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    // Refused: a forged token on hub 2, a tools-only token asking for the admin API on hub 3.
    let forged = "eyJhbGciOiJFUzI1NiIsImtpZCI6Im5vcGUifQ.eyJzdWIiOiJtYWxsb3J5In0.c2ln";
    assert!(answer(&c, 2, forged).await.is_err());
    let reader = c.agent_token("reader", "t", &["tools"]).await?;
    let admin_as_reader = cli_at(&c, &c.hub(3).api.clone(), &reader, &["nodes"]);
    assert!(admin_as_reader.is_err(), "a tools token may not list nodes");
    // A tool call: its submission, assignment and result are in the trail, its arguments
    // and result are not.
    let caller = c.agent_token("caller", "t", &["tools"]).await?;
    let call = c
        .call(
            &mut c.agent_with(&caller),
            "echo",
            serde_json::json!({"text": "s3cret-argument"}),
        )
        .await?;
    assert_eq!(call.state, pb::TaskState::Succeeded as i32, "{call:?}");
    // A call the token's scopes do not cover is refused, and the trail says so (asked of
    // hub 2, like the forged token: a hub keeps what it saw for up to a second before it
    // commits it, and the leader is killed below).
    let nobody = c.agent_token("nobody", "t", &["billing"]).await?;
    let refused = c
        .agent_at(2, &nobody)
        .submit_task(pb::SubmitTaskRequest {
            tool: "echo".into(),
            arguments: serde_json::to_vec(&serde_json::json!({"text": "no"}))?,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    // Admin actions.
    let join = cli(&c, &["token", "create", "--description", "audit"])?;
    let join_id = flotilla_common::token::JoinToken::parse(join.trim())?.id;
    cli(&c, &["token", "revoke", &join_id])?;
    cli(&c, &["nodes", "cordon", "edge-1"])?;
    cli(&c, &["agent-token", "revoke", "--subject", "reader"])?;
    let rotated = json(&cli(&c, &["keys", "rotate", "-o", "json"])?)?;
    let kid = rotated["kid"].as_str().expect("kid").to_owned();

    // The leader dies; the others still tell the whole story.
    let leader = c.wait_leader().await?;
    c.kill_hub(leader);
    let survivors: Vec<u64> = (1..=3).filter(|h| *h != leader).collect();
    c.hub_addr = c.hub(survivors[0]).api.clone();
    c.wait_leader().await?;
    let wanted = |r: &serde_json::Value| -> Option<&'static str> {
        let (kind, actor, target, outcome) = (
            r["kind"].as_str()?,
            r["actor"].as_str()?,
            r["target"].as_str()?,
            r["outcome"].as_str()?,
        );
        Some(match (kind, actor) {
            ("denied", "unauthenticated") if target == "agent token" => "forged token refused",
            ("denied", "reader") if outcome == "missing_scope" => "reader refused the admin API",
            ("join", "node edge-1") if outcome == "ok" => "edge-1 joined",
            ("create_join_token", "admin") if target == join_id => "join token made",
            ("revoke_join_token", "admin") if target == join_id => "join token revoked",
            ("cordon_node", "admin") if target == "edge-1" => "edge-1 cordoned",
            ("revoke_agent_tokens", "admin") if target == "subject reader" => "reader revoked",
            ("rotate_signing_key", "admin") if target == kid => "key rotated",
            ("denied", "nobody") if target == "tool echo" && outcome == "missing_scope" => {
                "a call without its scope refused"
            }
            _ => return None,
        })
    };
    for h in survivors {
        let api = c.hub(h).api.clone();
        let story = |out: &str| -> std::collections::BTreeSet<&'static str> {
            out.lines()
                .filter_map(|line| serde_json::from_str(line).ok())
                .filter_map(|r| wanted(&r))
                .collect()
        };
        let deadline = Instant::now() + READY;
        let seen = loop {
            let out = cli_at(&c, &api, &c.admin_token, &["audit", "-o", "json"])?;
            let seen = story(&out);
            if seen.len() == 9 {
                break seen;
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = (1..=3)
                    .map(|i| {
                        c.hub(i)
                            .proc
                            .log_text()
                            .lines()
                            .filter(|l| l.contains("audit") || l.contains("rejected"))
                            .map(str::to_owned)
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .collect();
                let addrs: Vec<String> = (1..=3)
                    .map(|i| format!("hub {i}: api {} raft {}", c.hub(i).api, c.hub(i).raft))
                    .collect();
                panic!("hub {h} shows only {seen:?} of the story:\n{out}\n{logs:#?}\n{addrs:?} leader was {leader}");
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        assert_eq!(seen.len(), 9, "{seen:?}");
        let all = cli_at(&c, &api, &c.admin_token, &["audit", "-o", "json"])?;
        assert!(!all.contains(join.trim()), "never a join token's secret");
        assert!(
            !all.contains(&reader) && !all.contains(forged),
            "never a token"
        );
        // Filters.
        let denials = cli_at(
            &c,
            &api,
            &c.admin_token,
            &["audit", "--kind", "denied", "-o", "json"],
        )?;
        assert!(denials.lines().count() >= 2);
        assert!(denials.lines().all(|l| l.contains("\"kind\":\"denied\"")));
        let table = cli_at(
            &c,
            &api,
            &c.admin_token,
            &["audit", "--actor", "admin", "--since", "1h"],
        )?;
        assert!(table.contains("rotate_signing_key") && !table.contains("denied"));
        // The tool call, read from the task history on this hub.
        let calls = cli_at(
            &c,
            &api,
            &c.admin_token,
            &["audit", "--tenant", "t", "-o", "json"],
        )?;
        let calls: Vec<(String, String, String, String)> = calls
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| r["target"].as_str().unwrap_or("").contains(&call.id))
            .map(|r| {
                let f = |k: &str| r[k].as_str().unwrap_or("").to_owned();
                (f("kind"), f("actor"), f("outcome"), f("target"))
            })
            .collect();
        let kinds: Vec<(&str, &str, &str)> = calls
            .iter()
            .map(|(k, a, o, _)| (k.as_str(), a.as_str(), o.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("submit", "caller", "ok"),
                ("assign", "scheduler", "ok"),
                ("result", "node edge-1", "succeeded")
            ],
            "{calls:?}"
        );
        assert!(calls[1].3.contains("to node edge-1"), "{calls:?}");
        assert!(!all.contains("s3cret-argument"), "never a call's data");
        let without = cli_at(
            &c,
            &api,
            &c.admin_token,
            &["audit", "--no-calls", "-o", "json"],
        )?;
        assert!(!without.contains(&call.id), "{without}");
    }
    Ok(())
}

/// The trail's own records are kept as hub.toml's `[audit]` says: the newest
/// `max_records` of each kind, none older than `retention_s`, the same on every hub.
#[tokio::test]
async fn the_audit_trail_keeps_what_hub_toml_says() -> anyhow::Result<()> {
    let mut opts = flotilla_tests::Options::default();
    opts.audit.max_records = 3;
    let mut c = Cluster::with_options(2, opts).await?;
    // Hub 2's addition is recorded within a second, by the hub that added it.
    let api = c.hub(1).api.clone();
    wait_until("hub 2's addition in the trail", READY, || async {
        let records = audit_actions(&c, &api)?;
        records.iter().any(|r| r["kind"] == "add_hub").then_some(())
    })
    .await?;
    let mut made = Vec::new();
    for _ in 0..5 {
        let token = c.join_token().await?;
        made.push(flotilla_common::token::JoinToken::parse(&token)?.id);
    }
    for h in [1, 2] {
        let api = c.hub(h).api.clone();
        let kept = wait_until("the newest three actions", READY, || async {
            let records = audit_actions(&c, &api)?;
            (records.len() == 3).then_some(records)
        })
        .await?;
        let targets: Vec<&str> = kept.iter().filter_map(|r| r["target"].as_str()).collect();
        assert_eq!(targets, made[2..], "hub {h}: {kept:?}");
    }
    // A retention of a second: they all leave (on every hub, from the new leader's cut).
    for h in [1, 2] {
        let toml_path = c.hub(h).dir.join("hub.toml");
        let mut cfg: flotilla_common::config::HubFile =
            toml::from_str(&std::fs::read_to_string(&toml_path)?)?;
        cfg.audit.retention_s = 1;
        std::fs::write(&toml_path, toml::to_string(&cfg)?)?;
        c.hub_mut(h).proc.terminate();
        c.start_hub(h).await?;
    }
    c.wait_leader().await?;
    for h in [1, 2] {
        let api = c.hub(h).api.clone();
        wait_until("the old actions to leave", READY, || async {
            let records = audit_actions(&c, &api)?;
            let old = records
                .iter()
                .any(|r| made.iter().any(|id| r["target"] == id.as_str()));
            (!old).then_some(())
        })
        .await?;
    }
    Ok(())
}

/// The audit trail's records on the hub at `api`, but refusals and tool calls.
fn audit_actions(c: &Cluster, api: &str) -> Option<Vec<serde_json::Value>> {
    let out = cli_at(
        c,
        api,
        &c.admin_token,
        &["audit", "--no-calls", "-o", "json"],
    )
    .ok()?;
    Some(
        out.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| r["kind"] != "denied")
            .collect(),
    )
}

/// A company identity provider: its key, and tokens it signs for `audience`.
struct Provider {
    iss: &'static str,
    key: flotilla_common::jwt::SigningKey,
}

impl Provider {
    fn new(iss: &'static str) -> anyhow::Result<Self> {
        Ok(Self {
            iss,
            key: flotilla_common::jwt::SigningKey::generate(0)?,
        })
    }

    fn jwks(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::json!({ "keys": [self.key.jwk()?] }))
    }

    /// A token for `sub` in `tenant` holding `scopes`, as the provider issues them.
    fn token(&self, sub: &str, tenant: &str, scopes: &[&str]) -> anyhow::Result<String> {
        let now = flotilla_common::now_ms() / 1000;
        let claims = flotilla_common::jwt::Claims {
            iss: self.iss.into(),
            aud: "flotilla-test".into(),
            sub: sub.into(),
            tenant: tenant.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            iat: now,
            exp: now + 600,
            jti: format!("{sub}-{now}"),
            ..Default::default()
        };
        Ok(flotilla_common::jwt::sign(&self.key, &claims)?)
    }
}

/// A provider's JWKS served over HTTP on a loopback port, replaceable while it runs; the
/// count of fetches shows when the hub asked.
async fn serve_jwks(
    doc: serde_json::Value,
) -> anyhow::Result<(
    String,
    std::sync::Arc<std::sync::Mutex<serde_json::Value>>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
)> {
    use std::sync::{atomic::AtomicUsize, Arc, Mutex};
    let served = Arc::new(Mutex::new(doc));
    let fetches = Arc::new(AtomicUsize::new(0));
    let (s, n) = (served.clone(), fetches.clone());
    let app = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            let (s, n) = (s.clone(), n.clone());
            async move {
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                axum::Json(s.lock().expect("jwks").clone())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/jwks", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, served, fetches))
}

#[tokio::test]
async fn an_external_issuers_token_works_and_one_from_an_untrusted_issuer_does_not(
) -> anyhow::Result<()> {
    // Two providers: one publishing its keys in a file, one at a URL.
    let corp = Provider::new("https://idp.corp.example")?;
    let sso = Provider::new("https://sso.corp.example")?;
    let keys_dir = tempfile::tempdir()?;
    let jwks_file = keys_dir.path().join("corp.jwks.json");
    std::fs::write(&jwks_file, corp.jwks()?.to_string())?;
    let (url, served, fetches) = serve_jwks(sso.jwks()?).await?;
    let issuer = |iss: &str, source: (&str, String)| -> anyhow::Result<_> {
        Ok(serde_json::from_value::<
            flotilla_common::config::ExternalIssuer,
        >(serde_json::json!({
            "issuer": iss,
            "audience": "flotilla-test",
            source.0: source.1,
            "scopes_claim": "scopes",
        }))?)
    };
    let mut opts = flotilla_tests::Options::default();
    opts.agent_tokens.issuers = vec![
        issuer(corp.iss, ("jwks_file", jwks_file.display().to_string()))?,
        issuer(sso.iss, ("jwks_url", url))?,
    ];
    let mut c = Cluster::with_options(1, opts).await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;

    // The provider's token calls a tool, in the tenant its claim names; `admin` is not
    // granted by a provider unless hub.toml lists it.
    let alice = corp.token("alice@corp", "payments", &["tools", "admin"])?;
    let mut agent = c.agent_with(&alice);
    let t = c
        .call(
            &mut agent,
            "echo",
            serde_json::json!({"text": "from the idp"}),
        )
        .await?;
    assert_eq!(t.state(), pb::TaskState::Succeeded, "{t:?}");
    assert_eq!(t.tenant, "payments");
    let (code, msg) = c
        .agent_at(1, &alice)
        .list_tools(pb::ListToolsRequest::default())
        .await
        .map(|_| (Code::Ok, String::new()))
        .unwrap_or_else(|s| (s.code(), s.message().to_owned()));
    assert_eq!(code, Code::Ok, "{msg}");
    let admin_refused = cli_as(&c, &alice, &["token", "list"]).expect_err("no admin scope");
    assert!(
        admin_refused.to_string().contains("admin"),
        "{admin_refused}"
    );

    // The URL provider's token works too (the hub fetched its keys).
    let bob = sso.token("bob@corp", "payments", &["tools"])?;
    wait_until("the hub to fetch the URL provider's keys", READY, || {
        let ok = answer_now(&c, &bob);
        async move { ok.await.then_some(()) }
    })
    .await?;

    // Untrusted: a token claiming the provider's issuer, signed by a key it never
    // published; and a provider the hub does not know at all.
    let mallory = Provider::new(corp.iss)?;
    for (who, token) in [
        (
            "a key the provider never published",
            mallory.token("alice@corp", "payments", &["tools"])?,
        ),
        (
            "an unknown issuer",
            Provider::new("https://evil.example")?.token("eve", "payments", &["tools"])?,
        ),
    ] {
        let (code, msg) = answer(&c, 1, &token).await.expect_err(who);
        assert_eq!(code, Code::Unauthenticated, "{who}: {msg}");
        assert!(msg.contains("unknown key"), "{who}: {msg}");
    }
    // The right key with another provider's issuer or the wrong audience.
    let swapped = Provider {
        iss: sso.iss,
        key: corp.key.clone(),
    };
    let (code, msg) = answer(&c, 1, &swapped.token("alice", "payments", &["tools"])?)
        .await
        .expect_err("issuer swapped");
    assert_eq!(code, Code::Unauthenticated);
    assert!(msg.contains("wrong issuer"), "{msg}");

    // The provider rotates: the file now holds only a new key. Its tokens work once the
    // hub has read the file again, and the old key's stop.
    let rotated = Provider::new(corp.iss)?;
    std::fs::write(&jwks_file, rotated.jwks()?.to_string())?;
    let carol = rotated.token("carol@corp", "payments", &["tools"])?;
    wait_until("the hub to read the rotated JWKS file", READY, || {
        let ok = answer_now(&c, &carol);
        async move { ok.await.then_some(()) }
    })
    .await?;
    let (code, _) = answer(&c, 1, &corp.token("alice@corp", "payments", &["tools"])?)
        .await
        .expect_err("the old key left the file");
    assert_eq!(code, Code::Unauthenticated);

    // The URL provider rotates: a token naming a key the hub has not seen makes it fetch
    // again soon, well before refresh_s (300 s).
    let sso2 = Provider::new(sso.iss)?;
    *served.lock().expect("jwks") = sso2.jwks()?;
    let before = fetches.load(std::sync::atomic::Ordering::SeqCst);
    let dave = sso2.token("dave@corp", "payments", &["tools"])?;
    wait_until("the hub to fetch the URL provider's new key", READY, || {
        let ok = answer_now(&c, &dave);
        async move { ok.await.then_some(()) }
    })
    .await?;
    assert!(fetches.load(std::sync::atomic::Ordering::SeqCst) > before);

    // Revocation covers a provider's subjects as it does the cluster's own.
    cli(&c, &["agent-token", "revoke", "--subject", "carol@corp"])?;
    let (code, msg) = answer(&c, 1, &carol).await.expect_err("revoked");
    assert_eq!(code, Code::Unauthenticated);
    assert!(msg.contains("revoked"), "{msg}");
    Ok(())
}

/// Whether hub 1 accepts `token` now.
async fn answer_now(c: &Cluster, token: &str) -> bool {
    answer(c, 1, token).await.is_ok()
}

/// The CLI's error text for a refused command (its stderr).
fn refused(c: &Cluster, token: &str, args: &[&str]) -> String {
    cli_as(c, token, args)
        .expect_err(&format!("{args:?} should be refused"))
        .to_string()
}

#[tokio::test]
async fn roles_grant_parts_of_the_admin_api_and_a_changed_role_changes_every_token(
) -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let issue = |sub: &str, role: &str| {
        cli(
            &c,
            &[
                "agent-token",
                "issue",
                "--subject",
                sub,
                "--role",
                role,
                "--ttl",
                "600",
            ],
        )
        .map(|t| t.trim().to_owned())
    };

    // A viewer reads; it cannot change anything.
    let vera = issue("vera", "viewer")?;
    assert!(cli_as(&c, &vera, &["nodes"])?.contains("edge-1"));
    cli_as(&c, &vera, &["audit"])?;
    let e = refused(&c, &vera, &["nodes", "cordon", "edge-1"]);
    assert!(
        e.contains("admin:nodes") && e.contains("PermissionDenied"),
        "{e}"
    );

    // An operator cordons and pauses; it cannot touch credentials.
    let otto = issue("otto", "operator")?;
    cli_as(&c, &otto, &["nodes", "cordon", "edge-1"])?;
    cli_as(&c, &otto, &["nodes", "uncordon", "edge-1"])?;
    let e = refused(&c, &otto, &["token", "create"]);
    assert!(e.contains("admin:credentials"), "{e}");

    // A role of the operator's own: changing it changes what a token already issued may do.
    cli(
        &c,
        &[
            "roles",
            "set",
            "oncall",
            "--scopes",
            "admin:read,admin:tasks",
        ],
    )?;
    let olga = issue("olga", "oncall")?;
    cli_as(&c, &olga, &["scheduling", "pause"])?;
    cli_as(&c, &olga, &["scheduling", "resume"])?;
    cli(&c, &["roles", "set", "oncall", "--scopes", "admin:read"])?;
    let e = refused(&c, &olga, &["scheduling", "pause"]);
    assert!(e.contains("admin:tasks"), "{e}");
    cli(&c, &["roles", "delete", "oncall"])?;
    let e = refused(&c, &olga, &["nodes"]);
    assert!(e.contains("admin:read"), "{e}");

    // No escalation: whoever may issue tokens and set roles grants only what it holds.
    cli(
        &c,
        &[
            "roles",
            "set",
            "issuer",
            "--scopes",
            "admin:credentials,tools",
        ],
    )?;
    let ivan = issue("ivan", "issuer")?;
    let e = refused(
        &c,
        &ivan,
        &[
            "agent-token",
            "issue",
            "--subject",
            "x",
            "--scopes",
            "admin",
        ],
    );
    assert!(e.contains("only scopes its issuer holds"), "{e}");
    let e = refused(
        &c,
        &ivan,
        &[
            "agent-token",
            "issue",
            "--subject",
            "x",
            "--role",
            "operator",
        ],
    );
    assert!(e.contains("only scopes its issuer holds"), "{e}");
    let e = refused(&c, &ivan, &["roles", "set", "issuer", "--scopes", "*"]);
    assert!(e.contains("only scopes its issuer holds"), "{e}");
    cli_as(
        &c,
        &ivan,
        &[
            "agent-token",
            "issue",
            "--subject",
            "tool-user",
            "--scopes",
            "tools",
        ],
    )?;

    // Built-in roles stay as they are; an unknown role is named.
    let e = cli(&c, &["roles", "set", "viewer", "--scopes", "*"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("built in"), "{e}");
    let e = cli(
        &c,
        &["agent-token", "issue", "--subject", "x", "--role", "nobody"],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no role \"nobody\""), "{e}");
    let listed = json(&cli(&c, &["roles", "list", "-o", "json"])?)?;
    let names: Vec<&str> = listed
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(names, ["viewer", "operator", "admin", "issuer"]);

    // The audit trail says who changed which role.
    let audit = cli(&c, &["audit", "--kind", "set_role", "-o", "json"])?;
    assert!(audit.contains("oncall: admin:read admin:tasks"), "{audit}");
    Ok(())
}

/// Runs the CLI as `token` presenting the client certificate `cert`, or none.
fn cli_cert(
    c: &Cluster,
    token: &str,
    cert: Option<&std::path::Path>,
    args: &[&str],
) -> anyhow::Result<String> {
    run_cli(c, &c.hub_addr, token, cert, args)
}

#[tokio::test]
async fn where_client_certificates_are_required_a_token_works_only_with_its_subjects_certificate(
) -> anyhow::Result<()> {
    let mut opts = flotilla_tests::Options::default();
    opts.agent_tokens.require_client_certificate = true;
    // The harness presents the admin certificate the hub keeps in its data dir.
    let mut c = Cluster::with_options(1, opts).await?;
    // Nodes are unaffected: they present their own certificates.
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let admin_cert = c.hub(1).dir.join("admin.pem");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(c.hub(1).dir.join("admin.key"))?.permissions(),
    );
    assert_eq!(mode & 0o077, 0, "the admin key is the owner's alone");

    // The admin token alone is refused; with the admin certificate it works.
    let e = cli_cert(&c, &c.admin_token, None, &["nodes"])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("requires agents to present a client certificate"),
        "{e}"
    );
    cli_cert(&c, &c.admin_token, Some(&admin_cert), &["nodes"])?;

    // An agent's certificate: the key is made by the CLI and stays with the agent.
    let out = tempfile::tempdir()?;
    let out_dir = out.path().to_str().expect("utf-8");
    cli_cert(
        &c,
        &c.admin_token,
        Some(&admin_cert),
        &[
            "agent-cert",
            "issue",
            "--subject",
            "alice",
            "--out",
            out_dir,
        ],
    )?;
    let alice_cert = out.path().join("alice.pem");
    let issued = pki::pem_identity(&std::fs::read_to_string(&alice_cert)?).expect("a certificate");
    assert_eq!(
        (issued.common_name.as_str(), issued.role.as_str()),
        ("alice", pki::ROLE_AGENT)
    );

    let alice = issue(&c, "alice", 600).await?;
    let bob = issue(&c, "bob", 600).await?;
    let tools = cli_cert(&c, &alice, Some(&alice_cert), &["tools"])?;
    assert!(tools.contains("echo"), "{tools}");
    let node_cert = c.node_dir("edge-1").join("identity/node.pem");
    for (who, token, cert, why) in [
        (
            "alice without a certificate",
            &alice,
            None,
            "requires agents to present",
        ),
        (
            "bob with alice's certificate",
            &bob,
            Some(alice_cert.as_path()),
            "another subject",
        ),
        (
            "alice with a node's certificate",
            &alice,
            Some(node_cert.as_path()),
            "not issued to an agent",
        ),
    ] {
        let e = cli_cert(&c, token, cert, &["tools"])
            .expect_err(who)
            .to_string();
        assert!(
            e.contains(why) && e.contains("Unauthenticated"),
            "{who}: {e}"
        );
    }
    // Refusals are in the audit trail (each hub writes them down within a second).
    wait_until("the refusals in the audit trail", READY, || {
        let audit = cli_cert(
            &c,
            &c.admin_token,
            Some(&admin_cert),
            &["audit", "--kind", "denied", "-o", "json"],
        )
        .unwrap_or_default();
        async move { audit.contains("client_certificate").then_some(()) }
    })
    .await?;
    Ok(())
}

/// Edits hub `id`'s hub.toml with `edit`, stops it gracefully and starts it again, and
/// waits until it answers with a leader (one hub at a time, as a rolling restart goes).
async fn restart_with(
    c: &mut Cluster,
    id: u64,
    edit: impl Fn(&mut flotilla_common::config::HubFile),
) -> anyhow::Result<()> {
    let path = c.hub(id).dir.join("hub.toml");
    let mut cfg: flotilla_common::config::HubFile =
        toml::from_str(&std::fs::read_to_string(&path)?)?;
    edit(&mut cfg);
    std::fs::write(&path, toml::to_string(&cfg)?)?;
    c.hub_mut(id).proc.terminate();
    c.start_hub(id).await?;
    let admin = pb::admin_service_client::AdminServiceClient::with_interceptor(
        c.channel_to(id),
        flotilla_tests::Bearer::new(&c.admin_token),
    );
    flotilla_tests::wait_status(&admin, &format!("hub {id} back with a leader"), |s| {
        s.leader_id != 0
    })
    .await?;
    Ok(())
}

/// An echo call that must succeed on edge-1.
async fn call(c: &Cluster, text: &str) -> anyhow::Result<()> {
    let t = c
        .call(&mut c.agent(), "echo", serde_json::json!({"text": text}))
        .await?;
    anyhow::ensure!(
        t.state == pb::TaskState::Succeeded as i32 && last_node(&t) == "edge-1",
        "{t:?}"
    );
    Ok(())
}

fn certificates(pem: &str) -> usize {
    pem.matches("BEGIN CERTIFICATE").count()
}

/// The CA is rotated as docs/security.md tells an operator to: a new CA made with
/// `flotilla ca init`; every hub restarted in turn trusting both (nodes are given both);
/// then signing with the new one (nodes renew at once); then trusting the new one alone.
/// Calls go through a node at every step, the node is never joined again, and at the end a
/// certificate from the old CA is refused.
#[tokio::test]
async fn the_ca_is_rotated_with_an_overlap_and_the_node_follows_without_joining_again(
) -> anyhow::Result<()> {
    let mut c = Cluster::with_hubs(3).await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let identity = c.node_dir("edge-1").join("identity");
    let old_key = pki::CertifiedKey::read(&identity, "node")?.expect("edge-1's certificate");
    let old_ca = std::fs::read_to_string(c.dir.path().join("pki/ca.pem"))?;

    let next = c.dir.path().join("pki-next");
    let out = Command::new(flotilla_bin())
        .args(["ca", "init", "--out", next.to_str().unwrap_or_default()])
        .args(["--cluster-name", "test"])
        .output()?;
    anyhow::ensure!(out.status.success(), "ca init: {out:?}");
    let new_ca = std::fs::read_to_string(next.join("ca.pem"))?;
    let both = c.dir.path().join("ca-both.pem");
    std::fs::write(&both, format!("{old_ca}{new_ca}"))?;
    let node_trusts = |want: usize| {
        let path = identity.join("ca.pem");
        move || {
            let n = std::fs::read_to_string(&path).map_or(0, |p| certificates(&p));
            async move { (n == want).then_some(()) }
        }
    };

    // 1. Every hub trusts both CAs; the old one still signs. The node is given both.
    for id in 1..=3 {
        restart_with(&mut c, id, |h| h.ca_trust = Some(both.clone())).await?;
    }
    c.ca_pem = format!("{old_ca}{new_ca}");
    c.wait_node_connected("edge-1").await?;
    wait_until("edge-1 to trust both CAs", READY, node_trusts(2)).await?;
    call(&c, "trusting both").await?;

    // 2. The new CA signs: hubs present its certificates, and the node renews its own at
    // once, without joining again.
    for id in 1..=3 {
        let (cert, key) = (next.join("ca.pem"), next.join("ca.key"));
        restart_with(&mut c, id, |h| {
            h.ca_cert = Some(cert.clone());
            h.ca_key = Some(key.clone());
        })
        .await?;
    }
    wait_until(
        "edge-1 to hold a certificate from the new CA",
        READY,
        || {
            let key = pki::CertifiedKey::read(&identity, "node").ok().flatten();
            let renewed = key.is_some_and(|k| {
                tls::parse_certs(&k.cert_pem)
                    .ok()
                    .and_then(|c| c.into_iter().next())
                    .is_some_and(|der| pki::issued_by(&der, &new_ca))
            });
            async move { renewed.then_some(()) }
        },
    )
    .await?;
    c.wait_node_connected("edge-1").await?;
    call(&c, "signed by the new CA").await?;

    // 3. The old CA is dropped: the node trusts the new one alone, and a certificate from
    // the old CA is refused.
    for id in 1..=3 {
        restart_with(&mut c, id, |h| h.ca_trust = None).await?;
    }
    c.ca_pem = new_ca.clone();
    wait_until("edge-1 to trust the new CA alone", READY, node_trusts(1)).await?;
    assert_eq!(
        std::fs::read_to_string(identity.join("ca.pem"))?,
        pki::trust_bundle(&new_ca, "")?
    );
    c.wait_node_connected("edge-1").await?;
    call(&c, "the new CA alone").await?;
    let leader = c.wait_leader().await?;
    let api = c.hub(leader).api.clone();
    let current = pki::CertifiedKey::read(&identity, "node")?.expect("edge-1's certificate");
    assert_eq!(
        session_code(&c, &api, &current).await?,
        Code::InvalidArgument,
        "the renewed certificate is accepted (the hub then waits for a hello)"
    );
    let refused = session_code(&c, &api, &old_key).await?;
    assert!(
        matches!(refused, Code::Unavailable | Code::Unknown | Code::Cancelled),
        "a certificate from the old CA fails the TLS handshake: {refused:?}"
    );
    let log = c.nodes["edge-1"].log_text();
    assert_eq!(
        log.matches("joined the cluster").count(),
        1,
        "joined once, at the start"
    );
    Ok(())
}

/// The serial and end (seconds since the epoch) of the certificate the hub at `api`
/// presents in a new handshake.
async fn presented(c: &Cluster, api: &str) -> anyhow::Result<(String, i64)> {
    let (host, port) = tls::split_address(api)?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    let connector = tokio_rustls::TlsConnector::from(tls::client_config(&c.ca_pem, None)?);
    let name = rustls::pki_types::ServerName::try_from(host.clone())?;
    let conn = connector.connect(name, tcp).await?;
    let der = conn
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("the hub presents a certificate")
        .to_vec();
    let serial = pki::peer_identity(&der).expect("readable").serial;
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        base64::engine::general_purpose::STANDARD.encode(&der)
    );
    let (_, to) = pki::pem_validity(&pem).expect("validity");
    Ok((serial, to))
}

/// A hub renews its own certificate in place at two thirds of its life (a minute here):
/// past the end of the first ones, agents still connect to every hub, and a hub restarted
/// then is reached by the others with their renewed certificates and catches up. Without
/// renewal a cluster that ran longer than its hubs' certificates would stop.
#[tokio::test]
async fn hubs_renew_their_own_certificates_in_place_and_outlive_the_first_ones(
) -> anyhow::Result<()> {
    let opts = flotilla_tests::Options {
        hub_cert_lifetime_s: 60,
        ..Default::default()
    };
    let mut c = Cluster::with_options(3, opts).await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let mut first = Vec::new();
    for id in 1..=3 {
        first.push(presented(&c, &c.hub(id).api).await?);
    }
    let first_end = first.iter().map(|(_, to)| *to).max().unwrap_or_default();
    let long = std::time::Duration::from_secs(150);
    wait_until("every hub to renew its certificate", long, || {
        let renewed = (1..=3).all(|id| {
            c.hub(id)
                .proc
                .log_text()
                .contains("renewed the hub's certificate")
        });
        async move { renewed.then_some(()) }
    })
    .await?;
    // Wait out the first certificates (the clock, not readiness, is what is waited for).
    wait_until("the first certificates to end", long, || {
        let over = flotilla_common::now_ms() / 1000 > first_end + 1;
        async move { over.then_some(()) }
    })
    .await?;
    for (id, (serial, end)) in (1..=3).zip(&first) {
        let (now_serial, now_end) = presented(&c, &c.hub(id).api).await?;
        assert_ne!(&now_serial, serial, "hub {id} presents a new certificate");
        assert!(now_end > *end, "hub {id}'s lasts longer");
    }
    // Raft over new connections: hub 3 restarts, and the others reach it with their
    // renewed client certificates.
    c.hub_mut(3).proc.terminate();
    c.start_hub(3).await?;
    let t = c
        .call(
            &mut c.agent(),
            "echo",
            serde_json::json!({"text": "renewed"}),
        )
        .await?;
    assert_eq!(t.state, pb::TaskState::Succeeded as i32, "{t:?}");
    let at_3 = c.agent_at(3, &c.admin_token);
    wait_state(&at_3, &t.id, pb::TaskState::Succeeded).await?;
    Ok(())
}
