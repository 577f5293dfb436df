//! Kubernetes `NetworkPolicy` exactly as upstream reads it.

use super::*;
use pretty_assertions::assert_eq;
use serde_json::json;

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
