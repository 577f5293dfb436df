use super::plan::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};
use tendril_crds::v1alpha1::{EgressGateway, EgressGatewayPolicySpec, EgressSelector};

fn select(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Default::default()
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn policy(name: &str) -> PolicyInput {
    PolicyInput {
        name: name.into(),
        generation: Some(1),
        spec: EgressGatewayPolicySpec {
            selectors: vec![EgressSelector {
                pod_selector: Some(select(&[("app", "client")])),
                namespace_selector: None,
            }],
            destination_cidrs: vec!["192.0.2.7/24".into()],
            excluded_cidrs: vec!["192.0.2.128/25".into()],
            egress_gateway: EgressGateway {
                node_selector: select(&[("egress", "true")]),
                interface: None,
                egress_ip: Some("198.51.100.10".into()),
            },
        },
        current_gateway: None,
        previous_ready: None,
    }
}

fn node(name: &str, gateway: bool, ready: bool) -> NodeInput {
    NodeInput {
        name: name.into(),
        labels: if gateway {
            labels(&[("egress", "true")])
        } else {
            BTreeMap::new()
        },
        ready,
        address: Some(std::net::IpAddr::from([
            10,
            0,
            0,
            (name.bytes().map(u32::from).sum::<u32>() % 250 + 1) as u8,
        ])),
    }
}

fn endpoint(pairs: &[(&str, &str)], ip: &str) -> EndpointInput {
    EndpointInput {
        labels: std::sync::Arc::new(labels(pairs)),
        ips: vec![ip.parse().unwrap()],
    }
}

#[test]
fn selected_pods_destinations_and_gateway_make_the_route() {
    let nodes = [node("a", true, true), node("b", false, true)];
    let endpoints = [
        endpoint(&[("k8s:app", "client")], "10.244.1.5"),
        endpoint(&[("k8s:app", "other")], "10.244.1.6"),
    ];
    let out = plan(&[policy("p")], &nodes, &endpoints);
    let route = &out.routes["p"];
    assert_eq!(route.source_ips, vec!["10.244.1.5"]);
    // Canonical: host bits cleared.
    assert_eq!(route.destination_cidrs, vec!["192.0.2.0/24"]);
    assert_eq!(route.excluded_cidrs, vec!["192.0.2.128/25"]);
    assert_eq!(route.gateway_node.as_deref(), Some("a"));
    assert_eq!(route.gateway_ip, nodes[0].address.map(|a| a.to_string()));
    assert_eq!(route.egress_ip.as_deref(), Some("198.51.100.10"));
    let o = &out.policies["p"];
    assert!(o.valid.status);
    let ready = o.ready.as_ref().unwrap();
    assert!(ready.status);
    assert_eq!(ready.reason, REASON_GATEWAY_SELECTED);
    assert_eq!(o.change.as_ref().unwrap().reason, ChangeReason::Assigned);
}

#[test]
fn namespace_selector_reads_namespace_labels_and_both_parts_must_match() {
    let mut p = policy("p");
    p.spec.selectors = vec![EgressSelector {
        pod_selector: Some(select(&[("app", "client")])),
        namespace_selector: Some(select(&[("team", "blue")])),
    }];
    let endpoints = [
        endpoint(
            &[
                ("k8s:app", "client"),
                ("k8s:io.tendril.k8s.namespace.labels.team", "blue"),
            ],
            "10.244.1.5",
        ),
        endpoint(&[("k8s:app", "client")], "10.244.1.6"),
        endpoint(
            &[("k8s:io.tendril.k8s.namespace.labels.team", "blue")],
            "10.244.1.7",
        ),
    ];
    let out = plan(&[p], &[node("a", true, true)], &endpoints);
    assert_eq!(out.routes["p"].source_ips, vec!["10.244.1.5"]);
}

#[test]
fn current_gateway_is_kept_while_eligible() {
    let nodes: Vec<_> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| node(n, true, true))
        .collect();
    for n in ["a", "b", "c", "d"] {
        let mut p = policy("p");
        p.current_gateway = Some(n.into());
        let out = plan(&[p], &nodes, &[]);
        assert_eq!(out.routes["p"].gateway_node.as_deref(), Some(n));
        assert!(out.policies["p"].change.is_none());
    }
}

#[test]
fn failover_when_the_gateway_goes_not_ready_unlabelled_or_away() {
    let cases = [
        (node("a", true, false), ChangeReason::NodeNotReady),
        (node("a", false, true), ChangeReason::NodeNotSelected),
        (
            NodeInput {
                address: None,
                ..node("a", true, true)
            },
            ChangeReason::NodeWithoutAddress,
        ),
    ];
    for (a, reason) in cases {
        let mut p = policy("p");
        p.current_gateway = Some("a".into());
        let out = plan(&[p], &[a, node("b", true, true)], &[]);
        assert_eq!(out.routes["p"].gateway_node.as_deref(), Some("b"));
        let change = out.policies["p"].change.clone().unwrap();
        assert_eq!(change.reason, reason);
        assert_eq!(change.from.as_deref(), Some("a"));
        let ready = out.policies["p"].ready.clone().unwrap();
        assert_eq!(ready.reason, REASON_FAILED_OVER);
        assert!(ready.message.contains("a -> b"), "{}", ready.message);
    }
    let mut p = policy("p");
    p.current_gateway = Some("gone".into());
    let out = plan(&[p], &[node("b", true, true)], &[]);
    assert_eq!(
        out.policies["p"].change.as_ref().unwrap().reason,
        ChangeReason::NodeDeleted
    );
}

#[test]
fn failover_stays_visible_until_the_next_change() {
    let mut p = policy("p");
    p.current_gateway = Some("b".into());
    p.previous_ready = Some(tendril_runtime::DesiredCondition::new(
        "Ready",
        true,
        REASON_FAILED_OVER,
        "gateway a -> b (NodeNotReady)",
    ));
    // "a" is back: the policy stays on "b" and keeps reporting the failover.
    let out = plan(&[p], &[node("a", true, true), node("b", true, true)], &[]);
    assert_eq!(out.routes["p"].gateway_node.as_deref(), Some("b"));
    let ready = out.policies["p"].ready.clone().unwrap();
    assert_eq!(ready.reason, REASON_FAILED_OVER);
    assert!(out.policies["p"].change.is_none());
}

#[test]
fn no_eligible_node_keeps_the_route_without_gateway() {
    let mut p = policy("p");
    p.current_gateway = Some("a".into());
    let out = plan(
        &[p],
        &[node("a", true, false), node("b", false, true)],
        &[endpoint(&[("k8s:app", "client")], "10.244.1.5")],
    );
    let route = &out.routes["p"];
    // Still steered (and dropped by the datapath), never sent out with a pod address.
    assert_eq!(route.source_ips, vec!["10.244.1.5"]);
    assert_eq!(route.gateway_node, None);
    assert_eq!(route.gateway_ip, None);
    let o = &out.policies["p"];
    assert_eq!(
        o.change.as_ref().unwrap().reason,
        ChangeReason::NoneEligible
    );
    let ready = o.ready.clone().unwrap();
    assert!(!ready.status);
    assert_eq!(ready.reason, REASON_NO_GATEWAY);
}

#[test]
fn invalid_policy_is_held_with_a_message() {
    let mut p = policy("p");
    p.spec.destination_cidrs = vec!["300.1.2.3/8".into()];
    let mut q = policy("q");
    q.spec.egress_gateway.node_selector = LabelSelector {
        match_expressions: Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                key: "egress".into(),
                operator: "Sideways".into(),
                values: None,
            },
        ]),
        ..Default::default()
    };
    let out = plan(&[p, q], &[node("a", true, true)], &[]);
    assert!(out.routes.is_empty());
    for name in ["p", "q"] {
        let o = &out.policies[name];
        assert!(!o.valid.status);
        assert_eq!(o.valid.reason, REASON_INVALID);
    }
    assert!(out.policies["p"].valid.message.contains("destinationCIDRs"));
    assert!(out.policies["q"].valid.message.contains("nodeSelector"));
    assert_eq!(out.held().len(), 2);
}

#[test]
fn choice_does_not_depend_on_node_order() {
    let mut nodes: Vec<_> = (0..7).map(|i| node(&format!("n{i}"), true, true)).collect();
    let first = plan(&[policy("p")], &nodes, &[]).routes["p"]
        .gateway_node
        .clone();
    nodes.reverse();
    let second = plan(&[policy("p")], &nodes, &[]).routes["p"]
        .gateway_node
        .clone();
    assert_eq!(first, second);
}

#[test]
fn policies_spread_over_gateway_nodes() {
    let nodes: Vec<_> = (0..4)
        .map(|i| node(&format!("node-{i}"), true, true))
        .collect();
    let policies: Vec<_> = (0..400).map(|i| policy(&format!("policy-{i}"))).collect();
    let out = plan(&policies, &nodes, &[]);
    let mut per_node: HashMap<String, usize> = HashMap::new();
    for r in out.routes.values() {
        *per_node.entry(r.gateway_node.clone().unwrap()).or_default() += 1;
    }
    assert_eq!(per_node.len(), 4, "{per_node:?}");
    // 100 expected per node; a fair hash stays well within ±40.
    assert!(
        per_node.values().all(|&n| (60..=140).contains(&n)),
        "{per_node:?}"
    );
}

proptest! {
    /// When a gateway fails, only its policies move, and they move to eligible nodes.
    #[test]
    fn failover_moves_only_the_failed_nodes_policies(failed in 0usize..5, count in 1usize..60) {
        let names: Vec<String> = (0..5).map(|i| format!("n{i}")).collect();
        let healthy: Vec<_> = names.iter().map(|n| node(n, true, true)).collect();
        let policies: Vec<_> = (0..count).map(|i| policy(&format!("p{i}"))).collect();
        let before = plan(&policies, &healthy, &[]);
        let mut after_nodes = healthy.clone();
        after_nodes[failed].ready = false;
        let after_policies: Vec<_> = policies
            .iter()
            .map(|p| PolicyInput {
                current_gateway: before.routes[&p.name].gateway_node.clone(),
                ..p.clone()
            })
            .collect();
        let after = plan(&after_policies, &after_nodes, &[]);
        for p in &policies {
            let was = before.routes[&p.name].gateway_node.clone().unwrap();
            let now = after.routes[&p.name].gateway_node.clone().unwrap();
            prop_assert_ne!(&now, &names[failed]);
            if was != names[failed] {
                prop_assert_eq!(was, now);
            } else {
                let change = after.policies[&p.name].change.clone().unwrap();
                prop_assert_eq!(change.reason, ChangeReason::NodeNotReady);
            }
        }
    }
}
