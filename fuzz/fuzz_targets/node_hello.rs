//! A node's hello, as the hub takes it: checked by `convert::offered_servers`, then applied
//! as the NodeHello command. Never a panic; the indexes stay exact.
#![no_main]

use flotilla_hub::{convert, state::Command};
use flotilla_proto as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(hello) = pb::Hello::decode(data) else {
        return;
    };
    let Ok(servers) = convert::offered_servers(&hello) else {
        return;
    };
    let mut state = flotilla_fuzz::seeded_state();
    for trusted in [false, true] {
        state.apply(
            500,
            &Command::NodeHello {
                node_id: "n1".into(),
                labels: hello.labels.clone().into_iter().collect(),
                servers: servers.clone(),
                at_ms: 10,
                tenants: hello.tenants.clone(),
                cpu_high_water_percent: hello.cpu_high_water_percent,
                may_add_tools: trusted,
            },
        );
    }
    let mut rebuilt = state.clone();
    rebuilt.rebuild_index();
    assert_eq!(rebuilt.index, state.index);
});
