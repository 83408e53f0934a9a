//! `GET /socket.io/socket.io.js` (and `.min.js`, and their `.map` files): the
//! official socket.io client, embedded at build time from the copy committed
//! in `assets/socket.io-client/` (see its README for version and licence).

use axum::{
    extract::Path,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

use super::error::ApiError;

/// Names the socket.io-client version of the embedded files (see the README
/// there), so a browser revalidates cheaply (304) and picks up a new bundle
/// after an upgrade.
const ETAG: &str = "\"socket.io-client-4.8.4\"";

/// File name, content type, and bytes of each embedded file.
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "socket.io.js",
        JS,
        include_bytes!("../../assets/socket.io-client/socket.io.js"),
    ),
    (
        "socket.io.js.map",
        MAP,
        include_bytes!("../../assets/socket.io-client/socket.io.js.map"),
    ),
    (
        "socket.io.min.js",
        JS,
        include_bytes!("../../assets/socket.io-client/socket.io.min.js"),
    ),
    (
        "socket.io.min.js.map",
        MAP,
        include_bytes!("../../assets/socket.io-client/socket.io.min.js.map"),
    ),
];
const JS: &str = "application/javascript; charset=utf-8";
const MAP: &str = "application/json; charset=utf-8";

/// Serves one embedded file.
pub async fn serve(Path(file): Path<String>, headers: HeaderMap) -> Result<Response, ApiError> {
    let (_, content_type, bytes) = FILES
        .iter()
        .find(|(name, _, _)| *name == file)
        .ok_or(ApiError::NotFound)?;
    let etag = HeaderValue::from_static(ETAG);
    let cache = [
        (header::ETAG, etag.clone()),
        (
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=3600"),
        ),
    ];
    if headers.get(header::IF_NONE_MATCH) == Some(&etag) {
        return Ok((StatusCode::NOT_MODIFIED, cache).into_response());
    }
    Ok((
        cache,
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        *bytes,
    )
        .into_response())
}
