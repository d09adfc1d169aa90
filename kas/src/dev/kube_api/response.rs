//! Building answers: JSON documents, `Status` errors, and streamed bodies whose chunks go
//! out as they are produced (a watch event is one chunk, flushed at once). Other fakes of
//! the API in tests (the edge's EndpointSlice discovery tests) answer with these too.

use std::io;

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::objects;

/// An answer's body. Its error type lets a streamed answer be cut mid-stream (an error
/// ends the connection without the last chunk), as when an API server goes away.
pub type Body = UnsyncBoxBody<Bytes, io::Error>;

/// The sending end of a streamed body: each `send` is one chunk on the wire.
pub type ChunkSender = mpsc::Sender<Result<Frame<Bytes>, io::Error>>;

pub fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        response.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    response
}

pub fn json(status: StatusCode, value: &Value) -> Response<Body> {
    full(status, "application/json", value.to_string())
}

/// A `metav1.Status` failure, as the API server reports every error.
pub fn failure(status: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json(
        status,
        &objects::status_failure(status.as_u16(), reason, message),
    )
}

pub fn not_found(what: &str) -> Response<Body> {
    failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{what} not found"),
    )
}

/// A chunked answer fed through the returned sender; the body ends when the sender is
/// dropped. A small buffer: a stalled client holds the producer back instead of memory.
pub fn streamed(content_type: &str) -> (Response<Body>, ChunkSender) {
    let (tx, rx) = mpsc::channel(16);
    let mut response = Response::new(BodyExt::boxed_unsync(StreamBody::new(ReceiverStream::new(
        rx,
    ))));
    if let Ok(v) = content_type.parse() {
        response.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    (response, tx)
}

/// Sends one chunk; false once the client is gone.
pub async fn send_chunk(tx: &ChunkSender, chunk: impl Into<Bytes>) -> bool {
    tx.send(Ok(Frame::data(chunk.into()))).await.is_ok()
}
