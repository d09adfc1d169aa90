//! Push events between pods: GitLab tells one pod about a push (`Notifications/GitPushEvent`
//! on the API port), that pod publishes it on the Redis channel `kas_events` (not prefixed,
//! as real kas), and every pod — this one included — wakes the pollers of the pushed
//! project. The payload is real kas's: a protobuf `Any` holding the `GitPushEvent`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use kas_proto::event::GitPushEvent;
use kas_proto::GIT_PUSH_EVENT_TYPE_URL;

use super::redis::{Redis, RedisError};

pub const CHANNEL: &str = "kas_events";
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// What each pod does with a push: wake the pollers of the project.
pub type OnPush = Arc<dyn Fn(&GitPushEvent) + Send + Sync>;

pub fn encode(event: &GitPushEvent) -> Vec<u8> {
    prost_types::Any {
        type_url: GIT_PUSH_EVENT_TYPE_URL.to_owned(),
        value: event.encode_to_vec(),
    }
    .encode_to_vec()
}

pub fn decode(payload: &[u8]) -> Option<GitPushEvent> {
    let any = prost_types::Any::decode(payload).ok()?;
    if any.type_url != GIT_PUSH_EVENT_TYPE_URL {
        return None;
    }
    GitPushEvent::decode(any.value.as_slice()).ok()
}

pub async fn publish(redis: &Redis, event: &GitPushEvent) -> Result<(), RedisError> {
    let payload = encode(event);
    redis
        .run("publish_event", |mut conn| async move {
            redis::cmd("PUBLISH")
                .arg(CHANNEL)
                .arg(payload)
                .query_async::<i64>(&mut conn)
                .await
                .map(|_| ())
        })
        .await
}

/// Listens on `kas_events` until `stop`, reconnecting (500 ms doubling to 30 s) whenever
/// the subscription breaks.
pub async fn subscribe(redis: Arc<Redis>, on_push: OnPush, stop: CancellationToken) {
    let mut delay = RETRY_MIN;
    while !stop.is_cancelled() {
        let result = async {
            let mut pubsub = redis.pubsub().await?;
            pubsub.subscribe(CHANNEL).await?;
            Ok::<_, RedisError>(pubsub)
        }
        .await;
        match result {
            Ok(pubsub) => {
                delay = RETRY_MIN;
                redis
                    .metrics()
                    .operations
                    .with_label_values(&["subscribe_events", "ok"])
                    .inc();
                let mut messages = pubsub.into_on_message();
                loop {
                    let msg = tokio::select! {
                        msg = messages.next() => msg,
                        _ = stop.cancelled() => return,
                    };
                    let Some(msg) = msg else {
                        tracing::warn!("kas_events subscription ended; subscribing again");
                        break;
                    };
                    match decode(msg.get_payload_bytes()) {
                        Some(event) => on_push(&event),
                        None => tracing::debug!("kas_events: a message that is not a GitPushEvent"),
                    }
                }
            }
            Err(e) => {
                redis
                    .metrics()
                    .operations
                    .with_label_values(&["subscribe_events", "error"])
                    .inc();
                tracing::warn!(error = %e, retry_in = ?delay, "cannot subscribe to kas_events");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
        delay = (delay * 2).min(RETRY_MAX);
    }
}
