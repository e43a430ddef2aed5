//! Setting a cluster up outside `flotilla dev`: `flotilla ca init` makes the cluster CA
//! that every hub is given (a Kubernetes Secret, files on each machine), and
//! `flotilla admin-token` prints the admin token a hub left in its data dir when it first
//! led (run it where the hub runs, e.g. `kubectl exec`).

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub(crate) enum CaCommand {
    /// Make a new cluster CA: `ca.pem` (the certificate, for hubs and clients) and
    /// `ca.key` (its private key, mode 0600, for hubs only) in `--out`.
    Init {
        /// Directory to write into (created if missing); existing files are never replaced.
        #[arg(long)]
        out: PathBuf,
        /// The cluster's name, in the CA's subject.
        #[arg(long, default_value = "flotilla")]
        cluster_name: String,
        /// When `--out` already holds a CA (both files), leave it and succeed (for a setup
        /// step that runs at every start).
        #[arg(long)]
        exists_ok: bool,
    },
}

pub(crate) fn ca(cmd: CaCommand) -> anyhow::Result<ExitCode> {
    let CaCommand::Init {
        out,
        cluster_name,
        exists_ok,
    } = cmd;
    if exists_ok && out.join("ca.pem").exists() && out.join("ca.key").exists() {
        outln!("{}", out.join("ca.pem").display());
        eprintln!("(a CA is already there; left as it is)");
        return Ok(ExitCode::SUCCESS);
    }
    for name in ["ca.pem", "ca.key"] {
        anyhow::ensure!(
            !out.join(name).exists(),
            "{} exists: a new CA would lock out every hub and node that trusts the old one; remove it yourself if that is what you want",
            out.join(name).display()
        );
    }
    let ca = flotilla_common::pki::Ca::generate(&cluster_name).context("generating the CA")?;
    ca.certified_key()
        .write(&out, "ca")
        .with_context(|| format!("writing into {}", out.display()))?;
    outln!("{}", out.join("ca.pem").display());
    outln!("{}", out.join("ca.key").display());
    eprintln!(
        "(ca.key signs every hub and node certificate: give it to hubs only, e.g. \
         kubectl create secret generic flotilla-ca --from-file={0}/ca.pem --from-file={0}/ca.key)",
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub(crate) struct AdminTokenArgs {
    /// The hub's data directory.
    #[arg(long)]
    data_dir: PathBuf,
}

pub(crate) fn admin_token(a: AdminTokenArgs) -> anyhow::Result<ExitCode> {
    let path = a.data_dir.join(flotilla_hub::ADMIN_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(token) => {
            outln!("{}", token.trim());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "no admin token in {}: every hub writes one once the cluster has a leader and a signing key; wait, or ask another hub",
                a.data_dir.display()
            );
            Ok(ExitCode::from(3))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}
