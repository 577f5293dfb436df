//! Concern `encryption`: `EncryptionPolicy` + `Node` labels + `NodeNetwork` (addresses, pod
//! CIDRs, and what each agent published in `status.encryption`: its public key, its key
//! generation, whether its kernel can do ESP) → every node's `NodeNetwork.spec.encryption`
//! (field manager `tendril-encryption`): the mode, the key generation to be at, the WireGuard
//! port, and the peers to encrypt to (node address, pod CIDRs + node address as allowed
//! IPs, public key). The policy's status: `Valid`, `Ready`, `encryptedNodes`, `keyEpoch`,
//! `lastKeyRotation` and each selected node's readiness.
//!
//! Private keys never reach the API: each agent makes its key pair and publishes only the
//! public half. Rotation is a new key generation in the spec ([`plan`]); every agent then
//! makes a new pair, and its peers pick the new public key up from their specs.
//!
//! IPsec: each key generation is a `Secret` in `ipsecKeysNamespace` with a fresh random
//! key, made before any node is told to use it and deleted once no node does (the only
//! key material in the API: agents read it and derive a key per node pair and direction).
//! Each selected node's agent reports whether its kernel can do ESP; where it cannot,
//! `Ready=False` with reason `Unsupported` names the node and the reason.
//!
//! Shaped like the egress concern: one singleton reconcile over whole stores after a quiet
//! moment, the pure [`plan::plan`], then only the writes that change something.
//!
//! Metrics: `tendril_encryption_selected_nodes`, `tendril_encryption_encrypted_nodes`,
//! `tendril_encryption_invalid_policies`, `tendril_encryption_key_rotations_total`,
//! `tendril_encryption_node_writes_total`.

mod metrics;
pub mod plan;
#[cfg(test)]
mod plan_tests;

use crate::egress::node_input;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Node, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use kube::api::{DeleteParams, ListParams, PartialObjectMeta, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use metrics::Metrics;
use plan::{NodeInput, Plan, PolicyInput};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tendril_crds::common::conditions::{READY, VALID};
use tendril_crds::v1alpha1::{EncryptionPolicy, NodeNetwork};
use tendril_runtime::debounce::ChangeClock;
use tendril_runtime::singleton::{self, Singleton};
use tendril_runtime::{self as runtime, Reconciler, conditions};
use tracing::{debug, info, warn};

/// The concern's name; its field manager is `tendril-encryption`.
pub const NAME: &str = "encryption";

/// `encryption` in config/operator.yaml.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct EncryptionConfig {
    /// Quiet time after a change before the node specs are computed again.
    pub debounce_millis: u64,
    /// A steady stream of changes is computed at least this long after its first change.
    pub max_delay_millis: u64,
    /// The namespace of the IPsec key Secrets (the agents read them there).
    pub ipsec_keys_namespace: String,
}

impl Default for EncryptionConfig {
    fn default() -> Self {
        Self {
            debounce_millis: 50,
            max_delay_millis: 500,
            ipsec_keys_namespace: IPSEC_KEYS_NAMESPACE.into(),
        }
    }
}

pub type Error = runtime::ApiError;

/// The default namespace of the IPsec key Secrets (deploy/kustomize/base/ipsec-keys.yaml).
pub const IPSEC_KEYS_NAMESPACE: &str = "tendril-ipsec-keys";
/// Label on every IPsec key Secret this concern makes (how it finds them again).
const IPSEC_KEY_LABEL: &str = "tendril.dev/ipsec-key";
/// Annotations on an IPsec key Secret: its policy and generation.
const KEY_POLICY: &str = "tendril.dev/encryption-policy";
const KEY_EPOCH: &str = "tendril.dev/key-epoch";
/// Bytes of random key material in a key Secret (`key`): enough to derive any algorithm's
/// keys from, per node pair and direction.
const KEY_BYTES: usize = 64;

#[derive(Clone)]
struct Stores {
    policies: Store<EncryptionPolicy>,
    nodes: Store<Node>,
    networks: Store<NodeNetwork>,
}

impl Stores {
    async fn listed(self) {
        let _ = futures::future::join3(
            runtime::store_ready(&self.policies),
            runtime::store_ready(&self.nodes),
            runtime::store_ready(&self.networks),
        )
        .await;
    }

    async fn ready(&self) -> Result<(), runtime::CacheNotReady> {
        runtime::cache_ready(&self.policies, "encryptionpolicies").await?;
        runtime::cache_ready(&self.nodes, "nodes").await?;
        runtime::cache_ready(&self.networks, "nodenetworks").await?;
        Ok(())
    }
}

fn seconds(t: &Time) -> i64 {
    t.0.as_second()
}

fn policy_input(p: &EncryptionPolicy) -> PolicyInput {
    let status = p.status.clone().unwrap_or_default();
    PolicyInput {
        name: p.name_any(),
        generation: p.metadata.generation,
        created: p
            .metadata
            .creation_timestamp
            .as_ref()
            .map(seconds)
            .unwrap_or(0),
        spec: p.spec.clone(),
        key_epoch: status.key_epoch,
        next_key_epoch: status.next_key_epoch,
        last_rotation: status.last_key_rotation.as_ref().map(seconds),
        rotation_request: p.annotations().get(plan::ROTATION_REQUEST).cloned(),
        served_request: status.rotation_request,
    }
}

/// What the plan reads of a node: labels from its `Node` (none without one), the rest
/// from its `NodeNetwork`.
fn network_input(nn: &NodeNetwork, node: Option<&Node>) -> NodeInput {
    let mut internal: Vec<IpAddr> = nn
        .spec
        .addresses
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    internal.sort_by_key(|a| !a.is_ipv4());
    NodeInput {
        name: nn.name_any(),
        labels: node.map(|n| node_input(n).labels).unwrap_or_default(),
        address: internal.first().copied(),
        pod_cidrs: nn.spec.pod_cidrs.clone(),
        reported: nn.status.as_ref().and_then(|s| s.encryption.clone()),
    }
}

struct Encryption {
    client: kube::Client,
    stores: Stores,
    changes: ChangeClock,
    metrics: Metrics,
    manager: String,
    keys_namespace: String,
}

impl Reconciler for Encryption {
    type Object = Singleton;
    type Error = Error;
    const NAME: &'static str = NAME;

    async fn reconcile(&self, _: Arc<Singleton>) -> Result<Action, Error> {
        self.stores.ready().await?;
        self.changes.settled().await;
        self.changes.handle(|_| self.compute_and_write()).await
    }
}

impl Encryption {
    async fn compute_and_write(&self) -> Result<Action, Error> {
        let policies: Vec<PolicyInput> = self
            .stores
            .policies
            .state()
            .iter()
            .map(|p| policy_input(p))
            .collect();
        let networks = self.stores.networks.state();
        let nodes: Vec<NodeInput> = networks
            .iter()
            .map(|nn| {
                let node = self.stores.nodes.get(&ObjectRef::new(&nn.name_any()));
                network_input(nn, node.as_deref())
            })
            .collect();
        let now = Timestamp::now().as_second();
        let want = plan::plan(&policies, &nodes, now);
        self.set_metrics(&want);

        // Keys first: no node is told to use a Secret that does not exist yet.
        let secrets = Api::<Secret>::namespaced(self.client.clone(), &self.keys_namespace);
        // One list of a namespace holding a few Secrets (metadata only); it also finds the
        // keys of policies deleted while no operator ran.
        let lp = ListParams::default().labels(IPSEC_KEY_LABEL);
        let listed = secrets.list_metadata(&lp).await?.items;
        self.make_keys(&secrets, &want.key_secrets, &listed).await?;

        let mut first_error: Option<kube::Error> = None;
        let api = Api::<NodeNetwork>::all(self.client.clone());
        for nn in networks.iter() {
            let name = nn.name_any();
            let Some(desired) = want.nodes.get(&name) else {
                continue;
            };
            if &nn.spec.encryption == desired {
                continue;
            }
            // Applying no `encryption` removes the fields this manager owned.
            let spec = match desired {
                Some(e) => json!({ "encryption": e }),
                None => json!({}),
            };
            let mut body = runtime::apply_body::<NodeNetwork>(&name, None, json!({ "spec": spec }));
            // Written only to NodeNetworks that exist: never create one (the nodes concern
            // owns their lifecycle).
            body["metadata"]["uid"] = json!(nn.uid());
            match runtime::apply(&api, &self.manager, &body).await {
                Ok(_) => {
                    self.metrics.node_writes.inc();
                    debug!(node = %name, selected = desired.is_some(), "NodeNetwork encryption written");
                }
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                Err(e) => {
                    warn!(node = %name, error = %e, "writing NodeNetwork encryption failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        if first_error.is_none()
            && let Err(e) = self.delete_old_keys(&secrets, &want, &listed).await
        {
            first_error.get_or_insert(e);
        }
        if let Err(e) = self.write_statuses(&want).await {
            first_error.get_or_insert(e);
        }
        if let Some(e) = first_error {
            return Err(e.into());
        }
        // Back when the next scheduled rotation is due, or a rotation under way stalls.
        let next = want
            .policies
            .values()
            .flat_map(|p| [p.next_rotation_in, p.rotation_stalls_in])
            .flatten()
            .min();
        Ok(match next {
            Some(s) => Action::requeue(Duration::from_secs(s.max(1) as u64)),
            None => Action::await_change(),
        })
    }

    /// Makes the key Secrets `wanted` that are not `listed`, each with a fresh random key.
    async fn make_keys(
        &self,
        secrets: &Api<Secret>,
        wanted: &[plan::KeySecret],
        listed: &[PartialObjectMeta<Secret>],
    ) -> Result<(), kube::Error> {
        let exists = |name: &str| listed.iter().any(|s| s.name_any() == name);
        for key in wanted.iter().filter(|k| !exists(&k.name)) {
            let mut material = vec![0u8; KEY_BYTES];
            rand::rng().fill_bytes(&mut material);
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(key.name.clone()),
                    labels: Some(BTreeMap::from([(IPSEC_KEY_LABEL.into(), "true".into())])),
                    annotations: Some(BTreeMap::from([
                        (KEY_POLICY.into(), key.policy.clone()),
                        (KEY_EPOCH.into(), key.epoch.to_string()),
                    ])),
                    ..Default::default()
                },
                type_: Some("Opaque".into()),
                data: Some(BTreeMap::from([
                    ("key".into(), ByteString(material)),
                    (
                        "algorithm".into(),
                        ByteString(key.algorithm.clone().into_bytes()),
                    ),
                    (
                        "keyBits".into(),
                        ByteString(key.key_bits.to_string().into_bytes()),
                    ),
                ])),
                ..Default::default()
            };
            match secrets.create(&PostParams::default(), &secret).await {
                Ok(_) => {
                    self.metrics.key_secrets_made.inc();
                    info!(policy = %key.policy, epoch = key.epoch, secret = %key.name, "IPsec key made");
                }
                // Made meanwhile (by this concern in an earlier term): never overwritten.
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => {
                    warn!(secret = %key.name, namespace = %self.keys_namespace, error = %e, "making an IPsec key Secret failed");
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Deletes the key Secrets no node uses any more (those of invalid policies stay).
    async fn delete_old_keys(
        &self,
        secrets: &Api<Secret>,
        want: &Plan,
        listed: &[PartialObjectMeta<Secret>],
    ) -> Result<(), kube::Error> {
        let wanted = |name: &str| want.key_secrets.iter().any(|k| k.name == name);
        let kept = |s: &PartialObjectMeta<Secret>| {
            s.annotations()
                .get(KEY_POLICY)
                .is_some_and(|p| want.keep_keys_of.contains(p))
        };
        let mut left = 0;
        for old in listed.iter().filter(|s| !wanted(&s.name_any())) {
            if kept(old) {
                left += 1;
                continue;
            }
            match secrets
                .delete(&old.name_any(), &DeleteParams::default())
                .await
            {
                Ok(_) => info!(secret = %old.name_any(), "IPsec key no node uses any more deleted"),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        self.metrics
            .key_secrets
            .set((want.key_secrets.len() + left) as i64);
        Ok(())
    }

    fn set_metrics(&self, want: &Plan) {
        let policies = want.policies.values();
        self.metrics
            .selected_nodes
            .set(policies.clone().map(|p| p.nodes.len() as i64).sum());
        self.metrics
            .encrypted_nodes
            .set(policies.clone().map(|p| p.encrypted_nodes).sum());
        self.metrics
            .invalid_policies
            .set(policies.filter(|p| !p.valid.status).count() as i64);
    }

    async fn write_statuses(&self, want: &Plan) -> Result<(), kube::Error> {
        let api = Api::<EncryptionPolicy>::all(self.client.clone());
        let mut first_error = None;
        for (name, outcome) in &want.policies {
            let Some(policy) = self.stores.policies.get(&ObjectRef::new(name)) else {
                continue;
            };
            let status = policy.status.clone().unwrap_or_default();
            let rotated = status.key_epoch.is_some_and(|e| e < outcome.key_epoch);
            let started = outcome.next_key_epoch.is_some() && status.next_key_epoch.is_none();
            let last_rotation = outcome
                .last_rotation
                .and_then(|s| Timestamp::from_second(s).ok())
                .map(Time);
            let desired: Vec<_> = std::iter::once(&outcome.valid)
                .chain(outcome.ready.as_ref())
                .chain(outcome.rotation.as_ref())
                .collect();
            let current = desired
                .iter()
                .all(|d| conditions::is_current(&status.conditions, d, outcome.generation))
                && status.observed_generation == outcome.generation
                && status.encrypted_nodes == Some(outcome.encrypted_nodes)
                && status.key_epoch == Some(outcome.key_epoch)
                && status.next_key_epoch == outcome.next_key_epoch
                && status.nodes == outcome.nodes
                && status.rotation_request == outcome.served_request
                && status.last_key_rotation.as_ref().map(seconds) == outcome.last_rotation;
            if current {
                continue;
            }
            let now = Timestamp::now();
            let mut conds: BTreeMap<&str, serde_json::Value> = BTreeMap::new();
            // What an invalid policy does not compute stays as it was.
            for kept in [READY, plan::KEY_ROTATION] {
                if let Some(prev) = conditions::find(&status.conditions, kept) {
                    conds.insert(kept, serde_json::to_value(prev).unwrap_or_default());
                }
            }
            for d in desired {
                let merged = conditions::merge(
                    conditions::find(&status.conditions, &d.type_),
                    d,
                    outcome.generation,
                    now,
                );
                let key = [VALID, READY, plan::KEY_ROTATION]
                    .into_iter()
                    .find(|t| *t == d.type_)
                    .unwrap_or(READY);
                conds.insert(key, serde_json::to_value(merged).unwrap_or_default());
            }
            let body = runtime::apply_body::<EncryptionPolicy>(
                name,
                None,
                json!({"status": {
                    "conditions": conds.into_values().collect::<Vec<_>>(),
                    "observedGeneration": outcome.generation,
                    "encryptedNodes": outcome.encrypted_nodes,
                    "keyEpoch": outcome.key_epoch,
                    "nextKeyEpoch": outcome.next_key_epoch,
                    "lastKeyRotation": last_rotation,
                    "rotationRequest": outcome.served_request,
                    "nodes": outcome.nodes,
                }}),
            );
            match runtime::apply_status(&api, &self.manager, &body).await {
                Ok(_) => {
                    if started {
                        info!(policy = %name, epoch = ?outcome.next_key_epoch, "key rotation started: preparing");
                    }
                    if rotated {
                        self.metrics.rotations.inc();
                        info!(policy = %name, epoch = outcome.key_epoch, "key rotation switched");
                    }
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    warn!(policy = %name, error = %e, "writing the policy status failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Runs the encryption concern until `ctx.shutdown`.
pub async fn run(ctx: runtime::Context, config: EncryptionConfig) -> anyhow::Result<()> {
    let client = ctx.client.clone();
    let policies = ctx.caches.all::<EncryptionPolicy>();
    let nodes = ctx.caches.all::<Node>();
    let networks = ctx.caches.all::<NodeNetwork>();
    let stores = Stores {
        policies: policies.store(),
        nodes: nodes.store(),
        networks: networks.store(),
    };
    let changes = ChangeClock::new(
        Duration::from_millis(config.debounce_millis),
        Duration::from_millis(config.max_delay_millis),
    );
    let policy_changes = policies.trigger_on(|p: &EncryptionPolicy| {
        (
            p.metadata.generation,
            p.annotations().get(plan::ROTATION_REQUEST).cloned(),
        )
    });
    let node_changes = nodes.trigger_on(|n: &Node| n.labels().clone());
    // Addresses, pod CIDRs, what the agent published, and our own writes coming back (a
    // field edited by someone else is put back).
    // (As JSON: the CRD types are not `Hash`; one NodeNetwork per node, so cheap.)
    let network_changes = networks.trigger_on(|nn: &NodeNetwork| {
        serde_json::to_string(&(
            &nn.spec,
            nn.status.as_ref().and_then(|s| s.encryption.as_ref()),
        ))
        .unwrap_or_default()
    });
    let controller = singleton::controller(NAME, stores.clone().listed())
        .watches_stream(policy_changes, singleton::on_change(NAME, Some(&changes)))
        .watches_stream(node_changes, singleton::on_change(NAME, Some(&changes)))
        .watches_stream(network_changes, singleton::on_change(NAME, Some(&changes)));
    let reconciler = Encryption {
        client,
        stores,
        changes,
        metrics: Metrics::new(&ctx.metrics),
        manager: runtime::field_manager(NAME),
        keys_namespace: config.ipsec_keys_namespace.clone(),
    };
    runtime::run(controller, reconciler, &ctx).await;
    Ok(())
}
