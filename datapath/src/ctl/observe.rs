//! `tendrilctl observe`: flows from an agent's or the relay's Observer API, with hubble's
//! main filters.

use serde_json::{Value, json};

use crate::flows::proto::flow::{self, Flow, FlowFilter};
use crate::flows::proto::observer::GetFlowsRequest;

/// The filters of `observe` (each one narrows; repeated values of one filter widen).
#[derive(Clone, Debug, Default)]
pub struct Filters {
    /// `NS/POD` or `POD` (in `namespace` or default), either side.
    pub pods: Vec<String>,
    /// Either side in this namespace.
    pub namespaces: Vec<String>,
    /// `FORWARDED`, `DROPPED`, `AUDIT`, ...
    pub verdicts: Vec<String>,
    /// Source or destination port.
    pub ports: Vec<u16>,
    pub protocols: Vec<String>,
    pub last: Option<u64>,
    pub follow: bool,
}

/// The request hubble would send for the same flags: the whitelist is an OR of filters,
/// one per combination of sides the pod/namespace and port filters match on.
pub fn request(f: &Filters) -> Result<GetFlowsRequest, String> {
    let mut base = FlowFilter::default();
    for v in &f.verdicts {
        let verdict = flow::Verdict::from_str_name(&v.to_ascii_uppercase())
            .ok_or_else(|| format!("unknown verdict {v:?} (FORWARDED, DROPPED, AUDIT, ...)"))?;
        base.verdict.push(verdict as i32);
    }
    base.protocol = f.protocols.iter().map(|p| p.to_ascii_lowercase()).collect();
    let mut pods: Vec<String> = f.pods.clone();
    pods.extend(f.namespaces.iter().map(|n| format!("{n}/")));
    let ports: Vec<String> = f.ports.iter().map(u16::to_string).collect();
    let mut filters = vec![base];
    either_side(
        &mut filters,
        &pods,
        |f| &mut f.source_pod,
        |f| &mut f.destination_pod,
    );
    either_side(
        &mut filters,
        &ports,
        |f| &mut f.source_port,
        |f| &mut f.destination_port,
    );
    let unfiltered = filters.len() == 1 && filters[0] == FlowFilter::default();
    Ok(GetFlowsRequest {
        number: f.last.unwrap_or(if f.follow { 0 } else { 20 }),
        follow: f.follow,
        whitelist: if unfiltered { Vec::new() } else { filters },
        ..Default::default()
    })
}

/// Each filter becomes two when `values` is set: one matching them on the source side, one
/// on the destination side (hubble's `--pod`, `--namespace`, `--port`).
fn either_side(
    filters: &mut Vec<FlowFilter>,
    values: &[String],
    source: fn(&mut FlowFilter) -> &mut Vec<String>,
    destination: fn(&mut FlowFilter) -> &mut Vec<String>,
) {
    if values.is_empty() {
        return;
    }
    *filters = std::mem::take(filters)
        .into_iter()
        .flat_map(|base| {
            let mut src = base.clone();
            *source(&mut src) = values.to_vec();
            let mut dst = base;
            *destination(&mut dst) = values.to_vec();
            [src, dst]
        })
        .collect();
}

fn endpoint_name(ep: Option<&flow::Endpoint>, ip: &str, port: Option<u32>) -> String {
    let base = match ep {
        Some(e) if !e.pod_name.is_empty() => format!("{}/{}", e.namespace, e.pod_name),
        Some(e) if e.labels.iter().any(|l| l.starts_with("reserved:")) => format!(
            "{ip} ({})",
            e.labels
                .iter()
                .find_map(|l| l.strip_prefix("reserved:"))
                .unwrap_or("")
        ),
        _ => ip.to_string(),
    };
    match port {
        Some(p) if p != 0 => format!("{base}:{p}"),
        _ => base,
    }
}

fn ports(f: &Flow) -> (Option<u32>, Option<u32>, String, Vec<&'static str>) {
    use flow::layer4::Protocol;
    match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(Protocol::Tcp(t)) => {
            let flags = t.flags.as_ref().map_or_else(Vec::new, |fl| {
                [
                    (fl.syn, "SYN"),
                    (fl.ack, "ACK"),
                    (fl.fin, "FIN"),
                    (fl.rst, "RST"),
                    (fl.psh, "PSH"),
                    (fl.urg, "URG"),
                    (fl.ece, "ECE"),
                    (fl.cwr, "CWR"),
                ]
                .into_iter()
                .filter(|(on, _)| *on)
                .map(|(_, n)| n)
                .collect()
            });
            (
                Some(t.source_port),
                Some(t.destination_port),
                "TCP".into(),
                flags,
            )
        }
        Some(Protocol::Udp(u)) => (
            Some(u.source_port),
            Some(u.destination_port),
            "UDP".into(),
            vec![],
        ),
        Some(Protocol::Sctp(s)) => (
            Some(s.source_port),
            Some(s.destination_port),
            "SCTP".into(),
            vec![],
        ),
        Some(Protocol::IcmPv4(i)) => (
            None,
            None,
            format!("ICMPv4 type {} code {}", i.r#type, i.code),
            vec![],
        ),
        Some(Protocol::IcmPv6(i)) => (
            None,
            None,
            format!("ICMPv6 type {} code {}", i.r#type, i.code),
            vec![],
        ),
        None => (None, None, String::new(), vec![]),
    }
}

fn verdict_name(f: &Flow) -> &'static str {
    flow::Verdict::try_from(f.verdict).map_or("UNKNOWN", |v| v.as_str_name())
}

fn time(f: &Flow) -> String {
    f.time
        .as_ref()
        .and_then(|t| k8s_openapi::jiff::Timestamp::new(t.seconds, t.nanos).ok())
        .map_or_else(|| "-".into(), |t| t.to_string())
}

/// One line per flow, like `hubble observe`'s compact output.
pub fn line(f: &Flow) -> String {
    let (src_ip, dst_ip) = f.ip.as_ref().map_or((String::new(), String::new()), |ip| {
        (ip.source.clone(), ip.destination.clone())
    });
    let (sport, dport, proto, flags) = ports(f);
    let mut out = format!(
        "{} {}: {} -> {} {} {}",
        time(f),
        f.node_name,
        endpoint_name(f.source.as_ref(), &src_ip, sport),
        endpoint_name(f.destination.as_ref(), &dst_ip, dport),
        proto,
        verdict_name(f),
    );
    if f.verdict == flow::Verdict::Dropped as i32 {
        let reason = flow::DropReason::try_from(f.drop_reason_desc).map_or_else(
            |_| f.drop_reason.to_string(),
            |r| r.as_str_name().to_string(),
        );
        out.push_str(&format!(" ({reason})"));
    }
    if !flags.is_empty() {
        out.push_str(&format!(" ({})", flags.join(", ")));
    }
    out
}

fn endpoint_json(e: Option<&flow::Endpoint>) -> Value {
    e.map_or(Value::Null, |e| {
        json!({
            "ID": e.id, "identity": e.identity, "namespace": e.namespace,
            "labels": e.labels, "pod_name": e.pod_name,
            "workloads": e.workloads.iter().map(|w| json!({"name": w.name, "kind": w.kind})).collect::<Vec<_>>(),
        })
    })
}

/// A flow as JSON, with the field names of hubble's `-o json`.
pub fn to_json(f: &Flow) -> Value {
    let (_, _, _, flags) = ports(f);
    use flow::layer4::Protocol;
    let ports_json = |sport: u32, dport: u32| {
        json!({"source_port": sport, "destination_port": dport,
               "flags": flags.iter().map(|f| (f.to_string(), Value::Bool(true))).collect::<serde_json::Map<_, _>>()})
    };
    let l4 = match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(Protocol::Tcp(t)) => json!({"TCP": ports_json(t.source_port, t.destination_port)}),
        Some(Protocol::Udp(u)) => json!({"UDP": ports_json(u.source_port, u.destination_port)}),
        Some(Protocol::Sctp(p)) => json!({"SCTP": ports_json(p.source_port, p.destination_port)}),
        Some(Protocol::IcmPv4(i)) => json!({"ICMPv4": {"type": i.r#type, "code": i.code}}),
        Some(Protocol::IcmPv6(i)) => json!({"ICMPv6": {"type": i.r#type, "code": i.code}}),
        None => Value::Null,
    };
    json!({
        "flow": {
            "time": time(f),
            "verdict": verdict_name(f),
            "drop_reason": f.drop_reason,
            "drop_reason_desc": flow::DropReason::try_from(f.drop_reason_desc).map_or("DROP_REASON_UNKNOWN", |r| r.as_str_name()),
            "IP": f.ip.as_ref().map(|ip| json!({"source": ip.source, "destination": ip.destination})),
            "l4": l4,
            "source": endpoint_json(f.source.as_ref()),
            "destination": endpoint_json(f.destination.as_ref()),
            "node_name": f.node_name,
            "traffic_direction": flow::TrafficDirection::try_from(f.traffic_direction).map_or("TRAFFIC_DIRECTION_UNKNOWN", |d| d.as_str_name()),
            "is_reply": f.is_reply,
            "policy_match_type": f.policy_match_type,
            "egress_denied_by": f.egress_denied_by.iter().map(|p| json!({"name": p.name, "namespace": p.namespace, "kind": p.kind})).collect::<Vec<_>>(),
            "ingress_denied_by": f.ingress_denied_by.iter().map(|p| json!({"name": p.name, "namespace": p.namespace, "kind": p.kind})).collect::<Vec<_>>(),
            "Summary": f.summary,
        },
        "node_name": f.node_name,
        "time": time(f),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_print_like_hubble() {
        let f = Flow {
            verdict: flow::Verdict::Dropped as i32,
            drop_reason_desc: flow::DropReason::PolicyDenied as i32,
            node_name: "n1".into(),
            ip: Some(flow::Ip {
                source: "10.0.0.1".into(),
                destination: "10.0.0.2".into(),
                ..Default::default()
            }),
            l4: Some(flow::Layer4 {
                protocol: Some(flow::layer4::Protocol::Tcp(flow::Tcp {
                    source_port: 40000,
                    destination_port: 80,
                    flags: Some(flow::TcpFlags {
                        syn: true,
                        ..Default::default()
                    }),
                })),
            }),
            source: Some(flow::Endpoint {
                namespace: "x".into(),
                pod_name: "a".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            line(&f),
            "- n1: x/a:40000 -> 10.0.0.2:80 TCP DROPPED (POLICY_DENIED) (SYN)"
        );
        let j = to_json(&f);
        assert_eq!(j["flow"]["l4"]["TCP"]["destination_port"], 80);
        assert_eq!(j["flow"]["l4"]["TCP"]["flags"]["SYN"], true);
        assert_eq!(j["flow"]["verdict"], "DROPPED");
        assert_eq!(j["flow"]["source"]["pod_name"], "a");
    }

    #[test]
    fn filters_become_an_or_of_sides() {
        let req = request(&Filters {
            pods: vec!["x/a".into()],
            verdicts: vec!["dropped".into()],
            ports: vec![80],
            last: Some(5),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(req.number, 5);
        assert_eq!(req.whitelist.len(), 4);
        assert!(
            req.whitelist
                .iter()
                .all(|f| f.verdict == [flow::Verdict::Dropped as i32])
        );
        assert!(
            req.whitelist
                .iter()
                .any(|f| f.source_pod == ["x/a"] && f.destination_port == ["80"])
        );
        let all = request(&Filters::default()).unwrap();
        assert!(all.whitelist.is_empty());
        assert_eq!(all.number, 20);
        assert!(
            request(&Filters {
                verdicts: vec!["maybe".into()],
                ..Default::default()
            })
            .is_err()
        );
    }
}
