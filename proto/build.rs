//! Compiles `protos/` with protox, a pure-Rust protobuf compiler, so a fresh machine
//! without a system `protoc` builds the workspace.

use std::path::Path;

const PROTOS: &[&str] = &[
    "entity.proto",
    "agentcfg.proto",
    "agent_configuration.proto",
    "agent_registrar.proto",
    "gitops.proto",
    "prototool.proto",
    "reverse_tunnel_info.proto",
    "reverse_tunnel.proto",
    "grpctool.proto",
    "kubernetes_api.proto",
    "google/rpc/status.proto",
    "diagnostics.proto",
    "kasapp.proto",
    "redistool.proto",
    "agent_tracker.proto",
    "agent_tracker_rpc.proto",
    "event.proto",
    "notifications.proto",
    "gitaly/shared.proto",
    "gitaly/ref.proto",
    "gitaly/commit.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new("protos");
    println!("cargo:rerun-if-changed={}", root.display());
    let files: Vec<_> = PROTOS.iter().map(|p| root.join(p)).collect();
    let fds = protox::compile(&files, [root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // ReverseTunnel has an RPC named `Connect`, which clashes with the generated
        // `Client::connect(endpoint)` constructor; clients are built from a Channel instead.
        .build_transport(false)
        // Small initial buffers per stream (see src/codec.rs).
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(fds)?;
    Ok(())
}
