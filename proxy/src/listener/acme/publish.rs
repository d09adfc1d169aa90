//! Hands the ACME replica's certificate to the other replicas through a Kubernetes TLS
//! Secret.
//!
//! Why a Secret: only one replica may run ACME (each would otherwise place its own orders
//! and only the one that placed an order knows its token), yet every replica must serve
//! the certificate. The others mount the Secret as `[tls] certificates` files, which they
//! already hot-reload when the kubelet swaps the volume; nothing else has to be shared.
//!
//! Before its first certificate the ACME replica makes sure the Secret exists, holding a
//! self-signed placeholder for the ACME domains: replicas that mount it can then start,
//! take the CA's validation request from the load balancer and relay it
//! (`tls.acme_challenge_relay`). An existing Secret (a real certificate from an earlier
//! run) is never replaced by a placeholder.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use tokio::sync::watch;

/// The field manager for server-side apply: `kubectl get secret -o yaml --show-managed-fields`
/// tells operators who wrote it.
const FIELD_MANAGER: &str = "kas-edge-acme";
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// A TLS Secret's two files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPair {
    /// The certificate chain, leaf first.
    pub cert_pem: String,
    pub key_pem: String,
}

/// Splits rustls-acme's cache PEM (private key, then the chain) into a TLS Secret's
/// `tls.crt` and `tls.key`.
pub fn split_acme_pem(pem: &[u8]) -> Result<TlsPair, String> {
    let text = std::str::from_utf8(pem).map_err(|_| "certificate PEM is not UTF-8")?;
    let (mut cert_pem, mut key_pem) = (String::new(), String::new());
    let mut rest = text;
    while let Some(begin) = rest.find("-----BEGIN ") {
        let after = &rest[begin..];
        let label_end = after[11..]
            .find("-----")
            .ok_or("unterminated PEM BEGIN line")?;
        let label = &after[11..11 + label_end];
        let end_marker = format!("-----END {label}-----");
        let end = after
            .find(&end_marker)
            .ok_or_else(|| format!("PEM block {label:?} has no END line"))?;
        let block = &after[..end + end_marker.len()];
        let target = match label {
            "CERTIFICATE" => &mut cert_pem,
            l if l.ends_with("PRIVATE KEY") => &mut key_pem,
            other => return Err(format!("unexpected PEM block {other:?}")),
        };
        target.push_str(block);
        target.push('\n');
        rest = &after[end + end_marker.len()..];
    }
    if cert_pem.is_empty() || key_pem.is_empty() {
        return Err("the PEM needs a private key and at least one certificate".into());
    }
    Ok(TlsPair { cert_pem, key_pem })
}

fn tls_secret(name: &str, pair: &TlsPair) -> Secret {
    let data = BTreeMap::from([
        (
            "tls.crt".to_owned(),
            ByteString(pair.cert_pem.clone().into_bytes()),
        ),
        (
            "tls.key".to_owned(),
            ByteString(pair.key_pem.clone().into_bytes()),
        ),
    ]);
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(data),
        ..Default::default()
    }
}

/// Creates the Secret with `placeholder` unless it exists already.
async fn ensure_exists(api: &Api<Secret>, name: &str, placeholder: &TlsPair) -> kube::Result<()> {
    if api.get_opt(name).await?.is_some() {
        return Ok(());
    }
    match api
        .create(&PostParams::default(), &tls_secret(name, placeholder))
        .await
    {
        Ok(_) => {
            tracing::info!(
                secret = name,
                "created the TLS Secret with a self-signed placeholder until ACME issues"
            );
            Ok(())
        }
        // Someone (an operator, a previous run) was quicker: theirs stays.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

async fn apply(api: &Api<Secret>, name: &str, pair: &TlsPair) -> kube::Result<()> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(name, &params, &Patch::Apply(&tls_secret(name, pair)))
        .await
        .map(|_| ())
}

/// Keeps the Secret `name` in step with the certificate `certs` carries (the PEM as
/// rustls-acme caches it), retrying failures with back-off so a brief API outage only
/// delays the other replicas' rotation. Runs until `certs` closes.
pub async fn run(
    api: Api<Secret>,
    name: String,
    placeholder: TlsPair,
    mut certs: watch::Receiver<Option<Vec<u8>>>,
) {
    let mut retry = RETRY_FIRST;
    while let Err(e) = ensure_exists(&api, &name, &placeholder).await {
        tracing::error!(secret = %name, error = %e, retry_in = ?retry, "cannot create the TLS Secret");
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(RETRY_MAX);
    }
    loop {
        let pem = certs.borrow_and_update().clone();
        let attempt = match pem.as_deref().map(split_acme_pem) {
            None => Attempt::Done,
            Some(Err(problem)) => {
                tracing::error!(secret = %name, %problem, "cannot publish the ACME certificate");
                Attempt::Done
            }
            Some(Ok(pair)) => publish_until_done(&api, &name, &pair, &mut certs).await,
        };
        match attempt {
            Attempt::Superseded => continue,
            Attempt::Closed => return,
            Attempt::Done => {
                if certs.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

enum Attempt {
    Done,
    /// A newer certificate arrived while retrying: publish that one instead.
    Superseded,
    Closed,
}

async fn publish_until_done(
    api: &Api<Secret>,
    name: &str,
    pair: &TlsPair,
    certs: &mut watch::Receiver<Option<Vec<u8>>>,
) -> Attempt {
    let mut retry = RETRY_FIRST;
    loop {
        match apply(api, name, pair).await {
            Ok(()) => {
                tracing::info!(secret = name, "published the ACME certificate");
                return Attempt::Done;
            }
            Err(e) => tracing::error!(
                secret = name, error = %e, retry_in = ?retry,
                "cannot publish the ACME certificate"
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            changed = certs.changed() => {
                return if changed.is_ok() { Attempt::Superseded } else { Attempt::Closed };
            }
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper::{Request, Response};
    use hyper_util::rt::TokioIo;
    use serde_json::{json, Value};
    use tokio::net::TcpListener;

    const NS: &str = "kas";
    const NAME: &str = "kas-edge-tls";

    /// (method, path with query, body) of every request.
    pub(crate) type Seen = Arc<Mutex<Vec<(String, String, Value)>>>;

    /// A kube-apiserver that knows one Secret. The first `fail_patches` applies answer 500.
    pub(crate) async fn fake_api(exists: bool, fail_patches: usize) -> (SocketAddr, Seen) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Seen = Arc::default();
        let state = Arc::new(Mutex::new((exists, fail_patches)));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (log, state) = (log.clone(), state.clone());
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (log, state) = (log.clone(), state.clone());
                    async move {
                        let method = req.method().to_string();
                        let path = req.uri().to_string();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        log.lock()
                            .unwrap()
                            .push((method.clone(), path, body.clone()));
                        let mut st = state.lock().unwrap();
                        let secret = json!({"apiVersion": "v1", "kind": "Secret",
                            "metadata": {"name": NAME, "namespace": NS}, "type": "kubernetes.io/tls"});
                        let (code, answer) = match method.as_str() {
                            "GET" if st.0 => (200, secret),
                            "GET" => (
                                404,
                                json!({"kind": "Status", "apiVersion": "v1",
                                "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
                            ),
                            "POST" => {
                                st.0 = true;
                                (201, body)
                            }
                            "PATCH" if st.1 > 0 => {
                                st.1 -= 1;
                                (
                                    500,
                                    json!({"kind": "Status", "apiVersion": "v1",
                                    "status": "Failure", "code": 500, "message": "etcd is sad"}),
                                )
                            }
                            _ => (200, body),
                        };
                        let mut r = Response::new(Full::new(Bytes::from(answer.to_string())));
                        *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
                        r.headers_mut()
                            .insert("content-type", "application/json".parse().unwrap());
                        Ok::<_, Infallible>(r)
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (addr, seen)
    }

    pub(crate) fn api(addr: SocketAddr) -> Api<Secret> {
        let mut config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        config.default_namespace = NS.to_owned();
        Api::namespaced(kube::Client::try_from(config).unwrap(), NS)
    }

    fn pair(tag: &str) -> TlsPair {
        TlsPair {
            cert_pem: format!("-----BEGIN CERTIFICATE-----\n{tag}leaf\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\n{tag}ca\n-----END CERTIFICATE-----\n"),
            key_pem: format!("-----BEGIN PRIVATE KEY-----\n{tag}key\n-----END PRIVATE KEY-----\n"),
        }
    }

    fn acme_pem(p: &TlsPair) -> Vec<u8> {
        format!("{}{}", p.key_pem, p.cert_pem).into_bytes()
    }

    pub(crate) fn decoded(body: &Value, file: &str) -> String {
        use base64::Engine as _;
        let b64 = body["data"][file].as_str().unwrap();
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
        )
        .unwrap()
    }

    pub(crate) async fn wait_for(
        seen: &Seen,
        what: &str,
        f: impl Fn(&[(String, String, Value)]) -> bool,
    ) {
        for _ in 0..200 {
            if f(&seen.lock().unwrap()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("timed out waiting for {what}: {:?}", seen.lock().unwrap());
    }

    #[test]
    fn splits_key_and_chain_and_refuses_what_is_not_a_tls_pair() {
        let p = pair("a");
        assert_eq!(split_acme_pem(&acme_pem(&p)).unwrap(), p);
        assert!(split_acme_pem(p.cert_pem.as_bytes()).is_err(), "no key");
        assert!(split_acme_pem(b"-----BEGIN CERTIFICATE-----\nabc").is_err());
        assert!(
            split_acme_pem(b"-----BEGIN PUBLIC KEY-----\na\n-----END PUBLIC KEY-----\n").is_err()
        );
        assert!(split_acme_pem(&[0xff, 0xfe]).is_err());
    }

    #[tokio::test]
    async fn creates_a_placeholder_then_publishes_each_certificate_retrying_failures() {
        let (addr, seen) = fake_api(false, 2).await;
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(run(api(addr), NAME.into(), pair("placeholder"), rx));
        wait_for(&seen, "the placeholder", |s| {
            s.iter().any(|(m, _, _)| m == "POST")
        })
        .await;
        {
            let s = seen.lock().unwrap();
            let (_, path, body) = s.iter().find(|(m, _, _)| m == "POST").unwrap();
            assert_eq!(path, &format!("/api/v1/namespaces/{NS}/secrets?"));
            assert_eq!(body["type"], "kubernetes.io/tls");
            assert_eq!(decoded(body, "tls.crt"), pair("placeholder").cert_pem);
        }
        tx.send(Some(acme_pem(&pair("first")))).unwrap();
        // Two 500s first, then the apply lands.
        wait_for(&seen, "three applies", |s| {
            s.iter().filter(|(m, _, _)| m == "PATCH").count() >= 3
        })
        .await;
        let last_patch = |s: &[(String, String, Value)]| {
            s.iter()
                .rev()
                .find(|(m, _, _)| m == "PATCH")
                .cloned()
                .unwrap()
        };
        let (_, path, body) = last_patch(&seen.lock().unwrap());
        assert!(
            path.contains("fieldManager=kas-edge-acme") && path.contains("force=true"),
            "{path}"
        );
        assert_eq!(decoded(&body, "tls.crt"), pair("first").cert_pem);
        assert_eq!(decoded(&body, "tls.key"), pair("first").key_pem);

        // A renewal is published too.
        tx.send(Some(acme_pem(&pair("renewed")))).unwrap();
        wait_for(&seen, "the renewal", |s| {
            decoded(&last_patch(s).2, "tls.crt") == pair("renewed").cert_pem
        })
        .await;
        drop(tx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn an_existing_secret_is_never_replaced_by_a_placeholder() {
        let (addr, seen) = fake_api(true, 0).await;
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(run(api(addr), NAME.into(), pair("placeholder"), rx));
        wait_for(&seen, "the lookup", |s| {
            s.iter().any(|(m, _, _)| m == "GET")
        })
        .await;
        tx.send(Some(acme_pem(&pair("cached")))).unwrap();
        wait_for(&seen, "the apply", |s| {
            s.iter().any(|(m, _, _)| m == "PATCH")
        })
        .await;
        assert!(!seen.lock().unwrap().iter().any(|(m, _, _)| m == "POST"));
        drop(tx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
