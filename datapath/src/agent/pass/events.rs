//! The datapath's events (`events` ring buffer: policy verdicts of new connections and
//! drops) → `tendril_policy_verdicts_total`, a bounded log of recent flows served at
//! `GET /flows`, and rate-limited info logs of denied flows. Also the periodic conntrack
//! garbage collection.
//!
//! Drops by reason are counted by the programs in the `metrics` map
//! (`tendril_datapath_drops_total`); events only add the detail of each flow.

use super::metrics::DatapathMetrics;
use crate::bpf::Dataplane;
use crate::bpf::maps::Direction;
use crate::bpf::policy::{EventKind, EventVerdict, PolicyEvent, monotonic_now_ns};
use serde::Serialize;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

/// One event, decoded for people and metrics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Flow {
    /// RFC 3339, UTC.
    pub time: String,
    /// `policy-verdict` (a new or re-judged connection passed) or `drop`.
    pub kind: &'static str,
    /// `allow`, `deny`, `audit`, or empty (a drop not about policy).
    pub verdict: &'static str,
    /// What decided: `none` (no policy), `l3`, `l4`, `default`, `conntrack`.
    #[serde(rename = "match")]
    pub matched: &'static str,
    /// Drop reason (`policy_denied`, `policy_deny_rule`, …), empty for verdicts.
    pub reason: String,
    pub direction: &'static str,
    pub protocol: String,
    pub source: String,
    pub destination: String,
    pub source_identity: u32,
    pub destination_identity: u32,
    pub endpoint_id: u16,
    pub ifindex: u32,
}

fn protocol_name(raw: u8) -> String {
    match raw {
        1 => "ICMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        58 => "ICMPv6".into(),
        other => other.to_string(),
    }
}

fn address(ip: IpAddr, port: u16, proto: u8) -> String {
    if matches!(proto, 6 | 17 | 132) {
        SocketAddr::new(ip, port).to_string()
    } else {
        ip.to_string()
    }
}

/// Decodes one ring buffer record; `None` if it is too short or of an unknown kind.
/// `wall_of` turns the event's monotonic timestamp into wall-clock time.
pub fn decode(bytes: &[u8], wall_of: impl Fn(u64) -> String) -> Option<Flow> {
    let event = PolicyEvent::from_bytes(bytes)?;
    let reason = match event.kind {
        EventKind::Drop => event.reason.map_or_else(
            || format!("unknown_{}", event.raw_reason),
            |r| r.as_str().into(),
        ),
        EventKind::PolicyVerdict => String::new(),
    };
    Some(Flow {
        time: wall_of(event.ts_ns),
        kind: match event.kind {
            EventKind::Drop => "drop",
            EventKind::PolicyVerdict => "policy-verdict",
        },
        verdict: event.verdict.map_or("", EventVerdict::as_str),
        matched: event.matched.as_str(),
        reason,
        direction: event.direction.map_or("unknown", Direction::as_str),
        protocol: protocol_name(event.protocol),
        source: address(event.saddr, event.sport, event.protocol),
        destination: address(event.daddr, event.dport, event.protocol),
        source_identity: event.src_identity,
        destination_identity: event.dst_identity,
        endpoint_id: event.endpoint_id,
        ifindex: event.ifindex,
    })
}

fn wall_clock(ts_ns: u64) -> String {
    let age = monotonic_now_ns().saturating_sub(ts_ns);
    let now = k8s_openapi::jiff::Timestamp::now();
    let at = now
        .checked_sub(k8s_openapi::jiff::SignedDuration::from_nanos(
            i64::try_from(age).unwrap_or(i64::MAX),
        ))
        .unwrap_or(now);
    at.to_string()
}

/// The last flows, oldest first, bounded; shared with the HTTP route.
#[derive(Clone, Debug)]
pub struct FlowLog {
    flows: Arc<Mutex<VecDeque<Flow>>>,
    capacity: usize,
}

impl FlowLog {
    pub fn new(capacity: usize) -> Self {
        Self {
            flows: Arc::new(Mutex::new(VecDeque::with_capacity(capacity.min(65_536)))),
            capacity,
        }
    }

    pub fn push(&self, flow: Flow) {
        if self.capacity == 0 {
            return;
        }
        let mut flows = self.flows.lock().unwrap_or_else(|p| p.into_inner());
        while flows.len() >= self.capacity {
            flows.pop_front();
        }
        flows.push_back(flow);
    }

    /// The newest `limit` flows (all if `None`), oldest first.
    pub fn recent(&self, limit: Option<usize>) -> Vec<Flow> {
        let flows = self.flows.lock().unwrap_or_else(|p| p.into_inner());
        let skip = limit.map_or(0, |l| flows.len().saturating_sub(l));
        flows.iter().skip(skip).cloned().collect()
    }
}

/// `limit=N` of a query string.
fn limit_of(query: Option<&str>) -> Option<usize> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("limit="))
        .and_then(|n| n.parse().ok())
}

/// `GET /flows[?limit=N]`: the recent flows as a JSON array, oldest first.
pub fn router(log: FlowLog) -> axum::Router {
    use axum::extract::State;
    axum::Router::new()
        .route(
            "/flows",
            axum::routing::get(
                |State(log): State<FlowLog>, uri: axum::http::Uri| async move {
                    axum::Json(log.recent(limit_of(uri.query())))
                },
            ),
        )
        .with_state(log)
}

/// At most `per_second` passes per second (a token bucket of one second's worth).
#[derive(Debug)]
pub struct RateLimit {
    per_second: u32,
    window: Instant,
    used: u32,
    pub suppressed: u64,
}

impl RateLimit {
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second,
            window: Instant::now(),
            used: 0,
            suppressed: 0,
        }
    }

    pub fn allow(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.used = 0;
        }
        if self.used < self.per_second {
            self.used += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// Accounts one decoded flow: metrics, the flow log, the denied-flow log line.
pub fn record(flow: Flow, metrics: &DatapathMetrics, log: &FlowLog, limit: &mut RateLimit) {
    // Policy drops carry their verdict (deny); passes are verdict events (allow, audit).
    if !flow.verdict.is_empty() {
        metrics.observe_verdict(flow.direction, flow.verdict, flow.matched);
    }
    if flow.verdict == "deny" && limit.allow(Instant::now()) {
        tracing::info!(
            direction = flow.direction,
            protocol = %flow.protocol,
            source = %flow.source,
            destination = %flow.destination,
            source_identity = flow.source_identity,
            destination_identity = flow.destination_identity,
            matched = flow.matched,
            reason = %flow.reason,
            suppressed = limit.suppressed,
            "policy denied a flow"
        );
    }
    log.push(flow);
}

/// Reads the `events` ring buffer until `shutdown`.
pub async fn run(
    dataplane: Arc<Mutex<Dataplane>>,
    metrics: DatapathMetrics,
    log: FlowLog,
    hubble: Option<crate::flows::pipeline::FlowSink>,
    denied_log_per_second: u32,
    shutdown: CancellationToken,
) {
    let ring = {
        let dp = dataplane.lock().unwrap_or_else(|p| p.into_inner());
        dp.open_events()
    };
    let ring = match ring.map_err(|e| e.to_string()).and_then(|r| {
        // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, for as long
        // as it lives, and the AsyncFd owns the RingBuf.
        unsafe { AsyncFd::register_with_interest(r, tokio::io::Interest::READABLE) }
            .map_err(|e| e.to_string())
    }) {
        Ok(ring) => ring,
        Err(e) => {
            tracing::warn!(error = %e, "policy events are not read (opening the ring buffer)");
            return;
        }
    };
    let mut ring = ring;
    let mut limit = RateLimit::new(denied_log_per_second);
    loop {
        let mut guard = tokio::select! {
            _ = shutdown.cancelled() => return,
            ready = ring.readable_mut() => match ready {
                Ok(guard) => guard,
                Err(e) => {
                    tracing::warn!(error = %e, "policy events: polling the ring buffer");
                    return;
                }
            },
        };
        let ring_buf = guard.get_inner_mut();
        while let Some(item) = ring_buf.next() {
            // Hubble flows (crate::flows): queued without waiting, enriched elsewhere.
            if let Some(sink) = &hubble
                && let Some(event) = PolicyEvent::from_bytes(&item)
            {
                sink.offer(event);
            }
            if let Some(flow) = decode(&item, wall_clock) {
                record(flow, &metrics, &log, &mut limit);
            }
        }
        guard.clear_ready();
    }
}

/// Removes expired conntrack entries every `every` until `shutdown`.
pub async fn conntrack_gc(
    dataplane: Arc<Mutex<Dataplane>>,
    metrics: DatapathMetrics,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let dp = dataplane.clone();
        let removed = tokio::task::spawn_blocking(move || {
            let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
            dp.conntrack_gc(monotonic_now_ns())
        })
        .await;
        match removed {
            Ok(Ok(n)) => {
                metrics.conntrack_gc_removed.inc_by(n as u64);
                tracing::debug!(removed = n, "conntrack garbage collected");
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "conntrack garbage collection"),
            Err(e) => tracing::warn!(error = %e, "conntrack garbage collection task"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::maps::RawPolicyEvent;

    const EVENT_DROP: u8 = 1;
    const EVENT_POLICY_VERDICT: u8 = 2;

    fn raw(kind: u8, verdict: u8, reason: u8) -> Vec<u8> {
        let event = RawPolicyEvent {
            ts_ns: 5,
            kind,
            reason,
            dir: 1,
            proto: 6,
            verdict,
            matched: 2,
            endpoint_id: 7,
            src_identity: 300,
            dst_identity: 301,
            saddr: [10, 0, 0, 1],
            daddr: [10, 0, 0, 2],
            sport: 40000,
            dport: 80,
            ifindex: 9,
            ..RawPolicyEvent::default()
        };
        // SAFETY: plain data viewed as its bytes.
        unsafe {
            std::slice::from_raw_parts(
                (&event as *const RawPolicyEvent).cast::<u8>(),
                std::mem::size_of::<RawPolicyEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn events_decode_into_flows() {
        let flow = decode(&raw(EVENT_POLICY_VERDICT, 2, 0), |ns| ns.to_string()).unwrap();
        assert_eq!(flow.kind, "policy-verdict");
        assert_eq!(flow.verdict, "deny");
        assert_eq!(flow.matched, "l4");
        assert_eq!(flow.direction, "ingress");
        assert_eq!(flow.source, "10.0.0.1:40000");
        assert_eq!(flow.destination, "10.0.0.2:80");
        assert_eq!(flow.protocol, "TCP");
        assert_eq!(flow.time, "5");
        let drop = decode(&raw(EVENT_DROP, 2, 139), |_| String::new()).unwrap();
        assert_eq!(drop.reason, "policy_deny_rule");
        assert_eq!((drop.kind, drop.verdict), ("drop", "deny"));
        let other = decode(&raw(EVENT_DROP, 0, 131), |_| String::new()).unwrap();
        assert_eq!(
            (other.reason.as_str(), other.verdict),
            ("invalid_packet", "")
        );
        assert!(decode(&raw(9, 0, 0), |_| String::new()).is_none());
        assert!(decode(&raw(EVENT_DROP, 0, 139)[..10], |_| String::new()).is_none());
    }

    #[test]
    fn the_flow_log_keeps_the_newest() {
        let log = FlowLog::new(3);
        for i in 0..5u16 {
            let mut flow = decode(&raw(EVENT_DROP, 0, 133), |_| String::new()).unwrap();
            flow.endpoint_id = i;
            log.push(flow);
        }
        let ids: Vec<u16> = log.recent(None).iter().map(|f| f.endpoint_id).collect();
        assert_eq!(ids, vec![2, 3, 4]);
        let ids: Vec<u16> = log.recent(Some(1)).iter().map(|f| f.endpoint_id).collect();
        assert_eq!(ids, vec![4]);
        assert!(FlowLog::new(0).recent(None).is_empty());
        assert_eq!(limit_of(Some("a=1&limit=20")), Some(20));
        assert_eq!(limit_of(Some("limit=x")), None);
        assert_eq!(limit_of(None), None);
    }

    #[tokio::test]
    async fn flows_are_served_as_json() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let log = FlowLog::new(8);
        for port in [80u16, 81] {
            let mut flow = decode(&raw(EVENT_POLICY_VERDICT, 1, 0), |_| "t".into()).unwrap();
            flow.destination = format!("10.0.0.2:{port}");
            log.push(flow);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(axum::serve(listener, router(log)).into_future());
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /flows?limit=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        server.abort();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let flows: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(flows.as_array().unwrap().len(), 1);
        assert_eq!(flows[0]["destination"], "10.0.0.2:81");
        assert_eq!(flows[0]["match"], "l4");
        assert_eq!(flows[0]["verdict"], "allow");
        assert_eq!(flows[0]["sourceIdentity"], 300);
    }

    #[test]
    fn the_rate_limit_resets_every_second() {
        let mut limit = RateLimit::new(2);
        let start = Instant::now();
        assert!(limit.allow(start) && limit.allow(start));
        assert!(!limit.allow(start));
        assert_eq!(limit.suppressed, 1);
        assert!(limit.allow(start + Duration::from_secs(1)));
    }
}
