//! A committed Raft entry, as a hub reads it back: it must decode whatever its depth, and
//! applying the commands in it must never panic and must leave the derived indexes exact.
#![no_main]

use flotilla_hub::{raft::codec, state::Command};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // One entry, or a run of commands applied in order to one state machine.
    let commands: Vec<Command> = match codec::decode::<Command>(data) {
        Ok(c) => vec![c],
        Err(_) => match codec::decode::<Vec<Command>>(data) {
            Ok(cs) => cs,
            Err(_) => return,
        },
    };
    let mut state = flotilla_fuzz::seeded_state();
    for (i, c) in commands.iter().enumerate() {
        state.apply(100 + i as u64, c);
        state.take_effects();
    }
    let mut rebuilt = state.clone();
    rebuilt.rebuild_index();
    assert_eq!(rebuilt.index, state.index, "index drifted from the state");
});
