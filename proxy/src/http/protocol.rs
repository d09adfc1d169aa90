//! What kind of request a request is, as metrics and logs label it.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// gRPC over HTTP/2 (`grpcs://` agents).
    Grpc,
    /// An HTTP/1.1 websocket upgrade (`wss://` agents, gRPC inside).
    Websocket,
    /// Anything else; forwarded over HTTP/1.1.
    Http,
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::Websocket => "websocket",
            Protocol::Http => "http",
        }
    }
}
