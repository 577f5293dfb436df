//! Named cases of the translation: every frontend type, KEP-1669 states, skips, SCTP,
//! deduplication, port-name matching, the algorithm annotation.

use super::*;
use crate::services::SliceInfo;
use k8s_openapi::api::core::v1::Service;
use pretty_assertions::assert_eq;
use serde_json::{Value, json};

fn service(spec: Value) -> Service {
    service_with(json!({}), spec, json!({}))
}

fn service_with(meta: Value, spec: Value, status: Value) -> Service {
    let mut metadata = json!({"name": "web", "namespace": "demo", "uid": "u1"});
    if let Value::Object(m) = meta {
        for (k, v) in m {
            metadata[k] = v;
        }
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": metadata, "spec": spec, "status": status,
    }))
    .unwrap()
}

/// A ClusterIP service with one named TCP port.
fn cluster_ip() -> Value {
    json!({"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
           "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]})
}

/// An endpoint: address, node, (ready, serving, terminating) as given (None: absent).
fn ep(ip: &str, node: &str, conditions: (Option<bool>, Option<bool>, Option<bool>)) -> Value {
    let (ready, serving, terminating) = conditions;
    let mut c = json!({});
    if let Some(v) = ready {
        c["ready"] = json!(v);
    }
    if let Some(v) = serving {
        c["serving"] = json!(v);
    }
    if let Some(v) = terminating {
        c["terminating"] = json!(v);
    }
    json!({"addresses": [ip], "nodeName": node, "conditions": c})
}

const READY: (Option<bool>, Option<bool>, Option<bool>) = (Some(true), Some(true), Some(false));

fn slice(name: &str, address_type: &str, ports: Value, endpoints: Vec<Value>) -> SliceInfo {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "demo",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": address_type, "ports": ports, "endpoints": endpoints,
    }))
    .unwrap()
}

fn http_slice(name: &str, endpoints: Vec<Value>) -> SliceInfo {
    slice(
        name,
        "IPv4",
        json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
        endpoints,
    )
}

fn no_zone(_: &str) -> Option<String> {
    None
}

fn run(svc: &Service, slices: &[SliceInfo]) -> Result<Translation, Skip> {
    translate(svc, slices, no_zone)
}

/// (type, address, port, protocol, name) of each frontend.
fn fronts(t: &Translation) -> Vec<(String, Option<String>, i32, String, String)> {
    t.spec
        .frontends
        .iter()
        .map(|f| {
            (
                f.type_.clone(),
                f.address.clone(),
                f.port,
                f.protocol.clone(),
                f.name.clone(),
            )
        })
        .collect()
}

/// (address, port, state) of each backend.
fn backs(t: &Translation) -> Vec<(String, i32, String)> {
    t.spec
        .backends
        .iter()
        .map(|b| (b.address.clone(), b.port, b.state.clone()))
        .collect()
}

fn f(
    type_: &str,
    addr: Option<&str>,
    port: i32,
    proto: &str,
    name: &str,
) -> (String, Option<String>, i32, String, String) {
    (
        type_.into(),
        addr.map(Into::into),
        port,
        proto.into(),
        name.into(),
    )
}

#[test]
fn cluster_ip_service_gets_its_frontend_and_ready_backends() {
    let svc = service(cluster_ip());
    let t = run(
        &svc,
        &[http_slice(
            "s1",
            vec![ep("10.0.1.5", "n1", READY), ep("10.0.2.5", "n2", READY)],
        )],
    )
    .unwrap();
    assert_eq!(
        fronts(&t),
        vec![f(CLUSTER_IP, Some("10.96.0.10"), 80, "TCP", "http")]
    );
    assert_eq!(
        t.spec.backends,
        vec![
            Backend {
                port_name: "http".into(),
                address: "10.0.1.5".into(),
                port: 8080,
                protocol: "TCP".into(),
                weight: 1,
                node_name: Some("n1".into()),
                zone: None,
                state: ACTIVE.into(),
            },
            Backend {
                port_name: "http".into(),
                address: "10.0.2.5".into(),
                port: 8080,
                protocol: "TCP".into(),
                weight: 1,
                node_name: Some("n2".into()),
                zone: None,
                state: ACTIVE.into(),
            },
        ]
    );
    assert!(t.problems.is_empty());
    assert_eq!(t.spec.revision, 0);
    assert_eq!(t.spec.external_traffic_policy, "Cluster");
    assert_eq!(t.spec.internal_traffic_policy, "Cluster");
    assert_eq!(t.spec.session_affinity, None);
    assert_eq!(t.spec.algorithm, None);
}

#[test]
fn load_balancer_service_has_every_frontend_type() {
    let svc = service_with(
        json!({}),
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
               "externalIPs": ["192.0.2.7"],
               "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
               "internalTrafficPolicy": "Local",
               "loadBalancerSourceRanges": ["203.0.113.9/24", " 198.51.100.0/24", "2001:db8::/32"],
               "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"},
                         {"name": "dns", "port": 53, "nodePort": 30053, "protocol": "UDP"}]}),
        json!({"loadBalancer": {"ingress": [
            {"ip": "198.51.100.1"},
            {"ip": "198.51.100.2", "ipMode": "Proxy"},
            {"hostname": "lb.example"},
            {"ip": "2001:db8::1"},
        ]}}),
    );
    let t = run(&svc, &[]).unwrap();
    assert_eq!(
        fronts(&t),
        vec![
            f(CLUSTER_IP, Some("10.96.0.10"), 80, "TCP", "http"),
            f(NODE_PORT, None, 30080, "TCP", "http"),
            f(LOAD_BALANCER, Some("198.51.100.1"), 80, "TCP", "http"),
            f(LOAD_BALANCER, Some("2001:db8::1"), 80, "TCP", "http"),
            f(EXTERNAL_IP, Some("192.0.2.7"), 80, "TCP", "http"),
            f(CLUSTER_IP, Some("10.96.0.10"), 53, "UDP", "dns"),
            f(NODE_PORT, None, 30053, "UDP", "dns"),
            f(LOAD_BALANCER, Some("198.51.100.1"), 53, "UDP", "dns"),
            f(LOAD_BALANCER, Some("2001:db8::1"), 53, "UDP", "dns"),
            f(EXTERNAL_IP, Some("192.0.2.7"), 53, "UDP", "dns"),
        ]
    );
    assert_eq!(t.spec.external_traffic_policy, "Local");
    assert_eq!(t.spec.internal_traffic_policy, "Local");
    assert_eq!(t.spec.health_check_node_port, Some(32000));
    assert_eq!(
        t.spec.load_balancer_source_ranges,
        vec![
            "198.51.100.0/24".to_string(),
            "203.0.113.0/24".to_string(),
            "2001:db8::/32".to_string()
        ],
        "canonical, sorted, both families"
    );
    assert!(t.problems.is_empty(), "{:?}", t.problems);
}

#[test]
fn node_port_service_has_cluster_ip_and_node_port_and_external_ips_on_cluster_ip_services() {
    let mut spec = cluster_ip();
    spec["type"] = json!("NodePort");
    spec["ports"][0]["nodePort"] = json!(30001);
    let t = run(&service(spec), &[]).unwrap();
    assert_eq!(
        fronts(&t),
        vec![
            f(CLUSTER_IP, Some("10.96.0.10"), 80, "TCP", "http"),
            f(NODE_PORT, None, 30001, "TCP", "http"),
        ]
    );
    // A ClusterIP service: externalIPs served, no NodePort even if one is set, no LB IPs,
    // no source ranges.
    let mut spec = cluster_ip();
    spec["externalIPs"] = json!(["192.0.2.1", "2001:db8::9"]);
    spec["ports"][0]["nodePort"] = json!(30002);
    spec["loadBalancerSourceRanges"] = json!(["10.0.0.0/8"]);
    let svc = service_with(
        json!({}),
        spec,
        json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}),
    );
    let t = run(&svc, &[]).unwrap();
    assert_eq!(
        fronts(&t),
        vec![
            f(CLUSTER_IP, Some("10.96.0.10"), 80, "TCP", "http"),
            f(EXTERNAL_IP, Some("192.0.2.1"), 80, "TCP", "http"),
            f(EXTERNAL_IP, Some("2001:db8::9"), 80, "TCP", "http"),
        ]
    );
    assert!(t.spec.load_balancer_source_ranges.is_empty());
}

#[test]
fn dual_stack_serves_both_cluster_ips_and_ipv6_only_is_served() {
    let mut spec = cluster_ip();
    spec["clusterIP"] = json!("fd00:10:96::000a");
    spec["clusterIPs"] = json!(["fd00:10:96::000a", "10.96.0.10"]);
    let t = run(&service(spec), &[]).unwrap();
    // In the Service's order (its primary family first), written canonical.
    assert_eq!(
        fronts(&t),
        vec![
            f(CLUSTER_IP, Some("fd00:10:96::a"), 80, "TCP", "http"),
            f(CLUSTER_IP, Some("10.96.0.10"), 80, "TCP", "http"),
        ]
    );
    assert!(t.problems.is_empty());

    let mut spec = cluster_ip();
    spec["clusterIP"] = json!("fd00:10:96::a");
    spec["clusterIPs"] = json!(["fd00:10:96::a"]);
    spec["type"] = json!("NodePort");
    spec["ports"][0]["nodePort"] = json!(30080);
    spec["externalIPs"] = json!(["2001:db8::7"]);
    let t = run(&service(spec), &[]).unwrap();
    assert_eq!(
        fronts(&t),
        vec![
            f(CLUSTER_IP, Some("fd00:10:96::a"), 80, "TCP", "http"),
            f(NODE_PORT, None, 30080, "TCP", "http"),
            f(EXTERNAL_IP, Some("2001:db8::7"), 80, "TCP", "http"),
        ]
    );
}

#[test]
fn ipv6_load_balancer_ips_and_source_ranges_are_carried_over() {
    let mut spec = cluster_ip();
    spec["type"] = json!("LoadBalancer");
    spec["clusterIPs"] = json!(["10.96.0.10", "fd00:10:96::a"]);
    spec["ports"][0]["nodePort"] = json!(30080);
    spec["loadBalancerSourceRanges"] = json!(["2001:db8:1::5/48", "192.0.2.0/24"]);
    let status = json!({"loadBalancer": {"ingress": [
        {"ip": "198.51.100.1"}, {"ip": "2001:db8:ff::1"}, {"ip": "2001:db8:ff::2", "ipMode": "Proxy"}]}});
    let t = translate(&service_with(json!({}), spec, status), &[], no_zone).unwrap();
    assert_eq!(
        fronts(&t),
        vec![
            f(CLUSTER_IP, Some("10.96.0.10"), 80, "TCP", "http"),
            f(CLUSTER_IP, Some("fd00:10:96::a"), 80, "TCP", "http"),
            f(NODE_PORT, None, 30080, "TCP", "http"),
            f(LOAD_BALANCER, Some("198.51.100.1"), 80, "TCP", "http"),
            f(LOAD_BALANCER, Some("2001:db8:ff::1"), 80, "TCP", "http"),
        ]
    );
    assert_eq!(
        t.spec.load_balancer_source_ranges,
        vec!["192.0.2.0/24".to_string(), "2001:db8:1::/48".to_string()]
    );
}

#[test]
fn headless_external_name_foreign_class_and_other_proxy_are_skipped() {
    let mut spec = cluster_ip();
    spec["clusterIP"] = json!("None");
    spec["clusterIPs"] = json!(["None"]);
    assert_eq!(run(&service(spec), &[]), Err(Skip::Headless));

    let svc = service(json!({"type": "ExternalName", "externalName": "db.example"}));
    assert_eq!(run(&svc, &[]), Err(Skip::ExternalName));

    let mut spec = cluster_ip();
    spec["type"] = json!("LoadBalancer");
    // Every loadBalancerClass is proxied, as kube-proxy does: the class names who
    // provisions the load balancer.
    spec["loadBalancerClass"] = json!("example.com/other");
    assert!(run(&service(spec.clone()), &[]).is_ok());
    spec.as_object_mut().unwrap().remove("loadBalancerClass");
    assert!(run(&service(spec), &[]).is_ok());

    let svc = service_with(
        json!({"labels": {SERVICE_PROXY_NAME_LABEL: "other-proxy"}}),
        cluster_ip(),
        json!({}),
    );
    assert_eq!(run(&svc, &[]), Err(Skip::OtherProxy("other-proxy".into())));
}

#[test]
fn kep_1669_endpoint_states() {
    let svc = service(cluster_ip());
    let endpoints = vec![
        // ready (serving, not terminating): active
        ep("10.0.0.1", "n1", READY),
        // conditions absent: ready and serving default to true → active
        ep("10.0.0.2", "n1", (None, None, None)),
        // serving and terminating: terminating
        ep("10.0.0.3", "n1", (Some(false), Some(true), Some(true))),
        // serving absent (true) and terminating: terminating
        ep("10.0.0.4", "n1", (Some(false), None, Some(true))),
        // terminating and no longer serving: not listed
        ep("10.0.0.5", "n1", (Some(false), Some(false), Some(true))),
        // not ready, not terminating (starting up): not listed
        ep("10.0.0.6", "n1", (Some(false), Some(false), Some(false))),
        // not ready but serving, not terminating: not listed (kube-proxy neither)
        ep("10.0.0.7", "n1", (Some(false), Some(true), Some(false))),
        // publishNotReadyAddresses: ready=true even while terminating → active
        ep("10.0.0.8", "n1", (Some(true), Some(false), Some(true))),
    ];
    let t = run(&svc, &[http_slice("s1", endpoints)]).unwrap();
    assert_eq!(
        backs(&t),
        vec![
            ("10.0.0.1".into(), 8080, ACTIVE.into()),
            ("10.0.0.2".into(), 8080, ACTIVE.into()),
            ("10.0.0.3".into(), 8080, TERMINATING.into()),
            ("10.0.0.4".into(), 8080, TERMINATING.into()),
            ("10.0.0.8".into(), 8080, ACTIVE.into()),
        ]
    );
}

#[test]
fn backends_are_deduplicated_across_slices_active_winning() {
    let svc = service(cluster_ip());
    let terminating = (Some(false), Some(true), Some(true));
    let a = http_slice(
        "s1",
        vec![
            ep("10.0.0.1", "n1", terminating),
            ep("10.0.0.2", "n1", READY),
        ],
    );
    let b = http_slice(
        "s2",
        vec![
            ep("10.0.0.1", "n1", READY),
            ep("10.0.0.2", "n1", terminating),
        ],
    );
    let t = run(&svc, &[a.clone(), b.clone()]).unwrap();
    let want = vec![
        ("10.0.0.1".to_string(), 8080, ACTIVE.to_string()),
        ("10.0.0.2".to_string(), 8080, ACTIVE.to_string()),
    ];
    assert_eq!(backs(&t), want);
    // Order of slices does not matter.
    assert_eq!(run(&svc, &[b, a]).unwrap().spec, t.spec);
}

#[test]
fn backends_match_frontends_by_port_name_and_protocol() {
    let svc = service(json!({
        "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
        "ports": [{"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP"},
                  {"name": "metrics", "port": 9090, "protocol": "TCP"},
                  {"name": "dns", "port": 53, "protocol": "UDP"}],
    }));
    let s = slice(
        "s1",
        "IPv4",
        json!([
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "metrics", "port": 9100, "protocol": "TCP"},
            {"name": "dns", "port": 5353, "protocol": "UDP"},
            // a port the service no longer has (the slice lags): not a backend
            {"name": "old", "port": 7000, "protocol": "TCP"},
            // same name, other protocol: not a backend of the TCP frontend
            {"name": "http", "port": 8081, "protocol": "UDP"},
        ]),
        vec![ep("10.0.0.1", "n1", READY)],
    );
    let t = run(&svc, &[s]).unwrap();
    let got: Vec<(String, i32, String)> = t
        .spec
        .backends
        .iter()
        .map(|b| (b.port_name.clone(), b.port, b.protocol.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("dns".to_string(), 5353, "UDP".to_string()),
            ("http".to_string(), 8080, "TCP".to_string()),
            ("metrics".to_string(), 9100, "TCP".to_string()),
        ]
    );
    // Every backend's port name is a frontend's.
    for b in &t.spec.backends {
        assert!(
            t.spec
                .frontends
                .iter()
                .any(|f| f.name == b.port_name && f.protocol == b.protocol),
            "{b:?}"
        );
    }
}

#[test]
fn unnamed_single_port_matches_the_unnamed_slice_port() {
    let svc = service(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}));
    let s = slice(
        "s1",
        "IPv4",
        json!([{"port": 8080}]),
        vec![ep("10.0.0.1", "n1", READY)],
    );
    let t = run(&svc, &[s]).unwrap();
    assert_eq!(
        fronts(&t),
        vec![f(CLUSTER_IP, Some("10.96.0.10"), 80, "TCP", "")]
    );
    assert_eq!(backs(&t), vec![("10.0.0.1".into(), 8080, ACTIVE.into())]);
    assert_eq!(t.spec.backends[0].port_name, "");
}

#[test]
fn ipv6_slices_are_backends_of_their_family_and_fqdn_slices_are_not() {
    let mut spec = cluster_ip();
    spec["clusterIPs"] = json!(["10.96.0.10", "fd00:10:96::a"]);
    let svc = service(spec);
    let ports = json!([{"name": "http", "port": 8080, "protocol": "TCP"}]);
    let v4 = http_slice("s4", vec![ep("10.0.0.1", "n1", READY)]);
    let v6 = slice(
        "s6",
        "IPv6",
        ports.clone(),
        // The IPv4 address in an IPv6 slice is not the slice's: left out.
        vec![ep("fd00::0001", "n1", READY), ep("10.0.0.9", "n1", READY)],
    );
    let fqdn = slice("sf", "FQDN", ports, vec![ep("db.example", "n1", READY)]);
    let t = run(&svc, &[v4, v6, fqdn]).unwrap();
    assert_eq!(
        backs(&t),
        vec![
            ("10.0.0.1".into(), 8080, ACTIVE.into()),
            ("fd00::1".into(), 8080, ACTIVE.into()),
        ]
    );
}

#[test]
fn sctp_ports_are_invalid_and_the_others_still_served() {
    let svc = service(json!({
        "clusterIP": "10.96.0.10",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"},
                  {"name": "sig", "port": 3868, "protocol": "SCTP"}],
    }));
    let s = slice(
        "s1",
        "IPv4",
        json!([{"name": "http", "port": 8080, "protocol": "TCP"},
               {"name": "sig", "port": 3868, "protocol": "SCTP"}]),
        vec![ep("10.0.0.1", "n1", READY)],
    );
    let t = run(&svc, &[s]).unwrap();
    assert_eq!(
        fronts(&t),
        vec![f(CLUSTER_IP, Some("10.96.0.10"), 80, "TCP", "http")]
    );
    assert_eq!(backs(&t), vec![("10.0.0.1".into(), 8080, ACTIVE.into())]);
    assert_eq!(t.problems.len(), 1);
    assert_eq!(t.problems[0].reason, REASON_UNSUPPORTED);
    assert!(
        t.problems[0].message.contains("\"sig\" (3868/SCTP)"),
        "{}",
        t.problems[0].message
    );
}

#[test]
fn session_affinity_and_its_default_timeout() {
    let mut spec = cluster_ip();
    spec["sessionAffinity"] = json!("ClientIP");
    spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 60}});
    let t = run(&service(spec.clone()), &[]).unwrap();
    assert_eq!(
        t.spec.session_affinity,
        Some(SessionAffinity {
            client_ip: Some(ClientIpAffinity {
                timeout_seconds: 60
            })
        })
    );
    spec.as_object_mut()
        .unwrap()
        .remove("sessionAffinityConfig");
    let t = run(&service(spec), &[]).unwrap();
    assert_eq!(
        t.spec
            .session_affinity
            .unwrap()
            .client_ip
            .unwrap()
            .timeout_seconds,
        10800
    );
    let mut spec = cluster_ip();
    spec["sessionAffinity"] = json!("None");
    assert_eq!(
        run(&service(spec), &[]).unwrap().spec.session_affinity,
        None
    );
}

#[test]
fn algorithm_annotation_valid_and_invalid() {
    let maglev = service_with(
        json!({"annotations": {SERVICE_LB_ALGORITHM: "Maglev"}}),
        cluster_ip(),
        json!({}),
    );
    let t = run(&maglev, &[]).unwrap();
    assert_eq!(t.spec.algorithm.as_deref(), Some("Maglev"));
    assert!(t.problems.is_empty());

    let bad = service_with(
        json!({"annotations": {SERVICE_LB_ALGORITHM: "roundrobin"}}),
        cluster_ip(),
        json!({}),
    );
    let t = run(&bad, &[]).unwrap();
    assert_eq!(t.spec.algorithm, None, "the agent's default");
    assert_eq!(t.problems.len(), 1);
    assert_eq!(t.problems[0].reason, REASON_INVALID_ANNOTATION);
    assert!(
        t.problems[0].message.contains("\"roundrobin\""),
        "{}",
        t.problems[0].message
    );
    assert!(
        t.problems[0].message.contains("Random, Maglev"),
        "{}",
        t.problems[0].message
    );
    // Still served.
    assert_eq!(t.spec.frontends.len(), 1);
}

#[test]
fn zone_from_the_endpoint_else_from_its_node() {
    let svc = service(cluster_ip());
    let mut with_zone = ep("10.0.0.1", "n1", READY);
    with_zone["zone"] = json!("zone-a");
    let s = http_slice(
        "s1",
        vec![
            with_zone,
            ep("10.0.0.2", "n2", READY),
            ep("10.0.0.3", "n3", READY),
        ],
    );
    let zones = |node: &str| (node == "n2").then(|| "zone-b".to_string());
    let t = translate(&svc, [&s], zones).unwrap();
    let got: Vec<Option<String>> = t.spec.backends.iter().map(|b| b.zone.clone()).collect();
    assert_eq!(
        got,
        vec![Some("zone-a".into()), Some("zone-b".into()), None]
    );
}

#[test]
fn too_many_backends_is_invalid_and_truncated() {
    let svc = service(cluster_ip());
    let endpoints: Vec<Value> = (0..(MAX_BACKENDS + 10))
        .map(|i| {
            ep(
                &format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256),
                "n1",
                READY,
            )
        })
        .collect();
    let t = run(&svc, &[http_slice("s1", endpoints)]).unwrap();
    assert_eq!(t.spec.backends.len(), MAX_BACKENDS);
    assert_eq!(t.problems[0].reason, REASON_TOO_MANY);
}
