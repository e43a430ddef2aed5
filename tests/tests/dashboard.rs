//! The dashboard as a person sees it: a real headless Chromium (Debian's `chromium`) opens
//! the login link an admin gets, and the page shows the running cluster and changes, while
//! it stays open, when a task completes; a click shows a task's events; a tenant's link
//! shows that tenant's work only. The browser is driven over the DevTools protocol;
//! the test saves a screenshot (`dashboard.png` in the tests' target tmp dir).

use std::time::Duration;

use base64::Engine;
use flotilla_proto as pb;
use flotilla_tests::{http_get, wait_until, Cluster, NodeSpec, READY};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A headless Chromium and a DevTools session with its one page.
struct Browser {
    _child: tokio::process::Child,
    _profile: tempfile::TempDir,
    page: Socket,
    next: u64,
}

impl Browser {
    async fn launch() -> anyhow::Result<Self> {
        let profile = tempfile::tempdir()?;
        let mut child = tokio::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--window-size=1400,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium (Debian's chromium package) must be installed: .ci/run installs it");
        // It says where DevTools listens on stderr: ws://127.0.0.1:PORT/devtools/browser/...
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let port = tokio::time::timeout(READY, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.split("ws://127.0.0.1:").nth(1) {
                    return Ok(rest.split('/').next().unwrap_or_default().to_owned());
                }
            }
            anyhow::bail!("chromium exited before DevTools listened")
        })
        .await??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let base = format!("http://127.0.0.1:{port}");
        let ws = wait_until("the browser's page target", READY, || {
            let base = base.clone();
            async move {
                let (_, body) = http_get(&base, "/json/list").await.ok()?;
                let targets: Vec<Value> = serde_json::from_str(&body).ok()?;
                targets
                    .iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_owned))
            }
        })
        .await?;
        let (page, _) = tokio_tungstenite::connect_async(ws.as_str()).await?;
        Ok(Self {
            _child: child,
            _profile: profile,
            page,
            next: 0,
        })
    }

    /// One DevTools command and its result (events in between are skipped).
    async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.next += 1;
        let id = self.next;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.page.send(Message::Text(msg.into())).await?;
        loop {
            let Some(m) = self.page.next().await else {
                anyhow::bail!("the browser closed the DevTools session");
            };
            let Message::Text(text) = m? else { continue };
            let v: Value = serde_json::from_str(text.as_str())?;
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    anyhow::bail!("{method}: {e}");
                }
                return Ok(v["result"].clone());
            }
        }
    }

    async fn open(&mut self, url: &str) -> anyhow::Result<()> {
        self.call("Page.navigate", json!({"url": url})).await?;
        Ok(())
    }

    /// The value of a JavaScript expression in the page.
    async fn eval(&mut self, expr: &str) -> anyhow::Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true}),
            )
            .await?;
        Ok(r["result"]["value"].clone())
    }

    /// The value of a JavaScript expression that makes a promise, once it settles.
    async fn eval_async(&mut self, expr: &str) -> anyhow::Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await?;
        Ok(r["result"]["value"].clone())
    }

    /// Polls `expr` until it is truthy; its value.
    async fn wait(&mut self, what: &str, expr: &str) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + READY;
        loop {
            let v = self.eval(expr).await?;
            let truthy =
                !matches!(v, Value::Null | Value::Bool(false)) && v != json!(0) && v != json!("");
            if truthy {
                return Ok(v);
            }
            if tokio::time::Instant::now() > deadline {
                let text = self
                    .eval("document.body && document.body.innerText")
                    .await?;
                anyhow::bail!("timed out waiting for {what}; the page says:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn the_dashboard_shows_the_cluster_and_changes_live_when_a_task_completes(
) -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    let mut spec = NodeSpec::demo("edge-1");
    // What a node says is shown as text, never run as markup.
    spec.labels
        .insert("region".into(), "<img src=x onerror=alert(1)>".into());
    c.add_node(spec).await?;
    let login = c
        .agent()
        .create_dashboard_login(pb::CreateDashboardLoginRequest {})
        .await?
        .into_inner();
    let http = c.hub(1).http()?;
    assert!(
        login.url.starts_with(&format!("{http}/login?ticket=")),
        "{login:?}"
    );
    // Without the ticket, nothing.
    assert_eq!(http_get(&http, "/").await?.0, 401);
    assert_eq!(http_get(&http, "/api/overview").await?.0, 401);

    let mut b = Browser::launch().await?;
    b.open(&login.url).await?;
    b.wait(
        "the node in the page",
        "document.getElementById('node-edge-1') !== null",
    )
    .await?;
    assert_eq!(
        b.eval("location.pathname + location.search").await?,
        json!("/"),
        "the ticket is gone from the address bar"
    );
    assert_eq!(
        b.eval("document.querySelectorAll('#nodes img').length")
            .await?,
        json!(0),
        "a label's markup must not become an element"
    );
    let region = b
        .eval("document.getElementById('node-edge-1').innerText")
        .await?;
    assert!(
        region.as_str().unwrap_or_default().contains("<img src=x"),
        "{region}"
    );
    b.wait(
        "a pushed update",
        "Number(document.getElementById('updates').dataset.count) >= 2",
    )
    .await?;

    // A call made while the page is open shows up in it as it finishes.
    let mut agent = c.agent();
    let t = c
        .call(&mut agent, "echo", json!({"text": "on the dashboard"}))
        .await?;
    assert_eq!(t.state, pb::TaskState::Succeeded as i32);
    b.wait(
        "the finished task in the page",
        &format!(
            "(document.getElementById('task-{}') || {{dataset: {{}}}}).dataset.status === 'succeeded'",
            t.id
        ),
    )
    .await?;
    b.wait(
        "the tool's card",
        "document.getElementById('tool-echo') !== null",
    )
    .await?;

    // A click on the task opens its story.
    b.eval(&format!("document.getElementById('task-{}').click()", t.id))
        .await?;
    b.wait(
        "the task's detail",
        &format!(
            "document.getElementById('detail-section').dataset.id === '{}' \
             && document.getElementById('detail-section').dataset.status === 'succeeded'",
            t.id
        ),
    )
    .await?;
    let events = b
        .eval("[...document.querySelectorAll('#detail-events tbody tr')].map(r => r.cells[1].innerText + '@' + r.cells[2].innerText).join(' ')")
        .await?;
    let events = events.as_str().unwrap_or_default();
    assert!(
        events.starts_with("submitted@")
            && events.contains("assigned@edge-1")
            && events.ends_with("succeeded@—"),
        "{events}"
    );

    let shot = b
        .call("Page.captureScreenshot", json!({"format": "png"}))
        .await?;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap_or_default())?;
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&path, png)?;
    eprintln!("screenshot: {}", path.display());

    // The login link works once.
    b.open(&login.url).await?;
    b.wait(
        "the used ticket's refusal",
        "document.body && document.body.innerText.includes('already used')",
    )
    .await?;

    // A tenant's token signs in to its own tenant's work: its task, not the admin's, and
    // no hubs or nodes.
    let token = c.agent_token("alice", "tenant-a", &["tools"]).await?;
    let mut alice = c.agent_with(&token);
    let mine = c
        .call(&mut alice, "echo", json!({"text": "alice's"}))
        .await?;
    assert_eq!(mine.state, pb::TaskState::Succeeded as i32);
    let login = alice
        .create_dashboard_login(pb::CreateDashboardLoginRequest {})
        .await?
        .into_inner();
    b.open(&login.url).await?;
    b.wait(
        "the tenant's task",
        &format!("document.getElementById('task-{}') !== null", mine.id),
    )
    .await?;
    assert_eq!(
        b.eval(&format!("document.getElementById('task-{}')", t.id))
            .await?,
        Value::Null,
        "another tenant's task is not shown"
    );
    assert_eq!(
        b.eval("[document.getElementById('nodes-section').hidden, document.getElementById('cluster-section').hidden, document.querySelectorAll('#nodes tbody tr[id]').length]")
            .await?,
        json!([true, true, 0])
    );
    let card = b
        .wait(
            "the tenant's tool card",
            "(document.getElementById('tool-echo') || {}).innerText",
        )
        .await?;
    assert!(
        card.as_str().unwrap_or_default().contains("1 in all"),
        "only the tenant's call counts: {card}"
    );
    let refused = b
        .eval_async(&format!(
            "fetch('/api/task?id={}').then(r => r.status)",
            t.id
        ))
        .await?;
    assert_eq!(
        refused,
        json!(404),
        "another tenant's task reads as missing"
    );
    let own = b
        .eval_async(&format!(
            "fetch('/api/task?id={}').then(r => r.json()).then(t => t.tenant)",
            mine.id
        ))
        .await?;
    assert_eq!(own, json!("tenant-a"));
    // What the hub sends (not only what the page hides): no hubs or nodes, and only
    // tenant-a's queue, tasks and tools; GetOverview says the same.
    let sent = b
        .eval_async("fetch('/api/overview').then(r => r.json())")
        .await?;
    assert_eq!(sent["members"], json!([]), "{sent}");
    assert_eq!(sent["nodes"], json!([]), "{sent}");
    for list in ["queue", "running", "recent"] {
        for item in sent[list].as_array().into_iter().flatten() {
            assert_eq!(item["tenant"], "tenant-a", "{list}: {sent}");
        }
    }
    assert_eq!(sent["recent"].as_array().map(Vec::len), Some(1), "{sent}");
    let o = alice
        .get_overview(pb::GetOverviewRequest {})
        .await?
        .into_inner();
    assert!(!o.admin && o.tenant == "tenant-a", "{o:?}");
    assert!(o.cluster.is_none() && o.nodes.is_empty(), "{o:?}");
    assert_eq!(
        o.recent.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        [mine.id.as_str()]
    );
    let echo = o.tools.iter().find(|t| t.tool == "echo").expect("echo");
    assert_eq!((echo.succeeded, echo.failed), (1, 0), "only alice's call");
    let all = c
        .agent()
        .get_overview(pb::GetOverviewRequest {})
        .await?
        .into_inner();
    assert!(
        all.admin && all.cluster.is_some() && all.nodes.len() == 1,
        "{all:?}"
    );
    assert_eq!(all.recent.len(), 2, "an admin sees both tenants' tasks");
    Ok(())
}
