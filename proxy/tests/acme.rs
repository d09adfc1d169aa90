//! The edge obtains its certificate from a real ACME server (pebble, started here) through
//! its own HTTP-01 handling on the plain listener, then serves it: the handshake chain
//! verifies against pebble's root and agents get through.

mod common;
#[path = "support/pebble.rs"]
mod pebble;

use std::sync::Arc;

use common::*;
use kas_proto::diagnostics::diagnostics_client::DiagnosticsClient;
use kas_proto::diagnostics::PingRequest;

const HOST: &str = "kas.edge.test";

#[tokio::test]
async fn edge_obtains_its_certificate_over_http01_and_serves_it() {
    let cluster = Cluster::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    // The edge's plain listener in these fixtures is <subnet>.250:8080.
    let edge_ip = ip(cluster.subnet, 250).to_string();
    let pebble = pebble::start_pebble(dir.path(), &edge_ip, 8080, None).await;
    let cache = dir.path().join("acme-cache");
    let extra = format!(
        "[tls]\n[tls.acme]\ndomains = [\"{HOST}\"]\ncontact = [\"mailto:ops@edge.test\"]\n\
         directory = \"{}\"\ncache_dir = {cache:?}\ndirectory_ca = {:?}\n",
        pebble.directory, pebble.https_ca
    );
    // Edge::start waits for /readyz, which with ACME means "certificate issued".
    let edge = Edge::start(cluster.subnet, &cluster.endpoints(), &extra).await;
    edge.wait_healthy(1).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(pebble::pebble_root(&pebble).await).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(edge.https).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(HOST).unwrap();
    let tls = connector
        .connect(name, tcp)
        .await
        .expect("the served chain verifies against pebble's root");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

    let https = edge.https;
    let channel = tonic::transport::Endpoint::from_static("http://kas.edge.test")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(https).await?;
                let name = rustls::pki_types::ServerName::try_from(HOST).unwrap();
                connector
                    .connect(name, tcp)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .unwrap();
    DiagnosticsClient::new(channel)
        .ping(with_token(PingRequest::default()))
        .await
        .expect("an agent gets through on the ACME certificate");
    assert!(
        cache.read_dir().unwrap().count() > 0,
        "account and certificate cached"
    );
    assert!(edge
        .metrics()
        .await
        .contains("edge_tls_certificate_expiry_seconds"));
}
