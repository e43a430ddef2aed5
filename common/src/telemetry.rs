//! Logs and traces.
//!
//! Logs: `tracing` events to stderr, human-readable or JSON, filtered by `RUST_LOG`;
//! colours only on a terminal, so a log written to a file or a pipe is plain text.
//!
//! Traces: when an OTLP endpoint is configured (`otlp_endpoint` in hub.toml or node.toml,
//! or the standard `OTEL_EXPORTER_OTLP_ENDPOINT`), `tracing` spans whose target is one of
//! Flotilla's crates go to it as OpenTelemetry spans over OTLP/HTTP. Spans never reach the
//! log (its lines stay as they were), and without an endpoint no span is even created.
//! W3C trace context (`traceparent`) carries a call's trace from the agent to the hub
//! (gRPC metadata), and from the hub to the node that runs it (the assignment).

use std::{collections::HashMap, io::IsTerminal};

use opentelemetry::{
    propagation::{Extractor, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
    Context, KeyValue,
};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider, Resource};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    filter::{filter_fn, FilterExt},
    fmt,
    layer::{Filter, SubscriberExt},
    registry::LookupSpan,
    util::SubscriberInitExt,
    EnvFilter, Layer, Registry,
};

/// Histogram buckets for durations in seconds, from 5 ms to 20 minutes (tool calls and
/// the time they wait), shared by the hub's and the node's metrics.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0, 1200.0,
];

/// The standard variables that name a collector when the config does not.
const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// Where a process's spans go, and what it is called there.
pub struct Traces {
    /// `service.name`: `flotilla-hub`, `flotilla-node`.
    pub service: &'static str,
    /// `service.instance.id`: the hub's id, the node's name.
    pub instance: String,
    /// The collector's base address (`http://host:4318`); `None`: the standard
    /// environment variables, and without them no traces.
    pub endpoint: Option<String>,
}

/// Keeps trace export running; what is still buffered is sent when it is dropped.
#[must_use = "traces stop when the guard is dropped"]
pub struct Guard(Option<SdkTracerProvider>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            if let Err(e) = p.shutdown() {
                tracing::warn!(error = %e, "flushing traces at exit");
            }
        }
    }
}

/// Installs the global subscriber. `default_filter` applies to logs when `RUST_LOG` is
/// unset; `traces`, when it names a collector, adds trace export.
pub fn init(json: bool, default_filter: &str, traces: Option<Traces>) -> Guard {
    let (provider, failed) = match traces.map(provider).transpose() {
        Ok(p) => (p.flatten(), None),
        Err(e) => (None, Some(e)),
    };
    let _ = tracing_subscriber::registry()
        .with(layers(json, default_filter, provider.as_ref()))
        .try_init();
    // `try_init` also forwards the `log` crate's records (sled's among them) at every
    // level, so each of sled's per-operation `trace!` calls went through the whole filter.
    // Let through at the source only what the log's filter can pass.
    log::set_max_level(log_level(env_filter(default_filter).max_level_hint()));
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    if let Some(p) = &provider {
        opentelemetry::global::set_tracer_provider(p.clone());
    }
    if let Some(e) = failed {
        tracing::warn!(error = %e, "cannot export traces; running without them");
    }
    Guard(provider)
}

/// The subscriber's layers: the log, and spans for the collector when there is one.
///
/// Only the layers there are. An absent layer (a `None`) says it wants every callsite, and
/// next to layers with filters of their own that makes each `debug!` the filters refuse
/// (h2's, openraft's, ours) a filter evaluation every time it runs, where a callsite no
/// layer wants is decided once and then costs a load and a branch.
fn layers(
    json: bool,
    default_filter: &str,
    provider: Option<&SdkTracerProvider>,
) -> Vec<Box<dyn Layer<Registry> + Send + Sync>> {
    let log = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(!json && std::io::stderr().is_terminal());
    let mut layers = vec![match json {
        true => log
            .json()
            .flatten_event(true)
            .with_filter(logs(default_filter))
            .boxed(),
        false => log.with_filter(logs(default_filter)).boxed(),
    }];
    if let Some(p) = provider {
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(p.tracer("flotilla"))
                .with_filter(filter_fn(|m| {
                    m.is_span()
                        && m.target().starts_with("flotilla")
                        && *m.level() <= tracing::Level::INFO
                }))
                .boxed(),
        );
    }
    layers
}

/// What reaches the log: events (never spans) that `RUST_LOG`, or else `default`, lets
/// through.
fn logs<S>(default: &str) -> impl Filter<S>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    env_filter(default).and(filter_fn(|m| !m.is_span()))
}

/// `RUST_LOG`'s filter, or `default`'s when it is unset or unreadable.
fn env_filter(default: &str) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default))
}

/// The `log` crate's level for a filter's most verbose level (`None`: it did not say).
fn log_level(hint: Option<tracing::level_filters::LevelFilter>) -> log::LevelFilter {
    use tracing::level_filters::LevelFilter as L;
    match hint {
        Some(L::OFF) => log::LevelFilter::Off,
        Some(L::ERROR) => log::LevelFilter::Error,
        Some(L::WARN) => log::LevelFilter::Warn,
        Some(L::INFO) => log::LevelFilter::Info,
        Some(L::DEBUG) => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

/// The tracer provider for `t`, if it names a collector (or the environment does).
fn provider(t: Traces) -> anyhow::Result<Option<SdkTracerProvider>> {
    let from_env = ENDPOINT_VARS
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|e| !e.trim().is_empty()));
    if t.endpoint.is_none() && !from_env {
        return Ok(None);
    }
    use opentelemetry_otlp::WithExportConfig;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
    if let Some(base) = &t.endpoint {
        exporter = exporter.with_endpoint(format!("{}/v1/traces", base.trim_end_matches('/')));
    }
    let exporter = exporter.build()?;
    let resource = Resource::builder()
        .with_service_name(t.service)
        .with_attribute(KeyValue::new("service.instance.id", t.instance))
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    ))
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The trace context a request's headers (gRPC metadata) carry, if any.
pub fn from_headers(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&Headers(headers))
}

/// The trace context a `traceparent` value names (empty when it is not one).
pub fn from_traceparent(traceparent: &str) -> Context {
    let carrier: HashMap<String, String> =
        HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    TraceContextPropagator::new().extract(&carrier)
}

/// `cx` as a `traceparent` value; `None` when it holds no valid span.
pub fn traceparent(cx: &Context) -> Option<String> {
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` continue the trace `cx` (a no-op when `cx` holds none).
pub fn set_parent(span: &tracing::Span, cx: Context) {
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The trace context of `span`: its own when traces are exported, else empty.
pub fn context_of(span: &tracing::Span) -> Context {
    span.context()
}

#[cfg(test)]
mod tests {
    use tracing::Metadata;

    use super::*;

    #[test]
    fn without_an_endpoint_no_span_is_created_and_events_still_log() {
        std::env::remove_var("OTEL_EXPORTER_OTLP_ENDPOINT");
        std::env::remove_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
        let _guard = init(
            false,
            "info",
            Some(Traces {
                service: "test",
                instance: "t".into(),
                endpoint: None,
            }),
        );
        assert!(tracing::info_span!("a span").is_disabled());
        assert!(tracing::enabled!(tracing::Level::INFO));
        // The `log` crate's records (sled's) stop at the level the filter can pass.
        if std::env::var_os("RUST_LOG").is_none() {
            assert_eq!(log::max_level(), log::LevelFilter::Info);
        }
    }

    /// A callsite of the test's own, to ask a subscriber what it thinks of it.
    struct Site(&'static Metadata<'static>);

    impl tracing::callsite::Callsite for Site {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &Metadata<'_> {
            self.0
        }
    }

    macro_rules! site {
        ($name:ident, $site:ident, $target:expr, $level:ident, $kind:ident) => {
            static $name: Metadata<'static> = Metadata::new(
                stringify!($name),
                $target,
                tracing::Level::$level,
                None,
                None,
                None,
                tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&$site)),
                tracing::metadata::Kind::$kind,
            );
            static $site: Site = Site(&$name);
        };
    }

    site!(H2_DEBUG, H2_DEBUG_SITE, "h2::proto::streams", DEBUG, EVENT);
    site!(
        HUB_INFO,
        HUB_INFO_SITE,
        "flotilla_hub::cluster",
        INFO,
        EVENT
    );
    site!(HUB_SPAN, HUB_SPAN_SITE, "flotilla_hub::service", INFO, SPAN);

    /// A `debug!` the log refuses is refused once, when its callsite registers. It used to
    /// be "sometimes" (an absent JSON layer wanted everything), so every run of it asked
    /// the filters again. Spans are refused the same way when no collector takes them.
    #[test]
    fn what_the_log_refuses_is_decided_once_per_callsite() {
        for json in [false, true] {
            let d = tracing::Dispatch::new(
                tracing_subscriber::registry().with(layers(json, "info", None)),
            );
            assert!(d.register_callsite(&H2_DEBUG).is_never(), "json {json}");
            assert!(d.register_callsite(&HUB_SPAN).is_never(), "json {json}");
            assert!(d.register_callsite(&HUB_INFO).is_always(), "json {json}");
        }
    }

    #[test]
    fn a_traceparent_reads_back_as_written_and_garbage_is_no_trace() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(traceparent(&from_traceparent(tp)).as_deref(), Some(tp));
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            assert_eq!(traceparent(&from_traceparent(bad)), None, "{bad}");
        }
        let mut h = http::HeaderMap::new();
        h.insert("traceparent", tp.parse().unwrap());
        assert_eq!(traceparent(&from_headers(&h)).as_deref(), Some(tp));
    }
}
