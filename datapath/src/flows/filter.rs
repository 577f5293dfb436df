//! Hubble's flow filters: a flow is sent when it matches any whitelist filter (or there is
//! none) and no blacklist filter; it matches a filter when it matches every field the
//! filter sets, and a field when it matches any of its entries. A field about something
//! Tendril's flows never carry (FQDNs, services, HTTP, DNS, node labels) matches nothing.
//!
//! Compiled once per request ([`FlowFilters::compile`]); a malformed entry (an IP that is
//! not one, a bad label selector) is an `InvalidArgument` naming it.

use super::proto::flow::{self, Endpoint, FlowFilter, TcpFlags, layer4};
use ipnet::IpNet;
use std::net::IpAddr;

#[derive(Debug, thiserror::Error)]
#[error("invalid flow filter: {0}")]
pub struct FilterError(pub String);

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A Kubernetes-style label selector (`app=web,tier!=db,!canary,env in (a,b)`) over
/// Cilium-style labels (`k8s:app=web`). A key without a source (`app`) matches any source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

fn split_top_level(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn values_in(list: &str, selector: &str) -> Result<Vec<String>, FilterError> {
    let inner = list
        .trim()
        .strip_prefix('(')
        .and_then(|l| l.strip_suffix(')'))
        .ok_or_else(|| FilterError(format!("label selector {selector:?}: expected (v1,v2)")))?;
    Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
}

impl LabelSelector {
    pub fn parse(selector: &str) -> Result<Self, FilterError> {
        let mut reqs = Vec::new();
        for part in split_top_level(selector) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let req = if let Some(key) = part.strip_prefix('!') {
                Requirement::NotExists(key.trim().to_string())
            } else if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotIn(k.trim().into(), vec![v.trim().into()])
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::In(k.trim().into(), vec![v.trim().into()])
            } else if let Some((k, list)) = part.split_once(" notin ") {
                Requirement::NotIn(k.trim().into(), values_in(list, selector)?)
            } else if let Some((k, list)) = part.split_once(" in ") {
                Requirement::In(k.trim().into(), values_in(list, selector)?)
            } else if part.contains([' ', '(', ')']) {
                return Err(FilterError(format!(
                    "label selector {selector:?}: cannot read {part:?}"
                )));
            } else {
                Requirement::Exists(part.to_string())
            };
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    /// The value of `key` in `labels` (`source:key=value`); `Some("")` for a label without
    /// a value.
    fn value<'a>(labels: &'a [String], key: &str) -> Option<&'a str> {
        let (want_source, want_key) = match key.split_once(':') {
            Some(("any", k)) => (None, k),
            Some((s, k)) => (Some(s), k),
            None => (None, key),
        };
        labels.iter().find_map(|label| {
            let (source, rest) = label.split_once(':').unwrap_or(("", label));
            if want_source.is_some_and(|s| s != source) {
                return None;
            }
            let (k, v) = rest.split_once('=').unwrap_or((rest, ""));
            (k == want_key).then_some(v)
        })
    }

    pub fn matches(&self, labels: &[String]) -> bool {
        self.0.iter().all(|req| match req {
            Requirement::Exists(k) => Self::value(labels, k).is_some(),
            Requirement::NotExists(k) => Self::value(labels, k).is_none(),
            Requirement::In(k, vs) => {
                Self::value(labels, k).is_some_and(|v| vs.iter().any(|w| w == v))
            }
            Requirement::NotIn(k, vs) => {
                !Self::value(labels, k).is_some_and(|v| vs.iter().any(|w| w == v))
            }
        })
    }
}

/// `namespace/pod-name-prefix` (Hubble's `source_pod`/`destination_pod`): `demo/` is every
/// pod of `demo`, `demo/web` every pod of `demo` whose name starts with `web`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PodPattern {
    namespace: String,
    prefix: String,
}

impl PodPattern {
    fn parse(s: &str) -> Self {
        match s.split_once('/') {
            Some((ns, prefix)) => PodPattern {
                namespace: ns.into(),
                prefix: prefix.into(),
            },
            None => PodPattern {
                namespace: String::new(),
                prefix: s.into(),
            },
        }
    }

    fn matches(&self, ep: &Endpoint) -> bool {
        // A peer that is not a pod (no namespace) matches no pod pattern.
        !ep.namespace.is_empty()
            && (self.namespace.is_empty() || ep.namespace == self.namespace)
            && ep.pod_name.starts_with(&self.prefix)
    }
}

/// `*`-glob match of a whole string.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, tail)) => {
            let Some(rest) = text.strip_prefix(head) else {
                return false;
            };
            (0..=rest.len())
                .filter(|i| rest.is_char_boundary(*i))
                .any(|i| glob(tail, &rest[i..]))
        }
    }
}

/// One FlowFilter, parsed.
#[derive(Clone, Debug)]
struct Compiled {
    raw: FlowFilter,
    source_ip: Vec<IpNet>,
    destination_ip: Vec<IpNet>,
    source_pod: Vec<PodPattern>,
    destination_pod: Vec<PodPattern>,
    source_label: Vec<LabelSelector>,
    destination_label: Vec<LabelSelector>,
    source_port: Vec<u16>,
    destination_port: Vec<u16>,
    protocol: Vec<String>,
}

fn ips(list: &[String], field: &str) -> Result<Vec<IpNet>, FilterError> {
    list.iter()
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| FilterError(format!("{field}: {s:?} is not an IP address or CIDR")))
        })
        .collect()
}

fn ports(list: &[String], field: &str) -> Result<Vec<u16>, FilterError> {
    list.iter()
        .map(|s| {
            s.parse::<u16>()
                .map_err(|_| FilterError(format!("{field}: {s:?} is not a port number")))
        })
        .collect()
}

fn labels(list: &[String]) -> Result<Vec<LabelSelector>, FilterError> {
    list.iter().map(|s| LabelSelector::parse(s)).collect()
}

fn any_or_empty<T>(list: &[T], pred: impl Fn(&T) -> bool) -> bool {
    list.is_empty() || list.iter().any(pred)
}

fn ip_in(nets: &[IpNet], ip: Option<&str>) -> bool {
    nets.is_empty()
        || ip
            .and_then(|s| s.parse::<IpAddr>().ok())
            .is_some_and(|ip| nets.iter().any(|n| n.contains(&ip)))
}

fn ports_of(flow: &flow::Flow) -> Option<(u32, u32)> {
    match flow.l4.as_ref()?.protocol.as_ref()? {
        layer4::Protocol::Tcp(t) => Some((t.source_port, t.destination_port)),
        layer4::Protocol::Udp(u) => Some((u.source_port, u.destination_port)),
        layer4::Protocol::Sctp(s) => Some((s.source_port, s.destination_port)),
        _ => None,
    }
}

fn protocol_names(flow: &flow::Flow) -> &'static [&'static str] {
    match flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(layer4::Protocol::Tcp(_)) => &["tcp"],
        Some(layer4::Protocol::Udp(_)) => &["udp"],
        Some(layer4::Protocol::Sctp(_)) => &["sctp"],
        Some(layer4::Protocol::IcmPv4(_)) => &["icmp", "icmpv4"],
        Some(layer4::Protocol::IcmPv6(_)) => &["icmp", "icmpv6"],
        None => &[],
    }
}

fn flags_cover(have: &TcpFlags, want: &TcpFlags) -> bool {
    let pairs = [
        (have.fin, want.fin),
        (have.syn, want.syn),
        (have.rst, want.rst),
        (have.psh, want.psh),
        (have.ack, want.ack),
        (have.urg, want.urg),
        (have.ece, want.ece),
        (have.cwr, want.cwr),
        (have.ns, want.ns),
    ];
    pairs.iter().all(|(h, w)| !w || *h)
}

impl Compiled {
    fn new(raw: &FlowFilter) -> Result<Self, FilterError> {
        Ok(Compiled {
            source_ip: ips(&raw.source_ip, "source_ip")?,
            destination_ip: ips(&raw.destination_ip, "destination_ip")?,
            source_pod: raw
                .source_pod
                .iter()
                .map(|s| PodPattern::parse(s))
                .collect(),
            destination_pod: raw
                .destination_pod
                .iter()
                .map(|s| PodPattern::parse(s))
                .collect(),
            source_label: labels(&raw.source_label)?,
            destination_label: labels(&raw.destination_label)?,
            source_port: ports(&raw.source_port, "source_port")?,
            destination_port: ports(&raw.destination_port, "destination_port")?,
            protocol: raw
                .protocol
                .iter()
                .map(|p| p.to_ascii_lowercase())
                .collect(),
            raw: raw.clone(),
        })
    }

    fn matches(&self, flow: &flow::Flow) -> bool {
        let f = &self.raw;
        let ip = flow.ip.as_ref();
        let (src, dst) = (
            flow.source.clone().unwrap_or_default(),
            flow.destination.clone().unwrap_or_default(),
        );
        let l4_ports = ports_of(flow);
        let flags = match flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
            Some(layer4::Protocol::Tcp(t)) => t.flags,
            _ => None,
        };
        let workload = |eps: &Endpoint, want: &flow::Workload| {
            eps.workloads.iter().any(|w| {
                (want.name.is_empty() || w.name == want.name)
                    && (want.kind.is_empty() || w.kind == want.kind)
            })
        };
        any_or_empty(&f.uuid, |u| *u == flow.uuid)
            && ip_in(&self.source_ip, ip.map(|i| i.source.as_str()))
            && ip_in(&self.destination_ip, ip.map(|i| i.destination.as_str()))
            && any_or_empty(&self.source_pod, |p| p.matches(&src))
            && any_or_empty(&self.destination_pod, |p| p.matches(&dst))
            && any_or_empty(&self.source_label, |s| s.matches(&src.labels))
            && any_or_empty(&self.destination_label, |s| s.matches(&dst.labels))
            && any_or_empty(&f.source_workload, |w| workload(&src, w))
            && any_or_empty(&f.destination_workload, |w| workload(&dst, w))
            && any_or_empty(&f.source_cluster_name, |c| *c == src.cluster_name)
            && any_or_empty(&f.destination_cluster_name, |c| *c == dst.cluster_name)
            && any_or_empty(&f.traffic_direction, |d| *d == flow.traffic_direction)
            && any_or_empty(&f.verdict, |v| *v == flow.verdict)
            && any_or_empty(&f.drop_reason_desc, |r| *r == flow.drop_reason_desc)
            && any_or_empty(&f.interface, |i| {
                flow.interface.as_ref().is_some_and(|have| {
                    (i.index == 0 || i.index == have.index) && (i.name.is_empty() || i.name == have.name)
                })
            })
            && any_or_empty(&f.event_type, |t| {
                flow.event_type.as_ref().is_some_and(|have| {
                    have.r#type == t.r#type && (!t.match_sub_type || have.sub_type == t.sub_type)
                })
            })
            && any_or_empty(&self.protocol, |p| protocol_names(flow).contains(&p.as_str()))
            && any_or_empty(&self.source_port, |p| l4_ports.is_some_and(|(s, _)| s == u32::from(*p)))
            && any_or_empty(&self.destination_port, |p| l4_ports.is_some_and(|(_, d)| d == u32::from(*p)))
            && any_or_empty(&f.reply, |r| flow.is_reply == Some(*r))
            && any_or_empty(&f.source_identity, |i| *i == src.identity)
            && any_or_empty(&f.destination_identity, |i| *i == dst.identity)
            && any_or_empty(&f.tcp_flags, |want| flags.is_some_and(|have| flags_cover(&have, want)))
            && any_or_empty(&f.node_name, |pattern| {
                // `cluster/node` patterns: Tendril has one (unnamed) cluster.
                let node = pattern.rsplit_once('/').map_or(pattern.as_str(), |(_, n)| n);
                glob(node, &flow.node_name)
            })
            && any_or_empty(&f.ip_version, |v| ip.is_some_and(|i| i.ip_version == *v))
            && any_or_empty(&f.encrypted, |e| ip.is_some_and(|i| i.encrypted == *e))
            // What Tendril's flows never carry matches nothing.
            && f.source_fqdn.is_empty()
            && f.destination_fqdn.is_empty()
            && f.source_service.is_empty()
            && f.destination_service.is_empty()
            && f.http_status_code.is_empty()
            && f.http_method.is_empty()
            && f.http_path.is_empty()
            && f.http_url.is_empty()
            && f.dns_query.is_empty()
            && f.node_labels.is_empty()
            && f.trace_id.is_empty()
    }
}

/// A request's whitelist and blacklist, compiled.
#[derive(Clone, Debug, Default)]
pub struct FlowFilters {
    whitelist: Vec<Compiled>,
    blacklist: Vec<Compiled>,
}

impl FlowFilters {
    pub fn compile(
        whitelist: &[FlowFilter],
        blacklist: &[FlowFilter],
    ) -> Result<Self, FilterError> {
        Ok(FlowFilters {
            whitelist: whitelist
                .iter()
                .map(Compiled::new)
                .collect::<Result<_, _>>()?,
            blacklist: blacklist
                .iter()
                .map(Compiled::new)
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn matches(&self, flow: &flow::Flow) -> bool {
        (self.whitelist.is_empty() || self.whitelist.iter().any(|f| f.matches(flow)))
            && !self.blacklist.iter().any(|f| f.matches(flow))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::proto::flow::{Ip, Layer4, Tcp, TrafficDirection, Verdict};

    fn flow(
        src: (&str, &str, &str),
        dst: (&str, &str, &str),
        dport: u32,
        verdict: Verdict,
    ) -> flow::Flow {
        let ep = |(ns, pod, app): (&str, &str, &str)| Endpoint {
            namespace: ns.into(),
            pod_name: pod.into(),
            labels: vec![
                format!("k8s:app={app}"),
                format!("k8s:io.kubernetes.pod.namespace={ns}"),
            ],
            identity: 300,
            ..Endpoint::default()
        };
        flow::Flow {
            ip: Some(Ip {
                source: "10.0.0.1".into(),
                destination: "10.0.1.2".into(),
                ..Ip::default()
            }),
            l4: Some(Layer4 {
                protocol: Some(layer4::Protocol::Tcp(Tcp {
                    source_port: 40000,
                    destination_port: dport,
                    flags: None,
                })),
            }),
            source: Some(ep(src)),
            destination: Some(ep(dst)),
            verdict: verdict as i32,
            traffic_direction: TrafficDirection::Ingress as i32,
            node_name: "node-a".into(),
            is_reply: Some(false),
            ..flow::Flow::default()
        }
    }

    fn ok(white: Vec<FlowFilter>, black: Vec<FlowFilter>, f: &flow::Flow) -> bool {
        FlowFilters::compile(&white, &black).unwrap().matches(f)
    }

    #[test]
    fn hubble_cli_filters_select_as_documented() {
        let f = flow(
            ("demo", "client-1", "client"),
            ("demo", "web-1", "web"),
            80,
            Verdict::Forwarded,
        );
        assert!(ok(vec![], vec![], &f));
        // --pod demo/web: source OR destination (two whitelist filters).
        let pod = |s: &str| {
            vec![
                FlowFilter {
                    source_pod: vec![s.into()],
                    ..FlowFilter::default()
                },
                FlowFilter {
                    destination_pod: vec![s.into()],
                    ..FlowFilter::default()
                },
            ]
        };
        assert!(ok(pod("demo/web"), vec![], &f));
        assert!(ok(pod("demo/"), vec![], &f));
        assert!(!ok(pod("other/"), vec![], &f));
        assert!(!ok(pod("demo/db"), vec![], &f));
        // --verdict DROPPED, --port, --protocol.
        let verdict = vec![FlowFilter {
            verdict: vec![Verdict::Dropped as i32],
            ..FlowFilter::default()
        }];
        assert!(!ok(verdict.clone(), vec![], &f));
        let dropped = flow(
            ("demo", "c", "client"),
            ("demo", "web-1", "web"),
            80,
            Verdict::Dropped,
        );
        assert!(ok(verdict, vec![], &dropped));
        let port = |p: &str| {
            vec![FlowFilter {
                destination_port: vec![p.into()],
                ..FlowFilter::default()
            }]
        };
        assert!(ok(port("80"), vec![], &f) && !ok(port("81"), vec![], &f));
        let proto = |p: &str| {
            vec![FlowFilter {
                protocol: vec![p.into()],
                ..FlowFilter::default()
            }]
        };
        assert!(ok(proto("TCP"), vec![], &f) && !ok(proto("udp"), vec![], &f));
        // Fields within one filter are ANDed.
        let both = vec![FlowFilter {
            destination_pod: vec!["demo/web".into()],
            destination_port: vec!["81".into()],
            ..FlowFilter::default()
        }];
        assert!(!ok(both, vec![], &f));
        // Blacklist wins.
        assert!(!ok(vec![], pod("demo/web"), &f));
        // Labels, identity, node, direction, reply, IP/CIDR.
        let label = |s: &str| {
            vec![FlowFilter {
                destination_label: vec![s.into()],
                ..FlowFilter::default()
            }]
        };
        assert!(ok(label("app=web"), vec![], &f));
        assert!(ok(
            label("k8s:app=web,k8s:io.kubernetes.pod.namespace"),
            vec![],
            &f
        ));
        assert!(ok(label("app in (db, web)"), vec![], &f));
        assert!(!ok(label("app!=web"), vec![], &f));
        assert!(!ok(label("!app"), vec![], &f));
        assert!(!ok(label("reserved:app=web"), vec![], &f));
        let node = |s: &str| {
            vec![FlowFilter {
                node_name: vec![s.into()],
                ..FlowFilter::default()
            }]
        };
        assert!(ok(node("node-*"), vec![], &f) && ok(node("default/node-a"), vec![], &f));
        assert!(!ok(node("node-b"), vec![], &f));
        let ip = |s: &str| {
            vec![FlowFilter {
                destination_ip: vec![s.into()],
                ..FlowFilter::default()
            }]
        };
        assert!(ok(ip("10.0.1.0/24"), vec![], &f) && ok(ip("10.0.1.2"), vec![], &f));
        assert!(!ok(ip("10.0.0.1"), vec![], &f));
        let reply = |r: bool| {
            vec![FlowFilter {
                reply: vec![r],
                ..FlowFilter::default()
            }]
        };
        assert!(ok(reply(false), vec![], &f) && !ok(reply(true), vec![], &f));
        let dir = vec![FlowFilter {
            traffic_direction: vec![TrafficDirection::Egress as i32],
            ..FlowFilter::default()
        }];
        assert!(!ok(dir, vec![], &f));
        let id = vec![FlowFilter {
            source_identity: vec![300],
            ..FlowFilter::default()
        }];
        assert!(ok(id, vec![], &f));
        // What Tendril never has matches nothing.
        let fqdn = vec![FlowFilter {
            source_fqdn: vec!["example.com".into()],
            ..FlowFilter::default()
        }];
        assert!(!ok(fqdn, vec![], &f));
    }

    #[test]
    fn malformed_filters_are_refused_with_the_field() {
        let bad = FlowFilter {
            source_ip: vec!["10.0.0.300".into()],
            ..FlowFilter::default()
        };
        let err = FlowFilters::compile(&[bad], &[]).unwrap_err().to_string();
        assert!(
            err.contains("source_ip") && err.contains("10.0.0.300"),
            "{err}"
        );
        let bad = FlowFilter {
            destination_port: vec!["http".into()],
            ..FlowFilter::default()
        };
        assert!(FlowFilters::compile(&[bad], &[]).is_err());
        assert!(LabelSelector::parse("app in web").is_err());
    }

    #[test]
    fn globs() {
        assert!(glob("*", "") && glob("a*c", "abc") && glob("a*", "a") && !glob("a*c", "ab"));
    }
}
