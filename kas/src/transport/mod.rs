//! The agent port: gRPC over HTTP/2 cleartext and gRPC over a `ws-tunnel` websocket on one
//! listener ([`listener`]), the websocket byte stream itself ([`wstunnel`]), and the age
//! after which an agent connection is asked to go.

mod accept;
pub(crate) mod listener;
pub mod wstunnel;

pub use accept::next_connection;
pub(crate) use listener::{serve, AgentConnection, Drain};
