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

impl Identity {
    pub fn load(data_dir: &Path) -> anyhow::Result<Option<Self>> {
        let d = dir(data_dir);
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

    pub fn client_tls(&self) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
        Ok(tls::client_config(&self.ca_pem, Some(&self.key))?)
    }
}

/// Loads the stored identity, or joins the cluster with the configured token.
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
    let resp = client
        .join(JoinRequest {
            token_id: token.id.clone(),
            token_secret: token.secret.clone(),
            name: cfg.name.clone(),
            csr_pem,
        })
        .await
        .map_err(|s| anyhow::anyhow!("join refused by {}: {}", cfg.hub, s.message()))?
        .into_inner();
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
