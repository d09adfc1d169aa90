//! The edge obtains its certificate from a real ACME server (pebble, started here) through
//! its own HTTP-01 handling on the plain listener, then serves it: the handshake chain
//! verifies against pebble's root and agents get through. With several replicas, the CA's
//! validation request may reach one that does not run ACME: it relays the challenge.

mod common;

use common::*;
use kas_proto::diagnostics::diagnostics_client::DiagnosticsClient;
use kas_proto::diagnostics::PingRequest;
use kas_testkit::pebble;

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
    let connector = tls_connector_trusting(roots, &[b"h2"]);
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

#[tokio::test]
async fn a_replica_without_acme_relays_the_challenge_to_the_one_that_runs_it() {
    let cluster = Cluster::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    // pebble validates at the follower (<subnet>.250:8080, the load balancer's pick);
    // the ACME client runs on the leader at <subnet>.249.
    let follower_ip = ip(cluster.subnet, 250);
    let leader_ip = ip(cluster.subnet, 249);
    let pebble = pebble::start_pebble(dir.path(), &follower_ip.to_string(), 8080, None).await;
    let follower = Edge::start_at(
        follower_ip,
        &cluster.endpoints(),
        &format!("[tls]\nself_signed = true\nhosts = [\"localhost\"]\nself_signed_dir = {:?}\nacme_challenge_relay = \"{leader_ip}:8080\"\n",
            dir.path().join("follower-tls")),
    )
    .await;
    let cache = dir.path().join("acme-cache");
    let leader_config = format!(
        "[tls]\n[tls.acme]\ndomains = [\"{HOST}\"]\ndirectory = \"{}\"\ncache_dir = {cache:?}\n\
         directory_ca = {:?}\n",
        pebble.directory, pebble.https_ca
    );
    // Ready means "certificate issued", which needs the follower's relay.
    let leader = Edge::start_at(leader_ip, &cluster.endpoints(), &leader_config).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(pebble::pebble_root(&pebble).await).unwrap();
    let tcp = tokio::net::TcpStream::connect(leader.https).await.unwrap();
    tls_connector_trusting(roots, &[])
        .connect(rustls::pki_types::ServerName::try_from(HOST).unwrap(), tcp)
        .await
        .expect("the leader serves a certificate issued by pebble");
    assert!(
        follower.log().contains("relayed an ACME challenge"),
        "{}",
        follower.log()
    );
    // Without a pending challenge, the relay answers 404 like the leader would.
    let (status, _) = http_get(follower.http, "/.well-known/acme-challenge/unknown-token")
        .await
        .unwrap();
    assert_eq!(status, 404);
}
