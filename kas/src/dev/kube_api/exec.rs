//! `pods/{name}/exec` over websocket, the way kubectl (1.31+) runs `exec`: subprotocol
//! `v5.channel.k8s.io` (or `v4.channel.k8s.io`), every binary message prefixed with its
//! channel (0 stdin, 1 stdout, 2 stderr, 3 status, 4 resize; v5 adds 255 "close channel"),
//! the exit status as a `metav1.Status` on channel 3, then a close.
//!
//! A few commands are understood, enough to test streams both ways and exit codes: `cat`
//! (echoes stdin until it is closed), `echo ...`, `true`, `false`, `hostname`,
//! `sh -c 'exit N'`, `sh -c 'echo ...'`. Anything else writes to stderr and exits 127.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::response::{self, Body};
use super::{query, OpenGuard, State, MAX_STREAM};

/// The subprotocols served, most preferred first.
const PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const STATUS: u8 = 3;
/// v5: "this channel is closed", payload the channel number.
const CLOSE: u8 = 255;

/// How long to wait for the client's close frame after ours.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

pub fn handle(
    state: Arc<State>,
    ns: &str,
    pod: &str,
    raw_query: &str,
    mut req: Request<()>,
) -> Response<Body> {
    let Some(found) = state.store.pod(ns, pod) else {
        return response::not_found(&format!("pods \"{pod}\""));
    };
    if found.phase != "Running" {
        return response::failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("pod {pod} is not running (phase {})", found.phase),
        );
    }
    let header = |name: header::HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let upgrade = header(header::UPGRADE);
    if !upgrade.eq_ignore_ascii_case("websocket") {
        // SPDY/3.1 (kubectl's fallback) or no upgrade at all: a non-101 answer, which is
        // also what tests of a refused upgrade want.
        return response::failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("exec needs a websocket upgrade, got {upgrade:?}"),
        );
    }
    let key = header(header::SEC_WEBSOCKET_KEY);
    let offered = header(header::SEC_WEBSOCKET_PROTOCOL);
    let Some(protocol) = PROTOCOLS
        .into_iter()
        .find(|p| offered.split(',').any(|o| o.trim() == *p))
    else {
        return response::failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("none of the offered subprotocols is served: {offered:?}"),
        );
    };
    if key.is_empty() {
        return response::failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "no Sec-WebSocket-Key",
        );
    }
    let command = query::pairs(raw_query)
        .into_iter()
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v)
        .collect::<Vec<_>>();
    let session = Session {
        command,
        pod: pod.to_owned(),
        v5: protocol == PROTOCOLS[0],
    };

    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let _open = OpenGuard::new(&state.execs);
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        tokio::select! {
            () = session.run(ws) => {}
            () = state.shutdown.cancelled() => {}
        }
    });

    let mut response = response::full(StatusCode::SWITCHING_PROTOCOLS, "", Bytes::new());
    response.headers_mut().remove(header::CONTENT_TYPE);
    let h = response.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(protocol),
    );
    response
}

/// What a command does with the session's streams.
enum Program {
    /// Echo stdin to stdout until stdin closes, then exit 0.
    Cat,
    /// Write these bytes to stdout, then exit.
    Print(String, i32),
    /// Write to stderr, then exit with the code.
    Fail(String, i32),
}

struct Session {
    command: Vec<String>,
    pod: String,
    v5: bool,
}

impl Session {
    fn program(&self) -> Program {
        let args: Vec<&str> = self.command.iter().map(String::as_str).collect();
        match args.as_slice() {
            ["cat"] => Program::Cat,
            ["true"] => Program::Print(String::new(), 0),
            ["false"] => Program::Print(String::new(), 1),
            ["hostname"] => Program::Print(format!("{}\n", self.pod), 0),
            ["echo", rest @ ..] => Program::Print(format!("{}\n", rest.join(" ")), 0),
            ["sh", "-c", script] => script_program(script.trim()),
            [] => Program::Fail("no command given\n".into(), 126),
            [cmd, ..] => Program::Fail(format!("{cmd}: not found\n"), 127),
        }
    }

    async fn run<S>(self, mut ws: WebSocketStream<S>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let deadline = Instant::now() + MAX_STREAM;
        let code = match self.program() {
            Program::Print(out, code) => {
                if !out.is_empty() && ws.send(frame(STDOUT, out.as_bytes())).await.is_err() {
                    return;
                }
                code
            }
            Program::Fail(err, code) => {
                if ws.send(frame(STDERR, err.as_bytes())).await.is_err() {
                    return;
                }
                code
            }
            Program::Cat => loop {
                let next = tokio::select! {
                    next = ws.next() => next,
                    () = tokio::time::sleep_until(deadline) => return,
                };
                let echo = match next {
                    Some(Ok(Message::Binary(data))) => match data.first() {
                        Some(&STDIN) if data.len() > 1 => Some(frame(STDOUT, &data[1..])),
                        // v5: the client closed stdin: cat sees EOF.
                        Some(&CLOSE) if self.v5 && data.get(1) == Some(&STDIN) => break 0,
                        _ => None,
                    },
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => None,
                };
                if let Some(echo) = echo {
                    if ws.send(echo).await.is_err() {
                        return;
                    }
                }
            },
        };
        let status = exit_status(&self.command, code);
        if ws.send(frame(STATUS, status.as_bytes())).await.is_err() {
            return;
        }
        let _ = ws
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            })))
            .await;
        // Let the client's close frame arrive (bounded), so it reads the status first.
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
    }
}

fn script_program(script: &str) -> Program {
    if script == "cat" {
        return Program::Cat;
    }
    if let Some(n) = script.strip_prefix("exit") {
        return match n.trim() {
            "" => Program::Print(String::new(), 0),
            n => match n.parse::<i32>() {
                Ok(code) => Program::Print(String::new(), code & 0xff),
                Err(_) => Program::Fail(format!("sh: exit: Illegal number: {n}\n"), 2),
            },
        };
    }
    if let Some(text) = script.strip_prefix("echo ") {
        return Program::Print(format!("{}\n", text.trim_matches(['"', '\''])), 0);
    }
    Program::Fail(format!("sh: {script}: not found\n"), 127)
}

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut bytes = Vec::with_capacity(data.len() + 1);
    bytes.push(channel);
    bytes.extend_from_slice(data);
    Message::Binary(bytes.into())
}

/// The channel-3 status kubectl turns into its exit code (reason `NonZeroExitCode`, the
/// code as the cause's message), as the kubelet writes it.
fn exit_status(command: &[String], code: i32) -> String {
    if code == 0 {
        return json!({"metadata": {}, "status": "Success"}).to_string();
    }
    json!({
        "metadata": {},
        "status": "Failure",
        "message": format!(
            "command terminated with non-zero exit code: error executing command {command:?}: exit status {code}"
        ),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
    })
    .to_string()
}
