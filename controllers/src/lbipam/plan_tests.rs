//! Tests of `plan`, in a file of their own.
use super::*;
use crate::lbipam::allocator::{Allocator, Problem};
use serde_json::{Value, json};

fn pool(spec: Value) -> LoadBalancerIPPool {
    serde_json::from_value(json!({
        "apiVersion": "tendril.dev/v1alpha1", "kind": "LoadBalancerIPPool",
        "metadata": {"name": "blue", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": spec,
    }))
    .unwrap()
}

fn service(name: &str, annotations: Value, spec: Value) -> Service {
    let mut s = json!({"type": "LoadBalancer", "ports": [{"port": 80}], "ipFamilies": ["IPv4"]});
    for (k, v) in spec.as_object().unwrap() {
        s[k] = v.clone();
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "ns", "annotations": annotations,
                     "labels": {"color": "red"}, "generation": 1},
        "spec": s,
    }))
    .unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn pools_parse_blocks_and_report_unusable_ones() {
    let p = pool_of(&pool(json!({"blocks": [
        {"cidr": "198.51.100.0/30"},
        {"start": "203.0.113.9", "stop": "203.0.113.1"},
        {"start": "203.0.113.20", "stop": "203.0.113.29"},
        {"start": "203.0.113.25", "stop": "203.0.113.40"},
    ]})));
    assert_eq!(p.ranges.len(), 2);
    assert_eq!(p.size(), 2 + 10);
    assert_eq!(p.created, Some(1_767_225_600));
    assert_eq!(
        p.problems,
        [
            "block 1: start 203.0.113.9 is after stop 203.0.113.1; write the lower address as start",
            "block 3 (203.0.113.25-203.0.113.40) overlaps block 203.0.113.20-203.0.113.29 of this pool",
        ]
    );
    let status = pool_status(&PoolOutcome {
        size: p.size(),
        problems: p.problems.clone(),
        ..Default::default()
    });
    assert!(!status.conditions[0].status);
    assert_eq!(status.conditions[0].reason, "InvalidBlocks");
    assert!(status.conditions[0].message.contains("is after stop"));
    assert_eq!(status.conditions[1].reason, "Invalid");
    assert_eq!(status.available, 12);

    let all = pool_of(&pool(
        json!({"blocks": [{"cidr": "198.51.100.0/30"}], "allowFirstLastIPs": true}),
    ));
    assert_eq!(all.size(), 4);
    let selected = pool_of(&pool(json!({"blocks": [{"cidr": "198.51.100.0/30"}],
        "serviceSelector": {"matchLabels": {"color": "red"}}})));
    let (req, _) = request_of(&service("a", json!({}), json!({})));
    assert!(selected.selects(&req.labels));
    let ok = pool_status(&PoolOutcome {
        size: 2,
        used: 1,
        ..Default::default()
    });
    assert!(
        ok.conditions
            .iter()
            .all(|c| c.status == (c.type_ == READY || c.type_ == VALID))
    );
    assert_eq!((ok.used, ok.available), (1, 1));
}

#[test]
fn which_services_get_addresses() {
    assert!(wants_addresses(&service("a", json!({}), json!({}))));
    assert!(wants_addresses(&service(
        "a",
        json!({}),
        json!({"loadBalancerClass": LOAD_BALANCER_CLASS})
    )));
    assert!(!wants_addresses(&service(
        "a",
        json!({}),
        json!({"loadBalancerClass": "example.com/other"})
    )));
    assert!(!wants_addresses(&service(
        "a",
        json!({}),
        json!({"type": "ClusterIP"})
    )));
}

#[test]
fn requests_read_the_spec_and_annotations() {
    let svc = service(
        "a",
        json!({IPS_ANNOTATION: "198.51.100.7, 2001:db8::7,,", SHARING_KEY_ANNOTATION: " k ",
               SHARING_CROSS_NAMESPACE_ANNOTATION: "a, b"}),
        json!({"loadBalancerIP": "198.51.100.7", "ipFamilies": ["IPv6", "IPv4"],
               "ipFamilyPolicy": "PreferDualStack", "externalTrafficPolicy": "Local",
               "selector": {"app": "web"},
               "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53}]}),
    );
    let (req, invalid) = request_of(&svc);
    assert!(invalid.is_empty());
    assert_eq!(req.requested, [ip("198.51.100.7"), ip("2001:db8::7")]);
    assert_eq!(req.families, [Family::V6, Family::V4]);
    assert!(!req.require_all_families);
    let sharing = req.sharing.clone().unwrap();
    assert_eq!(sharing.key, "k");
    assert_eq!(
        sharing.cross_namespace,
        ["a".to_string(), "b".to_string()].into()
    );
    assert_eq!(sharing.local_selector.unwrap()["app"], "web");
    assert_eq!(req.ports.len(), 2);
    assert_eq!(req.labels[NAMESPACE_LABEL], "ns");

    // Nothing valid requested: no address at all, and the condition says why.
    let (req, invalid) = request_of(&service("b", json!({IPS_ANNOTATION: "nope"}), json!({})));
    assert!(req.families.is_empty() && req.requested.is_empty());
    let cond = service_condition(&ServiceOutcome::default(), &invalid);
    assert_eq!(
        (cond.status, cond.reason.as_str()),
        (false, REASON_INVALID_REQUEST)
    );
    assert!(cond.message.contains("\"nope\""), "{}", cond.message);
}

#[test]
fn service_status_and_whether_it_is_current() {
    let p = pool_of(&pool(json!({"blocks": [{"cidr": "198.51.100.0/30"}]})));
    let services = [
        service("a", json!({}), json!({})),
        service("b", json!({}), json!({})),
        service("c", json!({}), json!({})),
    ];
    let requests: Vec<ServiceRequest> = services.iter().map(|s| request_of(s).0).collect();
    let out = Allocator::new().plan(&[p], &requests);
    let no_invalid = Default::default();
    let desired: Vec<_> = desired_services(&out, &no_invalid).collect();
    assert_eq!(desired[0].1.ips, [ip("198.51.100.1")]);
    assert_eq!(desired[0].1.condition.message, "assigned 198.51.100.1");
    assert!(desired[0].1.condition.status);
    assert!(matches!(
        out.services[desired[2].0].problems[..],
        [Problem::Exhausted { .. }]
    ));
    assert_eq!(desired[2].1.condition.reason, "PoolExhausted");

    let mut svc = services[0].clone();
    assert!(!desired[0].1.is_current(&svc));
    svc.status = Some(
        serde_json::from_value(json!({
            "loadBalancer": {"ingress": [{"ip": "198.51.100.1", "ipMode": "VIP"}]},
            "conditions": [{"type": REQUEST_SATISFIED, "status": "True", "reason": REASON_SATISFIED,
                            "message": "assigned 198.51.100.1", "observedGeneration": 1,
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        }))
        .unwrap(),
    );
    assert!(desired[0].1.is_current(&svc));
    assert!(has_our_condition(&svc));
    assert_eq!(ingress_ips(&svc), [ip("198.51.100.1")]);
}
