//! A client we did not write: Python grpcio with stubs generated from `proto/` calls
//! GetConfiguration on a kas pod. Needs `pip install -r .ci/requirements.txt` (the README's
//! test command does it).

mod common;

use std::process::Command;

use common::{Harness, TOKEN};

pub fn python_script(name: &str) -> String {
    format!("{}/tests/python/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test]
async fn python_grpcio_client_gets_the_configuration() {
    let kas = Harness::start().await;
    let script = python_script("get_configuration.py");
    let target = kas.agent_addr.to_string();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args([&script, &target, TOKEN])
            .output()
    })
    .await
    .unwrap()
    .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "python client failed (is grpcio installed? pip install -r .ci/requirements.txt)\n{stdout}\n{stderr}"
    );
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON line");
    assert_eq!(json["agent_id"], kas.agent.agent_id);
    assert_eq!(json["project_path"], kas.agent.project_path);
    assert_eq!(json["logging_level"], 1, "debug level from config.yaml");
    assert!(!json["commit_id"].as_str().unwrap().is_empty());
}
