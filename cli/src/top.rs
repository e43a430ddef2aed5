//! `flotilla top`: a live terminal view of the cluster, redrawn every second from
//! `GetOverview`: hubs and the leader, nodes, the queue by tenant, calls per second by
//! tool, and the longest-running tasks. It shows what the token may see, as the dashboard
//! does (an admin the whole cluster; anyone else their tenant's work). Ctrl-C quits.
//! When standard output is not a terminal (or with `--once`) it prints one view and exits.

use std::{io::IsTerminal, io::Write, process::ExitCode, time::Duration};

use clap::Args;
use flotilla_proto as pb;

use crate::{
    connect::{agent_client, settings, status_error},
    output::{printable as clean, table_text},
    ClientFlags,
};

#[derive(Args)]
pub(crate) struct TopArgs {
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Print one view and exit (what happens anyway when output is not a terminal).
    #[arg(long)]
    once: bool,
    #[command(flatten)]
    flags: ClientFlags,
}

/// Running tasks listed (the hub sends the 50 longest-running).
const RUNNING_LISTED: usize = 10;

pub(crate) async fn top(a: TopArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        a.interval.is_finite() && (0.1..=3600.0).contains(&a.interval),
        "--interval must be between 0.1 and 3600 seconds"
    );
    let mut client = agent_client(&settings(&a.flags)?)?;
    let once = a.once || !std::io::stdout().is_terminal();
    if once {
        let o = client
            .get_overview(pb::GetOverviewRequest {})
            .await
            .map_err(status_error)?
            .into_inner();
        out!("{}", view(&o, None));
        return Ok(ExitCode::SUCCESS);
    }
    // The terminal's other screen, without a cursor, given back however this ends.
    let _screen = Screen::enter()?;
    let mut out = std::io::stdout();
    let quit = tokio::signal::ctrl_c();
    tokio::pin!(quit);
    let wait = Duration::from_secs_f64(a.interval).max(Duration::from_secs(5));
    let mut prev: Option<pb::Overview> = None;
    loop {
        let asked = tokio::select! {
            r = tokio::time::timeout(wait, client.get_overview(pb::GetOverviewRequest {})) => r,
            _ = &mut quit => return Ok(ExitCode::SUCCESS),
        };
        let text = match asked {
            Ok(Ok(o)) => {
                let o = o.into_inner();
                let text = view(&o, prev.as_ref());
                prev = Some(o);
                text
            }
            // A hub that went away: say so and keep asking (the channel reconnects).
            Ok(Err(e)) => format!(
                "flotilla top: {}\n(trying again every {} s; Ctrl-C quits)\n",
                clean(&status_error(e).to_string()),
                a.interval
            ),
            Err(_) => format!(
                "flotilla top: no answer within {} s\n(trying again; Ctrl-C quits)\n",
                wait.as_secs()
            ),
        };
        write!(out, "\x1b[H\x1b[2J{text}")?;
        out.flush()?;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs_f64(a.interval)) => {}
            _ = &mut quit => return Ok(ExitCode::SUCCESS),
        }
    }
}

/// The terminal's alternate screen with the cursor hidden, while this lives.
struct Screen;

impl Screen {
    fn enter() -> std::io::Result<Self> {
        let mut out = std::io::stdout();
        write!(out, "\x1b[?1049h\x1b[?25l")?;
        out.flush()?;
        Ok(Self)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let mut out = std::io::stdout();
        let _ = write!(out, "\x1b[?25h\x1b[?1049l");
        let _ = out.flush();
    }
}

fn ago(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn short(id: &str) -> String {
    let id = clean(id);
    if id.chars().count() > 13 {
        let head: String = id.chars().take(8).collect();
        let tail: String = id
            .chars()
            .rev()
            .take(4)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("{head}…{tail}")
    } else {
        id
    }
}

/// One screen: `o`, with rates from the growth since `prev` (the previous screen).
fn view(o: &pb::Overview, prev: Option<&pb::Overview>) -> String {
    let mut s = String::new();
    let time = crate::output::time(o.now_ms);
    let who = if o.admin {
        format!("{} (admin: the whole cluster)", clean(&o.subject))
    } else {
        format!("{} (tenant {})", clean(&o.subject), clean(&o.tenant))
    };
    s.push_str(&format!(
        "flotilla top · hub {} · {who} · {time}\n",
        o.hub_id
    ));
    if let Some(c) = &o.cluster {
        let leader = if c.leader_id == 0 {
            "no leader".to_owned()
        } else {
            format!("leader hub {}, term {}", c.leader_id, c.term)
        };
        s.push_str(&format!(
            "\nHUBS · {leader} · commit {} · applied {}\n",
            c.commit_index, c.applied_index
        ));
        let rows: Vec<Vec<String>> = c
            .members
            .iter()
            .map(|m| {
                vec![
                    format!("hub {}", m.id),
                    clean(&m.role),
                    clean(&m.address),
                    if m.http_address.is_empty() {
                        "-".into()
                    } else {
                        clean(&m.http_address)
                    },
                    m.lag.to_string(),
                ]
            })
            .collect();
        s.push_str(&table_text(&["HUB", "ROLE", "API", "HTTP", "LAG"], &rows));
    }
    if o.admin {
        s.push_str(&format!("\nNODES · {}\n", o.nodes.len()));
        let rows: Vec<Vec<String>> = o
            .nodes
            .iter()
            .map(|n| {
                let place = [n.labels.get("region"), n.labels.get("zone")]
                    .into_iter()
                    .flatten()
                    .map(|v| clean(v))
                    .collect::<Vec<_>>()
                    .join("/");
                let status = if n.connected {
                    clean(&n.status)
                } else {
                    format!("{} (disconnected)", clean(&n.status))
                };
                let servers = n
                    .servers
                    .iter()
                    .map(|v| {
                        format!(
                            "{}({} {}/{})",
                            clean(&v.name),
                            clean(&v.state),
                            v.running,
                            v.max_concurrency
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" ");
                vec![
                    clean(&n.id),
                    status,
                    if place.is_empty() { "-".into() } else { place },
                    format!("{:.0}%", n.cpu_percent),
                    n.running.to_string(),
                    servers,
                ]
            })
            .collect();
        s.push_str(&table_text(
            &[
                "NODE",
                "STATUS",
                "REGION/ZONE",
                "CPU",
                "RUNNING",
                "MCP SERVERS",
            ],
            &rows,
        ));
    }
    let queued: u64 = o.queue.iter().map(|q| q.queued).sum();
    s.push_str(&format!("\nQUEUE · {queued} queued\n"));
    if !o.queue.is_empty() {
        let rows: Vec<Vec<String>> = o
            .queue
            .iter()
            .map(|q| vec![clean(&q.tenant), q.queued.to_string()])
            .collect();
        s.push_str(&table_text(&["TENANT", "QUEUED"], &rows));
    }
    s.push_str(&format!(
        "\nTOOLS · calls finished since hub {} started\n",
        o.hub_id
    ));
    // Totals count from the answering hub's start: rates compare two views of one hub
    // (after a failover or a restart, the next view starts again).
    let prev = prev.filter(|p| {
        p.hub_id == o.hub_id
            && o.tools.iter().all(|t| {
                p.tools
                    .iter()
                    .find(|b| b.tool == t.tool)
                    .is_none_or(|b| b.succeeded <= t.succeeded && b.failed <= t.failed)
            })
    });
    let secs = prev
        .map(|p| (o.now_ms - p.now_ms) as f64 / 1000.0)
        .filter(|s| *s > 0.0);
    let rows: Vec<Vec<String>> = o
        .tools
        .iter()
        .map(|t| {
            let before = prev.and_then(|p| p.tools.iter().find(|b| b.tool == t.tool));
            let (calls, errors) = match (secs, before) {
                (Some(secs), Some(b)) => {
                    let calls = (t.succeeded + t.failed).saturating_sub(b.succeeded + b.failed);
                    let errors = t.failed.saturating_sub(b.failed);
                    (
                        format!("{:.1}", calls as f64 / secs),
                        format!("{:.1}", errors as f64 / secs),
                    )
                }
                (Some(secs), None) => (
                    format!("{:.1}", (t.succeeded + t.failed) as f64 / secs),
                    format!("{:.1}", t.failed as f64 / secs),
                ),
                (None, _) => ("-".into(), "-".into()),
            };
            let mean = if t.seconds_count == 0 {
                "-".into()
            } else {
                format!("{:.1}ms", 1000.0 * t.seconds_sum / t.seconds_count as f64)
            };
            vec![
                clean(&t.tool),
                calls,
                errors,
                mean,
                (t.succeeded + t.failed).to_string(),
                t.failed.to_string(),
            ]
        })
        .collect();
    if rows.is_empty() {
        s.push_str("no call has finished\n");
    } else {
        s.push_str(&table_text(
            &["TOOL", "CALLS/S", "ERRORS/S", "MEAN", "TOTAL", "FAILED"],
            &rows,
        ));
    }
    s.push_str(&format!(
        "\nRUNNING · {}{}\n",
        o.running.len(),
        if o.running.len() >= 50 { "+" } else { "" }
    ));
    let rows: Vec<Vec<String>> = o
        .running
        .iter()
        .take(RUNNING_LISTED)
        .map(|t| {
            vec![
                short(&t.id),
                clean(&t.tool),
                clean(&t.tenant),
                clean(&t.status),
                if t.node.is_empty() {
                    "-".into()
                } else {
                    clean(&t.node)
                },
                ago(o.now_ms - t.since_ms),
            ]
        })
        .collect();
    if !rows.is_empty() {
        s.push_str(&table_text(
            &["TASK", "TOOL", "TENANT", "STATE", "NODE", "FOR"],
            &rows,
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overview(now_ms: i64, echo_done: u64, echo_failed: u64) -> pb::Overview {
        pb::Overview {
            now_ms,
            hub_id: 2,
            subject: "ops".into(),
            admin: true,
            cluster: Some(pb::ClusterStatusResponse {
                leader_id: 1,
                term: 4,
                members: vec![pb::ClusterMember {
                    id: 1,
                    role: "leader".into(),
                    address: "https://10.0.0.1:7443".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            nodes: vec![pb::NodeInfo {
                id: "edge-1".into(),
                status: "ready".into(),
                connected: true,
                labels: [("region".to_owned(), "eu\x1b]0;owned\x07".to_owned())].into(),
                ..Default::default()
            }],
            queue: vec![pb::TenantQueue {
                tenant: "acme".into(),
                queued: 3,
            }],
            tools: vec![pb::ToolFigures {
                tool: "echo".into(),
                succeeded: echo_done,
                failed: echo_failed,
                seconds_sum: 0.5,
                seconds_count: 100,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn rates_come_from_the_growth_since_the_last_view() {
        let first = overview(10_000, 100, 0);
        let text = view(&first, None);
        assert!(text.contains("leader hub 1, term 4"), "{text}");
        assert!(text.contains("QUEUE · 3 queued"), "{text}");
        let echo = |t: &str| {
            t.lines()
                .find(|l| l.starts_with("echo"))
                .unwrap()
                .to_owned()
        };
        // No earlier view: no rate yet, the totals.
        let line = echo(&text);
        assert!(
            line.contains(" - ") && line.contains("5.0ms") && line.contains("100"),
            "{line}"
        );
        // 2 s later, 40 more calls of which 10 failed: 20/s, 5/s errors.
        let line = echo(&view(&overview(12_000, 130, 10), Some(&first)));
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&cells[..3], ["echo", "20.0", "5.0"], "{line}");
        // Another hub (a failover), or this one restarted (totals went down): no rate.
        let mut other = overview(12_000, 130, 10);
        other.hub_id = 3;
        let line = echo(&view(&other, Some(&first)));
        assert_eq!(line.split_whitespace().nth(1), Some("-"), "{line}");
        let line = echo(&view(&overview(12_000, 7, 0), Some(&first)));
        assert_eq!(line.split_whitespace().nth(1), Some("-"), "{line}");
    }

    #[test]
    fn what_nodes_say_cannot_drive_the_terminal() {
        let text = view(&overview(0, 0, 0), None);
        assert!(!text.contains('\x1b') && !text.contains('\x07'), "{text:?}");
        assert!(text.contains("eu?]0;owned?"), "{text}");
    }
}
