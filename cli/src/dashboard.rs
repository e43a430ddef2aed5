//! `flotilla dashboard`: a one-time login link to a hub's live dashboard (admin).

use std::process::ExitCode;

use flotilla_proto as pb;
use serde_json::json;

use crate::{
    connect::{admin_client, settings, status_error},
    output::{self, Format},
};

pub(crate) async fn dashboard(c: crate::ClientOnly) -> anyhow::Result<ExitCode> {
    let login = admin_client(&settings(&c.flags)?)?
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
            println!("{}", login.url);
            eprintln!("(a one-time login link: it works once, within 5 minutes)");
        }
    }
    Ok(ExitCode::SUCCESS)
}
