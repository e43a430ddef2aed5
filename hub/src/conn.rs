//! Per-connection accounting for the API port: every request counts as open on its
//! connection from its start until its response body is dropped (the end of a stream), so
//! `tls::incoming` can close connections that have had no open request for the idle
//! timeout, while a long watch or a node session keeps its connection.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use flotilla_common::tls::{ActivityGuard, PeerInfo};
use http_body::{Body, Frame, SizeHint};

/// The tower layer to put on the API server.
pub fn track_requests<S>() -> impl tower::Layer<S, Service = TrackRequests<S>> + Clone {
    tower::layer::layer_fn(TrackRequests)
}

#[derive(Clone)]
pub struct TrackRequests<S>(S);

impl<S, B, RB> tower::Service<http::Request<B>> for TrackRequests<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Send + 'static,
{
    type Response = http::Response<Tracked<RB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let guard = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.activity.as_ref())
            .map(|a| a.begin());
        let call = self.0.call(req);
        Box::pin(async move {
            let resp = call.await?;
            Ok(resp.map(|body| Tracked {
                body: Box::pin(body),
                _open: guard,
            }))
        })
    }
}

/// A response body that keeps its request counted as open until it is dropped.
pub struct Tracked<B> {
    body: Pin<Box<B>>,
    _open: Option<ActivityGuard>,
}

impl<B: Body> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.get_mut().body.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
