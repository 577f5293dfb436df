//! The agent's Observer API: Hubble's `observer.Observer` over the node's [`FlowRing`],
//! and `grpc.health.v1` answering SERVING for `hubble.server.Observer` (what `hubble
//! status` checks first). Plaintext gRPC, like Hubble's default.

use super::filter::FlowFilters;
use super::metrics::FlowMetrics;
use super::proto::flow::{LostEvent, LostEventSource};
use super::proto::health::health_check_response::ServingStatus;
use super::proto::health::health_server::{Health, HealthServer};
use super::proto::health::{HealthCheckRequest, HealthCheckResponse};
use super::proto::observer::get_flows_response::ResponseTypes;
use super::proto::observer::observer_server::{Observer, ObserverServer};
use super::proto::observer::{
    GetFlowsRequest, GetFlowsResponse, GetNamespacesRequest, GetNamespacesResponse,
    GetNodesRequest, GetNodesResponse, Namespace, Node, ServerStatusRequest, ServerStatusResponse,
};
use super::proto::relay::NodeState;
use super::ring::{Entry, FlowRing};
use super::{OBSERVER_SERVICE_NAME, timestamp, timestamp_nanos};
use futures::Stream;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Instant, SystemTime};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A stream of what `rx` receives.
pub fn stream_of<T: Send + 'static>(rx: mpsc::Receiver<Result<T, Status>>) -> ResponseStream<T> {
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

/// What a GetFlows request asks for, checked.
#[derive(Clone, Debug)]
pub struct Query {
    pub filters: FlowFilters,
    /// How many flows of the history: `None` is all.
    pub number: Option<u64>,
    pub first: bool,
    pub follow: bool,
    pub since: Option<i128>,
    pub until: Option<i128>,
}

impl Query {
    pub fn from_request(req: &GetFlowsRequest) -> Result<Query, Status> {
        let filters = FlowFilters::compile(&req.whitelist, &req.blacklist)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let since = req.since.as_ref().map(timestamp_nanos);
        let until = req.until.as_ref().map(timestamp_nanos);
        if let (Some(s), Some(u)) = (since, until)
            && s > u
        {
            return Err(Status::invalid_argument("since is after until"));
        }
        // Hubble's semantics: `number` bounds the history; 0 means all of it, except when
        // following without `since` (then only new flows).
        let number = match req.number {
            0 if req.follow && since.is_none() => Some(0),
            0 => None,
            n => Some(n),
        };
        Ok(Query {
            filters,
            number,
            first: req.first,
            follow: req.follow,
            since,
            until,
        })
    }

    /// Whether `entry` (a flow) is in the time window and passes the filters.
    pub fn selects(&self, entry: &Entry) -> bool {
        let Entry::Flow(flow) = entry else {
            return false;
        };
        let t = entry.time_nanos();
        self.since.is_none_or(|s| t >= s)
            && self.until.is_none_or(|u| t <= u)
            && self.filters.matches(flow)
    }

    /// The history part of the answer from `entries` (oldest first): the first or last
    /// `number` selected flows, oldest first.
    pub fn history(&self, entries: &[Entry]) -> Vec<Entry> {
        let limit = self
            .number
            .map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
        if self.first {
            entries
                .iter()
                .filter(|e| self.selects(e))
                .take(limit)
                .cloned()
                .collect()
        } else {
            let mut out: Vec<Entry> = entries
                .iter()
                .rev()
                .filter(|e| self.selects(e))
                .take(limit)
                .cloned()
                .collect();
            out.reverse();
            out
        }
    }
}

/// One entry as a GetFlows answer from `node`.
pub fn response(entry: Entry, node: &str) -> GetFlowsResponse {
    match entry {
        Entry::Flow(flow) => GetFlowsResponse {
            time: flow.time,
            node_name: node.to_string(),
            response_types: Some(ResponseTypes::Flow(flow.as_ref().clone())),
        },
        Entry::Lost(lost) => GetFlowsResponse {
            time: lost.last,
            node_name: node.to_string(),
            response_types: Some(ResponseTypes::LostEvents(lost)),
        },
    }
}

/// The agent's Observer service.
#[derive(Clone, Debug)]
pub struct AgentObserver {
    ring: FlowRing,
    node_name: String,
    started: Instant,
    metrics: FlowMetrics,
}

impl AgentObserver {
    pub fn new(ring: FlowRing, node_name: String, metrics: FlowMetrics) -> Self {
        Self {
            ring,
            node_name,
            started: Instant::now(),
            metrics,
        }
    }

    fn uptime_ns(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Streams `query`'s answer from `ring` into `tx` until done or the client goes away.
async fn serve_flows(
    ring: FlowRing,
    node: String,
    query: Query,
    tx: mpsc::Sender<Result<GetFlowsResponse, Status>>,
) {
    let mut written = ring.subscribe();
    let (entries, mut cursor) = ring.snapshot();
    for entry in query.history(&entries) {
        if tx.send(Ok(response(entry, &node))).await.is_err() {
            return;
        }
    }
    if !query.follow {
        return;
    }
    loop {
        tokio::select! {
            _ = tx.closed() => return,
            changed = written.changed() => if changed.is_err() { return },
        }
        loop {
            let read = ring.read_from(cursor, 1024);
            if read.missed > 0 {
                // This reader fell behind and the ring overwrote flows it had not read.
                let at = timestamp(SystemTime::now());
                let lost = Entry::Lost(LostEvent {
                    source: LostEventSource::HubbleRingBuffer as i32,
                    num_events_lost: read.missed,
                    cpu: None,
                    first: Some(at),
                    last: Some(at),
                });
                if tx.send(Ok(response(lost, &node))).await.is_err() {
                    return;
                }
            }
            if read.entries.is_empty() {
                break;
            }
            cursor = read.next;
            for entry in read.entries {
                if query.until.is_some_and(|u| entry.time_nanos() > u) {
                    return;
                }
                let send = match &entry {
                    Entry::Lost(_) => true,
                    Entry::Flow(_) => query.selects(&entry),
                };
                if send && tx.send(Ok(response(entry, &node))).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[tonic::async_trait]
impl Observer for AgentObserver {
    type GetFlowsStream = ResponseStream<GetFlowsResponse>;

    async fn get_flows(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        let query = Query::from_request(request.get_ref())?;
        let (tx, rx) = mpsc::channel(256);
        let (ring, node, clients) = (
            self.ring.clone(),
            self.node_name.clone(),
            self.metrics.observer_clients.clone(),
        );
        tokio::spawn(async move {
            clients.inc();
            serve_flows(ring, node, query, tx).await;
            clients.dec();
        });
        Ok(Response::new(stream_of(rx)))
    }

    async fn get_nodes(
        &self,
        _request: Request<GetNodesRequest>,
    ) -> Result<Response<GetNodesResponse>, Status> {
        // Hubble's agents leave this to the relay; answering it here lets the relay learn
        // each peer's node name.
        let (num_flows, seen_flows) = self.ring.counts();
        Ok(Response::new(GetNodesResponse {
            nodes: vec![Node {
                name: self.node_name.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                state: NodeState::NodeConnected as i32,
                uptime_ns: self.uptime_ns(),
                num_flows,
                max_flows: self.ring.capacity() as u64,
                seen_flows,
                ..Node::default()
            }],
        }))
    }

    async fn get_namespaces(
        &self,
        _request: Request<GetNamespacesRequest>,
    ) -> Result<Response<GetNamespacesResponse>, Status> {
        Ok(Response::new(GetNamespacesResponse {
            namespaces: namespaces(&self.ring.snapshot().0),
        }))
    }

    async fn server_status(
        &self,
        _request: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        let (num_flows, seen_flows) = self.ring.counts();
        let uptime = self.started.elapsed().as_secs_f64().max(1.0);
        Ok(Response::new(ServerStatusResponse {
            num_flows,
            max_flows: self.ring.capacity() as u64,
            seen_flows,
            uptime_ns: self.uptime_ns(),
            version: format!("tendril-agent {}", env!("CARGO_PKG_VERSION")),
            flows_rate: seen_flows as f64 / uptime,
            ..ServerStatusResponse::default()
        }))
    }
}

/// The namespaces the flows in `entries` name, sorted.
pub fn namespaces(entries: &[Entry]) -> Vec<Namespace> {
    let mut set = BTreeSet::new();
    for entry in entries {
        if let Entry::Flow(flow) = entry {
            for ep in [&flow.source, &flow.destination].into_iter().flatten() {
                if !ep.namespace.is_empty() {
                    set.insert(ep.namespace.clone());
                }
            }
        }
    }
    set.into_iter()
        .map(|namespace| Namespace {
            cluster: String::new(),
            namespace,
        })
        .collect()
}

/// `grpc.health.v1`: SERVING for the server as a whole (`""`) and for
/// `hubble.server.Observer`; NOT_FOUND for any other service, as the protocol says.
#[derive(Clone, Copy, Debug, Default)]
pub struct ObserverHealth;

fn health_of(service: &str) -> Result<HealthCheckResponse, Status> {
    if service.is_empty() || service == OBSERVER_SERVICE_NAME {
        Ok(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        })
    } else {
        Err(Status::not_found(format!("unknown service {service:?}")))
    }
}

#[tonic::async_trait]
impl Health for ObserverHealth {
    type WatchStream = ResponseStream<HealthCheckResponse>;

    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        health_of(&request.get_ref().service).map(Response::new)
    }

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // The status never changes while the server runs: one answer, then the stream
        // stays open.
        let first = health_of(&request.get_ref().service)?;
        let stream =
            futures::stream::once(async move { Ok(first) }).chain(futures::stream::pending());
        Ok(Response::new(Box::pin(stream)))
    }
}

use futures::StreamExt as _;

/// Binds `addr` (port 0: any free port) and returns the bound address and the server,
/// which serves `observer` and the health service until `shutdown`.
pub async fn serve<O: Observer>(
    addr: SocketAddr,
    observer: O,
    shutdown: CancellationToken,
) -> std::io::Result<(
    SocketAddr,
    impl std::future::Future<Output = Result<(), tonic::transport::Error>>,
)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tonic::transport::Server::builder()
        .add_service(HealthServer::new(ObserverHealth))
        .add_service(ObserverServer::new(observer))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned());
    Ok((bound, server))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::proto::flow::{self, FlowFilter, Verdict};
    use std::sync::Arc;

    fn flow(sec: i64, verdict: Verdict) -> Entry {
        Entry::Flow(Arc::new(flow::Flow {
            time: Some(prost_types::Timestamp {
                seconds: sec,
                nanos: 0,
            }),
            verdict: verdict as i32,
            ..flow::Flow::default()
        }))
    }

    fn secs(entries: &[Entry]) -> Vec<i128> {
        entries
            .iter()
            .map(|e| e.time_nanos() / 1_000_000_000)
            .collect()
    }

    #[test]
    fn history_takes_the_last_or_first_n_selected_in_the_window() {
        let entries: Vec<Entry> = (1..=6)
            .map(|s| {
                flow(
                    s,
                    if s % 2 == 0 {
                        Verdict::Dropped
                    } else {
                        Verdict::Forwarded
                    },
                )
            })
            .collect();
        let req = |number, first| GetFlowsRequest {
            number,
            first,
            ..GetFlowsRequest::default()
        };
        assert_eq!(
            secs(
                &Query::from_request(&req(2, false))
                    .unwrap()
                    .history(&entries)
            ),
            vec![5, 6]
        );
        assert_eq!(
            secs(
                &Query::from_request(&req(2, true))
                    .unwrap()
                    .history(&entries)
            ),
            vec![1, 2]
        );
        assert_eq!(
            secs(
                &Query::from_request(&req(0, false))
                    .unwrap()
                    .history(&entries)
            )
            .len(),
            6
        );
        let dropped = GetFlowsRequest {
            number: 2,
            whitelist: vec![FlowFilter {
                verdict: vec![Verdict::Dropped as i32],
                ..FlowFilter::default()
            }],
            ..GetFlowsRequest::default()
        };
        assert_eq!(
            secs(&Query::from_request(&dropped).unwrap().history(&entries)),
            vec![4, 6]
        );
        let window = GetFlowsRequest {
            since: Some(prost_types::Timestamp {
                seconds: 2,
                nanos: 0,
            }),
            until: Some(prost_types::Timestamp {
                seconds: 4,
                nanos: 0,
            }),
            ..GetFlowsRequest::default()
        };
        assert_eq!(
            secs(&Query::from_request(&window).unwrap().history(&entries)),
            vec![2, 3, 4]
        );
        // Following without since: only new flows.
        let follow = GetFlowsRequest {
            follow: true,
            ..GetFlowsRequest::default()
        };
        assert!(
            Query::from_request(&follow)
                .unwrap()
                .history(&entries)
                .is_empty()
        );
        let backwards = GetFlowsRequest {
            since: window.until,
            until: window.since,
            ..GetFlowsRequest::default()
        };
        assert_eq!(
            Query::from_request(&backwards).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn health_answers_for_the_observer_only() {
        assert_eq!(health_of("").unwrap().status, ServingStatus::Serving as i32);
        assert_eq!(
            health_of(OBSERVER_SERVICE_NAME).unwrap().status,
            ServingStatus::Serving as i32
        );
        assert_eq!(
            health_of("other").unwrap_err().code(),
            tonic::Code::NotFound
        );
    }
}
