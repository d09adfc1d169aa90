//! `kas-edge check` and `kas-edge run` share one validation path: the same bad
//! configuration stops both with the same words, and `run` stops before it listens.

use std::path::Path;
use std::process::{Command, Output};

fn kas_edge(args: &[&str], config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kas-edge"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "off")
        .output()
        .expect("kas-edge runs")
}

/// The `kas-edge: ...` error line of a failed command.
fn error_line(output: &Output) -> String {
    assert!(!output.status.success(), "expected failure: {output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    stderr
        .lines()
        .find(|l| l.starts_with("kas-edge: "))
        .unwrap_or_else(|| panic!("no error line in {stderr:?}"))
        .to_owned()
}

fn config_with(dir: &Path, extra: &str) -> std::path::PathBuf {
    let config = dir.join("edge.toml");
    // A generated certificate unless the case brings its own.
    let tls = if extra.contains("tls.certificates") {
        ""
    } else {
        "[tls]\nself_signed = true\n"
    };
    std::fs::write(
        &config,
        format!(
            "[listen]\nhttps = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n{tls}\
             [discovery]\nkind = \"static\"\nendpoints = [\"127.0.0.1:8150\"]\n{extra}"
        ),
    )
    .unwrap();
    config
}

#[test]
fn check_and_run_reject_the_same_bad_files_with_the_same_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("blocklist.txt"),
        "203.0.113.7\n10.1.2.3/8\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("tls.crt"), "not a certificate\n").unwrap();
    std::fs::write(dir.path().join("tls.key"), "not a key\n").unwrap();
    let cases = [
        (
            "[policies]\nblocklist = \"blocklist.txt\"\n",
            vec!["blocklist.txt:2", "host bits"],
        ),
        (
            "[[tls.certificates]]\ncert = \"tls.crt\"\nkey = \"tls.key\"\n",
            vec!["tls.crt"],
        ),
        (
            "[[tls.certificates]]\ncert = \"missing.crt\"\nkey = \"tls.key\"\n",
            vec!["missing.crt"],
        ),
        (
            "[proxy_protocol]\ntrusted = [\"10.0.0.0/33\"]\n",
            vec!["proxy_protocol.trusted"],
        ),
        ("[health]\ntimeout = \"9s\"\n", vec!["health.timeout"]),
    ];
    for (extra, expected) in cases {
        let config = config_with(dir.path(), extra);
        let check = error_line(&kas_edge(&["check"], &config));
        let run = error_line(&kas_edge(&["run"], &config));
        assert_eq!(check, run, "check and run disagree for {extra:?}");
        for word in expected {
            assert!(check.contains(word), "{extra:?}: {check}");
        }
    }
}

#[test]
fn check_reports_what_it_loaded() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("blocklist.txt"), "203.0.113.7\n").unwrap();
    let config = config_with(dir.path(), "[policies]\nblocklist = \"blocklist.txt\"\n");
    let output = kas_edge(&["check"], &config);
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("configuration is valid"), "{stdout}");
    assert!(stdout.contains("1 entries"), "{stdout}");
}
