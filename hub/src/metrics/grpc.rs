//! gRPC requests on the API port as Prometheus sees them: how many, by service, method and
//! status code, and how long each took (a stream: until it ended). The status is read
//! where gRPC puts it: in the response headers of a call refused at once, otherwise in the
//! trailers that end the body. A body dropped before its trailers (the client went away)
//! counts as CANCELLED. Only methods the hub serves are labelled by name; any other path
//! counts as `unknown`, so a caller cannot grow the label set.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use flotilla_common::telemetry::DURATION_BUCKETS;
use http_body::{Body, Frame, SizeHint};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use prost::Message;

/// Label for a path the hub does not serve.
const UNKNOWN: &str = "unknown";

pub struct GrpcMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    /// `/package.Service/Method` → (service, method).
    methods: HashMap<String, (String, String)>,
}

impl GrpcMetrics {
    /// Registers the metrics in `r`; the methods served are those the descriptor sets
    /// `served` declare.
    pub(super) fn new(r: &Registry, served: &[&[u8]]) -> Self {
        let requests = IntCounterVec::new(
            Opts::new(
                "grpc_requests_total",
                "gRPC requests the API port answered, by service, method and status code.",
            ),
            &["service", "method", "code"],
        )
        .expect("valid counter");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "grpc_request_duration_seconds",
                "From a gRPC request's arrival to its status (a stream: to its end), by service and method.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["service", "method"],
        )
        .expect("valid histogram");
        r.register(Box::new(requests.clone()))
            .expect("registered once");
        r.register(Box::new(duration.clone()))
            .expect("registered once");
        let mut methods = HashMap::new();
        for set in served {
            let set = prost_types::FileDescriptorSet::decode(*set)
                .expect("a descriptor set compiled into the hub decodes");
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let name = format!("{package}.{}", service.name.unwrap_or_default());
                    for m in service.method {
                        let m = m.name.unwrap_or_default();
                        methods.insert(format!("/{name}/{m}"), (name.clone(), m));
                    }
                }
            }
        }
        Self {
            requests,
            duration,
            methods,
        }
    }

    /// The (service, method) a request path names, if the hub serves it; else `unknown`.
    pub fn labels(&self, path: &str) -> (&str, &str) {
        self.methods
            .get(path)
            .map_or((UNKNOWN, UNKNOWN), |(s, m)| (s.as_str(), m.as_str()))
    }

    fn record(&self, path: &str, code: &str, started: Instant) {
        let (service, method) = self.labels(path);
        self.requests
            .with_label_values(&[service, method, code])
            .inc();
        self.duration
            .with_label_values(&[service, method])
            .observe(started.elapsed().as_secs_f64());
    }
}

/// The canonical name of gRPC status code `code`.
fn code_name(code: &[u8]) -> &'static str {
    match code {
        b"0" => "OK",
        b"1" => "CANCELLED",
        b"2" => "UNKNOWN",
        b"3" => "INVALID_ARGUMENT",
        b"4" => "DEADLINE_EXCEEDED",
        b"5" => "NOT_FOUND",
        b"6" => "ALREADY_EXISTS",
        b"7" => "PERMISSION_DENIED",
        b"8" => "RESOURCE_EXHAUSTED",
        b"9" => "FAILED_PRECONDITION",
        b"10" => "ABORTED",
        b"11" => "OUT_OF_RANGE",
        b"12" => "UNIMPLEMENTED",
        b"13" => "INTERNAL",
        b"14" => "UNAVAILABLE",
        b"15" => "DATA_LOSS",
        b"16" => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

fn status_in(headers: &http::HeaderMap) -> Option<&'static str> {
    headers.get("grpc-status").map(|v| code_name(v.as_bytes()))
}

/// The tower layer to put on the API server.
pub fn layer<S>(
    metrics: Arc<super::Metrics>,
) -> impl tower::Layer<S, Service = Observe<S>> + Clone {
    tower::layer::layer_fn(move |inner| Observe {
        inner,
        metrics: metrics.clone(),
    })
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: Arc<super::Metrics>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for Observe<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Send + 'static,
{
    type Response = http::Response<Observed<RB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let call = Call {
            metrics: self.metrics.clone(),
            path: req.uri().path().to_owned(),
            started: Instant::now(),
            status: None,
            counted: false,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            match fut.await {
                Ok(resp) => {
                    let mut call = call;
                    call.status = status_in(resp.headers());
                    Ok(resp.map(|body| Observed {
                        body: Box::pin(body),
                        call: Some(call),
                    }))
                }
                Err(e) => {
                    call.end("UNKNOWN");
                    Err(e)
                }
            }
        })
    }
}

/// A request, counted once: when it ends, or when it is dropped before (a client that
/// gave up before the answer, or walked away from a stream: CANCELLED, unless the
/// headers already carried its status).
struct Call {
    metrics: Arc<super::Metrics>,
    path: String,
    started: Instant,
    /// The status the response headers carried (a call refused at once).
    status: Option<&'static str>,
    counted: bool,
}

impl Call {
    fn end(mut self, code: &str) {
        self.counted = true;
        self.metrics.grpc.record(&self.path, code, self.started);
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.counted {
            let code = self.status.unwrap_or("CANCELLED");
            self.metrics.grpc.record(&self.path, code, self.started);
        }
    }
}

/// A response body that counts its request once: at its trailers, at its end, or (its
/// `Call` dropped with it) when it is dropped before either.
pub struct Observed<B> {
    body: Pin<Box<B>>,
    call: Option<Call>,
}

impl<B: Body> Body for Observed<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = this.body.as_mut().poll_frame(cx);
        let code = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame.trailers_ref().map(|t| status_in(t)),
            Poll::Ready(Some(Err(_))) => Some(Some("UNKNOWN")),
            Poll::Ready(None) => Some(None),
            Poll::Pending => None,
        };
        if let Some(code) = code {
            if let Some(call) = this.call.take() {
                let code = code.or(call.status).unwrap_or("UNKNOWN");
                call.end(code);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_methods_are_labelled_by_name() {
        let m = super::super::Metrics::new();
        let g = &m.grpc;
        assert_eq!(
            g.labels("/flotilla.v1.AgentService/CallTool"),
            ("flotilla.v1.AgentService", "CallTool")
        );
        assert_eq!(
            g.labels("/grpc.health.v1.Health/Check"),
            ("grpc.health.v1.Health", "Check")
        );
        for path in [
            "/flotilla.v1.AgentService/NoSuchMethod",
            "/evil/../x",
            "/",
            "",
        ] {
            assert_eq!(g.labels(path), (UNKNOWN, UNKNOWN), "{path}");
        }
        assert_eq!(code_name(b"0"), "OK");
        assert_eq!(code_name(b"16"), "UNAUTHENTICATED");
        assert_eq!(code_name(b"99"), "UNKNOWN");
    }
}
