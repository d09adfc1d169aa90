//! gRPC channels to the other kas pods, one per private API URL, made on first use and
//! reused (HTTP/2 carries many calls on one connection). Bounded: pods come and go, URLs
//! with them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

const MAX_CHANNELS: usize = 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct KasPool {
    channels: Mutex<HashMap<String, Channel>>,
    /// For `grpcs://` pods: the CA (PEM; none: the system's roots) and the name their
    /// certificates carry (none: the URL's host).
    ca: Option<Vec<u8>>,
    server_name: Option<String>,
}

impl KasPool {
    pub fn new(ca: Option<Vec<u8>>, server_name: Option<String>) -> Self {
        Self {
            channels: Mutex::new(HashMap::new()),
            ca,
            server_name,
        }
    }

    /// The channel to `url` (`grpc://host:port` or `grpcs://host:port`); connects lazily.
    pub fn channel(&self, url: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(url) {
            return Ok(c.clone());
        }
        let (http_url, tls) = if let Some(rest) = url.strip_prefix("grpc://") {
            (format!("http://{rest}"), false)
        } else if let Some(rest) = url.strip_prefix("grpcs://") {
            (format!("https://{rest}"), true)
        } else {
            return Err(format!("unsupported kas URL {url:?} (grpc:// or grpcs://)"));
        };
        let mut endpoint = Endpoint::from_shared(http_url)
            .map_err(|e| format!("bad kas URL {url:?}: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(55))
            .keep_alive_while_idle(true);
        if tls {
            let mut config = match &self.ca {
                Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
                None => ClientTlsConfig::new().with_native_roots(),
            };
            if let Some(name) = &self.server_name {
                config = config.domain_name(name.clone());
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| format!("TLS for {url:?}: {e}"))?;
        }
        let channel = endpoint.connect_lazy();
        if channels.len() >= MAX_CHANNELS {
            if let Some(k) = channels.keys().next().cloned() {
                channels.remove(&k);
            }
        }
        channels.insert(url.to_owned(), channel.clone());
        Ok(channel)
    }
}
