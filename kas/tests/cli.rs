//! The `kas` binary as operators run it: configuration errors name the field, SIGTERM
//! drains and exits 0.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn kas() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kas"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn bad_configuration_exits_non_zero_naming_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kas.toml");
    let cases = [
        (
            "[gitlab]\naddress = \"https://gitlab.example.com\"\nauth_cache_tll = \"5m\"\n",
            "auth_cache_tll",
        ),
        ("[agent]\nlisten = \"not an address\"\n", "listen"),
        (
            "[gitlab]\naddress = \"gitlab.example.com\"\n",
            "gitlab.address",
        ),
        (
            "[gitlab]\naddress = \"https://gitlab.example.com\"\n",
            "gitlab.authentication_secret_file",
        ),
        // The REST configuration source without an API token: refused with the reason.
        (
            "[gitlab]\naddress = \"https://gitlab.example.com\"\nauthentication_secret_file = \"/s\"\n\
             [agent_configuration]\nsource = \"gitlab_api\"\n",
            "agent_configuration.api_token_file",
        ),
    ];
    for (text, field) in cases {
        std::fs::write(&path, text).unwrap();
        for args in [vec!["check", "--config"], vec!["--config"]] {
            let out = kas().args(&args).arg(&path).output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{text} accepted");
            assert!(stderr.contains(field), "{field} not named in: {stderr}");
        }
    }
    // A secret that does not decode to 32 bytes is named too.
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "c2hvcnQ=").unwrap();
    std::fs::write(
        &path,
        format!(
            "[gitlab]\naddress = \"http://127.0.0.1:1\"\nauthentication_secret_file = {:?}\n",
            secret
        ),
    )
    .unwrap();
    let out = kas()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("32"), "{stderr}");
}

#[test]
fn sigterm_turns_readiness_off_then_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, kas::gitlab::SharedSecret::generate().to_base64()).unwrap();
    let (agent, obs) = (free_port(), free_port());
    let path = dir.path().join("kas.toml");
    std::fs::write(
        &path,
        format!(
            "[agent]\nlisten = \"127.0.0.1:{agent}\"\n[observability]\nlisten = \"127.0.0.1:{obs}\"\n\
             [gitlab]\naddress = \"http://127.0.0.1:1\"\nauthentication_secret_file = {secret:?}\n\
             [shutdown]\nreadiness_delay = \"1s\"\ndrain_deadline = \"2s\"\n"
        ),
    )
    .unwrap();
    let mut child = kas()
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let readiness = |expect: u16| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(r) = probe::readiness_status(obs) {
                if r == expect {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("readiness never returned {expect}");
    };
    readiness(200);
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    readiness(503);
    // The agent port is still open while readiness is 503.
    assert!(std::net::TcpStream::connect(("127.0.0.1", agent)).is_ok());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "kas did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
}

mod probe {
    /// Minimal blocking GET /readiness (std only, to keep this test synchronous).
    pub fn readiness_status(port: u16) -> std::io::Result<u16> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.write_all(b"GET /readiness HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        buf.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other("bad response"))
    }
}
