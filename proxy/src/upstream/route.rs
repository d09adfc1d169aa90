//! Which port of a pod a request goes to. Agents' traffic goes to kas's agent port (the
//! discovered endpoint); a path prefix can name another port of the same pods
//! (`upstream.routes`, e.g. `/k8s-proxy/` → kas's Kubernetes API proxy on 8154), so one
//! public host serves agents and `kubectl` through the same discovered, health-checked pods.

/// A request's destination on a pod: the agent port, or the port of route `n`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Route(usize);

impl Route {
    /// The discovered endpoint itself: kas's agent port.
    pub const AGENT: Route = Route(0);

    pub fn is_agent(self) -> bool {
        self == Route::AGENT
    }

    /// Index into a pod's ports (0: the agent port).
    pub fn index(self) -> usize {
        self.0
    }
}

/// The configured path prefixes and their ports, in the order they are tried.
#[derive(Clone, Debug, Default)]
pub struct Routes {
    prefixes: Vec<(String, u16)>,
}

impl Routes {
    pub fn new(prefixes: Vec<(String, u16)>) -> Self {
        Self { prefixes }
    }

    /// The ports routes send to, in route order (a pod keeps connections for each).
    pub fn ports(&self) -> Vec<u16> {
        self.prefixes.iter().map(|(_, port)| *port).collect()
    }

    /// The route of a request path: the first prefix it starts with, else the agent port.
    pub fn for_path(&self, path: &str) -> Route {
        self.prefixes
            .iter()
            .position(|(prefix, _)| path.starts_with(prefix.as_str()))
            .map_or(Route::AGENT, |i| Route(i + 1))
    }

    /// For the access log: the route's prefix, or `agent`.
    pub fn label(&self, route: Route) -> &str {
        match route.0.checked_sub(1) {
            Some(i) => self.prefixes.get(i).map_or("agent", |(p, _)| p.as_str()),
            None => "agent",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_go_to_the_first_matching_prefix_else_to_agents() {
        let routes = Routes::new(vec![("/k8s-proxy/".into(), 8154), ("/other/".into(), 9000)]);
        assert_eq!(routes.for_path("/k8s-proxy/api/v1/pods"), Route(1));
        assert_eq!(routes.for_path("/other/x"), Route(2));
        assert!(
            routes.for_path("/k8s-proxy").is_agent(),
            "the prefix is matched whole"
        );
        assert!(routes
            .for_path("/gitlab.agent.reverse_tunnel.rpc.ReverseTunnel/Connect")
            .is_agent());
        assert_eq!(routes.label(Route(1)), "/k8s-proxy/");
        assert_eq!(routes.ports(), [8154, 9000]);
    }
}
