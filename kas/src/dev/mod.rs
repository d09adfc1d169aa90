//! The local system (feature `dev`; the container builds leave it out): a GitLab stand-in
//! speaking GitLab's internal API, a Gitaly stand-in over real git repositories, and the
//! stack behind `kas dev` / `kas-edge dev` that runs them with several kas pods.

pub mod devstack;
pub mod gitaly_standin;
pub mod gitlab_standin;
mod standin_proxy_access;
