//! A Kubernetes `NetworkPolicy`, translated exactly as upstream reads it: policyTypes
//! defaulting, isolation of the selected pods only, additive allows, ipBlock with except,
//! named ports kept by name, endPort.

use super::canonical::Rule;
use super::cidr::cidr_minus;
use super::ports::{Ports, port_entries};
use super::{
    ANY_PEER, Compiled, INVALID_PORT, INVALID_SELECTOR, Invalid, UNSUPPORTED, compile_selector,
    namespace_key, pod_key,
};
use crate::identities::labels::POD_NAMESPACE;
use crate::policy::selector::{IdentityIndex, Selector};
use ipnet::IpNet;
use k8s_openapi::api::networking::v1 as k8s;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use tendril_crds::v1alpha1::{PolicySource, Protocol, ResolvedDefaultDeny, Verdict};

pub(super) fn kubernetes(
    np: &k8s::NetworkPolicy,
    index: &mut IdentityIndex,
    source: PolicySource,
) -> Result<Compiled, Invalid> {
    let ns = np.namespace().unwrap_or_else(|| "default".to_string());
    let spec = np.spec.clone().unwrap_or_default();
    let in_namespace = |sel: Selector| sel.and_equals(POD_NAMESPACE, &ns);
    let subjects = compile_selector(
        &spec.pod_selector.clone().unwrap_or_default(),
        "podSelector",
        pod_key,
    )?;
    let subjects = index.select(&in_namespace(subjects));

    let ingress_rules = spec.ingress.unwrap_or_default();
    let egress_rules = spec.egress.unwrap_or_default();
    let (mut ingress_type, mut egress_type) = (false, false);
    match &spec.policy_types {
        Some(types) if !types.is_empty() => {
            for t in types {
                match t.as_str() {
                    "Ingress" => ingress_type = true,
                    "Egress" => egress_type = true,
                    other => {
                        return Err(Invalid::new(
                            UNSUPPORTED,
                            format!("policyTypes entry {other:?} is neither Ingress nor Egress"),
                        ));
                    }
                }
            }
        }
        // Upstream defaulting: always Ingress; Egress iff there are egress rules.
        _ => {
            ingress_type = true;
            egress_type = !egress_rules.is_empty();
        }
    }

    let mut peers = |list: Option<&Vec<k8s::NetworkPolicyPeer>>,
                     what: &str|
     -> Result<(Vec<i64>, Vec<IpNet>), Invalid> {
        let list = list.map(Vec::as_slice).unwrap_or_default();
        if list.is_empty() {
            return Ok((vec![ANY_PEER], Vec::new()));
        }
        let (mut ids, mut cidrs) = (Vec::new(), Vec::new());
        for (i, peer) in list.iter().enumerate() {
            let at = format!("{what}[{i}]");
            match (&peer.ip_block, &peer.namespace_selector, &peer.pod_selector) {
                (Some(block), None, None) => cidrs.extend(cidr_minus(
                    &block.cidr,
                    block.except.as_deref().unwrap_or_default(),
                )?),
                (Some(_), _, _) => {
                    return Err(Invalid::new(
                        INVALID_SELECTOR,
                        format!("{at}: ipBlock cannot be combined with a selector"),
                    ));
                }
                (None, None, None) => {
                    return Err(Invalid::new(
                        INVALID_SELECTOR,
                        format!("{at}: a peer needs podSelector, namespaceSelector or ipBlock"),
                    ));
                }
                (None, None, Some(pods)) => {
                    let sel = compile_selector(pods, &format!("{at}.podSelector"), pod_key)?;
                    ids.extend(index.select(&in_namespace(sel)).iter());
                }
                (None, Some(namespaces), pods) => {
                    let mut sel = compile_selector(
                        namespaces,
                        &format!("{at}.namespaceSelector"),
                        namespace_key,
                    )?;
                    if let Some(pods) = pods {
                        sel = sel.and(&compile_selector(
                            pods,
                            &format!("{at}.podSelector"),
                            pod_key,
                        )?);
                    }
                    ids.extend(index.select(&sel).iter());
                }
            }
        }
        Ok((ids, cidrs))
    };

    let mut ingress = Vec::new();
    for (i, rule) in ingress_rules.iter().enumerate() {
        let (ids, cidrs) = peers(rule.from.as_ref(), &format!("ingress[{i}].from"))?;
        let ports = kubernetes_ports(rule.ports.as_deref(), &format!("ingress[{i}].ports"))?;
        ingress.push(Rule {
            verdict: Verdict::Allow,
            peers: ids,
            cidrs,
            ports: ports.into_list(),
        });
    }
    let mut egress = Vec::new();
    for (i, rule) in egress_rules.iter().enumerate() {
        let (ids, cidrs) = peers(rule.to.as_ref(), &format!("egress[{i}].to"))?;
        let ports = kubernetes_ports(rule.ports.as_deref(), &format!("egress[{i}].ports"))?;
        egress.push(Rule {
            verdict: Verdict::Allow,
            peers: ids,
            cidrs,
            ports: ports.into_list(),
        });
    }
    // Rules of a direction not in policyTypes have no effect (upstream).
    if !ingress_type {
        ingress.clear();
    }
    if !egress_type {
        egress.clear();
    }
    Ok(Compiled {
        source,
        subjects,
        default_deny: ResolvedDefaultDeny {
            ingress: ingress_type,
            egress: egress_type,
        },
        ingress,
        egress,
    })
}

pub(super) fn kubernetes_ports(
    ports: Option<&[k8s::NetworkPolicyPort]>,
    what: &str,
) -> Result<Ports, Invalid> {
    let ports = ports.unwrap_or_default();
    if ports.is_empty() {
        return Ok(Ports::All);
    }
    let mut out = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let at = format!("{what}[{i}]");
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        // Kubernetes has no `ANY`.
        let protocol = Protocol::parse(proto)
            .filter(|p| *p != Protocol::Any)
            .ok_or_else(|| {
                Invalid::new(
                    INVALID_PORT,
                    format!("{at}: protocol {proto:?} is not TCP, UDP or SCTP"),
                )
            })?;
        let port = match &p.port {
            None => None,
            Some(IntOrString::Int(n)) => Some(n.to_string()),
            Some(IntOrString::String(s)) => Some(s.clone()),
        };
        out.extend(port_entries(
            &[protocol],
            port.as_deref(),
            p.end_port,
            &at,
            false,
        )?);
    }
    Ok(Ports::Some(out))
}
