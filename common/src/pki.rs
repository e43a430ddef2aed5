//! The cluster CA and the certificates it issues: hubs get server certificates, nodes get
//! client certificates by sending a CSR when they join. Keys are ECDSA P-256.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

/// How long node and hub certificates are valid.
pub const LEAF_VALIDITY: Duration = Duration::days(90);
const CA_VALIDITY: Duration = Duration::days(3650);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid certificate signing request: {0}")]
    BadCsr(String),
    #[error("invalid PEM in {0}")]
    BadPem(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedKey").finish_non_exhaustive()
    }
}

impl CertifiedKey {
    /// Writes `NAME.pem` and `NAME.key` (mode 0600) into `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> Result<(), PkiError> {
        private_dir(dir)?;
        let cert = dir.join(format!("{name}.pem"));
        std::fs::write(&cert, &self.cert_pem).map_err(io_err(&cert))?;
        write_secret(&dir.join(format!("{name}.key")), self.key_pem.as_bytes())
    }

    /// Whether the certificate is for this key (their public keys are the same).
    pub fn pair_matches(&self) -> bool {
        let key = KeyPair::from_pem(&self.key_pem)
            .map(|k| spki_pin(&rcgen::PublicKeyData::subject_public_key_info(&k)));
        let cert = crate::tls::parse_certs(&self.cert_pem)
            .ok()
            .and_then(|c| c.first().and_then(|c| cert_spki_pin(c)));
        matches!((key, cert), (Ok(k), Some(c)) if k == c)
    }

    /// Reads what [`CertifiedKey::write`] wrote; `None` when the certificate is absent.
    pub fn read(dir: &Path, name: &str) -> Result<Option<Self>, PkiError> {
        let cert = dir.join(format!("{name}.pem"));
        if !cert.exists() {
            return Ok(None);
        }
        let key = dir.join(format!("{name}.key"));
        private_file(&key)?;
        Ok(Some(Self {
            cert_pem: std::fs::read_to_string(&cert).map_err(io_err(&cert))?,
            key_pem: std::fs::read_to_string(&key).map_err(io_err(&key))?,
        }))
    }
}

/// Writes a file only the owner can read: 0600 from its first byte, and whole (see
/// [`write_whole`]).
pub fn write_secret(path: &Path, data: &[u8]) -> Result<(), PkiError> {
    write_whole(path, data, 0o600)
}

/// Writes `data` to `path` so that a reader sees the old file or the whole new one, never
/// an empty or partial one (another process polls for these files: the addresses a hub
/// bound, its admin token): into a new file beside it, created with `mode` and synced to
/// disk, then renamed over `path`, and the rename synced (a power cut leaves the old file
/// or the new one, never an empty one).
pub fn write_whole(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    opts.mode(mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(&tmp).map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    sync_dir(path);
    Ok(())
}

/// Syncs the directory holding `path` (its entries: a rename), where the platform allows.
pub fn sync_dir(path: &Path) {
    #[cfg(unix)]
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Makes an existing secret file 0600 if others could read it, with a warning.
pub fn private_file(path: &Path) -> Result<(), PkiError> {
    #[cfg(unix)]
    tighten(path, 0o600)?;
    Ok(())
}

/// Takes group and other permissions off `path` (to `mode`) if it has any, with a warning.
#[cfg(unix)]
fn tighten(path: &Path, mode: u32) -> Result<(), PkiError> {
    use std::os::unix::fs::PermissionsExt;
    let now = std::fs::metadata(path)
        .map_err(io_err(path))?
        .permissions()
        .mode();
    if now & 0o077 != 0 {
        tracing::warn!(path = %path.display(), was = format!("{:o}", now & 0o777), now = format!("{mode:o}"), "a secret file or data directory was open to other users; tightened it");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(io_err(path))?;
    }
    Ok(())
}

/// Creates `dir` as a directory only the owner can enter (0700), or tightens an existing
/// one of ours that others could read, with a warning: data directories hold private keys
/// and the signing keys inside sled's files. Missing parents are made as ordinary
/// directories (a parent only root can enter would shut out the service's own user). A
/// directory someone else owns (a volume's root that Kubernetes gives group access with
/// fsGroup) is left as it is, with a warning: give the process a directory inside it.
pub fn private_dir(dir: &Path) -> Result<(), PkiError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        if !dir.exists() {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(io_err(dir))?;
        }
        let owner = std::fs::metadata(dir).map_err(io_err(dir))?.uid();
        // This process's user: the owner of /proc/self (Linux).
        let me = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
        if me.is_some_and(|me| me != owner) {
            tracing::warn!(path = %dir.display(), owner, "a data directory owned by another user is left as it is; its files are still created for this user only");
            return Ok(());
        }
        tighten(dir, 0o700)
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir).map_err(io_err(dir))
}

/// The cluster certificate authority.
pub struct Ca {
    key: KeyPair,
    cert_pem: String,
}

impl Ca {
    /// Generates a new self-signed CA.
    pub fn generate(cluster_name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{cluster_name} flotilla CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + CA_VALIDITY;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key,
        })
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        // Parse once to reject a malformed certificate at load time.
        Issuer::from_ca_cert_pem(cert_pem, &key)?;
        Ok(Self {
            key,
            cert_pem: cert_pem.to_owned(),
        })
    }

    /// Loads `ca.pem`/`ca.key` from `dir`, generating them first if absent.
    pub fn load_or_generate(dir: &Path, cluster_name: &str) -> Result<Self, PkiError> {
        if let Some(ck) = CertifiedKey::read(dir, "ca")? {
            return Self::from_pem(&ck.cert_pem, &ck.key_pem);
        }
        let ca = Self::generate(cluster_name)?;
        ca.certified_key().write(dir, "ca")?;
        Ok(ca)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The certificate and its private key, to write out (`flotilla ca init`).
    pub fn certified_key(&self) -> CertifiedKey {
        CertifiedKey {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key.serialize_pem(),
        }
    }

    /// The pin a join token carries: SHA-256 of the CA's public key (SubjectPublicKeyInfo).
    pub fn pin(&self) -> String {
        spki_pin(&rcgen::PublicKeyData::subject_public_key_info(&self.key))
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, PkiError> {
        Ok(Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?)
    }

    /// Issues a server certificate for a hub, valid for `names` (DNS names or IP addresses).
    pub fn issue_hub(&self, hub_name: &str, names: &[String]) -> Result<CertifiedKey, PkiError> {
        self.issue_hub_for(hub_name, names, LEAF_VALIDITY.unsigned_abs())
    }

    /// [`Ca::issue_hub`], valid for `validity`.
    pub fn issue_hub_for(
        &self,
        hub_name: &str,
        names: &[String],
        validity: std::time::Duration,
    ) -> Result<CertifiedKey, PkiError> {
        let key = KeyPair::generate()?;
        let validity = Duration::try_from(validity).unwrap_or(LEAF_VALIDITY);
        let mut params = leaf_params(hub_name, validity)?;
        params.subject_alt_names = names.iter().map(|n| san(n)).collect::<Result<_, _>>()?;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        // Hubs are marked so that the Raft port can refuse every other kind of peer.
        params.organizational_unit(ROLE_HUB);
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a node's CSR. Only the CSR's public key is used: the subject is the node id the
    /// hub chose, and the only usage is TLS client authentication.
    pub fn sign_node_csr(&self, csr_pem: &str, node_id: &str) -> Result<String, PkiError> {
        self.sign_node_csr_for(csr_pem, node_id, LEAF_VALIDITY.unsigned_abs())
    }

    /// [`Ca::sign_node_csr`], valid for `validity`.
    pub fn sign_node_csr_for(
        &self,
        csr_pem: &str,
        node_id: &str,
        validity: std::time::Duration,
    ) -> Result<String, PkiError> {
        self.sign_client_csr(csr_pem, node_id, ROLE_NODE, validity)
    }

    /// Signs an agent's CSR for `subject` (a token's `sub`), valid for `validity`: for
    /// clusters that require agents to present a certificate beside their token.
    pub fn sign_agent_csr_for(
        &self,
        csr_pem: &str,
        subject: &str,
        validity: std::time::Duration,
    ) -> Result<String, PkiError> {
        self.sign_client_csr(csr_pem, subject, ROLE_AGENT, validity)
    }

    /// A client certificate for the CSR's public key only: the name and role are the
    /// CA's to choose, the only usage TLS client authentication.
    fn sign_client_csr(
        &self,
        csr_pem: &str,
        name: &str,
        role: &str,
        validity: std::time::Duration,
    ) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let validity = Duration::try_from(validity).unwrap_or(LEAF_VALIDITY);
        let mut params = leaf_params(name, validity)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.organizational_unit(role);
        let cert = params.signed_by(&csr.public_key, &self.issuer()?)?;
        Ok(cert.pem())
    }

    /// Issues a client certificate directly (for agents and tools that want mTLS).
    pub fn issue_client(&self, subject: &str) -> Result<CertifiedKey, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = leaf_params(subject, LEAF_VALIDITY)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.organizational_unit(ROLE_AGENT);
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Organizational unit values that mark what a certificate was issued for.
pub const ROLE_HUB: &str = "flotilla-hub";
pub const ROLE_NODE: &str = "flotilla-node";
pub const ROLE_AGENT: &str = "flotilla-agent";

trait ParamsExt {
    fn organizational_unit(&mut self, ou: &str);
}

impl ParamsExt for CertificateParams {
    fn organizational_unit(&mut self, ou: &str) {
        self.distinguished_name
            .push(DnType::OrganizationalUnitName, ou.to_owned());
    }
}

fn leaf_params(common_name: &str, validity: Duration) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name.to_owned());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    // Backdated for clocks a little behind ours, by at most a tenth of the lifetime (a
    // short-lived certificate must not be mostly past).
    params.not_before = now - std::cmp::min(validity / 10_i32, Duration::minutes(5));
    params.not_after = now + validity;
    let mut serial = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut serial);
    serial[0] &= 0x7f;
    params.serial_number = Some(serial.to_vec().into());
    Ok(params)
}

fn san(name: &str) -> Result<SanType, PkiError> {
    Ok(match name.parse::<std::net::IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(name.try_into()?),
    })
}

/// A node's own key and the CSR it sends when joining.
pub fn node_key_and_csr(name: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    // A CSR carries only the subject; validity and serial are the CA's to choose.
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, name.to_owned());
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// `sha256:<hex>` of a DER SubjectPublicKeyInfo.
pub fn spki_pin(spki_der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(spki_der)))
}

/// What a peer certificate says about who presented it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    pub common_name: String,
    pub role: String,
    /// The certificate's serial number, lowercase hex: what tells two certificates of one
    /// name apart (a node removed and joined again gets a new one).
    pub serial: String,
}

/// Reads the common name and role (organizational unit) of a DER certificate.
pub fn peer_identity(cert_der: &[u8]) -> Option<PeerIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let subject = cert.subject();
    let cn = subject.iter_common_name().next()?.as_str().ok()?.to_owned();
    let role = subject
        .iter_organizational_unit()
        .next()
        .and_then(|ou| ou.as_str().ok())
        .unwrap_or_default()
        .to_owned();
    Some(PeerIdentity {
        common_name: cn,
        role,
        serial: hex::encode(cert.raw_serial()),
    })
}

/// When the first certificate in a PEM text starts and stops being valid (seconds since
/// the epoch).
pub fn pem_validity(pem: &str) -> Option<(i64, i64)> {
    let der = rustls_pemfile::certs(&mut pem.as_bytes()).next()?.ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let v = cert.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// [`peer_identity`] of the first certificate in a PEM text.
pub fn pem_identity(pem: &str) -> Option<PeerIdentity> {
    let der = rustls_pemfile::certs(&mut pem.as_bytes()).next()?.ok()?;
    peer_identity(&der)
}

/// The CA certificates a cluster trusts, as one PEM text: `signing_pem` (the CA that
/// signs now) first, then each certificate of `extra_pem` that is not the same one. While
/// the CA is rotated, `extra_pem` holds the other CA (see docs/security.md): hubs accept
/// certificates of both, and nodes, given this bundle, accept hubs of both. Anything in
/// `extra_pem` that is not a CA certificate is refused.
pub fn trust_bundle(signing_pem: &str, extra_pem: &str) -> Result<String, PkiError> {
    let bad = |what: String| PkiError::BadPem(what);
    let mut seen = Vec::new();
    let mut out = String::new();
    for (source, pem) in [("the CA certificate", signing_pem), ("ca_trust", extra_pem)] {
        let mut read = 0;
        for der in rustls_pemfile::certs(&mut pem.as_bytes()) {
            read += 1;
            let der = der.map_err(|e| bad(format!("{source}: {e}")))?;
            let (_, cert) = x509_parser::parse_x509_certificate(&der)
                .map_err(|e| bad(format!("{source}: not an X.509 certificate: {e}")))?;
            if !cert.is_ca() {
                return Err(bad(format!(
                    "{source}: {} is not a CA certificate",
                    cert.subject()
                )));
            }
            if seen.contains(&der.to_vec()) {
                continue;
            }
            seen.push(der.to_vec());
            out.push_str(&pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec())));
        }
        // Nothing in the signing CA, or a bundle given that holds no certificate (empty,
        // DER, a key): refused rather than trusting less than the operator meant.
        if read == 0 && (source != "ca_trust" || !pem.trim().is_empty()) {
            return Err(bad(format!("{source}: no PEM certificate in it")));
        }
    }
    Ok(out)
}

/// Whether the DER certificate `cert_der` was signed by the first certificate in `ca_pem`.
pub fn issued_by(cert_der: &[u8], ca_pem: &str) -> bool {
    let Some(Ok(ca_der)) = rustls_pemfile::certs(&mut ca_pem.as_bytes()).next() else {
        return false;
    };
    let (Ok((_, cert)), Ok((_, ca))) = (
        x509_parser::parse_x509_certificate(cert_der),
        x509_parser::parse_x509_certificate(&ca_der),
    ) else {
        return false;
    };
    cert.verify_signature(Some(ca.public_key())).is_ok()
}

/// SHA-256 pin of the public key inside a DER certificate.
pub fn cert_spki_pin(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(spki_pin(cert.public_key().raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_matches_its_own_key_only() {
        let ca = Ca::generate("t").unwrap();
        let a = ca.issue_client("a").unwrap();
        let b = ca.issue_client("b").unwrap();
        assert!(a.pair_matches());
        let mixed = CertifiedKey {
            cert_pem: a.cert_pem.clone(),
            key_pem: b.key_pem.clone(),
        };
        assert!(!mixed.pair_matches());
    }

    #[cfg(unix)]
    #[test]
    fn a_secret_replaces_a_readable_file_whole_and_private_leaving_no_temporary_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        std::fs::write(&path, "an older, longer token that anyone could read").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_secret(&path, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("admin.token")]);
    }

    #[test]
    fn node_certificate_carries_only_the_hub_chosen_name_and_client_role() {
        let ca = Ca::generate("test").unwrap();
        let (_key, csr) = node_key_and_csr("evil-name-asked-by-node").unwrap();
        let pem = ca.sign_node_csr(&csr, "node-7").unwrap();
        let der = rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let id = peer_identity(&der).unwrap();
        assert_eq!(id.common_name, "node-7");
        assert_eq!(id.role, ROLE_NODE);
        assert_eq!(pem_identity(&pem), Some(id.clone()));
        // Each certificate its own serial, even for the same name.
        let again = ca.sign_node_csr(&csr, "node-7").unwrap();
        let other = pem_identity(&again).unwrap();
        assert_eq!(other.common_name, "node-7");
        assert_ne!(other.serial, id.serial);
        assert!(!id.serial.is_empty());
        let (from, to) = pem_validity(&pem).unwrap();
        assert_eq!(
            to - from,
            LEAF_VALIDITY.whole_seconds() + 300,
            "90 days, backdated 5 min"
        );
        let short = ca
            .sign_node_csr_for(&csr, "node-7", std::time::Duration::from_secs(60))
            .unwrap();
        let (from, to) = pem_validity(&short).unwrap();
        assert_eq!(to - from, 66, "a minute, backdated a tenth of it");
    }

    #[test]
    fn ca_pin_matches_the_pin_read_from_its_certificate() {
        let ca = Ca::generate("test").unwrap();
        let der = rustls_pemfile::certs(&mut ca.cert_pem().as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(cert_spki_pin(&der).unwrap(), ca.pin());
    }

    #[test]
    fn a_trust_bundle_puts_the_signing_ca_first_and_refuses_what_is_not_a_ca() {
        let old = Ca::generate("t").unwrap();
        let new = Ca::generate("t").unwrap();
        let both = format!("{}{}", old.cert_pem(), new.cert_pem());
        let bundle = trust_bundle(new.cert_pem(), &both).unwrap();
        let certs: Vec<_> = rustls_pemfile::certs(&mut bundle.as_bytes())
            .map(Result::unwrap)
            .collect();
        assert_eq!(certs.len(), 2, "the signing CA once, then the old one");
        assert_eq!(cert_spki_pin(&certs[0]).unwrap(), new.pin());
        assert_eq!(cert_spki_pin(&certs[1]).unwrap(), old.pin());
        assert_eq!(
            trust_bundle(new.cert_pem(), "")
                .unwrap()
                .matches("BEGIN")
                .count(),
            1
        );

        let leaf = new.issue_client("someone").unwrap();
        let err = trust_bundle(new.cert_pem(), &leaf.cert_pem).unwrap_err();
        assert!(err.to_string().contains("not a CA certificate"), "{err}");
        assert!(trust_bundle("junk", "").is_err());
        let err = trust_bundle(new.cert_pem(), &leaf.key_pem).unwrap_err();
        assert!(
            err.to_string().contains("no PEM certificate"),
            "a key, not a bundle: {err}"
        );
    }

    #[test]
    fn a_certificate_is_issued_by_the_ca_that_signed_it_only() {
        let old = Ca::generate("t").unwrap();
        let new = Ca::generate("t").unwrap();
        let (_, csr) = node_key_and_csr("n").unwrap();
        let pem = old.sign_node_csr(&csr, "n").unwrap();
        let der = rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert!(issued_by(&der, old.cert_pem()));
        // Same subject, another key: not its issuer.
        assert!(!issued_by(&der, new.cert_pem()));
        assert!(!issued_by(b"junk", old.cert_pem()));
    }

    #[test]
    fn garbage_csr_is_rejected() {
        let ca = Ca::generate("test").unwrap();
        assert!(matches!(
            ca.sign_node_csr("not a csr", "n"),
            Err(PkiError::BadCsr(_))
        ));
    }
}
