//! A SubmitTask request as the hub admits it: arguments, names and options. Whatever the
//! bytes, admission answers with a value or an error, never a panic, and what it accepts
//! stays inside the limits.
#![no_main]

use flotilla_common::limits;
use flotilla_hub::{admission, convert};
use flotilla_proto as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = pb::SubmitTaskRequest::decode(data) else {
        return;
    };
    if admission::check_names(&req.tool, &req.idempotency_key).is_err() {
        return;
    }
    if let Ok(args) = admission::parse_arguments(&req.arguments) {
        assert!(limits::json_depth(&args) <= limits::MAX_JSON_DEPTH);
    }
    if let Ok(spec) = convert::spec(req.options.as_ref(), Some("r"), Some("z")) {
        assert!(spec.retry.retry_on.len() <= 3);
        assert!(
            spec.placement.required.len() + spec.placement.preferred.len() <= limits::MAX_LABELS
        );
    }
});
