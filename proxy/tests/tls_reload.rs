//! Certificates change under a running edge: new handshakes see the new certificate,
//! established connections stay up, a bad file keeps the old certificate, SNI chooses.

mod common;

use std::path::Path;

use common::*;
use kas_edge::listener::tls::certs::write_self_signed;
use kas_proto::diagnostics::diagnostics_client::DiagnosticsClient;
use kas_proto::diagnostics::PingRequest;

fn tls_toml(certs: &[&Path]) -> String {
    let mut out = String::from("[tls]\n");
    for dir in certs {
        out.push_str(&format!(
            "[[tls.certificates]]\ncert = {:?}\nkey = {:?}\n",
            dir.join("tls.crt"),
            dir.join("tls.key")
        ));
    }
    out
}

async fn handshake_ok(edge: &Edge, ca: &Path, sni: &str) -> bool {
    let connector = tls_connector(ca, &[b"h2"]);
    let Ok(tcp) = tokio::net::TcpStream::connect(edge.https).await else {
        return false;
    };
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    connector.connect(name, tcp).await.is_ok()
}

#[tokio::test]
async fn replaced_certificate_is_served_to_new_handshakes_and_open_connections_stay() {
    let cluster = Cluster::start(1).await;
    let certs = tempfile::tempdir().unwrap();
    let first = write_self_signed(certs.path(), &["localhost".into()]).unwrap();
    let first_ca = certs.path().join("first.pem");
    std::fs::copy(&first.cert, &first_ca).unwrap();
    let edge = Edge::start(
        cluster.subnet,
        &cluster.endpoints(),
        &tls_toml(&[certs.path()]),
    )
    .await;
    edge.wait_healthy(1).await;
    assert!(handshake_ok(&edge, &first_ca, "localhost").await);

    // An agent holds a websocket across the rotation.
    let channel = ws_channel(edge.https, tls_connector(&first_ca, &[b"http/1.1"]), None)
        .await
        .unwrap();
    let mut client = DiagnosticsClient::new(channel);
    client
        .ping(with_token(PingRequest::default()))
        .await
        .unwrap();

    // Rotate: a new pair replaces the files (temp file + rename, like cert-manager).
    let second = write_self_signed(certs.path(), &["localhost".into()]).unwrap();
    let second_ca = certs.path().join("second.pem");
    std::fs::copy(&second.cert, &second_ca).unwrap();
    eventually("new handshakes see the new certificate", STEP, || {
        let (edge, ca) = (&edge, &second_ca);
        async move { handshake_ok(edge, ca, "localhost").await }
    })
    .await;
    assert!(
        !handshake_ok(&edge, &first_ca, "localhost").await,
        "old certificate retired"
    );
    client
        .ping(with_token(PingRequest::default()))
        .await
        .expect("the established websocket survives the rotation");

    // A broken key is refused: the second certificate stays in force.
    std::fs::write(
        &second.key,
        "-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let admin = edge.admin;
    eventually("reload error counted", STEP, || async move {
        http_get(admin, "/metrics")
            .await
            .is_some_and(|(_, m)| metric(&m, "edge_tls_reloads_total{result=\"error\"}") >= 1.0)
    })
    .await;
    assert!(handshake_ok(&edge, &second_ca, "localhost").await);
    assert!(edge.log().contains("keeping the previous certificates"));
}

#[tokio::test]
async fn sni_selects_among_several_certificates() {
    let cluster = Cluster::start(1).await;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cert_a = write_self_signed(a.path(), &["kas.a.test".into()]).unwrap();
    let cert_b = write_self_signed(b.path(), &["kas.b.test".into(), "*.b.test".into()]).unwrap();
    let edge = Edge::start(
        cluster.subnet,
        &cluster.endpoints(),
        &tls_toml(&[a.path(), b.path()]),
    )
    .await;
    assert!(handshake_ok(&edge, &cert_a.cert, "kas.a.test").await);
    assert!(handshake_ok(&edge, &cert_b.cert, "kas.b.test").await);
    assert!(
        handshake_ok(&edge, &cert_b.cert, "agents.b.test").await,
        "wildcard"
    );
    assert!(!handshake_ok(&edge, &cert_b.cert, "kas.a.test").await);
    // Unknown names get the first (default) certificate.
    assert!(handshake_ok(&edge, &cert_a.cert, "kas.a.test").await);
}
