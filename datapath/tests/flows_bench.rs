//! The flow pipeline under synthetic load, printed (run with `--nocapture`), never asserted
//! on timing: the machine is shared and noisy. 100k events/s of decoded datapath events are
//! offered for 5 s (as the ring-buffer reader offers them) to one agent's pipeline
//! (queue → enrichment against 1,000 pods → ring), while a GetFlows follower reads through
//! the real gRPC API slower than that (it sleeps 1 ms every 100 flows). Printed: the cost
//! of `offer` (what the datapath reader pays per event), events lost at the queue, flows
//! enriched per second, what the slow follower received and was told it missed, and the
//! process's resident memory before, during and after (it must stay bounded: the ring and
//! the queue are fixed-size). Counts are asserted (every offered event is either enriched
//! or counted lost), since they measure the intended path.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tendril_crds::v1alpha1::{Endpoint, EndpointSpec, Identity, IdentitySpec};
use tendril_datapath::bpf::maps::Direction;
use tendril_datapath::bpf::policy::{
    EventKind, EventVerdict, PolicyEvent, PolicyMatch, monotonic_now_ns,
};
use tendril_datapath::flows::enrich::Directory;
use tendril_datapath::flows::metrics::FlowMetrics;
use tendril_datapath::flows::observer::{AgentObserver, serve};
use tendril_datapath::flows::pipeline::{DirectoryHandle, enrich, queue};
use tendril_datapath::flows::proto::observer::GetFlowsRequest;
use tendril_datapath::flows::proto::observer::get_flows_response::ResponseTypes;
use tendril_datapath::flows::proto::observer::observer_client::ObserverClient;
use tendril_datapath::flows::ring::FlowRing;
use tokio_util::sync::CancellationToken;

const RATE: u64 = 100_000;
const SECONDS: u64 = 5;
const RING: usize = 16_384;
const QUEUE: usize = 4096;
const PODS: u32 = 1000;

fn rss_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / (1024.0 * 1024.0)
}

fn pod_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0ac8_0000 + i)
}

fn directory() -> Directory {
    let endpoints: Vec<Arc<Endpoint>> = (0..PODS)
        .map(|i| {
            let mut ep = Endpoint::new(
                &format!("pod-{i}"),
                EndpointSpec {
                    node: "n1".into(),
                    ips: vec![pod_ip(i).to_string()],
                    security_labels: BTreeMap::from([
                        ("k8s:app".into(), format!("app-{}", i % 50)),
                        (
                            "k8s:io.kubernetes.pod.namespace".into(),
                            format!("ns-{}", i % 10),
                        ),
                    ]),
                    identity: Some(256 + i64::from(i % 50)),
                    ..EndpointSpec::default()
                },
            );
            ep.metadata.namespace = Some(format!("ns-{}", i % 10));
            Arc::new(ep)
        })
        .collect();
    let identities: Vec<Identity> = (0..50)
        .map(|i| {
            Identity::new(
                &(256 + i).to_string(),
                IdentitySpec {
                    id: 256 + i,
                    security_labels: BTreeMap::from([("k8s:app".into(), format!("app-{i}"))]),
                },
            )
        })
        .collect();
    Directory::build(endpoints.iter(), identities.iter())
}

fn event(n: u64) -> PolicyEvent {
    let drop = n.is_multiple_of(10);
    PolicyEvent {
        ts_ns: monotonic_now_ns(),
        kind: if drop {
            EventKind::Drop
        } else {
            EventKind::PolicyVerdict
        },
        reason: None,
        raw_reason: if drop { 133 } else { 0 },
        direction: Some(Direction::Ingress),
        protocol: 6,
        verdict: Some(if drop {
            EventVerdict::Deny
        } else {
            EventVerdict::Allow
        }),
        matched: PolicyMatch::L4,
        endpoint_id: 1,
        src_identity: 256 + (n % 50) as u32,
        dst_identity: 257,
        saddr: pod_ip((n % u64::from(PODS)) as u32).into(),
        daddr: pod_ip(((n + 7) % u64::from(PODS)) as u32).into(),
        sport: (n % 60000) as u16 + 1024,
        dport: 8080,
        ifindex: 4,
        tcp_flags: 0x02,
        icmp_type: 0,
        icmp_code: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_pipeline_under_synthetic_load() {
    let rss_start = rss_mib();
    let metrics = FlowMetrics::unregistered();
    let ring = FlowRing::new(RING);
    let (sink, q) = queue(QUEUE, metrics.clone());
    let dir = DirectoryHandle::default();
    dir.set(directory());
    let shutdown = CancellationToken::new();
    let enricher = tokio::spawn(enrich(
        q,
        ring.clone(),
        dir,
        "n1".into(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let observer = AgentObserver::new(ring.clone(), "n1".into(), metrics.clone());
    let (addr, server) = serve("127.0.0.1:0".parse().unwrap(), observer, shutdown.clone())
        .await
        .unwrap();
    tokio::spawn(server);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ObserverClient::new(channel);
    let mut stream = client
        .get_flows(GetFlowsRequest {
            follow: true,
            ..GetFlowsRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let received = std::sync::Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let follower = {
        let received = received.clone();
        tokio::spawn(async move {
            let mut flows = 0u64;
            while let Ok(Some(resp)) = stream.message().await {
                match resp.response_types {
                    Some(ResponseTypes::Flow(_)) => {
                        flows += 1;
                        received[0].fetch_add(1, Ordering::Relaxed);
                        if flows.is_multiple_of(100) {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                    Some(ResponseTypes::LostEvents(l)) => {
                        received[1].fetch_add(l.num_events_lost, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        })
    };

    // 100k events/s: 1,000 every 10 ms, on a blocking thread like the ring-buffer reader.
    let producer = {
        let sink = sink.clone();
        tokio::task::spawn_blocking(move || {
            let (mut offered, mut offer_ns) = (0u64, 0u128);
            let start = Instant::now();
            let mut rss_peak = 0f64;
            for tick in 0..(SECONDS * 100) {
                let t = Instant::now();
                for _ in 0..(RATE / 100) {
                    sink.offer(event(offered));
                    offered += 1;
                }
                offer_ns += t.elapsed().as_nanos();
                if tick % 50 == 0 {
                    rss_peak = rss_peak.max(rss_mib());
                }
                let next = start + Duration::from_millis(10 * (tick + 1));
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            (offered, offer_ns, start.elapsed(), rss_peak)
        })
    };
    let (offered, offer_ns, elapsed, rss_peak) = producer.await.unwrap();
    // Let the enricher drain (and the follower read what it can), then stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_end = rss_mib();
    let lost = sink.lost();
    let (_, seen) = ring.counts();
    shutdown.cancel();
    drop(sink);
    let _ = enricher.await;
    let (followed, missed) = (
        received[0].load(Ordering::Relaxed),
        received[1].load(Ordering::Relaxed),
    );
    follower.abort();

    println!(
        "flow pipeline, {RATE} events/s offered for {SECONDS} s (ring {RING}, queue {QUEUE}, {PODS} pods):"
    );
    println!(
        "  offered            {offered} in {:.2} s",
        elapsed.as_secs_f64()
    );
    println!(
        "  offer() cost       {:.0} ns/event (what the datapath reader pays)",
        offer_ns as f64 / offered as f64
    );
    println!(
        "  enriched into ring {seen} ({:.0} flows/s)",
        seen as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  lost at the queue  {lost} ({:.2}%), counted",
        100.0 * lost as f64 / offered as f64
    );
    println!("  slow follower      received {followed}, told it missed {missed}");
    println!(
        "  RSS                start {rss_start:.1} MiB, peak {rss_peak:.1} MiB, end {rss_end:.1} MiB"
    );
    assert_eq!(
        seen + lost,
        offered,
        "every event is enriched or counted lost"
    );
    assert!(ring.counts().0 as usize <= RING);
}
