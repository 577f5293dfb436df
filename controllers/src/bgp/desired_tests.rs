//! The rules of [`super::desired`], one test each (or a few per test where they belong
//! together).

use super::desired::*;
use k8s_openapi::api::core::v1::{
    LoadBalancerIngress, LoadBalancerStatus, Node, NodeAddress, NodeStatus, Service, ServiceSpec,
    ServiceStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use pretty_assertions::assert_eq;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use tendril_crds::v1alpha1::{
    Advertisement, AdvertisementSource, AdvertisementType, BGP_ROUTER_ID_ANNOTATION,
    BGPAdvertisement, BGPNeighbor, BGPPeeringPolicySpec, Communities, NodeNetwork, NodeNetworkSpec,
    ServiceAddress, VirtualRouter,
};

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn select(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels(pairs)),
        match_expressions: None,
    }
}

fn node(name: &str, rack: &str, id: u8) -> NodeInput {
    NodeInput {
        name: name.into(),
        labels: labels(&[("rack", rack)]),
        router_id: Ok(Ipv4Addr::new(10, 0, 0, id)),
        pod_cidrs: vec![format!("10.244.{id}.0/24").parse().unwrap()],
    }
}

fn neighbor(address: &str, asn: i64) -> BGPNeighbor {
    BGPNeighbor {
        peer_address: address.into(),
        peer_asn: asn,
        peer_port: 179,
        ebgp_multihop_ttl: 1,
        connect_retry_time_seconds: 120,
        hold_time_seconds: 90,
        keep_alive_time_seconds: 30,
        graceful_restart: None,
        auth_secret_ref: None,
    }
}

fn router(asn: i64, neighbors: Vec<BGPNeighbor>) -> VirtualRouter {
    VirtualRouter {
        local_asn: asn,
        export_pod_cidr: false,
        service_selector: None,
        advertisements: vec![],
        neighbors,
    }
}

fn policy(name: &str, rack: Option<&str>, routers: Vec<VirtualRouter>) -> PolicyInput {
    PolicyInput {
        name: name.into(),
        generation: Some(1),
        spec: BGPPeeringPolicySpec {
            node_selector: rack.map(|r| select(&[("rack", r)])),
            virtual_routers: routers,
        },
    }
}

fn services_ad(addresses: &[ServiceAddress], selector: LabelSelector) -> BGPAdvertisement {
    BGPAdvertisement {
        advertisement_type: AdvertisementType::Service,
        addresses: addresses.to_vec(),
        selector: Some(selector),
        communities: None,
    }
}

fn pod_cidr_ad(standard: &[&str], large: &[&str]) -> BGPAdvertisement {
    BGPAdvertisement {
        advertisement_type: AdvertisementType::PodCIDR,
        addresses: vec![],
        selector: None,
        communities: Some(Communities {
            standard: standard.iter().map(|s| s.to_string()).collect(),
            large: large.iter().map(|s| s.to_string()).collect(),
        }),
    }
}

fn svc(key: &str, lb: &[&str]) -> ServiceInput {
    ServiceInput {
        key: key.into(),
        labels: labels(&[("announce", "bgp")]),
        load_balancer_ips: lb.iter().map(|s| s.parse().unwrap()).collect(),
        ..Default::default()
    }
}

fn ad(prefix: &str, source: AdvertisementSource, services: &[&str]) -> Advertisement {
    Advertisement {
        prefix: prefix.into(),
        source,
        services: services.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn prefixes(d: &Desired, node: &str) -> Vec<String> {
    d.configs[node].routers[0]
        .advertisements
        .iter()
        .map(|a| a.prefix.clone())
        .collect()
}

fn lb_router() -> VirtualRouter {
    let mut r = router(64512, vec![neighbor("192.0.2.1", 64513)]);
    r.advertisements = vec![services_ad(
        &[ServiceAddress::LoadBalancerIP],
        select(&[("announce", "bgp")]),
    )];
    r
}

#[test]
fn nodes_are_selected_by_the_node_selector_and_unselected_nodes_get_no_config() {
    let nodes = [
        node("n1", "r1", 1),
        node("n2", "r2", 2),
        node("n3", "r1", 3),
    ];
    let mut r = router(64512, vec![neighbor("192.0.2.1", 64513)]);
    r.export_pod_cidr = true;
    let d = desired(&[policy("rack1", Some("r1"), vec![r.clone()])], &nodes, &[]);
    assert_eq!(d.configs.keys().collect::<Vec<_>>(), ["n1", "n3"]);
    assert!(d.held.is_empty());
    let outcome = &d.policies["rack1"];
    assert_eq!(outcome.selected_nodes, 2);
    assert!(outcome.valid.status);
    assert_eq!(outcome.valid.reason, REASON_SELECTED);
    assert_eq!(outcome.valid.message, "selects 2 node(s)");
    let n1 = &d.configs["n1"];
    assert_eq!(n1.node_name, "n1");
    assert_eq!(n1.revision, 0, "numbered when written");
    assert_eq!(n1.routers[0].local_asn, 64512);
    assert_eq!(n1.routers[0].router_id, "10.0.0.1");
    assert_eq!(n1.routers[0].neighbors, vec![neighbor("192.0.2.1", 64513)]);
    // exportPodCIDR: the node's own pod CIDR, no communities.
    assert_eq!(
        n1.routers[0].advertisements,
        vec![ad("10.244.1.0/24", AdvertisementSource::PodCIDR, &[])]
    );
    // No node selector: every node.
    let d = desired(&[policy("all", None, vec![r])], &nodes, &[]);
    assert_eq!(d.configs.len(), 3);
    assert_eq!(d.policies["all"].selected_nodes, 3);
}

#[test]
fn router_id_is_the_annotation_else_the_first_ipv4_internal_ip() {
    let mut n = Node {
        status: Some(NodeStatus {
            addresses: Some(vec![
                NodeAddress {
                    type_: "Hostname".into(),
                    address: "n1".into(),
                },
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: "fd00::1".into(),
                },
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: "172.18.0.2".into(),
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    };
    n.metadata.name = Some("n1".into());
    assert_eq!(router_id(&n), Ok(Ipv4Addr::new(172, 18, 0, 2)));
    n.metadata.annotations = Some(labels(&[(BGP_ROUTER_ID_ANNOTATION, "10.1.1.1")]));
    assert_eq!(router_id(&n), Ok(Ipv4Addr::new(10, 1, 1, 1)));
    n.metadata.annotations = Some(labels(&[(BGP_ROUTER_ID_ANNOTATION, "fd00::9")]));
    assert!(
        router_id(&n)
            .unwrap_err()
            .contains("is not an IPv4 address")
    );
    n.metadata.annotations = None;
    n.status.as_mut().unwrap().addresses.as_mut().unwrap().pop();
    assert!(
        router_id(&n)
            .unwrap_err()
            .contains("no IPv4 InternalIP and no bgp.tendril.dev/router-id annotation")
    );
}

#[test]
fn a_node_without_router_id_is_held_and_the_policy_says_so() {
    let mut bad = node("n2", "r1", 2);
    bad.router_id = Err("it has no IPv4 InternalIP".into());
    let nodes = [node("n1", "r1", 1), bad];
    let d = desired(&[policy("p", Some("r1"), vec![lb_router()])], &nodes, &[]);
    assert_eq!(d.configs.keys().collect::<Vec<_>>(), ["n1"]);
    assert_eq!(d.held, BTreeSet::from(["n2".to_string()]));
    let v = &d.policies["p"].valid;
    assert!(!v.status);
    assert_eq!(v.reason, REASON_NO_ROUTER_ID);
    assert_eq!(
        v.message,
        "node n2 has no router id: it has no IPv4 InternalIP; those nodes keep their previous configuration"
    );
}

#[test]
fn node_input_takes_the_pod_cidrs_of_the_node_network() {
    let mut n = Node::default();
    n.metadata.name = Some("n1".into());
    let nn = NodeNetwork::new(
        "n1",
        NodeNetworkSpec {
            pod_cidrs: vec!["10.244.1.0/24".into(), "fd00:244:1::/64".into()],
            ..Default::default()
        },
    );
    let input = node_input(&n, Some(&nn));
    assert_eq!(
        input.pod_cidrs,
        vec![
            "10.244.1.0/24".parse().unwrap(),
            "fd00:244:1::/64".parse().unwrap()
        ]
    );
    assert!(node_input(&n, None).pod_cidrs.is_empty());
}

#[test]
fn service_addresses_are_host_prefixes_of_the_selected_services_only() {
    let mut r = router(64512, vec![neighbor("192.0.2.1", 64513)]);
    r.advertisements = vec![services_ad(
        &[
            ServiceAddress::LoadBalancerIP,
            ServiceAddress::ExternalIP,
            ServiceAddress::ClusterIP,
        ],
        select(&[("announce", "bgp")]),
    )];
    let mut web = svc("default/web", &["198.51.100.7", "2001:db8::7"]);
    web.external_ips = vec!["203.0.113.5".parse().unwrap()];
    web.cluster_ips = vec!["10.96.0.10".parse().unwrap()];
    let mut quiet = svc("default/quiet", &["198.51.100.8"]);
    quiet.labels = labels(&[("announce", "no")]);
    let d = desired(
        &[policy("p", None, vec![r])],
        &[node("n1", "r1", 1)],
        &[web, quiet],
    );
    assert_eq!(
        d.configs["n1"].routers[0].advertisements,
        vec![
            ad(
                "10.96.0.10/32",
                AdvertisementSource::ClusterIP,
                &["default/web"]
            ),
            ad(
                "198.51.100.7/32",
                AdvertisementSource::LoadBalancerIP,
                &["default/web"]
            ),
            ad(
                "203.0.113.5/32",
                AdvertisementSource::ExternalIP,
                &["default/web"]
            ),
            ad(
                "2001:db8::7/128",
                AdvertisementSource::LoadBalancerIP,
                &["default/web"]
            ),
        ]
    );
    assert_eq!(
        count_by_source(&d.configs)[&AdvertisementSource::LoadBalancerIP],
        2
    );
    assert_eq!(
        count_by_source(&d.configs)[&AdvertisementSource::PodCIDR],
        0
    );
}

#[test]
fn only_the_addresses_asked_for_are_advertised() {
    let mut web = svc("default/web", &["198.51.100.7"]);
    web.external_ips = vec!["203.0.113.5".parse().unwrap()];
    web.cluster_ips = vec!["10.96.0.10".parse().unwrap()];
    let d = desired(
        &[policy("p", None, vec![lb_router()])],
        &[node("n1", "r1", 1)],
        &[web],
    );
    assert_eq!(prefixes(&d, "n1"), ["198.51.100.7/32"]);
}

#[test]
fn service_selector_shorthand_advertises_load_balancer_and_external_ips() {
    let mut r = router(64512, vec![neighbor("192.0.2.1", 64513)]);
    r.service_selector = Some(select(&[("announce", "bgp")]));
    let mut web = svc("default/web", &["198.51.100.7"]);
    web.external_ips = vec!["203.0.113.5".parse().unwrap()];
    web.cluster_ips = vec!["10.96.0.10".parse().unwrap()];
    let d = desired(
        &[policy("p", None, vec![r])],
        &[node("n1", "r1", 1)],
        &[web],
    );
    assert_eq!(prefixes(&d, "n1"), ["198.51.100.7/32", "203.0.113.5/32"]);
}

#[test]
fn local_external_traffic_is_advertised_only_by_nodes_with_a_ready_backend() {
    let nodes = [node("n1", "r1", 1), node("n2", "r1", 2)];
    let mut r = router(64512, vec![neighbor("192.0.2.1", 64513)]);
    r.advertisements = vec![services_ad(
        &[
            ServiceAddress::LoadBalancerIP,
            ServiceAddress::ExternalIP,
            ServiceAddress::ClusterIP,
        ],
        select(&[("announce", "bgp")]),
    )];
    let mut local = svc("default/local", &["198.51.100.9"]);
    local.external_ips = vec!["203.0.113.9".parse().unwrap()];
    local.cluster_ips = vec!["10.96.0.9".parse().unwrap()];
    local.external_local = true;
    local.ready_nodes = ["n2".to_string()].into();
    let cluster = svc("default/cluster", &["198.51.100.10"]);
    let d = desired(
        &[policy("p", None, vec![r.clone()])],
        &nodes,
        &[local.clone(), cluster.clone()],
    );
    // n1 has no ready backend: only the Cluster service's LB IP and the cluster IP (which
    // follows internalTrafficPolicy, Cluster here).
    assert_eq!(prefixes(&d, "n1"), ["10.96.0.9/32", "198.51.100.10/32"]);
    assert_eq!(
        prefixes(&d, "n2"),
        [
            "10.96.0.9/32",
            "198.51.100.9/32",
            "198.51.100.10/32",
            "203.0.113.9/32"
        ]
    );
    // No ready backend anywhere: advertised nowhere.
    local.ready_nodes.clear();
    let d = desired(
        &[policy("p", None, vec![r.clone()])],
        &nodes,
        &[local.clone()],
    );
    assert_eq!(prefixes(&d, "n2"), ["10.96.0.9/32"]);
    // internalTrafficPolicy Local: the cluster IP too.
    local.internal_local = true;
    local.ready_nodes = ["n1".to_string()].into();
    let d = desired(&[policy("p", None, vec![r])], &nodes, &[local]);
    assert_eq!(
        prefixes(&d, "n1"),
        ["10.96.0.9/32", "198.51.100.9/32", "203.0.113.9/32"]
    );
    assert!(d.configs["n2"].routers[0].advertisements.is_empty());
}

#[test]
fn service_input_reads_what_bgp_advertises() {
    let mut s = Service {
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            cluster_ip: Some("10.96.0.1".into()),
            cluster_ips: Some(vec!["10.96.0.1".into(), "fd00:96::1".into()]),
            external_ips: Some(vec!["203.0.113.1".into(), "not-an-ip".into()]),
            external_traffic_policy: Some("Local".into()),
            ..Default::default()
        }),
        status: Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![
                    LoadBalancerIngress {
                        ip: Some("198.51.100.1".into()),
                        ..Default::default()
                    },
                    LoadBalancerIngress {
                        hostname: Some("lb.example.com".into()),
                        ..Default::default()
                    },
                ]),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    s.metadata.name = Some("web".into());
    s.metadata.namespace = Some("default".into());
    let input = service_input(&s).unwrap();
    assert_eq!(input.key, "default/web");
    assert_eq!(
        input.load_balancer_ips,
        vec!["198.51.100.1".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(input.external_ips.len(), 1, "garbage is skipped");
    assert_eq!(input.cluster_ips.len(), 2);
    assert!(input.external_local && !input.internal_local);
    // The ingress of a Service that is no longer of type LoadBalancer is not advertised.
    s.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
    assert!(service_input(&s).unwrap().load_balancer_ips.is_empty());
    // Headless: no cluster IP.
    s.spec.as_mut().unwrap().cluster_ips = Some(vec!["None".into()]);
    assert!(service_input(&s).unwrap().cluster_ips.is_empty());
    s.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
    assert_eq!(service_input(&s), None);
}

#[test]
fn communities_are_unioned_sorted_numerically_and_written_canonically() {
    let mut r = router(64512, vec![neighbor("192.0.2.1", 64513)]);
    r.export_pod_cidr = true;
    r.advertisements = vec![
        pod_cidr_ad(&["65000:100", "0065000:9"], &["65000:1:2"]),
        pod_cidr_ad(&["65000:100", "100:1"], &["4294967295:0:1"]),
    ];
    let d = desired(&[policy("p", None, vec![r])], &[node("n1", "r1", 1)], &[]);
    let a = &d.configs["n1"].routers[0].advertisements;
    assert_eq!(a.len(), 1, "one prefix, once");
    assert_eq!(a[0].communities, ["100:1", "65000:9", "65000:100"]);
    assert_eq!(a[0].large_communities, ["65000:1:2", "4294967295:0:1"]);
}

#[test]
fn a_prefix_of_several_sources_and_services_is_advertised_once() {
    let mut r = router(64512, vec![neighbor("192.0.2.1", 64513)]);
    r.advertisements = vec![services_ad(
        &[ServiceAddress::LoadBalancerIP, ServiceAddress::ExternalIP],
        select(&[("announce", "bgp")]),
    )];
    // Two services sharing an LB IP (a sharing key), one with it as external IP too.
    let a = svc("default/a", &["198.51.100.7"]);
    let mut b = svc("default/b", &[]);
    b.external_ips = vec!["198.51.100.7".parse().unwrap()];
    let d = desired(
        &[policy("p", None, vec![r])],
        &[node("n1", "r1", 1)],
        &[b, a],
    );
    assert_eq!(
        d.configs["n1"].routers[0].advertisements,
        vec![ad(
            "198.51.100.7/32",
            AdvertisementSource::LoadBalancerIP,
            &["default/a", "default/b"]
        )]
    );
}

#[test]
fn standard_and_large_communities_parse_only_in_range() {
    assert_eq!(parse_standard("65000:100"), Some((65000, 100)));
    assert_eq!(parse_standard("65536:1"), None);
    assert_eq!(parse_standard("1:2:3"), None);
    assert_eq!(parse_large("65000:1:2"), Some((65000, 1, 2)));
    assert_eq!(parse_large("4294967296:1:2"), None);
    assert_eq!(parse_large("1:2"), None);
    assert_eq!(parse_large("1:2:3:4"), None);
}

#[test]
fn policies_with_the_same_local_asn_merge_their_routers() {
    let mut a = router(64512, vec![neighbor("192.0.2.1", 64513)]);
    a.export_pod_cidr = true;
    let mut b = router(
        64512,
        vec![neighbor("192.0.2.1", 64513), neighbor("192.0.2.2", 64514)],
    );
    b.advertisements = vec![services_ad(
        &[ServiceAddress::LoadBalancerIP],
        select(&[("announce", "bgp")]),
    )];
    let other = router(64600, vec![neighbor("192.0.2.3", 64513)]);
    let d = desired(
        &[
            policy("a", None, vec![a]),
            policy("b", Some("r1"), vec![b, other]),
        ],
        &[node("n1", "r1", 1)],
        &[svc("default/web", &["198.51.100.7"])],
    );
    assert!(d.held.is_empty());
    let routers = &d.configs["n1"].routers;
    assert_eq!(
        routers.iter().map(|r| r.local_asn).collect::<Vec<_>>(),
        [64512, 64600]
    );
    assert_eq!(
        routers[0]
            .neighbors
            .iter()
            .map(|n| n.peer_address.as_str())
            .collect::<Vec<_>>(),
        ["192.0.2.1", "192.0.2.2"]
    );
    assert_eq!(prefixes(&d, "n1"), ["10.244.1.0/24", "198.51.100.7/32"]);
    assert!(d.policies["a"].valid.status && d.policies["b"].valid.status);
}

#[test]
fn a_peer_defined_differently_by_two_policies_holds_the_node_and_invalidates_both() {
    let a = router(64512, vec![neighbor("192.0.2.1", 64513)]);
    let mut n = neighbor("192.0.2.1", 64513);
    n.hold_time_seconds = 9;
    n.keep_alive_time_seconds = 3;
    let b = router(64512, vec![n]);
    let nodes = [node("n1", "r1", 1), node("n2", "r2", 2)];
    let d = desired(
        &[policy("a", None, vec![a]), policy("b", Some("r1"), vec![b])],
        &nodes,
        &[],
    );
    // n1 has both: held, no half config; n2 has only a.
    assert_eq!(d.held, BTreeSet::from(["n1".to_string()]));
    assert_eq!(d.configs.keys().collect::<Vec<_>>(), ["n2"]);
    for p in ["a", "b"] {
        let v = &d.policies[p].valid;
        assert!(!v.status, "{p}");
        assert_eq!(v.reason, REASON_CONFLICT);
        assert_eq!(
            v.message,
            "node n1: peer 192.0.2.1: policies a and b define it differently; those nodes keep their previous configuration"
        );
    }
    assert_eq!(d.policies["a"].selected_nodes, 2);
    assert_eq!(d.policies["b"].selected_nodes, 1);
}

#[test]
fn one_peer_in_two_routers_of_a_node_is_a_conflict() {
    let a = router(64512, vec![neighbor("192.0.2.1", 64513)]);
    let b = router(64600, vec![neighbor("192.0.2.1/32", 64513)]);
    let d = desired(
        &[policy("a", None, vec![a]), policy("b", None, vec![b])],
        &[node("n1", "r1", 1)],
        &[],
    );
    assert_eq!(d.held.len(), 1);
    assert!(d.configs.is_empty());
    assert_eq!(d.policies["b"].valid.reason, REASON_CONFLICT);
}

#[test]
fn the_same_peer_defined_identically_merges_and_peer_cidrs_become_addresses() {
    let a = router(64512, vec![neighbor("192.0.2.1/32", 64513)]);
    let b = router(64512, vec![neighbor("192.0.2.1", 64513)]);
    let d = desired(
        &[policy("a", None, vec![a]), policy("b", None, vec![b])],
        &[node("n1", "r1", 1)],
        &[],
    );
    assert!(d.held.is_empty());
    assert_eq!(
        d.configs["n1"].routers[0].neighbors,
        vec![neighbor("192.0.2.1", 64513)]
    );
}

#[test]
fn an_invalid_policy_holds_the_nodes_it_selects() {
    let mut p = policy("bad", Some("r1"), vec![lb_router()]);
    p.spec.virtual_routers[0].advertisements[0].selector = Some(LabelSelector {
        match_labels: None,
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "tier".into(),
            operator: "Near".into(),
            values: None,
        }]),
    });
    let good = policy(
        "good",
        None,
        vec![router(64600, vec![neighbor("192.0.2.9", 1)])],
    );
    let d = desired(&[p, good], &[node("n1", "r1", 1), node("n2", "r2", 2)], &[]);
    assert_eq!(d.held, BTreeSet::from(["n1".to_string()]));
    assert_eq!(d.configs.keys().collect::<Vec<_>>(), ["n2"]);
    let v = &d.policies["bad"].valid;
    assert_eq!(v.reason, REASON_INVALID);
    assert!(
        v.message.contains("router 64512: advertisements[0]"),
        "{}",
        v.message
    );
    assert!(
        v.message.contains("unknown operator \"Near\""),
        "{}",
        v.message
    );
    assert_eq!(d.policies["bad"].selected_nodes, 1);
    assert!(d.policies["good"].valid.status);
}

#[test]
fn the_result_does_not_depend_on_input_order() {
    let mut r = lb_router();
    r.export_pod_cidr = true;
    let policies = [
        policy("a", None, vec![r.clone()]),
        policy("b", None, vec![r]),
    ];
    let nodes = [node("n1", "r1", 1), node("n2", "r1", 2)];
    let services = [
        svc("default/a", &["198.51.100.1"]),
        svc("default/b", &["198.51.100.2"]),
    ];
    let forward = desired(&policies, &nodes, &services);
    let mut p = policies.to_vec();
    p.reverse();
    let mut n = nodes.to_vec();
    n.reverse();
    let mut s = services.to_vec();
    s.reverse();
    assert_eq!(desired(&p, &n, &s), forward);
}

#[test]
fn a_config_larger_than_the_schema_admits_holds_the_node() {
    let mut r = lb_router();
    r.export_pod_cidr = true;
    let many: Vec<ServiceInput> = (0..MAX_ADVERTISEMENTS)
        .map(|i| {
            svc(
                &format!("default/s{i}"),
                &[&format!(
                    "198.{}.{}.{}",
                    18 + i / 65536,
                    (i / 256) % 256,
                    i % 256
                )],
            )
        })
        .collect();
    let d = desired(&[policy("p", None, vec![r])], &[node("n1", "r1", 1)], &many);
    assert!(d.configs.is_empty());
    assert_eq!(d.held.len(), 1);
    let v = &d.policies["p"].valid;
    assert_eq!(v.reason, REASON_TOO_LARGE);
    assert!(
        v.message
            .starts_with("node n1: router 64512 would advertise 4097 prefixes, at most 4096"),
        "{}",
        v.message
    );
    // One fewer fits.
    let d = desired(
        &[policy("p", None, vec![lb_router()])],
        &[node("n1", "r1", 1)],
        &many,
    );
    assert_eq!(
        d.configs["n1"].routers[0].advertisements.len(),
        MAX_ADVERTISEMENTS
    );
}

/// Prints the cost of one full computation at a size a rack-scale cluster reaches (a
/// figure, not an assertion); checks only the size of the result.
#[test]
fn full_computation_cost_at_200_nodes_and_1000_services() {
    let mut r = lb_router();
    r.export_pod_cidr = true;
    let nodes: Vec<NodeInput> = (0..200)
        .map(|i| NodeInput {
            name: format!("n{i}"),
            labels: labels(&[("rack", "r1")]),
            router_id: Ok(Ipv4Addr::new(10, 0, (i / 256) as u8, (i % 256) as u8)),
            pod_cidrs: vec![
                format!("10.{}.{}.0/24", 100 + i / 256, i % 256)
                    .parse()
                    .unwrap(),
            ],
        })
        .collect();
    let services: Vec<ServiceInput> = (0..1000)
        .map(|i| {
            let mut s = svc(
                &format!("default/s{i}"),
                &[&format!("198.51.{}.{}", i / 256, i % 256)],
            );
            // Every tenth is Local, with backends on ten nodes.
            if i % 10 == 0 {
                s.external_local = true;
                s.ready_nodes = (0..10).map(|n| format!("n{}", (i + n) % 200)).collect();
            }
            s
        })
        .collect();
    let started = std::time::Instant::now();
    let d = desired(&[policy("p", None, vec![r])], &nodes, &services);
    let took = started.elapsed();
    let ads: i64 = count_by_source(&d.configs).values().sum();
    println!(
        "bgp desired: 200 nodes x 1000 services -> {ads} advertisements in {:.1} ms",
        took.as_secs_f64() * 1e3
    );
    // Per node: its pod CIDR, the 900 Cluster LB IPs, the Local ones it has backends of.
    assert_eq!(ads, 200 * (1 + 900) + 100 * 10);
}

/// A random world: nodes in two racks, Services with random addresses, traffic policies,
/// labels and ready nodes; one policy per rack (or for all) with random advertisements.
fn world() -> impl Strategy<Value = (Vec<PolicyInput>, Vec<NodeInput>, Vec<ServiceInput>)> {
    let nodes = proptest::collection::vec(0..2u8, 1..6).prop_map(|racks| {
        racks
            .into_iter()
            .enumerate()
            .map(|(i, r)| node(&format!("n{i}"), &format!("r{r}"), i as u8 + 1))
            .collect::<Vec<_>>()
    });
    let service = (
        proptest::collection::vec(0..4u8, 0..3),
        proptest::collection::vec(0..4u8, 0..2),
        proptest::collection::vec(0..4u8, 0..2),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        proptest::collection::btree_set(0..6usize, 0..4),
    );
    let services = proptest::collection::vec(service, 0..6).prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(
                |(i, (lb, ext, cip, announce, etp, itp, ready))| ServiceInput {
                    key: format!("default/s{i}"),
                    labels: labels(&[("announce", if announce { "bgp" } else { "no" })]),
                    // Few distinct addresses, so services share some.
                    load_balancer_ips: lb
                        .iter()
                        .map(|x| format!("198.51.100.{x}").parse().unwrap())
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect(),
                    external_ips: ext
                        .iter()
                        .map(|x| format!("198.51.100.{x}").parse().unwrap())
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect(),
                    cluster_ips: cip
                        .iter()
                        .map(|x| format!("10.96.0.{x}").parse().unwrap())
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect(),
                    external_local: etp,
                    internal_local: itp,
                    ready_nodes: ready.into_iter().map(|n| format!("n{n}")).collect(),
                },
            )
            .collect::<Vec<_>>()
    });
    let address = prop_oneof![
        Just(ServiceAddress::LoadBalancerIP),
        Just(ServiceAddress::ExternalIP),
        Just(ServiceAddress::ClusterIP),
    ];
    let one_policy = (
        prop_oneof![Just(None), Just(Some("r0")), Just(Some("r1"))],
        any::<bool>(),
        proptest::collection::btree_set(address, 0..4),
        0..3u16,
    );
    let policies = proptest::collection::vec(one_policy, 1..4).prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (rack, pod_cidr, addresses, community))| {
                // Each policy its own peer: no conflicts here (they have their own tests).
                let mut r = router(64512, vec![neighbor(&format!("192.0.2.{}", i + 1), 64513)]);
                r.export_pod_cidr = pod_cidr;
                if !addresses.is_empty() {
                    let mut ad = services_ad(
                        &addresses.into_iter().collect::<Vec<_>>(),
                        select(&[("announce", "bgp")]),
                    );
                    ad.communities = Some(Communities {
                        standard: vec![format!("65000:{community}")],
                        large: vec![],
                    });
                    r.advertisements = vec![ad];
                }
                policy(&format!("p{i}"), rack, vec![r])
            })
            .collect::<Vec<_>>()
    });
    (policies, nodes, services)
}

/// The independent model: which (node, prefix) pairs must be advertised, and with which
/// communities, written from the rules' statement and nothing of the implementation.
fn model(
    policies: &[PolicyInput],
    nodes: &[NodeInput],
    services: &[ServiceInput],
) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for p in policies {
        let rack = p
            .spec
            .node_selector
            .as_ref()
            .and_then(|s| s.match_labels.as_ref())
            .and_then(|l| l.get("rack").cloned());
        for n in nodes {
            if rack
                .as_ref()
                .is_some_and(|r| n.labels.get("rack") != Some(r))
            {
                continue;
            }
            let r = &p.spec.virtual_routers[0];
            if r.export_pod_cidr {
                for c in &n.pod_cidrs {
                    out.entry((n.name.clone(), c.to_string())).or_default();
                }
            }
            for ad in &r.advertisements {
                let communities: Vec<String> = ad
                    .communities
                    .iter()
                    .flat_map(|c| c.standard.clone())
                    .collect();
                for s in services {
                    if s.labels.get("announce").map(String::as_str) != Some("bgp") {
                        continue;
                    }
                    for a in &ad.addresses {
                        let (ips, local) = match a {
                            ServiceAddress::LoadBalancerIP => {
                                (&s.load_balancer_ips, s.external_local)
                            }
                            ServiceAddress::ExternalIP => (&s.external_ips, s.external_local),
                            ServiceAddress::ClusterIP => (&s.cluster_ips, s.internal_local),
                        };
                        if local && !s.ready_nodes.contains(&n.name) {
                            continue;
                        }
                        for ip in ips {
                            let prefix = if ip.is_ipv4() {
                                format!("{ip}/32")
                            } else {
                                format!("{ip}/128")
                            };
                            out.entry((n.name.clone(), prefix))
                                .or_default()
                                .extend(communities.iter().cloned());
                        }
                    }
                }
            }
        }
    }
    out
}

use proptest::prelude::*;

proptest! {
    /// Against the model: exactly the pairs it names, each with the union of its
    /// communities, once per node; every selected node has a config, no other does.
    #[test]
    fn prefixes_match_the_model((policies, nodes, services) in world()) {
        let d = desired(&policies, &nodes, &services);
        prop_assert!(d.held.is_empty());
        let mut got: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
        for (name, spec) in &d.configs {
            prop_assert_eq!(spec.routers.len(), 1);
            for a in &spec.routers[0].advertisements {
                let previous = got.insert(
                    (name.clone(), a.prefix.clone()),
                    a.communities.iter().cloned().collect(),
                );
                prop_assert!(previous.is_none(), "{} twice on {}", a.prefix, name);
            }
        }
        let want = model(&policies, &nodes, &services);
        prop_assert_eq!(&got, &want);
        let selected: BTreeSet<&str> = nodes
            .iter()
            .filter(|n| {
                policies.iter().any(|p| {
                    p.spec.node_selector.as_ref().is_none_or(|s| {
                        s.match_labels.as_ref().and_then(|l| l.get("rack")) == n.labels.get("rack")
                    })
                })
            })
            .map(|n| n.name.as_str())
            .collect();
        prop_assert_eq!(d.configs.keys().map(String::as_str).collect::<BTreeSet<_>>(), selected);
    }
}
