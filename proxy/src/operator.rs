//! Operator commands that change what every replica enforces: `kas-edge block`,
//! `kas-edge unblock` and `kas-edge blocklist show`, against the blocklist ConfigMap the
//! edge watches or against a plain file.
//!
//! An edit is read–modify–write: [`policy::edit`](crate::policy::edit) turns the text read
//! into the text to write. On a ConfigMap the write carries the resourceVersion read, so a
//! concurrent change (another operator's `block`, a `kubectl edit`) makes the API answer 409
//! and the edit is made again on the newer text: two operators blocking at once both land.
//! On a file the same cycle runs under an exclusive lock on its directory and ends with an
//! atomic rename, so the edge never reads half a file.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;
use kube::Api;

use crate::config::EdgeConfig;
use crate::policy::blocklist::{content_digest, Blocklist};
use crate::policy::configmap::ConfigMapKey;
use crate::policy::edit::{EditError, Edited};

/// How many times an edit is made again after a concurrent change before giving up.
const MAX_ATTEMPTS: u32 = 20;

/// How long a file edit waits for another one to finish.
const FILE_LOCK_WAIT: Duration = Duration::from_secs(10);

/// The `fieldManager` of the command's writes (shown in the ConfigMap's managedFields).
const FIELD_MANAGER: &str = "kas-edge";

/// Which list a command edits.
pub enum Target {
    File(PathBuf),
    ConfigMap {
        /// Boxed: a client is large next to a path.
        api: Box<Api<ConfigMap>>,
        key: ConfigMapKey,
    },
}

/// How the command line names the list.
#[derive(Debug, Clone, Default)]
pub struct TargetArgs {
    /// `NAMESPACE/NAME`.
    pub configmap: Option<String>,
    pub key: Option<String>,
    pub file: Option<PathBuf>,
    /// An edge configuration: its `policies.blocklist_configmap`, else its
    /// `policies.blocklist`.
    pub config: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
}

impl TargetArgs {
    /// Exactly one of `configmap`, `file` and `config`, resolved to a list.
    pub async fn resolve(self) -> anyhow::Result<Target> {
        let named = [
            self.configmap.is_some(),
            self.file.is_some(),
            self.config.is_some(),
        ];
        if named.iter().filter(|n| **n).count() != 1 {
            anyhow::bail!(
                "name the list with exactly one of --configmap NAMESPACE/NAME, --file PATH or \
                 --config EDGE.TOML"
            );
        }
        if let Some(file) = self.file {
            return Ok(Target::File(file));
        }
        let key = match (self.configmap, self.config) {
            (Some(configmap), _) => {
                let (namespace, name) = configmap.split_once('/').with_context(|| {
                    format!("--configmap {configmap:?}: expected NAMESPACE/NAME")
                })?;
                let cm = crate::config::BlocklistConfigMap {
                    namespace: Some(namespace.to_owned()),
                    name: name.to_owned(),
                    key: self
                        .key
                        .unwrap_or_else(|| crate::config::DEFAULT_BLOCKLIST_KEY.to_owned()),
                    kubeconfig: None,
                };
                let mut config = EdgeConfig::default();
                config.policies.blocklist_configmap = Some(cm.clone());
                config.policies.validate().map_err(|e| {
                    anyhow::anyhow!("--configmap/--key: {}: {}", e.field, e.message)
                })?;
                ConfigMapKey::resolve(&cm)?
            }
            (None, Some(path)) => {
                let config = EdgeConfig::from_file(&path)?;
                match (
                    config.policies.blocklist_configmap,
                    config.policies.blocklist,
                ) {
                    (Some(cm), _) => ConfigMapKey::resolve(&cm)?,
                    (None, Some(file)) => return Ok(Target::File(file)),
                    (None, None) => anyhow::bail!(
                        "{}: no policies.blocklist_configmap and no policies.blocklist",
                        path.display()
                    ),
                }
            }
            (None, None) => unreachable!("counted above"),
        };
        let client = crate::support::kubernetes::operator_client(
            self.kubeconfig.as_deref(),
            self.context.as_deref(),
        )
        .await?;
        Ok(Target::ConfigMap {
            api: Box::new(Api::namespaced(client, &key.namespace)),
            key,
        })
    }
}

/// A list as read or written.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub text: String,
    /// The ConfigMap's resourceVersion.
    pub version: Option<String>,
}

impl Snapshot {
    /// One line about the list: entries and the hash every replica shows in
    /// `edge_blocklist_content_hash`.
    pub fn summary(&self) -> String {
        let hash = content_digest(self.text.as_bytes());
        let entries = match Blocklist::parse("-", &self.text) {
            Ok(list) if list.len() == 1 => "1 entry".to_owned(),
            Ok(list) => format!("{} entries", list.len()),
            Err(e) => format!("DOES NOT PARSE ({} bad lines)", e.bad_lines().len().max(1)),
        };
        let version = self
            .version
            .as_deref()
            .map(|v| format!("resourceVersion {v}, "))
            .unwrap_or_default();
        format!("{version}{entries}, edge_blocklist_content_hash {hash}")
    }
}

/// What an edit did.
#[derive(Debug)]
pub struct Outcome {
    pub edited: Edited,
    pub snapshot: Snapshot,
    /// Writes refused because of a concurrent change, each followed by a new attempt.
    pub conflicts: u32,
}

impl Target {
    /// The list, as errors and messages name it.
    pub fn describe(&self) -> String {
        match self {
            Target::File(path) => format!("file {}", path.display()),
            Target::ConfigMap { key, .. } => {
                format!("ConfigMap {}/{} key {}", key.namespace, key.name, key.key)
            }
        }
    }

    pub async fn read(&self) -> anyhow::Result<Snapshot> {
        match self {
            Target::File(path) => Ok(Snapshot {
                text: read_file(path)?,
                version: None,
            }),
            Target::ConfigMap { api, key } => {
                let cm = get(api, key).await?;
                Ok(Snapshot {
                    text: key.value(Some(&cm)).unwrap_or("").to_owned(),
                    version: cm.metadata.resource_version,
                })
            }
        }
    }

    /// Applies `edit` to the list in force and writes the result, again on the newer text
    /// after a concurrent change. A file edit blocks the calling thread while it waits for
    /// another one to finish (at most [`FILE_LOCK_WAIT`]): meant for the command's own
    /// runtime.
    pub async fn edit(
        &self,
        edit: impl Fn(&str) -> Result<Edited, EditError>,
    ) -> anyhow::Result<Outcome> {
        match self {
            Target::File(path) => edit_file(path, &edit),
            Target::ConfigMap { api, key } => edit_configmap(api, key, &edit).await,
        }
    }
}

async fn get(api: &Api<ConfigMap>, key: &ConfigMapKey) -> anyhow::Result<ConfigMap> {
    match api.get_opt(&key.name).await {
        Ok(Some(cm)) => Ok(cm),
        Ok(None) => anyhow::bail!(
            "ConfigMap {}/{} does not exist (deploy/base creates it: kubectl apply -k …)",
            key.namespace,
            key.name
        ),
        Err(e) => Err(explain(e, key, "get")),
    }
}

fn explain(err: kube::Error, key: &ConfigMapKey, verb: &str) -> anyhow::Error {
    let what = format!("ConfigMap {}/{}", key.namespace, key.name);
    match &err {
        kube::Error::Api(status) if status.code == 403 => anyhow::anyhow!(
            "{verb} {what}: forbidden: your Kubernetes user needs get and update on this \
             ConfigMap (Role kas-edge-blocklist-editor, deploy/base/edge/role.yaml): {err}"
        ),
        _ => anyhow::anyhow!("{verb} {what}: {err}"),
    }
}

async fn edit_configmap(
    api: &Api<ConfigMap>,
    key: &ConfigMapKey,
    edit: &dyn Fn(&str) -> Result<Edited, EditError>,
) -> anyhow::Result<Outcome> {
    let mut conflicts = 0;
    for attempt in 1..=MAX_ATTEMPTS {
        let mut cm = get(api, key).await?;
        let current = key.value(Some(&cm)).unwrap_or("").to_owned();
        let edited = edit(&current)?;
        let Edited::Changed { text, .. } = &edited else {
            return Ok(Outcome {
                edited,
                snapshot: Snapshot {
                    text: current,
                    version: cm.metadata.resource_version,
                },
                conflicts,
            });
        };
        // `cm` carries the resourceVersion read: the API refuses the write (409) if the
        // ConfigMap changed since.
        cm.data
            .get_or_insert_with(Default::default)
            .insert(key.key.clone(), text.clone());
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PostParams::default()
        };
        match api.replace(&key.name, &params, &cm).await {
            Ok(written) => {
                return Ok(Outcome {
                    snapshot: Snapshot {
                        text: key.value(Some(&written)).unwrap_or("").to_owned(),
                        version: written.metadata.resource_version,
                    },
                    edited,
                    conflicts,
                })
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                conflicts += 1;
                // Spread the retries of operators who collided.
                let wait = Duration::from_millis(20 * u64::from(attempt))
                    .mul_f64(rand::random_range(0.5..=1.5));
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(explain(e, key, "update")),
        }
    }
    anyhow::bail!(
        "ConfigMap {}/{} changed under every one of {MAX_ATTEMPTS} attempts; try again",
        key.namespace,
        key.name
    )
}

fn read_file(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn edit_file(
    path: &Path,
    edit: &dyn Fn(&str) -> Result<Edited, EditError>,
) -> anyhow::Result<Outcome> {
    let _lock = DirLock::acquire(path)?;
    let current = read_file(path)?;
    let edited = edit(&current)?;
    let text = match &edited {
        Edited::Changed { text, .. } => {
            let mode = std::fs::metadata(path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .permissions()
                .mode()
                & 0o7777;
            crate::support::fs::write_atomically(path, text.as_bytes(), mode)?;
            text.clone()
        }
        Edited::Unchanged(_) => current,
    };
    Ok(Outcome {
        edited,
        snapshot: Snapshot {
            text,
            version: None,
        },
        conflicts: 0,
    })
}

/// An exclusive `flock` on a file's directory, held while it lives: the file itself is
/// replaced by a rename, so a lock on it would not exclude the next writer, and a lock file
/// beside it would show up in the edge's directory watch.
struct DirLock {
    _dir: std::fs::File,
}

impl DirLock {
    fn acquire(path: &Path) -> anyhow::Result<Self> {
        use std::os::fd::AsRawFd as _;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let file = std::fs::File::open(dir)
            .with_context(|| format!("cannot open the directory {}", dir.display()))?;
        let started = Instant::now();
        loop {
            // SAFETY: flock on a descriptor this function owns; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return Ok(Self { _dir: file });
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::WouldBlock {
                return Err(err).with_context(|| format!("cannot lock {}", dir.display()));
            }
            if started.elapsed() > FILE_LOCK_WAIT {
                anyhow::bail!(
                    "{} is locked by another edit for over {FILE_LOCK_WAIT:?}",
                    dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::edit::{self, Stamp};

    #[tokio::test]
    async fn concurrent_file_blocks_all_land_and_the_mode_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blocklist.txt");
        std::fs::write(&path, "# list\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let threads: Vec<_> = (1..=8)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let net = edit::parse_target(&format!("192.0.2.{i}")).unwrap();
                    edit_file(&path, &|text| edit::block(text, net, "r", &Stamp::fixed())).unwrap()
                })
            })
            .collect();
        for t in threads {
            assert!(matches!(t.join().unwrap().edited, Edited::Changed { .. }));
        }
        let list = Blocklist::parse("b", &read_file(&path).unwrap()).unwrap();
        assert_eq!(list.len(), 8);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no stray files"
        );

        let target = Target::File(path.clone());
        let snapshot = target.read().await.unwrap();
        assert!(
            snapshot
                .summary()
                .starts_with("8 entries, edge_blocklist_content_hash "),
            "{}",
            snapshot.summary()
        );
        let missing = Target::File(dir.path().join("missing.txt"));
        let err = format!(
            "{:#}",
            missing
                .edit(|t| Ok(Edited::Unchanged(t.into())))
                .await
                .unwrap_err()
        );
        assert!(err.contains("missing.txt"), "{err}");
    }

    #[tokio::test]
    async fn targets_are_named_once() {
        let err = TargetArgs::default()
            .resolve()
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("exactly one"), "{err}");
        let both = TargetArgs {
            file: Some("a".into()),
            configmap: Some("kas/b".into()),
            ..TargetArgs::default()
        };
        assert!(both.resolve().await.is_err());
        let bad = TargetArgs {
            configmap: Some("kas-edge-blocklist".into()),
            ..TargetArgs::default()
        };
        let err = bad.resolve().await.err().unwrap().to_string();
        assert!(err.contains("NAMESPACE/NAME"), "{err}");
        let bad = TargetArgs {
            configmap: Some("kas/Bad".into()),
            ..TargetArgs::default()
        };
        let err = bad.resolve().await.err().unwrap().to_string();
        assert!(err.contains("policies.blocklist_configmap.name"), "{err}");
    }
}
