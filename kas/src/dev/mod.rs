//! The local system (feature `dev`; the container builds leave it out): a GitLab stand-in
//! speaking GitLab's internal API, a Gitaly stand-in over real git repositories, a
//! Kubernetes API stand-in and an agentk stand-in holding reverse tunnels into it, and the
//! stack behind `kas dev` / `kas-edge dev` that runs them with several kas pods. The tests
//! use the same pieces (through `kas-testkit`).

pub mod agent;
pub mod channels;
pub mod devstack;
pub mod gitaly_standin;
pub mod gitlab_standin;
pub mod kube_api;
pub mod kubeconfig;
pub mod push_events;
mod standin_proxy_access;
