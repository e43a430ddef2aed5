//! The CLI as a user runs it: `flotilla dev` in one process, client commands in others that
//! find the cluster through the client config it wrote.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use flotilla_tests::{flotilla_bin, http_get, wait_until, READY};

/// Runs a client command the way a second shell would after `flotilla dev`: no flags, no
/// FLOTILLA_* variables, only the same home directory.
fn flotilla(home: &std::path::Path, args: &[&str]) -> std::process::Output {
    flotilla_command(home, args)
        .output()
        .expect("running flotilla")
}

fn flotilla_command(home: &std::path::Path, args: &[&str]) -> Command {
    let mut command = Command::new(flotilla_bin());
    command
        .args(args)
        .env("HOME", home)
        .env_remove("FLOTILLA_CONFIG")
        .env_remove("FLOTILLA_TOKEN")
        .env_remove("FLOTILLA_HUB")
        .env_remove("FLOTILLA_CA")
        .env_remove("RUST_LOG");
    command
}

/// Starts `flotilla dev` with a private HOME on port 0 and returns it with its banner, read
/// once the cluster serves the demo tools.
async fn start_dev(home: &std::path::Path, args: &[&str]) -> anyhow::Result<(Dev, String)> {
    let mut dev = Command::new(flotilla_bin())
        .args(["dev", "--listen", "127.0.0.1:0"])
        .args(args)
        .env("HOME", home)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let out = dev.stdout.take().expect("stdout");
    let banner = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(out).lines() {
            let line = line.unwrap_or_default();
            let done = line.contains("Ctrl-C");
            lines.push(line);
            if done {
                break;
            }
        }
        lines.join("\n")
    });
    let dev = Dev(dev);
    let banner = tokio::time::timeout(READY, banner).await??;
    Ok((dev, banner))
}

/// `flotilla dev`, stopped as Ctrl-C stops it when the test ends, however it ends: a
/// failed assertion must not leave a cluster running.
struct Dev(std::process::Child);

impl std::ops::Deref for Dev {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Dev {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Dev {
    /// Ctrl-C, as a user stops it, and its exit status once it has stopped.
    async fn interrupt(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status()?;
        wait_until("dev to stop", READY, || {
            let s = self.0.try_wait().ok().flatten();
            async move { s }
        })
        .await
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if !matches!(self.0.try_wait(), Ok(None)) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if !matches!(self.0.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.0.kill();
    }
}

/// Runs a client command whose reader has already gone away, as `flotilla ... | head`
/// leaves it: it must end with success and without a panic.
fn ends_quietly_into_a_closed_pipe(home: &std::path::Path, args: &[&str]) -> anyhow::Result<()> {
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let o = flotilla_command(home, args)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{args:?}: {o:?}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("cannot write the output"),
        "{args:?}: {stderr}"
    );
    Ok(())
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test]
async fn dev_cluster_then_client_commands() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let home = dir.path();
    let (mut dev, banner) = start_dev(home, &["--nodes", "2"]).await?;
    assert!(banner.contains("dev cluster is up"), "{banner}");
    assert!(home.join(".flotilla/dev/client.toml").exists());
    // The metrics URL it prints answers, as a Prometheus would see it.
    let metrics = banner
        .lines()
        .find_map(|l| l.strip_prefix("Prometheus metrics: "))
        .and_then(|l| l.split(", ").next())
        .expect("the banner names the metrics URL");
    let (base, path) = metrics.split_at(metrics.rfind('/').expect("a path"));
    let (status, body) = flotilla_tests::http_get(base, path).await?;
    assert_eq!(status, 200);
    assert!(body.contains("flotilla_raft_is_leader"), "{body}");

    let o = flotilla(home, &["call", "echo", "--args", r#"{"text":"hi"}"#]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stdout(&o), "hi\n");

    let o = flotilla(
        home,
        &[
            "call",
            "hash",
            "--args",
            r#"{"data":"abc","algorithm":"sha256"}"#,
            "-o",
            "json",
        ],
    );
    let task: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(task["state"], "succeeded");
    assert_eq!(
        task["result"]["content"][0]["text"],
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let id = task["id"].as_str().expect("id").to_owned();
    let node = task["attempts"][0]["node"]
        .as_str()
        .expect("node")
        .to_owned();

    let o = flotilla(home, &["task", "get", &id, "-o", "json"]);
    let got: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(got["id"], id.as_str());
    let o = flotilla(
        home,
        &["task", "list", "--state", "succeeded", "-o", "json"],
    );
    let list: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert!(list
        .as_array()
        .expect("array")
        .iter()
        .any(|t| t["id"] == id.as_str()));

    // Watching a finished task prints its result; cancelling a running one ends it.
    let o = flotilla(home, &["task", "watch", &id]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        stdout(&o),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
    );
    let o = flotilla(
        home,
        &["call", "sleep", "--args", r#"{"ms":60000}"#, "--no-wait"],
    );
    let long = stdout(&o).trim().to_owned();
    wait_until("the sleep to run", READY, || {
        let o = flotilla(home, &["task", "get", &long, "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        async move { (v["state"] == "running").then_some(()) }
    })
    .await?;
    // `top` into a pipe prints one view: the nodes, the tools' totals, the running sleep.
    let o = flotilla(home, &["top"]);
    assert!(o.status.success(), "{o:?}");
    let view = stdout(&o);
    assert!(
        view.contains("leader hub 1") && view.contains("node-1") && view.contains("node-2"),
        "{view}"
    );
    let total = |tool: &str| {
        view.lines()
            .find(|l| l.starts_with(&format!("{tool} ")))
            .and_then(|l| l.split_whitespace().nth(4))
            .map(str::to_owned)
    };
    assert_eq!(total("echo").as_deref(), Some("1"), "{view}");
    assert_eq!(total("hash").as_deref(), Some("1"), "{view}");
    let running = view
        .lines()
        .find(|l| l.starts_with(&long[..8]))
        .unwrap_or_else(|| panic!("the sleep is listed: {view}"));
    assert!(
        running.contains(" sleep ") && running.contains(" running "),
        "{running}"
    );

    let o = flotilla(home, &["task", "cancel", &long]);
    assert!(stdout(&o).contains("cancelled"), "{o:?}");

    // A reader that stops reading (`flotilla task list | head -1`) ends the command
    // quietly: no panic, no backtrace, success.
    ends_quietly_into_a_closed_pipe(home, &["task", "list"])?;
    ends_quietly_into_a_closed_pipe(home, &["call", "echo", "--args", r#"{"text":"hi"}"#])?;
    // Any other failure to write (a full disk behind a redirect) is an error.
    let o = flotilla_command(home, &["task", "list"])
        .stdout(std::fs::File::create("/dev/full")?)
        .output()?;
    assert!(!o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot write the output"),
        "{o:?}"
    );

    // A failing tool: non-zero exit, the tool's message on stderr.
    let o = flotilla(home, &["call", "fail", "--args", r#"{"message":"boom"}"#]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("boom"));
    // Bad arguments: a precise error, non-zero exit.
    let o = flotilla(home, &["call", "echo", "--args", r#"{"nope":1}"#]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("InvalidArgument"),
        "{o:?}"
    );

    let o = flotilla(home, &["nodes", "-o", "json"]);
    let nodes: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let nodes = nodes.as_array().expect("array");
    assert_eq!(nodes.len(), 2);
    assert!(nodes
        .iter()
        .any(|n| n["id"] == node.as_str() && n["connected"] == true));
    let zones: Vec<&str> = nodes.iter().filter_map(|n| n["zone"].as_str()).collect();
    assert!(zones.contains(&"a") && zones.contains(&"b"), "{zones:?}");
    // Each node says where its HTTP port is, and it answers there.
    for n in nodes {
        let http = n["http_address"].as_str().expect("http_address");
        assert_eq!(http_get(http, "/healthz").await?.0, 200, "{n}");
    }

    let o = flotilla(home, &["tools"]);
    assert!(stdout(&o).contains("sleep"));
    let o = flotilla(home, &["cluster", "status", "-o", "json"]);
    let st: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(st["leader_id"], 1);
    assert!(
        st["commit_index"].as_u64() >= st["applied_index"].as_u64()
            && st["applied_index"].as_u64() > Some(0),
        "{st}"
    );
    assert!(st["members"][0]["address"]
        .as_str()
        .expect("address")
        .starts_with("https://127.0.0.1:"));
    let http = st["members"][0]["http_address"]
        .as_str()
        .expect("http_address");
    assert_eq!(http_get(http, "/healthz").await?.0, 200, "{st}");

    let o = flotilla(home, &["token", "create", "--uses", "2"]);
    assert!(stdout(&o).starts_with("flt1."), "{o:?}");
    let o = flotilla(
        home,
        &[
            "agent-token",
            "issue",
            "--subject",
            "ci",
            "--scopes",
            "tools",
        ],
    );
    let jwt = stdout(&o).trim().to_owned();
    assert_eq!(jwt.split('.').count(), 3, "{o:?}");
    // The issued token works for calls but not for admin commands.
    let o = Command::new(flotilla_bin())
        .args([
            "call",
            "echo",
            "--args",
            r#"{"text":"as ci"}"#,
            "--token",
            &jwt,
        ])
        .env("HOME", home)
        .output()?;
    assert_eq!(stdout(&o), "as ci\n");
    let o = Command::new(flotilla_bin())
        .args(["nodes", "--token", &jwt])
        .env("HOME", home)
        .output()?;
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("PermissionDenied"));

    // Options a user sets on the command line: a required zone, fan-out, retries.
    let o = flotilla(
        home,
        &[
            "call",
            "echo",
            "--args",
            r#"{"text":"z"}"#,
            "--require",
            "zone=b",
            "-o",
            "json",
        ],
    );
    let t: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let on = t["attempts"][0]["node"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let zone_of = |n: &str| {
        nodes
            .iter()
            .find(|x| x["id"] == n)
            .and_then(|x| x["zone"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(zone_of(&on), "b", "{t}");
    let o = flotilla(
        home,
        &[
            "call",
            "vote",
            "--replicas",
            "2",
            "--aggregate",
            "majority",
            "-o",
            "json",
        ],
    );
    let t: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(t["replicas"].as_array().map(Vec::len), Some(2), "{t}");
    let o = flotilla(
        home,
        &[
            "call",
            "fail",
            "--args",
            r#"{"message":"x"}"#,
            "--max-attempts",
            "2",
            "--retry-on",
            "tool_error",
            "--backoff-ms",
            "10",
        ],
    );
    assert!(!o.status.success());
    let o = flotilla(home, &["task", "list", "--dead", "-o", "json"]);
    let dead: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert!(
        dead.as_array().is_some_and(|d| d
            .iter()
            .any(|t| t["tool"] == "fail" && t["attempts"].as_array().map(Vec::len) == Some(2))),
        "{dead}"
    );

    // The example workflow from the docs runs as a user would run it.
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/workflow.yaml");
    let o = flotilla(
        home,
        &[
            "workflow",
            "run",
            example.to_str().unwrap_or_default(),
            "-o",
            "json",
        ],
    );
    assert!(o.status.success(), "{o:?}");
    let w: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(w["state"], "succeeded", "{w}");
    let report = w["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "report"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        report["result"]["content"][0]["text"],
        "sha256(abc) = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad; slept 500 ms in 2 steps; vote yes",
        "{w}"
    );

    // Ctrl-C (SIGINT) stops the whole cluster.
    let status = dev.interrupt().await?;
    assert!(status.success(), "{status}");
    let o = flotilla(home, &["tools"]);
    assert!(!o.status.success(), "the hub is gone after dev stopped");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no hub answered; tried https://127.0.0.1:"),
        "says which hubs it tried: {err}"
    );
    Ok(())
}

#[tokio::test]
async fn dev_with_three_hubs_survives_killing_the_leader() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let home = dir.path();
    let (mut dev, banner) = start_dev(home, &["--hubs", "3"]).await?;
    assert!(banner.contains("3 hub(s)"), "{banner}");
    // The dashboard link it prints signs a browser in, once.
    let link = banner
        .lines()
        .find_map(|l| l.strip_prefix("Dashboard: "))
        .and_then(|l| l.split_whitespace().next())
        .expect("dev prints a dashboard link");
    let (base, path) = link.split_at(link.find("/login").expect("a login link"));
    let (status, page) = http_get(base, path).await?;
    assert_eq!(status, 200, "{link}");
    assert!(page.contains("url=/"), "moves on to the dashboard: {page}");
    assert_eq!(http_get(base, path).await?.0, 401, "used once: {link}");

    let o = flotilla(home, &["cluster", "status", "-o", "json"]);
    let st: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let members = st["members"].as_array().expect("members");
    assert_eq!(members.len(), 3, "{st}");
    let leader = st["leader_id"].as_u64().expect("leader");
    // Whichever hub answers, every member's HTTP address is known and answers.
    for m in members {
        let http = m["http_address"].as_str().expect("http_address");
        assert_eq!(http_get(http, "/healthz").await?.0, 200, "{st}");
    }

    // Each hub is its own process: kill -9 the leader's.
    let config = home.join(format!(".flotilla/dev/hub-{leader}/hub.toml"));
    let pgrep = Command::new("pgrep")
        .args(["-f", &config.display().to_string()])
        .output()?;
    let pid = String::from_utf8_lossy(&pgrep.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(!pid.is_empty(), "the leader hub's process");
    Command::new("kill").args(["-9", &pid]).status()?;

    // The client config lists every hub: the next call works as it is, whichever hub
    // died (hub 1 included), with no retry by the user.
    let o = flotilla(
        home,
        &["call", "echo", "--args", r#"{"text":"still here"}"#],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(stdout(&o), "still here\n");
    let st: serde_json::Value =
        serde_json::from_slice(&flotilla(home, &["cluster", "status", "-o", "json"]).stdout)?;
    assert_ne!(st["leader_id"].as_u64(), Some(leader), "a new leader: {st}");
    let dead = st["members"]
        .as_array()
        .expect("members")
        .iter()
        .find(|m| m["id"].as_u64() == Some(leader))
        .expect("the killed hub is still a member");
    assert_eq!(dead["http_address"], "", "a hub that does not answer: {st}");

    // dev kept running through the kill.
    assert!(
        dev.try_wait()?.is_none(),
        "dev must not stop when a member dies"
    );
    dev.interrupt().await?;
    Ok(())
}

/// `flotilla dev > closed pipe`: the banner is lost, with a warning, and the cluster serves
/// on; Ctrl-C still stops it, members and all.
#[tokio::test]
async fn dev_carries_on_when_its_output_reader_is_gone() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let home = dir.path();
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let mut dev = Dev(flotilla_command(home, &["dev", "--listen", "127.0.0.1:0"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()?);
    // Its stderr is read to the end (a reader that went away there would be another test).
    let err = dev.stderr.take().expect("stderr");
    let (warned, heard) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut warned = Some(warned);
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if line.contains("cannot write to standard output; carrying on") {
                if let Some(w) = warned.take() {
                    let _ = w.send(());
                }
            }
        }
    });
    tokio::time::timeout(READY, heard)
        .await?
        .map_err(|_| anyhow::anyhow!("dev ended without warning that its banner was lost"))?;
    assert!(dev.try_wait()?.is_none(), "dev runs on");
    let o = flotilla(
        home,
        &["call", "echo", "--args", r#"{"text":"still here"}"#],
    );
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stdout(&o), "still here\n");
    let status = dev.interrupt().await?;
    assert!(status.success(), "{status}");
    let o = flotilla(home, &["tools"]);
    assert!(!o.status.success(), "the hub is gone after dev stopped");
    Ok(())
}

/// Ctrl-C while `flotilla dev` is still starting its members stops the ones already
/// running (it used to kill dev outright and leave them behind).
#[tokio::test]
async fn ctrl_c_during_dev_start_up_stops_the_members_already_started() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let home = dir.path();
    let mut dev = Dev(
        flotilla_command(home, &["dev", "--listen", "127.0.0.1:0", "--hubs", "3"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let addr_file = home.join(".flotilla/dev/hub-1/listen.addr");
    let addr = wait_until("hub 1 to listen", READY, || {
        let addr = std::fs::read_to_string(&addr_file).ok().and_then(|a| {
            let a = a.trim();
            a.strip_prefix("https://")
                .unwrap_or(a)
                .parse::<std::net::SocketAddr>()
                .ok()
        });
        async move { addr }
    })
    .await?;
    // Interrupted before the cluster was up (an error), or just after (success): either
    // way every member is stopped before dev exits.
    dev.interrupt().await?;
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "hub 1 still listens on {addr} after dev stopped"
    );
    Ok(())
}

#[test]
fn shell_completions_are_valid_scripts_that_know_the_commands() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for (shell, checker) in [("bash", "bash"), ("zsh", ""), ("fish", "")] {
        let o = flotilla(dir.path(), &["completions", shell]);
        assert!(o.status.success(), "{shell}: {o:?}");
        let script = stdout(&o);
        assert!(
            script.contains("dashboard") && script.contains("workflow"),
            "{shell}"
        );
        ends_quietly_into_a_closed_pipe(dir.path(), &["completions", shell])?;
        if checker.is_empty() {
            continue;
        }
        // The script parses (`bash -n`).
        let path = dir.path().join(format!("flotilla.{shell}"));
        std::fs::write(&path, &script)?;
        let check = Command::new(checker).arg("-n").arg(&path).output()?;
        assert!(check.status.success(), "{shell}: {check:?}");
    }
    Ok(())
}

/// A hub set up as the Helm chart sets one up: a CA from `flotilla ca init`, one hub.toml
/// filled in from the environment, the id from the host name (`HOSTNAME`, as a StatefulSet
/// pod has), and the admin token read back with `flotilla admin-token`.
#[tokio::test]
async fn a_hub_configured_as_a_statefulset_pod_serves_with_a_ca_made_by_ca_init(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let home = dir.path();
    let ca = home.join("ca");
    let o = flotilla(home, &["ca", "init", "--out", &ca.display().to_string()]);
    assert!(o.status.success(), "{o:?}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(ca.join("ca.key"))?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Never over an existing CA.
    let again = flotilla(home, &["ca", "init", "--out", &ca.display().to_string()]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("exists"),
        "{again:?}"
    );

    let data = home.join("hub-data");
    let config = home.join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "id_from_hostname = true\ndata_dir = \"${{DATA}}\"\nlisten = \"127.0.0.1:0\"\n\
             raft_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nbootstrap = true\n\
             ca_cert = \"{0}/ca.pem\"\nca_key = \"{0}/ca.key\"\n",
            ca.display()
        ),
    )?;
    // A variable that is not set stops the start, naming it.
    let unset = Command::new(flotilla_bin())
        .args(["hub", "--config", &config.display().to_string()])
        .env_remove("DATA")
        .output()?;
    assert!(!unset.status.success());
    assert!(
        String::from_utf8_lossy(&unset.stderr).contains("DATA is not set"),
        "{unset:?}"
    );

    let log = home.join("hub.log");
    let data_s = data.display().to_string();
    let _hub = flotilla_tests::Proc::spawn_program(
        &flotilla_bin().display().to_string(),
        "hub",
        &["hub", "--config", &config.display().to_string()],
        &[("HOSTNAME", "flotilla-hub-4"), ("DATA", &data_s)],
        &log,
    )?;
    let token = wait_until("the hub's admin token", READY, || {
        let o = flotilla(home, &["admin-token", "--data-dir", &data_s]);
        async move { o.status.success().then(|| stdout(&o).trim().to_owned()) }
    })
    .await?;
    let api = std::fs::read_to_string(data.join("listen.addr"))?;
    let o = Command::new(flotilla_bin())
        .args(["cluster", "status", "-o", "json"])
        .env("HOME", home)
        .env("FLOTILLA_HUB", api.trim())
        .env("FLOTILLA_CA", ca.join("ca.pem"))
        .env("FLOTILLA_TOKEN", &token)
        .output()?;
    assert!(o.status.success(), "{o:?}");
    let status: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(status["leader_id"], 5, "flotilla-hub-4 is hub 5: {status}");
    // A data dir without a token says so.
    let none = flotilla(
        home,
        &["admin-token", "--data-dir", &home.display().to_string()],
    );
    assert_eq!(none.status.code(), Some(3));
    Ok(())
}
