//! kas's tests on kas-testkit: one kas on ephemeral loopback ports and a GitLab stand-in
//! per test; the token, the refused token and kas's timings are this crate's.
#![allow(dead_code, unused_imports)]

use std::net::SocketAddr;
use std::time::Duration;

use kas::Config;
use kas_testkit::Profile;

pub use kas_testkit::clients::with_token;
pub use kas_testkit::wait::eventually;

pub const TOKEN: &str = "glagent-test-token";
pub const FORBIDDEN_TOKEN: &str = "glagent-forbidden-token";

pub struct KasTests;

impl Profile for KasTests {
    const TOKEN: &'static str = TOKEN;
    const FORBIDDEN_TOKENS: &'static [&'static str] = &[FORBIDDEN_TOKEN];

    fn pod_config(config: &mut Config) {
        config.gitlab.api_timeout = Duration::from_secs(2);
        config.agent_configuration.poll_interval = Duration::from_millis(100);
        config.shutdown.readiness_delay = Duration::from_millis(500);
        config.shutdown.drain_deadline = Duration::from_secs(3);
    }
}

pub type Harness = kas_testkit::pods::Harness<KasTests>;

/// A plain GET; panics when nothing answers.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    kas_testkit::clients::http_get(addr, path)
        .await
        .unwrap_or_else(|| panic!("no answer to GET {path} from {addr}"))
}
