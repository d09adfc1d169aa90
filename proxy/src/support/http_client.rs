//! The one plain-HTTP/1.1 GET the edge makes itself: pod health checks on the observability
//! port, and relaying ACME HTTP-01 challenges to the replica that runs ACME. Bounded in time
//! and in body size, because the other end may be broken.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The answer to a GET: status and (bounded) body.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

/// GETs `path` from `addr` with `Host: host`. `None` when nothing usable came back within
/// `timeout` (refused, reset, malformed, or a body over `max_body` bytes).
pub async fn get(
    addr: SocketAddr,
    host: &str,
    path: &str,
    user_agent: &'static str,
    timeout: Duration,
    max_body: usize,
) -> Option<Answer> {
    let attempt = async {
        let stream = TcpStream::connect(addr).await.ok()?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        let request = http::Request::get(path)
            .header(http::header::HOST, host)
            .header(http::header::USER_AGENT, user_agent)
            .body(Empty::<Bytes>::new())
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        let status = response.status();
        let body = Limited::new(response.into_body(), max_body)
            .collect()
            .await
            .ok()?
            .to_bytes();
        Some(Answer { status, body })
    };
    tokio::time::timeout(timeout, attempt).await.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn server(answer: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = sock.read(&mut buf).await;
                let _ = sock.write_all(answer).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        addr
    }

    const T: Duration = Duration::from_secs(2);

    #[tokio::test]
    async fn reads_status_and_body() {
        let addr = server(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello").await;
        let answer = get(addr, "h", "/x", "test", T, 64).await.unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(&answer.body[..], b"hello");
    }

    #[tokio::test]
    async fn oversized_bodies_garbage_and_silence_give_none() {
        let big = server(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello").await;
        assert!(get(big, "h", "/", "test", T, 4).await.is_none());
        let garbage = server(b"SSH-2.0-x\r\n\r\n").await;
        assert!(get(garbage, "h", "/", "test", T, 64).await.is_none());
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let short = Duration::from_millis(200);
        assert!(get(addr, "h", "/", "test", short, 64).await.is_none());
    }
}
