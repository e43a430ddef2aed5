//! hub.toml, node.toml and client.toml as an operator writes them: parse and validate
//! answer with a config or an error naming the key, never a panic.
#![no_main]

use flotilla_common::config::{parse_toml, ClientFile, HubFile, NodeFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(h) = parse_toml::<HubFile>("hub.toml", text) {
        let _ = h.validate("hub.toml");
    }
    if let Ok(n) = parse_toml::<NodeFile>("node.toml", text) {
        let _ = n.validate("node.toml");
    }
    let _ = parse_toml::<ClientFile>("client.toml", text);
});
