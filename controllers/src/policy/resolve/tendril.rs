//! A Tendril `NetworkPolicy` or `ClusterNetworkPolicy`, translated as Cilium reads it:
//! endpoint selectors scoped to the namespace, entities, CIDR sets, deny rules that win,
//! per-direction default deny.

use super::canonical::Rule;
use super::cidr::{cidr_minus, parse_cidr};
use super::ports::{ALL_PROTOCOLS, Port, Ports, port_entries};
use super::{
    ANY_PEER, Compiled, INVALID_PORT, INVALID_SELECTOR, Invalid, UNSUPPORTED, compile_selector,
    tendril_key,
};
use crate::identities::labels::POD_NAMESPACE;
use crate::policy::selector::IdentityIndex;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use tendril_crds::facts::{ENTITY_ALL, ENTITY_CLUSTER, Reserved};
use tendril_crds::v1alpha1::{
    EgressRule, IngressRule, NetworkPolicySpec, PolicySource, PortRule, Protocol,
    ResolvedDefaultDeny, Verdict,
};

/// An entity's peer identities (`cluster` → every cluster identity plus the reserved ones
/// inside the cluster).
pub(super) fn entity(name: &str, index: &IdentityIndex) -> Option<Vec<i64>> {
    if let Some(r) = Reserved::from_name(name) {
        return Some(vec![r.id()]);
    }
    Some(match name {
        ENTITY_ALL => vec![ANY_PEER],
        // Every reserved identity but world.
        ENTITY_CLUSTER => Reserved::ALL
            .into_iter()
            .filter(|r| *r != Reserved::World)
            .map(Reserved::id)
            .chain(index.all().iter().copied())
            .collect(),
        _ => return None,
    })
}

/// The peer fields of a Tendril rule, borrowed from an ingress or an egress rule.
pub(super) struct TendrilPeers<'a> {
    pub(super) endpoints: &'a [LabelSelector],
    pub(super) entities: &'a [String],
    pub(super) cidrs: &'a [String],
    pub(super) cidr_sets: &'a [tendril_crds::v1alpha1::CidrRule],
    pub(super) ports: &'a [PortRule],
}

impl<'a> From<&'a IngressRule> for TendrilPeers<'a> {
    fn from(r: &'a IngressRule) -> Self {
        Self {
            endpoints: &r.from_endpoints,
            entities: &r.from_entities,
            cidrs: &r.from_cidr,
            cidr_sets: &r.from_cidr_set,
            ports: &r.to_ports,
        }
    }
}

impl<'a> From<&'a EgressRule> for TendrilPeers<'a> {
    fn from(r: &'a EgressRule) -> Self {
        Self {
            endpoints: &r.to_endpoints,
            entities: &r.to_entities,
            cidrs: &r.to_cidr,
            cidr_sets: &r.to_cidr_set,
            ports: &r.to_ports,
        }
    }
}

pub(super) fn tendril(
    spec: &NetworkPolicySpec,
    namespace: Option<&str>,
    index: &mut IdentityIndex,
    source: PolicySource,
) -> Result<Compiled, Invalid> {
    if spec.node_selector.is_some() {
        return Err(Invalid::new(
            UNSUPPORTED,
            "nodeSelector (host policies) is not supported yet; select pods with endpointSelector",
        ));
    }
    let Some(selector) = &spec.endpoint_selector else {
        return Err(Invalid::new(
            INVALID_SELECTOR,
            "endpointSelector is required (use {} to select every pod)",
        ));
    };
    let mut subjects = compile_selector(selector, "endpointSelector", tendril_key)?;
    if let Some(ns) = namespace {
        subjects = subjects.and_equals(POD_NAMESPACE, ns);
    }
    let subjects = index.select(&subjects);

    let mut rules = |list: Vec<TendrilPeers>,
                     verdict: Verdict,
                     what: &str|
     -> Result<Vec<Rule>, Invalid> {
        let mut out = Vec::new();
        for (i, r) in list.into_iter().enumerate() {
            let at = format!("{what}[{i}]");
            let (mut peers, mut cidrs) = (Vec::new(), Vec::new());
            if r.endpoints.is_empty()
                && r.entities.is_empty()
                && r.cidrs.is_empty()
                && r.cidr_sets.is_empty()
            {
                peers.push(ANY_PEER);
            }
            for (j, sel) in r.endpoints.iter().enumerate() {
                let mut sel = compile_selector(sel, &format!("{at} endpoints[{j}]"), tendril_key)?;
                if let Some(ns) = namespace
                    && !sel.mentions(POD_NAMESPACE)
                {
                    sel = sel.and_equals(POD_NAMESPACE, ns);
                }
                peers.extend(index.select(&sel).iter());
            }
            for e in r.entities {
                peers.extend(entity(e, index).ok_or_else(|| {
                    Invalid::new(
                        INVALID_SELECTOR,
                        format!(
                            "{at}: unknown entity {e:?} (one of {})",
                            tendril_crds::v1alpha1::ENTITIES.join(", ")
                        ),
                    )
                })?);
            }
            for c in r.cidrs {
                cidrs.push(parse_cidr(c)?);
            }
            for set in r.cidr_sets {
                cidrs.extend(cidr_minus(&set.cidr, &set.except)?);
            }
            let mut ports = if r.ports.is_empty() {
                Ports::All
            } else {
                Ports::Some(Vec::new())
            };
            for (j, pr) in r.ports.iter().enumerate() {
                for (k, p) in pr.ports.iter().enumerate() {
                    let at = format!("{at}.toPorts[{j}].ports[{k}]");
                    let protocols: &[Protocol] = match p.protocol.as_str() {
                        "" => ALL_PROTOCOLS,
                        other => match Protocol::parse(other) {
                            Some(protocol) => protocol.expand(),
                            None => {
                                return Err(Invalid::new(
                                    INVALID_PORT,
                                    format!(
                                        "{at}: protocol {other:?} is not TCP, UDP, SCTP or ANY"
                                    ),
                                ));
                            }
                        },
                    };
                    let entries = port_entries(protocols, Some(&p.port), p.end_port, &at, true)?;
                    // ANY with every port: every port of every protocol.
                    if protocols.len() == ALL_PROTOCOLS.len() && entries.iter().all(Port::is_all) {
                        ports.add(Ports::All);
                    } else {
                        ports.add(Ports::Some(entries));
                    }
                }
            }
            out.push(Rule {
                verdict,
                peers,
                cidrs,
                ports: ports.into_list(),
            });
        }
        Ok(out)
    };
    let mut ingress = rules(
        spec.ingress.iter().map(Into::into).collect(),
        Verdict::Allow,
        "ingress",
    )?;
    ingress.extend(rules(
        spec.ingress_deny.iter().map(Into::into).collect(),
        Verdict::Deny,
        "ingressDeny",
    )?);
    let mut egress = rules(
        spec.egress.iter().map(Into::into).collect(),
        Verdict::Allow,
        "egress",
    )?;
    egress.extend(rules(
        spec.egress_deny.iter().map(Into::into).collect(),
        Verdict::Deny,
        "egressDeny",
    )?);
    let switch = spec.enable_default_deny.clone().unwrap_or_default();
    let default_deny = ResolvedDefaultDeny {
        ingress: switch
            .ingress
            .unwrap_or(!spec.ingress.is_empty() || !spec.ingress_deny.is_empty()),
        egress: switch
            .egress
            .unwrap_or(!spec.egress.is_empty() || !spec.egress_deny.is_empty()),
    };
    Ok(Compiled {
        source,
        subjects,
        default_deny,
        ingress,
        egress,
    })
}
