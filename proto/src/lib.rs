//! The wire protocol between agentk, the edge and kas.
//!
//! Package, service, method and field numbers follow GitLab's `gitlab-agent` project so a
//! real agent talks to our kas unchanged. The module tree mirrors the proto packages.

pub mod codec;

pub mod gitlab {
    pub mod agent {
        pub mod entity {
            tonic::include_proto!("gitlab.agent.entity");
        }
        pub mod agentcfg {
            tonic::include_proto!("gitlab.agent.agentcfg");
        }
        pub mod prototool {
            tonic::include_proto!("gitlab.agent.prototool");
        }
        pub mod agent_configuration {
            pub mod rpc {
                tonic::include_proto!("gitlab.agent.agent_configuration.rpc");
            }
        }
        pub mod agent_registrar {
            pub mod rpc {
                tonic::include_proto!("gitlab.agent.agent_registrar.rpc");
            }
        }
        pub mod gitops {
            pub mod rpc {
                tonic::include_proto!("gitlab.agent.gitops.rpc");
            }
        }
        pub mod grpctool {
            tonic::include_proto!("gitlab.agent.grpctool");
        }
        pub mod kubernetes_api {
            pub mod rpc {
                tonic::include_proto!("gitlab.agent.kubernetes_api.rpc");
            }
        }
        pub mod kas {
            tonic::include_proto!("gitlab.agent.kas");
        }
        pub mod redistool {
            tonic::include_proto!("gitlab.agent.redistool");
        }
        pub mod agent_tracker {
            tonic::include_proto!("gitlab.agent.agent_tracker");
            pub mod rpc {
                tonic::include_proto!("gitlab.agent.agent_tracker.rpc");
            }
        }
        pub mod event {
            tonic::include_proto!("gitlab.agent.event");
        }
        pub mod notifications {
            pub mod rpc {
                tonic::include_proto!("gitlab.agent.notifications.rpc");
            }
        }
        pub mod reverse_tunnel {
            pub mod info {
                tonic::include_proto!("gitlab.agent.reverse_tunnel.info");
            }
            pub mod rpc {
                tonic::include_proto!("gitlab.agent.reverse_tunnel.rpc");
            }
        }
    }
}

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub use gitlab::agent::agent_configuration::rpc as agent_configuration;
pub use gitlab::agent::agent_registrar::rpc as agent_registrar;
pub use gitlab::agent::agent_tracker;
pub use gitlab::agent::agentcfg;
pub use gitlab::agent::entity;
pub use gitlab::agent::event;
pub use gitlab::agent::gitops::rpc as gitops;
pub use gitlab::agent::grpctool;
pub use gitlab::agent::kas as kasapp;
pub use gitlab::agent::kubernetes_api::rpc as kubernetes_api;
pub use gitlab::agent::notifications::rpc as notifications;
pub use gitlab::agent::prototool;
pub use gitlab::agent::redistool;
pub use gitlab::agent::reverse_tunnel::rpc as reverse_tunnel;

pub mod kas_edge {
    pub mod diagnostics {
        pub mod v1 {
            tonic::include_proto!("kas_edge.diagnostics.v1");
        }
    }
}

pub use kas_edge::diagnostics::v1 as diagnostics;

/// The subset of Gitaly's protocol kas uses to read repositories (package `gitaly`, field
/// numbers as Gitaly's own protos).
pub mod gitaly {
    tonic::include_proto!("gitaly");
}

/// The type URL of `kubernetes_api::HeaderExtra` packed in `HttpRequest.Header.extra`: agentk
/// matches it exactly, so it is spelled out once here.
pub const HEADER_EXTRA_TYPE_URL: &str =
    "type.googleapis.com/gitlab.agent.kubernetes_api.rpc.HeaderExtra";

/// The type URL of `event::GitPushEvent` packed in an `Any` on Redis channel `kas_events`.
pub const GIT_PUSH_EVENT_TYPE_URL: &str = "type.googleapis.com/gitlab.agent.event.GitPushEvent";

/// gRPC method paths, for routing and per-method metrics without string typos.
pub mod paths {
    pub const GET_CONFIGURATION: &str =
        "/gitlab.agent.agent_configuration.rpc.AgentConfiguration/GetConfiguration";
    pub const REGISTER: &str = "/gitlab.agent.agent_registrar.rpc.AgentRegistrar/Register";
    pub const REVERSE_TUNNEL_CONNECT: &str =
        "/gitlab.agent.reverse_tunnel.rpc.ReverseTunnel/Connect";
    /// What kas names in `RequestInfo.method_name` for the Kubernetes API proxy (leading
    /// slash included: agentk opens a stream on exactly this path).
    pub const KUBERNETES_API_MAKE_REQUEST: &str =
        "/gitlab.agent.kubernetes_api.rpc.KubernetesApi/MakeRequest";
    /// The service and method a tunnel's descriptor names to carry
    /// [`KUBERNETES_API_MAKE_REQUEST`].
    pub const KUBERNETES_API_SERVICE: &str = "gitlab.agent.kubernetes_api.rpc.KubernetesApi";
    pub const KUBERNETES_API_METHOD: &str = "MakeRequest";
    pub const GITOPS_GET_OBJECTS: &str = "/gitlab.agent.gitops.rpc.Gitops/GetObjectsToSynchronize";
    pub const AGENT_TRACKER_GET_CONNECTED_AGENTS: &str =
        "/gitlab.agent.agent_tracker.rpc.AgentTracker/GetConnectedAgents";
    pub const NOTIFICATIONS_GIT_PUSH_EVENT: &str =
        "/gitlab.agent.notifications.rpc.Notifications/GitPushEvent";
    pub const DIAGNOSTICS_PING: &str = "/kas_edge.diagnostics.v1.Diagnostics/Ping";
    pub const DIAGNOSTICS_ECHO: &str = "/kas_edge.diagnostics.v1.Diagnostics/Echo";
    pub const GITALY_FIND_BRANCH: &str = "/gitaly.RefService/FindBranch";
    pub const GITALY_TREE_ENTRY: &str = "/gitaly.CommitService/TreeEntry";
    pub const GITALY_GET_TREE_ENTRIES: &str = "/gitaly.CommitService/GetTreeEntries";
    pub const GITALY_FIND_COMMIT: &str = "/gitaly.CommitService/FindCommit";
}
