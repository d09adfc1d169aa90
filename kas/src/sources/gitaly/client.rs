//! The Gitaly client: channels pooled per address, rate limits, deadlines, v2 tokens,
//! feature flags as metadata, and Gitaly's status codes mapped to what kas acts on.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use hyper_util::rt::TokioIo;
use prometheus::IntCounterVec;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Uri};
use tonic::Code;

use kas_proto::gitaly::commit_service_client::CommitServiceClient;
use kas_proto::gitaly::ref_service_client::RefServiceClient;
use kas_proto::gitaly::tree_entry::EntryType;
use kas_proto::gitaly::tree_entry_response::ObjectType;
use kas_proto::gitaly::{
    FindBranchRequest, FindCommitRequest, GetTreeEntriesRequest, TreeEntryRequest,
};

use super::token::v2_token;
use crate::gitlab::{GitalyInfo, GitalyLocation};

/// What went wrong talking to Gitaly, reduced to what callers act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GitalyError {
    #[error("{0}")]
    NotFound(String),
    #[error("file is larger than the limit of {limit} bytes")]
    FileTooBig { limit: usize },
    #[error("{path} is a {kind}, not a file")]
    NotAFile { path: String, kind: String },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// Gitaly refused kas's token (wrong shared secret or clock skew): an operator problem.
    #[error("Gitaly refused the request ({code:?}): {message}")]
    Denied { code: Code, message: String },
    #[error("invalid Gitaly address {address:?}: {reason}")]
    BadAddress { address: String, reason: String },
    /// Unreachable, overloaded, timed out: try again later.
    #[error("Gitaly is unavailable: {0}")]
    Unavailable(String),
    #[error("unexpected Gitaly answer: {0}")]
    Other(String),
}

impl GitalyError {
    pub fn outcome_label(&self) -> &'static str {
        match self {
            GitalyError::NotFound(_) => "not_found",
            GitalyError::FileTooBig { .. } | GitalyError::FailedPrecondition(_) => {
                "failed_precondition"
            }
            GitalyError::NotAFile { .. } => "not_a_file",
            GitalyError::InvalidArgument(_) => "invalid_argument",
            GitalyError::Denied { .. } => "denied",
            GitalyError::BadAddress { .. } => "bad_address",
            GitalyError::Unavailable(_) => "unavailable",
            GitalyError::Other(_) => "error",
        }
    }

    fn from_status(rpc: &str, status: tonic::Status) -> Self {
        let message = format!("{rpc}: {}", status.message());
        match status.code() {
            Code::NotFound => GitalyError::NotFound(message),
            Code::InvalidArgument => GitalyError::InvalidArgument(message),
            Code::FailedPrecondition => GitalyError::FailedPrecondition(message),
            code @ (Code::PermissionDenied | Code::Unauthenticated) => {
                GitalyError::Denied { code, message }
            }
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Cancelled
            | Code::Unknown
            | Code::Internal => GitalyError::Unavailable(format!("{:?}: {message}", status.code())),
            code => GitalyError::Other(format!("{code:?}: {message}")),
        }
    }
}

/// Rate limits and deadlines (real kas: 30/s burst 70 overall, 15/s burst 40 per server).
#[derive(Debug, Clone)]
pub struct GitalyLimits {
    pub global_per_second: f64,
    pub global_burst: u32,
    pub per_server_per_second: f64,
    pub per_server_burst: u32,
    /// Deadline of one call, waiting for the rate limiters included.
    pub call_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for GitalyLimits {
    fn default() -> Self {
        Self {
            global_per_second: 30.0,
            global_burst: 70,
            per_server_per_second: 15.0,
            per_server_burst: 40,
            call_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

fn quota(per_second: f64, burst: u32) -> Quota {
    crate::config::RateLimitConfig {
        refill_rate_per_second: per_second,
        bucket_size: burst,
    }
    .quota()
}

/// One entry of a tree listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntryInfo {
    /// Path from the repository root.
    pub path: String,
    pub oid: String,
    pub is_blob: bool,
}

/// Channels to Gitaly servers, shared by every stream of a kas pod.
pub struct GitalyPool {
    channels: Mutex<HashMap<String, Channel>>,
    global: DefaultDirectRateLimiter,
    per_server: DefaultKeyedRateLimiter<String>,
    limits: GitalyLimits,
    requests: IntCounterVec,
}

fn parse_address(address: &str, connect_timeout: Duration) -> Result<Channel, GitalyError> {
    let bad = |reason: &str| GitalyError::BadAddress {
        address: address.to_owned(),
        reason: reason.to_owned(),
    };
    let tune = |endpoint: Endpoint| {
        endpoint
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
    };
    if let Some(rest) = address.strip_prefix("tcp://") {
        let endpoint =
            Endpoint::from_shared(format!("http://{rest}")).map_err(|e| bad(&e.to_string()))?;
        Ok(tune(endpoint).connect_lazy())
    } else if let Some(rest) = address.strip_prefix("tls://") {
        let uri: Uri = format!("https://{rest}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        let host = uri.host().ok_or_else(|| bad("no host"))?.to_owned();
        let endpoint = Endpoint::from(uri)
            .tls_config(ClientTlsConfig::new().with_native_roots().domain_name(host))
            .map_err(|e| bad(&e.to_string()))?;
        Ok(tune(endpoint).connect_lazy())
    } else if let Some(rest) = address.strip_prefix("unix:") {
        let path = std::path::PathBuf::from(rest.strip_prefix("//").unwrap_or(rest));
        if path.as_os_str().is_empty() {
            return Err(bad("empty socket path"));
        }
        let endpoint = Endpoint::from_static("http://gitaly.invalid");
        Ok(
            tune(endpoint).connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            })),
        )
    } else {
        Err(bad("expected tcp://, tls:// or unix:"))
    }
}

impl GitalyPool {
    pub fn new(limits: GitalyLimits, requests: IntCounterVec) -> Self {
        Self {
            channels: Mutex::new(HashMap::new()),
            global: RateLimiter::direct(quota(limits.global_per_second, limits.global_burst)),
            per_server: RateLimiter::keyed(quota(
                limits.per_server_per_second,
                limits.per_server_burst,
            )),
            limits,
            requests,
        }
    }

    fn channel(&self, info: &GitalyInfo) -> Result<Channel, GitalyError> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(channel) = channels.get(&info.address) {
            return Ok(channel.clone());
        }
        let channel = parse_address(&info.address, self.limits.connect_timeout)?;
        channels.insert(info.address.clone(), channel.clone());
        Ok(channel)
    }

    /// Number of distinct Gitaly servers this pool holds a channel to.
    pub fn channel_count(&self) -> usize {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    fn request<M>(&self, info: &GitalyInfo, message: M) -> tonic::Request<M> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.limits.call_timeout);
        let metadata = request.metadata_mut();
        let bearer = format!("Bearer {}", v2_token(info.token.as_bytes()));
        if let Ok(value) = AsciiMetadataValue::try_from(bearer) {
            metadata.insert("authorization", value);
        }
        for (name, value) in &info.features {
            match (
                AsciiMetadataKey::from_bytes(name.as_bytes()),
                AsciiMetadataValue::try_from(value.as_str()),
            ) {
                (Ok(name), Ok(value)) => {
                    metadata.insert(name, value);
                }
                _ => {
                    tracing::debug!(feature = %name, "skipping a Gitaly feature flag that is not valid metadata")
                }
            }
        }
        request
    }

    /// Waits for both rate limiters, runs `call`, all within the call deadline; counts the
    /// outcome in `kas_gitaly_requests_total{rpc,outcome}`.
    async fn run<T, Fut>(
        &self,
        rpc: &'static str,
        info: &GitalyInfo,
        call: impl FnOnce(Channel) -> Fut,
    ) -> Result<T, GitalyError>
    where
        Fut: Future<Output = Result<T, GitalyError>>,
    {
        let result = match self.channel(info) {
            Err(e) => Err(e),
            Ok(channel) => {
                let limited = async {
                    self.global.until_ready().await;
                    self.per_server.until_key_ready(&info.address).await;
                    call(channel).await
                };
                match tokio::time::timeout(self.limits.call_timeout, limited).await {
                    Ok(result) => result,
                    Err(_) => Err(GitalyError::Unavailable(format!(
                        "{rpc}: no answer within {:?}",
                        self.limits.call_timeout
                    ))),
                }
            }
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.outcome_label(),
        };
        self.requests.with_label_values(&[rpc, outcome]).inc();
        result
    }

    /// The head commit of `branch` (no `refs/heads/`), or `None` when there is no such
    /// branch (Gitaly answers NOT_FOUND, HGitaly an empty message).
    pub async fn find_branch(
        &self,
        location: &GitalyLocation,
        branch: &str,
    ) -> Result<Option<String>, GitalyError> {
        let request = self.request(
            &location.info,
            FindBranchRequest {
                repository: Some(location.repository.to_proto()),
                name: branch.as_bytes().to_vec(),
            },
        );
        self.run("FindBranch", &location.info, |channel| async move {
            match RefServiceClient::new(channel).find_branch(request).await {
                Ok(response) => Ok(response
                    .into_inner()
                    .branch
                    .and_then(|b| b.target_commit)
                    .map(|c| c.id)
                    .filter(|id| !id.is_empty())),
                Err(status) if status.code() == Code::NotFound => Ok(None),
                Err(status) => Err(GitalyError::from_status("FindBranch", status)),
            }
        })
        .await
    }

    /// The commit id `revision` names, or `None` when it names no commit (Gitaly answers
    /// with an empty message; NOT_FOUND and INVALID_ARGUMENT are read the same way).
    pub async fn find_commit(
        &self,
        location: &GitalyLocation,
        revision: &str,
    ) -> Result<Option<String>, GitalyError> {
        let request = self.request(
            &location.info,
            FindCommitRequest {
                repository: Some(location.repository.to_proto()),
                revision: revision.as_bytes().to_vec(),
            },
        );
        self.run("FindCommit", &location.info, |channel| async move {
            match CommitServiceClient::new(channel).find_commit(request).await {
                Ok(response) => Ok(response
                    .into_inner()
                    .commit
                    .map(|c| c.id)
                    .filter(|id| !id.is_empty())),
                Err(status) if matches!(status.code(), Code::NotFound | Code::InvalidArgument) => {
                    Ok(None)
                }
                Err(status) => Err(GitalyError::from_status("FindCommit", status)),
            }
        })
        .await
    }

    /// A file's bytes at `revision`, or `None` when the path does not exist. Files over
    /// `max_size` bytes are refused (by Gitaly, and checked again here).
    pub async fn tree_entry(
        &self,
        location: &GitalyLocation,
        revision: &str,
        path: &str,
        max_size: usize,
    ) -> Result<Option<Vec<u8>>, GitalyError> {
        let request = self.request(
            &location.info,
            TreeEntryRequest {
                repository: Some(location.repository.to_proto()),
                revision: revision.as_bytes().to_vec(),
                path: path.as_bytes().to_vec(),
                limit: 0,
                max_size: i64::try_from(max_size).unwrap_or(i64::MAX),
            },
        );
        let too_big = GitalyError::FileTooBig { limit: max_size };
        self.run("TreeEntry", &location.info, |channel| async move {
            let mut stream = match CommitServiceClient::new(channel).tree_entry(request).await {
                Ok(response) => response.into_inner(),
                Err(status) => {
                    return match status.code() {
                        Code::NotFound => Ok(None),
                        Code::FailedPrecondition => Err(too_big),
                        _ => Err(GitalyError::from_status("TreeEntry", status)),
                    }
                }
            };
            let mut data = Vec::new();
            let mut first = true;
            loop {
                let message = match stream.message().await {
                    Ok(Some(message)) => message,
                    Ok(None) => break,
                    Err(status) if status.code() == Code::NotFound => return Ok(None),
                    Err(status) if status.code() == Code::FailedPrecondition => {
                        return Err(too_big)
                    }
                    Err(status) => return Err(GitalyError::from_status("TreeEntry", status)),
                };
                if first {
                    first = false;
                    let kind = ObjectType::try_from(message.r#type).unwrap_or(ObjectType::Tag);
                    if kind != ObjectType::Blob {
                        return Err(GitalyError::NotAFile {
                            path: path.to_owned(),
                            kind: kind.as_str_name().to_ascii_lowercase(),
                        });
                    }
                    if usize::try_from(message.size).unwrap_or(usize::MAX) > max_size {
                        return Err(too_big);
                    }
                }
                if data.len() + message.data.len() > max_size {
                    return Err(too_big);
                }
                data.extend_from_slice(&message.data);
            }
            // A stream without a message is how some servers say "no such path".
            Ok((!first).then_some(data))
        })
        .await
    }

    /// The entries under `path` (`.` for the root) at `revision`, at most `max_entries`.
    /// A missing path or revision is an empty list (Gitaly: INVALID_ARGUMENT, HGitaly:
    /// NOT_FOUND).
    pub async fn get_tree_entries(
        &self,
        location: &GitalyLocation,
        revision: &str,
        path: &str,
        recursive: bool,
        max_entries: usize,
    ) -> Result<Vec<TreeEntryInfo>, GitalyError> {
        let request = self.request(
            &location.info,
            GetTreeEntriesRequest {
                repository: Some(location.repository.to_proto()),
                revision: revision.as_bytes().to_vec(),
                path: path.as_bytes().to_vec(),
                recursive,
            },
        );
        self.run("GetTreeEntries", &location.info, |channel| async move {
            let missing = |code: Code| matches!(code, Code::NotFound | Code::InvalidArgument);
            let mut stream = match CommitServiceClient::new(channel)
                .get_tree_entries(request)
                .await
            {
                Ok(response) => response.into_inner(),
                Err(status) if missing(status.code()) => return Ok(Vec::new()),
                Err(status) => return Err(GitalyError::from_status("GetTreeEntries", status)),
            };
            let mut entries = Vec::new();
            loop {
                match stream.message().await {
                    Ok(Some(message)) => {
                        for entry in message.entries {
                            if entries.len() >= max_entries {
                                return Err(GitalyError::FailedPrecondition(format!(
                                    "more than {max_entries} entries under {path:?}"
                                )));
                            }
                            entries.push(TreeEntryInfo {
                                path: String::from_utf8_lossy(&entry.path).into_owned(),
                                oid: entry.oid,
                                is_blob: entry.r#type == EntryType::Blob as i32,
                            });
                        }
                    }
                    Ok(None) => return Ok(entries),
                    Err(status) if missing(status.code()) => return Ok(Vec::new()),
                    Err(status) => return Err(GitalyError::from_status("GetTreeEntries", status)),
                }
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_parsed_or_named_in_the_error() {
        // Lazy channels: nothing connects, so these only check parsing. Needs a runtime for
        // tonic's background tasks.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let t = Duration::from_secs(1);
            assert!(parse_address("tcp://127.0.0.1:8075", t).is_ok());
            assert!(parse_address("tls://gitaly.example.com:9999", t).is_ok());
            assert!(parse_address("unix:/var/opt/gitlab/gitaly/gitaly.socket", t).is_ok());
            assert!(parse_address("unix:///run/gitaly.socket", t).is_ok());
            for bad in ["gitaly:8075", "http://x:1", "unix:", "tcp://"] {
                let err = parse_address(bad, t).unwrap_err();
                assert!(
                    matches!(err, GitalyError::BadAddress { .. }),
                    "{bad}: {err}"
                );
                assert!(err.to_string().contains(bad), "{err}");
            }
        });
    }

    #[test]
    fn quotas_accept_fractional_rates() {
        let q = quota(0.5, 3);
        assert_eq!(q.burst_size().get(), 3);
        assert_eq!(q.replenish_interval(), Duration::from_secs(2));
    }
}
