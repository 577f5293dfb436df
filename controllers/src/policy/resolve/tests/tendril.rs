//! Tendril `NetworkPolicy` and `ClusterNetworkPolicy` as Cilium reads them.

use super::*;
use pretty_assertions::assert_eq;
use serde_json::json;

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
