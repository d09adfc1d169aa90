//! Restarting the edge without refusing a connection: the new process takes the running
//! one's listening sockets (the same kernel sockets, never closed, so their accept queues
//! carry over) and the old one drains.
//!
//! The operator starts `kas-edge run --config F --upgrade`, then sends SIGQUIT to the
//! running process. On SIGQUIT the old process sends first the edge's own listeners
//! (admin, `listen.http`, served outside pingora) over `<upgrade_socket>.listeners`, then
//! pingora sends its TLS port over `shutdown.upgrade_socket` itself. The new process
//! receives in the same order: its own listeners here ([`OwnListeners::receive`]), then
//! pingora's in `Server::bootstrap`.
//!
//! Handing the sockets over (rather than binding again with `SO_REUSEPORT`, or binding
//! once the old process has closed them) is the only way without a gap: with
//! `SO_REUSEPORT` the connections queued on the old socket when it closes are reset, and
//! binding after the close refuses connections in between.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use pingora::server::Fds;

use crate::admin;
use crate::config::EdgeConfig;

/// How a process gets its listening sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Binds them: nothing else may hold the ports.
    Fresh,
    /// Takes them from the running edge (`kas-edge run --upgrade`).
    Upgrade,
}

/// How long a new process waits for the running one to send its sockets (the operator's
/// SIGQUIT) before giving up. pingora then waits about 5 s more for its TLS port, which
/// the old process sends right after these.
pub const WAIT_FOR_THE_OLD_PROCESS: Duration = Duration::from_secs(30);

/// The edge's listeners that pingora does not own: the admin port and, when configured,
/// the public plain-HTTP port.
pub struct OwnListeners {
    pub admin: std::net::TcpListener,
    pub http: Option<std::net::TcpListener>,
}

/// What a listener is called in a transfer: its configuration field and address, so a
/// new process whose configuration moved a port never serves the old port by mistake.
fn transfer_key(field: &str, addr: SocketAddr) -> String {
    format!("{field}@{addr}")
}

impl OwnListeners {
    /// Binds the admin port and `listen.http`, and checks that the TLS port is free (pingora
    /// binds it later; a busy port fails start-up here, with a clear message).
    pub fn bind(config: &EdgeConfig, rt: &tokio::runtime::Runtime) -> anyhow::Result<Self> {
        rt.block_on(async {
            let admin = admin::bind(config.listen.admin, "listen.admin").await?;
            drop(admin::bind(config.listen.https, "listen.https").await?);
            let http = match config.listen.http {
                Some(addr) => Some(admin::bind(addr, "listen.http").await?.into_std()?),
                None => None,
            };
            Ok(Self {
                admin: admin.into_std()?,
                http,
            })
        })
    }

    /// Waits (at most [`WAIT_FOR_THE_OLD_PROCESS`]) for the running edge to send its
    /// listeners. A listener the old process did not have (this configuration added or
    /// moved it) is bound anew.
    pub fn receive(config: &EdgeConfig, rt: &tokio::runtime::Runtime) -> anyhow::Result<Self> {
        let path = config.shutdown.own_listeners_socket();
        tracing::info!(socket = %path.display(), "upgrade: waiting for the running edge's listeners (send it SIGQUIT)");
        let mut received = receive_fds(&path, WAIT_FOR_THE_OLD_PROCESS)?;
        let mut take = |field: &str, addr: SocketAddr| -> anyhow::Result<std::net::TcpListener> {
            match received.remove(&transfer_key(field, addr)) {
                Some(fd) => {
                    let listener = std::net::TcpListener::from(fd);
                    listener.set_nonblocking(true)?;
                    tracing::info!(%addr, field, "upgrade: took over a listener");
                    Ok(listener)
                }
                None => {
                    tracing::info!(%addr, field, "upgrade: the running edge had no such listener; binding it");
                    Ok(rt.block_on(admin::bind(addr, field))?.into_std()?)
                }
            }
        };
        let admin = take("listen.admin", config.listen.admin)?;
        let http = match config.listen.http {
            Some(addr) => Some(take("listen.http", addr)?),
            None => None,
        };
        for key in received.keys() {
            // Dropping closes it: this configuration no longer listens there.
            tracing::info!(listener = %key, "upgrade: closing a listener this configuration dropped");
        }
        Ok(Self { admin, http })
    }

    /// Copies of the sockets (the same kernel sockets) for [`HandOver`], so this process
    /// can still send them once its serving loops own the originals.
    pub fn duplicate(&self, config: &EdgeConfig) -> anyhow::Result<HandOver> {
        let mut listeners = vec![(
            transfer_key("listen.admin", config.listen.admin),
            self.admin.try_clone().context("listen.admin")?,
        )];
        if let (Some(addr), Some(http)) = (config.listen.http, &self.http) {
            listeners.push((
                transfer_key("listen.http", addr),
                http.try_clone().context("listen.http")?,
            ));
        }
        Ok(HandOver {
            path: config.shutdown.own_listeners_socket(),
            listeners: std::sync::Mutex::new(listeners),
        })
    }
}

/// The running process's side: the edge's own listeners, to send to a new process.
pub struct HandOver {
    path: PathBuf,
    listeners: std::sync::Mutex<Vec<(String, std::net::TcpListener)>>,
}

impl HandOver {
    /// Sends the listeners to a new process waiting on the socket (pingora's retries: it
    /// tries for about 5 s). Blocks. On success this process no longer holds its copies.
    pub fn send(&self) -> anyhow::Result<()> {
        let mut listeners = crate::support::sync::lock(&self.listeners);
        let mut fds = Fds::new();
        for (key, listener) in listeners.iter() {
            fds.add(key.clone(), listener.as_raw_fd());
        }
        let path = self
            .path
            .to_str()
            .context("shutdown.upgrade_socket is not UTF-8")?;
        fds.send_to_sock(path).with_context(|| {
            format!("no new process took the listeners on {path} (start `kas-edge run --upgrade` first)")
        })?;
        listeners.clear();
        Ok(())
    }
}

/// Receives listening sockets on `path`, asking again until `wait` is over: pingora's
/// receiver gives up after about 5 s, less than an operator may need between starting
/// this process and signalling the old one.
fn receive_fds(
    path: &Path,
    wait: Duration,
) -> anyhow::Result<std::collections::HashMap<String, OwnedFd>> {
    let text = path
        .to_str()
        .context("shutdown.upgrade_socket is not UTF-8")?;
    if let Some(dir) = path.parent() {
        // pingora binds the socket with unwrap(): a missing directory would panic.
        anyhow::ensure!(
            dir.is_dir(),
            "shutdown.upgrade_socket: directory {} does not exist",
            dir.display()
        );
    }
    let until = Instant::now() + wait;
    loop {
        let mut fds = Fds::new();
        match fds.get_from_sock(text) {
            Ok(()) => return Ok(owned(fds)),
            Err(e) if Instant::now() < until => {
                tracing::debug!(error = %e, "upgrade: nothing received yet; waiting again");
            }
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "upgrade: no running edge sent its listeners on {text} within {wait:?} \
                     (send it SIGQUIT after starting this process): {e}"
                ))
            }
        }
    }
}

/// Takes ownership of every received descriptor, so none leaks whatever happens next.
fn owned(fds: Fds) -> std::collections::HashMap<String, OwnedFd> {
    let (keys, raw): (Vec<String>, Vec<RawFd>) = fds.serialize();
    keys.into_iter()
        .zip(raw)
        // SAFETY: each descriptor was just received (SCM_RIGHTS) and nothing else owns it
        // (`Fds` only lists numbers and never closes them).
        .map(|(key, fd)| (key, unsafe { OwnedFd::from_raw_fd(fd) }))
        .collect()
}
