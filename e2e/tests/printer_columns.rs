//! Every printer column of every Tendril CRD shows a value on a live object.
//!
//! One dedicated plane; a simulated cluster (the real operator, two nodes with one real
//! `tendril-agent` each); one pod per node; and every example of `crds/examples` applied
//! (namespaced ones in the test's namespace, the `PodIPPool` under another name than the
//! cluster's own `default`), except the kinds only the system writes — `NodeNetwork`,
//! `Endpoint`, `Identity`, `ResolvedPolicy`, `LBService` — whose live objects are the operator's and the agents'. Then, through the apiserver's Table API (what `kubectl get -o wide` prints, every
//! column whatever its priority), every cell of every object of every CRD must hold a value,
//! once the system has acted. Cells that are legitimately empty are listed in [`KNOWN_EMPTY`]
//! with the reason (mostly concerns whose reconciler does not exist yet); those must be empty,
//! so the list shrinks when a concern arrives. Needs root.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use tendril_e2e::sim::{SimCluster, SimClusterConfig, SimPod};
use tendril_e2e::{ControlPlane, TestEnv, eventually, repo_root};

const TIMEOUT: Duration = Duration::from_secs(120);
const GROUP: &str = "tendril.dev";

/// Kinds only the system writes: their examples are not applied, their live objects checked.
const SYSTEM_WRITTEN: &[&str] = &[
    "NodeNetwork",
    "Endpoint",
    "Identity",
    "ResolvedPolicy",
    "LBService",
];

/// A column that is legitimately empty, on every object of the kind or on one by name.
struct KnownEmpty {
    kind: &'static str,
    column: &'static str,
    object: Option<&'static str>,
    why: &'static str,
}

const NO_EGRESS: &str = "agents do not report the EgressRoutes they realize yet";
const NO_ROTATION: &str =
    "a policy that has not rotated its keys yet has no last rotation (the example rotates daily)";

const KNOWN_EMPTY: &[KnownEmpty] = &[
    KnownEmpty {
        kind: "EgressRoute",
        column: "Realized",
        object: None,
        why: NO_EGRESS,
    },
    KnownEmpty {
        kind: "EncryptionPolicy",
        column: "Last Rotation",
        object: None,
        why: NO_ROTATION,
    },
    KnownEmpty {
        kind: "PodIPPool",
        column: "IPv6 CIDRs",
        object: Some("default"),
        why: "the simulated cluster's pool is IPv4-only (the example pool is dual-stack)",
    },
    KnownEmpty {
        kind: "PodIPPool",
        column: "IPv6 Mask",
        object: Some("default"),
        why: "the simulated cluster's pool is IPv4-only (the example pool is dual-stack)",
    },
];

/// The entry of [`KNOWN_EMPTY`] for this cell, by index.
fn known_empty(kind: &str, column: &str, object: &str) -> Option<usize> {
    KNOWN_EMPTY
        .iter()
        .position(|k| k.kind == kind && k.column == column && k.object.is_none_or(|o| o == object))
}

/// A CRD of the group: kind and plural.
struct Crd {
    kind: String,
    plural: String,
}

/// One object's row: `namespace/name` and its cells by column name.
struct Row {
    object: String,
    name: String,
    cells: Vec<(String, serde_json::Value)>,
}

/// The Table of every object of `plural`, as `kubectl get -A -o wide` asks for it.
async fn table(client: &Client, plural: &str) -> Result<Vec<Row>> {
    let mut req = kube::core::Request::new(format!("/apis/{GROUP}/v1alpha1/{plural}"))
        .list(&ListParams::default())?;
    req.headers_mut().insert(
        "accept",
        "application/json;as=Table;v=v1;g=meta.k8s.io".parse()?,
    );
    let table: serde_json::Value = client
        .request(req)
        .await
        .with_context(|| format!("Table of {plural}"))?;
    let columns: Vec<String> = table["columnDefinitions"]
        .as_array()
        .context("no columnDefinitions")?
        .iter()
        .map(|c| c["name"].as_str().unwrap_or_default().to_string())
        .collect();
    let mut rows = Vec::new();
    for row in table["rows"].as_array().into_iter().flatten() {
        let meta = &row["object"]["metadata"];
        let name = meta["name"].as_str().unwrap_or_default().to_string();
        let object = match meta["namespace"].as_str() {
            Some(ns) => format!("{ns}/{name}"),
            None => name.clone(),
        };
        let cells = row["cells"].as_array().context("row without cells")?;
        rows.push(Row {
            object,
            name,
            cells: columns.iter().cloned().zip(cells.iter().cloned()).collect(),
        });
    }
    Ok(rows)
}

/// What `kubectl` would print as nothing: no value, an empty string, `<none>`, or an empty
/// list or map.
fn is_empty(cell: &serde_json::Value) -> bool {
    match cell {
        serde_json::Value::Null => true,
        serde_json::Value::String(s) => {
            let s = s.trim();
            s.is_empty() || s == "<none>" || s == "[]" || s == "{}"
        }
        serde_json::Value::Array(a) => a.is_empty(),
        serde_json::Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

fn show(cell: &serde_json::Value) -> String {
    match cell {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Every example of `crds/examples` but the system-written kinds, made to fit this test:
/// namespaced objects in `namespace`, the example pool renamed so that it does not replace
/// the simulated cluster's `default` pool, the example `BGPNodeConfig` made the one of
/// `node` (its agent runs gobgpd and reports; its peer has no route from the node, and no
/// password: the agent configures none).
fn examples(namespace: &str, node: &tendril_e2e::sim::SimNode) -> Result<Vec<serde_json::Value>> {
    let dir = repo_root().join("crds/examples");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    let mut out = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path)?;
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text)
            .with_context(|| format!("parsing {}", path.display()))?;
        for mut doc in docs {
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            if SYSTEM_WRITTEN.contains(&kind.as_str()) {
                continue;
            }
            if doc["metadata"].get("namespace").is_some() {
                doc["metadata"]["namespace"] = namespace.into();
            }
            if kind == "PodIPPool" {
                doc["metadata"]["name"] = "example-dual-stack".into();
            }
            if kind == "BGPNodeConfig" {
                doc["metadata"]["name"] = node.name.clone().into();
                doc["spec"]["nodeName"] = node.name.clone().into();
                for router in doc["spec"]["routers"].as_array_mut().into_iter().flatten() {
                    router["routerID"] = node.address.to_string().into();
                    for neighbor in router["neighbors"].as_array_mut().into_iter().flatten() {
                        if let Some(n) = neighbor.as_object_mut() {
                            n.remove("authSecretRef");
                        }
                    }
                }
            }
            out.push(doc);
        }
    }
    Ok(out)
}

#[tokio::test]
async fn every_printer_column_shows_a_value_on_live_objects() -> Result<()> {
    let plane = ControlPlane::dedicated("printer-columns").await?;
    let env = TestEnv::on(plane.clone()).await?;
    let client = env.client();
    let cluster = SimCluster::start(&env, SimClusterConfig::default()).await?;
    let (n0, n1) = (&cluster.nodes[0], &cluster.nodes[1]);
    let ns = env.namespace();

    // The system's own objects: Endpoints and Identities of two pods, their ResolvedPolicies,
    // the nodes' NodeNetworks.
    let label = |v: &str| BTreeMap::from([("app".to_string(), v.to_string())]);
    let web = SimPod::run(&client, n0.handle(), ns, "web", &label("web")).await?;
    let db = SimPod::run(&client, n1.handle(), ns, "db", &label("db")).await?;
    for pod in [&web, &db] {
        pod.wait_realized(&client, TIMEOUT).await?;
    }

    // The user's: every example. Node 0 is the example egress policy's gateway.
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    nodes
        .patch(
            &n0.name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"egress-gateway": "true"}}})),
        )
        .await?;
    let examples = examples(ns, n0)?;
    env.delete_on_drop::<tendril_crds::v1alpha1::BGPNodeConfig>(&n0.name);
    for doc in &examples {
        env.apply_yaml(&serde_json::to_string(doc)?)
            .await
            .with_context(|| format!("applying the {} example", doc["kind"]))?;
    }
    let applied: Vec<String> = examples
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or_default().to_string())
        .collect();

    let crds: Api<CustomResourceDefinition> = env.cluster_api();
    let crds: Vec<Crd> = crds
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|c| c.spec.group == GROUP)
        .map(|c| Crd {
            kind: c.spec.names.kind,
            plural: c.spec.names.plural,
        })
        .collect();
    assert_eq!(
        crds.len(),
        applied.len() + SYSTEM_WRITTEN.len(),
        "every kind is either applied from an example or written by the system"
    );

    // Until the operator and the agents have acted, some cells are still empty.
    let tables = eventually(TIMEOUT, || async {
        let mut tables = Vec::new();
        let mut missing = Vec::new();
        for crd in &crds {
            let rows = table(&client, &crd.plural).await?;
            if rows.is_empty() {
                missing.push(format!("{}: no object", crd.kind));
            }
            for row in &rows {
                for (column, cell) in &row.cells {
                    if is_empty(cell) && known_empty(&crd.kind, column, &row.name).is_none() {
                        missing.push(format!("{} {}: {column} is empty", crd.kind, row.object));
                    }
                }
            }
            tables.push((crd.kind.clone(), rows));
        }
        if !missing.is_empty() {
            bail!("cells without a value:\n  {}", missing.join("\n  "));
        }
        Ok(tables)
    })
    .await?;

    // The known-empty cells are empty indeed (else the concern arrived: shorten the list),
    // and every entry of the list still names a column that exists.
    let mut used = vec![false; KNOWN_EMPTY.len()];
    for (kind, rows) in &tables {
        println!("{kind}:");
        for row in rows {
            let cells: Vec<String> = row
                .cells
                .iter()
                .map(|(c, v)| format!("{c}={}", show(v)))
                .collect();
            println!("  {}", cells.join("  "));
            for (column, cell) in &row.cells {
                if let Some(i) = known_empty(kind, column, &row.name) {
                    let k = &KNOWN_EMPTY[i];
                    used[i] = true;
                    assert!(
                        is_empty(cell),
                        "{kind} {}: {column} now shows {} ({} no longer holds): remove it from KNOWN_EMPTY",
                        row.object,
                        show(cell),
                        k.why
                    );
                }
            }
        }
    }
    for (k, used) in KNOWN_EMPTY.iter().zip(used) {
        assert!(
            used,
            "KNOWN_EMPTY names {} column {:?}, which no object shows",
            k.kind, k.column
        );
    }

    for pod in [web] {
        pod.delete(&client, n0.handle()).await?;
    }
    db.delete(&client, n1.handle()).await?;
    Ok(())
}
