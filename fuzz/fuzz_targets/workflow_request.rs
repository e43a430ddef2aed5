//! A SubmitWorkflow request as the hub admits it: step limits, arguments, references and
//! the DAG's shape. Never a panic; an accepted workflow is within the limits.
#![no_main]

use flotilla_common::limits;
use flotilla_hub::admission;
use flotilla_proto as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = pb::SubmitWorkflowRequest::decode(data) else {
        return;
    };
    if let Ok(steps) = admission::workflow_steps(req.steps, None, None, |_, _| Ok(())) {
        assert!(steps.len() <= limits::MAX_STEPS);
        for s in &steps {
            assert!(s.depends_on.len() <= limits::MAX_DEPENDS_ON);
        }
    }
});
