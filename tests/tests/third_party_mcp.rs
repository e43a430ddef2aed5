//! A real third-party MCP server from PyPI (`mcp-server-time`, run as
//! `python3 -m mcp_server_time`) hosted on a node and called through the hub.

use std::process::Command;

use flotilla_common::config::McpServerConfig;
use flotilla_proto as pb;
use flotilla_tests::{submit, Cluster, NodeSpec};
use serde_json::json;

fn python() -> String {
    std::env::var("FLOTILLA_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

#[tokio::test]
async fn mcp_server_time_answers_through_the_hub() -> anyhow::Result<()> {
    let probe = Command::new(python())
        .args(["-c", "import mcp_server_time"])
        .output()?;
    assert!(
        probe.status.success(),
        "this test needs the PyPI package mcp-server-time: pip install mcp-server-time ({})",
        String::from_utf8_lossy(&probe.stderr)
    );
    let mut c = Cluster::start().await?;
    c.add_node(NodeSpec {
        name: "py-1".into(),
        labels: Default::default(),
        servers: vec![McpServerConfig {
            name: "time".into(),
            command: python(),
            args: vec![
                "-m".into(),
                "mcp_server_time".into(),
                "--local-timezone".into(),
                "UTC".into(),
            ],
            env: Default::default(),
            max_concurrency: 2,
            scope: "time".into(),
        }],
        tenants: Vec::new(),
    })
    .await?;

    // The scope declared in node.toml guards the tool.
    let mut agent = c.agent_with(&c.agent_token("clock-reader", "default", &["time"]).await?);
    let tools = agent
        .list_tools(pb::ListToolsRequest {})
        .await?
        .into_inner()
        .tools;
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
    assert!(names.contains(&"get_current_time"), "{names:?}");

    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let t = c
        .call(&mut agent, "get_current_time", json!({"timezone": "UTC"}))
        .await?;
    assert_eq!(t.state, pb::TaskState::Succeeded as i32, "{t:?}");
    let r: serde_json::Value = serde_json::from_slice(&t.result)?;
    let sc = &r["structuredContent"];
    assert_eq!(sc["timezone"], "UTC", "{r}");
    // The server's own clock: its answer is a real current time, not a canned one.
    let datetime = sc["datetime"].as_str().expect("datetime");
    let year = 1970 + before / 31_556_952;
    assert!(
        datetime.starts_with(&year.to_string()) || datetime.starts_with(&(year + 1).to_string()),
        "{datetime}"
    );

    // The server's own validation error comes back as a failed task with its message.
    let t = c
        .call(
            &mut agent,
            "get_current_time",
            json!({"timezone": "Mars/Olympus_Mons"}),
        )
        .await?;
    assert_eq!(t.state, pb::TaskState::Failed as i32);
    assert!(
        flotilla_tests::result_text(&t).contains("Mars/Olympus_Mons"),
        "{}",
        flotilla_tests::result_text(&t)
    );

    // Hub-side schema validation uses the server's published schema.
    let e = agent
        .submit_task(submit("get_current_time", json!({})))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("timezone"), "{}", e.message());
    Ok(())
}
