//! The resolver: every policy and every identity in, one `ResolvedPolicySpec` per cluster
//! identity out. Pure: values in, values out; the reconciler numbers revisions and writes.
//!
//! Semantics (POLICY_SPEC §1): Kubernetes `NetworkPolicy` exactly as upstream (policyTypes
//! defaulting, isolation of the selected pods only, additive allows, ipBlock with except,
//! named ports kept by name, endPort); Tendril `NetworkPolicy`/`ClusterNetworkPolicy` as
//! Cilium (endpoint selectors scoped to the namespace, entities, CIDR sets, deny rules that
//! win, per-direction default deny). An invalid policy contributes nothing at all.
//!
//! Selectors choose among the cluster identities (id ≥ 256) of the input; reserved
//! identities are reached through entities (`host`, `world`, …).
//!
//! The output is canonical, so equal inputs give equal specs whatever their order: rules
//! with the same verdict and ports are merged into one (peers and CIDRs united), then
//! rules with the same verdict, peers and CIDRs (ports united), until nothing merges;
//! peers, CIDRs (aggregated) and ports (ranges coalesced) are sorted, duplicates dropped.
//!
//! Split along its seams: `kubernetes` and `tendril` translate one policy each into its
//! subjects and rules; `ports` and `cidr` parse and normalize what a rule matches;
//! `canonical` merges rule lists into the canonical form; this module combines the rules
//! of every policy that selects an identity into its spec.

mod canonical;
mod cidr;
mod kubernetes;
mod ports;
mod tendril;

use crate::identities::labels::NAMESPACE_LABELS_PREFIX;
use crate::policy::selector::{IdentityIndex, Selector};
use canonical::{Rule, canonical};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use kubernetes::kubernetes;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use tendril::tendril;
use tendril_crds::v1alpha1::{
    ClusterNetworkPolicy, NetworkPolicy, NetworkPolicySpec, PolicySource, PolicySourceKind,
    ResolvedDefaultDeny, ResolvedPolicySpec, Verdict,
};

/// Security labels of one identity, as in `Identity.spec.securityLabels`.
pub type Labels = BTreeMap<String, String>;

/// `PolicySource.kind` of a Tendril `NetworkPolicy`.
pub const KIND_NAMESPACED: PolicySourceKind = PolicySourceKind::NetworkPolicy;
/// `PolicySource.kind` of a `ClusterNetworkPolicy`.
pub const KIND_CLUSTER: PolicySourceKind = PolicySourceKind::ClusterNetworkPolicy;
/// `PolicySource.kind` of a `networking.k8s.io/v1` `NetworkPolicy`.
pub const KIND_KUBERNETES: PolicySourceKind = PolicySourceKind::KubernetesNetworkPolicy;

/// Reasons of `Valid=False`.
pub const INVALID_CIDR: &str = "InvalidCIDR";
pub const INVALID_PORT: &str = "InvalidPort";
pub const INVALID_SELECTOR: &str = "InvalidSelector";
pub const UNSUPPORTED: &str = "Unsupported";
/// Reason of `Valid=True`.
pub const RESOLVED: &str = "Resolved";

/// Verdicts of `ResolvedRule.verdict`.
pub const ALLOW: Verdict = Verdict::Allow;
pub const DENY: Verdict = Verdict::Deny;

use tendril_crds::facts::Reserved;
pub use tendril_crds::facts::{ANY_PEER, CLUSTER_IDENTITY_MIN as MIN_CLUSTER_IDENTITY};
/// Reserved identity of the node itself (always allowed in: kubelet probes).
pub const HOST: i64 = Reserved::Host.id();

/// Every policy the resolver reads.
#[derive(Default, Clone, Debug)]
pub struct Sources {
    pub kubernetes: Vec<k8s_openapi::api::networking::v1::NetworkPolicy>,
    pub namespaced: Vec<NetworkPolicy>,
    pub cluster: Vec<ClusterNetworkPolicy>,
}

/// The outcome of one resolve.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resolution {
    /// Every identity >= 256 in the input → its spec (revision 0; the reconciler numbers it).
    pub policies: BTreeMap<i64, ResolvedPolicySpec>,
    /// Per source policy: Ok(selected identity count) or the reason it was left out.
    /// Sorted by kind, namespace and name.
    pub sources: Vec<(PolicySource, Result<usize, Invalid>)>,
}

/// Why a policy was left out: a `Valid=False` reason and a message for its author.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub reason: &'static str,
    pub message: String,
}

impl Invalid {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

/// Resolves every policy against every identity, from scratch.
pub fn resolve(identities: &BTreeMap<i64, Labels>, sources: &Sources) -> Resolution {
    let mut resolver = Resolver::default();
    resolver.resolve(identities, sources);
    resolver.last
}

/// `(kind, namespace, name)`: a source's place in `Resolution::sources`.
type SourceKey = (PolicySourceKind, Option<String>, String);

/// What a source's translation depends on besides the identities: its resourceVersion
/// when it has one (objects from the API: no need to copy and compare a 10,000-rule spec),
/// else the spec itself.
#[derive(Clone, Debug, PartialEq)]
enum Input {
    Version(String),
    Kubernetes(Option<k8s_openapi::api::networking::v1::NetworkPolicySpec>),
    Tendril(NetworkPolicySpec),
}

impl Input {
    fn of<K: kube::Resource>(obj: &K, spec: impl FnOnce() -> Input) -> Input {
        match &obj.meta().resource_version {
            Some(v) => Input::Version(v.clone()),
            None => spec(),
        }
    }
}

/// One source as last translated.
struct Translated {
    input: Input,
    source: PolicySource,
    result: Result<Arc<Compiled>, Invalid>,
}

impl Translated {
    fn subjects(&self) -> &[i64] {
        self.result.as_ref().map_or(&[], |c| &c.subjects)
    }
}

/// What one resolve had to redo, for logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResolveWork {
    /// Sources translated again (the others' translations reused).
    pub translated: usize,
    /// Identities whose spec was combined again (the others' reused).
    pub combined: usize,
}

/// The resolver with memory: keeps every source's translation and the last resolution, so
/// a change re-translates only the sources that changed (every source when the identities
/// changed: any selector may choose differently) and re-combines only the identities whose
/// spec can differ: the subjects, before and after, of every source whose translation
/// changed, and the identities that appeared or whose labels changed. Equal to
/// [`resolve`] on the same input (a property test checks it over sequences of changes).
#[derive(Default)]
pub struct Resolver {
    identities: BTreeMap<i64, Labels>,
    translated: BTreeMap<SourceKey, Translated>,
    last: Resolution,
}

impl Resolver {
    /// The resolution of `identities` and `sources`.
    pub fn resolution(&self) -> &Resolution {
        &self.last
    }

    /// Resolves `identities` and `sources` (then read [`Self::resolution`]), reusing what
    /// the previous call computed wherever its inputs did not change.
    pub fn resolve(
        &mut self,
        identities: &BTreeMap<i64, Labels>,
        sources: &Sources,
    ) -> ResolveWork {
        let mut work = ResolveWork::default();
        let identities_changed = *identities != self.identities;
        // Identities whose spec may differ from the last resolution's.
        let mut affected: BTreeSet<i64> = BTreeSet::new();
        if identities_changed {
            for (id, labels) in identities.range(MIN_CLUSTER_IDENTITY..) {
                if self.identities.get(id) != Some(labels) {
                    affected.insert(*id);
                }
            }
            self.identities = identities.clone();
        }
        let mut index = IdentityIndex::new(identities, MIN_CLUSTER_IDENTITY);
        let mut previous = std::mem::take(&mut self.translated);
        let mut next: BTreeMap<SourceKey, Translated> = BTreeMap::new();
        let mut step = |key: SourceKey,
                        input: Input,
                        source: PolicySource,
                        index: &mut IdentityIndex,
                        translate: &dyn Fn(
            &mut IdentityIndex,
            PolicySource,
        ) -> Result<Compiled, Invalid>| {
            let old = previous.remove(&key);
            let reusable = old
                .as_ref()
                .is_some_and(|o| !identities_changed && o.input == input && o.source == source);
            let translated = match old {
                Some(old) if reusable => old,
                old => {
                    work.translated += 1;
                    let result = translate(index, source.clone()).map(Arc::new);
                    let fresh = Translated {
                        input,
                        source,
                        result,
                    };
                    let same = old.as_ref().is_some_and(|o| o.result == fresh.result);
                    if !same {
                        affected.extend(fresh.subjects());
                        if let Some(o) = &old {
                            affected.extend(o.subjects());
                        }
                    }
                    fresh
                }
            };
            next.insert(key, translated);
        };
        for np in &sources.kubernetes {
            let source = source_of(KIND_KUBERNETES, np.namespace(), np);
            step(
                key_of(&source),
                Input::of(np, || Input::Kubernetes(np.spec.clone())),
                source,
                &mut index,
                &|index, source| kubernetes(np, index, source),
            );
        }
        for np in &sources.namespaced {
            let source = source_of(KIND_NAMESPACED, np.namespace(), np);
            let ns = np.namespace().unwrap_or_else(|| "default".to_string());
            step(
                key_of(&source),
                Input::of(np, || Input::Tendril(np.spec.clone())),
                source,
                &mut index,
                &|index, source| tendril(&np.spec, Some(&ns), index, source),
            );
        }
        for np in &sources.cluster {
            let source = source_of(KIND_CLUSTER, None, np);
            // Both kinds share one spec shape (see crds/src/v1alpha1/network_policy.rs).
            let spec = || NetworkPolicySpec {
                description: np.spec.description.clone(),
                endpoint_selector: np.spec.endpoint_selector.clone(),
                node_selector: np.spec.node_selector.clone(),
                ingress: np.spec.ingress.clone(),
                ingress_deny: np.spec.ingress_deny.clone(),
                egress: np.spec.egress.clone(),
                egress_deny: np.spec.egress_deny.clone(),
                enable_default_deny: np.spec.enable_default_deny.clone(),
            };
            step(
                key_of(&source),
                Input::of(np, || Input::Tendril(spec())),
                source,
                &mut index,
                &|index, source| tendril(&spec(), None, index, source),
            );
        }
        // Sources gone: their subjects lose them.
        for gone in previous.values() {
            affected.extend(gone.subjects());
        }
        self.translated = next;

        // Which sources select each affected identity (in key order; the combination does
        // not depend on it); identities selected by the same sources get the same spec,
        // computed once.
        let compiled: Vec<&Arc<Compiled>> = self
            .translated
            .values()
            .filter_map(|t| t.result.as_ref().ok())
            .collect();
        let mut selecting: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
        for &id in index.all() {
            if affected.contains(&id) || !self.last.policies.contains_key(&id) {
                selecting.insert(id, Vec::new());
            }
        }
        if !selecting.is_empty() {
            for (i, c) in compiled.iter().enumerate() {
                for id in c.subjects.iter() {
                    if let Some(list) = selecting.get_mut(id) {
                        list.push(i as u32);
                    }
                }
            }
        }
        let mut memo: HashMap<&[u32], Arc<ResolvedPolicySpec>> = HashMap::new();
        let mut policies = std::mem::take(&mut self.last.policies);
        policies.retain(|id, _| identities.contains_key(id) && *id >= MIN_CLUSTER_IDENTITY);
        for (id, list) in &selecting {
            work.combined += 1;
            let shared = memo.entry(list.as_slice()).or_insert_with(|| {
                Arc::new(combine(list.iter().map(|&i| compiled[i as usize].as_ref())))
            });
            let mut spec = ResolvedPolicySpec::clone(shared);
            spec.identity = *id;
            policies.insert(*id, spec);
        }
        let sources = self
            .translated
            .values()
            .map(|t| {
                (
                    t.source.clone(),
                    t.result
                        .as_ref()
                        .map(|c| c.subjects.len())
                        .map_err(Clone::clone),
                )
            })
            .collect();
        self.last = Resolution { policies, sources };
        work
    }
}

fn key_of(s: &PolicySource) -> SourceKey {
    (s.kind, s.namespace.clone(), s.name.clone())
}

fn source_of<K: kube::Resource>(
    kind: PolicySourceKind,
    namespace: Option<String>,
    obj: &K,
) -> PolicySource {
    PolicySource {
        kind,
        namespace,
        name: obj.meta().name.clone().unwrap_or_default(),
        generation: obj.meta().generation,
    }
}

fn source_key(s: &PolicySource) -> (PolicySourceKind, Option<&str>, &str) {
    (s.kind, s.namespace.as_deref(), &s.name)
}

/// One valid policy, translated: its subjects and what it says about them.
#[derive(Debug, PartialEq)]
struct Compiled {
    source: PolicySource,
    subjects: Arc<[i64]>,
    default_deny: ResolvedDefaultDeny,
    ingress: Vec<Rule>,
    egress: Vec<Rule>,
}

/// The spec of a subject selected by exactly `policies`.
fn combine<'a>(policies: impl Iterator<Item = &'a Compiled>) -> ResolvedPolicySpec {
    let mut spec = ResolvedPolicySpec::default();
    let mut ingress = Vec::new();
    let mut egress = Vec::new();
    for c in policies {
        spec.default_deny.ingress |= c.default_deny.ingress;
        spec.default_deny.egress |= c.default_deny.egress;
        ingress.extend(c.ingress.iter().cloned());
        egress.extend(c.egress.iter().cloned());
        spec.sources.push(c.source.clone());
    }
    if spec.default_deny.ingress {
        // The node's own traffic (kubelet probes) is always allowed in, like Cilium's
        // allow-localhost; an explicit deny of `host` still wins in the datapath.
        ingress.push(Rule::any_port(Verdict::Allow, vec![HOST], vec![]));
    }
    spec.ingress = canonical(ingress).into_iter().map(Rule::into_api).collect();
    spec.egress = canonical(egress).into_iter().map(Rule::into_api).collect();
    spec.sources
        .sort_by(|a, b| source_key(a).cmp(&source_key(b)));
    spec.sources.dedup();
    spec
}

// ---------------------------------------------------------------------------------------
// Label keys.

/// A Kubernetes pod label key as an identity label key.
fn pod_key(key: &str) -> String {
    format!("k8s:{key}")
}

/// A Kubernetes namespace label key as an identity label key.
fn namespace_key(key: &str) -> String {
    format!("{NAMESPACE_LABELS_PREFIX}{key}")
}

/// A Tendril selector key: `app` and `any:app` mean `k8s:app`; `<source>:key` is literal.
fn tendril_key(key: &str) -> String {
    match key.split_once(':') {
        None => pod_key(key),
        Some(("any", rest)) => pod_key(rest),
        Some(_) => key.to_string(),
    }
}

fn compile_selector(
    selector: &LabelSelector,
    what: &str,
    key: impl Fn(&str) -> String,
) -> Result<Selector, Invalid> {
    Selector::compile(selector, key)
        .map_err(|m| Invalid::new(INVALID_SELECTOR, format!("{what}: {m}")))
}

#[cfg(test)]
mod tests;
