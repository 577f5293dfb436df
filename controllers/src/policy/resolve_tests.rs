//! The semantics of POLICY_SPEC §1, one named case each, on the netpol e2e world:
//! namespaces x, y, z with pods a, b, c each (one identity per pod).

use super::*;
use pretty_assertions::assert_eq;
use serde_json::{Value, json};

/// Identity of pod `pod` in namespace `ns` (x/a = 256 … z/c = 264).
fn id(ns: &str, pod: &str) -> i64 {
    let n = ["x", "y", "z"].iter().position(|n| *n == ns).unwrap() as i64;
    let p = ["a", "b", "c"].iter().position(|p| *p == pod).unwrap() as i64;
    256 + n * 3 + p
}

fn world() -> BTreeMap<i64, Labels> {
    let mut ids = BTreeMap::new();
    for (i, name) in [
        "host",
        "world",
        "unmanaged",
        "health",
        "init",
        "remote-node",
    ]
    .iter()
    .enumerate()
    {
        ids.insert(
            i as i64 + 1,
            [(format!("reserved:{name}"), String::new())].into(),
        );
    }
    for ns in ["x", "y", "z"] {
        for pod in ["a", "b", "c"] {
            let labels: Labels = [
                (POD_NAMESPACE.to_string(), ns.to_string()),
                (namespace_key("kubernetes.io/metadata.name"), ns.to_string()),
                (namespace_key("ns"), ns.to_string()),
                ("k8s:pod".to_string(), pod.to_string()),
                (
                    "k8s:app.kubernetes.io/name".to_string(),
                    format!("app-{pod}"),
                ),
            ]
            .into();
            ids.insert(id(ns, pod), labels);
        }
    }
    ids
}

fn k8s_policy(ns: &str, name: &str, spec: Value) -> k8s::NetworkPolicy {
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns, "generation": 1},
        "spec": spec,
    }))
    .unwrap()
}

fn tnp(ns: &str, name: &str, spec: Value) -> NetworkPolicy {
    serde_json::from_value(json!({
        "apiVersion": "tendril.dev/v1alpha1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns, "generation": 3},
        "spec": spec,
    }))
    .unwrap()
}

fn tcnp(name: &str, spec: Value) -> ClusterNetworkPolicy {
    serde_json::from_value(json!({
        "apiVersion": "tendril.dev/v1alpha1", "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name, "generation": 2},
        "spec": spec,
    }))
    .unwrap()
}

fn kube(policies: Vec<k8s::NetworkPolicy>) -> Sources {
    Sources {
        kubernetes: policies,
        ..Default::default()
    }
}

fn namespaced(policies: Vec<NetworkPolicy>) -> Sources {
    Sources {
        namespaced: policies,
        ..Default::default()
    }
}

fn cluster(policies: Vec<ClusterNetworkPolicy>) -> Sources {
    Sources {
        cluster: policies,
        ..Default::default()
    }
}

fn rule(verdict: Verdict, peers: &[i64], cidrs: &[&str], ports: &[ResolvedPort]) -> ResolvedRule {
    ResolvedRule {
        verdict,
        peers: peers.to_vec(),
        cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
        ports: ports.to_vec(),
    }
}

fn allow(peers: &[i64], ports: &[ResolvedPort]) -> ResolvedRule {
    rule(ALLOW, peers, &[], ports)
}

fn deny(peers: &[i64], ports: &[ResolvedPort]) -> ResolvedRule {
    rule(DENY, peers, &[], ports)
}

fn host_allow() -> ResolvedRule {
    allow(&[HOST], &[])
}

fn port(protocol: &str, port: i32) -> ResolvedPort {
    ResolvedPort {
        port,
        end_port: None,
        name: None,
        protocol: Protocol::parse(protocol).unwrap(),
    }
}

fn range(protocol: &str, port: i32, end: i32) -> ResolvedPort {
    ResolvedPort {
        end_port: Some(end),
        ..self::port(protocol, port)
    }
}

fn named(protocol: &str, name: &str) -> ResolvedPort {
    ResolvedPort {
        name: Some(name.to_string()),
        ..self::port(protocol, 0)
    }
}

fn tcp(p: i32) -> ResolvedPort {
    port("TCP", p)
}

fn all_of(ns: &str) -> Vec<i64> {
    ["a", "b", "c"].iter().map(|p| id(ns, p)).collect()
}

fn everyone() -> Vec<i64> {
    (256..265).collect()
}

fn invalid(res: &Resolution) -> Vec<(&str, &'static str)> {
    res.sources
        .iter()
        .filter_map(|(s, r)| r.as_ref().err().map(|e| (s.name.as_str(), e.reason)))
        .collect()
}

fn is_empty(spec: &ResolvedPolicySpec) -> bool {
    spec.ingress.is_empty()
        && spec.egress.is_empty()
        && spec.default_deny == ResolvedDefaultDeny::default()
        && spec.sources.is_empty()
}

// --- every identity gets a spec ---------------------------------------------------------

#[test]
fn every_cluster_identity_gets_an_empty_spec_without_policies() {
    let res = resolve(&world(), &Sources::default());
    assert_eq!(res.policies.keys().copied().collect::<Vec<_>>(), everyone());
    for (id, spec) in &res.policies {
        assert_eq!(spec.identity, *id);
        assert_eq!(spec.revision, 0);
        assert!(is_empty(spec), "{spec:?}");
    }
    assert!(res.sources.is_empty());
}

// --- Kubernetes NetworkPolicy -------------------------------------------------------------

#[test]
fn k8s_absent_policy_types_mean_ingress_only_without_egress_rules() {
    let res = resolve(
        &world(),
        &kube(vec![k8s_policy("x", "deny-in", json!({"podSelector": {}}))]),
    );
    for pod in all_of("x") {
        let spec = &res.policies[&pod];
        assert!(spec.default_deny.ingress && !spec.default_deny.egress);
        assert_eq!(spec.ingress, vec![host_allow()]);
        assert!(spec.egress.is_empty());
    }
    for pod in all_of("y") {
        assert!(is_empty(&res.policies[&pod]));
    }
}

#[test]
fn k8s_egress_rules_imply_the_egress_type() {
    let res = resolve(
        &world(),
        &kube(vec![k8s_policy(
            "x",
            "eg",
            json!({"podSelector": {}, "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}),
        )]),
    );
    let spec = &res.policies[&id("x", "a")];
    assert!(spec.default_deny.ingress && spec.default_deny.egress);
    assert_eq!(spec.egress, vec![allow(&[0], &[port("UDP", 53)])]);
}

#[test]
fn k8s_rules_of_a_direction_outside_policy_types_have_no_effect() {
    let res = resolve(
        &world(),
        &kube(vec![k8s_policy(
            "x",
            "egress-only",
            json!({"podSelector": {}, "policyTypes": ["Egress"],
                   "ingress": [{}], "egress": []}),
        )]),
    );
    let spec = &res.policies[&id("x", "b")];
    assert!(!spec.default_deny.ingress && spec.default_deny.egress);
    assert!(spec.ingress.is_empty() && spec.egress.is_empty());
}

#[test]
fn k8s_isolates_only_the_selected_pods() {
    let res = resolve(
        &world(),
        &kube(vec![k8s_policy(
            "x",
            "a-only",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}}),
        )]),
    );
    assert!(res.policies[&id("x", "a")].default_deny.ingress);
    assert!(is_empty(&res.policies[&id("x", "b")]));
    // Same labels in another namespace: not selected.
    assert!(is_empty(&res.policies[&id("y", "a")]));
    assert_eq!(res.sources[0].1, Ok(1));
}

#[test]
fn k8s_empty_or_absent_from_allows_every_peer() {
    let res = resolve(
        &world(),
        &kube(vec![k8s_policy(
            "x",
            "all",
            json!({"podSelector": {}, "ingress": [{"from": []}, {"ports": [{"port": 80}]}]}),
        )]),
    );
    assert_eq!(res.policies[&id("x", "a")].ingress, vec![allow(&[0], &[])]);
}

#[test]
fn k8s_pod_selector_peer_is_limited_to_the_policy_namespace() {
    let res = resolve(
        &world(),
        &kube(vec![k8s_policy(
            "x",
            "from-b",
            json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        )]),
    );
    assert_eq!(
        res.policies[&id("x", "a")].ingress,
        vec![allow(&[HOST, id("x", "b")], &[])]
    );
}

#[test]
fn k8s_namespace_selector_peer_selects_whole_namespaces() {
    let res = resolve(
        &world(),
        &kube(vec![
            k8s_policy(
                "x",
                "from-y",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                       "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                                    "ports": [{"port": 80}]}]}),
            ),
            k8s_policy(
                "x",
                "from-everywhere",
                json!({"podSelector": {"matchLabels": {"pod": "b"}},
                       "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 81}]}]}),
            ),
        ]),
    );
    assert_eq!(
        res.policies[&id("x", "a")].ingress,
        vec![host_allow(), allow(&all_of("y"), &[tcp(80)])]
    );
    assert_eq!(
        res.policies[&id("x", "b")].ingress,
        vec![host_allow(), allow(&everyone(), &[tcp(81)])]
    );
}

#[test]
fn k8s_namespace_and_pod_selector_together_intersect() {
    let res = resolve(
        &world(),
        &kube(vec![k8s_policy(
            "x",
            "both",
            json!({"podSelector": {},
                   "ingress": [{"from": [{
                       "namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["y", "z"]}]},
                       "podSelector": {"matchLabels": {"pod": "c"}}}]}]}),
        )]),
    );
    assert_eq!(
        res.policies[&id("x", "a")].ingress,
        vec![allow(&[HOST, id("y", "c"), id("z", "c")], &[])]
    );
}

#[test]
fn k8s_ip_block_except_becomes_disjoint_prefixes() {
    let res = resolve(
        &world(),
        &kube(vec![k8s_policy(
            "x",
            "cidr",
            json!({"podSelector": {}, "policyTypes": ["Egress"],
                   "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/9", "10.128.0.0/10"]}}]}]}),
        )]),
    );
    assert_eq!(
        res.policies[&id("x", "a")].egress,
        vec![rule(ALLOW, &[], &["10.192.0.0/10"], &[])]
    );
}

#[test]
fn cidr_minus_covers_exactly_the_rest() {
    let parts = cidr_minus(
        "192.168.0.0/16",
        &["192.168.1.0/24".into(), "192.168.255.255/32".into()],
    )
    .unwrap();
    let parts: Vec<ipnet::Ipv4Net> = parts
        .iter()
        .map(|n| match n {
            IpNet::V4(n) => *n,
            IpNet::V6(_) => unreachable!(),
        })
        .collect();
    let mut covered = 0u64;
    for (i, a) in parts.iter().enumerate() {
        covered += 1u64 << (32 - a.prefix_len());
        for b in &parts[i + 1..] {
            assert!(!a.contains(b) && !b.contains(a), "{a} overlaps {b}");
        }
        assert!(!a.contains(&"192.168.1.7".parse::<std::net::Ipv4Addr>().unwrap()));
    }
    assert_eq!(covered, 65536 - 256 - 1);
    assert_eq!(
        cidr_minus("10.0.0.0/8", &["10.0.0.0/8".into()]).unwrap(),
        vec![]
    );
}

#[test]
fn k8s_ports_default_tcp_named_ranges_and_protocols() {
    let res = resolve(
        &world(),
        &kube(vec![k8s_policy(
            "x",
            "ports",
            json!({"podSelector": {}, "ingress": [{"ports": [
                {"port": 80},
                {"port": "http", "protocol": "TCP"},
                {"port": 8000, "endPort": 8080, "protocol": "UDP"},
                {"port": 9000, "protocol": "SCTP"},
                {"protocol": "UDP", "port": 53},
                {"protocol": "SCTP"},
            ]}]}),
        )]),
    );
    assert_eq!(
        res.policies[&id("x", "a")].ingress,
        vec![
            allow(
                &[0],
                &[
                    port("SCTP", 0),
                    tcp(80),
                    named("TCP", "http"),
                    port("UDP", 53),
                    range("UDP", 8000, 8080),
                ]
            ),
            host_allow(),
        ]
    );
}

#[test]
fn k8s_policies_are_additive_and_listed_as_sources() {
    let res = resolve(
        &world(),
        &kube(vec![
            k8s_policy(
                "x",
                "p2",
                json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80}]}]}),
            ),
            k8s_policy(
                "x",
                "p1",
                json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "c"}}}], "ports": [{"port": 80}]}]}),
            ),
        ]),
    );
    let spec = &res.policies[&id("x", "a")];
    assert_eq!(
        spec.ingress,
        vec![
            host_allow(),
            allow(&[id("x", "b"), id("x", "c")], &[tcp(80)])
        ]
    );
    let names: Vec<_> = spec.sources.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["p1", "p2"]);
    assert_eq!(spec.sources[0].kind, KIND_KUBERNETES);
    assert_eq!(spec.sources[0].namespace.as_deref(), Some("x"));
    assert_eq!(spec.sources[0].generation, Some(1));
}

#[test]
fn invalid_k8s_policies_contribute_nothing() {
    let cases = [
        (
            "named-range",
            json!({"ingress": [{"ports": [{"port": "http", "endPort": 90}]}]}),
            INVALID_PORT,
        ),
        (
            "bad-range",
            json!({"ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}),
            INVALID_PORT,
        ),
        (
            "bad-proto",
            json!({"ingress": [{"ports": [{"port": 90, "protocol": "ICMP"}]}]}),
            INVALID_PORT,
        ),
        (
            "bad-cidr",
            json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0/8"}}]}]}),
            INVALID_CIDR,
        ),
        (
            "bad-except",
            json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}]}),
            INVALID_CIDR,
        ),
        (
            "bad-op",
            json!({"ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "a", "operator": "Has"}]}}]}]}),
            INVALID_SELECTOR,
        ),
    ];
    for (name, mut spec, reason) in cases {
        spec["podSelector"] = json!({});
        let res = resolve(&world(), &kube(vec![k8s_policy("x", name, spec)]));
        assert_eq!(invalid(&res), vec![(name, reason)]);
        assert!(res.policies.values().all(is_empty), "{name} contributed");
        let (_, Err(e)) = &res.sources[0] else {
            unreachable!()
        };
        assert!(!e.message.is_empty());
    }
}

#[test]
fn k8s_explicit_empty_rule_lists_deny_everything_in_their_types() {
    let res = resolve(
        &world(),
        &kube(vec![k8s_policy(
            "y",
            "lockdown",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "ingress": [], "egress": []}),
        )]),
    );
    let spec = &res.policies[&id("y", "c")];
    assert!(spec.default_deny.ingress && spec.default_deny.egress);
    assert_eq!(spec.ingress, vec![host_allow()]);
    assert!(spec.egress.is_empty());
}

#[test]
fn kinds_add_up_and_a_deny_stays_next_to_the_allow_it_beats() {
    let res = resolve(
        &world(),
        &Sources {
            kubernetes: vec![k8s_policy(
                "x",
                "allow-b",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
            )],
            namespaced: vec![tnp(
                "x",
                "deny-b-80",
                json!({"endpointSelector": {"matchLabels": {"pod": "a"}},
                       "enableDefaultDeny": {"ingress": false},
                       "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"pod": "b"}}],
                                        "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]}),
            )],
            ..Default::default()
        },
    );
    let spec = &res.policies[&id("x", "a")];
    assert!(spec.default_deny.ingress);
    assert_eq!(
        spec.ingress,
        vec![
            allow(&[HOST, id("x", "b")], &[]),
            deny(&[id("x", "b")], &[tcp(80)])
        ]
    );
    let kinds: Vec<_> = spec.sources.iter().map(|s| s.kind).collect();
    assert_eq!(kinds, [KIND_KUBERNETES, KIND_NAMESPACED]);
}

// --- Tendril NetworkPolicy / ClusterNetworkPolicy ------------------------------------------

#[test]
fn tendril_endpoint_selector_is_scoped_to_the_namespace() {
    let res = resolve(
        &world(),
        &namespaced(vec![tnp(
            "x",
            "a",
            json!({"endpointSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{}]}),
        )]),
    );
    assert!(res.policies[&id("x", "a")].default_deny.ingress);
    assert!(is_empty(&res.policies[&id("y", "a")]));
    // A cluster policy spans every namespace.
    let res = resolve(
        &world(),
        &cluster(vec![tcnp(
            "a",
            json!({"endpointSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{}]}),
        )]),
    );
    for ns in ["x", "y", "z"] {
        assert_eq!(res.policies[&id(ns, "a")].ingress, vec![allow(&[0], &[])]);
        assert!(is_empty(&res.policies[&id(ns, "b")]));
    }
    assert_eq!(res.sources[0].1, Ok(3));
}

#[test]
fn tendril_from_endpoints_scoping() {
    let from = |sel: Value| json!({"endpointSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"fromEndpoints": [sel]}]});
    let peers = |res: &Resolution| {
        res.policies[&id("x", "a")]
            .ingress
            .last()
            .unwrap()
            .peers
            .clone()
    };

    // Namespaced: limited to the policy's namespace.
    let res = resolve(
        &world(),
        &namespaced(vec![tnp(
            "x",
            "p",
            from(json!({"matchLabels": {"pod": "b"}})),
        )]),
    );
    assert_eq!(peers(&res), vec![HOST, id("x", "b")]);
    let res = resolve(&world(), &namespaced(vec![tnp("x", "p", from(json!({})))]));
    assert_eq!(peers(&res), [vec![HOST], all_of("x")].concat());
    // …unless the selector names the namespace label.
    let res = resolve(
        &world(),
        &namespaced(vec![tnp(
            "x",
            "p",
            from(json!({"matchLabels": {"pod": "b", "io.kubernetes.pod.namespace": "y"}})),
        )]),
    );
    assert_eq!(peers(&res), vec![HOST, id("y", "b")]);
    let res = resolve(
        &world(),
        &namespaced(vec![tnp(
            "x",
            "p",
            from(
                json!({"matchExpressions": [{"key": "k8s:io.kubernetes.pod.namespace", "operator": "Exists"}], "matchLabels": {"pod": "c"}}),
            ),
        )]),
    );
    assert_eq!(
        peers(&res),
        vec![HOST, id("x", "c"), id("y", "c"), id("z", "c")]
    );
    // Cluster: unrestricted.
    let res = resolve(
        &world(),
        &cluster(vec![tcnp("p", from(json!({"matchLabels": {"pod": "b"}})))]),
    );
    assert_eq!(
        peers(&res),
        vec![HOST, id("x", "b"), id("y", "b"), id("z", "b")]
    );
}

#[test]
fn tendril_selector_keys_default_to_the_k8s_source() {
    for key in [
        "app.kubernetes.io/name",
        "k8s:app.kubernetes.io/name",
        "any:app.kubernetes.io/name",
    ] {
        let res = resolve(
            &world(),
            &cluster(vec![tcnp(
                "p",
                json!({"endpointSelector": {"matchLabels": {key: "app-c"}}, "egress": [{}]}),
            )]),
        );
        assert_eq!(res.sources[0].1, Ok(3), "{key}");
    }
    // Another source is literal: no pod identity has reserved labels.
    let res = resolve(
        &world(),
        &cluster(vec![tcnp(
            "p",
            json!({"endpointSelector": {"matchLabels": {"reserved:host": ""}}, "egress": [{}]}),
        )]),
    );
    assert_eq!(res.sources[0].1, Ok(0));
}

#[test]
fn tendril_entities_map_to_reserved_identities() {
    let cases: [(&str, Vec<i64>); 10] = [
        ("host", vec![1]),
        ("world", vec![2]),
        ("unmanaged", vec![3]),
        ("health", vec![4]),
        ("init", vec![5]),
        ("remote-node", vec![6]),
        ("kube-apiserver", vec![7]),
        ("ingress", vec![8]),
        ("all", vec![0]),
        ("cluster", [vec![1, 3, 4, 5, 6, 7, 8], everyone()].concat()),
    ];
    for (entity, want) in cases {
        let res = resolve(
            &world(),
            &namespaced(vec![tnp(
                "x",
                "p",
                json!({"endpointSelector": {}, "egress": [{"toEntities": [entity]}]}),
            )]),
        );
        assert_eq!(
            res.policies[&id("x", "a")].egress,
            vec![allow(&want, &[])],
            "{entity}"
        );
    }
    let res = resolve(
        &world(),
        &namespaced(vec![tnp(
            "x",
            "p",
            json!({"endpointSelector": {}, "egress": [{"toEntities": ["moon"]}]}),
        )]),
    );
    assert_eq!(invalid(&res), vec![("p", INVALID_SELECTOR)]);
}

#[test]
fn tendril_cidrs_and_cidr_sets_with_except() {
    let res = resolve(
        &world(),
        &namespaced(vec![tnp(
            "x",
            "p",
            json!({"endpointSelector": {}, "egress": [{
                "toCIDR": ["192.0.2.0/24", "2001:db8::/32"],
                "toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.128.0.0/9"]}],
            }]}),
        )]),
    );
    assert_eq!(
        res.policies[&id("x", "a")].egress,
        vec![rule(
            ALLOW,
            &[],
            &["10.0.0.0/9", "192.0.2.0/24", "2001:db8::/32"],
            &[]
        )]
    );
    for (name, spec) in [
        (
            "bad",
            json!({"endpointSelector": {}, "egress": [{"toCIDR": ["300.0.0.0/8"]}]}),
        ),
        (
            "outside",
            json!({"endpointSelector": {}, "egress": [{"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["192.0.2.0/24"]}]}]}),
        ),
    ] {
        let res = resolve(&world(), &namespaced(vec![tnp("x", name, spec)]));
        assert_eq!(invalid(&res), vec![(name, INVALID_CIDR)]);
    }
}

#[test]
fn tendril_deny_rules_are_kept_and_deny_only_policies_default_deny() {
    let res = resolve(
        &world(),
        &namespaced(vec![tnp(
            "x",
            "p",
            json!({"endpointSelector": {}, "ingressDeny": [{"fromEntities": ["host"]}],
                   "egressDeny": [{"toEndpoints": [{"matchLabels": {"pod": "b"}}], "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]}),
        )]),
    );
    let spec = &res.policies[&id("x", "a")];
    assert!(spec.default_deny.ingress && spec.default_deny.egress);
    // The implicit host allow is there, and so is the explicit host deny that beats it.
    assert_eq!(spec.ingress, vec![host_allow(), deny(&[HOST], &[])]);
    assert_eq!(spec.egress, vec![deny(&[id("x", "b")], &[tcp(80)])]);
}

#[test]
fn tendril_ports_any_protocol_ranges_and_all() {
    let res = resolve(
        &world(),
        &namespaced(vec![tnp(
            "x",
            "p",
            json!({"endpointSelector": {}, "ingress": [
                {"fromEntities": ["world"], "toPorts": [{"ports": [{"port": "80"}, {"port": "1000", "endPort": 1010, "protocol": "UDP"}]}]},
                {"fromEntities": ["health"], "toPorts": [{"ports": [{"port": "0", "protocol": "TCP"}]}]},
                {"fromEntities": ["init"], "toPorts": [{"ports": [{"port": "0"}]}]},
                {"fromEntities": ["ingress"], "toPorts": [{"ports": [{"port": "http"}]}]},
            ]}),
        )]),
    );
    assert_eq!(
        res.policies[&id("x", "a")].ingress,
        vec![
            allow(&[HOST, 5], &[]),
            allow(
                &[2],
                &[
                    port("SCTP", 80),
                    tcp(80),
                    port("UDP", 80),
                    range("UDP", 1000, 1010)
                ]
            ),
            allow(&[4], &[port("TCP", 0)]),
            allow(
                &[8],
                &[
                    named("SCTP", "http"),
                    named("TCP", "http"),
                    named("UDP", "http")
                ]
            ),
        ]
    );
    for (name, p) in [
        ("named-range", json!({"port": "http", "endPort": 90})),
        ("too-big", json!({"port": "70000"})),
        ("bad-proto", json!({"port": "80", "protocol": "ICMP"})),
        ("bad-name", json!({"port": "Http"})),
    ] {
        let res = resolve(
            &world(),
            &namespaced(vec![tnp(
                "x",
                name,
                json!({"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [p]}]}]}),
            )]),
        );
        assert_eq!(invalid(&res), vec![(name, INVALID_PORT)]);
        assert!(res.policies.values().all(is_empty));
    }
}

#[test]
fn tendril_rule_without_peers_is_every_peer() {
    let res = resolve(
        &world(),
        &namespaced(vec![tnp(
            "x",
            "p",
            json!({"endpointSelector": {}, "egress": [{"toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}]}]}]}),
        )]),
    );
    assert_eq!(
        res.policies[&id("x", "a")].egress,
        vec![allow(&[0], &[port("UDP", 53)])]
    );
}

#[test]
fn tendril_enable_default_deny_switches() {
    // Rules but no default deny: allows only (they matter when another policy isolates).
    let res = resolve(
        &world(),
        &namespaced(vec![tnp(
            "x",
            "p",
            json!({"endpointSelector": {}, "enableDefaultDeny": {"ingress": false},
                   "ingress": [{"fromEntities": ["world"]}], "egress": [{"toEntities": ["world"]}]}),
        )]),
    );
    let spec = &res.policies[&id("x", "a")];
    assert!(!spec.default_deny.ingress && spec.default_deny.egress);
    assert_eq!(spec.ingress, vec![allow(&[2], &[])]);
    // Default deny without any rule.
    let res = resolve(
        &world(),
        &cluster(vec![tcnp(
            "p",
            json!({"endpointSelector": {}, "enableDefaultDeny": {"egress": true}}),
        )]),
    );
    let spec = &res.policies[&id("z", "c")];
    assert!(!spec.default_deny.ingress && spec.default_deny.egress);
    assert!(spec.ingress.is_empty() && spec.egress.is_empty());
    // Default deny is an OR over the policies selecting a subject.
    let res = resolve(
        &world(),
        &Sources {
            namespaced: vec![tnp(
                "x",
                "off",
                json!({"endpointSelector": {}, "enableDefaultDeny": {"ingress": false}, "ingress": [{}]}),
            )],
            cluster: vec![tcnp(
                "on",
                json!({"endpointSelector": {}, "ingress": [{"fromEntities": ["world"]}]}),
            )],
            ..Default::default()
        },
    );
    assert!(res.policies[&id("x", "a")].default_deny.ingress);
}

#[test]
fn tendril_unsupported_and_invalid_policies_are_left_out() {
    let res = resolve(
        &world(),
        &Sources {
            namespaced: vec![
                tnp("x", "no-selector", json!({"ingress": [{}]})),
                tnp(
                    "x",
                    "bad-op",
                    json!({"endpointSelector": {"matchExpressions": [{"key": "a", "operator": "Like", "values": ["b"]}]}}),
                ),
            ],
            cluster: vec![tcnp("hosts", json!({"nodeSelector": {}, "ingress": [{}]}))],
            ..Default::default()
        },
    );
    assert_eq!(
        invalid(&res),
        vec![
            ("hosts", UNSUPPORTED),
            ("bad-op", INVALID_SELECTOR),
            ("no-selector", INVALID_SELECTOR)
        ]
    );
    assert!(res.policies.values().all(is_empty));
}

// --- host allow, canonical form --------------------------------------------------------

#[test]
fn host_is_allowed_in_only_under_ingress_default_deny() {
    let res = resolve(
        &world(),
        &namespaced(vec![tnp(
            "x",
            "p",
            json!({"endpointSelector": {}, "egress": [{"toEntities": ["world"]}]}),
        )]),
    );
    let spec = &res.policies[&id("x", "a")];
    assert!(spec.ingress.is_empty());
    assert_eq!(spec.egress, vec![allow(&[2], &[])]);
}

#[test]
fn canonical_form_merges_sorts_and_dedupes() {
    let p = |peers: &[i64], ports: &[Port]| Rule {
        verdict: Verdict::Allow,
        peers: peers.to_vec(),
        cidrs: vec![],
        ports: ports.to_vec(),
    };
    let t = |n| Port::range(Protocol::Tcp, n, n);
    let rules = vec![
        p(&[300, 257], &[t(80)]),
        p(&[257, 257], &[t(80)]),
        p(&[258], &[t(81), t(80)]),
        p(&[260], &[t(81)]),
        p(&[0, 5], &[t(443)]),
        p(&[], &[t(1)]),
        Rule {
            cidrs: vec![
                "10.0.0.0/9".parse().unwrap(),
                "10.128.0.0/9".parse().unwrap(),
            ],
            ..p(&[], &[t(443)])
        },
    ];
    let mut reversed = rules.clone();
    reversed.reverse();
    let want = vec![
        p(&[0], &[t(443)]),
        p(&[257, 300], &[t(80)]),
        p(&[258], &[Port::range(Protocol::Tcp, 80, 81)]),
        p(&[260], &[t(81)]),
    ];
    // Duplicated peers collapse, the rule that selects nobody goes, two halves of 10/8
    // aggregate and then fall under the any-peer rule of the same port; the form is
    // canonical (order-independent, idempotent), not minimal.
    assert_eq!(canonical(rules.clone()), want);
    assert_eq!(canonical(reversed), want);
    assert_eq!(canonical(canonical(rules)), want);

    // Same peers: ports merge and adjacent ranges coalesce.
    let merged = canonical(vec![
        p(&[7], &[t(80)]),
        p(&[7], &[t(81), Port::range(Protocol::Tcp, 82, 90)]),
    ]);
    assert_eq!(merged, vec![p(&[7], &[Port::range(Protocol::Tcp, 80, 90)])]);
    // All ports of a protocol absorb its other entries; "all" absorbs everything.
    assert_eq!(
        canonical(vec![p(
            &[7],
            &[
                t(80),
                Port::range(Protocol::Tcp, 0, 0),
                Port::named(Protocol::Tcp, "x")
            ]
        )]),
        vec![p(&[7], &[Port::range(Protocol::Tcp, 0, 0)])]
    );
    assert_eq!(
        canonical(vec![p(&[7], &[t(80)]), p(&[7], &[])]),
        vec![p(&[7], &[])]
    );
}

#[test]
fn outcomes_are_sorted_with_selected_counts() {
    let res = resolve(
        &world(),
        &Sources {
            kubernetes: vec![k8s_policy("y", "k", json!({"podSelector": {}}))],
            namespaced: vec![tnp(
                "z",
                "n",
                json!({"endpointSelector": {"matchLabels": {"pod": "a"}}}),
            )],
            cluster: vec![tcnp("c", json!({"endpointSelector": {}}))],
        },
    );
    let got: Vec<_> = res
        .sources
        .iter()
        .map(|(s, r)| (s.kind, s.name.as_str(), s.generation, r.clone().unwrap()))
        .collect();
    assert_eq!(
        got,
        vec![
            (KIND_CLUSTER, "c", Some(2), 9),
            (KIND_KUBERNETES, "k", Some(1), 3),
            (KIND_NAMESPACED, "n", Some(3), 1),
        ]
    );
    // A selecting policy is a source even when it adds no rule.
    assert_eq!(res.policies[&id("z", "a")].sources.len(), 2);
}

// --- scale -------------------------------------------------------------------------------

/// `identities` pod identities in 20 namespaces, 25 apps each; `rules` ingress rules
/// spread over policies of 10 rules, each selecting one app and allowing other apps.
fn scale_world(identities: i64, rules: usize) -> (BTreeMap<i64, Labels>, Sources) {
    let mut ids = BTreeMap::new();
    for i in 0..identities {
        let ns = format!("ns{}", i % 20);
        let labels: Labels = [
            (POD_NAMESPACE.to_string(), ns.clone()),
            (namespace_key("kubernetes.io/metadata.name"), ns),
            ("k8s:app".to_string(), format!("app{}", (i / 20) % 25)),
            ("k8s:version".to_string(), format!("v{}", i / 500)),
        ]
        .into();
        ids.insert(256 + i, labels);
    }
    let mut sources = Sources::default();
    for p in 0..rules.div_ceil(10) {
        let ns = format!("ns{}", p % 20);
        let ingress: Vec<Value> = (0..10)
            .map(|r| {
                json!({"fromEndpoints": [{"matchLabels": {"app": format!("app{}", (p + r) % 25)}}],
                       "toPorts": [{"ports": [{"port": format!("{}", 1000 + (p * 10 + r) % 5000), "protocol": "TCP"}]}]})
            })
            .collect();
        sources.namespaced.push(tnp(
            &ns,
            &format!("p{p}"),
            json!({"endpointSelector": {"matchLabels": {"app": format!("app{}", p % 25)}}, "ingress": ingress}),
        ));
        if p % 10 == 0 {
            sources.kubernetes.push(k8s_policy(
                &ns,
                &format!("k{p}"),
                json!({"podSelector": {"matchLabels": {"app": format!("app{}", p % 25)}},
                       "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "app1"}}}],
                                    "ports": [{"port": 80}]}]}),
            ));
        }
    }
    (ids, sources)
}

/// Prints resolve times (no assertion on speed); run with `--release` for real figures.
#[test]
fn resolve_scale_figures() {
    for rules in [10, 1_000, 10_000] {
        let (ids, sources) = scale_world(1_000, rules);
        let start = std::time::Instant::now();
        let res = resolve(&ids, &sources);
        let took = start.elapsed();
        let entries: usize = res.policies.values().map(|p| p.ingress.len()).sum();
        println!(
            "resolve: {rules} rules × {} identities → {} policies, {entries} ingress entries in {took:?}",
            ids.len(),
            res.policies.len()
        );
        assert_eq!(res.policies.len(), 1_000);
        assert!(res.sources.iter().all(|(_, r)| r.is_ok()));
        assert!(entries > 0);
    }
}

// --- properties ---------------------------------------------------------------------------

mod properties {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::select;

    fn identities() -> impl Strategy<Value = BTreeMap<i64, Labels>> {
        prop::collection::vec(
            (
                select(vec!["x", "y", "z"]),
                select(vec!["a", "b", "c"]),
                0..3u8,
            ),
            0..12,
        )
        .prop_map(|pods| {
            let mut ids: BTreeMap<i64, Labels> =
                world().into_iter().filter(|(id, _)| *id < 256).collect();
            for (i, (ns, pod, tier)) in pods.into_iter().enumerate() {
                let mut labels: Labels = [
                    (POD_NAMESPACE.to_string(), ns.to_string()),
                    (namespace_key("ns"), ns.to_string()),
                    ("k8s:pod".to_string(), pod.to_string()),
                ]
                .into();
                if tier > 0 {
                    labels.insert("k8s:tier".to_string(), tier.to_string());
                }
                ids.insert(256 + i as i64, labels);
            }
            ids
        })
    }

    fn selector() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(json!({})),
            select(vec!["a", "b", "c"]).prop_map(|p| json!({"matchLabels": {"pod": p}})),
            (select(vec!["In", "NotIn"]), select(vec!["a", "b"]))
                .prop_map(|(op, v)| json!({"matchExpressions": [{"key": "pod", "operator": op, "values": [v]}]})),
            select(vec!["Exists", "DoesNotExist"])
                .prop_map(|op| json!({"matchExpressions": [{"key": "tier", "operator": op}]})),
            select(vec!["x", "y"]).prop_map(|ns| json!({"matchLabels": {"io.kubernetes.pod.namespace": ns}})),
        ]
    }

    fn ports() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(json!([])),
            (select(vec!["80", "81", "0", "http"]), select(vec!["TCP", "UDP", "ANY"]))
                .prop_map(|(p, proto)| json!([{"ports": [{"port": p, "protocol": proto}]}])),
            (80..90i32, 0..5i32).prop_map(|(p, len)| json!([{"ports": [{"port": p.to_string(), "endPort": p + len, "protocol": "TCP"}]}])),
        ]
    }

    fn tendril_rule(dir: &'static str) -> impl Strategy<Value = Value> {
        let (eps, ents, cidrs) = if dir == "in" {
            ("fromEndpoints", "fromEntities", "fromCIDRSet")
        } else {
            ("toEndpoints", "toEntities", "toCIDRSet")
        };
        (
            prop::option::of(selector()),
            prop::option::of(select(vec!["host", "world", "cluster", "all"])),
            prop::option::of(select(vec!["10.0.0.0/8", "10.1.0.0/16", "192.0.2.0/24"])),
            ports(),
        )
            .prop_map(move |(sel, ent, cidr, ports)| {
                let mut r = json!({"toPorts": ports});
                if let Some(s) = sel {
                    r[eps] = json!([s]);
                }
                if let Some(e) = ent {
                    r[ents] = json!([e]);
                }
                if let Some(c) = cidr {
                    r[cidrs] = json!([{"cidr": c, "except": if c == "10.0.0.0/8" { vec!["10.2.0.0/16"] } else { vec![] }}]);
                }
                r
            })
    }

    /// A Tendril policy spec; `allows` false gives a deny-only policy.
    fn tendril_spec(allows: bool) -> impl Strategy<Value = Value> {
        (
            selector(),
            prop::collection::vec(tendril_rule("in"), 0..3),
            prop::collection::vec(tendril_rule("in"), 0..2),
            prop::collection::vec(tendril_rule("out"), 0..3),
            prop::collection::vec(tendril_rule("out"), 0..2),
            prop::option::of((any::<bool>(), any::<bool>())),
        )
            .prop_map(move |(sel, ing, ing_deny, eg, eg_deny, dd)| {
                let mut spec = json!({"endpointSelector": sel, "ingressDeny": ing_deny, "egressDeny": eg_deny});
                if allows {
                    spec["ingress"] = json!(ing);
                    spec["egress"] = json!(eg);
                }
                if let Some((i, e)) = dd {
                    spec["enableDefaultDeny"] = json!({"ingress": i, "egress": e});
                }
                spec
            })
    }

    fn k8s_spec() -> impl Strategy<Value = Value> {
        let peer = prop_oneof![
            selector().prop_map(|s| json!({"podSelector": s})),
            select(vec!["x", "y"])
                .prop_map(|ns| json!({"namespaceSelector": {"matchLabels": {"ns": ns}}})),
            Just(json!({"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/16"]}})),
        ];
        let port = prop_oneof![
            Just(json!([])),
            (80..82i32, select(vec!["TCP", "UDP", "SCTP"]))
                .prop_map(|(p, proto)| json!([{"port": p, "protocol": proto}])),
            Just(json!([{"port": "http"}])),
        ];
        (
            selector(),
            prop::option::of(prop::collection::vec(
                (prop::collection::vec(peer, 0..2), port),
                0..3,
            )),
            prop::option::of(select(vec![
                vec!["Ingress"],
                vec!["Egress"],
                vec!["Ingress", "Egress"],
            ])),
        )
            .prop_map(|(sel, rules, types)| {
                let rules: Option<Vec<Value>> = rules.map(|r| {
                    r.into_iter()
                        .map(|(from, ports)| json!({"from": from, "ports": ports}))
                        .collect()
                });
                let mut spec = json!({"podSelector": sel});
                if let Some(r) = &rules {
                    spec["ingress"] = json!(r);
                    let to: Vec<Value> = r
                        .iter()
                        .map(|r| json!({"to": r["from"], "ports": r["ports"]}))
                        .collect();
                    spec["egress"] = json!(to);
                }
                if let Some(t) = types {
                    spec["policyTypes"] = json!(t);
                }
                spec
            })
    }

    fn sources(allows: bool) -> impl Strategy<Value = Sources> {
        (
            prop::collection::vec((select(vec!["x", "y"]), tendril_spec(allows)), 0..4),
            prop::collection::vec(tendril_spec(allows), 0..2),
            prop::collection::vec((select(vec!["x", "y"]), k8s_spec()), 0..3),
        )
            .prop_map(move |(ns, cl, k)| Sources {
                namespaced: ns
                    .into_iter()
                    .enumerate()
                    .map(|(i, (n, s))| tnp(n, &format!("n{i}"), s))
                    .collect(),
                cluster: cl
                    .into_iter()
                    .enumerate()
                    .map(|(i, s)| tcnp(&format!("c{i}"), s))
                    .collect(),
                kubernetes: if allows {
                    k.into_iter()
                        .enumerate()
                        .map(|(i, (n, s))| k8s_policy(n, &format!("k{i}"), s))
                        .collect()
                } else {
                    Vec::new()
                },
            })
    }

    /// The internal rule an API rule came from (for idempotence checks).
    fn from_api(r: &ResolvedRule) -> Rule {
        Rule {
            verdict: if r.verdict == ALLOW {
                Verdict::Allow
            } else {
                Verdict::Deny
            },
            peers: r.peers.clone(),
            cidrs: r.cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            ports: r
                .ports
                .iter()
                .map(|p| Port {
                    protocol: p.protocol,
                    name: p.name.clone(),
                    start: p.port as u16,
                    end: p.end_port.unwrap_or(p.port) as u16,
                })
                .collect(),
        }
    }

    fn check_canonical(rules: &[ResolvedRule]) -> Result<(), TestCaseError> {
        let internal: Vec<Rule> = rules.iter().map(from_api).collect();
        prop_assert_eq!(&canonical(internal.clone()), &internal, "not a fixpoint");
        let mut by_ports = BTreeSet::new();
        let mut by_peers = BTreeSet::new();
        for r in &internal {
            prop_assert!(!r.matches_nothing());
            prop_assert!(r.peers.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(
                !r.peers.contains(&ANY_PEER) || (r.peers.len() == 1 && r.cidrs.is_empty())
            );
            prop_assert!(
                by_ports.insert((r.verdict, r.ports.clone())),
                "two rules with the same ports"
            );
            prop_assert!(
                by_peers.insert((r.verdict, r.peers.clone(), r.cidrs.clone())),
                "two rules with the same peers"
            );
        }
        prop_assert!(internal.windows(2).all(|w| w[0] < w[1]), "not sorted");
        Ok(())
    }

    fn shuffled(s: &Sources) -> Sources {
        let mut s = s.clone();
        s.kubernetes.reverse();
        s.namespaced.reverse();
        s.cluster.reverse();
        s
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn output_is_canonical_complete_and_order_independent(ids in identities(), sources in sources(true)) {
            let res = resolve(&ids, &sources);
            let cluster_ids: Vec<i64> = ids.keys().copied().filter(|&i| i >= 256).collect();
            prop_assert_eq!(res.policies.keys().copied().collect::<Vec<_>>(), cluster_ids);
            prop_assert_eq!(&resolve(&ids, &shuffled(&sources)), &res);
            prop_assert_eq!(
                res.sources.len(),
                sources.kubernetes.len() + sources.namespaced.len() + sources.cluster.len()
            );
            for spec in res.policies.values() {
                check_canonical(&spec.ingress)?;
                check_canonical(&spec.egress)?;
                prop_assert!(spec.ingress.iter().chain(&spec.egress).all(|r| r.ports.iter().all(|p| p.protocol != Protocol::Any)));
                // Default deny in ingress ⇔ the host (or anyone) is allowed in on every port.
                let host_in = spec.ingress.iter().any(|r| {
                    r.verdict == ALLOW && r.ports.is_empty() && (r.peers.contains(&HOST) || r.peers == [ANY_PEER])
                });
                prop_assert!(!spec.default_deny.ingress || host_in);
            }
        }

        #[test]
        fn deny_only_policies_allow_nothing_but_the_host(ids in identities(), sources in sources(false)) {
            let res = resolve(&ids, &sources);
            for spec in res.policies.values() {
                for r in spec.ingress.iter().filter(|r| r.verdict == ALLOW) {
                    prop_assert_eq!(r, &host_allow());
                }
                prop_assert!(spec.egress.iter().all(|r| r.verdict == DENY));
            }
        }

        #[test]
        fn an_invalid_policy_changes_nothing(ids in identities(), sources in sources(true), spec in tendril_spec(true)) {
            let before = resolve(&ids, &sources);
            let mut broken = sources.clone();
            let mut spec = spec;
            spec["ingress"] = json!([{"fromCIDR": ["10.0.0.0/33"]}]);
            broken.cluster.push(tcnp("broken", spec));
            let after = resolve(&ids, &broken);
            prop_assert_eq!(&after.policies, &before.policies);
            prop_assert!(after.sources.iter().any(|(s, r)| s.name == "broken" && r.as_ref().is_err_and(|e| e.reason == INVALID_CIDR)));
        }
    }
}
