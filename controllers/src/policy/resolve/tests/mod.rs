//! The semantics of POLICY_SPEC §1, one named case each, on the netpol e2e world:
//! namespaces x, y, z with pods a, b, c each (one identity per pod).

mod kubernetes;
mod properties;
mod tendril;

use super::cidr::cidr_minus;
use super::ports::Port;
use super::*;
use crate::identities::labels::POD_NAMESPACE;
use ipnet::IpNet;
use k8s_openapi::api::networking::v1 as k8s;
use pretty_assertions::assert_eq;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use tendril_crds::v1alpha1::{Protocol, ResolvedPort, ResolvedRule};

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

#[test]
fn the_resolver_retranslates_an_api_object_only_when_its_resource_version_moves() {
    let ids = world();
    let with_version = |port: i32, version: &str| {
        let mut np = k8s_policy(
            "x",
            "web",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"protocol": "TCP", "port": port}]}]}),
        );
        np.metadata.resource_version = Some(version.into());
        kube(vec![np])
    };
    let mut resolver = Resolver::default();
    let first = resolver.resolve(&ids, &with_version(80, "1"));
    assert_eq!(first.translated, 1);
    assert_eq!(
        resolver.resolve(&ids, &with_version(80, "1")),
        ResolveWork::default()
    );
    let changed = resolver.resolve(&ids, &with_version(81, "2"));
    assert_eq!(
        changed,
        ResolveWork {
            translated: 1,
            combined: 1
        },
        "only x/a is selected"
    );
    assert_eq!(
        resolver.resolution(),
        &resolve(&ids, &with_version(81, "2"))
    );
}
