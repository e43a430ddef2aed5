//! `flotilla mcp-demo`: an MCP server over stdio built into the binary, so the embedded dev
//! cluster needs nothing else. Tools: echo, sleep (progress, cancellable, read-only and
//! idempotent), hash (real work), fail (a tool error) and crash (exits the process).

use std::time::Duration;

use rmcp::{
    handler::server::{tool::schema_for_output, wrapper::Parameters},
    model::{CallToolResult, ContentBlock, ProgressNotificationParam},
    schemars::JsonSchema,
    service::RequestContext,
    tool, tool_router, ErrorData, RoleServer, ServiceExt,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256, Sha512};

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub(crate) struct EchoArgs {
    /// Text to echo back
    pub text: String,
}

#[derive(Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub(crate) struct EchoOut {
    pub text: String,
}

fn default_steps() -> u32 {
    5
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub(crate) struct SleepArgs {
    /// Total time to sleep, in milliseconds (at most one hour)
    pub ms: u64,
    /// Number of steps, each followed by a progress notification
    #[serde(default = "default_steps")]
    pub steps: u32,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "lowercase")]
pub(crate) enum HashAlgorithm {
    Sha256,
    Sha512,
}

fn default_rounds() -> u32 {
    1
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub(crate) struct HashArgs {
    /// Data to hash (its UTF-8 bytes)
    pub data: String,
    pub algorithm: HashAlgorithm,
    /// Hash the digest again this many times in all (1 to 1,000,000): a knob for CPU work
    #[serde(default = "default_rounds")]
    pub rounds: u32,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub(crate) struct RecordArgs {
    /// A line to append to the file named by FLOTILLA_DEMO_RECORD
    pub(crate) key: String,
    /// Wait this long first (at most a minute), so a call can be caught in flight
    #[serde(default)]
    pub(crate) delay_ms: u64,
}

/// Environment variable naming the file `record` appends to.
pub(crate) const RECORD_ENV: &str = "FLOTILLA_DEMO_RECORD";
/// Set: `echo` fails every call with an MCP error (a broken server, for benchmarks).
pub(crate) const BROKEN_ENV: &str = "FLOTILLA_DEMO_BROKEN";
/// What the `vote` tool answers (default "yes").
pub(crate) const VOTE_ENV: &str = "FLOTILLA_DEMO_VOTE";

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub(crate) struct FailArgs {
    pub message: String,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Demo;

#[tool_router(server_handler)]
impl Demo {
    /// Echo the given text.
    #[tool(
        annotations(read_only_hint = true, idempotent_hint = true),
        output_schema = schema_for_output::<EchoOut>()
    )]
    async fn echo(&self, Parameters(a): Parameters<EchoArgs>) -> Result<CallToolResult, ErrorData> {
        if std::env::var_os(BROKEN_ENV).is_some() {
            return Err(ErrorData::internal_error(
                format!("this server is configured broken ({BROKEN_ENV})"),
                None,
            ));
        }
        let mut r = CallToolResult::success(vec![ContentBlock::text(a.text.clone())]);
        r.structured_content = Some(serde_json::json!({ "text": a.text }));
        Ok(r)
    }

    /// Sleep `ms` milliseconds in `steps` parts, reporting progress after each; stops early when cancelled.
    #[tool(annotations(read_only_hint = true, idempotent_hint = true))]
    async fn sleep(
        &self,
        Parameters(a): Parameters<SleepArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        if a.ms > 3_600_000 {
            return Ok(CallToolResult::error(vec![ContentBlock::text(
                "ms may be at most 3600000",
            )]));
        }
        let steps = a.steps.clamp(1, 10_000);
        let token = ctx.meta.get_progress_token();
        let per_step = Duration::from_millis(a.ms / u64::from(steps));
        for step in 1..=steps {
            tokio::select! {
                _ = ctx.ct.cancelled() => {
                    eprintln!("[mcp-demo] sleep cancelled at step {step}/{steps}");
                    return Err(ErrorData::internal_error("cancelled", None));
                }
                _ = tokio::time::sleep(per_step) => {}
            }
            if let Some(token) = &token {
                let p = ProgressNotificationParam::new(token.clone(), f64::from(step))
                    .with_total(f64::from(steps))
                    .with_message(format!("step {step}/{steps}"));
                let _ = ctx.peer.notify_progress(p).await;
            }
        }
        Ok(CallToolResult::success(vec![ContentBlock::text(format!(
            "slept {} ms in {steps} steps",
            a.ms
        ))]))
    }

    /// Hex digest of `data`, optionally re-hashed `rounds` times.
    #[tool(annotations(read_only_hint = true, idempotent_hint = true))]
    async fn hash(&self, Parameters(a): Parameters<HashArgs>) -> Result<String, String> {
        if !(1..=1_000_000).contains(&a.rounds) {
            return Err("rounds must be between 1 and 1000000".into());
        }
        fn run<D: Digest>(data: &[u8], rounds: u32) -> String {
            let mut out = D::digest(data).to_vec();
            for _ in 1..rounds {
                out = D::digest(&out).to_vec();
            }
            hex::encode(out)
        }
        Ok(match a.algorithm {
            HashAlgorithm::Sha256 => run::<Sha256>(a.data.as_bytes(), a.rounds),
            HashAlgorithm::Sha512 => run::<Sha512>(a.data.as_bytes(), a.rounds),
        })
    }

    /// Append `key` as a line to the file named by FLOTILLA_DEMO_RECORD: a tool with a side effect, to see which calls really ran.
    #[tool]
    async fn record(&self, Parameters(a): Parameters<RecordArgs>) -> Result<String, String> {
        use std::io::Write;
        let path = std::env::var(RECORD_ENV)
            .map_err(|_| format!("{RECORD_ENV} is not set for this server"))?;
        if a.key.contains('\n') {
            return Err("key must be one line".into());
        }
        if a.delay_ms > 60_000 {
            return Err("delay_ms may be at most 60000".into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(a.delay_ms)).await;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("cannot open {path}: {e}"))?;
        // One write of the whole line: O_APPEND keeps concurrent calls' lines whole.
        f.write_all(format!("{}\n", a.key).as_bytes())
            .map_err(|e| format!("cannot write {path}: {e}"))?;
        f.sync_data()
            .map_err(|e| format!("cannot sync {path}: {e}"))?;
        Ok(format!("recorded {}", a.key))
    }

    /// Return a tool error (isError = true) with the given message.
    #[tool]
    async fn fail(&self, Parameters(a): Parameters<FailArgs>) -> CallToolResult {
        CallToolResult::error(vec![ContentBlock::text(a.message)])
    }

    /// Answer this server's vote (FLOTILLA_DEMO_VOTE, default "yes"): servers configured to disagree show how fan-out aggregation decides.
    #[tool(annotations(read_only_hint = true, idempotent_hint = true))]
    async fn vote(&self) -> String {
        std::env::var(VOTE_ENV).unwrap_or_else(|_| "yes".into())
    }

    /// Exit the server process with code 3 (to see a crashing MCP server handled).
    #[tool(annotations(destructive_hint = true))]
    async fn crash(&self) -> String {
        eprintln!("[mcp-demo] crash requested, exiting with code 3");
        std::process::exit(3)
    }
}

pub(crate) async fn serve_stdio() -> anyhow::Result<()> {
    let service = Demo.serve(rmcp::transport::stdio()).await?;
    service.waiting().await?;
    Ok(())
}
