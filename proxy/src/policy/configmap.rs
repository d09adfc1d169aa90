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
//! Missed events: after any failed list or watch (a dropped connection, an API server
//! restart, an expired resourceVersion) the watch starts over with a fresh list, so an
//! update made while it was down is applied as soon as the API answers again. A watch that
//! the API server ends normally resumes from the last resourceVersion it saw (kept current
//! by bookmarks), which the API server guarantees misses nothing.
//!
//! A ConfigMap that does not exist, or has no such key, is an empty list (so a freshly
//! deployed, empty ConfigMap works); a value that does not parse is rejected.

use std::pin::pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::watcher::{self, watcher, Event};
use kube::Api;

use super::blocklist::{content_digest, Blocklist};
use super::sources::BlocklistSource;
use super::Policies;
use crate::config::{BlocklistConfigMap, PoliciesConfig};
use crate::support::kubernetes::{self, watch_error_status};
use crate::support::status::SourceStatus;
use crate::telemetry::metrics::EdgeMetrics;

/// What the configuration and the errors call this source.
const FIELD: &str = "policies.blocklist_configmap";

/// The API server ends a watch after this long (and the client gives up on one silent for a
/// little longer), so a connection that died without a word is noticed within a minute.
const WATCH_TIMEOUT_SECS: u32 = 55;

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
    let status = Arc::new(SourceStatus::new(
        format!("blocklist ConfigMap {}/{}", key.namespace, key.name),
        metrics.blocklist_watch_up.clone(),
        metrics.blocklist_watch_errors.clone(),
    ));
    let client = rt.block_on(kubernetes::client(FIELD, cfg.kubeconfig.as_deref()))?;
    rt.spawn(run(client, key, Arc::downgrade(policies), status.clone()));
    Ok(status)
}

/// Follows the ConfigMap until `policies` is gone, applying every new value of the key.
pub async fn run(
    client: kube::Client,
    key: ConfigMapKey,
    policies: Weak<Policies>,
    status: Arc<SourceStatus>,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &key.namespace);
    let config = watcher::Config::default()
        .fields(&format!("metadata.name={}", key.name))
        .timeout(WATCH_TIMEOUT_SECS);
    let mut applied = Applied::default();
    let mut retry = Retry::default();
    loop {
        let mut events = pin!(watcher(api.clone(), config.clone()));
        // Between Init and InitDone: the object of the (re)list, if there is one.
        let mut listed: Option<ConfigMap> = None;
        let failure = loop {
            let Some(event) = events.next().await else {
                break None;
            };
            let Some(policies) = policies.upgrade() else {
                return;
            };
            match event {
                Ok(Event::Init) => listed = None,
                Ok(Event::InitApply(cm)) => listed = Some(cm),
                Ok(Event::InitDone) => {
                    applied.offer(&policies, &key, listed.take().as_ref());
                    status.succeeded();
                    retry.reset();
                }
                Ok(Event::Apply(cm)) => applied.offer(&policies, &key, Some(&cm)),
                Ok(Event::Delete(_)) => applied.offer(&policies, &key, None),
                Err(err) => break Some(err),
            }
        };
        let wait = retry.next();
        match failure {
            Some(err) => {
                report(&err, &key, &status, wait);
            }
            None => {
                tracing::warn!(configmap = %key.label(), "blocklist ConfigMap watch ended; relisting")
            }
        }
        // A fresh watcher lists first: whatever changed meanwhile is applied then.
        tokio::time::sleep(wait).await;
    }
}

fn report(err: &watcher::Error, key: &ConfigMapKey, status: &SourceStatus, wait: Duration) {
    let configmap = key.label();
    match watch_error_status(err) {
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
