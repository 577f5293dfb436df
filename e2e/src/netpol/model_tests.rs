//! Tests of `model`, in a file of their own.
use super::*;
use serde_json::json;

fn cluster() -> Cluster {
    let mut pods = Vec::new();
    let mut namespaces = Vec::new();
    for (n, ns) in ["x", "y"].iter().enumerate() {
        namespaces.push(Namespace {
            name: ns.to_string(),
            labels: Labels::from([("ns".into(), ns.to_string())]),
        });
        for (p, pod) in ["a", "b"].iter().enumerate() {
            pods.push(Pod {
                namespace: ns.to_string(),
                name: pod.to_string(),
                labels: Labels::from([("pod".into(), pod.to_string())]),
                ip: format!("10.0.{n}.{}", p + 1).parse().unwrap(),
                node: "n".into(),
                named_ports: vec![NamedPort {
                    name: "web".into(),
                    port: 80,
                    protocol: Protocol::Tcp,
                }],
                service_account: None,
            });
        }
    }
    Cluster { namespaces, pods }
}

fn k8s(v: serde_json::Value) -> K8sNetworkPolicy {
    serde_json::from_value(v).unwrap()
}

#[test]
fn no_policy_allows_everything() {
    let c = cluster();
    let m = Model::new(&c, &Policies::default());
    assert!(m.allowed(0, 3, 80, Protocol::Udp));
}

#[test]
fn deny_all_ingress_isolates_only_selected_pods() {
    let c = cluster();
    let p = Policies {
        kubernetes: vec![k8s(json!({
            "metadata": {"name": "d", "namespace": "x"},
            "spec": {"podSelector": {"matchLabels": {"pod": "a"}}}
        }))],
        ..Policies::default()
    };
    let m = Model::new(&c, &p);
    assert!(!m.allowed(1, 0, 80, Protocol::Tcp));
    assert!(!m.allowed(2, 0, 80, Protocol::Tcp));
    assert!(m.allowed(0, 1, 80, Protocol::Tcp));
    assert!(m.allowed(0, 2, 80, Protocol::Tcp));
    assert!(m.allowed(3, 1, 80, Protocol::Tcp));
}

#[test]
fn named_port_ingress_and_namespace_selector() {
    let c = cluster();
    let p = Policies {
        kubernetes: vec![k8s(json!({
            "metadata": {"name": "n", "namespace": "x"},
            "spec": {"podSelector": {}, "ingress": [{
                "from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                "ports": [{"port": "web"}]
            }]}
        }))],
        ..Policies::default()
    };
    let m = Model::new(&c, &p);
    assert!(m.allowed(2, 0, 80, Protocol::Tcp));
    assert!(!m.allowed(2, 0, 81, Protocol::Tcp));
    assert!(!m.allowed(2, 0, 80, Protocol::Udp));
    assert!(!m.allowed(1, 0, 80, Protocol::Tcp));
}

#[test]
fn tendril_deny_wins_and_namespace_key_widens_scope() {
    let c = cluster();
    let np: NetworkPolicy = serde_json::from_value(json!({
        "apiVersion": "tendril.dev/v1alpha1", "kind": "NetworkPolicy",
        "metadata": {"name": "t", "namespace": "x"},
        "spec": {
            "endpointSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"fromEndpoints": [{"matchLabels": {"io.kubernetes.pod.namespace": "y"}}]}],
            "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "y", "pod": "b"}}]}]
        }
    }))
    .unwrap();
    let p = Policies {
        namespaced: vec![np],
        ..Policies::default()
    };
    let m = Model::new(&c, &p);
    assert!(m.allowed(2, 0, 80, Protocol::Tcp));
    assert!(!m.allowed(3, 0, 80, Protocol::Tcp));
    assert!(!m.allowed(1, 0, 80, Protocol::Tcp));
    assert_eq!(m.sources(0).len(), 1);
    assert!(m.sources(1).is_empty());
}

#[test]
fn invalid_policies_contribute_nothing() {
    let c = cluster();
    let np: ClusterNetworkPolicy = serde_json::from_value(json!({
        "apiVersion": "tendril.dev/v1alpha1", "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "bad"},
        "spec": {
            "endpointSelector": {},
            "ingress": [{"fromCIDRSet": [{"cidr": "10.0.0.0/24", "except": ["10.1.0.0/24"]}]}]
        }
    }))
    .unwrap();
    let p = Policies {
        cluster: vec![np],
        ..Policies::default()
    };
    let m = Model::new(&c, &p);
    assert_eq!(m.invalid().len(), 1);
    assert!(m.allowed(3, 0, 80, Protocol::Tcp));
}
