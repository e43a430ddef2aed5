//! Bad input gets a precise gRPC status and loses nothing: unknown tools, malformed or
//! schema-breaking arguments, bad tokens, missing scopes, other tenants' tasks, bad join
//! tokens, crashing or missing MCP servers, malformed configuration files.

use std::process::Command;

use flotilla_common::jwt;
use flotilla_proto as pb;
use flotilla_tests::{
    demo_server, flotilla_bin, result_text, wait_until, Cluster, NodeSpec, READY,
};
use serde_json::json;
use tonic::Code;

fn submit(tool: &str, args: &[u8]) -> pb::SubmitTaskRequest {
    pb::SubmitTaskRequest {
        tool: tool.into(),
        arguments: args.to_vec(),
        ..Default::default()
    }
}

#[tokio::test]
async fn bad_requests_get_precise_errors() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let mut agent = c.agent();

    let e = agent
        .submit_task(submit("no-such-tool", b"{}"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("no-such-tool"), "{}", e.message());

    let e = agent
        .submit_task(submit("echo", b"[1,2]"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("JSON object"), "{}", e.message());

    let e = agent
        .submit_task(submit("echo", b"{not json"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("not valid JSON"), "{}", e.message());

    let e = agent
        .submit_task(submit("echo", br#"{"txt": 1}"#))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("text"),
        "names the missing property: {}",
        e.message()
    );

    let e = agent
        .submit_task(submit("hash", br#"{"data": "x", "algorithm": "md5"}"#))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("/algorithm"),
        "points at the bad field: {}",
        e.message()
    );

    let big = serde_json::to_vec(&json!({"text": "x".repeat(2 * 1024 * 1024)}))?;
    let e = agent.submit_task(submit("echo", &big)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());

    // None of that created a task; the hub still serves.
    let tasks = agent
        .list_tasks(pb::ListTasksRequest::default())
        .await?
        .into_inner()
        .tasks;
    assert!(
        tasks.is_empty(),
        "rejected submissions leave no task: {tasks:?}"
    );
    let t = c.call(&mut agent, "echo", json!({"text": "fine"})).await?;
    assert_eq!(result_text(&t), "fine");
    Ok(())
}

#[tokio::test]
async fn tokens_scopes_and_tenants_are_enforced() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;

    // No token, garbage, a token signed by a key the cluster does not know.
    for token in ["", "garbage", "a.b.c"] {
        let e = c
            .agent_with(token)
            .list_tools(pb::ListToolsRequest {})
            .await
            .unwrap_err();
        assert_eq!(
            e.code(),
            Code::Unauthenticated,
            "token {token:?}: {}",
            e.message()
        );
    }
    let stranger = jwt::SigningKey::generate(0)?;
    let forged = jwt::sign(
        &stranger,
        &jwt::Claims {
            iss: jwt::ISSUER.into(),
            aud: jwt::AUDIENCE.into(),
            sub: "mallory".into(),
            tenant: "default".into(),
            scopes: vec!["*".into()],
            iat: 0,
            exp: i64::MAX / 2,
            jti: "x".into(),
            ..Default::default()
        },
    )?;
    let e = c
        .agent_with(&forged)
        .list_tools(pb::ListToolsRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // An expired token (issued for one second; the hub allows 5 s of clock skew).
    let short = c
        .admin()
        .issue_agent_token(pb::IssueAgentTokenRequest {
            subject: "brief".into(),
            tenant: "default".into(),
            scopes: vec!["tools".into()],
            ttl_seconds: 1,
            ..Default::default()
        })
        .await?
        .into_inner()
        .token;
    let short_agent = c.agent_with(&short);
    let e = wait_until("the short token to expire", READY, || {
        let mut a = short_agent.clone();
        async move { a.list_tools(pb::ListToolsRequest {}).await.err() }
    })
    .await?;
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("expired"), "{}", e.message());

    // A token without the tool's scope: the tool is not listed and cannot be called.
    let other = c.agent_token("bob", "default", &["other"]).await?;
    let mut bob = c.agent_with(&other);
    let tools = bob
        .list_tools(pb::ListToolsRequest {})
        .await?
        .into_inner()
        .tools;
    assert!(tools.is_empty(), "{tools:?}");
    let e = bob
        .submit_task(submit("echo", br#"{"text":"x"}"#))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("tools"),
        "names the scope: {}",
        e.message()
    );
    // ...nor use the admin API.
    let mut bob_admin = flotilla_tests::AdminServiceClient::with_interceptor(
        c.channel(),
        flotilla_tests::Bearer::new(&other),
    );
    let e = bob_admin
        .list_nodes(pb::ListNodesRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // Tenants never see each other's tasks: another tenant's id answers exactly as an id
    // that does not exist (no existence oracle).
    let mut alice = c.agent_with(&c.agent_token("alice", "tenant-a", &["tools"]).await?);
    let mut carol = c.agent_with(&c.agent_token("carol", "tenant-b", &["tools"]).await?);
    let t = c.call(&mut alice, "echo", json!({"text": "mine"})).await?;
    let missing = "0190d000-0000-7000-8000-000000000000";
    for id in [t.id.as_str(), missing] {
        let e = carol
            .get_task(pb::GetTaskRequest { task_id: id.into() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert_eq!(e.message(), format!("no task {id:?}"));
        let e = carol
            .cancel_task(pb::CancelTaskRequest { task_id: id.into() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert_eq!(e.message(), format!("no task {id:?}"));
    }
    let listed = carol
        .list_tasks(pb::ListTasksRequest::default())
        .await?
        .into_inner()
        .tasks;
    assert!(listed.iter().all(|x| x.id != t.id));
    let listed = alice
        .list_tasks(pb::ListTasksRequest::default())
        .await?
        .into_inner()
        .tasks;
    assert!(listed.iter().any(|x| x.id == t.id));
    Ok(())
}

#[tokio::test]
async fn join_refuses_bad_tokens_and_impostor_hubs_without_leaking_the_secret() -> anyhow::Result<()>
{
    let mut c = Cluster::start().await?;
    let token = c.join_token().await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;

    // A second node reusing a one-use token is refused, and the secret appears in no log.
    let run_node = |name: &str, join: &str| -> anyhow::Result<std::process::Output> {
        let dir = c.node_dir(name);
        std::fs::create_dir_all(&dir)?;
        let cfg = format!(
            "name = \"{name}\"\ndata_dir = \"{}\"\nhub = \"{}\"\njoin_token = \"{join}\"\n",
            dir.display(),
            c.hub_addr
        );
        let path = dir.join("node.toml");
        std::fs::write(&path, cfg)?;
        Ok(Command::new(flotilla_bin())
            .args(["node", "--config"])
            .arg(&path)
            .output()?)
    };
    // `token` is unused so far (add_node makes its own): use it twice.
    let ok = run_node_until_joined(&c, "edge-2", &token).await?;
    assert!(ok, "a fresh token lets a node join");
    let out = run_node("edge-3", &token)?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Unauthenticated") || stderr.contains("unknown, expired or used up"),
        "{stderr}"
    );

    let secret = token.rsplit('.').next().expect("secret part");
    assert!(
        !c.hubs[0].proc.log_text().contains(secret),
        "the join secret must never be logged"
    );
    assert!(c.hubs[0].proc.log_text().contains("join refused"));

    // A token whose CA pin does not match the hub: the node refuses before sending anything.
    let other_ca = flotilla_common::pki::Ca::generate("impostor")?;
    let parts: Vec<&str> = token.split('.').collect();
    let wrong_pin = format!(
        "flt1.{}.{}.{}",
        other_ca.pin().trim_start_matches("sha256:"),
        parts[2],
        parts[3]
    );
    let before = c.hubs[0].proc.log_text().matches("join refused").count();
    let out = run_node("edge-4", &wrong_pin)?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pinned CA"), "{stderr}");
    assert_eq!(
        c.hubs[0].proc.log_text().matches("join refused").count(),
        before,
        "no join reached the hub"
    );
    Ok(())
}

/// Starts a node with `token` and reports whether it joined (then stops it).
async fn run_node_until_joined(c: &Cluster, name: &str, token: &str) -> anyhow::Result<bool> {
    let dir = c.node_dir(name);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("node.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\ndata_dir = \"{}\"\nhub = \"{}\"\njoin_token = \"{token}\"\n",
            dir.display(),
            c.hub_addr
        ),
    )?;
    let _node = flotilla_tests::Proc::spawn(
        name,
        &["node", "--config", path.to_str().unwrap_or_default()],
        &dir.join("node.log"),
    )?;
    c.wait_node_connected(name).await?;
    Ok(true)
}

#[tokio::test]
async fn crashing_and_missing_mcp_servers_fail_tasks_not_the_node() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    let mut broken = demo_server("broken", 1);
    broken.command = "/nonexistent/mcp-server".into();
    c.add_node(NodeSpec {
        name: "edge-1".into(),
        labels: Default::default(),
        servers: vec![demo_server("demo", 4), broken],
        tenants: Vec::new(),
    })
    .await?;

    // The server that cannot start is visible as failing, with the reason.
    let nodes = c
        .admin()
        .list_nodes(pb::ListNodesRequest {})
        .await?
        .into_inner()
        .nodes;
    let s = nodes[0]
        .servers
        .iter()
        .find(|s| s.name == "broken")
        .expect("broken listed");
    assert!(s.state == "failing" || s.state == "restarting", "{s:?}");

    // A server crash fails the running task with the server's error...
    let mut agent = c.agent();
    let t = c.call(&mut agent, "crash", json!({})).await?;
    assert_eq!(t.state, pb::TaskState::Failed as i32);
    assert!(t.error.contains("died"), "{}", t.error);

    // ...and the node restarts the server and keeps serving.
    let t = wait_until("the demo server to be back", READY, || {
        let c = &c;
        let mut agent = agent.clone();
        async move {
            let t = c
                .call(&mut agent, "echo", json!({"text": "back"}))
                .await
                .ok()?;
            (t.state == pb::TaskState::Succeeded as i32).then_some(t)
        }
    })
    .await?;
    assert_eq!(result_text(&t), "back");

    // A tool error is a failed task that still carries the server's result.
    let t = c
        .call(&mut agent, "fail", json!({"message": "nope"}))
        .await?;
    assert_eq!(t.state, pb::TaskState::Failed as i32);
    assert_eq!(result_text(&t), "nope");
    Ok(())
}

#[test]
fn malformed_config_files_exit_64_naming_the_key() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cases = [
        ("hub", "id = 1\ndata_dir = \"/tmp/x\"\nlisten = \"not-an-address\"\n", "`listen`"),
        ("hub", "id = 1\ndata_dir = \"/tmp/x\"\nlisten_port = 7\n", "listen_port"),
        ("hub", "id = 1\ndata_dir = [\n", "hub.toml"),
        ("node", "name = \"Bad Name\"\ndata_dir = \"/tmp/x\"\nhub = \"https://127.0.0.1:1\"\n", "`name`"),
        (
            "node",
            "name = \"n\"\ndata_dir = \"/tmp/x\"\nhub = \"https://127.0.0.1:1\"\n[[servers]]\nname = \"s\"\ncommand = \"x\"\nmax_concurrency = 0\n",
            "servers[0].max_concurrency",
        ),
    ];
    for (i, (role, text, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("{role}{i}.toml"));
        let path = if *role == "hub" {
            dir.path().join(format!("{i}-hub.toml"))
        } else {
            path
        };
        std::fs::write(&path, text)?;
        let out = Command::new(flotilla_bin())
            .arg(role)
            .arg("--config")
            .arg(&path)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{role} case {i}: {stderr}");
        assert!(
            stderr.contains(key),
            "{role} case {i} should name {key}: {stderr}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_server_that_cannot_start_says_why_and_a_call_for_its_tool_names_it() -> anyhow::Result<()>
{
    let mut c = Cluster::start().await?;
    // What a Python MCP server without its package does: a traceback on stderr, exit 1.
    let mut git = demo_server("git", 4);
    git.command = "sh".into();
    git.args = vec![
        "-c".into(),
        "echo 'Traceback (most recent call last):' >&2; echo \"ModuleNotFoundError: No module named 'mcp_server_git'\" >&2; exit 1".into(),
    ];
    c.add_node(NodeSpec {
        name: "edge-1".into(),
        labels: Default::default(),
        servers: vec![demo_server("demo", 4), git],
        tenants: Vec::new(),
    })
    .await?;

    let admin = c.admin();
    let error = wait_until("the failing server's reason", READY, || {
        let mut admin = admin.clone();
        async move {
            let nodes = admin
                .list_nodes(pb::ListNodesRequest {})
                .await
                .ok()?
                .into_inner()
                .nodes;
            let s = nodes.first()?.servers.iter().find(|s| s.name == "git")?;
            (!s.error.is_empty()).then(|| s.error.clone())
        }
    })
    .await?;
    assert!(
        error.contains("No module named 'mcp_server_git'"),
        "the server's own words: {error}"
    );

    let refused = c
        .agent()
        .submit_task(flotilla_tests::submit("git_log", json!({})))
        .await
        .expect_err("nobody offers git_log");
    assert_eq!(refused.code(), tonic::Code::NotFound);
    let m = refused.message();
    assert!(m.contains("unknown tool \"git_log\""), "{m}");
    assert!(
        m.contains("\"git\" on node edge-1") && m.contains("No module named 'mcp_server_git'"),
        "names the failing server and, to an admin, why: {m}"
    );
    // An agent without the admin scope learns which server, not what its stderr says.
    let token = c.agent_token("plain", "default", &["tools"]).await?;
    let refused = c
        .agent_with(&token)
        .submit_task(flotilla_tests::submit("git_log", json!({})))
        .await
        .expect_err("nobody offers git_log");
    let m = refused.message();
    assert!(m.contains("\"git\" on node edge-1"), "{m}");
    assert!(!m.contains("mcp_server_git"), "stderr is for admins: {m}");
    // A tool that exists is not refused for it.
    let t = c
        .call(&mut c.agent(), "echo", json!({"text": "fine"}))
        .await?;
    assert_eq!(t.state, pb::TaskState::Succeeded as i32);
    Ok(())
}
