//! The agent's messages on a tunnel, built in one place: the descriptor, the gRPC
//! `Header`/`Message`/`Trailer`/`Error` of the proxied call, and `HttpResponse` payloads.

use std::collections::HashMap;

use bytes::Bytes;
use kas_proto::gitlab::agent::reverse_tunnel::info::{AgentDescriptor, Method, Service};
use kas_proto::google::rpc::Status;
use kas_proto::grpctool::{http_response, HttpResponse};
use kas_proto::paths::{KUBERNETES_API_METHOD, KUBERNETES_API_SERVICE};
use kas_proto::prototool::{self, Values};
use kas_proto::reverse_tunnel::{
    connect_request::Msg, ConnectRequest, Descriptor, Error, Header, Message, Trailer,
};
use prost::Message as _;

/// What agentk v16 offers: `KubernetesApi/MakeRequest` only. Without the method
/// (`with_method = false`) the service is named but nothing can match it.
pub fn descriptor(with_method: bool) -> ConnectRequest {
    let methods = if with_method {
        vec![Method {
            name: KUBERNETES_API_METHOD.into(),
        }]
    } else {
        Vec::new()
    };
    request(Msg::Descriptor(Descriptor {
        agent_descriptor: Some(AgentDescriptor {
            services: vec![Service {
                name: KUBERNETES_API_SERVICE.into(),
                methods,
            }],
        }),
    }))
}

/// The proxied call's response header metadata, as agentk's in-process gRPC server has it.
pub fn header() -> ConnectRequest {
    let meta = HashMap::from([(
        "content-type".to_owned(),
        Values {
            value: vec!["application/grpc".into()],
        },
    )]);
    request(Msg::Header(Header { meta }))
}

pub fn trailer() -> ConnectRequest {
    request(Msg::Trailer(Trailer {
        meta: HashMap::new(),
    }))
}

pub fn error(code: tonic::Code, message: impl Into<String>) -> ConnectRequest {
    request(Msg::Error(Error {
        status: Some(Status {
            code: code as i32,
            message: message.into(),
            details: Vec::new(),
        }),
    }))
}

/// One serialized `HttpResponse` as a tunnel `Message`.
pub fn message(response: http_response::Message) -> ConnectRequest {
    raw_message(
        HttpResponse {
            message: Some(response),
        }
        .encode_to_vec(),
    )
}

pub fn raw_message(data: impl Into<Vec<u8>>) -> ConnectRequest {
    request(Msg::Message(Message { data: data.into() }))
}

pub fn response_header(
    status_code: u16,
    status: String,
    header: HashMap<String, Values>,
) -> ConnectRequest {
    message(http_response::Message::Header(http_response::Header {
        response: Some(prototool::HttpResponse {
            status_code: i32::from(status_code),
            status,
            header,
        }),
    }))
}

pub fn data(bytes: Bytes) -> ConnectRequest {
    message(http_response::Message::Data(http_response::Data {
        data: bytes.into(),
    }))
}

pub fn upgrade_data(bytes: Bytes) -> ConnectRequest {
    message(http_response::Message::UpgradeData(
        http_response::UpgradeData { data: bytes.into() },
    ))
}

pub fn response_trailer() -> ConnectRequest {
    message(http_response::Message::Trailer(http_response::Trailer {}))
}

fn request(msg: Msg) -> ConnectRequest {
    ConnectRequest { msg: Some(msg) }
}
