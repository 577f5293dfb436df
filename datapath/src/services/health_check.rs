//! Health-check node ports for `externalTrafficPolicy: Local` services, answered as kube-proxy
//! answers them, so an external load balancer sends traffic only to nodes with a local backend:
//! any path, `200` when the node has local endpoints and its datapath is healthy, else `503`;
//! headers `Content-Type: application/json`, `X-Content-Type-Options: nosniff` and
//! `X-Load-Balancing-Endpoint-Weight: <local endpoints>`; a JSON body with the service's
//! namespace and name, `localEndpoints` and `serviceProxyHealthy`.
//!
//! One listener per port on every address of the node (the agent runs in the node's network
//! namespace): `[::]` with `IPV6_V6ONLY` off when the node has an IPv6 address (one socket
//! answers both families), else `0.0.0.0`. [`HealthCheckServers::converge`] opens and closes listeners to match the
//! desired ports and updates counts in place, so a count change never closes a socket.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use tendril_crds::v1alpha1::LBService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const ENDPOINT_WEIGHT: HeaderName = HeaderName::from_static("x-load-balancing-endpoint-weight");

/// What one health-check port reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceHealth {
    pub namespace: String,
    pub name: String,
    /// Ready backends of the service on this node.
    pub local_endpoints: u32,
}

/// The health-check ports this node serves: every LBService with a `healthCheckNodePort` and
/// `externalTrafficPolicy: Local`, counting its distinct `active` backends on `node` (a
/// terminating backend does not make a node healthy, as with kube-proxy). Ports are unique
/// (the apiserver allocates them); should two services name one, the first in name order wins.
pub fn desired_health_checks<'a>(
    services: impl IntoIterator<Item = &'a LBService>,
    node: &str,
) -> BTreeMap<u16, ServiceHealth> {
    let mut services: Vec<&LBService> = services.into_iter().collect();
    services.sort_by_key(|s| (s.metadata.namespace.clone(), s.metadata.name.clone()));
    let mut out = BTreeMap::new();
    for svc in services {
        let spec = &svc.spec;
        let Some(port) = spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        if spec.external_traffic_policy != "Local" || port == 0 {
            continue;
        }
        let local: BTreeSet<&str> = spec
            .backends
            .iter()
            .filter(|b| b.state == "active" && b.node_name.as_deref() == Some(node))
            .map(|b| b.address.as_str())
            .collect();
        out.entry(port).or_insert_with(|| ServiceHealth {
            namespace: svc.metadata.namespace.clone().unwrap_or_default(),
            name: svc.metadata.name.clone().unwrap_or_default(),
            local_endpoints: u32::try_from(local.len()).unwrap_or(u32::MAX),
        });
    }
    out
}

/// A listening socket on `addr` created in the network namespace `netns` (the node's, when
/// the agent runs outside it), ready for tokio.
fn bind_in(netns: Option<&Path>, addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let file = netns.map(std::fs::File::open).transpose()?;
    let listener = std::thread::spawn(move || {
        if let Some(file) = &file {
            // SAFETY: setns on a descriptor we own; it changes only this thread's namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        listen(addr)
    })
    .join()
    .map_err(|_| std::io::Error::other("bind thread panicked"))??;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// A listening socket on `addr`; on the IPv6 wildcard one for both families (IPv4 clients
/// as v4-mapped addresses), whatever `net.ipv6.bindv6only` says.
fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// The address health-check listeners bind: every address of the node, of both families
/// when it has an IPv6 one.
pub fn wildcard(node_addresses: &[IpAddr]) -> IpAddr {
    if node_addresses.iter().any(IpAddr::is_ipv6) {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    }
}

/// A port that could not be opened (e.g. something else listens on it).
#[derive(Debug, thiserror::Error)]
#[error("health-check node port {port} for {namespace}/{name}: {source}")]
pub struct BindError {
    pub port: u16,
    pub namespace: String,
    pub name: String,
    pub source: std::io::Error,
}

struct Listener {
    health: Arc<RwLock<ServiceHealth>>,
    stop: CancellationToken,
}

/// The open health-check listeners of the node.
pub struct HealthCheckServers {
    bind: IpAddr,
    /// The node's network namespace (`None`: the agent's own).
    netns: Option<PathBuf>,
    listeners: BTreeMap<u16, Listener>,
    /// Whether the node's service datapath is healthy (`serviceProxyHealthy`).
    proxy_healthy: Arc<dyn Fn() -> bool + Send + Sync>,
    shutdown: CancellationToken,
}

impl HealthCheckServers {
    /// Listeners bind `bind` ([`wildcard`]: every node address) in `netns`; they stop with
    /// `shutdown` or when this is dropped.
    pub fn new(
        bind: IpAddr,
        netns: Option<PathBuf>,
        proxy_healthy: Arc<dyn Fn() -> bool + Send + Sync>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            bind,
            netns,
            listeners: BTreeMap::new(),
            proxy_healthy,
            shutdown,
        }
    }

    /// The address the listeners bind.
    pub fn bind(&self) -> IpAddr {
        self.bind
    }

    /// The ports open now.
    pub fn ports(&self) -> Vec<u16> {
        self.listeners.keys().copied().collect()
    }

    /// Opens, updates and closes listeners so exactly `desired` is served. Ports that cannot
    /// be opened are returned (and retried on the next call); the others are served.
    pub async fn converge(&mut self, desired: &BTreeMap<u16, ServiceHealth>) -> Vec<BindError> {
        self.listeners.retain(|port, listener| {
            let keep = desired.contains_key(port);
            if !keep {
                listener.stop.cancel();
            }
            keep
        });
        let mut errors = Vec::new();
        for (&port, health) in desired {
            if let Some(listener) = self.listeners.get(&port) {
                let mut current = listener.health.write().expect("health-check lock");
                if *current != *health {
                    *current = health.clone();
                }
                continue;
            }
            let addr = SocketAddr::from((self.bind, port));
            let netns = self.netns.clone();
            let bound = tokio::task::spawn_blocking(move || bind_in(netns.as_deref(), addr))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                .and_then(TcpListener::from_std);
            match bound {
                Ok(socket) => {
                    let shared = Arc::new(RwLock::new(health.clone()));
                    let stop = self.shutdown.child_token();
                    let app = Router::new().fallback(answer).with_state(Answer {
                        health: shared.clone(),
                        proxy_healthy: self.proxy_healthy.clone(),
                    });
                    let until = stop.clone();
                    tokio::spawn(async move {
                        let serve = axum::serve(socket, app)
                            .with_graceful_shutdown(async move { until.cancelled().await });
                        if let Err(e) = serve.await {
                            tracing::warn!(port, error = %e, "health-check node port stopped");
                        }
                    });
                    self.listeners.insert(
                        port,
                        Listener {
                            health: shared,
                            stop,
                        },
                    );
                }
                Err(source) => errors.push(BindError {
                    port,
                    namespace: health.namespace.clone(),
                    name: health.name.clone(),
                    source,
                }),
            }
        }
        errors
    }
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for listener in self.listeners.values() {
            listener.stop.cancel();
        }
    }
}

#[derive(Clone)]
struct Answer {
    health: Arc<RwLock<ServiceHealth>>,
    proxy_healthy: Arc<dyn Fn() -> bool + Send + Sync>,
}

async fn answer(State(answer): State<Answer>) -> impl IntoResponse {
    let health = answer.health.read().expect("health-check lock").clone();
    let proxy_healthy = (answer.proxy_healthy)();
    let status = if health.local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "service": {"namespace": health.namespace, "name": health.name},
        "localEndpoints": health.local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    });
    (
        status,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (ENDPOINT_WEIGHT, HeaderValue::from(health.local_endpoints)),
        ],
        body.to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(port: u16) -> (u16, String, String) {
        get_from(Ipv4Addr::LOCALHOST.into(), port).await
    }

    async fn get_from(address: IpAddr, port: u16) -> (u16, String, String) {
        let mut stream = tokio::net::TcpStream::connect((address, port))
            .await
            .unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let status = head[9..12].parse().unwrap();
        (status, head.to_ascii_lowercase(), body.to_string())
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn health(n: u32) -> ServiceHealth {
        ServiceHealth {
            namespace: "shop".into(),
            name: "web".into(),
            local_endpoints: n,
        }
    }

    fn lb_service(
        name: &str,
        etp: &str,
        port: Option<i32>,
        backends: &[(&str, &str, &str)],
    ) -> LBService {
        let mut svc = LBService::new(name, Default::default());
        svc.metadata.namespace = Some("shop".into());
        svc.spec.external_traffic_policy = etp.into();
        svc.spec.health_check_node_port = port;
        svc.spec.backends = backends
            .iter()
            .map(|(address, node, state)| tendril_crds::v1alpha1::Backend {
                address: (*address).into(),
                port: 8080,
                protocol: "TCP".into(),
                weight: 1,
                node_name: Some((*node).into()),
                state: (*state).into(),
                ..Default::default()
            })
            .collect();
        svc
    }

    #[test]
    fn health_checks_count_this_nodes_ready_backends_of_local_services() {
        let web = lb_service(
            "web",
            "Local",
            Some(31000),
            &[
                ("10.0.1.5", "n1", "active"),
                // Another port of the same pod: one endpoint.
                ("10.0.1.5", "n1", "active"),
                ("10.0.1.6", "n1", "terminating"),
                ("10.0.2.5", "n2", "active"),
            ],
        );
        let empty_here = lb_service("api", "Local", Some(31001), &[("10.0.2.7", "n2", "active")]);
        let cluster = lb_service(
            "db",
            "Cluster",
            Some(31002),
            &[("10.0.1.9", "n1", "active")],
        );
        let none = lb_service("cache", "Local", None, &[("10.0.1.8", "n1", "active")]);
        let got = desired_health_checks([&web, &empty_here, &cluster, &none], "n1");
        assert_eq!(got.keys().copied().collect::<Vec<_>>(), vec![31000, 31001]);
        assert_eq!(got[&31000].local_endpoints, 1);
        assert_eq!(got[&31000].name, "web");
        assert_eq!(got[&31001].local_endpoints, 0, "served, answering 503");
    }

    #[tokio::test]
    async fn answers_like_kube_proxy_and_follows_counts_and_ports() {
        let healthy = Arc::new(AtomicBool::new(true));
        let flag = healthy.clone();
        let mut servers = HealthCheckServers::new(
            Ipv4Addr::LOCALHOST.into(),
            None,
            Arc::new(move || flag.load(Ordering::Relaxed)),
            CancellationToken::new(),
        );
        let port = free_port();
        let errors = servers.converge(&BTreeMap::from([(port, health(2))])).await;
        assert!(errors.is_empty());

        let (status, head, body) = get(port).await;
        assert_eq!(status, 200);
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(head.contains("x-content-type-options: nosniff"), "{head}");
        assert!(
            head.contains("x-load-balancing-endpoint-weight: 2"),
            "{head}"
        );
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["service"]["namespace"], "shop");
        assert_eq!(json["service"]["name"], "web");
        assert_eq!(json["localEndpoints"], 2);
        assert_eq!(json["serviceProxyHealthy"], true);

        // No local endpoint: 503, same socket.
        assert!(
            servers
                .converge(&BTreeMap::from([(port, health(0))]))
                .await
                .is_empty()
        );
        let (status, _, body) = get(port).await;
        assert_eq!(status, 503);
        assert!(body.contains("\"localEndpoints\":0"), "{body}");

        // An unhealthy datapath answers 503 even with local endpoints.
        assert!(
            servers
                .converge(&BTreeMap::from([(port, health(1))]))
                .await
                .is_empty()
        );
        healthy.store(false, Ordering::Relaxed);
        assert_eq!(get(port).await.0, 503);

        // Gone from the desired set: the port closes.
        assert!(servers.converge(&BTreeMap::new()).await.is_empty());
        assert!(servers.ports().is_empty());
        let mut closed = false;
        for _ in 0..50 {
            if tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                .await
                .is_err()
            {
                closed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(closed, "port {port} still accepts after its service left");
    }

    #[tokio::test]
    async fn a_taken_port_is_reported_and_the_others_are_served() {
        let taken = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let taken_port = taken.local_addr().unwrap().port();
        let free = free_port();
        let mut servers = HealthCheckServers::new(
            Ipv4Addr::LOCALHOST.into(),
            None,
            Arc::new(|| true),
            CancellationToken::new(),
        );
        let errors = servers
            .converge(&BTreeMap::from([
                (taken_port, health(1)),
                (free, health(1)),
            ]))
            .await;
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].port, taken_port);
        assert!(errors[0].to_string().contains("shop/web"), "{}", errors[0]);
        assert_eq!(servers.ports(), vec![free]);
        assert_eq!(get(free).await.0, 200);
    }

    #[tokio::test]
    async fn a_node_with_ipv6_answers_on_both_families_from_one_socket() {
        let bind = wildcard(&["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()]);
        assert_eq!(bind, IpAddr::from(Ipv6Addr::UNSPECIFIED));
        assert_eq!(
            wildcard(&["10.0.0.1".parse().unwrap()]),
            IpAddr::from(Ipv4Addr::UNSPECIFIED)
        );
        let mut servers =
            HealthCheckServers::new(bind, None, Arc::new(|| true), CancellationToken::new());
        let port = free_port();
        assert!(
            servers
                .converge(&BTreeMap::from([(port, health(1))]))
                .await
                .is_empty()
        );
        assert_eq!(get_from(Ipv6Addr::LOCALHOST.into(), port).await.0, 200);
        assert_eq!(get_from(Ipv4Addr::LOCALHOST.into(), port).await.0, 200);
    }
}
