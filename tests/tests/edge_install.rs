//! A bare machine made a node the documented way (docs/operations.md, "Edge nodes"):
//! `flotilla join` with a token from the environment writes node.toml without the token,
//! the systemd unit in deploy/systemd passes `systemd-analyze verify`, and the node the file
//! describes serves a call.

use std::process::Command;

use flotilla_proto as pb;
use flotilla_tests::{flotilla_bin, wait_until, Cluster, Proc, READY};
use serde_json::json;

#[tokio::test]
async fn flotilla_join_makes_a_node_that_serves_and_the_unit_verifies() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let token = c.join_token().await?;
    let root = c.dir.path().join("edge-box");
    let (data, config) = (
        root.join("var/lib/flotilla/node"),
        root.join("etc/flotilla/node.toml"),
    );
    let bin = flotilla_bin().display().to_string();
    let join = |token: &str| {
        Command::new(&bin)
            .args(["join", "--hub", &c.hub(1).api, "--name", "edge-box"])
            .args(["--data-dir", &data.display().to_string()])
            .args(["--config", &config.display().to_string()])
            .args([
                "--label",
                "region=edge",
                "--server",
                &format!("demo={bin} mcp-demo"),
            ])
            .env("FLOTILLA_JOIN_TOKEN", token)
            .output()
    };
    let o = join(&token)?;
    assert!(o.status.success(), "{o:?}");
    let written = std::fs::read_to_string(&config)?;
    assert!(
        !written.contains(&token),
        "the token is not kept: {written}"
    );
    assert!(
        written.contains("region = \"edge\"") && written.contains("mcp-demo"),
        "{written}"
    );
    // Never over an existing node.toml.
    let again = join(&token)?;
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("exists"),
        "{again:?}"
    );

    // The unit as shipped, with the binary and config where this test put them.
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/systemd/flotilla-node.service"),
    )?;
    assert!(
        unit.contains("ExecStart=/usr/local/bin/flotilla node --config /etc/flotilla/node.toml")
    );
    let local = root.join("flotilla-node.service");
    std::fs::write(
        &local,
        unit.replace("/usr/local/bin/flotilla", &bin)
            .replace("/etc/flotilla/node.toml", &config.display().to_string()),
    )?;
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&local)
        .output()?;
    assert!(verify.status.success(), "{verify:?}");

    // What the unit runs: the node serves a call.
    let _node = Proc::spawn(
        "edge-box",
        &["node", "--config", &config.display().to_string()],
        &root.join("node.log"),
    )?;
    c.wait_node_connected("edge-box").await?;
    let mut agent = c.agent();
    wait_until("the node's tools", READY, || {
        let mut agent = agent.clone();
        async move {
            let tools = agent
                .list_tools(pb::ListToolsRequest::default())
                .await
                .ok()?;
            tools
                .into_inner()
                .tools
                .iter()
                .any(|t| t.name == "echo")
                .then_some(())
        }
    })
    .await?;
    let t = c
        .call(&mut agent, "echo", json!({"text": "from the edge"}))
        .await?;
    assert_eq!(t.state, pb::TaskState::Succeeded as i32, "{t:?}");
    assert_eq!(t.attempts[0].node_id, "edge-box");
    Ok(())
}
