//! `/upgrade-echo`: answers any upgrade (`websocket`, `SPDY/3.1`, anything) with `101`
//! naming the same protocol, then echoes the raw bytes back until the client closes. It
//! tests that upgraded bytes cross kas and a tunnel both ways (`UpgradeData`) without
//! speaking the protocol. A request there without `Upgrade` gets 400, which is also the
//! non-101 answer to an upgrade that a test may want elsewhere.

use std::sync::Arc;

use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::response::{self, Body};
use super::{OpenGuard, State, MAX_STREAM};

pub fn handle(state: &Arc<State>, mut req: Request<()>) -> Response<Body> {
    let Some(protocol) = req.headers().get(header::UPGRADE).cloned() else {
        return response::failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "/upgrade-echo wants an Upgrade header",
        );
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let state = state.clone();
    tokio::spawn(async move {
        let _open = OpenGuard::new(&state.execs);
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let (mut read, mut write) = tokio::io::split(TokioIo::new(upgraded));
        let deadline = Instant::now() + MAX_STREAM;
        tokio::select! {
            _ = tokio::io::copy(&mut read, &mut write) => {}
            () = tokio::time::sleep_until(deadline) => {}
            () = state.shutdown.cancelled() => {}
        }
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut write).await;
    });
    let mut response = response::full(StatusCode::SWITCHING_PROTOCOLS, "", bytes::Bytes::new());
    let h = response.headers_mut();
    h.remove(header::CONTENT_TYPE);
    h.insert(header::UPGRADE, protocol);
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    response
}
