//! What an operator's tools see on a hub's HTTP port: Prometheus metrics that count the
//! calls made and that Prometheus's own `promtool` accepts, and health endpoints a load
//! balancer or Kubernetes probe can use.

use std::io::Write;

use flotilla_proto as pb;
use flotilla_tests::{http_get, metric_sample, wait_until, Cluster, NodeSpec, READY};
use serde_json::json;

/// Polls `/readyz` at `http` until it answers 503; the reason it gives.
async fn wait_not_ready(http: &str, what: &str) -> anyhow::Result<String> {
    wait_until(what, READY, || async move {
        let (status, body) = http_get(http, "/readyz").await.ok()?;
        (status == 503).then_some(body)
    })
    .await
}

/// `promtool` with `args` (and `input` on its stdin): its complaints, empty when it is
/// satisfied.
fn promtool(args: &[&str], input: &str) -> String {
    let mut child = std::process::Command::new("promtool")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package) must be installed: .ci/run installs it");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("writing to promtool");
    let out = child.wait_with_output().expect("promtool ran");
    if out.status.success() {
        return String::new();
    }
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

/// `promtool check metrics` on `exposition`: its complaints, if any.
fn promtool_problems(exposition: &str) -> String {
    promtool(&["check", "metrics"], exposition)
}

#[tokio::test]
async fn a_hubs_metrics_count_the_calls_made_and_promtool_accepts_them() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let mut agent = c.agent();
    for i in 0..3 {
        let t = c
            .call(&mut agent, "echo", json!({"text": format!("m{i}")}))
            .await?;
        assert_eq!(t.state, pb::TaskState::Succeeded as i32);
    }
    let failed = c
        .call(&mut agent, "fail", json!({"message": "on purpose"}))
        .await?;
    assert_eq!(failed.state, pb::TaskState::Failed as i32);

    // Two callers without good credentials.
    for token in ["", "not-a-jwt"] {
        let refused = c
            .agent_with(token)
            .list_tools(pb::ListToolsRequest {})
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    }

    let http = c.hub(1).http()?;
    let (status, body) = http_get(&http, "/metrics").await?;
    assert_eq!(status, 200, "{body}");
    let auth =
        |reason: &str| metric_sample(&body, "flotilla_auth_failures_total", &[("reason", reason)]);
    assert_eq!(auth("missing_token"), Some(1.0), "{body}");
    assert_eq!(auth("malformed"), Some(1.0), "{body}");
    let age = metric_sample(
        &body,
        "flotilla_node_heartbeat_age_seconds",
        &[("node", "edge-1")],
    )
    .expect("the leader knows when it last heard from the node");
    assert!((0.0..60.0).contains(&age), "{age}");
    let finished = |tool: &str, outcome: &str| {
        metric_sample(
            &body,
            "flotilla_tasks_finished_total",
            &[("tool", tool), ("outcome", outcome)],
        )
    };
    assert_eq!(finished("echo", "succeeded"), Some(3.0), "{body}");
    assert_eq!(finished("fail", "failed"), Some(1.0), "{body}");
    assert_eq!(
        metric_sample(&body, "flotilla_tasks_submitted_total", &[("tool", "echo")]),
        Some(3.0)
    );
    assert_eq!(
        metric_sample(
            &body,
            "flotilla_task_duration_seconds_count",
            &[("tool", "echo")]
        ),
        Some(3.0)
    );
    assert_eq!(
        metric_sample(&body, "flotilla_task_queue_wait_seconds_count", &[]),
        Some(4.0)
    );
    assert_eq!(
        metric_sample(&body, "flotilla_raft_is_leader", &[]),
        Some(1.0)
    );
    assert_eq!(
        metric_sample(&body, "flotilla_nodes", &[("status", "ready")]),
        Some(1.0)
    );
    let applied = metric_sample(&body, "flotilla_raft_applied_index", &[]).unwrap_or(0.0);
    assert!(applied > 0.0, "{body}");
    // Entries are committed before they are applied.
    assert!(
        metric_sample(&body, "flotilla_raft_commit_index", &[]).unwrap_or(0.0) >= applied,
        "{body}"
    );
    // Never a task id in a label: the series do not grow with the calls.
    assert!(
        !body.contains(&failed.id),
        "a task id in the metrics:\n{body}"
    );
    assert_eq!(promtool_problems(&body), "", "promtool check metrics");
    // The hub logs to a file here: plain text, no terminal colour codes.
    let log = c.hub(1).proc.log_text();
    assert!(
        log.contains("hub serving") && !log.contains('\x1b'),
        "{log}"
    );
    Ok(())
}

#[tokio::test]
async fn grpc_requests_are_counted_by_method_and_status_code() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let mut agent = c.agent();
    let t = c.call(&mut agent, "echo", json!({"text": "hi"})).await?;
    assert_eq!(t.state, pb::TaskState::Succeeded as i32);
    // Refused at once (the status rides in the response headers).
    let missing = agent
        .get_task(pb::GetTaskRequest {
            task_id: "no-such-task".into(),
        })
        .await
        .expect_err("unknown task");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    // A stream the caller walks away from.
    let long = agent
        .submit_task(flotilla_tests::submit("sleep", json!({"ms": 60000})))
        .await?
        .into_inner()
        .task_id;
    let mut watch = agent
        .watch_task(pb::WatchTaskRequest {
            task_id: long.clone(),
            from_seq: 0,
        })
        .await?
        .into_inner();
    watch.message().await?.expect("the first event");
    drop(watch);

    let http = c.hub(1).http()?;
    let count = |body: &str, method: &str, code: &str| {
        metric_sample(
            body,
            "flotilla_grpc_requests_total",
            &[
                ("service", "flotilla.v1.AgentService"),
                ("method", method),
                ("code", code),
            ],
        )
    };
    let body = wait_until("the dropped watch to be counted", READY, || {
        let http = http.clone();
        async move {
            let (_, body) = http_get(&http, "/metrics").await.ok()?;
            count(&body, "WatchTask", "CANCELLED").map(|_| body)
        }
    })
    .await?;
    assert_eq!(count(&body, "SubmitTask", "OK"), Some(2.0), "{body}");
    assert_eq!(count(&body, "GetTask", "NOT_FOUND"), Some(1.0), "{body}");
    assert!(
        count(&body, "GetTask", "OK").unwrap_or(0.0) >= 1.0,
        "{body}"
    );
    assert_eq!(
        metric_sample(
            &body,
            "flotilla_grpc_request_duration_seconds_count",
            &[("method", "SubmitTask")]
        ),
        Some(2.0)
    );
    // The node's session is a gRPC stream too, still open: not counted yet.
    assert_eq!(
        metric_sample(
            &body,
            "flotilla_grpc_requests_total",
            &[
                ("service", "flotilla.v1.NodeService"),
                ("method", "Session")
            ]
        ),
        None,
        "{body}"
    );
    assert_eq!(promtool_problems(&body), "", "promtool check metrics");
    Ok(())
}

#[tokio::test]
async fn every_hub_says_it_is_alive_and_ready_once_it_has_a_leader() -> anyhow::Result<()> {
    let c = Cluster::with_hubs(3).await?;
    for h in &c.hubs {
        let http = h.http()?;
        let (status, body) = http_get(&http, "/healthz").await?;
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        wait_until(&format!("hub {} to be ready", h.id), READY, || {
            let http = http.clone();
            async move {
                let (status, _) = http_get(&http, "/readyz").await.ok()?;
                (status == 200).then_some(())
            }
        })
        .await?;
        let (status, body) = http_get(&http, "/metrics").await?;
        assert_eq!(status, 200);
        assert_eq!(promtool_problems(&body), "", "hub {}", h.id);
    }
    // An unknown path is a 404, not a page.
    let (status, _) = http_get(&c.hub(1).http()?, "/no-such-page").await?;
    assert_eq!(status, 404);
    Ok(())
}

#[tokio::test]
async fn a_hub_without_a_quorum_is_alive_but_not_ready() -> anyhow::Result<()> {
    let mut c = Cluster::with_hubs(3).await?;
    let leader = c.wait_leader().await?;
    let others: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    c.kill_hub(others[0]);
    c.kill_hub(others[1]);
    let http = c.hub(leader).http()?;
    let why = wait_not_ready(&http, "the lone hub to say it is not ready").await?;
    assert!(why.contains("no leader"), "{why}");
    let (status, _) = http_get(&http, "/healthz").await?;
    assert_eq!(status, 200, "alive all the same");
    Ok(())
}

/// `s` with everything but letters, digits and `-_.~` percent-encoded (for a URL query).
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Debian's Prometheus on a free port, scraping every second with `scrape_configs` (YAML
/// list items indented two spaces); the process and its API's base URL.
async fn prometheus(
    dir: &std::path::Path,
    scrape_configs: &str,
) -> anyhow::Result<(flotilla_tests::Proc, String)> {
    std::fs::create_dir_all(dir)?;
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n{scrape_configs}"),
    )?;
    let log = dir.join("prometheus.log");
    let prometheus = flotilla_tests::Proc::spawn_program(
        "prometheus",
        "prometheus",
        &[
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", dir.join("data").display()),
            "--web.listen-address=127.0.0.1:0",
        ],
        &[],
        &log,
    )?;
    let api = wait_until("Prometheus to listen", READY, || {
        let text = prometheus.log_text();
        async move {
            let at = text.find("msg=\"Listening on\" address=")?;
            let addr = text[at..]
                .split_once("address=")?
                .1
                .split_whitespace()
                .next()?;
            Some(format!("http://{addr}"))
        }
    })
    .await?;
    Ok((prometheus, api))
}

/// The result of PromQL query `q` on the Prometheus at `api`, once it answers.
async fn query(api: &str, q: &str) -> Option<Vec<serde_json::Value>> {
    let path = format!("/api/v1/query?query={}", url_encode(q));
    let (status, body) = http_get(api, &path).await.ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    (status == 200).then(|| v["data"]["result"].as_array().cloned())?
}

#[tokio::test]
async fn a_real_prometheus_scrapes_every_hub_and_sees_the_calls() -> anyhow::Result<()> {
    let mut c = Cluster::with_hubs(3).await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let mut agent = c.agent();
    for i in 0..5 {
        c.call(&mut agent, "echo", json!({"text": format!("p{i}")}))
            .await?;
    }
    // Debian's Prometheus, on a free port, scraping each hub every second.
    let targets: Vec<String> = c
        .hubs
        .iter()
        .map(|h| {
            h.http()
                .map(|a| format!("\"{}\"", a.trim_start_matches("http://")))
        })
        .collect::<anyhow::Result<_>>()?;
    let (_prometheus, api) = prometheus(
        &c.dir.path().join("prometheus"),
        &format!(
            "  - job_name: flotilla-hubs\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .await?;
    // Every hub up, and every hub counted the five calls.
    let up = wait_until("Prometheus to scrape all three hubs", READY, || async {
        let r = query(&api, "up{job=\"flotilla-hubs\"} == 1").await?;
        (r.len() == 3).then_some(r)
    })
    .await?;
    assert_eq!(up.len(), 3);
    let finished = wait_until(
        "Prometheus to see the calls on every hub",
        READY,
        || async {
            let r = query(
                &api,
                "flotilla_tasks_finished_total{tool=\"echo\",outcome=\"succeeded\"}",
            )
            .await?;
            let all_five = r.len() == 3 && r.iter().all(|s| s["value"][1] == "5");
            all_five.then_some(r)
        },
    )
    .await?;
    assert_eq!(finished.len(), 3, "{finished:?}");
    Ok(())
}

#[test]
fn the_prometheus_config_and_rules_in_deploy_pass_promtool() {
    // The config names its rule file relative to itself: checking it checks both.
    let config = deploy().join("prometheus").join("prometheus.yml");
    let problems = promtool(&["check", "config", &config.display().to_string()], "");
    assert_eq!(problems, "");
}

#[tokio::test]
async fn a_nodes_metrics_count_its_tool_calls_and_it_is_ready_only_with_a_hub() -> anyhow::Result<()>
{
    let mut c = Cluster::start().await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let mut agent = c.agent();
    for i in 0..2 {
        c.call(&mut agent, "echo", json!({"text": format!("n{i}")}))
            .await?;
    }
    let tool_error = c.call(&mut agent, "fail", json!({"message": "no"})).await?;
    assert_eq!(tool_error.state, pb::TaskState::Failed as i32);
    let http = std::fs::read_to_string(c.node_dir("edge-1").join("http.addr"))?;
    let (status, body) = http_get(&http, "/metrics").await?;
    assert_eq!(status, 200, "{body}");
    let calls = |tool: &str, outcome: &str| {
        metric_sample(
            &body,
            "flotilla_node_mcp_calls_total",
            &[("server", "demo"), ("tool", tool), ("outcome", outcome)],
        )
    };
    assert_eq!(calls("echo", "ok"), Some(2.0), "{body}");
    assert_eq!(calls("fail", "tool_error"), Some(1.0), "{body}");
    assert_eq!(
        metric_sample(
            &body,
            "flotilla_node_mcp_call_duration_seconds_count",
            &[("server", "demo")]
        ),
        Some(3.0)
    );
    assert_eq!(
        metric_sample(&body, "flotilla_node_mcp_server_up", &[("server", "demo")]),
        Some(1.0)
    );
    assert_eq!(
        metric_sample(&body, "flotilla_node_hub_connected", &[]),
        Some(1.0)
    );
    assert_eq!(promtool_problems(&body), "", "promtool check metrics");
    let (status, _) = http_get(&http, "/readyz").await?;
    assert_eq!(status, 200);

    // Without its hub the node is alive, not ready, and says so.
    c.kill_hub(1);
    let why = wait_not_ready(&http, "the node to say it is not ready").await?;
    assert!(why.contains("no session"), "{why}");
    let (status, body) = http_get(&http, "/metrics").await?;
    assert_eq!(status, 200);
    assert_eq!(
        metric_sample(&body, "flotilla_node_hub_connected", &[]),
        Some(0.0)
    );
    assert_eq!(http_get(&http, "/healthz").await?.0, 200);
    Ok(())
}

#[tokio::test]
async fn a_restarted_hub_counts_from_its_start_not_what_it_replays() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let mut agent = c.agent();
    for i in 0..3 {
        c.call(&mut agent, "echo", json!({"text": format!("r{i}")}))
            .await?;
    }
    let finished = |body: &str| {
        metric_sample(
            body,
            "flotilla_tasks_finished_total",
            &[("tool", "echo"), ("outcome", "succeeded")],
        )
    };
    let (_, body) = http_get(&c.hub(1).http()?, "/metrics").await?;
    assert_eq!(finished(&body), Some(3.0));

    // kill -9 and start again: the hub replays its log, and counts none of it again.
    c.restart_hub(true).await?;
    c.wait_node_connected("edge-1").await?;
    let mut agent = c.agent();
    c.call(&mut agent, "echo", json!({"text": "after"})).await?;
    let (_, body) = http_get(&c.hub(1).http()?, "/metrics").await?;
    assert_eq!(finished(&body), Some(1.0), "{body}");
    Ok(())
}

/// The repository's `deploy/` folder.
fn deploy() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
}

#[test]
fn the_grafana_dashboard_queries_parse_and_use_only_documented_metrics() {
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy().join("grafana").join("flotilla.json"))
            .expect("deploy/grafana/flotilla.json"),
    )
    .expect("the dashboard is JSON");
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    // promtool parses PromQL in rule files: each query becomes a recording rule.
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        rules += &format!(
            "      - record: flotilla_dashboard:panel_{i}\n        expr: {}\n",
            serde_json::to_string(e).expect("a JSON string is a YAML string")
        );
    }
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, rules).expect("writing the rules");
    let problems = promtool(&["check", "rules", &file.display().to_string()], "");
    assert_eq!(problems, "");
    // Every metric a panel reads is one docs/metrics.md documents.
    let docs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md"),
    )
    .expect("docs/metrics.md");
    for e in &exprs {
        for word in e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if let Some(name) = word.strip_prefix("flotilla_") {
                let base = name
                    .trim_end_matches("_bucket")
                    .trim_end_matches("_count")
                    .trim_end_matches("_sum");
                assert!(
                    docs.contains(&format!("`flotilla_{base}`")),
                    "panel query {e:?} reads flotilla_{base}, which docs/metrics.md does not list"
                );
            }
        }
    }
}

/// One span as an OTLP receiver got it.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    trace_id: String,
    name: String,
    attributes: std::collections::BTreeMap<String, String>,
}

/// An OTLP/HTTP receiver on port 0 (what a collector does with `POST /v1/traces`):
/// its base address and what it has received.
async fn otlp_receiver() -> anyhow::Result<(String, std::sync::Arc<std::sync::Mutex<Vec<Received>>>)>
{
    use opentelemetry_proto::tonic::{
        collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse},
        common::v1::any_value::Value,
    };
    use prost::Message;
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let Ok(req) = ExportTraceServiceRequest::decode(body) else {
                    return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
                };
                let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
                    .as_ref()
                    .and_then(|v| v.value.as_ref())
                {
                    Some(Value::StringValue(s)) => s.clone(),
                    Some(Value::IntValue(i)) => i.to_string(),
                    Some(other) => format!("{other:?}"),
                    None => String::new(),
                };
                let mut out = sink.lock().expect("receiver lock");
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|a| a.key == "service.name")
                        .map(|a| text(&a.value))
                        .unwrap_or_default();
                    for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                        out.push(Received {
                            service: service.clone(),
                            trace_id: span.trace_id.iter().map(|b| format!("{b:02x}")).collect(),
                            name: span.name.clone(),
                            attributes: span
                                .attributes
                                .iter()
                                .map(|a| (a.key.clone(), text(&a.value)))
                                .collect(),
                        });
                    }
                }
                (
                    axum::http::StatusCode::OK,
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((format!("http://{addr}"), got))
}

#[tokio::test]
async fn one_trace_covers_a_call_on_the_hub_and_on_the_node() -> anyhow::Result<()> {
    let (endpoint, got) = otlp_receiver().await?;
    let mut c = Cluster::with_options(
        1,
        flotilla_tests::Options {
            otlp_endpoint: Some(endpoint),
            ..Default::default()
        },
    )
    .await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    // The agent's own trace: the call must join it, not start another.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut req = tonic::Request::new(flotilla_tests::submit("echo", json!({"text": "traced"})));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01").parse()?,
    );
    let mut agent = c.agent();
    let id = agent.submit_task(req).await?.into_inner().task_id;
    let done = c.wait_task(&mut agent, &id).await?;
    assert_eq!(done.state, pb::TaskState::Succeeded as i32);

    // Exporters send in batches: wait until both processes' spans of the call arrived.
    let spans = wait_until("spans of the call from the hub and the node", READY, || {
        let got = got.clone();
        let id = id.clone();
        async move {
            let spans: Vec<Received> = got
                .lock()
                .expect("receiver lock")
                .iter()
                .filter(|s| s.trace_id == trace_id)
                .cloned()
                .collect();
            // Batches may split a process's spans: wait for every one the test looks at.
            let wanted = [
                ("flotilla-node", "tools/call echo"),
                ("flotilla-hub", "flotilla.v1.AgentService/SubmitTask"),
                ("flotilla-hub", "admission"),
                ("flotilla-hub", "raft commit"),
                ("flotilla-hub", "task assigned"),
                ("flotilla-hub", "task queued"),
            ];
            let all = wanted
                .iter()
                .all(|(svc, name)| spans.iter().any(|s| s.service == *svc && s.name == *name));
            let node_call = spans.iter().any(|s| {
                s.service == "flotilla-node" && s.attributes.get("flotilla.task_id") == Some(&id)
            });
            (all && node_call).then_some(spans)
        }
    })
    .await?;
    let named = |service: &str, name: &str| {
        spans
            .iter()
            .find(|s| s.service == service && s.name == name)
            .unwrap_or_else(|| panic!("no {name:?} span from {service}: {spans:#?}"))
    };
    let call = named("flotilla-node", "tools/call echo");
    assert_eq!(call.attributes["mcp.method.name"], "tools/call");
    assert_eq!(call.attributes["gen_ai.tool.name"], "echo");
    assert_eq!(call.attributes["flotilla.attempt"], "1");
    assert!(
        call.attributes["flotilla.node_id"].starts_with("edge-1"),
        "{call:?}"
    );
    named("flotilla-hub", "flotilla.v1.AgentService/SubmitTask");
    named("flotilla-hub", "admission");
    named("flotilla-hub", "raft commit");
    let assigned = named("flotilla-hub", "task assigned");
    assert_eq!(assigned.attributes["flotilla.task_id"], id);
    named("flotilla-hub", "task queued");

    // A workflow's steps join the trace of the call that submitted it.
    let wf_trace = "0af7651916cd43dd8448eb211c80319c";
    let mut req = tonic::Request::new(pb::SubmitWorkflowRequest {
        name: "traced".into(),
        steps: vec![flotilla_tests::step(
            "greet",
            "echo",
            &[],
            json!({"text": "step"}),
        )],
        ..Default::default()
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{wf_trace}-b7ad6b7169203331-01").parse()?,
    );
    let wf = agent.submit_workflow(req).await?.into_inner().workflow_id;
    wait_until("the step's span from the node", READY, || {
        let got = got.clone();
        let step_task = format!("{wf}.greet");
        async move {
            got.lock()
                .expect("receiver lock")
                .iter()
                .any(|s| {
                    s.trace_id == wf_trace
                        && s.service == "flotilla-node"
                        && s.attributes.get("flotilla.task_id") == Some(&step_task)
                })
                .then_some(())
        }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn the_http_ports_serve_tls_with_the_operators_certificate_and_prometheus_scrapes_them(
) -> anyhow::Result<()> {
    // The operator's own CA and certificate (as cert-manager or a company CA would give).
    let pki = tempfile::tempdir()?;
    let ca = flotilla_common::pki::Ca::generate("operators")?;
    let cert = ca.issue_hub("metrics", &["127.0.0.1".to_owned()])?;
    let (cert_file, key_file, ca_file) = (
        pki.path().join("http.pem"),
        pki.path().join("http.key"),
        pki.path().join("ca.pem"),
    );
    std::fs::write(&cert_file, &cert.cert_pem)?;
    flotilla_common::pki::write_secret(&key_file, cert.key_pem.as_bytes())?;
    std::fs::write(&ca_file, ca.cert_pem())?;
    let opts = flotilla_tests::Options {
        http_tls: Some((cert_file, key_file)),
        ..Default::default()
    };
    let mut c = Cluster::with_options(1, opts).await?;
    c.add_node(NodeSpec::demo("edge-1")).await?;
    let hub = c.hub(1).http()?;
    let node = std::fs::read_to_string(c.node_dir("edge-1").join("http.addr"))?;
    assert!(hub.starts_with("https://"), "{hub}");
    assert!(node.starts_with("https://"), "{node}");

    let healthz = flotilla_tests::https_get(&hub, "/healthz", ca.cert_pem()).await?;
    assert_eq!((healthz.status, healthz.body.as_str()), (200, "ok\n"));
    wait_until("the node to be ready over TLS", READY, || async {
        let r = flotilla_tests::https_get(&node, "/readyz", ca.cert_pem())
            .await
            .ok()?;
        (r.status == 200).then_some(())
    })
    .await?;
    // Plain HTTP on a TLS port gets no answer; a client that does not trust the CA gets no
    // connection.
    let plain = http_get(&hub.replace("https://", "http://"), "/healthz").await;
    assert!(
        plain.is_err(),
        "plain HTTP answered: {:?}",
        plain.map(|r| r.0)
    );
    let stranger = flotilla_common::pki::Ca::generate("someone else")?;
    assert!(
        flotilla_tests::https_get(&hub, "/healthz", stranger.cert_pem())
            .await
            .is_err(),
        "a certificate from an untrusted CA was accepted"
    );

    // The dashboard's link is https, and its session cookie is never sent over plain HTTP.
    let login = c
        .agent()
        .create_dashboard_login(pb::CreateDashboardLoginRequest {})
        .await?
        .into_inner();
    let path = login
        .url
        .strip_prefix(hub.as_str())
        .unwrap_or_else(|| panic!("{} is not on {hub}", login.url));
    let signed_in = flotilla_tests::https_get(&hub, path, ca.cert_pem()).await?;
    assert_eq!(signed_in.status, 200, "{}", signed_in.body);
    let cookie = signed_in
        .head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_default();
    assert!(cookie.contains("; Secure"), "{cookie}");

    // A real Prometheus scrapes both over TLS, trusting the operator's CA.
    let tls_job = |name: &str, target: &str| {
        format!(
            "  - job_name: {name}\n    scheme: https\n    tls_config:\n      ca_file: {}\n    static_configs:\n      - targets: [\"{}\"]\n",
            ca_file.display(),
            target.trim_start_matches("https://")
        )
    };
    let (_prometheus, api) = prometheus(
        &c.dir.path().join("prometheus"),
        &(tls_job("hub", &hub) + &tls_job("node", &node)),
    )
    .await?;
    let up = wait_until(
        "Prometheus to scrape the hub and the node over TLS",
        READY,
        || async {
            let r = query(&api, "up == 1").await?;
            (r.len() == 2).then_some(r)
        },
    )
    .await?;
    assert_eq!(up.len(), 2, "{up:?}");
    let term = wait_until("the hub's Raft term in Prometheus", READY, || async {
        query(&api, "flotilla_raft_term{job=\"hub\"} >= 1")
            .await
            .filter(|r| !r.is_empty())
    })
    .await?;
    assert_eq!(term.len(), 1);
    Ok(())
}
