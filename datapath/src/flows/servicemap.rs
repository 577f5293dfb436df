//! The live service map the relay serves (`tendril-relay --ui-listen`, 127.0.0.1:12000 in
//! the local cluster, Hubble UI's port): a page that draws workloads as nodes and observed
//! flows as edges, green forwarded and red dropped, a click on an edge listing its recent
//! flows; it polls `/api/map` every two seconds.
//!
//! `/api/map?seconds=N` asks the relay (the same GetFlows the `hubble` CLI gets, so the map
//! shows what `hubble observe` shows) for the flows of the last N seconds (default 300) and
//! folds them into a [`Graph`] ([`graph`], pure): a node per workload — the endpoint's
//! workload (its Deployment, StatefulSet, ...), else the `app.kubernetes.io/name`, `app` or
//! `k8s-app` label within its namespace, else the pod,
//! else the reserved identity (`world`, `host`, `remote-node`) —, an edge per (source,
//! destination, verdict), replies folded into their request's direction.

use super::proto::flow::{Endpoint, Flow, Verdict};
use super::proto::observer::observer_server::Observer;
use super::proto::observer::{GetFlowsRequest, get_flows_response::ResponseTypes};
use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// The page: one self-contained file (SVG and a little JavaScript), no build step.
const PAGE: &str = include_str!("servicemap.html");
/// Flows asked of the relay per map at most.
const MAX_FLOWS: u64 = 20_000;
/// Recent flows kept per edge for the page's list.
const RECENT_PER_EDGE: usize = 20;
const DEFAULT_WINDOW_SECONDS: u64 = 300;

/// A workload on the map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapNode {
    /// `namespace/workload`, or the reserved identity's name.
    pub id: String,
    pub namespace: String,
    pub name: String,
    /// Pods seen for it.
    pub pods: Vec<String>,
}

/// One flow of an edge, as the page lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapFlow {
    /// RFC 3339.
    pub time: String,
    pub source: String,
    pub destination: String,
    /// `TCP 8080`, `UDP 53`, `ICMPv4`, ….
    pub l4: String,
    pub verdict: String,
    /// The drop reason's name, empty when forwarded.
    pub drop_reason: String,
}

/// Observed traffic from one workload to another with one verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapEdge {
    pub from: String,
    pub to: String,
    /// `forwarded`, `dropped` or `audit`.
    pub verdict: String,
    pub flows: u64,
    /// Newest first.
    pub recent: Vec<MapFlow>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Graph {
    pub nodes: Vec<MapNode>,
    pub edges: Vec<MapEdge>,
}

/// The label that names an endpoint's workload, `k8s:`-prefixed as flows carry them.
const WORKLOAD_LABELS: [&str; 3] = ["k8s:app.kubernetes.io/name=", "k8s:app=", "k8s:k8s-app="];

/// The map node of one end of a flow: (id, namespace, name, pod).
fn node_of(ep: Option<&Endpoint>, ip: &str) -> (String, String, String, Option<String>) {
    let Some(ep) = ep else {
        return (ip.to_string(), String::new(), ip.to_string(), None);
    };
    let pod = (!ep.pod_name.is_empty()).then(|| ep.pod_name.clone());
    if !ep.namespace.is_empty() {
        let workload = ep
            .workloads
            .first()
            .map(|w| w.name.clone())
            .filter(|name| !name.is_empty())
            .or_else(|| {
                WORKLOAD_LABELS.iter().find_map(|prefix| {
                    ep.labels
                        .iter()
                        .find_map(|l| l.strip_prefix(prefix).map(str::to_string))
                })
            })
            .or_else(|| pod.clone())
            .unwrap_or_else(|| format!("identity-{}", ep.identity));
        let id = format!("{}/{workload}", ep.namespace);
        return (id, ep.namespace.clone(), workload, pod);
    }
    let reserved = ep
        .labels
        .iter()
        .find_map(|l| l.strip_prefix("reserved:").map(str::to_string))
        .unwrap_or_else(|| ip.to_string());
    (reserved.clone(), String::new(), reserved, pod)
}

fn verdict_name(v: i32) -> &'static str {
    match Verdict::try_from(v) {
        Ok(Verdict::Forwarded) => "forwarded",
        Ok(Verdict::Dropped) => "dropped",
        Ok(Verdict::Audit) => "audit",
        _ => "other",
    }
}

fn l4_of(flow: &Flow) -> String {
    use super::proto::flow::layer4::Protocol;
    match flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(Protocol::Tcp(t)) => format!("TCP {}", t.destination_port),
        Some(Protocol::Udp(u)) => format!("UDP {}", u.destination_port),
        Some(Protocol::IcmPv4(_)) => "ICMPv4".into(),
        Some(Protocol::IcmPv6(_)) => "ICMPv6".into(),
        _ => String::new(),
    }
}

/// Folds `flows` (any order) into the map.
pub fn graph(flows: &[Flow]) -> Graph {
    let mut nodes: BTreeMap<String, MapNode> = BTreeMap::new();
    let mut edges: BTreeMap<(String, String, &'static str), MapEdge> = BTreeMap::new();
    let mut sorted: Vec<&Flow> = flows.iter().collect();
    sorted.sort_by_key(|f| std::cmp::Reverse(f.time.as_ref().map(super::timestamp_nanos)));
    for flow in sorted {
        let ip = flow.ip.as_ref();
        let (src_ip, dst_ip) = ip.map_or((String::new(), String::new()), |i| {
            (i.source.clone(), i.destination.clone())
        });
        let mut src = node_of(flow.source.as_ref(), &src_ip);
        let mut dst = node_of(flow.destination.as_ref(), &dst_ip);
        for (id, namespace, name, pod) in [&src, &dst] {
            let node = nodes.entry(id.clone()).or_insert_with(|| MapNode {
                id: id.clone(),
                namespace: namespace.clone(),
                name: name.clone(),
                pods: Vec::new(),
            });
            if let Some(pod) = pod
                && !node.pods.contains(pod)
            {
                node.pods.push(pod.clone());
            }
        }
        // An answer belongs to the edge of the connection it answers.
        if flow.is_reply == Some(true) {
            std::mem::swap(&mut src, &mut dst);
        }
        let verdict = verdict_name(flow.verdict);
        let edge = edges
            .entry((src.0.clone(), dst.0.clone(), verdict))
            .or_insert_with(|| MapEdge {
                from: src.0.clone(),
                to: dst.0.clone(),
                verdict: verdict.into(),
                flows: 0,
                recent: Vec::new(),
            });
        edge.flows += 1;
        if edge.recent.len() < RECENT_PER_EDGE {
            let time = flow.time.as_ref().map_or_else(String::new, |t| {
                k8s_openapi::jiff::Timestamp::new(t.seconds, t.nanos)
                    .map(|ts| ts.to_string())
                    .unwrap_or_default()
            });
            let endpoint = |ep: Option<&Endpoint>, ip: &str| match ep {
                Some(e) if !e.pod_name.is_empty() => format!("{}/{}", e.namespace, e.pod_name),
                _ => ip.to_string(),
            };
            edge.recent.push(MapFlow {
                time,
                source: endpoint(flow.source.as_ref(), &src_ip),
                destination: endpoint(flow.destination.as_ref(), &dst_ip),
                l4: l4_of(flow),
                verdict: verdict.into(),
                drop_reason: flow
                    .drop_reason_desc()
                    .as_str_name()
                    .trim_start_matches("DROP_REASON_UNKNOWN")
                    .to_string(),
            });
        }
    }
    Graph {
        nodes: nodes.into_values().collect(),
        edges: edges.into_values().collect(),
    }
}

/// `seconds=N` of the query string, if any.
fn window_seconds(query: Option<&str>) -> Option<u64> {
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("seconds="))?
        .parse()
        .ok()
}

/// The flows of the last `window` from `observer` (the relay), at most [`MAX_FLOWS`].
async fn recent_flows<O: Observer>(observer: &O, window: Duration) -> Result<Vec<Flow>, String> {
    let since = SystemTime::now()
        .checked_sub(window)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let request = GetFlowsRequest {
        number: MAX_FLOWS,
        since: Some(super::timestamp(since)),
        ..GetFlowsRequest::default()
    };
    let stream = observer
        .get_flows(tonic::Request::new(request))
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let mut stream = std::pin::pin!(stream);
    let mut flows = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(resp) => {
                if let Some(ResponseTypes::Flow(f)) = resp.response_types {
                    flows.push(f);
                }
            }
            Err(s) => return Err(s.message().to_string()),
        }
    }
    Ok(flows)
}

async fn map<O: Observer>(State(observer): State<Arc<O>>, RawQuery(q): RawQuery) -> Response {
    let seconds = window_seconds(q.as_deref()).unwrap_or(DEFAULT_WINDOW_SECONDS);
    let window = Duration::from_secs(seconds);
    match recent_flows(observer.as_ref(), window).await {
        Ok(flows) => axum::Json(graph(&flows)).into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, format!("reading flows: {e}\n")).into_response(),
    }
}

async fn page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response()
}

/// Serves the page and its API on `addr` until `shutdown`; the bound address and the server.
pub async fn serve<O: Observer>(
    addr: SocketAddr,
    observer: O,
    shutdown: CancellationToken,
) -> std::io::Result<(
    SocketAddr,
    impl std::future::Future<Output = std::io::Result<()>>,
)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/", get(page))
        .route("/api/map", get(map::<O>))
        .with_state(Arc::new(observer));
    let server = async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    };
    Ok((bound, server))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::proto::flow::{Ip, Layer4, Tcp, layer4};

    fn endpoint(ns: &str, pod: &str, labels: &[&str]) -> Endpoint {
        Endpoint {
            namespace: ns.into(),
            pod_name: pod.into(),
            labels: labels.iter().map(|l| l.to_string()).collect(),
            ..Endpoint::default()
        }
    }

    fn flow(sec: i64, src: Endpoint, dst: Endpoint, verdict: Verdict, reply: bool) -> Flow {
        Flow {
            time: Some(prost_types::Timestamp {
                seconds: sec,
                nanos: 0,
            }),
            verdict: verdict as i32,
            ip: Some(Ip {
                source: "10.0.0.1".into(),
                destination: "10.0.0.2".into(),
                ..Ip::default()
            }),
            l4: Some(Layer4 {
                protocol: Some(layer4::Protocol::Tcp(Tcp {
                    destination_port: 8080,
                    ..Tcp::default()
                })),
            }),
            source: Some(src),
            destination: Some(dst),
            is_reply: Some(reply),
            ..Flow::default()
        }
    }

    #[test]
    fn workloads_are_nodes_and_verdicts_are_edges_with_answers_folded_in() {
        let client = endpoint("demo", "client-7d9f", &["k8s:app=client"]);
        let web1 = endpoint("demo", "web-1", &["k8s:app=web"]);
        let web2 = endpoint("demo", "web-2", &["k8s:app=web"]);
        let lone = endpoint("demo-2", "lonely", &[]);
        let world = endpoint("", "", &["reserved:world"]);
        let flows = vec![
            flow(1, client.clone(), web1.clone(), Verdict::Forwarded, false),
            flow(2, web1.clone(), client.clone(), Verdict::Forwarded, true),
            flow(3, client.clone(), web2.clone(), Verdict::Forwarded, false),
            flow(4, lone.clone(), web1.clone(), Verdict::Dropped, false),
            flow(5, world, web2, Verdict::Forwarded, false),
        ];
        let g = graph(&flows);
        let ids: Vec<&str> = g.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["demo-2/lonely", "demo/client", "demo/web", "world"]);
        let web = g.nodes.iter().find(|n| n.id == "demo/web").unwrap();
        assert_eq!(web.pods, ["web-2", "web-1"], "newest first");
        let edges: Vec<(&str, &str, &str, u64)> = g
            .edges
            .iter()
            .map(|e| (e.from.as_str(), e.to.as_str(), e.verdict.as_str(), e.flows))
            .collect();
        assert_eq!(
            edges,
            [
                ("demo-2/lonely", "demo/web", "dropped", 1),
                ("demo/client", "demo/web", "forwarded", 3),
                ("world", "demo/web", "forwarded", 1),
            ]
        );
        let recent = &g.edges[1].recent;
        assert_eq!(recent[0].source, "demo/client-7d9f", "newest first");
        assert_eq!(recent[0].l4, "TCP 8080");
        assert_eq!(recent[1].source, "demo/web-1", "the answer, as it was sent");
    }

    #[test]
    fn the_workload_names_the_node_before_the_app_label() {
        use crate::flows::proto::flow::Workload;
        let mut web = endpoint("demo", "web-5d8f-x2", &["k8s:app=frontend"]);
        web.workloads = vec![Workload {
            name: "web".into(),
            kind: "Deployment".into(),
        }];
        let client = endpoint("demo", "client", &["k8s:app=client"]);
        let g = graph(&[flow(1, client, web, Verdict::Forwarded, false)]);
        let ids: Vec<&str> = g.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["demo/client", "demo/web"]);
        assert_eq!(g.nodes[1].pods, ["web-5d8f-x2"]);
    }
}
