//! PROXY protocol v1/v2 from an L4 load balancer: the parser ([`header`]) and the pre-TLS
//! layer that reads it from trusted sources and judges the real client.

pub mod header;

use std::sync::Arc;

use async_trait::async_trait;
use pingora::listeners::PreTlsProcess;
use pingora::protocols::l4::stream::Stream as L4Stream;

use crate::pingora_compat;
use crate::policy::Policies;

/// Layer 2: reads the PROXY header from trusted load balancers, records the real client
/// address for everything after (logs, limits, closing on block) and judges it.
pub struct ProxyHeaderLayer(pub Arc<Policies>);

#[async_trait]
impl PreTlsProcess for ProxyHeaderLayer {
    async fn process(&self, stream: &mut L4Stream) -> pingora::Result<()> {
        use pingora::{Error, ErrorType};
        // Ask the socket directly: reading the digest's peer address would fix it to the
        // load balancer's before the PROXY header can correct it.
        let peer = pingora_compat::socket_peer(stream);
        let Some(peer) = peer else { return Ok(()) };
        if !self.0.trusted.contains(peer.ip()) {
            // Direct clients speak TLS at once; a PROXY header from them is not honoured
            // and fails the handshake.
            return Ok(());
        }
        let header = header::read_header(stream, self.0.proxy_header_timeout)
            .await
            .map_err(|e| {
                self.0.blocked("bad_proxy_header", "proxy_protocol");
                Error::explain(
                    ErrorType::ReadError,
                    format!("PROXY header from {peer}: {e}"),
                )
            })?;
        let client = header.client_addr(peer);
        // Logs, limits and closing on block all see the client, not the load balancer.
        pingora_compat::set_client_addr(stream, client);
        if self.0.admit(client.ip()) {
            Ok(())
        } else {
            Err(Error::explain(
                ErrorType::ConnectRefused,
                format!("client {client} refused by policy"),
            ))
        }
    }
}
