//! JSON log lines on stdout for every binary of the project, so one log pipeline reads
//! the edge and kas alike. `RUST_LOG` overrides the configured filter.

use serde::Deserialize;

/// The `[log]` section both binaries' configuration files share.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter such as `info` or `kas=debug,info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
        }
    }
}

/// Installs the process-wide JSON logger on stdout. An invalid filter falls back to `info`.
pub fn init(filter: &str) {
    init_with_writer(filter, std::io::stdout);
}

/// Like [`init`], writing through `writer`: the edge passes one that queues lines for a
/// thread of their own, so no worker thread ever blocks on a slow log consumer. Lines of
/// the `log` crate (pingora's own) arrive here too.
pub fn init_with_writer<W>(filter: &str, writer: W)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_env_filter(filter)
        .with_writer(writer)
        .init();
}
