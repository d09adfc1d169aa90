//! Placeholder until the Kubernetes EndpointSlice watcher lands.
