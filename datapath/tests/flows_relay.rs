//! `tendril-relay`'s merging over real gRPC (no root needed): two agents' Observer APIs
//! over rings filled by hand, and the relay in front of them, all on loopback. `--last N`
//! is the newest N of the cluster in time order; following continues from there without a
//! gap or a duplicate, in time order across nodes; an unreachable agent is reported as
//! unavailable by ServerStatus, GetNodes and a node status event, and the others still
//! answer.

use std::sync::Arc;
use std::time::Duration;

use tendril_datapath::flows::metrics::FlowMetrics;
use tendril_datapath::flows::observer::{AgentObserver, serve};
use tendril_datapath::flows::proto::flow::Flow;
use tendril_datapath::flows::proto::observer::get_flows_response::ResponseTypes;
use tendril_datapath::flows::proto::observer::observer_client::ObserverClient;
use tendril_datapath::flows::proto::observer::{
    GetFlowsRequest, GetFlowsResponse, GetNodesRequest, ServerStatusRequest,
};
use tendril_datapath::flows::proto::relay::NodeState;
use tendril_datapath::flows::relay::{Peers, Relay};
use tendril_datapath::flows::ring::{Entry, FlowRing};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Flow `n` of `node`, at 1,000 s + n ms.
fn flow(node: &str, n: i32) -> Entry {
    Entry::Flow(Arc::new(Flow {
        time: Some(prost_types::Timestamp {
            seconds: 1000,
            nanos: n * 1_000_000,
        }),
        node_name: node.into(),
        uuid: format!("{node}-{n}"),
        ..Flow::default()
    }))
}

async fn client(addr: std::net::SocketAddr) -> ObserverClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    ObserverClient::new(channel)
}

fn uuid(resp: &GetFlowsResponse) -> Option<String> {
    match &resp.response_types {
        Some(ResponseTypes::Flow(f)) => Some(f.uuid.clone()),
        _ => None,
    }
}

#[tokio::test]
async fn the_relay_merges_agents_in_time_order_and_follows_without_gaps() {
    let stop = CancellationToken::new();
    let mut peers = Vec::new();
    let mut rings = Vec::new();
    for node in ["a", "b"] {
        let ring = FlowRing::new(100);
        let observer = AgentObserver::new(ring.clone(), node.into(), FlowMetrics::unregistered());
        let (addr, server) = serve("127.0.0.1:0".parse().unwrap(), observer, stop.clone())
            .await
            .unwrap();
        tokio::spawn(server);
        peers.push(addr.to_string());
        rings.push(ring);
    }
    // Interleaved in time: a has even milliseconds, b odd ones.
    for n in 0..10 {
        rings[(n % 2) as usize].push(flow(["a", "b"][(n % 2) as usize], n));
    }
    // A third peer that is not there.
    let gone = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut all_peers = peers.clone();
    all_peers.push(gone.to_string());
    let relay = Relay::new(Peers {
        fixed: all_peers,
        dns: None,
    });
    let (relay_addr, server) = serve("127.0.0.1:0".parse().unwrap(), relay, stop.clone())
        .await
        .unwrap();
    tokio::spawn(server);
    let mut c = client(relay_addr).await;

    // --last 4: the newest four of the cluster, oldest first.
    let last: Vec<GetFlowsResponse> = {
        let mut s = c
            .get_flows(GetFlowsRequest {
                number: 4,
                ..GetFlowsRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut out = Vec::new();
        while let Some(r) = s.message().await.unwrap() {
            out.push(r);
        }
        out
    };
    let uuids: Vec<String> = last.iter().filter_map(uuid).collect();
    assert_eq!(uuids, ["a-6", "b-7", "a-8", "b-9"]);
    assert!(
        last.iter().any(|r| matches!(&r.response_types, Some(ResponseTypes::NodeStatus(s))
            if s.state_change == NodeState::NodeUnavailable as i32 && s.node_names == [gone.to_string()])),
        "the missing peer is reported: {last:?}"
    );

    // --last 2 --follow: the newest two, then new flows of both nodes in time order.
    let mut follow = c
        .get_flows(GetFlowsRequest {
            number: 2,
            follow: true,
            ..GetFlowsRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let next = |got: &mut Vec<String>, r: GetFlowsResponse| {
        if let Some(u) = uuid(&r) {
            got.push(u);
        }
    };
    while got.len() < 2 {
        let r = follow.message().await.unwrap().unwrap();
        next(&mut got, r);
    }
    // New flows: b's arrives first but is newer than a's.
    rings[1].push(flow("b", 13));
    rings[0].push(flow("a", 12));
    while got.len() < 4 {
        let r = tokio::time::timeout(Duration::from_secs(10), follow.message())
            .await
            .expect("followed flows")
            .unwrap()
            .unwrap();
        next(&mut got, r);
    }
    assert_eq!(
        got,
        ["a-8", "b-9", "a-12", "b-13"],
        "no gap, no duplicate, time order"
    );

    // ServerStatus sums the agents and names the missing one; GetNodes lists all three.
    let status = c
        .server_status(ServerStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((status.num_flows, status.max_flows), (12, 200));
    assert_eq!(status.num_connected_nodes, Some(2));
    assert_eq!(status.unavailable_nodes, [gone.to_string()]);
    let nodes = c
        .get_nodes(GetNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let mut states: Vec<(String, i32)> = nodes.iter().map(|n| (n.name.clone(), n.state)).collect();
    states.sort();
    assert_eq!(
        states,
        [
            (gone.to_string(), NodeState::NodeUnavailable as i32),
            ("a".to_string(), NodeState::NodeConnected as i32),
            ("b".to_string(), NodeState::NodeConnected as i32),
        ]
    );
    stop.cancel();
}
