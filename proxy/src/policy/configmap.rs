//! The blocklist from a ConfigMap key, watched through the Kubernetes API
//! (`[policies.blocklist_configmap]`).
//!
//! A ConfigMap mounted as a volume reaches a pod when the kubelet next syncs it (typically
//! a minute or more later, at a different moment on every node); a watch hears of an
//! update within milliseconds on every replica. Each new value of the key goes through
//! [`Policies::apply_blocklist`], exactly like a file edit: same parser, same errors (the
//! label `configmap:NAMESPACE/NAME/KEY` stands where a file name would), the last good list
//! kept on a bad one, the newly blocked clients' connections closed.
//!
//! Missed events: every watch starts with a fresh LIST of the one object, and whenever a
//! watch ends — cut mid-stream, ended by the API server (`timeoutSeconds`), silent for too
//! long, an error — the next one starts with a LIST again (after a jittered back-off when it
//! failed). So an update made while no watch was open is applied as soon as the API answers,
//! whether or not the API server could have replayed it. (kube-runtime's `watcher`, which
//! EndpointSlice discovery uses, resumes a cut watch from its last resourceVersion instead;
//! for a single object a relist costs nothing and trusts nothing.)
//!
//! A ConfigMap that does not exist, or has no such key, is an empty list (so a freshly
//! deployed, empty ConfigMap works); a value that does not parse is rejected.

use std::pin::pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::Api;
use tokio::time::Instant;

use super::blocklist::{content_digest, Blocklist};
use super::sources::BlocklistSource;
use super::Policies;
use crate::config::{BlocklistConfigMap, PoliciesConfig};
use crate::support::kubernetes;
use crate::support::status::SourceStatus;
use crate::telemetry::metrics::EdgeMetrics;

/// What the configuration and the errors call this source.
const FIELD: &str = "policies.blocklist_configmap";

/// The API server ends a watch after this long, and a watch silent (no event, no bookmark)
/// for [`WATCH_IDLE_LIMIT`] is given up: a connection that died without a word is noticed
/// within about a minute.
const WATCH_TIMEOUT_SECS: u32 = 55;
const WATCH_IDLE_LIMIT: Duration = Duration::from_secs(WATCH_TIMEOUT_SECS as u64 + 10);

/// A watch that ends sooner than this after its list started is followed by a back-off,
/// as after a failure, so an API server that ends every watch at once is not hammered.
const MIN_WATCH: Duration = Duration::from_secs(1);

/// Waits between attempts after a failed list or watch: the first, the longest.
const FIRST_RETRY: Duration = Duration::from_millis(250);
const LONGEST_RETRY: Duration = Duration::from_secs(30);

/// The ConfigMap key, with the namespace resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigMapKey {
    pub namespace: String,
    pub name: String,
    pub key: String,
}

impl ConfigMapKey {
    /// `cfg` with its namespace, or the pod's own.
    pub fn resolve(cfg: &BlocklistConfigMap) -> anyhow::Result<Self> {
        let namespace = match &cfg.namespace {
            Some(ns) => ns.clone(),
            None => kubernetes::own_namespace(&format!("{FIELD}.namespace"))?,
        };
        Ok(Self {
            namespace,
            name: cfg.name.clone(),
            key: cfg.key.clone(),
        })
    }

    /// How errors name the list, where a file's path would stand:
    /// `configmap:NAMESPACE/NAME/KEY`.
    pub fn label(&self) -> String {
        format!("configmap:{}/{}/{}", self.namespace, self.name, self.key)
    }

    /// The key's value in `cm` (`None`: no ConfigMap, or no such key).
    pub fn value<'a>(&self, cm: Option<&'a ConfigMap>) -> Option<&'a str> {
        cm.and_then(|cm| cm.data.as_ref())
            .and_then(|data| data.get(&self.key))
            .map(String::as_str)
    }
}

/// What `run` needs from the pod, checked without contacting anything: the namespace when
/// none is configured, and credentials (the kubeconfig named, or the service account).
pub fn preflight(cfg: &PoliciesConfig) -> anyhow::Result<()> {
    let Some(cm) = &cfg.blocklist_configmap else {
        return Ok(());
    };
    ConfigMapKey::resolve(cm)?;
    kubernetes::preflight(FIELD, cm.kubeconfig.as_deref())
}

/// Starts watching the configured ConfigMap on `rt`. The returned status is synced once
/// the ConfigMap has been read (the edge is not ready before: it would admit clients the
/// other replicas refuse).
pub fn start(
    rt: &tokio::runtime::Handle,
    cfg: &BlocklistConfigMap,
    policies: &Arc<Policies>,
    metrics: &EdgeMetrics,
) -> anyhow::Result<Arc<SourceStatus>> {
    let key = ConfigMapKey::resolve(cfg)?;
    let configmap = format!("{}/{}", key.namespace, key.name);
    let status = Arc::new(SourceStatus::new(
        format!("blocklist ConfigMap {configmap}"),
        metrics.blocklist_watch_up.with_label_values(&[&configmap]),
        metrics
            .blocklist_watch_errors
            .with_label_values(&[&configmap]),
    ));
    let client = rt.block_on(kubernetes::watch_client(FIELD, cfg.kubeconfig.as_deref()))?;
    rt.spawn(run(client, key, Arc::downgrade(policies), status.clone()));
    Ok(status)
}

/// Why a list+watch cycle ended early.
#[derive(Debug, thiserror::Error)]
enum WatchError {
    #[error("list: {0}")]
    List(kube::Error),
    #[error("watch: {0}")]
    Watch(kube::Error),
    #[error("watch: {0}")]
    Event(Box<kube::core::Status>),
}

impl WatchError {
    fn status(&self) -> Option<u16> {
        match self {
            WatchError::List(kube::Error::Api(s)) | WatchError::Watch(kube::Error::Api(s)) => {
                Some(s.code)
            }
            WatchError::Event(s) => Some(s.code),
            _ => None,
        }
    }
}

/// Follows the ConfigMap until `policies` is gone, applying every new value of the key.
pub async fn run(
    client: kube::Client,
    key: ConfigMapKey,
    policies: Weak<Policies>,
    status: Arc<SourceStatus>,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &key.namespace);
    let mut applied = Applied::default();
    let mut retry = Retry::default();
    while policies.strong_count() > 0 {
        let started = Instant::now();
        let wait = match list_and_watch(&api, &key, &policies, &mut applied, &status).await {
            Ok(()) if started.elapsed() >= MIN_WATCH => {
                retry.reset();
                tracing::debug!(configmap = %key.label(), "blocklist ConfigMap watch ended; relisting");
                continue;
            }
            // Ended at once: wait before asking again, as after a failure.
            Ok(()) => retry.next(),
            Err(err) => {
                let wait = retry.next();
                report(&err, &key, &status, wait);
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// One cycle: LIST the object and apply it, then WATCH from the list's resourceVersion
/// until the watch ends. `Ok` when it ended without an error.
async fn list_and_watch(
    api: &Api<ConfigMap>,
    key: &ConfigMapKey,
    policies: &Weak<Policies>,
    applied: &mut Applied,
    status: &SourceStatus,
) -> Result<(), WatchError> {
    let selector = format!("metadata.name={}", key.name);
    let list = api
        .list(&ListParams::default().fields(&selector))
        .await
        .map_err(WatchError::List)?;
    let Some(policies) = policies.upgrade() else {
        return Ok(());
    };
    let current = list
        .items
        .iter()
        .find(|cm| cm.metadata.name.as_deref() == Some(&key.name));
    applied.offer(&policies, key, current);
    status.succeeded();
    let version = list.metadata.resource_version.unwrap_or_default();
    let params = WatchParams::default()
        .fields(&selector)
        .timeout(WATCH_TIMEOUT_SECS);
    let events = api
        .watch(&params, &version)
        .await
        .map_err(WatchError::Watch)?;
    let mut events = pin!(events);
    loop {
        // Bookmarks (or the API server's end of the watch) come well within this; a
        // connection that died without a word does not.
        let next = tokio::time::timeout(WATCH_IDLE_LIMIT, events.next()).await;
        let event = match next {
            Err(_idle) => {
                tracing::warn!(configmap = %key.label(), "blocklist ConfigMap watch silent for {WATCH_IDLE_LIMIT:?}; relisting");
                return Ok(());
            }
            Ok(None) => return Ok(()),
            Ok(Some(Err(err))) => return Err(WatchError::Watch(err)),
            Ok(Some(Ok(event))) => event,
        };
        match event {
            WatchEvent::Added(cm) | WatchEvent::Modified(cm) => {
                applied.offer(&policies, key, Some(&cm));
            }
            WatchEvent::Deleted(_) => applied.offer(&policies, key, None),
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(err) => return Err(WatchError::Event(err.boxed())),
        }
    }
}

fn report(err: &WatchError, key: &ConfigMapKey, status: &SourceStatus, wait: Duration) {
    let configmap = key.label();
    match err.status() {
        // The API server forgot our resourceVersion: relisting is the cure, nothing is wrong.
        Some(410) => {
            tracing::debug!(%configmap, error = %err, "blocklist ConfigMap watch expired; relisting");
            return;
        }
        Some(403) => tracing::error!(
            %configmap,
            error = %err,
            retry_in = ?wait,
            "blocklist ConfigMap watch forbidden: the edge's service account needs get, list \
             and watch on this ConfigMap (deploy/base/edge/role.yaml); the last list read stays \
             in force"
        ),
        _ => tracing::warn!(
            %configmap,
            error = %err,
            retry_in = ?wait,
            "blocklist ConfigMap watch failed; the last list read stays in force; relisting"
        ),
    }
    status.failed(format_args!("{configmap}: {err}"));
}

/// The text last handed to [`Policies::apply_blocklist`], so a relist or an update of
/// another key that leaves the value as it was changes nothing (and a bad value is
/// reported once, not at every relist).
#[derive(Default)]
struct Applied {
    digest: Option<u64>,
}

impl Applied {
    fn offer(&mut self, policies: &Policies, key: &ConfigMapKey, cm: Option<&ConfigMap>) {
        let value = key.value(cm);
        let text = value.unwrap_or("");
        let digest = content_digest(text.as_bytes());
        if self.digest == Some(digest) {
            return;
        }
        self.digest = Some(digest);
        let label = key.label();
        match (cm, value) {
            (None, _) => {
                tracing::warn!(configmap = %label, "the blocklist ConfigMap does not exist: no entries from it")
            }
            (Some(_), None) => {
                tracing::warn!(configmap = %label, "the blocklist ConfigMap has no such key: no entries from it")
            }
            (Some(_), Some(_)) => {}
        }
        let version = cm
            .and_then(|cm| cm.metadata.resource_version.as_deref())
            .unwrap_or("-");
        policies.apply_blocklist(
            BlocklistSource::ConfigMap,
            &format!("{label} (resourceVersion {version})"),
            Blocklist::parse(&label, text),
        );
    }
}

/// Exponential back-off with jitter between failed attempts, reset by a successful list.
struct Retry {
    next: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self { next: FIRST_RETRY }
    }
}

impl Retry {
    fn next(&mut self) -> Duration {
        let wait = self.next.mul_f64(rand::random_range(0.5..=1.0));
        self.next = (self.next * 2).min(LONGEST_RETRY);
        wait
    }

    fn reset(&mut self) {
        self.next = FIRST_RETRY;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn cm(data: &[(&str, &str)]) -> ConfigMap {
        ConfigMap {
            data: Some(
                data.iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..ConfigMap::default()
        }
    }

    #[test]
    fn the_key_is_read_and_named_like_a_file() {
        let key = ConfigMapKey::resolve(&BlocklistConfigMap {
            namespace: Some("kas".into()),
            name: "kas-edge-blocklist".into(),
            key: "blocklist.txt".into(),
            kubeconfig: None,
        })
        .unwrap();
        assert_eq!(
            key.label(),
            "configmap:kas/kas-edge-blocklist/blocklist.txt"
        );
        let with = cm(&[("blocklist.txt", "192.0.2.1\n"), ("other", "x")]);
        assert_eq!(key.value(Some(&with)), Some("192.0.2.1\n"));
        assert_eq!(key.value(Some(&cm(&[("other", "x")]))), None);
        assert_eq!(key.value(Some(&ConfigMap::default())), None);
        assert_eq!(key.value(None), None);
        let err = Blocklist::parse(&key.label(), "192.0.2.1\n10.0.0.300\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "configmap:kas/kas-edge-blocklist/blocklist.txt:2: \"10.0.0.300\" is not an IP address or CIDR"
        );
    }

    #[test]
    fn retries_back_off_with_jitter_and_reset() {
        let mut retry = Retry::default();
        let waits: Vec<Duration> = (0..10).map(|_| retry.next()).collect();
        assert!(
            waits[0] >= FIRST_RETRY / 2 && waits[0] <= FIRST_RETRY,
            "{waits:?}"
        );
        assert!(waits.iter().all(|w| *w <= LONGEST_RETRY), "{waits:?}");
        assert!(waits[9] >= LONGEST_RETRY / 2, "{waits:?}");
        retry.reset();
        assert!(retry.next() <= FIRST_RETRY);
    }
}
