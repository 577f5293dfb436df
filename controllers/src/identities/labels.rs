//! Security labels: which labels of a pod and its namespace decide its identity.
//!
//! Only security-relevant labels count, so a rolling Deployment, a StatefulSet's pods or a
//! re-run Job do not each burn an identity. The default filter (close to Cilium's) drops:
//! - per-revision and per-pod labels set by the workload controllers: `pod-template-hash`,
//!   `controller-revision-hash`, `pod-template-generation`, `controller-uid`,
//!   `batch.kubernetes.io/controller-uid`, `batch.kubernetes.io/job-completion-index`,
//!   `statefulset.kubernetes.io/pod-name`, `apps.kubernetes.io/pod-index`;
//! - keys under the `kubernetes.io/`, `k8s.io/` and `*.beta.kubernetes.io/` prefixes and
//!   `io.kubernetes.*` keys — except the namespace label `kubernetes.io/metadata.name`.
//!
//! Job names (`job-name`, `batch.kubernetes.io/job-name`) are kept: a policy may select one
//! Job's pods, and a Job's pods all share the name. The recommended labels
//! (`app.kubernetes.io/name`, …) are kept: they are how many applications are selected.
//!
//! A security label map is keyed `<source>:<key>` like Cilium's: pod labels become
//! `k8s:<key>`, the namespace name `k8s:io.kubernetes.pod.namespace`, the namespace's labels
//! `k8s:io.tendril.k8s.namespace.labels.<key>`, the service account
//! `k8s:io.kubernetes.pod.serviceaccount`; reserved identities carry `reserved:<name>`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A security label set: `<source>:<key>` → value, sorted (the identity's key).
pub type SecurityLabels = BTreeMap<String, String>;

/// Source prefix of labels coming from Kubernetes objects.
pub const SOURCE_K8S: &str = "k8s:";
pub use tendril_crds::facts::labels::{
    NAMESPACE_LABELS_PREFIX, NAMESPACE_NAME_LABEL, POD_NAMESPACE, POD_SERVICE_ACCOUNT,
    SOURCE_RESERVED,
};
/// The most labels an `Endpoint`/`Identity` may carry (the CRDs' `maxProperties`).
pub const MAX_SECURITY_LABELS: usize = 64;

/// Label keys dropped by default. `*` matches any run of characters.
pub const DEFAULT_EXCLUDE: &[&str] = &[
    "pod-template-hash",
    "pod-template-generation",
    "controller-revision-hash",
    "controller-uid",
    "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-completion-index",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "kubernetes.io/*",
    "k8s.io/*",
    "beta.kubernetes.io/*",
    "*.beta.kubernetes.io/*",
    "io.kubernetes.*",
    "annotation.*",
];

/// Label keys kept by default even when an exclusion matches.
pub const DEFAULT_INCLUDE: &[&str] = &[NAMESPACE_NAME_LABEL];

/// `identities.labelFilter` in config/operator.yaml.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LabelFilterConfig {
    /// Extra label keys (or `*` patterns) to drop, on top of the defaults.
    pub exclude: Vec<String>,
    /// Label keys (or patterns) always kept, even when an exclusion matches.
    pub include: Vec<String>,
    /// Drop the built-in exclusions and use only `exclude`.
    pub replace_default_excludes: bool,
}

/// Decides which label keys are security-relevant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelFilter {
    exclude: Vec<String>,
    include: Vec<String>,
}

impl Default for LabelFilter {
    fn default() -> Self {
        LabelFilter::new(&LabelFilterConfig::default())
    }
}

impl LabelFilter {
    pub fn new(config: &LabelFilterConfig) -> Self {
        let mut exclude: Vec<String> = if config.replace_default_excludes {
            Vec::new()
        } else {
            DEFAULT_EXCLUDE.iter().map(|s| s.to_string()).collect()
        };
        exclude.extend(config.exclude.iter().cloned());
        let mut include: Vec<String> = DEFAULT_INCLUDE.iter().map(|s| s.to_string()).collect();
        include.extend(config.include.iter().cloned());
        LabelFilter { exclude, include }
    }

    /// Whether a label with this key takes part in the identity.
    pub fn keeps(&self, key: &str) -> bool {
        self.include.iter().any(|p| glob(p, key)) || !self.exclude.iter().any(|p| glob(p, key))
    }

    /// The labels the filter keeps.
    pub fn filter<'a>(
        &'a self,
        labels: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = (&'a String, &'a String)> + 'a {
        labels.iter().filter(|(k, _)| self.keeps(k))
    }

    /// The security label set of a pod.
    pub fn security_labels(
        &self,
        pod_labels: &BTreeMap<String, String>,
        namespace: &str,
        namespace_labels: &BTreeMap<String, String>,
        service_account: &str,
    ) -> SecurityLabels {
        let mut out = SecurityLabels::new();
        for (k, v) in self.filter(pod_labels) {
            out.insert(format!("{SOURCE_K8S}{k}"), v.clone());
        }
        for (k, v) in self.filter(namespace_labels) {
            out.insert(format!("{NAMESPACE_LABELS_PREFIX}{k}"), v.clone());
        }
        out.insert(POD_NAMESPACE.to_string(), namespace.to_string());
        if !service_account.is_empty() {
            out.insert(POD_SERVICE_ACCOUNT.to_string(), service_account.to_string());
        }
        out
    }
}

/// `*`-glob match of a whole string.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn glob_matches_whole_keys() {
        assert!(glob("kubernetes.io/*", "kubernetes.io/arch"));
        assert!(!glob("kubernetes.io/*", "app.kubernetes.io/name"));
        assert!(glob(
            "*.beta.kubernetes.io/*",
            "failure-domain.beta.kubernetes.io/zone"
        ));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "axxbyy"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
        assert!(glob("*", ""));
        assert!(!glob("ab*ba", "aba"));
    }

    #[test]
    fn default_filter_drops_per_revision_and_per_pod_labels() {
        let f = LabelFilter::default();
        for dropped in [
            "pod-template-hash",
            "controller-revision-hash",
            "pod-template-generation",
            "controller-uid",
            "batch.kubernetes.io/controller-uid",
            "batch.kubernetes.io/job-completion-index",
            "statefulset.kubernetes.io/pod-name",
            "apps.kubernetes.io/pod-index",
            "kubernetes.io/hostname",
            "k8s.io/whatever",
            "io.kubernetes.container.name",
        ] {
            assert!(!f.keeps(dropped), "{dropped} should be dropped");
        }
        for kept in [
            "app",
            "tier",
            "app.kubernetes.io/name",
            "job-name",
            "batch.kubernetes.io/job-name",
            "kubernetes.io/metadata.name",
        ] {
            assert!(f.keeps(kept), "{kept} should be kept");
        }
    }

    #[test]
    fn include_beats_exclude_and_defaults_can_be_replaced() {
        let f = LabelFilter::new(&LabelFilterConfig {
            exclude: vec!["team".into(), "debug-*".into()],
            include: vec!["pod-template-hash".into()],
            replace_default_excludes: false,
        });
        assert!(!f.keeps("team"));
        assert!(!f.keeps("debug-level"));
        assert!(f.keeps("pod-template-hash"));
        assert!(!f.keeps("controller-revision-hash"));

        let f = LabelFilter::new(&LabelFilterConfig {
            exclude: vec!["team".into()],
            include: vec![],
            replace_default_excludes: true,
        });
        assert!(f.keeps("controller-revision-hash"));
        assert!(!f.keeps("team"));
    }

    #[test]
    fn builds_the_security_label_set_of_a_pod() {
        let f = LabelFilter::default();
        let pod = labels(&[("app", "web"), ("pod-template-hash", "abc123")]);
        let ns = labels(&[("kubernetes.io/metadata.name", "shop"), ("env", "prod")]);
        let got = f.security_labels(&pod, "shop", &ns, "web-sa");
        assert_eq!(
            got,
            labels(&[
                ("k8s:app", "web"),
                ("k8s:io.kubernetes.pod.namespace", "shop"),
                ("k8s:io.kubernetes.pod.serviceaccount", "web-sa"),
                ("k8s:io.tendril.k8s.namespace.labels.env", "prod"),
                (
                    "k8s:io.tendril.k8s.namespace.labels.kubernetes.io/metadata.name",
                    "shop"
                ),
            ])
        );
        // A new ReplicaSet of the same Deployment: same identity labels.
        let pod2 = labels(&[("app", "web"), ("pod-template-hash", "def456")]);
        assert_eq!(f.security_labels(&pod2, "shop", &ns, "web-sa"), got);
        // No service account label when the pod has none.
        assert!(
            !f.security_labels(&pod, "shop", &ns, "")
                .contains_key(POD_SERVICE_ACCOUNT)
        );
    }
}
