//! The scale world's objects: sizes, kwok's stages, and the Nodes, Namespaces, Pods,
//! Services and NetworkPolicies the harness creates.

use super::*;

pub(super) const FULL_NODES: usize = 1_000;
pub(super) const FULL_PODS: usize = 100_000;
pub(super) const PODS_PER_NAMESPACE: usize = 100;
pub(super) const APPS_PER_NAMESPACE: usize = 5;
pub(super) const SERVICES_PER_NAMESPACE: usize = 10;
pub(super) const POLICIES_PER_NAMESPACE: usize = 1;
pub(super) const CONCURRENCY: usize = 64;
/// Pods with label sets of their own, created at once: allocation burst and GC probe.
pub(super) const GC_PROBE_PODS: usize = 1_000;
pub(super) const GC_GRACE_SECS: u64 = 30;
pub(super) const NODE_LABEL: (&str, &str) = ("type", "kwok");
pub(super) const IP_ANNOTATION: &str = "scale.tendril.dev/internal-ip";
pub(super) const SETTLE_TIMEOUT: Duration = Duration::from_secs(1800);

/// kwok's configuration: the Stages that play kubelet. Written for this harness from
/// kwok's Stage API (kwok.x-k8s.io/v1alpha1); the templates use kwok's functions `Now`,
/// `Quote`, `NodeIPWith`-style helpers (`PodIPsWith`, `NodeIPsWith`).
pub(super) const KWOK_CONFIG: &str = r#"
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokConfiguration
options:
  podPlayStageParallelism: 16
  nodePlayStageParallelism: 4
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: scale-node-ready
spec:
  resourceRef:
    apiGroup: v1
    kind: Node
  selector:
    matchExpressions:
    - key: '.status.phase'
      operator: 'NotIn'
      values: ['Running']
  next:
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      - type: Ready
        status: "True"
        reason: KubeletReady
        message: kwok
        lastHeartbeatTime: {{ $now | Quote }}
        lastTransitionTime: {{ $now | Quote }}
      addresses:
      - type: InternalIP
        address: {{ index .metadata.annotations "scale.tendril.dev/internal-ip" | Quote }}
      - type: Hostname
        address: {{ .metadata.name | Quote }}
      allocatable: {cpu: 1k, memory: 1Ti, pods: 1M}
      capacity: {cpu: 1k, memory: 1Ti, pods: 1M}
      phase: Running
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: scale-pod-running
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'DoesNotExist'
    - key: '.status.phase'
      operator: 'In'
      values: ['Pending']
  next:
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      - {type: Initialized, status: "True", lastTransitionTime: {{ $now | Quote }}}
      - {type: Ready, status: "True", lastTransitionTime: {{ $now | Quote }}}
      - {type: ContainersReady, status: "True", lastTransitionTime: {{ $now | Quote }}}
      containerStatuses:
      {{ range .spec.containers }}
      - image: {{ .image | Quote }}
        name: {{ .name | Quote }}
        ready: true
        restartCount: 0
        state:
          running:
            startedAt: {{ $now | Quote }}
      {{ end }}
      {{ with NodeIPsWith .spec.nodeName }}
      hostIP: {{ index . 0 | Quote }}
      {{ end }}
      {{ with PodIPsWith .spec.nodeName false .metadata.uid .metadata.name .metadata.namespace }}
      podIP: {{ index . 0 | Quote }}
      podIPs:
      {{ range . }}
      - ip: {{ . | Quote }}
      {{ end }}
      {{ end }}
      phase: Running
      startTime: {{ $now | Quote }}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: scale-pod-delete
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'Exists'
  next:
    delete: true
"#;

/// The sizes of one run.
#[derive(Clone, Copy, Debug)]
pub(super) struct Size {
    pub(super) fraction: f64,
    pub(super) nodes: usize,
    pub(super) namespaces: usize,
    pub(super) pods: usize,
    pub(super) services: usize,
    pub(super) policies: usize,
}

impl Size {
    pub(super) fn of(fraction: f64) -> Size {
        let nodes = ((FULL_NODES as f64 * fraction).round() as usize).max(1);
        let pods = ((FULL_PODS as f64 * fraction).round() as usize).max(PODS_PER_NAMESPACE);
        let namespaces = pods.div_ceil(PODS_PER_NAMESPACE);
        Size {
            fraction,
            nodes,
            namespaces,
            pods: namespaces * PODS_PER_NAMESPACE,
            services: namespaces * SERVICES_PER_NAMESPACE,
            policies: namespaces * POLICIES_PER_NAMESPACE,
        }
    }
}

pub(super) fn env_or<T: std::str::FromStr>(key: &str, default: T) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(key) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|e| anyhow::anyhow!("{key}={v}: {e}")),
        Err(_) => Ok(default),
    }
}

// ------------------------------------------------------------------ objects

pub(super) fn node(i: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": format!("kwok-{i}"),
                     "labels": {NODE_LABEL.0: NODE_LABEL.1},
                     "annotations": {IP_ANNOTATION: format!("172.20.{}.{}", i / 250, i % 250 + 1)}},
        // One /24 per node, out of 10.128.0.0/9 (clear of the service CIDR 10.96.0.0/16).
        "spec": {"podCIDR": format!("10.{}.{}.0/24", 128 + i / 256, i % 256)}})
}

pub(super) fn namespace_name(n: usize) -> String {
    format!("scale-{n}")
}

pub(super) fn namespace(n: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": namespace_name(n), "labels": {"team": format!("team-{}", n % 20)}}})
}

/// The `pod-template-hash` of app `app`'s ReplicaSet in namespace `n`: every pod of the app
/// carries the same one, as the pods of a Deployment do (a replacement keeps it; only a
/// rollout would change it).
fn template_hash(n: usize, app: usize) -> String {
    format!(
        "{:08x}",
        (n * APPS_PER_NAMESPACE + app).wrapping_mul(2_654_435_761) as u32
    )
}

/// A pod of app `app` in namespace `n`; `serial` makes the name unique over the churn.
pub(super) fn pod(n: usize, app: usize, serial: usize, node: usize) -> Value {
    let tier = ["web", "api", "db"][app % 3];
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("app{app}-{serial}"), "namespace": namespace_name(n),
            "labels": {"app": format!("app{app}"), "tier": tier,
                       "version": "v1", "pod-template-hash": template_hash(n, app)}},
        "spec": {"nodeName": format!("kwok-{node}"),
                 "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10",
                                 "ports": [{"name": "http", "containerPort": 8080}]}]}})
}

pub(super) fn service(n: usize, s: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc{s}"), "namespace": namespace_name(n)},
        "spec": {"selector": {"app": format!("app{}", s % APPS_PER_NAMESPACE)},
                 "ports": [{"name": "http", "port": 80 + s as i32, "targetPort": "http"}]}})
}

/// app0 accepts app1 on 8080 and the team's other namespaces on 8080.
pub(super) fn policy(n: usize, p: usize) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": format!("np{p}"), "namespace": namespace_name(n)},
        "spec": {"podSelector": {"matchLabels": {"app": format!("app{p}")}},
                 "policyTypes": ["Ingress"],
                 "ingress": [{"from": [
                     {"podSelector": {"matchLabels": {"app": format!("app{}", p + 1)}}},
                     {"namespaceSelector": {"matchLabels": {"team": format!("team-{}", n % 20)}},
                      "podSelector": {"matchLabels": {"tier": "web"}}}],
                     "ports": [{"protocol": "TCP", "port": 8080}]}]}})
}
