//! Pod + Namespace → the `Endpoint` the pod should have: pure values, no Kubernetes client.
//!
//! A pod gets an `Endpoint` once it runs on a node with addresses of its own: it has
//! `spec.nodeName` and at least one IP in `status.podIPs`, it is not `hostNetwork` (those
//! pods are the host, identity `host`), and it has not finished (`Succeeded`/`Failed` pods
//! keep their status IPs, but the IPs have been released to others). A terminating pod keeps
//! its `Endpoint` until it is gone: its containers still send and receive.

use super::pod::{PodInfo, PodInfoContainer};
use crate::identities::labels::{LabelFilter, MAX_SECURITY_LABELS, SecurityLabels};
use k8s_openapi::api::core::v1::Namespace;
use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use tendril_crds::v1alpha1::{EndpointSpec, EndpointWorkload, NamedPort};

/// Why a pod has no `Endpoint`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    NotScheduled,
    NoIps,
    HostNetwork,
    Finished,
    /// The namespace is not in the cache yet; its labels are part of the identity.
    NamespaceUnknown,
    TooManyLabels(usize),
}

impl Skip {
    /// Whether the pod may qualify later without itself changing (so: look again).
    pub fn is_transient(&self) -> bool {
        matches!(self, Skip::NamespaceUnknown)
    }
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::NotScheduled => f.write_str("pod has no spec.nodeName"),
            Skip::NoIps => f.write_str("pod has no IP in status.podIPs"),
            Skip::HostNetwork => f.write_str("pod uses the host network"),
            Skip::Finished => f.write_str("pod has finished"),
            Skip::NamespaceUnknown => f.write_str("the pod's namespace is not known yet"),
            Skip::TooManyLabels(n) => write!(
                f,
                "pod has {n} security labels, more than the {MAX_SECURITY_LABELS} an identity may carry"
            ),
        }
    }
}

/// What the endpoints concern computes from a pod, before an identity is attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredEndpoint {
    pub node: String,
    pub ips: Vec<String>,
    pub security_labels: SecurityLabels,
    pub named_ports: Vec<NamedPort>,
    pub service_account: String,
    pub workload: Option<EndpointWorkload>,
    pub pod_uid: String,
}

/// The pod's IPs, at most one per family, primary first; unparsable entries are skipped.
pub fn pod_ips(pod: &PodInfo) -> Vec<String> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let listed = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .chain(status.pod_ip.as_deref());
    let mut seen_v4 = false;
    let mut seen_v6 = false;
    let mut out = Vec::new();
    for text in listed {
        let Ok(ip) = text.parse::<IpAddr>() else {
            continue;
        };
        let seen = if ip.is_ipv4() {
            &mut seen_v4
        } else {
            &mut seen_v6
        };
        if !*seen {
            *seen = true;
            out.push(ip.to_string());
        }
    }
    out
}

/// Named ports of the pod's containers (and restartable init containers, i.e. sidecars);
/// the first port of a name wins, protocol defaults to TCP.
pub fn named_ports(pod: &PodInfo) -> Vec<NamedPort> {
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    let containers: Vec<&PodInfoContainer> = spec.containers.iter().chain(sidecars).collect();
    let mut names = BTreeSet::new();
    let mut out = Vec::new();
    for port in containers.iter().flat_map(|c| c.ports.iter().flatten()) {
        let Some(name) = port.name.as_ref().filter(|n| !n.is_empty()) else {
            continue;
        };
        if names.insert(name.clone()) {
            out.push(NamedPort {
                name: name.clone(),
                port: port.container_port,
                protocol: port.protocol.clone().unwrap_or_else(|| "TCP".to_string()),
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The workload that runs `pod`, from its controller owner reference (the first owner when
/// none is marked controller), as Cilium and Hubble derive it: a ReplicaSet named
/// `<name>-<pod-template-hash>` (the pod carries that label) is Deployment `<name>`; a Job
/// named `<name>-<8 to 10 digits>` (the scheduled time a CronJob appends) is CronJob
/// `<name>`; any other owner is its own workload. `None` for a pod without owners.
pub fn workload(pod: &PodInfo) -> Option<EndpointWorkload> {
    let owners = pod.metadata.owner_references.as_deref().unwrap_or_default();
    let owner = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.first())
        .filter(|o| !o.kind.is_empty() && !o.name.is_empty())?;
    let hash = pod
        .pod_labels()
        .get("pod-template-hash")
        .filter(|h| !h.is_empty());
    let of = |kind: &str, name: &str| {
        Some(EndpointWorkload {
            kind: kind.into(),
            name: name.into(),
        })
    };
    match owner.kind.as_str() {
        "ReplicaSet" => {
            if let Some(deployment) = hash.and_then(|h| {
                owner
                    .name
                    .strip_suffix(h.as_str())
                    .and_then(|n| n.strip_suffix('-'))
                    .filter(|n| !n.is_empty())
            }) {
                return of("Deployment", deployment);
            }
        }
        "Job" => {
            if let Some((cron_job, time)) = owner.name.rsplit_once('-')
                && !cron_job.is_empty()
                && (8..=10).contains(&time.len())
                && time.bytes().all(|b| b.is_ascii_digit())
            {
                return of("CronJob", cron_job);
            }
        }
        _ => {}
    }
    of(&owner.kind, &owner.name)
}

/// The `Endpoint` content a pod should have, or why it has none.
pub fn desired_endpoint(
    pod: &PodInfo,
    namespace: Option<&Namespace>,
    filter: &LabelFilter,
) -> Result<DesiredEndpoint, Skip> {
    let spec = pod.spec.as_ref().ok_or(Skip::NotScheduled)?;
    if spec.host_network == Some(true) {
        return Err(Skip::HostNetwork);
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return Err(Skip::Finished);
    }
    let node = spec
        .node_name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or(Skip::NotScheduled)?;
    let ips = pod_ips(pod);
    if ips.is_empty() {
        return Err(Skip::NoIps);
    }
    let namespace = namespace.ok_or(Skip::NamespaceUnknown)?;
    let empty = Default::default();
    let service_account = spec
        .service_account_name
        .clone()
        .or_else(|| {
            #[allow(deprecated)]
            spec.service_account.clone()
        })
        .unwrap_or_default();
    let security_labels = filter.security_labels(
        pod.pod_labels(),
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        namespace.metadata.labels.as_ref().unwrap_or(&empty),
        &service_account,
    );
    if security_labels.len() > MAX_SECURITY_LABELS {
        return Err(Skip::TooManyLabels(security_labels.len()));
    }
    Ok(DesiredEndpoint {
        node,
        ips,
        security_labels,
        named_ports: named_ports(pod),
        service_account,
        workload: workload(pod),
        pod_uid: pod.metadata.uid.clone().unwrap_or_default(),
    })
}

/// The full spec to write: the desired content, the identity, and a revision that moves
/// only when the content changes (the identity standing for the security labels).
pub fn endpoint_spec(
    desired: DesiredEndpoint,
    identity: Option<i64>,
    current: Option<&EndpointSpec>,
) -> EndpointSpec {
    let mut spec = EndpointSpec {
        node: desired.node,
        ips: desired.ips,
        security_labels: desired.security_labels,
        identity,
        named_ports: desired.named_ports,
        service_account: desired.service_account,
        workload: desired.workload,
        pod_uid: desired.pod_uid,
        revision: 0,
    };
    spec.revision = match current {
        Some(cur) => {
            // The security labels are not compared: the cache drops them (see
            // `super::cache`), and the identity, compared, stands for them.
            let same = EndpointSpec {
                revision: cur.revision,
                security_labels: cur.security_labels.clone(),
                ..spec.clone()
            } == *cur;
            if same { cur.revision } else { cur.revision + 1 }
        }
        None => 1,
    };
    spec
}

#[cfg(test)]
mod tests {
    use super::super::pod::trim_pod;
    use super::*;
    use k8s_openapi::api::core::v1::{Container, ContainerPort, Pod, PodIP, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use kube::api::ObjectMeta;
    use std::collections::BTreeMap;

    fn pod() -> PodInfo {
        PodInfo::from(&Pod {
            metadata: ObjectMeta {
                name: Some("web-1".into()),
                namespace: Some("shop".into()),
                labels: Some(BTreeMap::from([
                    ("app".to_string(), "web".to_string()),
                    ("pod-template-hash".to_string(), "abc".to_string()),
                ])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-a".into()),
                service_account_name: Some("web".into()),
                containers: vec![
                    Container {
                        name: "main".into(),
                        ports: Some(vec![
                            ContainerPort {
                                name: Some("http".into()),
                                container_port: 8080,
                                ..Default::default()
                            },
                            ContainerPort {
                                container_port: 9999,
                                ..Default::default()
                            },
                        ]),
                        ..Default::default()
                    },
                    Container {
                        name: "dns".into(),
                        ports: Some(vec![
                            ContainerPort {
                                name: Some("dns".into()),
                                container_port: 53,
                                protocol: Some("UDP".into()),
                                ..Default::default()
                            },
                            ContainerPort {
                                name: Some("http".into()),
                                container_port: 1,
                                ..Default::default()
                            },
                        ]),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some("10.0.1.5".into()),
                pod_ips: Some(vec![
                    PodIP {
                        ip: "10.0.1.5".into(),
                    },
                    PodIP {
                        ip: "fd00::1:5".into(),
                    },
                ]),
                ..Default::default()
            }),
        })
    }

    fn namespace() -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some("shop".into()),
                labels: Some(BTreeMap::from([(
                    "kubernetes.io/metadata.name".to_string(),
                    "shop".to_string(),
                )])),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_running_pod_gets_its_endpoint() {
        let got = desired_endpoint(&pod(), Some(&namespace()), &LabelFilter::default()).unwrap();
        assert_eq!(got.node, "node-a");
        assert_eq!(got.ips, vec!["10.0.1.5", "fd00::1:5"]);
        assert_eq!(got.service_account, "web");
        assert_eq!(
            got.named_ports,
            vec![
                NamedPort {
                    name: "dns".into(),
                    port: 53,
                    protocol: "UDP".into()
                },
                NamedPort {
                    name: "http".into(),
                    port: 8080,
                    protocol: "TCP".into()
                },
            ]
        );
        assert_eq!(
            got.security_labels.keys().collect::<Vec<_>>(),
            vec![
                "k8s:app",
                "k8s:io.kubernetes.pod.namespace",
                "k8s:io.kubernetes.pod.serviceaccount",
                "k8s:io.tendril.k8s.namespace.labels.kubernetes.io/metadata.name",
            ]
        );
    }

    /// A pod as a Deployment makes it: env, volumes, probes, resources, a sidecar and a
    /// plain init container, annotations, conditions and container statuses.
    fn full_pod() -> Pod {
        let json = serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u1",
                "labels": {"app": "web", "pod-template-hash": "abc"},
                "annotations": {"kubectl.kubernetes.io/restartedAt": "x".repeat(400)},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "web-abc", "uid": "rs1", "controller": true}]},
            "spec": {"nodeName": "node-a", "serviceAccountName": "web",
                "containers": [{"name": "main", "image": "registry.example/web:1.2.3",
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "env": (0..30).map(|i| serde_json::json!({"name": format!("VAR_{i}"), "value": "v".repeat(40)})).collect::<Vec<_>>(),
                    "resources": {"limits": {"cpu": "1", "memory": "1Gi"}},
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}},
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                "initContainers": [
                    {"name": "migrate", "image": "registry.example/migrate:1"},
                    {"name": "proxy", "image": "registry.example/proxy:1", "restartPolicy": "Always",
                        "ports": [{"name": "metrics", "containerPort": 9090}]}],
                "volumes": [{"name": "data", "emptyDir": {}}],
                "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]},
            "status": {"phase": "Running", "podIP": "10.0.1.5", "podIPs": [{"ip": "10.0.1.5"}],
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "main", "ready": true, "restartCount": 0,
                    "image": "registry.example/web:1.2.3", "imageID": "sha256:0123", "containerID": "containerd://0123"}]}
        });
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_decoded_and_trimmed_pod_yields_the_same_endpoint_and_keeps_its_owner() {
        let f = LabelFilter::default();
        let ns = namespace();
        // Decoded from the watch's JSON, as the cache does, and converted from a full Pod.
        let full = full_pod();
        let decoded: PodInfo =
            serde_json::from_value(serde_json::to_value(&full).unwrap()).unwrap();
        assert_eq!(decoded, PodInfo::from(&full));
        let mut trimmed = decoded.clone();
        trim_pod(&mut trimmed);
        assert_eq!(
            desired_endpoint(&trimmed, Some(&ns), &f),
            desired_endpoint(&decoded, Some(&ns), &f)
        );
        let desired = desired_endpoint(&trimmed, Some(&ns), &f).unwrap();
        assert_eq!(desired.ips, ["10.0.1.5"]);
        assert_eq!(desired.node, "node-a");
        assert_eq!(desired.service_account, "web");
        assert_eq!(desired.pod_uid, "u1");
        assert_eq!(workload(&trimmed), of("Deployment", "web"));
        assert_eq!(trimmed.metadata.annotations, None);
        // The labels moved to their set's one shared copy.
        let mut twin = decoded.clone();
        twin.metadata.name = Some("web-2".into());
        trim_pod(&mut twin);
        assert_eq!(trimmed.metadata.labels, None);
        assert_eq!(trimmed.pod_labels(), decoded.pod_labels());
        assert!(std::sync::Arc::ptr_eq(
            trimmed.shared_labels.as_ref().unwrap(),
            twin.shared_labels.as_ref().unwrap()
        ));
        let names: Vec<String> = named_ports(&trimmed).into_iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            ["http", "metrics"],
            "main's http and the sidecar's metrics"
        );
        let inits = trimmed
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref());
        assert_eq!(inits.map(Vec::len), Some(1), "only the sidecar is kept");
        let trimmed_len = serde_json::to_vec(&trimmed).unwrap().len();
        let full_len = serde_json::to_vec(&full).unwrap().len();
        assert!(
            trimmed_len * 4 < full_len,
            "{trimmed_len} of {full_len} bytes left"
        );
    }

    #[test]
    fn pods_that_do_not_qualify() {
        let f = LabelFilter::default();
        let ns = namespace();
        let mut p = pod();
        p.spec.as_mut().unwrap().node_name = None;
        assert_eq!(desired_endpoint(&p, Some(&ns), &f), Err(Skip::NotScheduled));
        let mut p = pod();
        let status = p.status.as_mut().unwrap();
        status.pod_ips = None;
        status.pod_ip = None;
        assert_eq!(desired_endpoint(&p, Some(&ns), &f), Err(Skip::NoIps));
        let mut p = pod();
        p.spec.as_mut().unwrap().host_network = Some(true);
        assert_eq!(desired_endpoint(&p, Some(&ns), &f), Err(Skip::HostNetwork));
        let mut p = pod();
        p.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert_eq!(desired_endpoint(&p, Some(&ns), &f), Err(Skip::Finished));
        assert_eq!(
            desired_endpoint(&pod(), None, &f),
            Err(Skip::NamespaceUnknown)
        );
        let mut p = pod();
        let labels = p.metadata.labels.as_mut().unwrap();
        for i in 0..70 {
            labels.insert(format!("l{i}"), "x".into());
        }
        assert!(matches!(
            desired_endpoint(&p, Some(&ns), &f),
            Err(Skip::TooManyLabels(_))
        ));
    }

    #[test]
    fn ips_one_per_family_primary_first() {
        let mut p = pod();
        let status = p.status.as_mut().unwrap();
        status.pod_ips = Some(vec![
            PodIP {
                ip: "fd00::9".into(),
            },
            PodIP {
                ip: "garbage".into(),
            },
            PodIP {
                ip: "10.0.0.9".into(),
            },
            PodIP {
                ip: "10.0.0.10".into(),
            },
        ]);
        assert_eq!(pod_ips(&p), vec!["fd00::9", "10.0.0.9"]);
    }

    fn owned_by(kind: &str, name: &str, controller: Option<bool>) -> OwnerReference {
        OwnerReference {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            controller,
            ..Default::default()
        }
    }

    fn pod_owned_by(owners: Vec<OwnerReference>) -> PodInfo {
        let mut p = pod();
        p.metadata.owner_references = Some(owners);
        p
    }

    fn of(kind: &str, name: &str) -> Option<EndpointWorkload> {
        Some(EndpointWorkload {
            kind: kind.into(),
            name: name.into(),
        })
    }

    #[test]
    fn the_workload_of_a_deployment_pod_is_the_deployment() {
        // The test pod carries pod-template-hash=abc.
        let p = pod_owned_by(vec![owned_by("ReplicaSet", "web-abc", Some(true))]);
        assert_eq!(workload(&p), of("Deployment", "web"));
        let got = desired_endpoint(&p, Some(&namespace()), &LabelFilter::default()).unwrap();
        assert_eq!(got.workload, of("Deployment", "web"));
        // A ReplicaSet whose name does not end in the pod's hash is its own workload.
        let p = pod_owned_by(vec![owned_by("ReplicaSet", "web-5d8f", Some(true))]);
        assert_eq!(workload(&p), of("ReplicaSet", "web-5d8f"));
        let mut p = pod_owned_by(vec![owned_by("ReplicaSet", "web-abc", Some(true))]);
        p.metadata
            .labels
            .as_mut()
            .unwrap()
            .remove("pod-template-hash");
        assert_eq!(workload(&p), of("ReplicaSet", "web-abc"));
        // Exactly the hash as the name leaves no Deployment name.
        let p = pod_owned_by(vec![owned_by("ReplicaSet", "-abc", Some(true))]);
        assert_eq!(workload(&p), of("ReplicaSet", "-abc"));
    }

    #[test]
    fn other_owners_and_none() {
        let p = pod_owned_by(vec![owned_by("StatefulSet", "db", Some(true))]);
        assert_eq!(workload(&p), of("StatefulSet", "db"));
        let p = pod_owned_by(vec![owned_by("DaemonSet", "agent", Some(true))]);
        assert_eq!(workload(&p), of("DaemonSet", "agent"));
        // A Job a CronJob made: <cronjob>-<scheduled minutes>.
        let p = pod_owned_by(vec![owned_by("Job", "backup-29012345", Some(true))]);
        assert_eq!(workload(&p), of("CronJob", "backup"));
        let p = pod_owned_by(vec![owned_by("Job", "migrate-v2", Some(true))]);
        assert_eq!(workload(&p), of("Job", "migrate-v2"));
        let p = pod_owned_by(vec![owned_by("Job", "once-1234", Some(true))]);
        assert_eq!(workload(&p), of("Job", "once-1234"), "too few digits");
        // The controller owner wins over others; without one, the first owner.
        let p = pod_owned_by(vec![
            owned_by("ConfigMap", "x", None),
            owned_by("StatefulSet", "db", Some(true)),
        ]);
        assert_eq!(workload(&p), of("StatefulSet", "db"));
        let p = pod_owned_by(vec![owned_by("Rollout", "canary", None)]);
        assert_eq!(workload(&p), of("Rollout", "canary"));
        assert_eq!(workload(&pod()), None);
        assert_eq!(workload(&pod_owned_by(Vec::new())), None);
    }

    #[test]
    fn revision_moves_only_on_change() {
        let desired =
            desired_endpoint(&pod(), Some(&namespace()), &LabelFilter::default()).unwrap();
        let first = endpoint_spec(desired.clone(), None, None);
        assert_eq!(first.revision, 1);
        let same = endpoint_spec(desired.clone(), None, Some(&first));
        assert_eq!(same.revision, 1);
        let with_identity = endpoint_spec(desired, Some(300), Some(&same));
        assert_eq!(with_identity.revision, 2);
        assert_eq!(with_identity.identity, Some(300));
    }
}
