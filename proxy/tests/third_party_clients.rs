//! Clients we did not write talk to kas through the edge over TLS: Python grpcio, Python
//! websockets and h2load. `.ci/install` installs them.

mod common;

use std::process::Command;

use common::*;

fn run(mut cmd: Command, what: &str) -> String {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what} ({e}); run .ci/install first"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{what} failed:\n{stdout}\n{stderr}"
    );
    stdout
}

async fn stack() -> (Cluster, Edge) {
    let cluster = Cluster::start(2).await;
    let edge = Edge::start(cluster.subnet, &cluster.endpoints(), "").await;
    edge.wait_healthy(2).await;
    (cluster, edge)
}

#[tokio::test]
async fn python_grpcio_over_tls_through_the_edge() {
    let (cluster, edge) = stack().await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../kas/tests/python/get_configuration.py"
    );
    let mut cmd = Command::new("python3");
    cmd.arg(script)
        .arg(edge.https.to_string())
        .arg(TOKEN)
        .arg("--tls")
        .arg(&edge.ca_file)
        .args(["--authority", "localhost"]);
    let out = tokio::task::spawn_blocking(move || run(cmd, "python grpcio client"))
        .await
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(json["agent_id"], cluster.agent.agent_id);
}

#[tokio::test]
async fn python_websockets_tunnel_reaches_kas_http2_through_the_edge() {
    let (_cluster, edge) = stack().await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/ws_tunnel_probe.py"
    );
    let mut cmd = Command::new("python3");
    cmd.arg(script)
        .arg(format!("wss://{}/", edge.https))
        .arg(&edge.ca_file);
    let out = tokio::task::spawn_blocking(move || run(cmd, "python websockets client"))
        .await
        .unwrap();
    assert!(out.contains("SETTINGS"), "{out}");
}

#[tokio::test]
async fn h2load_grpc_over_tls_through_the_edge_has_no_errors() {
    let (_cluster, edge) = stack().await;
    // One gRPC message: uncompressed, zero length (an empty PingRequest).
    let body = edge.ca_file.with_file_name("ping.bin");
    std::fs::write(&body, [0u8; 5]).unwrap();
    let mut cmd = Command::new("h2load");
    cmd.args(["-n", "400", "-c", "4", "-m", "10", "-d"])
        .arg(&body)
        .args([
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-H",
            &format!("authorization: Bearer {TOKEN}"),
        ])
        .arg(format!(
            "https://{}/kas_edge.diagnostics.v1.Diagnostics/Ping",
            edge.https
        ));
    let out = tokio::task::spawn_blocking(move || run(cmd, "h2load"))
        .await
        .unwrap();
    assert!(
        out.contains("400 succeeded, 0 failed, 0 errored, 0 timeout"),
        "{out}"
    );
    assert!(out.contains("400 2xx"), "{out}");
    assert!(out.contains("Application protocol: h2"), "{out}");
}
