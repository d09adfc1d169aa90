//! Real kas's YAML configuration (`kas --configuration-file kas.yaml`, the file the GitLab
//! Helm chart and Omnibus write; schema `pkg/kascfg/kascfg.proto` of gitlab-agent),
//! mapped onto [`Config`]. Keys this kas implements are applied; every other key present
//! in the file is reported by its dotted path as ignored — never dropped silently.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_yaml::{Mapping, Value};

use crate::config::{Config, ConfigError, RateLimitConfig, RedisNetwork};

/// A real kas configuration file, read.
#[derive(Debug)]
pub struct KasYaml {
    pub config: Config,
    /// Dotted paths of keys present in the file that this kas does not implement, each
    /// with a short reason when there is one.
    pub ignored: Vec<String>,
}

fn parse_error(path: &Path, message: String) -> ConfigError {
    ConfigError::Parse {
        path: path.to_owned(),
        message,
    }
}

impl KasYaml {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text).map_err(|message| parse_error(path, message))
    }

    /// Parses the text; errors name the key (`agent.listen.address: ...`).
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        let root = match serde_yaml::from_str::<Option<Value>>(text).map_err(|e| e.to_string())? {
            None | Some(Value::Null) => Mapping::new(),
            Some(Value::Mapping(m)) => m,
            Some(_) => return Err("the file must be a YAML mapping".into()),
        };
        let mut reader = Reader {
            root,
            config: Config::default(),
            notes: Vec::new(),
        };
        reader.apply()?;
        let mut ignored = Vec::new();
        leaves(&Value::Mapping(reader.root), "", &mut ignored);
        ignored.extend(reader.notes);
        ignored.sort();
        Ok(Self {
            config: reader.config,
            ignored,
        })
    }
}

/// Collects the dotted paths of every leaf left in `value` (what was not consumed).
fn leaves(value: &Value, prefix: &str, out: &mut Vec<String>) {
    match value {
        Value::Mapping(m) if !m.is_empty() => {
            for (k, v) in m {
                let key = match k {
                    Value::String(s) => s.clone(),
                    other => serde_yaml::to_string(other)
                        .unwrap_or_default()
                        .trim()
                        .to_owned(),
                };
                let path = if prefix.is_empty() {
                    key
                } else {
                    format!("{prefix}.{key}")
                };
                leaves(v, &path, out);
            }
        }
        // An emptied mapping was fully consumed; an empty one in the file says nothing.
        Value::Mapping(_) => {}
        _ => out.push(prefix.to_owned()),
    }
}

struct Reader {
    root: Mapping,
    config: Config,
    /// Keys that are read but have no effect here, with the reason.
    notes: Vec<String>,
}

/// A protobuf JSON duration (`"300s"`, `"0.5s"`), as real kas's files carry, or a
/// human one (`"5m"`).
fn duration(key: &str, v: &Value) -> Result<Duration, String> {
    let text = v
        .as_str()
        .ok_or_else(|| format!("{key}: expected a duration such as \"300s\""))?;
    if let Some(secs) = text.strip_suffix('s') {
        if let Ok(secs) = secs.parse::<f64>() {
            if secs.is_finite() && secs >= 0.0 {
                return Ok(Duration::from_secs_f64(secs));
            }
        }
    }
    humantime_serde::re::humantime::parse_duration(text)
        .map_err(|e| format!("{key}: {text:?}: {e}"))
}

/// `host:port` with an IP, or `:port` for every address, as the Helm chart writes it.
fn listen_address(key: &str, v: &Value) -> Result<SocketAddr, String> {
    let text = v
        .as_str()
        .ok_or_else(|| format!("{key}: expected an address such as \":8150\""))?;
    let full = if text.starts_with(':') {
        format!("0.0.0.0{text}")
    } else {
        text.to_owned()
    };
    full.parse()
        .map_err(|e| format!("{key}: {text:?} is not an IP:port or :port ({e})"))
}

fn string(key: &str, v: &Value) -> Result<String, String> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("{key}: expected a string"))
}

fn usize_value(key: &str, v: &Value) -> Result<usize, String> {
    v.as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| format!("{key}: expected a non-negative integer"))
}

fn u64_value(key: &str, v: &Value) -> Result<u64, String> {
    v.as_u64()
        .ok_or_else(|| format!("{key}: expected a non-negative integer"))
}

fn u32_value(key: &str, v: &Value) -> Result<u32, String> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format!("{key}: expected an integer from 0 to {}", u32::MAX))
}

fn f64_value(key: &str, v: &Value) -> Result<f64, String> {
    v.as_f64()
        .ok_or_else(|| format!("{key}: expected a number"))
}

fn i64_value(key: &str, v: &Value) -> Result<i64, String> {
    v.as_i64()
        .ok_or_else(|| format!("{key}: expected an integer"))
}

fn rate_limit(key: &str, v: &Value) -> Result<RateLimitConfig, String> {
    serde_yaml::from_value::<RateLimitConfig>(v.clone()).map_err(|e| format!("{key}: {e}"))
}

impl Reader {
    /// Removes the value at `path` from the file's tree and returns it.
    fn take(&mut self, path: &[&str]) -> Option<Value> {
        let (last, parents) = path.split_last()?;
        let mut map = &mut self.root;
        for p in parents {
            map = map.get_mut(*p)?.as_mapping_mut()?;
        }
        map.remove(*last)
    }

    fn apply(&mut self) -> Result<(), String> {
        macro_rules! set {
            ($path:expr, $parse:expr, |$v:ident| $apply:expr) => {
                let path: &[&str] = &$path;
                if let Some(raw) = self.take(path) {
                    let $v = $parse(&path.join("."), &raw)?;
                    $apply;
                }
            };
        }
        // Applied to a local (the macro borrows `self` to take values), written back at the end.
        let mut cfg = std::mem::take(&mut self.config);

        set!(["gitlab", "address"], string, |v| cfg.gitlab.address = v);
        set!(["gitlab", "external_url"], string, |v| cfg
            .gitlab
            .external_url =
            Some(v));
        set!(["gitlab", "authentication_secret_file"], string, |v| {
            cfg.gitlab.authentication_secret_file = PathBuf::from(v)
        });
        // Field by field: a key left out keeps real kas's default, as in its protobuf.
        set!(
            ["gitlab", "api_rate_limit", "refill_rate_per_second"],
            f64_value,
            |v| { cfg.gitlab.api_rate_limit.refill_rate_per_second = v }
        );
        set!(
            ["gitlab", "api_rate_limit", "bucket_size"],
            u32_value,
            |v| { cfg.gitlab.api_rate_limit.bucket_size = v }
        );

        if let Some(network) = self.take(&["agent", "listen", "network"]) {
            if network.as_str() != Some("tcp") {
                return Err("agent.listen.network: only \"tcp\" is supported".into());
            }
        }
        set!(["agent", "listen", "address"], listen_address, |v| cfg
            .agent
            .listen =
            v);
        if let Some(ws) = self.take(&["agent", "listen", "websocket"]) {
            self.notes.push(format!(
                "agent.listen.websocket ({}; this kas always serves gRPC and websocket on agent.listen.address)",
                serde_yaml::to_string(&ws).unwrap_or_default().trim()
            ));
        }
        set!(["agent", "listen", "max_connection_age"], duration, |v| {
            cfg.agent.max_connection_age = v
        });
        set!(["agent", "configuration", "poll_period"], duration, |v| {
            cfg.agent_configuration.poll_interval = v
        });
        set!(
            ["agent", "configuration", "max_configuration_file_size"],
            usize_value,
            |v| { cfg.agent_configuration.max_configuration_file_size = v }
        );
        set!(["agent", "gitops", "poll_period"], duration, |v| cfg
            .gitops
            .poll_interval =
            v);
        set!(
            ["agent", "gitops", "max_manifest_file_size"],
            usize_value,
            |v| { cfg.gitops.max_manifest_file_size = v }
        );
        set!(
            ["agent", "gitops", "max_total_manifest_file_size"],
            usize_value,
            |v| { cfg.gitops.max_total_manifest_file_size = v }
        );
        set!(
            ["agent", "gitops", "max_number_of_paths"],
            usize_value,
            |v| { cfg.gitops.max_number_of_paths = v }
        );
        set!(
            ["agent", "gitops", "max_number_of_files"],
            usize_value,
            |v| { cfg.gitops.max_number_of_files = v }
        );
        set!(
            ["agent", "gitops", "project_info_cache_ttl"],
            duration,
            |v| { cfg.gitops.project_info_cache_ttl = v }
        );
        set!(
            ["agent", "gitops", "project_info_cache_error_ttl"],
            duration,
            |v| { cfg.gitops.project_info_cache_error_ttl = v }
        );
        set!(["agent", "info_cache_ttl"], duration, |v| cfg
            .gitlab
            .auth_cache_ttl =
            v);
        set!(["agent", "info_cache_error_ttl"], duration, |v| {
            cfg.gitlab.auth_cache_error_ttl = v
        });

        // The Kubernetes API proxy is on when the section is present, as in real kas.
        let k8s_api = self
            .root
            .get("agent")
            .and_then(|a| a.get("kubernetes_api"))
            .cloned();
        if let Some(section) = k8s_api {
            cfg.kubernetes_api.listen = Some(([0, 0, 0, 0], 8154).into());
            if section.is_null() {
                self.take(&["agent", "kubernetes_api"]);
            }
        }
        if let Some(network) = self.take(&["agent", "kubernetes_api", "listen", "network"]) {
            if network.as_str() != Some("tcp") {
                return Err(
                    "agent.kubernetes_api.listen.network: only \"tcp\" is supported".into(),
                );
            }
        }
        set!(
            ["agent", "kubernetes_api", "listen", "address"],
            listen_address,
            |v| { cfg.kubernetes_api.listen = Some(v) }
        );
        set!(
            ["agent", "kubernetes_api", "listen", "certificate_file"],
            string,
            |v| { cfg.kubernetes_api.certificate_file = Some(PathBuf::from(v)) }
        );
        set!(
            ["agent", "kubernetes_api", "listen", "key_file"],
            string,
            |v| { cfg.kubernetes_api.key_file = Some(PathBuf::from(v)) }
        );
        set!(
            ["agent", "kubernetes_api", "url_path_prefix"],
            string,
            |v| { cfg.kubernetes_api.url_path_prefix = v }
        );
        set!(
            ["agent", "kubernetes_api", "allowed_agent_cache_ttl"],
            duration,
            |v| { cfg.kubernetes_api.allowed_agent_cache_ttl = v }
        );
        set!(
            ["agent", "kubernetes_api", "allowed_agent_cache_error_ttl"],
            duration,
            |v| { cfg.kubernetes_api.allowed_agent_cache_error_ttl = v }
        );

        if let Some(network) = self.take(&["observability", "listen", "network"]) {
            if network.as_str() != Some("tcp") {
                return Err("observability.listen.network: only \"tcp\" is supported".into());
            }
        }
        set!(
            ["observability", "listen", "address"],
            listen_address,
            |v| { cfg.observability.listen = v }
        );
        set!(["observability", "logging", "level"], string, |v| cfg
            .log
            .level =
            v);
        set!(
            ["observability", "liveness_probe", "url_path"],
            string,
            |v| { cfg.observability.liveness_probe.url_path = v }
        );
        set!(
            ["observability", "readiness_probe", "url_path"],
            string,
            |v| { cfg.observability.readiness_probe.url_path = v }
        );
        set!(["observability", "prometheus", "url_path"], string, |v| {
            cfg.observability.prometheus.url_path = v
        });

        self.apply_fleet(&mut cfg)?;

        set!(["gitaly", "global_api_rate_limit"], rate_limit, |v| {
            cfg.gitaly.global_api_rate_limit = v
        });
        set!(["gitaly", "per_server_api_rate_limit"], rate_limit, |v| {
            cfg.gitaly.per_server_api_rate_limit = v
        });
        self.config = cfg;
        Ok(())
    }

    /// `redis`, `api`, `private_api` and the agent settings that go with them.
    fn apply_fleet(&mut self, cfg: &mut Config) -> Result<(), String> {
        macro_rules! set {
            ($path:expr, $parse:expr, |$v:ident| $apply:expr) => {
                let path: &[&str] = &$path;
                if let Some(raw) = self.take(path) {
                    let $v = $parse(&path.join("."), &raw)?;
                    $apply;
                }
            };
        }
        set!(
            ["agent", "listen", "connections_per_token_per_minute"],
            u64_value,
            |v| { cfg.agent.connections_per_token_per_minute = v }
        );
        set!(["agent", "redis_conn_info_ttl"], duration, |v| cfg
            .redis
            .conn_info_ttl =
            v);
        set!(["agent", "redis_conn_info_refresh"], duration, |v| cfg
            .redis
            .conn_info_refresh =
            v);
        set!(["agent", "redis_conn_info_gc"], duration, |v| cfg
            .redis
            .conn_info_gc =
            v);

        if self.root.contains_key("redis") {
            if let Some(network) = self.take(&["redis", "network"]) {
                cfg.redis.network = match network.as_str() {
                    Some("tcp") => RedisNetwork::Tcp,
                    Some("unix") => RedisNetwork::Unix,
                    _ => return Err("redis.network: expected \"tcp\" or \"unix\"".into()),
                };
            }
            set!(["redis", "server", "address"], string, |v| cfg
                .redis
                .address =
                Some(v));
            if self
                .root
                .get("redis")
                .and_then(|r| r.get("sentinel"))
                .is_some()
            {
                let mut sentinel = crate::config::SentinelConfig::default();
                set!(["redis", "sentinel", "master_name"], string, |v| sentinel
                    .master_name =
                    v);
                if let Some(list) = self.take(&["redis", "sentinel", "addresses"]) {
                    let items = list
                        .as_sequence()
                        .ok_or("redis.sentinel.addresses: expected a list of host:port")?;
                    for item in items {
                        sentinel
                            .addresses
                            .push(string("redis.sentinel.addresses", item)?);
                    }
                }
                set!(
                    ["redis", "sentinel", "sentinel_password_file"],
                    string,
                    |v| { sentinel.password_file = Some(PathBuf::from(v)) }
                );
                if self
                    .root
                    .get("redis")
                    .and_then(|r| r.get("sentinel"))
                    .is_some_and(|t| t.as_mapping().is_some_and(|m| m.is_empty()))
                {
                    if let Some(Value::Mapping(m)) = self.root.get_mut("redis") {
                        m.remove("sentinel");
                    }
                }
                cfg.redis.sentinel = Some(sentinel);
            }
            if let Some(enabled) = self.take(&["redis", "tls", "enabled"]) {
                cfg.redis.tls = enabled
                    .as_bool()
                    .ok_or("redis.tls.enabled: expected true or false")?;
            }
            set!(["redis", "tls", "ca_certificate_file"], string, |v| cfg
                .redis
                .ca_certificate_file =
                Some(PathBuf::from(v)));
            set!(["redis", "tls", "certificate_file"], string, |v| cfg
                .redis
                .certificate_file =
                Some(PathBuf::from(v)));
            set!(["redis", "tls", "key_file"], string, |v| cfg
                .redis
                .key_file =
                Some(PathBuf::from(v)));
            if self
                .root
                .get("redis")
                .and_then(|r| r.get("tls"))
                .is_some_and(|t| t.as_mapping().is_some_and(|m| m.is_empty()))
            {
                if let Some(Value::Mapping(m)) = self.root.get_mut("redis") {
                    m.remove("tls");
                }
            }
            set!(["redis", "password_file"], string, |v| cfg
                .redis
                .password_file =
                Some(PathBuf::from(v)));
            set!(["redis", "username"], string, |v| cfg.redis.username =
                Some(v));
            set!(["redis", "key_prefix"], string, |v| cfg.redis.key_prefix =
                v);
            set!(["redis", "database_index"], i64_value, |v| cfg
                .redis
                .database =
                v);
            set!(["redis", "dial_timeout"], duration, |v| cfg
                .redis
                .dial_timeout =
                v);
            set!(["redis", "write_timeout"], duration, |v| cfg
                .redis
                .operation_timeout =
                v);
            for key in ["pool_size", "read_timeout", "idle_timeout"] {
                if self.take(&["redis", key]).is_some() {
                    self.notes.push(format!(
                        "redis.{key} (this kas keeps one multiplexed connection; each operation is bounded by redis.write_timeout)"
                    ));
                }
            }
        }

        for (section, default_port) in [("api", 8153u16), ("private_api", 8155)] {
            if !self.root.contains_key(section) {
                continue;
            }
            let listen_key = |k: &str| format!("{section}.listen.{k}");
            if let Some(network) = self.take(&[section, "listen", "network"]) {
                if network.as_str() != Some("tcp") {
                    return Err(format!(
                        "{}: only \"tcp\" is supported",
                        listen_key("network")
                    ));
                }
            }
            // Real kas's default: loopback (the Helm chart sets the address).
            let mut listen: SocketAddr = ([127, 0, 0, 1], default_port).into();
            if let Some(v) = self.take(&[section, "listen", "address"]) {
                listen = listen_address(&listen_key("address"), &v)?;
            }
            let secret = match self.take(&[section, "listen", "authentication_secret_file"]) {
                Some(v) => PathBuf::from(string(&listen_key("authentication_secret_file"), &v)?),
                None => PathBuf::new(),
            };
            let mut files: [Option<PathBuf>; 3] = [None, None, None];
            for (i, key) in ["certificate_file", "key_file", "ca_certificate_file"]
                .into_iter()
                .enumerate()
            {
                if let Some(v) = self.take(&[section, "listen", key]) {
                    if section == "api" && key == "ca_certificate_file" {
                        return Err(format!(
                            "{}: client certificates on the API port are not supported",
                            listen_key(key)
                        ));
                    }
                    files[i] = Some(PathBuf::from(string(&listen_key(key), &v)?));
                }
            }
            let [cert, key, ca] = files;
            if section == "api" {
                cfg.api.certificate_file = cert;
                cfg.api.key_file = key;
            } else {
                cfg.private_api.certificate_file = cert;
                cfg.private_api.key_file = key;
                cfg.private_api.ca_certificate_file = ca;
            }
            if self
                .take(&[section, "listen", "listen_grace_period"])
                .is_some()
            {
                self.notes.push(format!(
                    "{} (this kas closes the listener at the drain's end)",
                    listen_key("listen_grace_period")
                ));
            }
            if section == "api" {
                cfg.api.listen = Some(listen);
                cfg.api.authentication_secret_file = secret;
                if self
                    .take(&["api", "listen", "max_connection_age"])
                    .is_some()
                {
                    self.notes
                        .push("api.listen.max_connection_age (GitLab's calls are unary)".into());
                }
            } else {
                cfg.private_api.listen = Some(listen);
                cfg.private_api.authentication_secret_file = secret;
                set!(
                    ["private_api", "listen", "max_connection_age"],
                    duration,
                    |v| { cfg.private_api.max_connection_age = v }
                );
            }
            // An emptied section was consumed.
            if self
                .root
                .get(section)
                .and_then(|s| s.get("listen"))
                .is_some_and(|l| l.as_mapping().is_some_and(|m| m.is_empty()))
            {
                if let Some(Value::Mapping(m)) = self.root.get_mut(section) {
                    m.remove("listen");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubernetes_api_section_turns_the_proxy_on() {
        let off = KasYaml::from_yaml("gitlab:\n  address: http://x\n").expect("valid");
        assert_eq!(off.config.kubernetes_api.listen, None);
        let on = KasYaml::from_yaml("agent:\n  kubernetes_api: {}\n").expect("valid");
        assert_eq!(
            on.config.kubernetes_api.listen,
            Some(([0, 0, 0, 0], 8154).into())
        );
        assert!(on.ignored.is_empty(), "{:?}", on.ignored);
        let set = KasYaml::from_yaml(
            "agent:\n  kubernetes_api:\n    listen:\n      address: 127.0.0.1:9154\n    \
             url_path_prefix: /k8s-proxy\n    allowed_agent_cache_ttl: 30s\n    \
             shutdown_grace_period: 3600s\n",
        )
        .expect("valid");
        let k = &set.config.kubernetes_api;
        assert_eq!(k.listen, Some(([127, 0, 0, 1], 9154).into()));
        assert_eq!(set.config.k8s_proxy_prefix(), "/k8s-proxy/");
        assert_eq!(k.allowed_agent_cache_ttl, Duration::from_secs(30));
        assert_eq!(set.ignored, ["agent.kubernetes_api.shutdown_grace_period"]);
    }

    #[test]
    fn durations_take_protobuf_and_human_forms() {
        for (text, secs) in [
            ("300s", 300.0),
            ("0.5s", 0.5),
            ("2h", 7200.0),
            ("1m30s", 90.0),
        ] {
            let d = duration("k", &Value::String(text.into())).unwrap();
            assert_eq!(d.as_secs_f64(), secs, "{text}");
        }
        let err = duration("agent.x", &Value::String("soon".into())).unwrap_err();
        assert!(err.contains("agent.x"), "{err}");
    }

    #[test]
    fn known_keys_apply_and_the_rest_is_listed() {
        let y = KasYaml::from_yaml(
            "agent:\n  listen:\n    address: ':9150'\n    websocket: true\n    connections_per_token_per_minute: 100\n\
             redis:\n  server:\n    address: redis:6379\n",
        )
        .unwrap();
        assert_eq!(y.config.agent.listen, "0.0.0.0:9150".parse().unwrap());
        assert_eq!(y.ignored.len(), 1, "{:?}", y.ignored);
        assert!(
            y.ignored[0].starts_with("agent.listen.websocket (true;"),
            "{:?}",
            y.ignored
        );
        assert_eq!(y.config.agent.connections_per_token_per_minute, 100);
        assert_eq!(y.config.redis.address.as_deref(), Some("redis:6379"));
    }

    #[test]
    fn the_fleet_sections_are_read_as_real_kas_writes_them() {
        let y = KasYaml::from_yaml(
            "agent:\n  redis_conn_info_ttl: 120s\n  redis_conn_info_refresh: 60s\n  redis_conn_info_gc: 300s\n\
             redis:\n  network: tcp\n  server:\n    address: redis.example:6379\n  password_file: /etc/kas/redis\n  \
             key_prefix: kas-a\n  dial_timeout: 3s\n  write_timeout: 1s\n  pool_size: 10\n  tls:\n    enabled: false\n\
             api:\n  listen:\n    address: ':8153'\n    authentication_secret_file: /etc/kas/api\n\
             private_api:\n  listen:\n    address: ':8155'\n    authentication_secret_file: /etc/kas/private\n    \
             max_connection_age: 1800s\n",
        )
        .expect("valid");
        let c = &y.config;
        assert_eq!(c.redis.address.as_deref(), Some("redis.example:6379"));
        assert_eq!(c.redis.key_prefix, "kas-a");
        assert_eq!(c.redis.password_file, Some(PathBuf::from("/etc/kas/redis")));
        assert_eq!(c.redis.operation_timeout, Duration::from_secs(1));
        assert_eq!(c.redis.conn_info_ttl, Duration::from_secs(120));
        assert_eq!(c.redis.conn_info_refresh, Duration::from_secs(60));
        assert_eq!(c.api.listen, Some("0.0.0.0:8153".parse().unwrap()));
        assert_eq!(c.private_api.listen, Some("0.0.0.0:8155".parse().unwrap()));
        assert_eq!(c.private_api.max_connection_age, Duration::from_secs(1800));
        assert_eq!(y.ignored.len(), 1, "{:?}", y.ignored);
        assert!(
            y.ignored[0].starts_with("redis.pool_size ("),
            "{:?}",
            y.ignored
        );
        let tls = KasYaml::from_yaml(
            "private_api:\n  listen:\n    certificate_file: /c\n    key_file: /k\n    ca_certificate_file: /ca\n",
        )
        .expect("valid");
        assert_eq!(
            tls.config.private_api.certificate_file,
            Some(PathBuf::from("/c"))
        );
        assert_eq!(
            tls.config.private_api.ca_certificate_file,
            Some(PathBuf::from("/ca"))
        );
        let err = KasYaml::from_yaml("api:\n  listen:\n    ca_certificate_file: /c\n").unwrap_err();
        assert!(err.contains("api.listen.ca_certificate_file"), "{err}");
        let err = KasYaml::from_yaml("redis:\n  sentinel:\n    addresses: 3\n").unwrap_err();
        assert!(err.contains("redis.sentinel.addresses"), "{err}");
    }

    /// The keys of upstream's `config_example.yaml` this kas used to list as ignored.
    #[test]
    fn probe_paths_and_the_gitlab_api_rate_limit_are_applied() {
        let y = KasYaml::from_yaml(
            "gitlab:\n  address: https://gitlab.example.com\n  authentication_secret_file: /s\n  \
             api_rate_limit:\n    refill_rate_per_second: 5\n    bucket_size: 2\n\
             observability:\n  liveness_probe:\n    url_path: /-/live\n  \
             readiness_probe:\n    url_path: /-/ready\n  prometheus:\n    url_path: /-/metrics\n",
        )
        .expect("valid");
        assert!(y.ignored.is_empty(), "{:?}", y.ignored);
        let c = &y.config;
        assert_eq!(c.gitlab.api_rate_limit.refill_rate_per_second, 5.0);
        assert_eq!(c.gitlab.api_rate_limit.bucket_size, 2);
        assert_eq!(c.observability.liveness_probe.url_path, "/-/live");
        assert_eq!(c.observability.readiness_probe.url_path, "/-/ready");
        assert_eq!(c.observability.prometheus.url_path, "/-/metrics");
        c.validate().expect("valid");

        // A key left out keeps real kas's default.
        let y = KasYaml::from_yaml("gitlab:\n  api_rate_limit:\n    bucket_size: 9\n").unwrap();
        assert_eq!(y.config.gitlab.api_rate_limit.refill_rate_per_second, 50.0);
        assert_eq!(y.config.gitlab.api_rate_limit.bucket_size, 9);

        // Values a YAML file can hold but kas refuses, by the key's name.
        for (yaml, key) in [
            (
                "api_rate_limit:\n    refill_rate_per_second: 0\n",
                "gitlab.api_rate_limit.refill_rate_per_second",
            ),
            (
                "api_rate_limit:\n    refill_rate_per_second: -2.5\n",
                "gitlab.api_rate_limit.refill_rate_per_second",
            ),
            (
                "api_rate_limit:\n    bucket_size: 0\n",
                "gitlab.api_rate_limit.bucket_size",
            ),
        ] {
            let text = format!(
                "gitlab:\n  address: https://gitlab.example.com\n  authentication_secret_file: /s\n  {yaml}"
            );
            let err = KasYaml::from_yaml(&text)
                .expect("parses")
                .config
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{yaml}: {err}");
        }
    }

    #[test]
    fn bad_values_name_the_key() {
        for (yaml, key) in [
            (
                "agent:\n  listen:\n    address: nowhere\n",
                "agent.listen.address",
            ),
            (
                "agent:\n  configuration:\n    poll_period: 5\n",
                "agent.configuration.poll_period",
            ),
            (
                "gitaly:\n  global_api_rate_limit:\n    bucket_size: x\n",
                "gitaly.global_api_rate_limit",
            ),
            (
                "agent:\n  listen:\n    network: unix\n",
                "agent.listen.network",
            ),
            (
                "gitlab:\n  api_rate_limit:\n    bucket_size: -1\n",
                "gitlab.api_rate_limit.bucket_size",
            ),
            (
                "gitlab:\n  api_rate_limit:\n    refill_rate_per_second: fast\n",
                "gitlab.api_rate_limit.refill_rate_per_second",
            ),
            (
                "observability:\n  readiness_probe:\n    url_path: 3\n",
                "observability.readiness_probe.url_path",
            ),
        ] {
            let err = KasYaml::from_yaml(yaml).unwrap_err();
            assert!(err.contains(key), "{yaml}: {err}");
        }
    }
}
