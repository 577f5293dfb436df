//! From the datapath's event reader to the ring. The reader hands each decoded event to a
//! [`FlowSink`], a bounded queue it never waits on: when the enricher falls behind, the
//! event is lost and counted (`tendril_flows_lost_total{source="events_queue"}`, and a
//! `LostEvent` in the ring that GetFlows followers receive), and the datapath reader goes
//! on. [`enrich`] turns queued events into flows in the ring.
//!
//! A new pod sends before the agent has learned its Endpoint (the Endpoint is written once
//! the pod has its IP, then reaches every agent's cache): a flow naming a pod the
//! [`Directory`] does not know yet ([`Directory::lacks_pod_of`]) waits for it, at most
//! [`HOLD`] and with at most [`HOLD_MAX`] flows waiting, and the flows after it wait in
//! line, so the ring stays in event order. The enricher keeps draining the queue while
//! flows wait: the reader is never held up.

use super::enrich::{Directory, flow_of};
use super::metrics::{DropLabels, FlowMetrics, LostLabels, ProcessedLabels};
use super::proto::flow::{DropReason, LostEventSource, Verdict, layer4};
use super::ring::{Entry, FlowRing};
use super::timestamp;
use crate::agent::view::{ClusterView, Wake, wake_on, wake_on_generation};
use crate::bpf::policy::{EventKind, PolicyEvent, monotonic_now_ns};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The reader's end: [`FlowSink::offer`] never blocks.
#[derive(Clone, Debug)]
pub struct FlowSink {
    tx: mpsc::Sender<PolicyEvent>,
    lost: Arc<AtomicU64>,
    metrics: FlowMetrics,
}

/// The enricher's end.
#[derive(Debug)]
pub struct FlowQueue {
    rx: mpsc::Receiver<PolicyEvent>,
    lost: Arc<AtomicU64>,
}

/// A queue of `capacity` events between the reader and the enricher.
pub fn queue(capacity: usize, metrics: FlowMetrics) -> (FlowSink, FlowQueue) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let lost = Arc::new(AtomicU64::new(0));
    (
        FlowSink {
            tx,
            lost: lost.clone(),
            metrics,
        },
        FlowQueue { rx, lost },
    )
}

impl FlowSink {
    /// Queues `event`; when the queue is full the event is lost and counted.
    pub fn offer(&self, event: PolicyEvent) {
        if self.tx.try_send(event).is_err() {
            self.lost.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .lost
                .get_or_create(&LostLabels {
                    source: "events_queue".into(),
                })
                .inc();
        }
    }

    /// Events lost so far.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

/// How long a flow naming a pod the directory does not know yet waits for its Endpoint.
pub const HOLD: Duration = Duration::from_secs(1);
/// Flows waiting at most (those and the ones behind them); beyond, the oldest goes unnamed.
pub const HOLD_MAX: usize = 1024;

/// The current [`Directory`], swapped whole when the caches change; the enricher is told.
#[derive(Clone, Debug)]
pub struct DirectoryHandle(Arc<watch::Sender<Arc<Directory>>>);

impl Default for DirectoryHandle {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(Arc::default())))
    }
}

impl DirectoryHandle {
    pub fn get(&self) -> Arc<Directory> {
        self.0.borrow().clone()
    }

    pub fn set(&self, dir: Directory) {
        self.0.send_replace(Arc::new(dir));
    }

    /// Notified on every [`DirectoryHandle::set`].
    pub fn subscribe(&self) -> watch::Receiver<Arc<Directory>> {
        self.0.subscribe()
    }

    /// Rebuilds from the agent's Endpoint, Identity, ResolvedPolicy and NodeNetwork caches
    /// on every change (at most every 200 ms) until `shutdown`.
    pub async fn follow(self, view: ClusterView, shutdown: CancellationToken) {
        let wake = Wake::default();
        // The spec only: every agent's status reports would otherwise rebuild it.
        wake_on_generation(&view.endpoints, &wake);
        wake_on(&view.identities, &wake, |_| true);
        wake_on(&view.resolved_policies, &wake, |_| true);
        wake_on(&view.node_networks, &wake, |_| true);
        loop {
            let (endpoints, identities, policies, nodes) = (
                view.endpoints.store().state(),
                view.identities.store().state(),
                view.resolved_policies.store().state(),
                view.node_networks.store().state(),
            );
            self.set(
                Directory::build(endpoints.iter(), identities.iter().map(|i| i.as_ref()))
                    .with_policies(policies.iter().map(|p| p.as_ref()))
                    .with_pod_cidrs(nodes.iter().flat_map(|n| n.spec.pod_cidrs.iter())),
            );
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = wake.notified() => {}
            }
            wake.take_since();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A random version-4 UUID (flow ids).
fn uuid() -> String {
    let v: u128 = rand::random();
    let v = (v & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let hex = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The wall-clock time of a `bpf_ktime_get_ns()` timestamp, given a (wall, monotonic)
/// pair read together.
fn wall_time(ts_ns: u64, now_wall: SystemTime, now_mono_ns: u64) -> SystemTime {
    now_wall
        .checked_sub(Duration::from_nanos(now_mono_ns.saturating_sub(ts_ns)))
        .unwrap_or(now_wall)
}

/// Accounts one flow in the metrics.
fn count(metrics: &FlowMetrics, event: &PolicyEvent, flow: &super::proto::flow::Flow) {
    let namespace = |ep: &Option<super::proto::flow::Endpoint>| {
        if metrics.namespace_context {
            ep.as_ref().map(|e| e.namespace.clone()).unwrap_or_default()
        } else {
            String::new()
        }
    };
    let (source_namespace, destination_namespace) =
        (namespace(&flow.source), namespace(&flow.destination));
    let verdict = Verdict::try_from(flow.verdict).unwrap_or(Verdict::Unknown);
    metrics
        .processed
        .get_or_create(&ProcessedLabels {
            r#type: "L3_L4".into(),
            subtype: match event.kind {
                EventKind::Drop => "drop".into(),
                EventKind::PolicyVerdict => "policy-verdict".into(),
            },
            verdict: verdict.as_str_name().into(),
            source_namespace: source_namespace.clone(),
            destination_namespace: destination_namespace.clone(),
        })
        .inc();
    if verdict == Verdict::Dropped {
        let protocol = match flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
            Some(layer4::Protocol::Tcp(_)) => "TCP",
            Some(layer4::Protocol::Udp(_)) => "UDP",
            Some(layer4::Protocol::Sctp(_)) => "SCTP",
            Some(layer4::Protocol::IcmPv4(_)) => "ICMPv4",
            _ => "",
        };
        metrics
            .drops
            .get_or_create(&DropLabels {
                reason: DropReason::try_from(flow.drop_reason_desc)
                    .unwrap_or(DropReason::Unknown)
                    .as_str_name()
                    .into(),
                protocol: protocol.into(),
                source_namespace,
                destination_namespace,
            })
            .inc();
    }
}

/// A flow waiting for its pod's Endpoint (see the module's comment).
struct Held {
    until: Instant,
    event: PolicyEvent,
    time: prost_types::Timestamp,
}

/// Enriches queued events into `ring` until the queue closes or `shutdown`.
pub async fn enrich(
    queue: FlowQueue,
    ring: FlowRing,
    directory: DirectoryHandle,
    node_name: String,
    metrics: FlowMetrics,
    shutdown: CancellationToken,
) {
    enrich_holding(queue, ring, directory, node_name, metrics, shutdown, HOLD).await;
}

async fn enrich_holding(
    mut queue: FlowQueue,
    ring: FlowRing,
    directory: DirectoryHandle,
    node_name: String,
    metrics: FlowMetrics,
    shutdown: CancellationToken,
    hold: Duration,
) {
    let mut batch = Vec::with_capacity(256);
    let mut held: VecDeque<Held> = VecDeque::new();
    let mut directory_changed = directory.subscribe();
    let mut reported_lost = 0u64;
    let emit = |event: &PolicyEvent, time, dir: &Directory| {
        let flow = flow_of(event, dir, &node_name, time, uuid());
        count(&metrics, event, &flow);
        ring.push(Entry::Flow(Arc::new(flow)));
    };
    loop {
        batch.clear();
        let next_release = held.front().map(|h| h.until);
        let closed = tokio::select! {
            _ = shutdown.cancelled() => return,
            n = queue.rx.recv_many(&mut batch, 256) => n == 0,
            _ = directory_changed.changed(), if !held.is_empty() => false,
            _ = tokio::time::sleep_until(next_release.unwrap_or_else(Instant::now)),
                if next_release.is_some() => false,
        };
        let (now_wall, now_mono) = (SystemTime::now(), monotonic_now_ns());
        let lost = queue.lost.load(Ordering::Relaxed);
        if lost > reported_lost {
            let at = timestamp(now_wall);
            ring.push_lost(
                LostEventSource::ObserverEventsQueue,
                lost - reported_lost,
                at,
                at,
            );
            reported_lost = lost;
        }
        let dir = directory.get();
        let now = Instant::now();
        for event in batch.drain(..) {
            let time = timestamp(wall_time(event.ts_ns, now_wall, now_mono));
            if held.is_empty() && !dir.lacks_pod_of(&event) {
                emit(&event, time, &dir);
            } else {
                held.push_back(Held {
                    until: now + hold,
                    event,
                    time,
                });
            }
        }
        // In order: the first waiting flow goes once its pod is known, its time is up, the
        // line is too long, or nothing more will come.
        while let Some(head) = held.front() {
            let release = closed
                || held.len() > HOLD_MAX
                || head.until <= now
                || !dir.lacks_pod_of(&head.event);
            if !release {
                break;
            }
            let head = held.pop_front().expect("a front");
            emit(&head.event, head.time, &dir);
        }
        metrics.ring_flows.set(ring.counts().0 as i64);
        if closed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::maps::Direction;
    use crate::bpf::policy::{EventVerdict, PolicyMatch};
    use std::net::IpAddr;

    fn event(n: u16) -> PolicyEvent {
        PolicyEvent {
            ts_ns: monotonic_now_ns(),
            kind: EventKind::PolicyVerdict,
            reason: None,
            raw_reason: 0,
            direction: Some(Direction::Egress),
            protocol: 17,
            verdict: Some(EventVerdict::Allow),
            matched: PolicyMatch::L3,
            endpoint_id: 1,
            src_identity: 256,
            dst_identity: 257,
            saddr: IpAddr::from([10, 0, 0, 1]),
            daddr: IpAddr::from([10, 0, 0, 2]),
            sport: n,
            dport: 53,
            ifindex: 3,
            tcp_flags: 0,
            icmp_type: 0,
            icmp_code: 0,
        }
    }

    #[test]
    fn namespace_labels_only_with_the_context_option() {
        use super::super::proto::flow::Endpoint;
        let flow = |ns: &str| super::super::proto::flow::Flow {
            verdict: Verdict::Dropped as i32,
            drop_reason_desc: DropReason::PolicyDenied as i32,
            source: Some(Endpoint {
                namespace: ns.into(),
                ..Endpoint::default()
            }),
            destination: Some(Endpoint {
                namespace: "web".into(),
                ..Endpoint::default()
            }),
            ..super::super::proto::flow::Flow::default()
        };
        let drops = |m: &FlowMetrics, src: &str, dst: &str| {
            m.drops
                .get_or_create(&DropLabels {
                    reason: "POLICY_DENIED".into(),
                    protocol: String::new(),
                    source_namespace: src.into(),
                    destination_namespace: dst.into(),
                })
                .get()
        };
        let off = FlowMetrics::unregistered();
        count(&off, &event(1), &flow("a"));
        count(&off, &event(2), &flow("b"));
        assert_eq!(drops(&off, "", ""), 2, "one series without the context");
        let on = FlowMetrics::unregistered().with_namespace_context(true);
        count(&on, &event(1), &flow("a"));
        count(&on, &event(2), &flow("b"));
        assert_eq!((drops(&on, "a", "web"), drops(&on, "b", "web")), (1, 1));
    }

    #[tokio::test]
    async fn a_full_queue_loses_and_counts_and_the_ring_reports_it() {
        let metrics = FlowMetrics::unregistered();
        let (sink, queue) = super::queue(2, metrics.clone());
        for n in 0..5 {
            sink.offer(event(n));
        }
        assert_eq!(sink.lost(), 3, "the reader never waits: 3 of 5 did not fit");
        let ring = FlowRing::new(16);
        drop(sink);
        enrich(
            queue,
            ring.clone(),
            DirectoryHandle::default(),
            "n1".into(),
            metrics.clone(),
            CancellationToken::new(),
        )
        .await;
        let (entries, _) = ring.snapshot();
        assert!(matches!(&entries[0], Entry::Lost(l) if l.num_events_lost == 3));
        assert_eq!(ring.counts(), (2, 2));
        let Entry::Flow(flow) = &entries[1] else {
            panic!()
        };
        assert_eq!(flow.node_name, "n1");
        assert_eq!(flow.uuid.len(), 36);
        let age = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            - flow.time.unwrap().seconds;
        assert!(
            (0..5).contains(&age),
            "wall-clock time of the event: {age}s ago"
        );
        let processed = metrics.processed.get_or_create(&ProcessedLabels {
            r#type: "L3_L4".into(),
            subtype: "policy-verdict".into(),
            verdict: "FORWARDED".into(),
            source_namespace: String::new(),
            destination_namespace: String::new(),
        });
        assert_eq!(processed.get(), 2);
    }

    #[tokio::test]
    async fn a_flow_of_a_pod_not_known_yet_waits_for_its_endpoint_in_order() {
        use crate::flows::proto::flow::Flow;
        use tendril_crds::v1alpha1::{Endpoint as EndpointObject, EndpointSpec};
        let metrics = FlowMetrics::unregistered();
        let (sink, queue) = super::queue(16, metrics.clone());
        let ring = FlowRing::new(16);
        let directory = DirectoryHandle::default();
        let task = tokio::spawn(enrich_holding(
            queue,
            ring.clone(),
            directory.clone(),
            "n1".into(),
            metrics,
            CancellationToken::new(),
            Duration::from_millis(800),
        ));
        let flows = |ring: &FlowRing| -> Vec<Arc<Flow>> {
            ring.snapshot()
                .0
                .into_iter()
                .filter_map(|e| match e {
                    Entry::Flow(f) => Some(f),
                    Entry::Lost(_) => None,
                })
                .collect()
        };
        // Pod 10.0.0.1 (identity 256) is new; a flow from the world follows it.
        let mut from_world = event(2);
        from_world.src_identity = 2;
        from_world.saddr = IpAddr::from([192, 0, 2, 1]);
        from_world.dst_identity = 2;
        from_world.daddr = IpAddr::from([192, 0, 2, 2]);
        sink.offer(event(1));
        sink.offer(from_world);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(
            flows(&ring).is_empty(),
            "the new pod's flow waits, the next behind it"
        );
        let pod = |name: &str, ip: &str, identity: i64| {
            let mut ep = EndpointObject::new(
                name,
                EndpointSpec {
                    node: "n1".into(),
                    ips: vec![ip.into()],
                    identity: Some(identity),
                    ..EndpointSpec::default()
                },
            );
            ep.metadata.namespace = Some("demo".into());
            ep
        };
        let (a, b) = (pod("a", "10.0.0.1", 256), pod("b", "10.0.0.2", 257));
        directory.set(Directory::build([&Arc::new(a), &Arc::new(b)], []));
        tokio::time::sleep(Duration::from_millis(150)).await;
        let got = flows(&ring);
        assert_eq!(got.len(), 2, "released once the directory knows the pod");
        assert_eq!(got[0].source.as_ref().unwrap().pod_name, "a");
        assert_eq!(got[0].destination.as_ref().unwrap().pod_name, "b");
        assert_eq!(got[1].ip.as_ref().unwrap().source, "192.0.2.1");
        // A pod that never shows up: its flow goes unnamed when its time is up.
        let mut stranger = event(3);
        stranger.saddr = IpAddr::from([10, 0, 0, 9]);
        sink.offer(stranger);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(flows(&ring).len(), 2, "still waiting");
        tokio::time::sleep(Duration::from_millis(800)).await;
        let got = flows(&ring);
        assert_eq!(got.len(), 3, "released unnamed after the hold");
        assert_eq!(got[2].source.as_ref().unwrap().pod_name, "");
        drop(sink);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn the_line_of_waiting_flows_is_bounded() {
        let metrics = FlowMetrics::unregistered();
        let (sink, queue) = super::queue(HOLD_MAX + 8, metrics.clone());
        let ring = FlowRing::new(HOLD_MAX + 8);
        let task = tokio::spawn(enrich_holding(
            queue,
            ring.clone(),
            DirectoryHandle::default(),
            "n1".into(),
            metrics,
            CancellationToken::new(),
            Duration::from_secs(3600),
        ));
        for n in 0..(HOLD_MAX as u16 + 5) {
            sink.offer(event(n));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(ring.counts().0, 5, "the 5 oldest went out past the bound");
        drop(sink);
        task.await.unwrap();
        assert_eq!(
            ring.counts().0,
            HOLD_MAX as u64 + 5,
            "the rest when the queue closes"
        );
    }
}
