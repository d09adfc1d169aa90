//! PROXY protocol v1/v2 from an L4 load balancer: the parser ([`header`]) and reading the
//! real client address from a trusted load balancer's connection.

pub mod header;

use std::net::SocketAddr;

use pingora::protocols::l4::stream::Stream as L4Stream;

use crate::pingora_compat;
use crate::policy::Policies;

/// Reads the PROXY header a trusted load balancer at `peer` sends first, records the real
/// client address for everything after (logs, limits, closing on block) and judges it
/// with the accept-time policies. Returns the client's address.
pub async fn read_client(
    policies: &Policies,
    stream: &mut L4Stream,
    peer: SocketAddr,
) -> pingora::Result<SocketAddr> {
    use pingora::{Error, ErrorType};
    let header = header::read_header(stream, policies.proxy_header_timeout)
        .await
        .map_err(|e| {
            policies.blocked("bad_proxy_header", "proxy_protocol");
            Error::explain(
                ErrorType::ReadError,
                format!("PROXY header from {peer}: {e}"),
            )
        })?;
    let client = header.client_addr(peer);
    pingora_compat::set_client_addr(stream, client);
    if policies.admit(client.ip()) {
        Ok(client)
    } else {
        Err(Error::explain(
            ErrorType::ConnectRefused,
            format!("client {client} refused by policy"),
        ))
    }
}
