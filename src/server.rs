//! Serving the node's TCP connections: HTTP/1.1 with upgrades, by hyper's
//! connection builder, with a deadline on every request head and a graceful
//! shutdown.
//!
//! Why not `axum::serve`: it gives hyper no timer, so hyper enforces no
//! header timeout, and a client that sends half a request head keeps its
//! connection, and a descriptor, for as long as it likes; enough of them
//! and the node can accept nothing else. Here hyper has tokio's timer and
//! `CHANNELS_HEADER_TIMEOUT`, which bounds both the wait for a new
//! connection's first head and a keep-alive connection's wait for its next
//! one. (A socket.io session that never sends its CONNECT is closed within
//! the same bound by socketioxide's connect timeout: `gateway::service`.)

use std::{convert::Infallible, pin::pin, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::ConnectInfo,
    http::{HeaderValue, Request, header},
    response::{IntoResponse, Response},
};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use crate::{
    http::ApiError,
    limits::{ConnectionLimit, PeerAddr, Place},
    metrics::{Limit, Metrics},
};

/// The size a connection's read buffer and header write buffer start at,
/// and the read buffer shrinks back to; both are kept for the connection's
/// life. hyper's own is 8 KiB, which made each long-polling client (two
/// kept-alive connections) cost 32 KiB. A request larger than this takes
/// another read, and a read that fills the buffer doubles the next one, so
/// a large body is read in large reads and a connection whose requests
/// fill 512 bytes keeps reading 1 KiB at a time. (Our carried hyper:
/// `vendor/hyper/PATCH.md`.)
const BUFFER_SIZE: usize = 512;

/// How long a connection past the cap has to send its request head: it
/// holds one of the few places kept to answer such connections.
const OVER_CAP_HEADER_TIMEOUT: Duration = Duration::from_secs(1);

/// What a connection past the cap may still ask: whether the node is alive
/// and ready, and its metrics.
const ANSWERED_OVER_CAP: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// Serves every connection `listener` accepts with `app` until `stop`, then
/// stops accepting, lets each connection finish the request it is serving
/// (a connection taken over by a websocket is no longer hyper's), and
/// returns once all are closed.
pub async fn serve(
    mut listener: ConnectionLimit,
    app: Router,
    header_timeout: Duration,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let mut within = http1::Builder::new();
    within
        .init_buf_size(BUFFER_SIZE)
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let mut over_cap = http1::Builder::new();
    over_cap
        .init_buf_size(BUFFER_SIZE)
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout.min(OVER_CAP_HEADER_TIMEOUT))
        .keep_alive(false);
    let connections = TaskTracker::new();
    loop {
        let (stream, peer, place) = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let app = app.clone();
        let service = service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(PeerAddr(peer)));
            let request = request.map(Body::new);
            let answered =
                place == Place::Within || ANSWERED_OVER_CAP.contains(&request.uri().path());
            let app = app.clone();
            async move {
                if answered {
                    app.oneshot(request).await
                } else {
                    Ok::<_, Infallible>(at_capacity())
                }
            }
        });
        let builder = match place {
            Place::Within => &within,
            Place::OverCap => &over_cap,
        };
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let stop = stop.clone();
        let metrics = metrics.clone();
        connections.spawn(async move {
            let mut connection = pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = served
                && e.is_timeout()
            {
                metrics.limit_refused(Limit::HeaderTimeout);
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// The answer to a connection past the cap.
fn at_capacity() -> Response {
    let mut response =
        ApiError::Unavailable("this node is at its connection limit".into()).into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}
