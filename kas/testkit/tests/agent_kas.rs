//! The test agent against this repository's kas as it is: kas authenticates each tunnel
//! with GitLab and holds it after its descriptor, over h2c and over the ws-tunnel
//! websocket. (kas routes nothing through tunnels yet; when it does, its own tests drive
//! requests through this agent.)

use kas_testkit::agent::{AgentOptions, TestAgent};
use kas_testkit::kube_api::KubeApi;
use kas_testkit::net::LOCALHOST_ANY_PORT;
use kas_testkit::wait::{eventually, STEP};
use kas_testkit::Profile;

struct AgentTests;

impl Profile for AgentTests {
    const TOKEN: &'static str = "glagent-testkit-agent-token";
}

type Harness = kas_testkit::pods::Harness<AgentTests>;

#[tokio::test]
async fn kas_holds_the_agents_tunnels_over_h2c_and_websocket() {
    let kas = Harness::start().await;
    let kube = KubeApi::start(LOCALHOST_ANY_PORT).await.unwrap();
    let options = AgentOptions::new(AgentTests::TOKEN, &kube.url());
    let h2c = TestAgent::start(kas.h2c_channel().await, options.clone());
    let ws = TestAgent::start(kas.ws_channel().await, options);
    eventually("kas holds four tunnels", STEP, || async {
        let (_, metrics) = kas.http_get("/metrics").await;
        metrics.contains("kas_open_streams{method=\"Connect\"} 4")
    })
    .await;
    for agent in [&h2c, &ws] {
        assert_eq!(agent.idle(), 2);
        assert_eq!(agent.failed(), 0, "{:?}", agent.last_error());
    }
    drop((h2c, ws));
    eventually("the tunnels end with the agents", STEP, || async {
        let (_, metrics) = kas.http_get("/metrics").await;
        metrics.contains("kas_open_streams{method=\"Connect\"} 0")
    })
    .await;
}

#[tokio::test]
async fn a_bad_token_is_refused_and_retried_with_backoff() {
    let kas = Harness::start().await;
    let agent = TestAgent::start(
        kas.h2c_channel().await,
        AgentOptions::new("glagent-nobody", "http://127.0.0.1:9"),
    );
    eventually("the refusal is seen", STEP, || async {
        agent
            .last_error()
            .is_some_and(|s| s.code() == tonic::Code::Unauthenticated)
    })
    .await;
    // Two tunnel slots, backing off from 100 ms: a handful of attempts, not a storm.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(agent.opened() <= 12, "{} attempts", agent.opened());
}
