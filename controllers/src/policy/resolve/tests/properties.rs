//! Properties over generated worlds: canonical, complete, order-independent output;
//! deny-only policies allow nothing but the host; an invalid policy changes nothing.

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
        (select(vec!["In", "NotIn"]), select(vec!["a", "b"])).prop_map(
            |(op, v)| json!({"matchExpressions": [{"key": "pod", "operator": op, "values": [v]}]})
        ),
        select(vec!["Exists", "DoesNotExist"])
            .prop_map(|op| json!({"matchExpressions": [{"key": "tier", "operator": op}]})),
        select(vec!["x", "y"])
            .prop_map(|ns| json!({"matchLabels": {"io.kubernetes.pod.namespace": ns}})),
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
            let mut spec =
                json!({"endpointSelector": sel, "ingressDeny": ing_deny, "egressDeny": eg_deny});
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
        prop_assert!(!r.peers.contains(&ANY_PEER) || (r.peers.len() == 1 && r.cidrs.is_empty()));
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

/// Sources of `a` and `b` mixed by `pick` (per position: from `b` when set), so a sequence
/// of worlds changes some sources and keeps others.
fn mixed(a: &Sources, b: &Sources, pick: &[bool]) -> Sources {
    fn mix<T: Clone>(a: &[T], b: &[T], pick: &[bool]) -> Vec<T> {
        (0..a.len().max(b.len()))
            .filter_map(|i| {
                let from_b = pick.get(i % pick.len().max(1)).copied().unwrap_or(false);
                if from_b { b.get(i) } else { a.get(i) }.cloned()
            })
            .collect()
    }
    Sources {
        kubernetes: mix(&a.kubernetes, &b.kubernetes, pick),
        namespaced: mix(&a.namespaced, &b.namespaced, &pick[1..]),
        cluster: mix(&a.cluster, &b.cluster, &pick[2..]),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The incremental resolver, fed a sequence of worlds (sources and identities changing
    /// a few at a time), gives exactly what a resolve from scratch gives for each.
    #[test]
    fn the_incremental_resolver_equals_a_full_resolve(
        ids_a in identities(),
        ids_b in identities(),
        a in sources(true),
        b in sources(true),
        picks in prop::collection::vec(prop::collection::vec(any::<bool>(), 4), 1..6),
    ) {
        let mut resolver = Resolver::default();
        for (step, pick) in picks.iter().enumerate() {
            let ids = if pick[3] { &ids_b } else { &ids_a };
            let sources = mixed(&a, &b, pick);
            let work = resolver.resolve(ids, &sources);
            prop_assert_eq!(resolver.resolution(), &resolve(ids, &sources), "step {}", step);
            // Nothing changed: nothing is redone.
            let again = resolver.resolve(ids, &sources);
            prop_assert_eq!(again, ResolveWork::default(), "step {} redid {:?} before", step, work);
            prop_assert_eq!(resolver.resolution(), &resolve(ids, &sources));
        }
    }
}
