//! The hub's part of a call's trace (common/src/telemetry.rs sets up export). A gRPC
//! request's span continues the caller's `traceparent`; admission and the Raft commit are
//! spans inside it; the submitted task keeps the trace's `traceparent`, so that the
//! leader, whenever it places the task, adds the time it waited in the queue and its
//! assignment to the same trace, and the node's span of the tool call joins it too.

use std::time::{Duration, SystemTime};

use flotilla_common::telemetry;
use opentelemetry::{
    trace::{Span as _, SpanKind, TraceContextExt, Tracer as _},
    KeyValue,
};

use crate::state::TaskRecord;

/// A gRPC request's span, continuing the trace its metadata names (if any). Named by
/// the method when the hub serves it (`unknown` otherwise: a caller does not name spans).
pub fn request_span(metrics: &crate::metrics::Metrics, req: &http::Request<()>) -> tracing::Span {
    let (service, method) = metrics.grpc.labels(req.uri().path());
    let span = tracing::info_span!(
        "grpc request",
        otel.name = %format!("{service}/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
    );
    telemetry::set_parent(&span, telemetry::from_headers(req.headers()));
    span
}

/// The `traceparent` a call submitted now carries: the current span's when traces are
/// exported, else the caller's own, passed on unchanged.
pub fn of_submission(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    telemetry::traceparent(&telemetry::context_of(&tracing::Span::current())).or_else(|| {
        let given = metadata.get("traceparent")?.to_str().ok()?;
        telemetry::traceparent(&telemetry::from_traceparent(given))
    })
}

/// The `traceparent` to send with an assignment of `t` to `server` on `node`: a span of
/// the assignment in the task's trace (and, for a first assignment, one of the time it
/// was queued). Empty when the task carries no trace.
pub fn assignment(t: &TaskRecord, node: &str, server: &str, attempt: u32, first: bool) -> String {
    let Some(tp) = &t.trace else {
        return String::new();
    };
    let parent = telemetry::from_traceparent(tp);
    let tracer = opentelemetry::global::tracer("flotilla");
    let attrs = || {
        vec![
            KeyValue::new("flotilla.task_id", t.id.clone()),
            KeyValue::new("gen_ai.tool.name", t.tool.clone()),
            KeyValue::new("flotilla.attempt", i64::from(attempt)),
        ]
    };
    if first {
        let queued_at = t.queued_at_ms.unwrap_or(t.created_at_ms).max(0) as u64;
        tracer
            .span_builder("task queued")
            .with_start_time(SystemTime::UNIX_EPOCH + Duration::from_millis(queued_at))
            .with_attributes(attrs())
            .start_with_context(&tracer, &parent)
            .end();
    }
    let mut attrs = attrs();
    attrs.push(KeyValue::new("flotilla.node_id", node.to_owned()));
    attrs.push(KeyValue::new("flotilla.server", server.to_owned()));
    let span = tracer
        .span_builder("task assigned")
        .with_kind(SpanKind::Producer)
        .with_attributes(attrs)
        .start_with_context(&tracer, &parent);
    let cx = parent.with_span(span);
    let out = telemetry::traceparent(&cx).unwrap_or_else(|| tp.clone());
    cx.span().end();
    out
}
