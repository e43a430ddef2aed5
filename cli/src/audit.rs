//! `flotilla audit`: the audit trail (admin actions, joins, renewals, revocations, tokens
//! issued, refused credentials, and tool calls: submitted, assigned, ended), filtered, as
//! a table or as JSON lines for export.

use std::process::ExitCode;

use clap::Args;
use flotilla_proto as pb;
use serde_json::json;

use crate::{
    connect::{admin_client, settings, status_error},
    output::{self, Format},
    ClientFlags,
};

#[derive(Args)]
pub(crate) struct AuditArgs {
    /// Only records from this long ago on: 90s, 15m, 12h, 7d.
    #[arg(long, value_parser = parse_age)]
    since: Option<i64>,
    /// Only records from before this long ago: 90s, 15m, 12h, 7d.
    #[arg(long, value_parser = parse_age)]
    until: Option<i64>,
    /// Only what this actor did (a token's subject, `node NAME`, `unauthenticated`).
    #[arg(long, default_value = "")]
    actor: String,
    #[arg(long, default_value = "")]
    tenant: String,
    /// Only this kind: denied, join, remove_node, revoke_agent_tokens, rotate_signing_key,
    /// submit, assign, result, ...
    #[arg(long, default_value = "")]
    kind: String,
    /// Leave out tool calls (submit, assign, result).
    #[arg(long)]
    no_calls: bool,
    /// The newest this many records.
    #[arg(long, default_value_t = 1000)]
    limit: u32,
    #[command(flatten)]
    flags: ClientFlags,
}

/// An age like `90s`, `15m`, `12h` or `7d`, in milliseconds.
fn parse_age(s: &str) -> Result<i64, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not an age like 90s, 15m, 12h or 7d"))?;
    let per = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{s:?} is not an age like 90s, 15m, 12h or 7d")),
    };
    n.checked_mul(per)
        .ok_or_else(|| format!("{s:?} is too long ago"))
}

fn record_json(r: &pb::AuditRecord) -> serde_json::Value {
    json!({
        "seq": r.seq,
        "at": output::time(r.at_ms),
        "kind": r.kind,
        "actor": r.actor,
        "tenant": r.tenant,
        "target": r.target,
        "outcome": r.outcome,
        "hub": r.hub,
        "source": r.source,
        "count": r.count,
    })
}

pub(crate) async fn audit(a: AuditArgs) -> anyhow::Result<ExitCode> {
    let since_ms = a
        .since
        .map_or(0, |age| flotilla_common::now_ms().saturating_sub(age));
    let records = admin_client(&settings(&a.flags)?)?
        .list_audit(pb::ListAuditRequest {
            since_ms,
            until_ms: a
                .until
                .map_or(0, |age| flotilla_common::now_ms().saturating_sub(age)),
            actor: a.actor,
            tenant: a.tenant,
            kind: a.kind,
            limit: a.limit,
            without_calls: a.no_calls,
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .records;
    match a.flags.output {
        // JSON lines: one record per line, for export.
        Format::Json => {
            for r in &records {
                outln!("{}", record_json(r));
            }
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = records
                .iter()
                .map(|r| {
                    vec![
                        output::time(r.at_ms),
                        r.kind.clone(),
                        output::printable(&r.actor),
                        output::printable(&r.tenant),
                        output::printable(&r.target),
                        output::printable(&r.outcome),
                        if r.count > 1 {
                            r.count.to_string()
                        } else {
                            String::new()
                        },
                        output::printable(&r.source),
                    ]
                })
                .collect();
            output::table(
                &[
                    "AT", "KIND", "ACTOR", "TENANT", "TARGET", "OUTCOME", "COUNT", "FROM",
                ],
                &rows,
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::parse_age;

    #[test]
    fn ages_read_as_people_write_them() {
        assert_eq!(parse_age("90s"), Ok(90_000));
        assert_eq!(parse_age("15m"), Ok(900_000));
        assert_eq!(parse_age("2h"), Ok(7_200_000));
        assert_eq!(parse_age("7d"), Ok(604_800_000));
        assert!(parse_age("7").is_err());
        assert!(parse_age("h").is_err());
        assert!(parse_age("5w").is_err());
        assert!(parse_age("99999999999999999d").is_err());
    }
}
