//! The relay: Hubble's Observer API over every agent, so one endpoint answers for the
//! cluster (`tendril-relay`, on Hubble relay's port 4245).
//!
//! - Peers: fixed addresses (`--peer`) and/or a DNS name resolved on every request (the
//!   agents' headless Service in a cluster: one address per agent).
//! - GetFlows: the request goes to every peer. The history (every peer's answer without
//!   `follow`) is merged in time order and cut to `number` (the first or last); with
//!   `follow`, each peer is then asked for what came after the newest flow it gave, and
//!   those answers pass through a short re-ordering window and go out in time order.
//!   A peer that cannot be reached is reported as a `NodeStatusEvent` (NODE_UNAVAILABLE).
//! - ServerStatus: the peers' figures summed, with connected/unavailable node counts.
//! - GetNodes: one entry per peer, named by the peer itself.

use super::observer::{ResponseStream, stream_of};
use super::proto::observer::get_flows_response::ResponseTypes;
use super::proto::observer::observer_client::ObserverClient;
use super::proto::observer::observer_server::Observer;
use super::proto::observer::{
    GetFlowsRequest, GetFlowsResponse, GetNamespacesRequest, GetNamespacesResponse,
    GetNodesRequest, GetNodesResponse, Node, ServerStatusRequest, ServerStatusResponse,
};
use super::proto::relay::{NodeState, NodeStatusEvent};
use super::timestamp_nanos;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

/// How long a peer may take to answer a unary call or to start a stream.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// Followed flows wait this long for earlier flows from slower peers before going out.
const REORDER_WINDOW: Duration = Duration::from_millis(300);

/// Where the relay finds the agents.
#[derive(Clone, Debug, Default)]
pub struct Peers {
    /// `host:port` of agents.
    pub fixed: Vec<String>,
    /// `name:port` resolved on every request: every address is an agent.
    pub dns: Option<String>,
}

impl Peers {
    /// The peers' addresses now, sorted and unique.
    pub async fn resolve(&self) -> Vec<String> {
        let mut out: BTreeSet<String> = self.fixed.iter().cloned().collect();
        if let Some(name) = &self.dns {
            match tokio::net::lookup_host(name.as_str()).await {
                Ok(addrs) => out.extend(addrs.map(|a| a.to_string())),
                Err(e) => tracing::warn!(name, error = %e, "resolving the agents' addresses"),
            }
        }
        out.into_iter().collect()
    }
}

#[derive(Clone, Debug)]
pub struct Relay {
    peers: Peers,
    started: Instant,
}

async fn client(addr: &str) -> Result<ObserverClient<Channel>, Status> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Status::invalid_argument(format!("peer {addr}: {e}")))?
        .connect_timeout(PEER_TIMEOUT)
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("peer {addr}: {e}")))?;
    Ok(ObserverClient::new(channel))
}

fn unavailable(addr: &str, error: &Status) -> GetFlowsResponse {
    GetFlowsResponse {
        response_types: Some(ResponseTypes::NodeStatus(NodeStatusEvent {
            state_change: NodeState::NodeUnavailable as i32,
            node_names: vec![addr.to_string()],
            message: error.message().to_string(),
        })),
        ..GetFlowsResponse::default()
    }
}

fn time_of(resp: &GetFlowsResponse) -> i128 {
    resp.time.as_ref().map_or(0, timestamp_nanos)
}

/// Streams one peer's answer to `request` into `tx` (its failure as a node status event).
async fn pump(
    addr: String,
    request: GetFlowsRequest,
    tx: mpsc::Sender<(String, GetFlowsResponse)>,
) {
    let stream = async {
        let mut c = client(&addr).await?;
        tokio::time::timeout(PEER_TIMEOUT, c.get_flows(request))
            .await
            .map_err(|_| Status::deadline_exceeded(format!("peer {addr}: no answer")))?
    };
    let mut stream = match stream.await {
        Ok(s) => s.into_inner(),
        Err(e) => {
            let _ = tx.send((addr.clone(), unavailable(&addr, &e))).await;
            return;
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(resp)) => {
                if tx.send((addr.clone(), resp)).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                let _ = tx.send((addr.clone(), unavailable(&addr, &e))).await;
                return;
            }
        }
    }
}

/// Answers one GetFlows for the cluster into `tx`. First the history: every peer's answer
/// without `follow`, merged in time order and cut to `number`, so `--last N` is the newest
/// N of the cluster. Then, when following, every peer is asked for what came after the
/// newest flow it already gave (or after the request started), and the answers go out in
/// time order through a short re-ordering window.
async fn relay_flows(
    addrs: Vec<String>,
    request: GetFlowsRequest,
    tx: mpsc::Sender<Result<GetFlowsResponse, Status>>,
) {
    let started = super::timestamp(std::time::SystemTime::now());
    let wants_history = !(request.follow && request.number == 0 && request.since.is_none());
    let mut newest: BTreeMap<String, prost_types::Timestamp> = BTreeMap::new();
    if wants_history {
        let (peer_tx, mut peer_rx) = mpsc::channel(1024);
        let history = GetFlowsRequest {
            follow: false,
            ..request.clone()
        };
        for addr in &addrs {
            tokio::spawn(pump(addr.clone(), history.clone(), peer_tx.clone()));
        }
        drop(peer_tx);
        let mut all = Vec::new();
        while let Some((addr, resp)) = peer_rx.recv().await {
            if let (Some(ResponseTypes::Flow(_)), Some(t)) = (&resp.response_types, resp.time) {
                let slot = newest.entry(addr).or_insert(t);
                if timestamp_nanos(&t) > timestamp_nanos(slot) {
                    *slot = t;
                }
            }
            all.push(resp);
        }
        for resp in merge_history(all, request.number, request.first) {
            if tx.send(Ok(resp)).await.is_err() {
                return;
            }
        }
    }
    if !request.follow {
        return;
    }
    let (peer_tx, mut peer_rx) = mpsc::channel(1024);
    for addr in &addrs {
        let since = match newest.get(addr) {
            // Strictly after the newest flow this peer already gave.
            Some(t) if t.nanos >= 999_999_999 => prost_types::Timestamp {
                seconds: t.seconds + 1,
                nanos: 0,
            },
            Some(t) => prost_types::Timestamp {
                seconds: t.seconds,
                nanos: t.nanos + 1,
            },
            None => request.since.unwrap_or(started),
        };
        let follow = GetFlowsRequest {
            number: 0,
            first: false,
            since: Some(since),
            ..request.clone()
        };
        tokio::spawn(pump(addr.clone(), follow, peer_tx.clone()));
    }
    drop(peer_tx);
    // (time, arrival) → answer; flushed once older than the window.
    let mut pending: BTreeMap<(i128, u64), (Instant, GetFlowsResponse)> = BTreeMap::new();
    let mut arrival = 0u64;
    let mut tick = tokio::time::interval(REORDER_WINDOW / 3);
    let mut open = true;
    loop {
        tokio::select! {
            _ = tx.closed() => return,
            resp = peer_rx.recv(), if open => match resp {
                Some((_, resp)) => {
                    arrival += 1;
                    pending.insert((time_of(&resp), arrival), (Instant::now(), resp));
                }
                None => open = false,
            },
            _ = tick.tick() => {}
        }
        // Out in time order: everything up to the newest entry that has waited out the
        // window.
        let ripe = pending
            .iter()
            .filter(|(_, (at, _))| !open || at.elapsed() >= REORDER_WINDOW)
            .map(|(k, _)| *k)
            .max();
        if let Some(ripe) = ripe {
            let rest = pending.split_off(&(ripe.0, ripe.1 + 1));
            for (_, (_, resp)) in std::mem::replace(&mut pending, rest) {
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        }
        if !open && pending.is_empty() {
            return;
        }
    }
}

/// Merges answers of one request (not following): in time order, cut to `number`.
pub fn merge_history(
    mut all: Vec<GetFlowsResponse>,
    number: u64,
    first: bool,
) -> Vec<GetFlowsResponse> {
    all.sort_by_key(time_of);
    let (status, mut flows): (Vec<_>, Vec<_>) = all
        .into_iter()
        .partition(|r| matches!(r.response_types, Some(ResponseTypes::NodeStatus(_))));
    if number > 0 {
        let n = usize::try_from(number).unwrap_or(usize::MAX);
        if first {
            flows.truncate(n);
        } else if flows.len() > n {
            flows.drain(..flows.len() - n);
        }
    }
    status.into_iter().chain(flows).collect()
}

impl Relay {
    pub fn new(peers: Peers) -> Self {
        Self {
            peers,
            started: Instant::now(),
        }
    }

    /// Every peer's answer to a unary call, by address.
    async fn each<T, F, Fut>(&self, call: F) -> Vec<(String, Result<T, Status>)>
    where
        F: Fn(ObserverClient<Channel>) -> Fut + Clone,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let addrs = self.peers.resolve().await;
        let calls = addrs.iter().map(|addr| {
            let call = call.clone();
            async move {
                let result = async {
                    let c = client(addr).await?;
                    tokio::time::timeout(PEER_TIMEOUT, call(c))
                        .await
                        .map_err(|_| Status::deadline_exceeded(format!("peer {addr}: no answer")))?
                }
                .await;
                (addr.clone(), result)
            }
        });
        futures::future::join_all(calls).await
    }
}

#[tonic::async_trait]
impl Observer for Relay {
    type GetFlowsStream = ResponseStream<GetFlowsResponse>;

    async fn get_flows(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        let request = request.into_inner();
        // Checked here too, so a bad filter is one clear error, not one per peer.
        super::observer::Query::from_request(&request)?;
        let addrs = self.peers.resolve().await;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(relay_flows(addrs, request, tx));
        Ok(Response::new(stream_of(rx)))
    }

    async fn get_nodes(
        &self,
        _request: Request<GetNodesRequest>,
    ) -> Result<Response<GetNodesResponse>, Status> {
        let answers = self
            .each(|mut c| async move {
                c.get_nodes(GetNodesRequest {})
                    .await
                    .map(|r| r.into_inner())
            })
            .await;
        let nodes = answers
            .into_iter()
            .flat_map(|(addr, result)| match result {
                Ok(answer) => answer
                    .nodes
                    .into_iter()
                    .map(|n| Node {
                        address: addr.clone(),
                        ..n
                    })
                    .collect::<Vec<_>>(),
                Err(_) => vec![Node {
                    name: addr.clone(),
                    address: addr,
                    state: NodeState::NodeUnavailable as i32,
                    ..Node::default()
                }],
            })
            .collect();
        Ok(Response::new(GetNodesResponse { nodes }))
    }

    async fn get_namespaces(
        &self,
        _request: Request<GetNamespacesRequest>,
    ) -> Result<Response<GetNamespacesResponse>, Status> {
        let answers = self
            .each(|mut c| async move {
                c.get_namespaces(GetNamespacesRequest {})
                    .await
                    .map(|r| r.into_inner())
            })
            .await;
        let mut set = BTreeSet::new();
        for (_, result) in answers {
            for ns in result.map(|a| a.namespaces).unwrap_or_default() {
                set.insert((ns.cluster, ns.namespace));
            }
        }
        Ok(Response::new(GetNamespacesResponse {
            namespaces: set
                .into_iter()
                .map(|(cluster, namespace)| super::proto::observer::Namespace {
                    cluster,
                    namespace,
                })
                .collect(),
        }))
    }

    async fn server_status(
        &self,
        _request: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        let answers = self
            .each(|mut c| async move {
                c.server_status(ServerStatusRequest {})
                    .await
                    .map(|r| r.into_inner())
            })
            .await;
        let mut total = ServerStatusResponse {
            uptime_ns: u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX),
            version: format!("tendril-relay {}", env!("CARGO_PKG_VERSION")),
            ..ServerStatusResponse::default()
        };
        let (mut connected, mut unavailable) = (0u32, Vec::new());
        for (addr, result) in answers {
            match result {
                Ok(s) => {
                    connected += 1;
                    total.num_flows += s.num_flows;
                    total.max_flows += s.max_flows;
                    total.seen_flows += s.seen_flows;
                    total.flows_rate += s.flows_rate;
                }
                Err(_) => unavailable.push(addr),
            }
        }
        total.num_connected_nodes = Some(connected);
        total.num_unavailable_nodes = Some(unavailable.len() as u32);
        total.unavailable_nodes = unavailable;
        Ok(Response::new(total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::proto::flow;

    fn at(sec: i64, node: &str) -> GetFlowsResponse {
        let time = Some(prost_types::Timestamp {
            seconds: sec,
            nanos: 0,
        });
        GetFlowsResponse {
            time,
            node_name: node.into(),
            response_types: Some(ResponseTypes::Flow(flow::Flow {
                time,
                ..flow::Flow::default()
            })),
        }
    }

    #[test]
    fn histories_merge_in_time_order_cut_to_number() {
        let all = vec![at(5, "a"), at(1, "a"), at(4, "b"), at(2, "b"), at(3, "a")];
        let secs = |v: Vec<GetFlowsResponse>| {
            v.iter()
                .map(|r| r.time.unwrap().seconds)
                .collect::<Vec<_>>()
        };
        assert_eq!(secs(merge_history(all.clone(), 3, false)), vec![3, 4, 5]);
        assert_eq!(secs(merge_history(all.clone(), 2, true)), vec![1, 2]);
        assert_eq!(secs(merge_history(all, 0, false)), vec![1, 2, 3, 4, 5]);
    }
}
