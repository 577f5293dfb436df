//! [`PodInfo`]: the Pod as the operator's cache holds it — the fields the endpoints concern
//! reads, deserialized straight from the watch, nothing else.
//!
//! The operator caches every pod of the cluster. `k8s_openapi`'s `Pod` is large in memory
//! even when emptied (a `PodSpec` is ~1 KiB of inline options, each `Container` as much
//! again): at 10,000 pods the heap profile of the scale bench showed the Pod cache at
//! ~4.3 KiB per pod with the content already trimmed. A type of its own is decoded without
//! ever building the full object and stores ~0.5 KiB per pod.
//!
//! A pod's labels are most of what remains (a B-tree of four labels is ~0.6 KiB): the cache
//! holds one shared copy per label set, which the pods of a Deployment repeat.

use k8s_openapi::api::core::v1::{ContainerPort, Pod, PodIP};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};
use tendril_runtime::intern::Interner;

type Labels = BTreeMap<String, String>;

/// The label sets of the cached pods, each held once.
static LABEL_SETS: LazyLock<Interner<Labels>> = LazyLock::new(Interner::new);

/// A Pod as the endpoints concern reads it (same API kind and field names as `Pod`;
/// unknown fields are skipped while decoding).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct PodInfo {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<PodInfoSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<PodInfoStatus>,
    /// `metadata.labels` once the cache trimmed the pod ([`trim_pod`]): the shared copy.
    #[serde(skip)]
    pub shared_labels: Option<Arc<Labels>>,
}

impl PodInfo {
    /// The pod's labels, decoded or trimmed ([`trim_pod`] moves them to one shared copy).
    pub fn pod_labels(&self) -> &Labels {
        static NONE: Labels = BTreeMap::new();
        self.metadata
            .labels
            .as_ref()
            .or(self.shared_labels.as_deref())
            .unwrap_or(&NONE)
    }
}

/// What is read of `spec`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodInfoSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_network: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Deprecated alias of `serviceAccountName`, still honoured when it is the only one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(default)]
    pub containers: Vec<PodInfoContainer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_containers: Option<Vec<PodInfoContainer>>,
}

/// What is read of a container: its ports (named ports) and whether an init container is
/// a sidecar (`restartPolicy: Always`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodInfoContainer {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<ContainerPort>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<String>,
}

/// What is read of `status`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodInfoStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(rename = "podIP", default, skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs", default, skip_serializing_if = "Option::is_none")]
    pub pod_ips: Option<Vec<PodIP>>,
}

slim_resource!(PodInfo, Pod);

/// What the cache drops from what it decoded: annotations (a pod's are often most of its
/// metadata, and nothing here reads them) and init containers that are not sidecars; the
/// labels move to their label set's shared copy ([`PodInfo::pod_labels`] reads them).
pub fn trim_pod(pod: &mut PodInfo) {
    pod.metadata.annotations = None;
    if let Some(labels) = pod.metadata.labels.take() {
        pod.shared_labels = Some(LABEL_SETS.share(labels));
    }
    if let Some(inits) = pod.spec.as_mut().and_then(|s| s.init_containers.as_mut()) {
        inits.retain(|c| c.restart_policy.as_deref() == Some("Always"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_fields_it_reads_under_their_api_names() {
        let pod: PodInfo = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ns", "uid": "u", "labels": {"app": "a"}},
            "spec": {"nodeName": "n1", "hostNetwork": false, "serviceAccountName": "sa",
                "serviceAccount": "old", "schedulerName": "default-scheduler",
                "containers": [{"name": "c", "image": "i",
                    "ports": [{"name": "http", "containerPort": 80}], "env": [{"name": "X"}]}],
                "initContainers": [{"name": "s", "restartPolicy": "Always"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1",
                "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}], "qosClass": "BestEffort"}
        }))
        .unwrap();
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("n1"));
        assert_eq!(spec.host_network, Some(false));
        assert_eq!(spec.service_account_name.as_deref(), Some("sa"));
        assert_eq!(spec.service_account.as_deref(), Some("old"));
        assert_eq!(
            spec.containers[0].ports.as_ref().unwrap()[0].container_port,
            80
        );
        assert_eq!(
            spec.init_containers.as_ref().unwrap()[0]
                .restart_policy
                .as_deref(),
            Some("Always")
        );
        let status = pod.status.as_ref().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.1"));
        assert_eq!(status.pod_ips.as_ref().unwrap()[1].ip, "fd00::1");
    }

    #[test]
    fn is_a_fraction_of_a_pod_in_memory() {
        // (Spec and status are inline options of both.)
        use k8s_openapi::api::core::v1::Container;
        let full = std::mem::size_of::<Pod>() + std::mem::size_of::<Container>();
        let slim = std::mem::size_of::<PodInfo>() + std::mem::size_of::<PodInfoContainer>();
        assert!(slim * 4 < full, "{slim} bytes against {full}");
    }
}
