//! Step `policy maps`: the local endpoints' `ResolvedPolicy`s, translated ([`super::policy`])
//! into `policy_cidrs`, `policy` and `policy_state`, converged in the one order that keeps
//! every packet judged by the old policy, the new one or (a new connection, briefly) their
//! union ([`realize_policy`]). Also `tendril_policy_implementation_delay_seconds` and
//! `tendril_agent_unrealized_revisions{kind="ResolvedPolicy"}`.

use super::index::{Desired, EndpointRef};
use super::{MapGroup, MapOutcome, NodeContext, Pass, Step, StepFailure, policy};
use crate::bpf::maps::{self, IpcacheKey};
use crate::bpf::{AnyKey, Dataplane, DataplaneError, PolicyItem, Report};
use kube::runtime::reflector::ObjectRef;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;
use tendril_crds::facts::annotations::POLICY_CHANGED_AT;
use tendril_crds::v1alpha1::{NamedPort, ResolvedPolicy};

/// Seconds from the change behind `policy`'s revision ([`POLICY_CHANGED_AT`]) to `now`;
/// `None` without a readable annotation. A clock skewed behind the operator's gives 0.
pub fn implementation_delay(
    policy: &ResolvedPolicy,
    now: k8s_openapi::jiff::Timestamp,
) -> Option<f64> {
    let at: k8s_openapi::jiff::Timestamp = policy
        .metadata
        .annotations
        .as_ref()?
        .get(POLICY_CHANGED_AT)?
        .parse()
        .ok()?;
    Some(now.duration_since(at).as_secs_f64().max(0.0))
}

/// What [`realize_policy`] did.
#[derive(Debug)]
pub struct PolicyRealization {
    pub wanted: policy::DesiredPolicy,
    pub cidrs: Report<IpcacheKey>,
    pub policy: Report<PolicyItem>,
    /// The translation equalled what the last convergence wrote: the maps were not read.
    pub skipped: bool,
}

/// Translates the local endpoints' policies and converges the policy maps, pruning (call
/// it only with complete caches), in one [`maps::PolicyMaps::converge_with_cidrs`]: it
/// owns the order that keeps every packet judged by the old policy, the new one or (a new
/// connection, briefly) their union, and re-judges established connections only against
/// the complete new policy. Blocking.
///
/// With `last`, what a previous call converged without failure: an identical translation
/// skips the maps (a pass triggered by an unrelated change costs no map reads).
pub fn realize_policy(
    dp: &mut Dataplane,
    subjects: &[policy::PolicySubject<'_>],
    cluster_ports: &policy::ClusterNamedPorts,
    last: Option<&policy::DesiredPolicy>,
) -> Result<PolicyRealization, DataplaneError> {
    if last.is_none() {
        // First pass, after a failure, or the periodic resync: read the maps back.
        dp.policy.forget_known();
    }
    let t = Instant::now();
    let current_cidrs = dp.policy.cidrs()?;
    // Only the endpoints whose policy changed since `last` are translated again...
    let wanted = policy::translate_reusing(subjects, cluster_ports, &current_cidrs, last);
    let translate_ms = t.elapsed().as_secs_f64() * 1e3;
    if last.is_some_and(|last| last.same_as(&wanted)) {
        tracing::debug!(translate_ms, "policy unchanged");
        return Ok(PolicyRealization {
            wanted,
            cidrs: Report::default(),
            policy: Report::default(),
            skipped: true,
        });
    }
    let t = Instant::now();
    // ...and only their entries are diffed against what the last convergence wrote.
    let (cidrs, policy) = match last {
        Some(last) => dp.policy.converge_changed(
            &wanted.cidrs,
            &wanted.entries,
            &wanted.states,
            &wanted.changed_endpoints(last),
        )?,
        None => {
            dp.policy
                .converge_with_cidrs(&wanted.cidrs, &wanted.entries, &wanted.states, true)?
        }
    };
    tracing::debug!(
        translate_ms,
        converge_ms = t.elapsed().as_secs_f64() * 1e3,
        entries = wanted.entries.len(),
        "policy converged"
    );
    Ok(PolicyRealization {
        wanted,
        cidrs,
        policy,
        skipped: false,
    })
}

/// The step, with what it remembers between passes.
#[derive(Default)]
pub struct PolicyMaps {
    /// The policy last realized per local endpoint: kept while the endpoint's (new)
    /// identity has no `ResolvedPolicy` yet, so a realized endpoint never falls back to
    /// no policy at all in between.
    held: BTreeMap<EndpointRef, Arc<ResolvedPolicy>>,
    /// (identity, revision) whose implementation delay was observed.
    delay_observed: BTreeSet<(u32, i64)>,
    /// The translation last converged without failure, and when.
    applied: Option<(Arc<policy::DesiredPolicy>, Instant)>,
    /// What that translation was made of: the same inputs again skip the translation too.
    applied_inputs: Option<Arc<PolicyInputs>>,
}

/// Everything the translation reads besides the pinned CIDR ids (which only a
/// convergence changes): per local endpoint its id, named ports and the policy object it
/// gets (identity, revision, resourceVersion), and the cluster's named ports.
#[derive(Debug, PartialEq)]
struct PolicyInputs {
    subjects: Vec<(u16, Vec<NamedPort>, Option<PolicyVersion>)>,
    cluster_ports: policy::ClusterNamedPorts,
}

/// (identity, revision, resourceVersion) of the `ResolvedPolicy` an endpoint gets.
type PolicyVersion = (i64, i64, Option<String>);

/// What the blocking half of the step produced.
struct Converged {
    cidrs: Report<IpcacheKey>,
    policy: Report<PolicyItem>,
    realized: BTreeMap<EndpointRef, i64>,
    endpoints: usize,
    applied: Option<Arc<policy::DesiredPolicy>>,
    inputs: Arc<PolicyInputs>,
}

impl Step for PolicyMaps {
    const NAME: &'static str = "policy maps";

    async fn run(&mut self, node: &NodeContext, pass: &mut Pass) -> Result<(), StepFailure> {
        let used = self.policies_of(node, &pass.desired);
        let converged = self.converge(node, &pass.desired, &used).await?;
        let failed = !converged.cidrs.is_converged() || !converged.policy.is_converged();
        match converged.applied.clone() {
            // Skipped: the clock of the last real convergence keeps running.
            Some(applied)
                if self
                    .applied
                    .as_ref()
                    .is_some_and(|(a, _)| Arc::ptr_eq(a, &applied)) => {}
            Some(applied) => self.applied = Some((applied, Instant::now())),
            None => self.applied = None,
        }
        self.applied_inputs = self.applied.is_some().then(|| converged.inputs.clone());
        node.metrics
            .policy_endpoints
            .set(i64::try_from(converged.endpoints).unwrap_or(i64::MAX));
        // Local endpoints whose identity's current ResolvedPolicy revision is not in yet.
        let policies = node.view.resolved_policies.store();
        let unrealized = pass
            .desired
            .local
            .iter()
            .filter(|ep| {
                policies
                    .get(&ObjectRef::new(&ep.identity.to_string()))
                    .is_some_and(|p| converged.realized.get(&ep.key) != Some(&p.spec.revision))
            })
            .count();
        node.metrics.set_unrealized("ResolvedPolicy", unrealized);
        if failed {
            // Keep what was held, add what is new: a failed pass proves nothing was removed.
            for (key, policy) in &used {
                self.held.insert(key.clone(), policy.clone());
            }
            let local: BTreeSet<&EndpointRef> = pass.desired.local.iter().map(|e| &e.key).collect();
            self.held.retain(|key, _| local.contains(key));
        } else {
            self.held = used.clone();
        }
        // Before the statuses are written: it tells a revision realized by an earlier
        // process (already reported) from one this pass realized.
        self.observe_delay(node, &pass.desired, &converged.realized, &used);
        pass.policy_realized = converged.realized;
        pass.maps.push(MapOutcome {
            map: maps::POLICY_CIDRS,
            group: MapGroup::Policy,
            report: converged.cidrs.map_keys(AnyKey::from),
        });
        pass.maps.push(MapOutcome {
            map: maps::POLICY,
            group: MapGroup::Policy,
            report: converged.policy.map_keys(AnyKey::from),
        });
        Ok(())
    }
}

impl PolicyMaps {
    /// The policy each local endpoint gets: its identity's `ResolvedPolicy`, else the one
    /// held from its last realization (its identity changed and the new one's policy is
    /// not written yet), else none.
    fn policies_of(
        &self,
        node: &NodeContext,
        desired: &Desired,
    ) -> BTreeMap<EndpointRef, Arc<ResolvedPolicy>> {
        let policies = node.view.resolved_policies.store();
        let mut out = BTreeMap::new();
        for ep in &desired.local {
            let current = policies.get(&ObjectRef::new(&ep.identity.to_string()));
            if let Some(policy) = current.or_else(|| self.held.get(&ep.key).cloned()) {
                out.insert(ep.key.clone(), policy);
            }
        }
        out
    }

    /// Translates and converges in a blocking task.
    async fn converge(
        &self,
        node: &NodeContext,
        desired: &Desired,
        used: &BTreeMap<EndpointRef, Arc<ResolvedPolicy>>,
    ) -> Result<Converged, StepFailure> {
        // Egress named ports resolve against every endpoint of the cluster.
        let all = node.view.endpoints.store().state();
        let cluster_ports = policy::ClusterNamedPorts::from_endpoints(
            all.iter().map(|e| e.spec.named_ports.as_slice()),
        );
        let subjects: Vec<(EndpointRef, u16, u32, Vec<NamedPort>)> = desired
            .local
            .iter()
            .map(|ep| {
                (
                    ep.key.clone(),
                    ep.endpoint_id,
                    ep.identity,
                    ep.named_ports.clone(),
                )
            })
            .collect();
        let inputs = Arc::new(PolicyInputs {
            subjects: subjects
                .iter()
                .map(|(key, endpoint_id, _, named_ports)| {
                    let policy = used.get(key).map(|p| {
                        (
                            p.spec.identity,
                            p.spec.revision,
                            p.metadata.resource_version.clone(),
                        )
                    });
                    (*endpoint_id, named_ports.clone(), policy)
                })
                .collect(),
            cluster_ports,
        });
        let metrics = node.metrics.clone();
        let used = used.clone();
        let (event_mode, event_interval_ns) = node.cfg.policy.allow_events.datapath();
        // Within a resync period, an unchanged translation is not converged again.
        let last = self
            .applied
            .as_ref()
            .filter(|(_, at)| at.elapsed() < node.cfg.timing.resync)
            .map(|(applied, _)| applied.clone());
        // The same inputs as the last convergence: the same translation, not made again
        // (a pass for an unrelated change costs nothing here).
        let unchanged = last.is_some() && self.applied_inputs.as_deref() == Some(&*inputs);
        node.with_dataplane(move |dp| {
            let policy_subjects: Vec<policy::PolicySubject<'_>> = subjects
                .iter()
                .map(|(key, endpoint_id, _, named_ports)| policy::PolicySubject {
                    endpoint_id: *endpoint_id,
                    policy: used.get(key).map(|p| &p.spec),
                    named_ports,
                })
                .collect();
            let (wanted, cidrs, entries, skipped) = match &last {
                Some(last) if unchanged => {
                    (last.clone(), Report::default(), Report::default(), true)
                }
                _ => {
                    let PolicyRealization {
                        wanted,
                        cidrs,
                        policy,
                        skipped,
                    } = realize_policy(
                        dp,
                        &policy_subjects,
                        &inputs.cluster_ports,
                        last.as_deref(),
                    )
                    .map_err(|e| StepFailure::new("MapReadFailed", e))?;
                    (Arc::new(wanted), cidrs, policy, skipped)
                }
            };
            dp.policy
                .set_event_settings(event_mode, event_interval_ns)
                .map_err(|e| StepFailure::new("MapWriteFailed", e))?;
            if !skipped {
                for problem in &wanted.problems {
                    tracing::warn!(%problem, "policy entry left out");
                }
            }
            metrics.observe_converge(maps::POLICY_CIDRS, &cidrs);
            metrics.observe_converge(maps::POLICY, &entries);
            let converged = cidrs.is_converged() && entries.is_converged();
            let mut realized = BTreeMap::new();
            if converged {
                for (key, endpoint_id, identity, _) in &subjects {
                    let Some(policy) = used.get(key) else {
                        continue;
                    };
                    // Reported only for the endpoint's own identity's policy.
                    if i64::from(*identity) == policy.spec.identity
                        && wanted.revisions.contains_key(endpoint_id)
                    {
                        realized.insert(key.clone(), policy.spec.revision);
                    }
                }
            }
            let endpoints = wanted.states.len();
            let applied = if skipped {
                last
            } else if converged {
                Some(wanted)
            } else {
                None
            };
            Ok(Converged {
                cidrs,
                policy: entries,
                realized,
                endpoints,
                applied,
                inputs,
            })
        })
        .await?
    }

    /// `tendril_policy_implementation_delay_seconds`, once per (identity, revision) newly
    /// realized on this node. A revision some endpoint already reported before this process
    /// started is not observed again (its delay is unknown, not the agent's uptime).
    fn observe_delay(
        &mut self,
        node: &NodeContext,
        desired: &Desired,
        realized: &BTreeMap<EndpointRef, i64>,
        used: &BTreeMap<EndpointRef, Arc<ResolvedPolicy>>,
    ) {
        let now = k8s_openapi::jiff::Timestamp::now();
        let endpoints = node.view.endpoints.store();
        let mut current = BTreeSet::new();
        for ep in &desired.local {
            let Some(revision) = realized.get(&ep.key).copied() else {
                continue;
            };
            let id = (ep.identity, revision);
            current.insert(id);
            if !self.delay_observed.insert(id) {
                continue;
            }
            let reported_before = desired.local.iter().any(|other| {
                other.identity == ep.identity
                    && endpoints
                        .get(&ObjectRef::new(&other.key.name).within(&other.key.namespace))
                        .and_then(|e| e.status.as_ref().and_then(|s| s.realized_policy_revision))
                        == Some(revision)
            });
            if reported_before {
                continue;
            }
            if let Some(delay) = used.get(&ep.key).and_then(|p| implementation_delay(p, now)) {
                node.metrics.policy_implementation_delay.observe(delay);
            }
        }
        // Bounded by what is local now.
        self.delay_observed.retain(|id| current.contains(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tendril_crds::v1alpha1::ResolvedPolicySpec;

    #[test]
    fn implementation_delay_runs_from_the_annotation() {
        let mut policy = ResolvedPolicy::new("300", ResolvedPolicySpec::default());
        let now: k8s_openapi::jiff::Timestamp = "2026-01-02T03:04:05.750000Z".parse().unwrap();
        assert_eq!(implementation_delay(&policy, now), None);
        policy.metadata.annotations = Some(
            [(
                POLICY_CHANGED_AT.to_string(),
                "2026-01-02T03:04:05.250000Z".to_string(),
            )]
            .into(),
        );
        assert_eq!(implementation_delay(&policy, now), Some(0.5));
        let earlier: k8s_openapi::jiff::Timestamp = "2026-01-02T03:04:00Z".parse().unwrap();
        assert_eq!(implementation_delay(&policy, earlier), Some(0.0));
        policy
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(POLICY_CHANGED_AT.into(), "yesterday".into());
        assert_eq!(implementation_delay(&policy, now), None);
    }
}
