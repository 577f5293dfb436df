//! The encryption concern on a real apiserver, through `tendril-operator` (no agents: the
//! test writes `NodeNetwork.status.encryption` as agents do, under its own field manager).
//!
//! Three Nodes (InternalIPs, pod CIDRs from a PodIPPool); `a` and `b` carry the label the
//! policy selects. Checked in order: each selected node's `spec.encryption` lists the
//! other with its address, pod CIDR + address as allowed IPs and published key; the
//! unselected node gets nothing; the policy is `Ready` with 2 encrypted nodes and per-node
//! states. A rotation request first asks every node to prepare the next generation (the
//! peers' next keys listed beside the current ones), switches only once both nodes report
//! it prepared (`KeyRotation` names `b` while it has not), and the nodes are `KeyOutdated`
//! until their agents report the switch. `b` loses its label: it leaves
//! `a`'s peers and loses its `encryption`. A selector with an unknown operator is
//! `Valid=False` (`InvalidSpec`) naming the field. `unselectedNodes: Encrypt` makes the
//! unselected node `c` a peer of the selected ones (and they of it), `Clear` undoes it.
//! IPsec: key Secrets made, rotated and deleted (see [`ipsec_keys`]).
//!
//! Run `cargo build -p tendril-controllers --bins` first: the test spawns the binary.

mod operator_common;

use anyhow::{Result, ensure};
use k8s_openapi::api::core::v1::{Namespace, Node, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use operator_common::{free_port, wait_until};
use serde_json::json;
use tendril_crds::v1alpha1::{EncryptionPolicy, NodeNetwork};
use tendril_e2e::{ControlPlane, Process, TestEnv};

fn condition(p: &EncryptionPolicy, type_: &str) -> Option<(String, String, String)> {
    p.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// What an agent publishes: its key of generation `epoch`, ready.
async fn publish(networks: &Api<NodeNetwork>, node: &str, key: &str, epoch: i64) -> Result<()> {
    publish_with(networks, node, key, epoch, json!({})).await
}

/// As [`publish`], with more fields of `status.encryption` (a rotation's next key).
async fn publish_with(
    networks: &Api<NodeNetwork>,
    node: &str,
    key: &str,
    epoch: i64,
    more: serde_json::Value,
) -> Result<()> {
    let mut encryption = json!({
        "wireguardImplementation": "userspace", "ipsecSupported": false,
        "ipsecUnsupportedReason": "no ESP", "publicKey": key,
        "keyEpoch": epoch, "ready": true});
    if let (Some(e), Some(m)) = (encryption.as_object_mut(), more.as_object()) {
        e.extend(m.clone());
    }
    networks
        .patch_status(
            node,
            &PatchParams::apply("test-agent-encryption").force(),
            &Patch::Apply(json!({
                "apiVersion": "tendril.dev/v1alpha1", "kind": "NodeNetwork",
                "metadata": {"name": node},
                "status": {"encryption": encryption},
            })),
        )
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn policies_become_peer_lists_with_published_keys() -> Result<()> {
    let plane = ControlPlane::dedicated("encryption-operator").await?;
    let env = TestEnv::on(plane).await?;
    let client = env.client();
    env.apply_yaml(
        "apiVersion: tendril.dev/v1alpha1\nkind: PodIPPool\nmetadata: {name: default}\n\
         spec: {ipv4: {cidrs: [\"10.210.0.0/16\"], maskSize: 24}}",
    )
    .await?;
    env.delete_on_drop::<tendril_crds::v1alpha1::PodIPPool>("default");
    let _operator = Process::builder("tendril-operator")
        .arg("--kubeconfig")
        .arg(env.kubeconfig())
        .arg("--leader-elect=false")
        .arg("--metrics-bind")
        .arg(format!("127.0.0.1:{}", free_port()?))
        .env("RUST_LOG", "info,tendril_controllers::encryption=debug")
        .spawn()?;

    let nodes: Api<Node> = Api::all(client.clone());
    let networks: Api<NodeNetwork> = Api::all(client.clone());
    let label = env.unique_name("enc");
    let names: Vec<String> = ["a", "b", "c"].iter().map(|n| env.unique_name(n)).collect();
    for (i, name) in names.iter().enumerate() {
        env.delete_on_drop::<Node>(name);
        env.delete_on_drop::<NodeNetwork>(name);
        let labels = if i < 2 {
            json!({"encrypt": label})
        } else {
            json!({})
        };
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
        }))?;
        nodes.create(&PostParams::default(), &node).await?;
        nodes
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"addresses": [
                    {"type": "InternalIP", "address": format!("10.251.0.{}", 10 + i)}]}})),
            )
            .await?;
        let nn = wait_until(
            &networks,
            name,
            "addresses and pod CIDR",
            |nn: &NodeNetwork| !nn.spec.addresses.is_empty() && !nn.spec.pod_cidrs.is_empty(),
        )
        .await?;
        publish(&networks, name, &format!("key-{i}-gen1"), 1).await?;
        ensure!(nn.spec.encryption.is_none());
    }

    let policies: Api<EncryptionPolicy> = Api::all(client.clone());
    let name = env.unique_name("wg");
    env.delete_on_drop::<EncryptionPolicy>(&name);
    let policy: EncryptionPolicy = serde_json::from_value(json!({
        "apiVersion": "tendril.dev/v1alpha1", "kind": "EncryptionPolicy",
        "metadata": {"name": name},
        "spec": {"mode": "WireGuard", "nodeSelector": {"matchLabels": {"encrypt": label}},
                 "unselectedNodes": "Clear"},
    }))?;
    policies.create(&PostParams::default(), &policy).await?;
    let b_cidr = networks.get(&names[1]).await?.spec.pod_cidrs[0].clone();
    let a = wait_until(&networks, &names[0], "peer b", |nn: &NodeNetwork| {
        nn.spec
            .encryption
            .as_ref()
            .is_some_and(|e| !e.peers.is_empty())
    })
    .await?;
    let enc = a.spec.encryption.clone().unwrap();
    ensure!(
        enc.mode == "WireGuard" && enc.key_epoch == Some(1),
        "{enc:?}"
    );
    ensure!(
        enc.wireguard_public_key.as_deref() == Some("key-0-gen1"),
        "{enc:?}"
    );
    ensure!(enc.listen_port == Some(51871), "{enc:?}");
    let peer = &enc.peers[0];
    ensure!(
        peer.node == names[1] && peer.address == "10.251.0.11",
        "{peer:?}"
    );
    ensure!(peer.public_key.as_deref() == Some("key-1-gen1"), "{peer:?}");
    let mut want = vec![b_cidr.clone(), "10.251.0.11/32".to_string()];
    want.sort();
    ensure!(peer.allowed_ips == want, "{peer:?}");
    ensure!(
        networks.get(&names[2]).await?.spec.encryption.is_none(),
        "c is not selected"
    );
    let p = wait_until(
        &policies,
        &name,
        "Ready, 2 nodes",
        |p: &EncryptionPolicy| {
            condition(p, "Ready").is_some_and(|c| c.0 == "True")
                && p.status.as_ref().and_then(|s| s.encrypted_nodes) == Some(2)
        },
    )
    .await?;
    let status = p.status.unwrap();
    ensure!(
        status.key_epoch == Some(1) && status.nodes.len() == 2,
        "{status:?}"
    );

    // unselectedNodes: Encrypt (the default) — c, selected by nothing, encrypts to a and
    // b and they to it; back to Clear, it leaves them.
    let unselected = |mode: &str| Patch::Merge(json!({"spec": {"unselectedNodes": mode}}));
    policies
        .patch(&name, &PatchParams::default(), &unselected("Encrypt"))
        .await?;
    let c = wait_until(
        &networks,
        &names[2],
        "c encrypts to a and b",
        |nn: &NodeNetwork| {
            nn.spec
                .encryption
                .as_ref()
                .is_some_and(|e| e.peers.len() == 2)
        },
    )
    .await?;
    ensure!(
        c.spec.encryption.unwrap().wireguard_public_key.as_deref() == Some("key-2-gen1"),
        "c's own key"
    );
    let c_name = names[2].clone();
    wait_until(
        &networks,
        &names[0],
        "a lists c",
        move |nn: &NodeNetwork| {
            nn.spec
                .encryption
                .as_ref()
                .is_some_and(|e| e.peers.iter().any(|p| p.node == c_name))
        },
    )
    .await?;
    wait_until(
        &policies,
        &name,
        "3 nodes encrypt",
        |p: &EncryptionPolicy| p.status.as_ref().and_then(|s| s.encrypted_nodes) == Some(3),
    )
    .await?;
    policies
        .patch(&name, &PatchParams::default(), &unselected("Clear"))
        .await?;
    wait_until(
        &networks,
        &names[2],
        "c in clear again",
        |nn: &NodeNetwork| nn.spec.encryption.is_none(),
    )
    .await?;
    wait_until(&networks, &names[0], "a without c", |nn: &NodeNetwork| {
        nn.spec
            .encryption
            .as_ref()
            .is_some_and(|e| e.peers.len() == 1)
    })
    .await?;

    // Rotation, phase 1: generation 2 is prepared while 1 stays in use (still Ready).
    request_rotation(&policies, &name, "now").await?;
    let p = wait_until(&policies, &name, "preparing 2", |p: &EncryptionPolicy| {
        p.status
            .as_ref()
            .is_some_and(|s| s.key_epoch == Some(1) && s.next_key_epoch == Some(2))
    })
    .await?;
    ensure!(p.status.unwrap().last_key_rotation.is_some());
    wait_until(
        &networks,
        &names[0],
        "next generation 2",
        |nn: &NodeNetwork| {
            nn.spec
                .encryption
                .as_ref()
                .is_some_and(|e| e.key_epoch == Some(1) && e.next_key_epoch == Some(2))
        },
    )
    .await?;
    // The agents publish their next keys: each peer list carries them beside the current.
    for (i, node) in names.iter().take(2).enumerate() {
        publish_with(
            &networks,
            node,
            &format!("key-{i}-gen1"),
            1,
            json!({"nextPublicKey": format!("key-{i}-gen2"), "nextKeyEpoch": 2}),
        )
        .await?;
    }
    let a = wait_until(&networks, &names[0], "b's next key", |nn: &NodeNetwork| {
        nn.spec.encryption.as_ref().is_some_and(|e| {
            e.peers.first().and_then(|p| p.next_public_key.as_deref()) == Some("key-1-gen2")
        })
    })
    .await?;
    let peer = &a.spec.encryption.unwrap().peers[0];
    ensure!(peer.public_key.as_deref() == Some("key-1-gen1"), "{peer:?}");
    // Only a prepared: no switch yet.
    publish_with(
        &networks,
        &names[0],
        "key-0-gen1",
        1,
        json!({"nextPublicKey": "key-0-gen2", "nextKeyEpoch": 2, "preparedKeyEpoch": 2}),
    )
    .await?;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let p = policies.get(&name).await?;
    ensure!(
        p.status.as_ref().and_then(|s| s.key_epoch) == Some(1),
        "switched before b was prepared: {:?}",
        p.status
    );
    // KeyRotation names the node that holds the rotation back.
    let b = names[1].clone();
    wait_until(
        &policies,
        &name,
        "KeyRotation waiting for b",
        move |p: &EncryptionPolicy| {
            condition(p, "KeyRotation").is_some_and(|(status, reason, message)| {
                status == "True" && reason == "InProgress" && message.contains(&b)
            })
        },
    )
    .await?;
    // Phase 2: b prepared too → generation 2 in use, peers given the keys of it; the
    // nodes are KeyOutdated until their agents report the switch.
    publish_with(
        &networks,
        &names[1],
        "key-1-gen1",
        1,
        json!({"nextPublicKey": "key-1-gen2", "nextKeyEpoch": 2, "preparedKeyEpoch": 2}),
    )
    .await?;
    wait_until(&policies, &name, "switched", |p: &EncryptionPolicy| {
        p.status.as_ref().is_some_and(|s| {
            s.key_epoch == Some(2)
                && s.next_key_epoch.is_none()
                && s.nodes.iter().all(|n| n.reason == "KeyOutdated")
        }) && condition(p, "KeyRotation").is_some_and(|(_, reason, _)| reason == "Idle")
    })
    .await?;
    wait_until(&networks, &names[0], "b's key of 2", |nn: &NodeNetwork| {
        nn.spec.encryption.as_ref().is_some_and(|e| {
            e.key_epoch == Some(2)
                && e.next_key_epoch.is_none()
                && e.peers.first().and_then(|p| p.public_key.as_deref()) == Some("key-1-gen2")
        })
    })
    .await?;
    for (i, node) in names.iter().take(2).enumerate() {
        publish(&networks, node, &format!("key-{i}-gen2"), 2).await?;
    }
    wait_until(&policies, &name, "Ready again", |p: &EncryptionPolicy| {
        condition(p, "Ready").is_some_and(|c| c.0 == "True")
    })
    .await?;

    // b deselected: out of a's peers, its own encryption removed.
    nodes
        .patch(
            &names[1],
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"encrypt": null}}})),
        )
        .await?;
    wait_until(&networks, &names[0], "no peers", |nn: &NodeNetwork| {
        nn.spec
            .encryption
            .as_ref()
            .is_some_and(|e| e.peers.is_empty())
    })
    .await?;
    wait_until(&networks, &names[1], "no encryption", |nn: &NodeNetwork| {
        nn.spec.encryption.is_none()
    })
    .await?;

    ipsec_keys(&env, &names[1..], &policies, &nodes, &networks).await?;

    // Bad input.
    let bad = env.unique_name("bad");
    env.delete_on_drop::<EncryptionPolicy>(&bad);
    let policy: EncryptionPolicy = serde_json::from_value(json!({
        "apiVersion": "tendril.dev/v1alpha1", "kind": "EncryptionPolicy",
        "metadata": {"name": bad},
        "spec": {"mode": "WireGuard", "nodeSelector": {"matchExpressions": [
            {"key": "encrypt", "operator": "Sometimes"}]}},
    }))?;
    policies.create(&PostParams::default(), &policy).await?;
    let p = wait_until(&policies, &bad, "Valid=False", |p: &EncryptionPolicy| {
        condition(p, "Valid").is_some_and(|c| c.0 == "False")
    })
    .await?;
    let (_, reason, message) = condition(&p, "Valid").unwrap();
    println!("invalid policy: {reason}: {message}");
    ensure!(
        reason == "InvalidSpec" && message.contains("nodeSelector"),
        "{message}"
    );
    Ok(())
}

const IPSEC_KEYS_NAMESPACE: &str = "tendril-ipsec-keys";

/// The key material of an IPsec key Secret, waiting until it exists.
async fn key_of(secrets: &Api<Secret>, name: &str) -> Result<Vec<u8>> {
    let s = wait_until(secrets, name, "key Secret", |s: &Secret| {
        s.data.as_ref().is_some_and(|d| d.contains_key("key"))
    })
    .await?;
    let data = s.data.unwrap_or_default();
    ensure!(
        data.get("algorithm").map(|v| v.0.as_slice()) == Some(b"rfc4106(gcm(aes))".as_slice())
            && data.get("keyBits").map(|v| v.0.as_slice()) == Some(b"256".as_slice()),
        "{name}: {:?}",
        data.keys()
    );
    Ok(data["key"].0.clone())
}

/// IPsec on two nodes (agents with ESP, as written by the test): a key Secret per
/// generation with 64 random bytes; the nodes get the SPI and Secret of their generation;
/// a rotation makes generation 2's Secret before naming it, switches once both nodes
/// prepared, and deletes generation 1's once both use 2; the policy's deletion deletes
/// the rest.
async fn ipsec_keys(
    env: &TestEnv,
    names: &[String],
    policies: &Api<EncryptionPolicy>,
    nodes: &Api<Node>,
    networks: &Api<NodeNetwork>,
) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(env.client());
    let ns: Namespace = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": IPSEC_KEYS_NAMESPACE}}),
    )?;
    match namespaces.create(&PostParams::default(), &ns).await {
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        other => drop(other?),
    }
    let secrets: Api<Secret> = Api::namespaced(env.client(), IPSEC_KEYS_NAMESPACE);
    let label = env.unique_name("ipsec");
    let agent = |epoch: i64, more: serde_json::Value| {
        let mut status = json!({"ipsecSupported": true, "keyEpoch": epoch});
        if let (Some(s), Some(m)) = (status.as_object_mut(), more.as_object()) {
            s.extend(m.clone());
        }
        status
    };
    for node in names {
        nodes
            .patch(
                node,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"ipsec": label}}})),
            )
            .await?;
        publish_with(networks, node, "unused", 1, agent(1, json!({}))).await?;
    }
    let name = env.unique_name("ipsec");
    env.delete_on_drop::<EncryptionPolicy>(&name);
    let policy: EncryptionPolicy = serde_json::from_value(json!({
        "apiVersion": "tendril.dev/v1alpha1", "kind": "EncryptionPolicy",
        "metadata": {"name": name},
        "spec": {"mode": "IPsec", "nodeSelector": {"matchLabels": {"ipsec": label}},
                 "ipsec": {"keyBits": 256}},
    }))?;
    policies.create(&PostParams::default(), &policy).await?;
    let first = format!("tendril-ipsec-{name}-1");
    let key1 = key_of(&secrets, &first).await?;
    ensure!(key1.len() == 64, "{} bytes", key1.len());
    let b = wait_until(
        networks,
        &names[0],
        "IPsec generation 1",
        |nn: &NodeNetwork| {
            nn.spec
                .encryption
                .as_ref()
                .is_some_and(|e| e.mode == "IPsec" && e.peers.len() == 1)
        },
    )
    .await?;
    let enc = b.spec.encryption.unwrap();
    ensure!(
        (enc.spi, enc.key_secret.as_deref(), enc.key_epoch)
            == (Some(1), Some(first.as_str()), Some(1))
            && enc.peers[0].node == names[1]
            && enc.peers[0].public_key.is_none(),
        "{enc:?}"
    );
    wait_until(policies, &name, "IPsec Ready", |p: &EncryptionPolicy| {
        condition(p, "Ready").is_some_and(|c| c.0 == "True")
    })
    .await?;

    // Rotation: generation 2's Secret exists before any node is told to prepare it.
    request_rotation(policies, &name, "r1").await?;
    let second = format!("tendril-ipsec-{name}-2");
    let b = wait_until(networks, &names[0], "preparing 2", |nn: &NodeNetwork| {
        nn.spec
            .encryption
            .as_ref()
            .is_some_and(|e| e.next_spi == Some(2))
    })
    .await?;
    ensure!(
        b.spec.encryption.unwrap().next_key_secret.as_deref() == Some(second.as_str()),
        "the next Secret is named"
    );
    let key2 = secrets.get(&second).await?.data.unwrap_or_default()["key"]
        .0
        .clone();
    ensure!(
        key2.len() == 64 && key2 != key1,
        "a fresh key per generation"
    );
    for node in names {
        publish_with(
            networks,
            node,
            "unused",
            1,
            agent(1, json!({"preparedKeyEpoch": 2})),
        )
        .await?;
    }
    let switched = second.clone();
    wait_until(
        networks,
        &names[1],
        "switched to 2",
        move |nn: &NodeNetwork| {
            nn.spec.encryption.as_ref().is_some_and(|e| {
                e.spi == Some(2) && e.key_secret.as_deref() == Some(switched.as_str())
            })
        },
    )
    .await?;
    ensure!(
        secrets.get_opt(&first).await?.is_some(),
        "kept while a node uses it"
    );
    for node in names {
        publish_with(networks, node, "unused", 2, agent(2, json!({}))).await?;
    }
    tendril_e2e::wait_deleted(&secrets, &first, std::time::Duration::from_secs(30)).await?;
    println!("IPsec: generation 1's key deleted once both nodes use generation 2");

    policies.delete(&name, &Default::default()).await?;
    tendril_e2e::wait_deleted(&secrets, &second, std::time::Duration::from_secs(30)).await?;
    Ok(())
}

/// Asks `policy` for a key rotation now (its rotation-request annotation set to `value`).
async fn request_rotation(
    policies: &Api<EncryptionPolicy>,
    policy: &str,
    value: &str,
) -> Result<()> {
    let annotations = json!({"metadata": {"annotations": {"tendril.dev/rotation-request": value}}});
    policies
        .patch(policy, &PatchParams::default(), &Patch::Merge(annotations))
        .await?;
    Ok(())
}
