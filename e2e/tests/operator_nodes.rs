//! The nodes concern on a real apiserver: one `NodeNetwork` per `Node`, carrying its
//! addresses and the `AddressesResolved` condition, owned by the Node so the garbage
//! collector (kube-controller-manager) deletes it with the Node; deleted or edited
//! NodeNetworks are restored; other managers' fields are left alone; the operator serves
//! its metrics and health, and shuts down cleanly on SIGTERM, releasing its Lease.
//!
//! A dedicated control plane: the operator writes every NodeNetwork of the cluster.

mod operator_common;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use operator_common::*;
use std::time::Duration;
use tendril_crds::v1alpha1::NodeNetwork;
use tendril_e2e::{
    ControlPlane, TestEnv, eventually, fetch_metrics, http_get, wait_deleted, wait_for,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_networks_follow_nodes() -> Result<()> {
    let plane = ControlPlane::dedicated("op-nodes").await?;
    let env = TestEnv::on(plane.clone()).await?;
    let nodes: Api<Node> = env.cluster_api();
    let networks: Api<NodeNetwork> = env.cluster_api();
    let lease = "tendril-operator";
    let mut op = start_operator(&env, lease, "op-nodes", &[]).await?;
    op.process.wait_for_log("caches synced", TIMEOUT).await?;

    // A node with an InternalIP, one with none yet.
    let n1 = env.unique_name("node");
    let n2 = env.unique_name("node");
    let a1 = [("InternalIP", "10.20.0.1"), ("Hostname", "n1")];
    let a2 = [("Hostname", "n2")];
    let node1 = create_node(&env, &n1, &a1).await?;
    create_node(&env, &n2, &a2).await?;
    env.delete_on_drop::<NodeNetwork>(&n1);
    env.delete_on_drop::<NodeNetwork>(&n2);

    let nn1 = wait_for(
        &networks,
        &n1,
        |o: Option<&NodeNetwork>| o.is_some_and(|nn| converged(nn, &a1, "True")),
        TIMEOUT,
    )
    .await?
    .context("nn1")?;
    let (_, reason, message, _) = resolved(&nn1).unwrap();
    assert_eq!(reason, "InternalIPFound");
    assert!(message.contains("10.20.0.1"), "{message}");
    let owners = nn1.metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(owners.len(), 1, "{owners:?}");
    assert_eq!(owners[0].kind, "Node");
    assert_eq!(owners[0].name, n1);
    assert_eq!(Some(&owners[0].uid), node1.metadata.uid.as_ref());
    assert_eq!(owners[0].controller, Some(true));
    assert_eq!(owners[0].block_owner_deletion, Some(true));
    // tendril-nodes owns the spec addresses (Apply) and its condition (status subresource).
    let managed = nn1.metadata.managed_fields.clone().unwrap_or_default();
    let by_nodes: Vec<_> = managed
        .iter()
        .filter(|m| m.manager.as_deref() == Some("tendril-nodes"))
        .collect();
    assert!(
        by_nodes
            .iter()
            .any(|m| m.operation.as_deref() == Some("Apply")
                && m.subresource.is_none()
                && serde_json::to_string(&m.fields_v1)
                    .unwrap()
                    .contains("f:addresses")),
        "{managed:#?}"
    );
    assert!(
        by_nodes
            .iter()
            .any(|m| m.subresource.as_deref() == Some("status")
                && serde_json::to_string(&m.fields_v1)
                    .unwrap()
                    .contains("AddressesResolved")),
        "{managed:#?}"
    );
    let first_transition = nn1.status.as_ref().unwrap().conditions[0]
        .last_transition_time
        .clone();

    let nn2 = wait_for(
        &networks,
        &n2,
        |o: Option<&NodeNetwork>| o.is_some_and(|nn| converged(nn, &a2, "False")),
        TIMEOUT,
    )
    .await?
    .context("nn2")?;
    assert_eq!(resolved(&nn2).unwrap().1, "NoInternalIP");

    // Another manager's field survives the nodes concern's applies.
    networks
        .patch(
            &n1,
            &PatchParams::apply("test-encryption").force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "tendril.dev/v1alpha1", "kind": "NodeNetwork",
                "metadata": {"name": n1},
                "spec": {"encryption": {"mode": "WireGuard", "wireguardPublicKey": "dGVzdA=="}},
            })),
        )
        .await?;

    // Address change: followed; same status keeps lastTransitionTime, message moves.
    let a1b = [("InternalIP", "10.20.0.99"), ("Hostname", "n1")];
    set_addresses(&nodes, &n1, &a1b).await?;
    let nn1 = wait_for(
        &networks,
        &n1,
        |o: Option<&NodeNetwork>| o.is_some_and(|nn| converged(nn, &a1b, "True")),
        TIMEOUT,
    )
    .await?
    .context("nn1 after change")?;
    assert!(resolved(&nn1).unwrap().2.contains("10.20.0.99"));
    let cond = nn1
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "AddressesResolved")
        .unwrap();
    assert_eq!(
        cond.last_transition_time, first_transition,
        "status unchanged: transition time kept"
    );
    assert_eq!(
        nn1.spec
            .encryption
            .as_ref()
            .and_then(|e| e.wireguard_public_key.as_deref()),
        Some("dGVzdA=="),
        "another manager's field must survive"
    );

    // n2 gains an InternalIP: its condition flips to True.
    let a2b = [("InternalIP", "10.20.0.2"), ("Hostname", "n2")];
    set_addresses(&nodes, &n2, &a2b).await?;
    wait_for(
        &networks,
        &n2,
        |o: Option<&NodeNetwork>| o.is_some_and(|nn| converged(nn, &a2b, "True")),
        TIMEOUT,
    )
    .await?;

    // An edited NodeNetwork is restored.
    networks
        .patch(
            &n2,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"addresses": [{"type": "InternalIP", "address": "6.6.6.6"}]}})),
        )
        .await?;
    wait_for(
        &networks,
        &n2,
        |o: Option<&NodeNetwork>| o.is_some_and(|nn| converged(nn, &a2b, "True")),
        TIMEOUT,
    )
    .await?;

    // A deleted NodeNetwork is restored (a new object).
    let old_uid = networks.get(&n2).await?.metadata.uid;
    networks.delete(&n2, &DeleteParams::default()).await?;
    let restored = wait_for(
        &networks,
        &n2,
        |o: Option<&NodeNetwork>| {
            o.is_some_and(|nn| nn.metadata.uid != old_uid && converged(nn, &a2b, "True"))
        },
        TIMEOUT,
    )
    .await?
    .context("restored")?;
    assert_ne!(restored.metadata.uid, old_uid);

    // Deleting the Node garbage-collects its NodeNetwork; the other stays.
    nodes.delete(&n1, &DeleteParams::background()).await?;
    wait_deleted(&networks, &n1, TIMEOUT).await?;
    assert!(networks.get_opt(&n2).await?.is_some());

    // Metrics and health.
    let m = eventually(TIMEOUT, || async {
        let m = fetch_metrics(op.port).await?;
        if m.value("tendril_nodes", &[]) != Some(1.0) {
            bail!("tendril_nodes not 1 yet");
        }
        Ok(m)
    })
    .await?;
    let ok = m.sum(
        "controller_runtime_reconcile_total",
        &[("controller", "nodes"), ("result", "success")],
    );
    assert!(ok >= 6.0, "successful reconciles: {ok}");
    assert!(m.sum("workqueue_adds_total", &[("name", "nodes")]) >= ok);
    assert!(m.value("workqueue_depth", &[("name", "nodes")]).is_some());
    assert!(
        m.sum(
            "controller_runtime_reconcile_time_seconds_count",
            &[("controller", "nodes")]
        ) >= ok
    );
    assert_eq!(
        m.value("leader_election_master_status", &[("name", lease)]),
        Some(1.0)
    );
    assert!(m.has("tendril_build_info"));
    let (code, body) = http_get(op.port, "/readyz").await?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(http_get(op.port, "/healthz").await?.0, 200);
    assert_eq!(
        lease_holder(&env, lease).await?.as_deref(),
        Some("op-nodes")
    );

    // SIGTERM: exit 0, and the Lease is released for a standby.
    let status = op
        .process
        .stop(Duration::from_secs(30))
        .context("exit status")?;
    assert!(status.success(), "operator exit: {status}");
    let leases: Api<Lease> = env.api();
    let l = leases.get(lease).await?;
    let holder = l
        .spec
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty());
    assert_eq!(holder, None, "lease released on shutdown");
    Ok(())
}
