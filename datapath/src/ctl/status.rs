//! `tendrilctl status`: the operator's leadership, every agent's realization, map pressure,
//! BGP sessions and egress routes, and the problems among them.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use serde::Serialize;
use tendril_crds::v1alpha1::{BGPNodeConfig, EgressRoute, NodeNetwork};

use super::table::Table;

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub operator: OperatorStatus,
    pub agents: Vec<AgentStatus>,
    pub bgp: Vec<BgpStatus>,
    pub egress_routes: Vec<EgressRouteStatus>,
    /// Everything that makes `status` exit 1.
    pub problems: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OperatorStatus {
    pub lease: String,
    pub leader: Option<String>,
    /// The leader renewed the Lease within its duration, or (without leader election) the
    /// operator's /readyz answered 200.
    pub ready: bool,
    pub renewed_seconds_ago: Option<i64>,
    /// /readyz of `--operator-health`, when asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readyz: Option<bool>,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub node: String,
    pub ready: Option<String>,
    pub realized: Option<String>,
    pub reason: Option<String>,
    pub generation: Option<i64>,
    pub realized_revision: Option<i64>,
    pub realized_services_revision: Option<i64>,
    pub agent_version: Option<String>,
    /// The node's encryption mode (NodeNetwork `spec.encryption.mode`), when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryption: Option<String>,
    /// `tendril_bpf_map_pressure` per map (entries / capacity), when the agent's /metrics
    /// answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub map_pressure: Option<BTreeMap<String, f64>>,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BgpStatus {
    pub node: String,
    pub realized: Option<String>,
    pub established_sessions: Option<i64>,
    pub sessions: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressRouteStatus {
    pub name: String,
    pub revision: i64,
    pub realized_revision: Option<i64>,
    pub realized: Option<String>,
    pub sources: usize,
    pub destinations: Vec<String>,
}

fn condition(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    kind: &str,
) -> Option<(String, String)> {
    conditions
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// Where the operator's leader Lease is (operator.yaml `leaseNamespace` / `leaseName`).
pub struct LeaseRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
}

/// Where `status` looks beyond the API objects.
#[derive(Clone, Debug, Default)]
pub struct Probes {
    /// `host:port` of the operator's health port (`/readyz`).
    pub operator_health: Option<String>,
    /// The agents' metrics port, read at each node's addresses.
    pub agent_metrics_port: Option<u16>,
    /// node → `host:port` of its agent's metrics, instead of the node's addresses.
    pub agent_metrics: BTreeMap<String, String>,
}

/// Reads every object `status` shows and finds the problems.
pub async fn collect(
    client: &Client,
    lease: LeaseRef<'_>,
    probes: &Probes,
) -> anyhow::Result<Status> {
    let mut status = Status::default();
    let leases: Api<Lease> = Api::namespaced(client.clone(), lease.namespace);
    status.operator.lease = format!("{}/{}", lease.namespace, lease.name);
    if let Some(l) = leases.get_opt(lease.name).await? {
        let spec = l.spec.unwrap_or_default();
        status.operator.leader = spec.holder_identity.filter(|h| !h.is_empty());
        let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
        status.operator.renewed_seconds_ago = spec.renew_time.map(|t| age_seconds(&t.0));
        status.operator.ready = status.operator.leader.is_some()
            && status
                .operator
                .renewed_seconds_ago
                .is_some_and(|age| age <= duration);
    }
    if let Some(addr) = &probes.operator_health {
        let readyz = tokio::time::timeout(Duration::from_secs(2), http_get(addr, "/readyz"))
            .await
            .ok()
            .and_then(Result::ok)
            .is_some_and(|(code, _)| code == 200);
        status.operator.readyz = Some(readyz);
        status.operator.ready |= readyz;
        if !readyz {
            status
                .problems
                .push(format!("the operator's /readyz at {addr} is not ready"));
        }
    } else if !status.operator.ready {
        status.problems.push(match &status.operator.leader {
            None => format!(
                "no operator holds the Lease {} (without leader election, pass --operator-health)",
                status.operator.lease
            ),
            Some(h) => format!("the operator leader {h} stopped renewing its Lease"),
        });
    }

    let nodes: Api<NodeNetwork> = Api::all(client.clone());
    for n in nodes.list(&ListParams::default()).await? {
        let name = n.name_any();
        let st = n.status.clone().unwrap_or_default();
        let ready = condition(&st.conditions, "Ready");
        let realized = condition(&st.conditions, "Realized");
        let mut agent = AgentStatus {
            node: name.clone(),
            ready: ready.as_ref().map(|c| c.0.clone()),
            realized: realized.as_ref().map(|c| c.0.clone()),
            reason: realized
                .as_ref()
                .filter(|c| c.0 != "True")
                .or(ready.as_ref().filter(|c| c.0 != "True"))
                .map(|c| c.1.clone()),
            generation: n.metadata.generation,
            realized_revision: st.realized_revision,
            realized_services_revision: st.realized_services_revision,
            agent_version: st.agent_version.clone(),
            encryption: n.spec.encryption.as_ref().map(|e| e.mode.clone()),
            map_pressure: None,
        };
        if agent.realized.as_deref() != Some("True") {
            status.problems.push(format!(
                "node {name}: not Realized ({})",
                agent.reason.as_deref().unwrap_or("no agent report")
            ));
        } else if agent.ready.as_deref() == Some("False") {
            status.problems.push(format!(
                "node {name}: not Ready ({})",
                agent.reason.as_deref().unwrap_or("")
            ));
        }
        let targets: Vec<String> =
            match (probes.agent_metrics.get(&name), probes.agent_metrics_port) {
                (Some(addr), _) => vec![addr.clone()],
                (None, Some(port)) => st
                    .addresses
                    .iter()
                    .chain(&n.spec.addresses)
                    .map(|a| {
                        if a.address.contains(':') {
                            format!("[{}]:{port}", a.address)
                        } else {
                            format!("{}:{port}", a.address)
                        }
                    })
                    .collect(),
                (None, None) => Vec::new(),
            };
        // The first address that answers.
        for addr in targets {
            if let Some(p) = map_pressure(&addr).await {
                for (map, value) in &p {
                    if *value >= 0.9 {
                        status
                            .problems
                            .push(format!("node {name}: map {map} {:.0}% full", value * 100.0));
                    }
                }
                agent.map_pressure = Some(p);
                break;
            }
        }
        status.agents.push(agent);
    }

    let bgp: Api<BGPNodeConfig> = Api::all(client.clone());
    // BGP and egress are optional concerns: a cluster without their CRDs shows none.
    if let Ok(list) = bgp.list(&ListParams::default()).await {
        for b in list {
            let st = b.status.clone().unwrap_or_default();
            status.bgp.push(BgpStatus {
                node: b.name_any(),
                realized: condition(&st.conditions, "Realized").map(|c| c.0),
                established_sessions: st.established_sessions,
                sessions: st
                    .sessions
                    .iter()
                    .map(|s| format!("{} AS{}", s.peer_address, s.peer_asn))
                    .collect(),
            });
        }
    }
    let routes: Api<EgressRoute> = Api::all(client.clone());
    if let Ok(list) = routes.list(&ListParams::default()).await {
        for r in list {
            let st = r.status.clone().unwrap_or_default();
            let realized = condition(&st.conditions, "Realized").map(|c| c.0);
            if realized.as_deref() == Some("False") {
                status
                    .problems
                    .push(format!("egress route {}: not Realized", r.name_any()));
            }
            status.egress_routes.push(EgressRouteStatus {
                name: r.name_any(),
                revision: r.spec.revision,
                realized_revision: st.realized_revision,
                realized,
                sources: r.spec.source_ips.len(),
                destinations: r.spec.destination_cidrs.clone(),
            });
        }
    }
    Ok(status)
}

/// `tendril_bpf_map_pressure{map=...}` from an agent's /metrics, if it answers in time.
async fn map_pressure(addr: &str) -> Option<BTreeMap<String, f64>> {
    let (code, body) = tokio::time::timeout(Duration::from_secs(1), http_get(addr, "/metrics"))
        .await
        .ok()?
        .ok()?;
    (code == 200).then(|| parse_map_pressure(&body))
}

/// A plain HTTP/1.0 GET (the health/metrics ports speak HTTP without TLS): status, body.
pub async fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// The `tendril_bpf_map_pressure` samples of an OpenMetrics body, by map.
pub fn parse_map_pressure(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter_map(|line| line.strip_prefix("tendril_bpf_map_pressure{"))
        .filter_map(|rest| {
            let (labels, value) = rest.split_once("} ")?;
            let map = labels
                .split(',')
                .find_map(|l| l.strip_prefix("map=\""))?
                .trim_end_matches('"');
            Some((
                map.to_string(),
                value.split_whitespace().next()?.parse().ok()?,
            ))
        })
        .collect()
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_string(), T::to_string)
}

impl Status {
    /// The tables of `status`, one after another.
    pub fn render(&self, width: usize) -> String {
        let mut out = String::new();
        let op = &self.operator;
        out.push_str(&format!(
            "Operator: leader {} ({}), lease {}{}\n\n",
            op.leader.as_deref().unwrap_or("none"),
            if op.ready { "ready" } else { "NOT ready" },
            op.lease,
            op.renewed_seconds_ago
                .map(|s| format!(", renewed {s}s ago"))
                .unwrap_or_default()
        ));
        let mut t = Table::new(&[
            "NODE",
            "READY",
            "REALIZED",
            "GEN",
            "REVISION",
            "SERVICES",
            "AGENT",
            "ENCRYPTION",
            "MAPS",
        ]);
        for a in &self.agents {
            let maps = a.map_pressure.as_ref().map_or("-".to_string(), |m| {
                m.iter()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or("0%".into(), |(name, v)| {
                        format!("max {name} {:.0}%", v * 100.0)
                    })
            });
            t.row(vec![
                a.node.clone(),
                opt(&a.ready),
                match (&a.realized, &a.reason) {
                    (Some(r), Some(why)) if r != "True" => format!("{r} ({why})"),
                    _ => opt(&a.realized),
                },
                opt(&a.generation),
                opt(&a.realized_revision),
                opt(&a.realized_services_revision),
                opt(&a.agent_version),
                opt(&a.encryption),
                maps,
            ]);
        }
        out.push_str(&t.render(width));
        if !self.bgp.is_empty() {
            let mut t = Table::new(&["BGP NODE", "REALIZED", "ESTABLISHED", "PEERS"]);
            for b in &self.bgp {
                t.row(vec![
                    b.node.clone(),
                    opt(&b.realized),
                    opt(&b.established_sessions),
                    b.sessions.join(", "),
                ]);
            }
            out.push('\n');
            out.push_str(&t.render(width));
        }
        if !self.egress_routes.is_empty() {
            let mut t = Table::new(&[
                "EGRESS ROUTE",
                "REALIZED",
                "REVISION",
                "SOURCES",
                "DESTINATIONS",
            ]);
            for r in &self.egress_routes {
                t.row(vec![
                    r.name.clone(),
                    opt(&r.realized),
                    format!("{}/{}", opt(&r.realized_revision), r.revision),
                    r.sources.to_string(),
                    r.destinations.join(","),
                ]);
            }
            out.push('\n');
            out.push_str(&t.render(width));
        }
        if self.problems.is_empty() {
            out.push_str("\nNo problems found.\n");
        } else {
            out.push_str(&format!("\n{} problem(s):\n", self.problems.len()));
            for p in &self.problems {
                out.push_str(&format!("  - {p}\n"));
            }
        }
        out
    }
}

/// Seconds since `t`.
fn age_seconds(t: &k8s_openapi::jiff::Timestamp) -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_second() - t.as_second()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_pressure_is_read_from_openmetrics() {
        let body = "# TYPE tendril_bpf_map_pressure gauge\n\
                    tendril_bpf_map_pressure{map=\"policy\"} 0.25\n\
                    tendril_bpf_map_pressure{map=\"lb4_backends\"} 0.0\n\
                    tendril_other{map=\"x\"} 3\n# EOF\n";
        let got = parse_map_pressure(body);
        assert_eq!(got.len(), 2);
        assert_eq!(got["policy"], 0.25);
    }
}
