//! What an agent is served: its configuration (built from `config.yaml`, files cached per
//! commit) and its GitOps manifests.

pub mod config_files;
pub mod configuration;
pub mod gitops;
