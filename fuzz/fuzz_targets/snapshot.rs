//! A snapshot's state, as a hub installs it: decoding at any depth, rebuilding the derived
//! indexes, then going on applying commands, must never panic.
#![no_main]

use flotilla_hub::{raft::codec, state::State};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut state) = codec::decode::<State>(data) else {
        return;
    };
    state.rebuild_index();
    for (i, c) in flotilla_fuzz::seed_commands().iter().enumerate() {
        state.apply(1_000 + i as u64, c);
        state.take_effects();
    }
});
