//! A join request: the token as typed by an operator, and the CSR the hub signs. Never a
//! panic; a signed certificate names the node the hub chose.
#![no_main]

use std::sync::OnceLock;

use flotilla_common::{pki, token::JoinToken};
use flotilla_proto as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn ca() -> &'static pki::Ca {
    static CA: OnceLock<pki::Ca> = OnceLock::new();
    CA.get_or_init(|| pki::Ca::generate("fuzz").expect("a CA"))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = JoinToken::parse(s);
    }
    let Ok(req) = pb::JoinRequest::decode(data) else {
        return;
    };
    let _ = JoinToken::parse(&req.token_id);
    if let Ok(cert) = ca().sign_node_csr(&req.csr_pem, "edge-1") {
        assert!(cert.contains("BEGIN CERTIFICATE"));
    }
});
