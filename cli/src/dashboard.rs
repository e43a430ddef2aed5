//! `flotilla dashboard`: a one-time login link to a hub's live dashboard, showing what the
//! configured token may see (an admin token: the whole cluster; another: its tenant's work).

use std::process::ExitCode;

use flotilla_proto as pb;
use serde_json::json;

use crate::{
    connect::{agent_client, settings, status_error},
    output::{self, Format},
};

pub(crate) async fn dashboard(c: crate::ClientOnly) -> anyhow::Result<ExitCode> {
    let login = agent_client(&settings(&c.flags)?)?
        .create_dashboard_login(pb::CreateDashboardLoginRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    match c.flags.output {
        Format::Json => output::json(&json!({
            "url": login.url,
            "expires_at": output::time(login.expires_at_ms),
        })),
        Format::Table => {
            outln!("{}", login.url);
            eprintln!("(a one-time login link: it works once, within 5 minutes)");
        }
    }
    Ok(ExitCode::SUCCESS)
}
