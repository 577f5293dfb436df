use super::plan::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use std::collections::BTreeMap;
use tendril_crds::v1alpha1::{EncryptionPolicySpec, NodeEncryptionStatus, WireGuardSettings};

const NOW: i64 = 1_000_000;

fn policy(name: &str, selector: Option<(&str, &str)>) -> PolicyInput {
    PolicyInput {
        name: name.into(),
        generation: Some(1),
        created: NOW - 10,
        spec: EncryptionPolicySpec {
            mode: WIREGUARD.into(),
            node_selector: selector.map(|(k, v)| LabelSelector {
                match_labels: Some(BTreeMap::from([(k.into(), v.into())])),
                ..Default::default()
            }),
            key_rotation_interval_seconds: 3600,
            wireguard: Some(WireGuardSettings {
                persistent_keepalive_seconds: 0,
                listen_port: 51871,
            }),
            ..Default::default()
        },
        key_epoch: Some(1),
        last_rotation: None,
        ..Default::default()
    }
}

fn node(name: &str, i: u8, key: Option<&str>) -> NodeInput {
    NodeInput {
        name: name.into(),
        labels: BTreeMap::from([("enc".into(), "yes".into())]),
        address: Some(format!("10.0.0.{i}").parse().unwrap()),
        pod_cidrs: vec![format!("10.200.{i}.0/24")],
        reported: Some(NodeEncryptionStatus {
            wireguard_implementation: Some("userspace".into()),
            public_key: key.map(str::to_string),
            key_epoch: key.map(|_| 1),
            ready: key.is_some(),
            ..Default::default()
        }),
    }
}

#[test]
fn every_selected_node_gets_the_others_as_peers_with_pod_cidrs_and_address() {
    let nodes = [
        node("a", 1, Some("KA")),
        node("b", 2, Some("KB")),
        node("c", 3, None),
    ];
    let plan = plan(&[policy("p", None)], &nodes, NOW);
    let a = plan.nodes["a"].as_ref().unwrap();
    assert_eq!(a.mode, WIREGUARD);
    assert_eq!(a.wireguard_public_key.as_deref(), Some("KA"));
    assert_eq!(a.listen_port, Some(51871));
    let peers: Vec<_> = a.peers.iter().map(|p| p.node.as_str()).collect();
    assert_eq!(peers, ["b", "c"]);
    assert_eq!(a.peers[0].address, "10.0.0.2");
    assert_eq!(a.peers[0].allowed_ips, ["10.0.0.2/32", "10.200.2.0/24"]);
    assert_eq!(a.peers[0].public_key.as_deref(), Some("KB"));
    // c has not published a key yet: listed without one (its traffic is held back).
    assert_eq!(a.peers[1].public_key, None);
    let outcome = &plan.policies["p"];
    assert_eq!(outcome.encrypted_nodes, 2);
    let ready = outcome.ready.as_ref().unwrap();
    assert!(!ready.status);
    assert_eq!(ready.reason, "NodesNotReady");
    assert!(
        ready.message.contains("c: no public key"),
        "{}",
        ready.message
    );
}

#[test]
fn unselected_nodes_in_clear_lose_their_encryption_and_are_no_ones_peer() {
    let mut b = node("b", 2, Some("KB"));
    b.labels.clear();
    let nodes = [node("a", 1, Some("KA")), b, node("c", 3, Some("KC"))];
    let mut p = policy("p", Some(("enc", "yes")));
    p.spec.unselected_nodes = UNSELECTED_CLEAR.into();
    let plan = plan(&[p], &nodes, NOW);
    assert_eq!(plan.nodes["b"], None);
    let a = plan.nodes["a"].as_ref().unwrap();
    assert!(a.peers.iter().all(|p| p.node != "b"));
    let ready = plan.policies["p"].ready.clone().unwrap();
    assert!(ready.status, "{ready:?}");
    assert_eq!(plan.policies["p"].encrypted_nodes, 2);
}

#[test]
fn unselected_nodes_encrypt_to_the_selected_ones_by_default_but_not_to_each_other() {
    let mut b = node("b", 2, Some("KB"));
    b.labels.clear();
    let mut d = node("d", 4, Some("KD"));
    d.labels.clear();
    let mut no_agent = node("e", 5, None);
    no_agent.labels.clear();
    no_agent.reported = None;
    let nodes = [
        node("a", 1, Some("KA")),
        b,
        node("c", 3, Some("KC")),
        d,
        no_agent,
    ];
    let plan = plan(&[policy("p", Some(("enc", "yes")))], &nodes, NOW);
    let peers_of = |n: &str| -> Vec<String> {
        plan.nodes[n]
            .as_ref()
            .unwrap()
            .peers
            .iter()
            .map(|p| p.node.clone())
            .collect()
    };
    assert_eq!(peers_of("a"), ["b", "c", "d"]);
    assert_eq!(
        peers_of("b"),
        ["a", "c"],
        "not d: two unselected nodes talk in clear"
    );
    assert_eq!(plan.nodes["e"], None, "no agent, nothing to encrypt with");
    let o = &plan.policies["p"];
    assert_eq!(o.encrypted_nodes, 4);
    assert!(o.ready.as_ref().unwrap().status);
}

#[test]
fn an_invalid_selector_is_valid_false_and_nodes_are_held() {
    let mut p = policy("p", None);
    p.spec.node_selector = Some(LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "enc".into(),
            operator: "Sometimes".into(),
            values: None,
        }]),
        ..Default::default()
    });
    let plan = plan(&[p], &[node("a", 1, Some("KA"))], NOW);
    let outcome = &plan.policies["p"];
    assert!(!outcome.valid.status);
    assert_eq!(outcome.valid.reason, "InvalidSpec");
    assert!(
        outcome.valid.message.contains("nodeSelector"),
        "{}",
        outcome.valid.message
    );
    assert!(outcome.ready.is_none());
    assert!(
        plan.nodes.is_empty(),
        "nodes keep what they had: {:?}",
        plan.nodes
    );
}

#[test]
fn the_oldest_policy_has_a_node_selected_twice() {
    let old = policy("old", None);
    let mut new = policy("new", None);
    new.created = NOW - 1;
    let plan = plan(&[new, old], &[node("a", 1, Some("KA"))], NOW);
    assert_eq!(
        plan.nodes["a"].as_ref().unwrap().policy.as_deref(),
        Some("old")
    );
    let ready = plan.policies["new"].ready.clone().unwrap();
    assert_eq!(ready.reason, "NodesTaken");
    assert!(ready.message.contains("a (by old)"), "{}", ready.message);
}

#[test]
fn ipsec_on_a_kernel_without_esp_is_unsupported_with_the_nodes_reason() {
    let mut p = policy("p", None);
    p.spec.mode = IPSEC.into();
    p.spec.wireguard = None;
    let mut a = node("a", 1, Some("KA"));
    a.reported.as_mut().unwrap().ipsec_supported = Some(false);
    a.reported.as_mut().unwrap().ipsec_unsupported_reason =
        Some("installing an ESP SA: Protocol not supported".into());
    let plan = plan(&[p], &[a], NOW);
    let ready = plan.policies["p"].ready.clone().unwrap();
    assert!(!ready.status);
    assert_eq!(ready.reason, "Unsupported");
    assert!(
        ready.message.contains("a: installing an ESP SA"),
        "{}",
        ready.message
    );
    let spec = plan.nodes["a"].as_ref().unwrap();
    assert_eq!(spec.mode, IPSEC);
    assert_eq!(spec.wireguard_public_key, None);
}

#[test]
fn keys_rotate_when_the_interval_elapsed_or_on_request_once() {
    let mut p = policy("p", None);
    let nodes = [node("a", 1, Some("KA"))];
    // Not yet due: generation 1, next rotation in the rest of the interval.
    let o = &plan(&[p.clone()], &nodes, NOW).policies["p"];
    assert_eq!((o.key_epoch, o.next_key_epoch), (1, None));
    assert_eq!(o.next_rotation_in, Some(3600 - 10));
    // Due: generation 2 is prepared, 1 stays in use (the node is ready on it).
    let o = plan(&[p.clone()], &nodes, NOW + 3600).policies["p"].clone();
    assert_eq!((o.key_epoch, o.next_key_epoch), (1, Some(2)));
    assert_eq!(o.last_rotation, Some(NOW + 3600));
    assert_eq!(
        o.next_rotation_in, None,
        "nothing scheduled while under way"
    );
    assert_eq!(o.nodes[0].reason, "Ready");
    // Requested: once per annotation value.
    p.rotation_request = Some("r1".into());
    let o = plan(&[p.clone()], &nodes, NOW).policies["p"].clone();
    assert_eq!(
        (o.key_epoch, o.next_key_epoch, o.served_request.as_deref()),
        (1, Some(2), Some("r1"))
    );
    p.served_request = Some("r1".into());
    assert_eq!(plan(&[p], &nodes, NOW).policies["p"].next_key_epoch, None);
}

fn reported(n: &mut NodeInput, f: impl FnOnce(&mut NodeEncryptionStatus)) {
    f(n.reported.as_mut().unwrap())
}

#[test]
fn a_rotation_switches_only_once_every_node_knows_every_next_key() {
    let mut p = policy("p", None);
    p.next_key_epoch = Some(2);
    p.last_rotation = Some(NOW);
    let mut nodes = [node("a", 1, Some("KA")), node("b", 2, Some("KB"))];
    // a made its next pair; b has not yet.
    reported(&mut nodes[0], |r| {
        r.next_public_key = Some("KA2".into());
        r.next_key_epoch = Some(2);
    });
    let out = plan(&[p.clone()], &nodes, NOW + 1);
    let b = out.nodes["b"].as_ref().unwrap();
    assert_eq!((b.key_epoch, b.next_key_epoch), (Some(1), Some(2)));
    assert_eq!(b.peers[0].public_key.as_deref(), Some("KA"), "still in use");
    assert_eq!(b.peers[0].next_public_key.as_deref(), Some("KA2"));
    let a = out.nodes["a"].as_ref().unwrap();
    assert_eq!(a.peers[0].next_public_key, None, "b published none yet");
    assert_eq!(out.policies["p"].key_epoch, 1);
    // Both published, only a prepared (it has b's next key on its standby device): wait.
    reported(&mut nodes[1], |r| {
        r.next_public_key = Some("KB2".into());
        r.next_key_epoch = Some(2);
    });
    reported(&mut nodes[0], |r| r.prepared_key_epoch = Some(2));
    assert_eq!(
        plan(&[p.clone()], &nodes, NOW + 2).policies["p"].key_epoch,
        1
    );
    // Both prepared: switch. The peers' keys of generation 2 are their next ones until
    // their agents report the switch.
    reported(&mut nodes[1], |r| r.prepared_key_epoch = Some(2));
    let out = plan(&[p.clone()], &nodes, NOW + 3);
    let o = &out.policies["p"];
    assert_eq!((o.key_epoch, o.next_key_epoch), (2, None));
    let a = out.nodes["a"].as_ref().unwrap();
    assert_eq!((a.key_epoch, a.next_key_epoch), (Some(2), None));
    assert_eq!(a.peers[0].public_key.as_deref(), Some("KB2"));
    assert_eq!(a.wireguard_public_key.as_deref(), Some("KA2"));
    assert_eq!(o.nodes[0].reason, "KeyOutdated", "a has not switched yet");
    // A request arriving while a rotation is under way waits for it, and for every node
    // to use the new generation (their standby devices are the old ones).
    p.rotation_request = Some("r2".into());
    let o = &plan(&[p.clone()], &nodes, NOW + 4).policies["p"];
    assert_eq!((o.key_epoch, o.next_key_epoch), (2, None));
    assert_eq!(o.served_request, None);
    for n in &mut nodes {
        reported(n, |r| {
            r.key_epoch = Some(2);
            r.public_key = r.next_public_key.take();
            r.next_key_epoch = None;
        });
    }
    let o = &plan(&[p], &nodes, NOW + 5).policies["p"];
    assert_eq!((o.key_epoch, o.next_key_epoch), (2, Some(3)));
    assert_eq!(o.served_request.as_deref(), Some("r2"));
}

#[test]
fn key_rotation_says_who_holds_a_rotation_back_and_when_it_stalled() {
    let mut p = policy("p", None);
    let mut nodes = [node("a", 1, Some("KA")), node("b", 2, Some("KB"))];
    let idle = plan(&[p.clone()], &nodes, NOW).policies["p"].clone();
    let c = idle.rotation.unwrap();
    assert_eq!((c.status, c.reason.as_str()), (true, "Idle"));
    assert_eq!(idle.rotation_stalls_in, None);
    // Under way since NOW; a prepared, b (its agent down) never does.
    p.next_key_epoch = Some(2);
    p.last_rotation = Some(NOW);
    reported(&mut nodes[0], |r| {
        r.next_public_key = Some("KA2".into());
        r.next_key_epoch = Some(2);
        r.prepared_key_epoch = Some(2);
    });
    let o = plan(&[p.clone()], &nodes, NOW + 100).policies["p"].clone();
    let c = o.rotation.unwrap();
    assert_eq!((c.status, c.reason.as_str()), (true, "InProgress"));
    assert!(c.message.contains("waiting for b "), "{}", c.message);
    assert_eq!(o.rotation_stalls_in, Some(ROTATION_STALL_SECONDS - 100));
    // The message does not tick with time: no status write per reconcile.
    let later = plan(&[p.clone()], &nodes, NOW + 200).policies["p"].clone();
    assert_eq!(later.rotation.unwrap().message, c.message);
    let o = plan(&[p.clone()], &nodes, NOW + ROTATION_STALL_SECONDS).policies["p"].clone();
    let c = o.rotation.unwrap();
    assert_eq!((c.status, c.reason.as_str()), (false, "Stalled"));
    assert!(c.message.contains("waiting for b "), "{}", c.message);
    assert_eq!(o.rotation_stalls_in, None);
    assert_eq!(
        (o.key_epoch, o.next_key_epoch),
        (1, Some(2)),
        "still held, nothing switched"
    );
    // IPsec: only nodes whose kernel can do ESP take part; b cannot, a has prepared.
    p.spec.mode = IPSEC.into();
    reported(&mut nodes[0], |r| r.ipsec_supported = Some(true));
    let o = plan(&[p], &nodes, NOW + 100).policies["p"].clone();
    assert_eq!((o.key_epoch, o.next_key_epoch), (2, None), "switched");
    let c = o.rotation.unwrap();
    assert_eq!((c.status, c.reason.as_str()), (true, "Idle"));
}

fn ipsec(p: &mut PolicyInput, nodes: &mut [NodeInput]) {
    p.spec.mode = IPSEC.into();
    p.spec.wireguard = None;
    for n in nodes {
        reported(n, |r| {
            r.ipsec_supported = Some(true);
            r.public_key = None;
        });
    }
}

#[test]
fn ipsec_nodes_get_the_spi_and_key_secret_of_their_generation() {
    let mut p = policy("p", None);
    let mut nodes = [node("a", 1, Some("KA")), node("b", 2, Some("KB"))];
    ipsec(&mut p, &mut nodes);
    let o = plan(&[p.clone()], &nodes, NOW);
    let a = o.nodes["a"].as_ref().unwrap();
    assert_eq!(
        (
            a.spi,
            a.key_secret.as_deref(),
            a.next_spi,
            a.wireguard_public_key.as_deref()
        ),
        (Some(1), Some("tendril-ipsec-p-1"), None, None)
    );
    assert_eq!(a.peers.len(), 1);
    assert_eq!(a.peers[0].public_key, None);
    assert_eq!(
        o.key_secrets,
        vec![KeySecret {
            policy: "p".into(),
            epoch: 1,
            name: "tendril-ipsec-p-1".into(),
            algorithm: "rfc4106(gcm(aes))".into(),
            key_bits: 128,
        }]
    );
    let ready = o.policies["p"].ready.clone().unwrap();
    assert_eq!((ready.status, ready.reason.as_str()), (true, "Encrypted"));

    // Rotation due: generation 2 is prepared with SPI 2 and its own Secret.
    let o = plan(&[p.clone()], &nodes, NOW + 3600).policies["p"].clone();
    assert_eq!((o.key_epoch, o.next_key_epoch), (1, Some(2)));
    p.next_key_epoch = Some(2);
    p.last_rotation = Some(NOW + 3600);
    let o = plan(&[p.clone()], &nodes, NOW + 3601);
    let a = o.nodes["a"].as_ref().unwrap();
    assert_eq!(
        (a.spi, a.next_spi, a.next_key_secret.as_deref()),
        (Some(1), Some(2), Some("tendril-ipsec-p-2"))
    );
    let epochs: Vec<i64> = o.key_secrets.iter().map(|k| k.epoch).collect();
    assert_eq!(epochs, [1, 2]);
    // Both prepared: switch. a has switched, b not yet: the old key stays meanwhile.
    for n in &mut nodes {
        reported(n, |r| r.prepared_key_epoch = Some(2));
    }
    let o = plan(&[p.clone()], &nodes, NOW + 3602);
    assert_eq!(o.policies["p"].key_epoch, 2);
    assert_eq!(o.nodes["a"].as_ref().unwrap().spi, Some(2));
    let epochs: Vec<i64> = o.key_secrets.iter().map(|k| k.epoch).collect();
    assert_eq!(epochs, [1, 2]);
    p.key_epoch = Some(2);
    p.next_key_epoch = None;
    for n in &mut nodes {
        reported(n, |r| r.key_epoch = Some(2));
    }
    let o = plan(&[p], &nodes, NOW + 3603);
    let epochs: Vec<i64> = o.key_secrets.iter().map(|k| k.epoch).collect();
    assert_eq!(
        epochs,
        [2],
        "the old key goes once every node uses the new one"
    );
}

#[test]
fn spis_go_round_one_to_fifteen_and_invalid_ipsec_policies_keep_their_keys() {
    assert_eq!(
        [1, 2, 15, 16, 17, 30, 31].map(spi_of),
        [1, 2, 15, 1, 2, 15, 1]
    );
    let long = "x".repeat(253);
    assert!(key_secret_name(&long, 12345).len() <= 253);
    let mut p = policy("p", None);
    let mut nodes = [node("a", 1, Some("KA"))];
    ipsec(&mut p, &mut nodes);
    p.spec.ipsec = Some(tendril_crds::v1alpha1::IPsecSettings {
        algorithm: "cbc(aes)+hmac(sha256)".into(),
        key_bits: 128,
    });
    let o = plan(&[p], &nodes, NOW);
    assert!(o.key_secrets.is_empty());
    assert_eq!(o.keep_keys_of, ["p"]);
    let valid = &o.policies["p"].valid;
    assert!(
        !valid.status && valid.message.contains("not implemented"),
        "{}",
        valid.message
    );
}

#[test]
fn a_new_policy_starts_at_generation_one() {
    let mut p = policy("p", None);
    p.key_epoch = None;
    let plan = plan(&[p], &[node("a", 1, Some("KA"))], NOW);
    assert_eq!(plan.policies["p"].key_epoch, 1);
    assert_eq!(plan.nodes["a"].as_ref().unwrap().key_epoch, Some(1));
}
