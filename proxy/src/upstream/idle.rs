//! HTTP/1.1 connections to one pod that no agent connection uses at the moment, kept for
//! the next agent connection: a new agent connection's first plain request then costs no
//! pod connect (and the pod no accept). Bounded per pod; a connection the pod closed while
//! it waited here is found and dropped when it is taken.

use std::sync::Mutex;

use tokio::net::TcpStream;

use crate::support::sync::lock;

/// Idle connections one pod keeps, at most.
const MAX_IDLE: usize = 32;

#[derive(Default)]
pub struct IdleConnections {
    stack: Mutex<Vec<TcpStream>>,
}

impl IdleConnections {
    /// Keeps `stream` for a later request (dropped, which closes it, when full).
    pub fn put(&self, stream: TcpStream) {
        let mut stack = lock(&self.stack);
        if stack.len() < MAX_IDLE {
            stack.push(stream);
        }
    }

    /// The most recently used connection the pod still keeps open.
    pub fn take(&self) -> Option<TcpStream> {
        loop {
            let stream = lock(&self.stack).pop()?;
            if still_open(&stream) {
                return Some(stream);
            }
        }
    }
}

/// Whether the pod still keeps `stream` open: nothing to read, no end of stream.
pub fn still_open(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_the_pod_closed_are_not_handed_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let idle = IdleConnections::default();
        let open = TcpStream::connect(addr).await.unwrap();
        let (_kept, _) = listener.accept().await.unwrap();
        idle.put(open);
        let closed = TcpStream::connect(addr).await.unwrap();
        let (gone, _) = listener.accept().await.unwrap();
        drop(gone);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        idle.put(closed);
        // The closed one (taken first: last in) is dropped, the open one comes out.
        let taken = idle.take().expect("the open connection");
        assert!(still_open(&taken));
        assert!(idle.take().is_none());
        for _ in 0..MAX_IDLE + 5 {
            idle.put(TcpStream::connect(addr).await.unwrap());
        }
        assert_eq!(lock(&idle.stack).len(), MAX_IDLE);
    }
}
