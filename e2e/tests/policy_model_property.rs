//! Issue 6: the production policy path against the independent model, on random input.
//!
//! proptest generates namespaces (labels), pods (labels, addresses, named ports) and random
//! Kubernetes NetworkPolicies, Tendril NetworkPolicies and ClusterNetworkPolicies within
//! the supported subset (selectors with every operator and key form, peers of every kind,
//! CIDRs with except, ports, ranges, named ports, protocols, deny rules, default-deny
//! switches; now and then an invalid one). The production side is the real chain:
//! identities from the pods' security labels (POLICY_SPEC §1), then
//! `tendril_controllers::policy::resolve::resolve`, then the agent's translation
//! (`tendril_datapath::agent::pass::policy::translate`) into policy map entries,
//! evaluated by a small LPM-style lookup that mirrors POLICY_SPEC §4 (longest match per
//! {peer identity, CIDR identity of the peer address, any}; a deny wins; else the
//! endpoint's default). For every (subject, peer, direction, port, protocol) the verdict
//! must equal the model's; the ResolvedPolicy's sources and default deny must equal the
//! policies the model says select the pod; the policies left out must be the same.
//! No cluster needed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use proptest::prelude::*;
use serde_json::{Value, json};
use tendril_controllers::policy::resolve::{Labels as IdLabels, Sources, resolve};
use tendril_crds::v1alpha1::{NamedPort as CrdNamedPort, ResolvedPolicySpec};
use tendril_datapath::agent::pass::policy::{
    ClusterNamedPorts, DesiredPolicy, PolicySubject, translate,
};
use tendril_datapath::bpf::maps::Direction as BpfDirection;
use tendril_datapath::bpf::policy::{
    POLICY_F_DEFAULT_DENY_EGRESS, POLICY_F_DEFAULT_DENY_INGRESS, PROTO_ANY, PROTO_SCTP, PROTO_TCP,
    PROTO_UDP, PolicyEntry, Verdict,
};
use tendril_e2e::netpol::model::{
    Cluster, Direction, Labels, Model, NamedPort, Namespace, Pod, Policies, Protocol, SourceKind,
    SourceRef,
};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PORTS: [u16; 3] = [80, 81, 82];

// ------------------------------------------------------------------ generators

fn values_of(key: &str) -> &'static [&'static str] {
    let bare = key.rsplit(['.', ':', '/']).next().unwrap_or(key);
    match bare {
        "app" => &["a", "b", "c"],
        "tier" => &["web", "db"],
        "team" => &["a", "b"],
        "namespace" | "name" => &["x", "y", "z"],
        _ => &["a"],
    }
}

fn pick<T: Clone + std::fmt::Debug + 'static>(items: &'static [T]) -> impl Strategy<Value = T> {
    prop::sample::select(items)
}

/// A label selector over `keys` (matchLabels and/or one matchExpression).
fn selector(keys: &'static [&'static str]) -> BoxedStrategy<Value> {
    let label = pick(keys).prop_flat_map(|k| (Just(k), pick(values_of(k))));
    let expr = (
        pick(keys),
        pick(&["In", "NotIn", "Exists", "DoesNotExist"]),
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(|(k, op, i, two)| {
            let vals = values_of(k);
            let mut values: Vec<&str> = vec![vals[i.index(vals.len())]];
            if two && vals.len() > 1 {
                values.push(vals[(i.index(vals.len()) + 1) % vals.len()]);
            }
            match op {
                "In" | "NotIn" => json!({"key": k, "operator": op, "values": values}),
                _ => json!({"key": k, "operator": op}),
            }
        });
    (
        prop::collection::vec(label, 0..=2),
        prop::option::weighted(0.4, expr),
    )
        .prop_map(|(labels, expr)| {
            let mut sel = serde_json::Map::new();
            if !labels.is_empty() {
                let m: serde_json::Map<String, Value> = labels
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), json!(v)))
                    .collect();
                sel.insert("matchLabels".into(), Value::Object(m));
            }
            if let Some(e) = expr {
                sel.insert("matchExpressions".into(), json!([e]));
            }
            Value::Object(sel)
        })
        .boxed()
}

const POD_KEYS: &[&str] = &["app", "tier"];
const NS_KEYS: &[&str] = &["team", "kubernetes.io/metadata.name"];
const TENDRIL_KEYS: &[&str] = &[
    "app",
    "k8s:app",
    "any:tier",
    "tier",
    "io.kubernetes.pod.namespace",
    "k8s:io.kubernetes.pod.namespace",
    "io.tendril.k8s.namespace.labels.team",
    "k8s:io.tendril.k8s.namespace.labels.kubernetes.io/metadata.name",
];

/// (cidr, except): except entries inside cidr, now and then one outside (invalid).
fn cidr_with_except() -> BoxedStrategy<(String, Vec<String>)> {
    const CIDRS: &[&str] = &[
        "10.0.0.0/16",
        "10.0.0.0/24",
        "10.0.1.0/24",
        "10.0.2.0/24",
        "10.0.0.0/23",
        "10.0.1.2/32",
        "10.0.0.1/32",
        "0.0.0.0/0",
    ];
    const EXCEPTS: &[&str] = &[
        "10.0.0.1/32",
        "10.0.0.2/32",
        "10.0.1.1/32",
        "10.0.1.3/32",
        "10.0.2.2/32",
        "10.0.1.0/24",
        "10.0.0.0/25",
        "10.0.2.0/30",
    ];
    (
        pick(CIDRS),
        prop::collection::vec(pick(EXCEPTS), 0..=2),
        prop::bool::weighted(0.03),
    )
        .prop_map(|(cidr, excepts, bad)| {
            let net: IpNet = cidr.parse().expect("cidr");
            let mut out: Vec<String> = excepts
                .into_iter()
                .filter(|e| {
                    let e: IpNet = e.parse().expect("except");
                    net.contains(&e) && e.prefix_len() > net.prefix_len()
                })
                .map(str::to_string)
                .collect();
            out.sort();
            out.dedup();
            if bad {
                out.push("10.9.0.0/24".into());
            }
            (cidr.to_string(), out)
        })
        .boxed()
}

fn k8s_port() -> BoxedStrategy<Value> {
    (
        prop::option::of(pick(&["TCP", "UDP", "SCTP"])),
        pick(&["", "80", "81", "http", "dns"]),
        prop::option::weighted(0.25, Just(81)),
        prop::bool::weighted(0.03),
    )
        .prop_map(|(protocol, port, end, bad)| {
            let mut m = serde_json::Map::new();
            if let Some(p) = protocol {
                m.insert("protocol".into(), json!(p));
            }
            match port.parse::<i32>() {
                Ok(n) => {
                    m.insert("port".into(), json!(n));
                    if let Some(e) = end {
                        m.insert("endPort".into(), json!(e));
                    }
                }
                Err(_) if !port.is_empty() => {
                    m.insert("port".into(), json!(port));
                    if bad {
                        m.insert("endPort".into(), json!(81));
                    }
                }
                Err(_) => {}
            }
            Value::Object(m)
        })
        .boxed()
}

fn k8s_peer() -> BoxedStrategy<Value> {
    prop_oneof![
        selector(POD_KEYS).prop_map(|s| json!({"podSelector": s})),
        selector(NS_KEYS).prop_map(|s| json!({"namespaceSelector": s})),
        (selector(NS_KEYS), selector(POD_KEYS))
            .prop_map(|(n, p)| json!({"namespaceSelector": n, "podSelector": p})),
        cidr_with_except().prop_map(|(cidr, except)| {
            if except.is_empty() {
                json!({"ipBlock": {"cidr": cidr}})
            } else {
                json!({"ipBlock": {"cidr": cidr, "except": except}})
            }
        }),
    ]
    .boxed()
}

fn k8s_rule(peer_field: &'static str) -> BoxedStrategy<Value> {
    (
        prop::option::of(prop::collection::vec(k8s_peer(), 0..=2)),
        prop::option::of(prop::collection::vec(k8s_port(), 0..=2)),
    )
        .prop_map(move |(peers, ports)| {
            let mut m = serde_json::Map::new();
            if let Some(p) = peers {
                m.insert(peer_field.into(), json!(p));
            }
            if let Some(p) = ports {
                m.insert("ports".into(), json!(p));
            }
            Value::Object(m)
        })
        .boxed()
}

const POLICY_TYPES: &[&[&str]] = &[&["Ingress"], &["Egress"], &["Ingress", "Egress"]];

fn k8s_policy(n: usize) -> BoxedStrategy<Value> {
    (
        pick(&NAMESPACES),
        selector(POD_KEYS),
        prop::option::of(pick(POLICY_TYPES)),
        prop::collection::vec(k8s_rule("from"), 0..=2),
        prop::collection::vec(k8s_rule("to"), 0..=2),
    )
        .prop_map(move |(ns, sel, types, ingress, egress)| {
            let mut spec = json!({"podSelector": sel, "ingress": ingress, "egress": egress});
            if let Some(t) = types {
                spec["policyTypes"] = json!(t);
            }
            json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": format!("k{n}"), "namespace": ns},
                "spec": spec,
            })
        })
        .boxed()
}

fn tendril_port() -> BoxedStrategy<Value> {
    (
        pick(&["ANY", "TCP", "UDP", "SCTP"]),
        pick(&["0", "80", "81", "http", "dns"]),
        prop::option::weighted(0.25, Just(81)),
    )
        .prop_map(|(protocol, port, end)| {
            let mut m = json!({"port": port, "protocol": protocol});
            // endPort only on a real numeric range (a named port with one is invalid and
            // covered by the Kubernetes generator).
            if let Some(e) = end
                && port.parse::<i32>().is_ok_and(|p| p > 0)
            {
                m["endPort"] = json!(e);
            }
            m
        })
        .boxed()
}

fn tendril_rule(ingress: bool) -> BoxedStrategy<Value> {
    let (ep, ent, cidr, cidr_set) = if ingress {
        ("fromEndpoints", "fromEntities", "fromCIDR", "fromCIDRSet")
    } else {
        ("toEndpoints", "toEntities", "toCIDR", "toCIDRSet")
    };
    (
        prop::collection::vec(selector(TENDRIL_KEYS), 0..=2),
        prop::collection::vec(pick(&["cluster", "all", "world", "host"]), 0..=1),
        prop::collection::vec(cidr_with_except(), 0..=1),
        prop::collection::vec(cidr_with_except(), 0..=1),
        prop::option::weighted(
            0.5,
            prop::collection::vec(tendril_port(), 1..=2).prop_map(|p| json!([{"ports": p}])),
        ),
    )
        .prop_map(move |(eps, ents, cidrs, sets, ports)| {
            let mut m = serde_json::Map::new();
            if !eps.is_empty() {
                m.insert(ep.into(), json!(eps));
            }
            if !ents.is_empty() {
                m.insert(ent.into(), json!(ents));
            }
            if !cidrs.is_empty() {
                // Plain CIDRs take no except.
                m.insert(
                    cidr.into(),
                    json!(cidrs.into_iter().map(|(c, _)| c).collect::<Vec<_>>()),
                );
            }
            if !sets.is_empty() {
                let sets: Vec<Value> = sets
                    .into_iter()
                    .map(|(c, e)| json!({"cidr": c, "except": e}))
                    .collect();
                m.insert(cidr_set.into(), json!(sets));
            }
            if let Some(p) = ports {
                m.insert("toPorts".into(), p);
            }
            Value::Object(m)
        })
        .boxed()
}

fn tendril_spec() -> BoxedStrategy<Value> {
    (
        selector(TENDRIL_KEYS),
        prop::collection::vec(tendril_rule(true), 0..=2),
        prop::collection::vec(tendril_rule(true), 0..=1),
        prop::collection::vec(tendril_rule(false), 0..=2),
        prop::collection::vec(tendril_rule(false), 0..=1),
        prop::option::of(any::<bool>()),
        prop::option::of(any::<bool>()),
    )
        .prop_map(|(sel, ing, ing_deny, eg, eg_deny, dd_in, dd_eg)| {
            let mut spec = json!({"endpointSelector": sel, "ingress": ing, "ingressDeny": ing_deny,
                                  "egress": eg, "egressDeny": eg_deny});
            if dd_in.is_some() || dd_eg.is_some() {
                let mut d = serde_json::Map::new();
                if let Some(v) = dd_in {
                    d.insert("ingress".into(), json!(v));
                }
                if let Some(v) = dd_eg {
                    d.insert("egress".into(), json!(v));
                }
                spec["enableDefaultDeny"] = Value::Object(d);
            }
            spec
        })
        .boxed()
}

#[derive(Clone, Debug)]
struct World {
    cluster: Cluster,
    policies: Policies,
}

fn world() -> impl Strategy<Value = World> {
    let namespaces = prop::collection::vec(prop::option::of(pick(&["a", "b"])), 3);
    let pod = (
        0..3usize,
        prop::option::of(pick(&["a", "b", "c"])),
        prop::option::of(pick(&["web", "db"])),
        prop::option::of(pick(&[80u16, 81])),
        prop::option::of(pick(&[80u16, 81])),
    );
    let pods = prop::collection::vec(pod, 2..=6);
    let k8s = prop::collection::vec(any::<prop::sample::Index>(), 0..=2)
        .prop_flat_map(|v| (0..v.len()).map(k8s_policy).collect::<Vec<_>>());
    let tnp = prop::collection::vec(any::<prop::sample::Index>(), 0..=2).prop_flat_map(|v| {
        (0..v.len())
            .map(|n| {
                (pick(&NAMESPACES), tendril_spec()).prop_map(move |(ns, spec)| {
                    json!({"apiVersion": "tendril.dev/v1alpha1", "kind": "NetworkPolicy",
                           "metadata": {"name": format!("t{n}"), "namespace": ns}, "spec": spec})
                })
            })
            .collect::<Vec<_>>()
    });
    let cnp = prop::option::weighted(0.5, tendril_spec()).prop_map(|spec| {
        spec.map(|spec| {
            json!({"apiVersion": "tendril.dev/v1alpha1", "kind": "ClusterNetworkPolicy",
                   "metadata": {"name": "c0"}, "spec": spec})
        })
    });
    (namespaces, pods, k8s, tnp, cnp).prop_map(|(ns_teams, pods, k8s, tnp, cnp)| {
        let namespaces = NAMESPACES
            .iter()
            .zip(ns_teams)
            .map(|(name, team)| {
                let mut labels =
                    Labels::from([("kubernetes.io/metadata.name".to_string(), name.to_string())]);
                if let Some(t) = team {
                    labels.insert("team".into(), t.into());
                }
                Namespace {
                    name: name.to_string(),
                    labels,
                }
            })
            .collect();
        let mut counters = [0u8; 3];
        let pods = pods
            .into_iter()
            .enumerate()
            .map(|(i, (ns, app, tier, http, dns))| {
                counters[ns] += 1;
                let mut labels = Labels::new();
                if let Some(a) = app {
                    labels.insert("app".into(), a.into());
                }
                if let Some(t) = tier {
                    labels.insert("tier".into(), t.into());
                }
                let mut named_ports = Vec::new();
                if let Some(p) = http {
                    named_ports.push(NamedPort {
                        name: "http".into(),
                        port: p,
                        protocol: Protocol::Tcp,
                    });
                }
                if let Some(p) = dns {
                    named_ports.push(NamedPort {
                        name: "dns".into(),
                        port: p,
                        protocol: Protocol::Udp,
                    });
                }
                Pod {
                    namespace: NAMESPACES[ns].to_string(),
                    name: format!("p{i}"),
                    labels,
                    ip: format!("10.0.{ns}.{}", counters[ns]).parse().expect("ip"),
                    node: "n0".into(),
                    named_ports,
                    service_account: None,
                }
            })
            .collect();
        let policies = Policies {
            kubernetes: k8s
                .into_iter()
                .map(|v| serde_json::from_value(v).expect("k8s policy"))
                .collect(),
            namespaced: tnp
                .into_iter()
                .map(|v| serde_json::from_value(v).expect("tendril policy"))
                .collect(),
            cluster: cnp
                .into_iter()
                .map(|v| serde_json::from_value(v).expect("cluster policy"))
                .collect(),
        };
        World {
            cluster: Cluster { namespaces, pods },
            policies,
        }
    })
}

// ------------------------------------------------------------------ the production path

/// Security labels of a pod as POLICY_SPEC §1 describes them.
fn security_labels(cluster: &Cluster, pod: &Pod) -> IdLabels {
    let mut out: IdLabels = pod
        .labels
        .iter()
        .map(|(k, v)| (format!("k8s:{k}"), v.clone()))
        .collect();
    out.insert(
        "k8s:io.kubernetes.pod.namespace".into(),
        pod.namespace.clone(),
    );
    for (k, v) in cluster.namespace_labels(&pod.namespace) {
        out.insert(format!("k8s:io.tendril.k8s.namespace.labels.{k}"), v);
    }
    out
}

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
        Protocol::Sctp => PROTO_SCTP,
    }
}

fn mask(bits: u8) -> u16 {
    if bits == 0 {
        0
    } else {
        u16::MAX << (16 - u32::from(bits))
    }
}

/// The LPM trie's answer for one key: the matching entry with the longest prefix
/// (64 static bits; +16 for protocol and pad; + the port prefix).
fn lpm(
    desired: &DesiredPolicy,
    endpoint: u16,
    direction: BpfDirection,
    peer: u32,
    protocol: u8,
    port: u16,
) -> Option<Verdict> {
    desired
        .entries
        .iter()
        .filter(|(e, _)| {
            e.endpoint_id == endpoint
                && e.direction == direction
                && e.peer == peer
                && (e.protocol == PROTO_ANY
                    || (e.protocol == protocol
                        && (port & mask(e.port_prefix)) == (e.port & mask(e.port_prefix))))
        })
        .max_by_key(|(e, _): &(&PolicyEntry, &Verdict)| {
            if e.protocol == PROTO_ANY {
                64
            } else {
                80 + u32::from(e.port_prefix)
            }
        })
        .map(|(_, v)| *v)
}

/// POLICY_SPEC §4's lookup for a new connection at one enforcement point.
fn datapath_verdict(
    desired: &DesiredPolicy,
    endpoint: u16,
    direction: Direction,
    peer_identity: u32,
    peer_ip: IpAddr,
    protocol: Protocol,
    port: u16,
) -> bool {
    let Some(state) = desired.states.get(&endpoint) else {
        return true;
    };
    let dir = match direction {
        Direction::Ingress => BpfDirection::Ingress,
        Direction::Egress => BpfDirection::Egress,
    };
    let cidr_identity = desired
        .cidrs
        .iter()
        .filter(|(net, _)| net.contains(&peer_ip))
        .max_by_key(|(net, _)| net.prefix_len())
        .map(|(_, id)| *id);
    let verdicts: Vec<Verdict> = [Some(peer_identity), cidr_identity, Some(0)]
        .into_iter()
        .flatten()
        .filter_map(|peer| lpm(desired, endpoint, dir, peer, proto_number(protocol), port))
        .collect();
    if verdicts.contains(&Verdict::Deny) {
        return false;
    }
    if verdicts.contains(&Verdict::Allow) {
        return true;
    }
    let flag = match direction {
        Direction::Ingress => POLICY_F_DEFAULT_DENY_INGRESS,
        Direction::Egress => POLICY_F_DEFAULT_DENY_EGRESS,
    };
    state.flags & flag == 0
}

fn kind_of(kind: &str) -> Option<SourceKind> {
    match kind {
        "KubernetesNetworkPolicy" => Some(SourceKind::Kubernetes),
        "NetworkPolicy" => Some(SourceKind::Namespaced),
        "ClusterNetworkPolicy" => Some(SourceKind::Cluster),
        _ => None,
    }
}

/// Every difference between the production path and the model for one world.
fn compare(w: &World) -> Vec<String> {
    let cluster = &w.cluster;
    let model = Model::new(cluster, &w.policies);
    let mut out = Vec::new();

    // Identities: one per distinct security label set.
    let mut by_labels: BTreeMap<IdLabels, i64> = BTreeMap::new();
    let identity_of: Vec<i64> = cluster
        .pods
        .iter()
        .map(|p| {
            let labels = security_labels(cluster, p);
            let next = 256 + by_labels.len() as i64;
            *by_labels.entry(labels).or_insert(next)
        })
        .collect();
    let identities: BTreeMap<i64, IdLabels> =
        by_labels.into_iter().map(|(l, id)| (id, l)).collect();
    let sources = Sources {
        kubernetes: w.policies.kubernetes.clone(),
        namespaced: w.policies.namespaced.clone(),
        cluster: w.policies.cluster.clone(),
    };
    let resolution = resolve(&identities, &sources);

    let prod_invalid: BTreeSet<SourceRef> = resolution
        .sources
        .iter()
        .filter(|(_, r)| r.is_err())
        .filter_map(|(s, _)| {
            Some(SourceRef {
                kind: kind_of(s.kind.as_str())?,
                namespace: s.namespace.clone(),
                name: s.name.clone(),
            })
        })
        .collect();
    let model_invalid: BTreeSet<SourceRef> =
        model.invalid().iter().map(|(s, _)| s.clone()).collect();
    if prod_invalid != model_invalid {
        out.push(format!(
            "left out: production {:?} ({:?}), model {:?}",
            prod_invalid,
            resolution
                .sources
                .iter()
                .filter_map(|(s, r)| r.as_ref().err().map(|e| format!("{}: {e}", s.name)))
                .collect::<Vec<_>>(),
            model.invalid()
        ));
    }

    // The agent's translation for every pod as a local endpoint (endpoint id = index + 1).
    let named: Vec<Vec<CrdNamedPort>> = cluster
        .pods
        .iter()
        .map(|p| {
            p.named_ports
                .iter()
                .map(|np| CrdNamedPort {
                    name: np.name.clone(),
                    port: i32::from(np.port),
                    protocol: np.protocol.as_str().into(),
                })
                .collect()
        })
        .collect();
    let specs: Vec<Option<&ResolvedPolicySpec>> = identity_of
        .iter()
        .map(|id| resolution.policies.get(id))
        .collect();
    let subjects: Vec<PolicySubject<'_>> = (0..cluster.pods.len())
        .map(|i| PolicySubject {
            endpoint_id: (i + 1) as u16,
            policy: specs[i],
            named_ports: &named[i],
        })
        .collect();
    let cluster_ports = ClusterNamedPorts::from_endpoints(named.iter().map(Vec::as_slice));
    let desired = translate(&subjects, &cluster_ports, &BTreeMap::new());

    for (i, pod) in cluster.pods.iter().enumerate() {
        let Some(spec) = specs[i] else {
            out.push(format!(
                "{}: no ResolvedPolicy for identity {}",
                pod.key(),
                identity_of[i]
            ));
            continue;
        };
        let prod_sources: BTreeSet<SourceRef> = spec
            .sources
            .iter()
            .filter_map(|s| {
                Some(SourceRef {
                    kind: kind_of(s.kind.as_str())?,
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                })
            })
            .collect();
        if prod_sources != model.sources(i) {
            out.push(format!(
                "{}: sources production {prod_sources:?}, model {:?}",
                pod.key(),
                model.sources(i)
            ));
        }
        for (dir, prod) in [
            (Direction::Ingress, spec.default_deny.ingress),
            (Direction::Egress, spec.default_deny.egress),
        ] {
            if prod != model.default_deny(i, dir) {
                out.push(format!(
                    "{}: default deny {dir:?} production {prod}, model {}",
                    pod.key(),
                    !prod
                ));
            }
        }
    }
    for subject in 0..cluster.pods.len() {
        for (peer, (peer_pod, &peer_identity)) in cluster.pods.iter().zip(&identity_of).enumerate()
        {
            for dir in Direction::BOTH {
                for protocol in Protocol::ALL {
                    for port in PORTS {
                        let want = model.verdict(subject, peer, dir, port, protocol);
                        let got = datapath_verdict(
                            &desired,
                            (subject + 1) as u16,
                            dir,
                            peer_identity as u32,
                            peer_pod.ip,
                            protocol,
                            port,
                        );
                        if want != got {
                            out.push(format!(
                                "{} {dir:?} peer {} {protocol}/{port}: production {}, model {}",
                                cluster.pods[subject].key(),
                                peer_pod.key(),
                                if got { "allow" } else { "deny" },
                                if want { "allow" } else { "deny" },
                            ));
                        }
                    }
                }
            }
        }
    }
    if !out.is_empty() {
        out.push(format!(
            "resolved: {}",
            serde_json::to_string(&resolution.policies).unwrap_or_default()
        ));
    }
    out
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn production_path_matches_the_model(w in world()) {
        let diffs = compare(&w);
        prop_assert!(
            diffs.is_empty(),
            "{} differences:\n{}\npods: {:?}\npolicies: k8s {} tendril {} cluster {}",
            diffs.len(),
            diffs.iter().take(20).cloned().collect::<Vec<_>>().join("\n"),
            w.cluster.pods,
            serde_json::to_string(&w.policies.kubernetes).unwrap_or_default(),
            serde_json::to_string(&w.policies.namespaced).unwrap_or_default(),
            serde_json::to_string(&w.policies.cluster).unwrap_or_default(),
        );
    }
}

/// The generators are not vacuous: over many worlds, the model sees isolation, allows and
/// denies, invalid policies and every policy kind selecting something.
#[test]
fn generated_worlds_exercise_the_semantics() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = world();
    let (mut denied, mut allowed, mut invalid, mut selected) = (0, 0, 0, BTreeSet::new());
    for _ in 0..300 {
        let w = strategy.new_tree(&mut runner).expect("tree").current();
        let model = Model::new(&w.cluster, &w.policies);
        invalid += model.invalid().len();
        for i in 0..w.cluster.pods.len() {
            selected.extend(model.sources(i).into_iter().map(|s| s.kind));
            for j in 0..w.cluster.pods.len() {
                if model.allowed(i, j, 80, Protocol::Tcp) {
                    allowed += 1;
                } else {
                    denied += 1;
                }
            }
        }
    }
    println!(
        "300 worlds: {allowed} allowed, {denied} denied pairs on TCP/80, {invalid} invalid policies, kinds selecting: {selected:?}"
    );
    assert!(denied > 100 && allowed > 100 && invalid > 0 && selected.len() == 3);
}
