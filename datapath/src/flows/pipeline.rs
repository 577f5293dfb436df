//! From the datapath's event reader to the ring. The reader hands each decoded event to a
//! [`FlowSink`], a bounded queue it never waits on: when the enricher falls behind, the
//! event is lost and counted (`tendril_flows_lost_total{source="events_queue"}`, and a
//! `LostEvent` in the ring that GetFlows followers receive), and the datapath reader goes
//! on. [`enrich`] turns queued events into flows in the ring.

use super::enrich::{Directory, flow_of};
use super::metrics::{DropLabels, FlowMetrics, LostLabels, ProcessedLabels};
use super::proto::flow::{DropReason, LostEventSource, Verdict, layer4};
use super::ring::{Entry, FlowRing};
use super::timestamp;
use crate::agent::view::{ClusterView, Wake, wake_on};
use crate::bpf::policy::{EventKind, PolicyEvent, monotonic_now_ns};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
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

/// The current [`Directory`], swapped whole when the caches change.
#[derive(Clone, Debug, Default)]
pub struct DirectoryHandle(Arc<RwLock<Arc<Directory>>>);

impl DirectoryHandle {
    pub fn get(&self) -> Arc<Directory> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, dir: Directory) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(dir);
    }

    /// Rebuilds from the agent's Endpoint, Identity and ResolvedPolicy caches on every
    /// change (at most every 200 ms) until `shutdown`.
    pub async fn follow(self, view: ClusterView, shutdown: CancellationToken) {
        let wake = Wake::default();
        wake_on(&view.endpoints, &wake, |_| true);
        wake_on(&view.identities, &wake, |_| true);
        wake_on(&view.resolved_policies, &wake, |_| true);
        loop {
            let (endpoints, identities, policies) = (
                view.endpoints.store().state(),
                view.identities.store().state(),
                view.resolved_policies.store().state(),
            );
            self.set(
                Directory::build(
                    endpoints.iter().map(|e| e.as_ref()),
                    identities.iter().map(|i| i.as_ref()),
                )
                .with_policies(policies.iter().map(|p| p.as_ref())),
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

/// Enriches queued events into `ring` until the queue closes or `shutdown`.
pub async fn enrich(
    mut queue: FlowQueue,
    ring: FlowRing,
    directory: DirectoryHandle,
    node_name: String,
    metrics: FlowMetrics,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(256);
    let mut reported_lost = 0u64;
    loop {
        batch.clear();
        let n = tokio::select! {
            _ = shutdown.cancelled() => return,
            n = queue.rx.recv_many(&mut batch, 256) => n,
        };
        if n == 0 {
            return;
        }
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
        for event in &batch {
            let time = timestamp(wall_time(event.ts_ns, now_wall, now_mono));
            let flow = flow_of(event, &dir, &node_name, time, uuid());
            count(&metrics, event, &flow);
            ring.push(Entry::Flow(Arc::new(flow)));
        }
        metrics.ring_flows.set(ring.counts().0 as i64);
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
}
