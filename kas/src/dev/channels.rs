//! gRPC channels to a kas agent port for the local stack's agents and the tests:
//! `grpc://` (HTTP/2 cleartext) and `ws://` (gRPC inside a `ws-tunnel` websocket).

use std::net::SocketAddr;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// gRPC over HTTP/2 cleartext, as `grpc://` agents connect.
pub async fn h2c(addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("a socket address makes a valid URI")
        .connect()
        .await
}

/// gRPC over a `ws://addr/` websocket with subprotocol `ws-tunnel`, as `ws://` agents
/// connect.
pub async fn ws(addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    let url = format!("ws://{addr}/");
    // The HTTP/2 authority inside the tunnel: a name nothing resolves.
    Endpoint::from_static("http://kas.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let url = url.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let ws = crate::transport::wstunnel::client_handshake(tcp, &url).await?;
                Ok::<_, std::io::Error>(TokioIo::new(ws))
            }
        }))
        .await
}

/// `message` with `authorization: Bearer <token>`, as agents send every call.
pub fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = format!("Bearer {token}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}
