//! The policy concern on a real apiserver, through `tendril-operator`.
//!
//! Identities are created by hand (the policy concern reads only `Identity` objects), so
//! no pods are needed. In order: every identity gets an empty `ResolvedPolicy` at revision
//! 1; a Kubernetes NetworkPolicy and a Tendril NetworkPolicy produce the expected specs
//! (revision 2, the others untouched); a change that alters no spec writes nothing; an
//! invalid policy and an unsupported one get `Valid=False` with their reason and change no
//! spec; deleting a policy empties the spec; deleting an identity deletes its
//! `ResolvedPolicy`; one deleted by hand comes back with a higher revision; the metrics report it all; a restarted operator writes no new revision.
//!
//! Run `cargo build -p tendril-controllers --bins` first: the test spawns the binary.

use anyhow::{Context as _, Result, ensure};
use k8s_openapi::api::networking::v1::NetworkPolicy as KubeNetworkPolicy;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};
use std::time::Duration;
use tendril_crds::v1alpha1::{
    ClusterNetworkPolicy, Identity, NetworkPolicy, ResolvedPolicy, ResolvedPolicySpec,
};
use tendril_e2e::{
    ControlPlane, Process, TestEnv, apply, eventually, fetch_metrics, free_port, wait_deleted,
    wait_for,
};

const TIMEOUT: Duration = Duration::from_secs(90);
use tendril_crds::facts::annotations::POLICY_CHANGED_AT as CHANGED_AT;

/// Identities of the test: web and db in the test namespace, client in another one.
const WEB: i64 = 1000;
const DB: i64 = 1001;
const CLIENT: i64 = 1002;

/// `tendril-operator` without leader election, logging at `rust_log`, once its caches
/// synced; and its metrics port.
async fn start_operator(env: &TestEnv, rust_log: &str) -> Result<(Process, u16)> {
    let port = free_port()?;
    let mut operator = Process::builder("tendril-operator")
        .arg("--kubeconfig")
        .arg(env.kubeconfig())
        .arg("--leader-elect=false")
        .arg("--metrics-bind")
        .arg(format!("127.0.0.1:{port}"))
        .env("RUST_LOG", rust_log)
        .spawn()?;
    operator.wait_for_log("caches synced", TIMEOUT).await?;
    Ok((operator, port))
}

fn identity(id: i64, ns: &str, app: &str) -> Result<Identity> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "tendril.dev/v1alpha1", "kind": "Identity",
        "metadata": {"name": id.to_string()},
        "spec": {"id": id, "securityLabels": {
            "k8s:io.kubernetes.pod.namespace": ns,
            "k8s:io.tendril.k8s.namespace.labels.kubernetes.io/metadata.name": ns,
            "k8s:app": app,
        }},
    }))?)
}

fn typed<K: serde::de::DeserializeOwned>(v: Value) -> Result<K> {
    Ok(serde_json::from_value(v)?)
}

/// Waits until the ResolvedPolicy of `id` satisfies `cond`.
async fn resolved(
    api: &Api<ResolvedPolicy>,
    id: i64,
    what: &str,
    cond: impl Fn(&ResolvedPolicySpec) -> bool + Send + 'static,
) -> Result<ResolvedPolicy> {
    wait_for(
        api,
        &id.to_string(),
        move |o: Option<&ResolvedPolicy>| o.is_some_and(|rp| cond(&rp.spec)),
        TIMEOUT,
    )
    .await
    .with_context(|| format!("ResolvedPolicy {id}: {what}"))?
    .context("present")
}

fn rule_json(spec: &ResolvedPolicySpec) -> Value {
    json!({"defaultDeny": spec.default_deny, "ingress": spec.ingress, "egress": spec.egress})
}

/// `tendril.dev/policy-changed-at` is RFC 3339 with microseconds in UTC.
fn check_changed_at(rp: &ResolvedPolicy) -> Result<()> {
    let at = rp
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CHANGED_AT))
        .context("changed-at annotation")?;
    let parsed = chrono::DateTime::parse_from_rfc3339(at)
        .with_context(|| format!("{CHANGED_AT}={at} is not RFC 3339"))?;
    let fraction = at
        .split_once('.')
        .map(|(_, f)| f.trim_end_matches('Z'))
        .unwrap_or("");
    ensure!(
        at.ends_with('Z') && fraction.len() == 6 && parsed.offset().local_minus_utc() == 0,
        "{CHANGED_AT}={at}: want microseconds, UTC"
    );
    Ok(())
}

#[tokio::test]
async fn policies_resolve_into_resolved_policies() -> Result<()> {
    let plane = ControlPlane::dedicated("policy").await?;
    let env = TestEnv::on(plane.clone()).await?;
    let client = env.client();
    let ns = env.namespace().to_string();
    let other = env.unique_name("other");
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    apply(
        &namespaces,
        &typed(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": other}}))?,
    )
    .await?;
    env.delete_on_drop::<k8s_openapi::api::core::v1::Namespace>(&other);

    let identities: Api<Identity> = Api::all(client.clone());
    let rps: Api<ResolvedPolicy> = Api::all(client.clone());
    for (id, n, app) in [
        (WEB, &ns, "web"),
        (DB, &ns, "db"),
        (CLIENT, &other, "client"),
    ] {
        env.delete_on_drop::<Identity>(&id.to_string());
        env.delete_on_drop::<ResolvedPolicy>(&id.to_string());
        apply(&identities, &identity(id, n, app)?).await?;
    }

    let (mut operator, port) =
        start_operator(&env, "info,tendril_controllers::policy=debug").await?;

    // Every identity: an empty spec at revision 1.
    for id in [WEB, DB, CLIENT] {
        let rp = resolved(&rps, id, "empty at revision 1", |s| s.revision == 1).await?;
        ensure!(
            rp.spec.identity == id
                && rp.spec.ingress.is_empty()
                && rp.spec.egress.is_empty()
                && !rp.spec.default_deny.ingress
                && !rp.spec.default_deny.egress
                && rp.spec.sources.is_empty(),
            "not empty: {:?}",
            rp.spec
        );
        check_changed_at(&rp)?;
    }

    // A Kubernetes NetworkPolicy: db accepts web on 5432.
    let knps: Api<KubeNetworkPolicy> = Api::namespaced(client.clone(), &ns);
    apply_db_from_web(&knps, &ns).await?;
    let db = resolved(&rps, DB, "isolated by db-from-web", |s| s.revision == 2).await?;
    ensure!(
        rule_json(&db.spec)
            == json!({
                "defaultDeny": {"ingress": true, "egress": false},
                "ingress": [
                    {"verdict": "Allow", "peers": [1]},
                    {"verdict": "Allow", "peers": [WEB], "portSet": "TCP:5432"},
                ],
                "egress": [],
            }),
        "db: {}",
        rule_json(&db.spec)
    );
    ensure!(
        db.spec.sources.len() == 1
            && db.spec.sources[0].kind.as_str() == "KubernetesNetworkPolicy"
            && db.spec.sources[0].name == "db-from-web"
            && db.spec.sources[0].namespace.as_deref() == Some(ns.as_str())
            && db.spec.sources[0].generation == Some(1),
        "sources: {:?}",
        db.spec.sources
    );
    check_changed_at(&db)?;

    // A Tendril NetworkPolicy: web may reach db on 5432, never the world.
    let tnps: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
    apply(
        &tnps,
        &typed(json!({
            "apiVersion": "tendril.dev/v1alpha1", "kind": "NetworkPolicy",
            "metadata": {"name": "web-egress", "namespace": ns},
            "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                     "egress": [{"toEndpoints": [{"matchLabels": {"app": "db"}}],
                                 "toPorts": [{"ports": [{"port": "5432", "protocol": "TCP"}]}]}],
                     "egressDeny": [{"toEntities": ["world"]}]},
        }))?,
    )
    .await?;
    let web = resolved(&rps, WEB, "web-egress", |s| s.revision == 2).await?;
    ensure!(
        rule_json(&web.spec)
            == json!({
                "defaultDeny": {"ingress": false, "egress": true},
                "ingress": [],
                "egress": [
                    {"verdict": "Allow", "peers": [DB], "portSet": "TCP:5432"},
                    {"verdict": "Deny", "peers": [2]},
                ],
            }),
        "web: {}",
        rule_json(&web.spec)
    );
    let status = wait_for(
        &tnps,
        "web-egress",
        |o: Option<&NetworkPolicy>| {
            o.and_then(|p| p.status.as_ref())
                .is_some_and(|s| s.observed_generation == Some(1))
        },
        TIMEOUT,
    )
    .await?
    .and_then(|p| p.status)
    .context("status")?;
    let valid = status.conditions.iter().find(|c| c.type_ == "Valid");
    ensure!(
        valid.is_some_and(|c| c.status == "True" && c.reason == "Resolved")
            && status.selected_identities == Some(1),
        "status: {status:?}"
    );

    // Changes that alter no spec (annotations: no new generation) write nothing. The
    // barrier (a policy for client) proves a resolve ran after them.
    let annotate = json!({"metadata": {"annotations": {"note": "no-op"}}});
    knps.patch(
        "db-from-web",
        &PatchParams::default(),
        &Patch::Merge(&annotate),
    )
    .await?;
    tnps.patch(
        "web-egress",
        &PatchParams::default(),
        &Patch::Merge(&annotate),
    )
    .await?;
    let barrier: Api<NetworkPolicy> = Api::namespaced(client.clone(), &other);
    let barrier_policy = |port: u16| -> Result<NetworkPolicy> {
        typed(json!({
            "apiVersion": "tendril.dev/v1alpha1", "kind": "NetworkPolicy",
            "metadata": {"name": "barrier", "namespace": other},
            "spec": {"endpointSelector": {},
                     "ingress": [{"toPorts": [{"ports": [{"port": port.to_string(), "protocol": "UDP"}]}]}]},
        }))
    };
    apply(&barrier, &barrier_policy(7001)?).await?;
    resolved(&rps, CLIENT, "barrier 7001", |s| {
        s.ingress
            .iter()
            .any(|r| r.ports.iter().any(|p| p.port == 7001))
    })
    .await?;
    for (id, revision) in [(WEB, 2), (DB, 2)] {
        let rp = rps.get(&id.to_string()).await?;
        ensure!(
            rp.spec.revision == revision,
            "identity {id}: revision {} after a no-op change, want {revision}",
            rp.spec.revision
        );
    }

    // Invalid and unsupported policies: Valid=False with the reason; no spec changes.
    let cnps: Api<ClusterNetworkPolicy> = Api::all(client.clone());
    for (name, spec) in [
        (
            "bad-selector",
            json!({"endpointSelector": {},
                   "ingress": [{"fromEndpoints": [{"matchExpressions": [{"key": "app", "operator": "Like", "values": ["w"]}]}]}]}),
        ),
        ("host-policy", json!({"nodeSelector": {}, "ingress": [{}]})),
    ] {
        env.delete_on_drop::<ClusterNetworkPolicy>(name);
        apply(
            &cnps,
            &typed(json!({
                "apiVersion": "tendril.dev/v1alpha1", "kind": "ClusterNetworkPolicy",
                "metadata": {"name": name}, "spec": spec,
            }))?,
        )
        .await?;
    }
    for (name, reason, mentions) in [
        ("bad-selector", "InvalidSelector", "Like"),
        ("host-policy", "Unsupported", "nodeSelector"),
    ] {
        let p = wait_for(
            &cnps,
            name,
            |o: Option<&ClusterNetworkPolicy>| {
                o.and_then(|p| p.status.as_ref())
                    .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Valid"))
            },
            TIMEOUT,
        )
        .await?
        .context("policy")?;
        let status = p.status.context("status")?;
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Valid")
            .context("Valid")?;
        ensure!(
            c.status == "False" && c.reason == reason && c.message.contains(mentions),
            "{name}: {c:?}"
        );
        ensure!(status.observed_generation == Some(1), "{name}: {status:?}");
    }
    for (id, revision) in [(WEB, 2), (DB, 2), (CLIENT, 2)] {
        let rp = rps.get(&id.to_string()).await?;
        ensure!(
            rp.spec.revision == revision,
            "identity {id}: revision {} after invalid policies, want {revision}",
            rp.spec.revision
        );
    }

    // Deleting the Kubernetes policy empties db's spec (a new revision).
    knps.delete("db-from-web", &DeleteParams::default()).await?;
    let db = resolved(&rps, DB, "emptied", |s| s.revision == 3).await?;
    ensure!(
        db.spec.ingress.is_empty()
            && db.spec.egress.is_empty()
            && !db.spec.default_deny.ingress
            && db.spec.sources.is_empty(),
        "db not emptied: {:?}",
        db.spec
    );

    // Deleting an identity deletes its ResolvedPolicy.
    identities
        .delete(&CLIENT.to_string(), &DeleteParams::default())
        .await?;
    wait_deleted(&rps, &CLIENT.to_string(), TIMEOUT).await?;

    // A ResolvedPolicy deleted by hand while its identity lives is put back, same content,
    // and its revision does not go backwards.
    let before = rps.get(&WEB.to_string()).await?;
    rps.delete(&WEB.to_string(), &DeleteParams::default())
        .await?;
    let web = resolved(&rps, WEB, "put back", |s| s.revision == 3).await?;
    ensure!(
        rule_json(&web.spec) == rule_json(&before.spec) && web.metadata.uid != before.metadata.uid,
        "put back differently: {:?}",
        web.spec
    );

    let m = eventually(TIMEOUT, || async {
        let m = fetch_metrics(port).await?;
        ensure!(
            m.value("tendril_policy_resolved_policies", &[]) == Some(2.0),
            "resolved policies: {:?}",
            m.value("tendril_policy_resolved_policies", &[])
        );
        Ok(m)
    })
    .await?;
    ensure!(
        m.value(
            "tendril_policy_invalid_sources",
            &[("kind", "ClusterNetworkPolicy")]
        ) == Some(2.0),
        "invalid sources"
    );
    // 3 + web, db, barrier (client), db again.
    let revisions = m
        .value("tendril_policy_revisions_total", &[])
        .unwrap_or(0.0);
    ensure!(revisions >= 7.0, "revisions_total {revisions}");
    ensure!(
        m.sum("tendril_policy_resolve_seconds_count", &[]) >= 1.0,
        "resolve histogram"
    );
    operator.stop(Duration::from_secs(10));

    // A restarted operator rewrites nothing: revisions continue from the stored ones. A new
    // identity proves its first resolve ran.
    let (mut operator, _) = start_operator(&env, "info,tendril_controllers::policy=debug").await?;
    const CACHE: i64 = 1003;
    env.delete_on_drop::<Identity>(&CACHE.to_string());
    env.delete_on_drop::<ResolvedPolicy>(&CACHE.to_string());
    apply(&identities, &identity(CACHE, &ns, "cache")?).await?;
    resolved(&rps, CACHE, "new after restart", |s| s.revision == 1).await?;
    for (id, revision) in [(WEB, 3), (DB, 3)] {
        let rp = rps.get(&id.to_string()).await?;
        ensure!(
            rp.spec.revision == revision,
            "identity {id}: revision {} after an operator restart, want {revision}",
            rp.spec.revision
        );
    }
    operator.stop(Duration::from_secs(10));
    Ok(())
}

/// A `ResolvedPolicy` written by an older operator, with `ports` as a list of objects,
/// still reads; the operator's next write replaces the list with `portSet`.
#[tokio::test]
async fn a_resolved_policy_in_the_former_shape_is_rewritten() -> Result<()> {
    use kube::api::{ApiResource, DynamicObject};

    let plane = ControlPlane::dedicated("policy-former-shape").await?;
    let env = TestEnv::on(plane.clone()).await?;
    let client = env.client();
    let ns = env.namespace().to_string();
    let raw: Api<DynamicObject> =
        Api::all_with(client.clone(), &ApiResource::erase::<ResolvedPolicy>(&()));
    env.delete_on_drop::<ResolvedPolicy>(&DB.to_string());
    // As the former operator wrote it: its field manager, ports as objects.
    let former: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "tendril.dev/v1alpha1", "kind": "ResolvedPolicy",
        "metadata": {"name": DB.to_string()},
        "spec": {"identity": DB, "revision": 1, "defaultDeny": {"ingress": true, "egress": false},
                 "ingress": [{"verdict": "Allow", "peers": [WEB], "ports": [{"port": 80, "protocol": "TCP"}]}]},
    }))?;
    raw.patch(
        &DB.to_string(),
        &PatchParams::apply("tendril-policy").force(),
        &Patch::Apply(&former),
    )
    .await?;
    let rps: Api<ResolvedPolicy> = Api::all(client.clone());
    let read = rps.get(&DB.to_string()).await?;
    ensure!(
        read.spec.ingress.len() == 1
            && read.spec.ingress[0].ports.len() == 1
            && read.spec.ingress[0].ports[0].port == 80,
        "the former shape reads as {:?}",
        read.spec
    );

    let identities: Api<Identity> = Api::all(client.clone());
    for (id, app) in [(WEB, "web"), (DB, "db")] {
        env.delete_on_drop::<Identity>(&id.to_string());
        env.delete_on_drop::<ResolvedPolicy>(&id.to_string());
        apply(&identities, &identity(id, &ns, app)?).await?;
    }
    let knps: Api<KubeNetworkPolicy> = Api::namespaced(client.clone(), &ns);
    apply_db_from_web(&knps, &ns).await?;

    let (operator, _) = start_operator(&env, "info").await?;
    // The former object read as it was (revision 1), so the new spec is revision 2.
    let db = resolved(&rps, DB, "rewritten from the former shape", |s| {
        s.revision == 2
    })
    .await?;
    ensure!(
        db.spec
            .ingress
            .iter()
            .any(|r| r.ports.iter().any(|p| p.port == 5432)),
        "db: {:?}",
        db.spec
    );
    let wire = raw.get(&DB.to_string()).await?;
    let rules = wire.data["spec"]["ingress"].as_array().context("ingress")?;
    let port_sets: Vec<&Value> = rules.iter().filter_map(|r| r.get("portSet")).collect();
    ensure!(
        port_sets == [&json!("TCP:5432")] && rules.iter().all(|r| r.get("ports").is_none()),
        "rules on the wire: {rules:?}"
    );
    drop(operator);
    drop(plane);
    Ok(())
}

/// The Kubernetes NetworkPolicy `db-from-web`: db accepts web on 5432.
async fn apply_db_from_web(knps: &Api<KubeNetworkPolicy>, ns: &str) -> Result<()> {
    apply(
        knps,
        &typed(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "db-from-web", "namespace": ns},
            "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                                  "ports": [{"port": 5432}]}]},
        }))?,
    )
    .await?;
    Ok(())
}
