//! Reading `Gitops/GetObjectsToSynchronize` answers as an agent does: one batch is a
//! header, the objects (a file may come in several chunks) and a trailer, then the end of
//! the stream.

use std::collections::BTreeMap;
use std::time::Duration;

use kas_proto::gitops::objects_to_synchronize_response::Message;
use kas_proto::gitops::ObjectsToSynchronizeResponse;

pub type ObjectsStream = tonic::Streaming<ObjectsToSynchronizeResponse>;

/// The next message, which must come within `within`.
pub async fn next_message(
    stream: &mut ObjectsStream,
    within: Duration,
) -> Result<Option<ObjectsToSynchronizeResponse>, tonic::Status> {
    tokio::time::timeout(within, stream.message())
        .await
        .expect("a GitOps message in time")
}

/// One whole batch of `project_id`: the header's commit and the files (chunks joined).
/// Insists on header → objects → trailer → end of stream, each within `within`.
pub async fn read_batch(
    stream: &mut ObjectsStream,
    project_id: i64,
    within: Duration,
) -> Result<(String, BTreeMap<String, String>), tonic::Status> {
    let commit = match next_message(stream, within).await?.and_then(|m| m.message) {
        Some(Message::Header(h)) => {
            assert_eq!(h.project_id, project_id);
            h.commit_id
        }
        other => panic!("expected a header, got {other:?}"),
    };
    let mut files = BTreeMap::<String, String>::new();
    loop {
        match next_message(stream, within).await?.and_then(|m| m.message) {
            Some(Message::Object(o)) => files
                .entry(o.source)
                .or_default()
                .push_str(&String::from_utf8_lossy(&o.data)),
            Some(Message::Trailer(_)) => break,
            other => panic!("expected an object or the trailer, got {other:?}"),
        }
    }
    assert!(
        next_message(stream, within).await?.is_none(),
        "the stream must end after the trailer"
    );
    Ok((commit, files))
}
