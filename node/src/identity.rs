//! The node's identity: on first start it joins with its token (checking the hub's CA
//! against the pin in the token before sending the secret), generates its own key, and
//! stores the certificate it gets; afterwards it uses that certificate (mTLS).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use flotilla_common::{
    config::NodeConfig,
    pki::{self, CertifiedKey},
    tls,
    token::JoinToken,
};
use flotilla_proto::{node_service_client::NodeServiceClient, JoinRequest};

#[derive(Clone)]
pub struct Identity {
    pub node_id: String,
    pub key: CertifiedKey,
    pub ca_pem: String,
    /// Hub API addresses learned when joining.
    pub hubs: Vec<String>,
}

fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("identity")
}

/// Moves a renewed pair (`renewed.key`, `renewed.pem`) in, or finishes a move a crash
/// interrupted: both written, the key moved, or only part of the key written (dropped).
fn finish_renewal(d: &Path) -> anyhow::Result<()> {
    let (key, cert) = (d.join("renewed.key"), d.join("renewed.pem"));
    if !cert.exists() {
        // Nothing renewed, or the key alone was being written: the old pair stands.
        let _ = std::fs::remove_file(&key);
        return Ok(());
    }
    if key.exists() {
        std::fs::rename(&key, d.join("node.key")).context("moving in the renewed key")?;
    }
    std::fs::rename(&cert, d.join("node.pem")).context("moving in the renewed certificate")?;
    pki::sync_dir(&d.join("node.pem"));
    Ok(())
}

impl Identity {
    pub fn load(data_dir: &Path) -> anyhow::Result<Option<Self>> {
        let d = dir(data_dir);
        finish_renewal(&d)?;
        let Some(key) = CertifiedKey::read(&d, "node")? else {
            return Ok(None);
        };
        let ca_pem =
            std::fs::read_to_string(d.join("ca.pem")).context("reading identity/ca.pem")?;
        let node_id = std::fs::read_to_string(d.join("node-id"))
            .context("reading identity/node-id")?
            .trim()
            .to_owned();
        let hubs = std::fs::read_to_string(d.join("hubs"))
            .map(|s| {
                s.lines()
                    .map(str::to_owned)
                    .filter(|l| !l.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        Ok(Some(Self {
            node_id,
            key,
            ca_pem,
            hubs,
        }))
    }

    fn save(&self, data_dir: &Path) -> anyhow::Result<()> {
        let d = dir(data_dir);
        self.key.write(&d, "node")?;
        std::fs::write(d.join("ca.pem"), &self.ca_pem)?;
        std::fs::write(d.join("node-id"), &self.node_id)?;
        std::fs::write(d.join("hubs"), self.hubs.join("\n"))?;
        Ok(())
    }

    /// Keeps a renewed certificate and its key in place of the current pair. Two files
    /// cannot be replaced at once, so the pair is first written beside them (the key, then
    /// the certificate, each whole), then moved in (the key, then the certificate);
    /// [`finish_renewal`] completes a move a crash interrupted, so the pair on disk always
    /// matches.
    pub(crate) fn save_renewed(&self, data_dir: &Path) -> anyhow::Result<()> {
        let d = dir(data_dir);
        pki::write_secret(&d.join("renewed.key"), self.key.key_pem.as_bytes())?;
        pki::write_secret(&d.join("renewed.pem"), self.key.cert_pem.as_bytes())?;
        finish_renewal(&d)
    }

    /// Keeps `ca_pem` (the CA certificates the cluster trusts, from a hub's welcome) as
    /// identity/ca.pem, replacing the file whole.
    pub(crate) fn save_ca(&self, data_dir: &Path) -> anyhow::Result<()> {
        pki::write_whole(&dir(data_dir).join("ca.pem"), self.ca_pem.as_bytes(), 0o644)?;
        Ok(())
    }

    pub fn client_tls(&self) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
        Ok(tls::client_config(&self.ca_pem, Some(&self.key))?)
    }
}

/// Loads the stored identity, or joins the cluster with the configured token.
/// Whether a join that failed with `s` is worth asking again: the hub could not answer,
/// rather than refused. A hub whose certificate the node does not trust (not from the CA
/// the token pins: an impostor) is never asked again.
fn join_may_succeed_later(s: &tonic::Status) -> bool {
    use tonic::Code::*;
    let mut text = s.message().to_ascii_lowercase();
    let mut cause = std::error::Error::source(s);
    while let Some(c) = cause {
        text.push_str(&c.to_string().to_ascii_lowercase());
        cause = c.source();
    }
    !text.contains("certificate")
        && matches!(
            s.code(),
            Unavailable | DeadlineExceeded | ResourceExhausted | Unknown | Aborted
        )
}

pub async fn load_or_join(cfg: &NodeConfig) -> anyhow::Result<Identity> {
    if let Some(id) = Identity::load(&cfg.data_dir)? {
        return Ok(id);
    }
    let Some(token) = &cfg.join_token else {
        bail!(
            "node has no identity in {} and no join_token is configured: create one with `flotilla token create`",
            cfg.data_dir.display()
        );
    };
    let token = JoinToken::parse(token)?;
    let (key_pem, csr_pem) = pki::node_key_and_csr(&cfg.name)?;
    let channel = tls::channel(&cfg.hub, tls::pinned_client_config(&token.ca_pin)?)?;
    let mut client = NodeServiceClient::new(channel);
    let request = JoinRequest {
        token_id: token.id.clone(),
        token_secret: token.secret.clone(),
        name: cfg.name.clone(),
        csr_pem,
    };
    // A hub that cannot answer now (down, electing a leader, overloaded) is asked again,
    // with backoff; a refusal (a bad token, a name taken) ends the start at once.
    let mut pause = std::time::Duration::from_secs(1);
    let resp = loop {
        match client.join(request.clone()).await {
            Ok(r) => break r.into_inner(),
            Err(s) if join_may_succeed_later(&s) => {
                tracing::warn!(hub = %cfg.hub, code = ?s.code(), error = %s.message(), retry_in_s = pause.as_secs(), "could not join yet");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(30));
            }
            Err(s) => bail!("join refused by {}: {}", cfg.hub, s.message()),
        }
    };
    let ca_der = tls::parse_certs(&resp.ca_pem)?;
    let pin_ok = ca_der
        .first()
        .and_then(|c| pki::cert_spki_pin(c))
        .is_some_and(|p| p == token.ca_pin);
    if !pin_ok {
        bail!("the hub answered with a CA that does not match the join token's pin");
    }
    let id = Identity {
        node_id: resp.node_id,
        key: CertifiedKey {
            cert_pem: resp.certificate_pem,
            key_pem,
        },
        ca_pem: resp.ca_pem,
        hubs: resp.hub_endpoints,
    };
    id.save(&cfg.data_dir)?;
    tracing::info!(node_id = %id.node_id, "joined the cluster");
    Ok(id)
}

#[cfg(test)]
mod renewal_tests {
    use super::*;

    fn pair(d: &Path) -> (String, String) {
        (
            std::fs::read_to_string(d.join("node.key")).unwrap(),
            std::fs::read_to_string(d.join("node.pem")).unwrap(),
        )
    }

    #[test]
    fn an_interrupted_renewal_leaves_a_matching_pair_on_disk() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let put = |name: &str, text: &str| std::fs::write(d.join(name), text).unwrap();
        put("node.key", "old key");
        put("node.pem", "old cert");
        // Stopped while the new key was being written: the old pair stands.
        put("renewed.key", "new k");
        finish_renewal(d).unwrap();
        assert_eq!(pair(d), ("old key".into(), "old cert".into()));
        assert!(!d.join("renewed.key").exists());
        // Both written, nothing moved yet: the new pair goes in.
        put("renewed.key", "new key");
        put("renewed.pem", "new cert");
        finish_renewal(d).unwrap();
        assert_eq!(pair(d), ("new key".into(), "new cert".into()));
        // Stopped between the two moves: the certificate follows its key.
        put("node.key", "newer key");
        put("renewed.pem", "newer cert");
        finish_renewal(d).unwrap();
        assert_eq!(pair(d), ("newer key".into(), "newer cert".into()));
        assert!(!d.join("renewed.pem").exists());
    }
}
