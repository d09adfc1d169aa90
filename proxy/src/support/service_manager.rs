//! Telling systemd (`Type=notify`) that the edge is ready, and which process is the
//! service's main one after a graceful upgrade: the new process was started by
//! `ExecReload`, not by systemd, so without `MAINPID=` systemd would take the old
//! process's exit for the service's end. The protocol is one datagram to the socket in
//! `$NOTIFY_SOCKET` (sd_notify(3)); without that variable this does nothing.

/// Sends `READY=1` and `MAINPID=<this process>`; logs (and otherwise ignores) a failure:
/// the edge serves whether or not a service manager listens.
pub fn notify_ready() {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let message = format!("READY=1\nMAINPID={}\n", std::process::id());
    if let Err(e) = send(&socket, message.as_bytes()) {
        tracing::warn!(socket = ?socket, error = %e, "cannot notify the service manager");
    }
}

fn send(socket: &std::ffi::OsStr, message: &[u8]) -> std::io::Result<usize> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let bytes = socket.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        // An abstract socket (Linux): `@` stands for the leading NUL.
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)?
        }
        None => SocketAddr::from_pathname(socket)?,
    };
    UnixDatagram::unbound()?.send_to_addr(message, &addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_datagram_names_this_process_as_ready_and_main() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let message = format!("READY=1\nMAINPID={}\n", std::process::id());
        send(path.as_os_str(), message.as_bytes()).unwrap();
        let mut buf = [0u8; 128];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], message.as_bytes());
    }
}
