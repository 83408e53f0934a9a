//! The HTTP side of a node: the axum router for `/authorize`, `/notify`,
//! the backend API (`/notify/batch`, `/disconnect`, `/presence`), the
//! operations endpoints and the client bundle.
//!
//! The request path: [`app`] routes the API's calls and the client bundle,
//! and hands every other path to the socket.io service, which takes
//! `/socket.io/` requests and answers the rest with [`not_found`].

mod authorize;
mod batch;
mod client_bundle;
mod disconnect;
mod error;
pub mod notify;
mod ops;
mod presence;

use std::{
    convert::Infallible,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    task::{Context, Poll},
};

use axum::{
    Router,
    extract::{ConnectInfo, Request},
    http::{Extensions, HeaderMap, HeaderName, HeaderValue, Method, Uri, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use futures_util::future::{Either, Ready, ready};
use tokio_util::sync::CancellationToken;
use tower::{Layer, Service, ServiceBuilder};
use tower_http::{
    cors::{AllowOrigin, Any, CorsLayer},
    request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer},
    trace::TraceLayer,
};

use crate::{
    auth::{ApiKeys, UpstreamVerifier, WsTokens},
    bus::Bus,
    config::Config,
    limits::{Limiters, PeerAddr},
    metrics::Metrics,
};

pub use error::ApiError;

/// What the HTTP handlers share, behind one `Arc`: axum clones the state
/// for every request, and some fields (the ws-token keys and validation
/// settings) are not cheap to clone.
pub struct AppState {
    pub upstream: UpstreamVerifier,
    pub ws_tokens: WsTokens,
    pub api_keys: ApiKeys,
    pub bus: Bus,
    pub metrics: Metrics,
    pub limiters: Limiters,
    pub max_body_bytes: usize,
    pub max_batch: usize,
    pub max_batch_bytes: usize,
    /// Deepest nesting accepted in a notification's `msg`.
    pub max_json_depth: usize,
    /// Cancelled when shutdown starts, so `/readyz` turns 503 and the load
    /// balancer stops sending new clients here.
    pub shutting_down: CancellationToken,
}

/// The routes of the HTTP API; [`app`] adds the rest.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/authorize", get(authorize::authorize))
        .route("/notify", post(notify::notify))
        .route("/notify/batch", post(batch::batch))
        .route("/disconnect", post(disconnect::disconnect))
        .route("/presence", get(presence::get).post(presence::bulk))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .with_state(Arc::new(state))
}

/// What answers a path nobody serves: the socket.io service's inner
/// service, for requests outside `/socket.io/`.
pub async fn not_found() -> Response {
    ApiError::NotFound.into_response()
}

/// The whole node, one router: the API's routes, the client bundle (before
/// socket.io, which would otherwise take `/socket.io/socket.io.js` for an
/// engine.io request), then `socket_io` for every other path, which passes
/// what is not its own to [`not_found`]. One router, so an API call is
/// routed once. Every request passes [`admit`], inside the request id,
/// trace and CORS layers (so a refusal has its id, its span and, for a
/// page, its CORS headers).
pub fn app<S>(api: Router, socket_io: S, config: &Config, limiters: Limiters) -> Router
where
    S: tower::Service<axum::extract::Request, Error = std::convert::Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Response: axum::response::IntoResponse,
    S::Future: Send + 'static,
{
    api.route("/socket.io/{file}", get(client_bundle::serve))
        .fallback_service(socket_io)
        // One layer: every `Router::layer` boxes the future of what it
        // wraps once more, for each request, and a long-polling GET keeps
        // its futures for as long as it waits.
        .layer(
            ServiceBuilder::new()
                // Outermost first: the span needs the id, which the layer
                // before it sets.
                .layer(SetRequestIdLayer::new(REQUEST_ID, NewRequestId))
                .layer(TraceLayer::new_for_http().make_span_with(request_span))
                .layer(PropagateRequestIdLayer::new(REQUEST_ID))
                .option_layer(cors(config))
                .layer(AdmitLayer(limiters)),
        )
}

/// The address a request comes from (see [`Limiters::client_address`]), as
/// a request extension for the handlers' own limits; not on an engine.io
/// handshake, whose head its socket keeps (see [`detach_head`]).
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub IpAddr);

/// [`admit`] as the innermost layer of [`app`], written out rather than by
/// `axum::middleware::from_fn`, which boxes each request's future (and a
/// long-polling GET keeps its futures while it waits).
#[derive(Clone)]
struct AdmitLayer(Limiters);

impl<S> Layer<S> for AdmitLayer {
    type Service = Admit<S>;

    fn layer(&self, inner: S) -> Admit<S> {
        Admit {
            limiters: self.0.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
struct Admit<S> {
    limiters: Limiters,
    inner: S,
}

impl<S> Service<Request> for Admit<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        match admit(&self.limiters, &mut request) {
            Ok(()) => Either::Right(self.inner.call(request)),
            Err(refused) => Either::Left(ready(Ok(refused.into_response()))),
        }
    }
}

/// Finds the client's address and applies the connection rate to engine.io
/// handshakes: an engine.io request (`EIO=` in the query) under
/// `/socket.io/` without a session id opens a new connection; the requests
/// of an open session, and the client bundle, pass freely. `Err` is why a
/// handshake is refused.
fn admit(limiters: &Limiters, request: &mut Request) -> Result<(), ApiError> {
    let peer = request
        .extensions()
        .get::<ConnectInfo<PeerAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.0.ip());
    let client = limiters.client_address(request.headers(), peer);
    let uri = request.uri();
    let mut query = uri.query().unwrap_or_default().split('&');
    let handshake = uri.path().starts_with("/socket.io/")
        && query.clone().any(|pair| pair.starts_with("EIO="))
        && !query.any(|pair| pair.starts_with("sid="));
    if handshake {
        if let Err(refused) = limiters.check_connect(client) {
            tracing::info!(client = %client, "connection refused: rate limit");
            return Err(ApiError::from(refused));
        }
        detach_head(request);
    } else {
        request.extensions_mut().insert(ClientAddr(client));
    }
    Ok(())
}

/// The handshake headers a socket still needs once it is open: engineioxide
/// answers the websocket upgrade with the key (and drops it then), and our
/// logs carry the request id. Everything else has been read by then (CORS, the client
/// address, the rate limit).
const SOCKET_HEADERS: [HeaderName; 2] = [header::SEC_WEBSOCKET_KEY, REQUEST_ID];

/// Copies what a socket keeps of its engine.io handshake, the URI and the
/// [`SOCKET_HEADERS`], into allocations of their own, and drops the rest,
/// request extensions included but hyper's `OnUpgrade`, which the websocket
/// upgrade is taken from.
///
/// engineioxide keeps the handshake's request head for the socket's whole
/// life. hyper parses the URI and headers as slices of the connection's read
/// buffer, so without the copy every idle socket pins that buffer; and a
/// browser's headers (cookies above all) would be kept too: kilobytes per
/// socket, and credentials held in memory for nothing. The
/// extensions that the layers before this one added (the request id, the
/// peer address) are a table and a box each, about 0.4 KB per socket, and
/// no socket handler reads them (socketioxide's `HttpExtension` would).
fn detach_head(request: &mut Request) {
    let mut headers = HeaderMap::with_capacity(SOCKET_HEADERS.len());
    for name in SOCKET_HEADERS {
        if let Some(value) = request.headers().get(&name)
            && let Ok(copy) = HeaderValue::from_bytes(value.as_bytes())
        {
            headers.insert(name, copy);
        }
    }
    *request.headers_mut() = headers;
    if let Ok(uri) = Uri::try_from(request.uri().to_string()) {
        *request.uri_mut() = uri;
    }
    let upgrade = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>();
    *request.extensions_mut() = Extensions::new();
    if let Some(upgrade) = upgrade {
        request.extensions_mut().insert(upgrade);
    }
}

/// The header carrying each request's id: kept from the caller (a load
/// balancer or backend may set it), made up otherwise, echoed in the answer.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Makes the id of a request that came without one: a random UUID, as
/// tower-http's `MakeRequestUuid` makes, without its `Display` and parse.
#[derive(Clone, Copy)]
struct NewRequestId;

impl MakeRequestId for NewRequestId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        HeaderValue::try_from(crate::notification::new_id())
            .ok()
            .map(RequestId::new)
    }
}

/// The span of one HTTP request: method, path (never the query or headers,
/// which may carry credentials) and request id. Socket.IO connects are HTTP
/// requests too, so their logs carry the id of the request that opened them.
fn request_span(request: &axum::extract::Request) -> tracing::Span {
    let id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id = %id)
}

/// CORS for browsers, from `CHANNELS_CORS_ORIGINS`; `None` when unset.
fn cors(config: &Config) -> Option<CorsLayer> {
    if config.cors_origins.is_empty() {
        return None;
    }
    let origins = if config.cors_origins.iter().any(|o| o == "*") {
        AllowOrigin::from(Any)
    } else {
        AllowOrigin::list(
            config
                .cors_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, notify::API_KEY]),
    )
}

#[cfg(test)]
mod tests {
    use axum::body::Body;

    use super::*;

    #[test]
    fn a_handshake_keeps_only_what_its_socket_needs() {
        let mut request = Request::builder()
            .uri("/socket.io/?EIO=4&transport=websocket")
            .header(header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==")
            .header(REQUEST_ID, "req-1")
            .header(header::COOKIE, "session=secret")
            .header(header::AUTHORIZATION, "Bearer secret")
            .header(header::USER_AGENT, "Mozilla/5.0")
            .extension(ClientAddr(IpAddr::V4(Ipv4Addr::LOCALHOST)))
            .body(Body::empty())
            .unwrap();
        detach_head(&mut request);
        assert!(request.extensions().is_empty());
        let headers = request.headers();
        assert_eq!(headers.len(), 2);
        assert_eq!(
            headers[header::SEC_WEBSOCKET_KEY],
            "dGhlIHNhbXBsZSBub25jZQ=="
        );
        assert_eq!(headers[REQUEST_ID], "req-1");
        assert_eq!(request.uri(), "/socket.io/?EIO=4&transport=websocket");
    }
}
