//! The encryption concern's pure planning: `EncryptionPolicy`s and the nodes (labels,
//! address, pod CIDRs, what their agents published) → each node's
//! `NodeNetwork.spec.encryption` and each policy's status. Values in, values out.
//!
//! A node is selected by at most one policy: when several select it, the oldest policy
//! (then the first by name) has it, and the others say so in their `Ready` condition.
//! Peers are every other selected node of the same policy with an address; a peer whose
//! agent has not published a public key yet is listed without one (its agent holds its
//! traffic back instead of sending it in clear, see the agent's strict mode).
//!
//! Rotation, in two phases so that no packet is lost: when `keyRotationIntervalSeconds` has
//! passed since the last rotation, or the annotation [`ROTATION_REQUEST`] takes a new value,
//! the policy's `status.nextKeyEpoch` is set to `keyEpoch + 1` (prepare): every selected
//! node's agent makes its next key pair, publishes the public key as `nextPublicKey`, and
//! configures its standby device with the peers' next keys (listed as `nextPublicKey` in
//! its spec) while it still sends with the current ones. Once every selected node reports
//! that generation prepared (`preparedKeyEpoch`), `keyEpoch` becomes it (switch): each
//! agent moves its traffic to the standby device, whose peers already know its key, and
//! keeps the old device answering for a grace period. A rotation asked for while one is
//! under way starts when it completes. While one is under way the condition `KeyRotation`
//! says which nodes have not prepared yet; after [`ROTATION_STALL_SECONDS`] it turns
//! `False`/`Stalled` (a node whose agent is down holds every rotation back, and traffic
//! keeps the current keys meanwhile).
//!
//! IPsec uses the same two phases with a key per generation: the operator makes a `Secret`
//! with a fresh random key for each generation ([`KeySecret`]; SPI [`spi_of`] the
//! generation). Prepare: agents install the next generation's security associations beside
//! the current ones and report it prepared; switch: they send with the new SPI, and remove
//! the old associations after a grace period. Only nodes whose kernel can do ESP take part;
//! the others make the policy `Unsupported`.

use crate::policy::selector::Selector;
use std::collections::BTreeMap;
use std::net::IpAddr;
use tendril_crds::v1alpha1::{
    EncryptionNodeState, EncryptionPeer, EncryptionPolicySpec, NodeEncryption, NodeEncryptionStatus,
};
use tendril_runtime::DesiredCondition;
use tendril_runtime::conditions::{READY, VALID};

/// Annotation on an `EncryptionPolicy`: a new value rotates the keys now.
pub const ROTATION_REQUEST: &str = "tendril.dev/rotation-request";
pub const WIREGUARD: &str = "WireGuard";
pub const IPSEC: &str = "IPsec";
const DEFAULT_LISTEN_PORT: i32 = 51871;
/// `unselectedNodes` that leaves unselected nodes' traffic in clear.
pub const UNSELECTED_CLEAR: &str = "Clear";
/// The IPsec algorithm of a policy that names none.
pub const DEFAULT_IPSEC_ALGORITHM: &str = "rfc4106(gcm(aes))";
/// The condition on a WireGuard policy that tells how its key rotation stands.
pub const KEY_ROTATION: &str = "KeyRotation";
/// How long a rotation may wait for every node to prepare before `KeyRotation` says
/// `Stalled` (an agent makes and publishes its next key within a second or two).
pub const ROTATION_STALL_SECONDS: i64 = 300;

/// What the plan reads of a policy.
#[derive(Clone, Debug, Default)]
pub struct PolicyInput {
    pub name: String,
    pub generation: Option<i64>,
    /// Seconds since the epoch of its creation (older policies win a node).
    pub created: i64,
    pub spec: EncryptionPolicySpec,
    /// `status.keyEpoch` and `status.nextKeyEpoch` (a rotation under way), and when the
    /// last rotation started (seconds since the epoch).
    pub key_epoch: Option<i64>,
    pub next_key_epoch: Option<i64>,
    pub last_rotation: Option<i64>,
    /// The [`ROTATION_REQUEST`] annotation, and the value already served.
    pub rotation_request: Option<String>,
    pub served_request: Option<String>,
}

/// What the plan reads of a node (its `Node` labels, its `NodeNetwork`).
#[derive(Clone, Debug, Default)]
pub struct NodeInput {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The node's first InternalIP (IPv4 first).
    pub address: Option<IpAddr>,
    pub pod_cidrs: Vec<String>,
    /// `NodeNetwork.status.encryption`, as its agent wrote it.
    pub reported: Option<NodeEncryptionStatus>,
}

/// One policy's outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyOutcome {
    pub generation: Option<i64>,
    pub valid: DesiredCondition,
    /// `None` while the policy is invalid (the nodes keep what they had).
    pub ready: Option<DesiredCondition>,
    pub encrypted_nodes: i64,
    pub nodes: Vec<EncryptionNodeState>,
    pub key_epoch: i64,
    /// The generation being prepared while a rotation is under way.
    pub next_key_epoch: Option<i64>,
    /// When the last rotation started (seconds since the epoch), if ever.
    pub last_rotation: Option<i64>,
    pub served_request: Option<String>,
    /// Seconds until the next scheduled rotation.
    pub next_rotation_in: Option<i64>,
    /// `KeyRotation`.
    pub rotation: Option<DesiredCondition>,
    /// Seconds until the rotation under way counts as stalled.
    pub rotation_stalls_in: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Every node's `spec.encryption` (`None`: not selected, the field is removed). Nodes
    /// of an invalid policy are left out: they keep what they had.
    pub nodes: BTreeMap<String, Option<NodeEncryption>>,
    pub policies: BTreeMap<String, PolicyOutcome>,
    /// The IPsec key Secrets that must exist (made once, never rewritten); every other
    /// key Secret is deleted, but those of `keep_keys_of`.
    pub key_secrets: Vec<KeySecret>,
    /// Invalid IPsec policies: their nodes keep what they had, so do their key Secrets.
    pub keep_keys_of: Vec<String>,
}

/// An IPsec key of one policy and generation, held in a `Secret` the operator makes with a
/// fresh random key; agents derive a key per direction and node pair from it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeySecret {
    pub policy: String,
    pub epoch: i64,
    pub name: String,
    /// The policy's `ipsec.algorithm` and `ipsec.keyBits` (defaults when unset).
    pub algorithm: String,
    pub key_bits: i32,
}

/// The security parameter index of key generation `epoch`: 1 to 15, round and round (the
/// agent tells generations apart by SPI, and two are in use at most at once).
pub fn spi_of(epoch: i64) -> u8 {
    ((epoch - 1).rem_euclid(15) + 1) as u8
}

/// The name of the `Secret` holding `policy`'s IPsec key of generation `epoch`.
pub fn key_secret_name(policy: &str, epoch: i64) -> String {
    // Secret names are DNS subdomains of at most 253 characters.
    let policy: String = policy.chars().take(200).collect();
    format!("tendril-ipsec-{policy}-{epoch}")
}

/// Whether `node` takes part in a policy's key generations: it has an address and, for
/// IPsec, a kernel that can do ESP (the others are `Unsupported` and never prepare).
fn takes_part(node: &NodeInput, wireguard: bool) -> bool {
    node.address.is_some()
        && (wireguard
            || node
                .reported
                .as_ref()
                .is_some_and(|r| r.ipsec_supported == Some(true)))
}

fn validate(spec: &EncryptionPolicySpec) -> Result<Selector, String> {
    if spec.mode != WIREGUARD && spec.mode != IPSEC {
        return Err(format!(
            "mode {:?} is neither WireGuard nor IPsec",
            spec.mode
        ));
    }
    if spec.key_rotation_interval_seconds < 60 {
        return Err(format!(
            "keyRotationIntervalSeconds {} is below 60",
            spec.key_rotation_interval_seconds
        ));
    }
    if let Some(i) = spec.ipsec.as_ref().filter(|_| spec.mode == IPSEC)
        && !i.algorithm.is_empty()
        && i.algorithm != DEFAULT_IPSEC_ALGORITHM
    {
        return Err(format!(
            "ipsec.algorithm {} is not implemented by Tendril's agents yet; use {DEFAULT_IPSEC_ALGORITHM}",
            i.algorithm
        ));
    }
    if let Some(w) = &spec.wireguard
        && !(1..=65535).contains(&w.listen_port)
    {
        return Err(format!(
            "wireguard.listenPort {} is not a port (1-65535)",
            w.listen_port
        ));
    }
    let everything = Default::default();
    Selector::compile(
        spec.node_selector.as_ref().unwrap_or(&everything),
        str::to_string,
    )
    .map_err(|e| format!("nodeSelector: {e}"))
}

/// The allowed IPs of a peer: its pod CIDRs (native routing) and its own address (the
/// overlay's outer packets), canonical and sorted.
fn allowed_ips(node: &NodeInput) -> Vec<String> {
    let mut out: Vec<String> = node
        .pod_cidrs
        .iter()
        .filter_map(|c| c.parse::<ipnet::IpNet>().ok())
        .map(|n| n.trunc().to_string())
        .collect();
    if let Some(a) = node.address {
        out.push(ipnet::IpNet::from(a).to_string());
    }
    out.sort();
    out.dedup();
    out
}

/// Where a policy's rotation stands after this reconcile.
#[derive(Clone, Debug, PartialEq)]
struct Rotation {
    /// The generation in use, and the one being prepared.
    active: i64,
    next: Option<i64>,
    last: Option<i64>,
    served: Option<String>,
    /// Seconds until the next scheduled rotation (while none is under way).
    next_in: Option<i64>,
}

/// Completes the rotation under way when every member has prepared its generation
/// (`prepared(n)`), and starts one when it is due and every member uses the generation in
/// use (`settled(active)`: the standby devices are free again).
fn rotation(
    p: &PolicyInput,
    now: i64,
    prepared: impl Fn(i64) -> bool,
    settled: impl Fn(i64) -> bool,
) -> Rotation {
    let interval = p.spec.key_rotation_interval_seconds.max(60);
    let mut r = Rotation {
        active: p.key_epoch.unwrap_or(1),
        next: p.next_key_epoch.filter(|n| Some(*n) > p.key_epoch),
        last: p.last_rotation,
        served: p.served_request.clone(),
        next_in: None,
    };
    if let Some(n) = r.next
        && prepared(n)
    {
        r.active = n;
        r.next = None;
    }
    if r.next.is_none() {
        let since = r.last.unwrap_or(p.created);
        let requested = p.rotation_request.is_some() && p.rotation_request != p.served_request;
        let due = requested || now - since >= interval;
        if p.key_epoch.is_some() && due && settled(r.active) {
            r.next = Some(r.active + 1);
            r.last = Some(now);
            if requested {
                r.served = p.rotation_request.clone();
            }
        } else if !due {
            r.next_in = Some((interval - (now - since).max(0)).max(1));
        }
    }
    r
}

/// The public key a node published for generation `epoch`: the one in use or the next
/// one. For the generation in use, an agent still on an older key gives that one (its
/// peers keep reaching it while it catches up).
fn key_of(node: &NodeInput, epoch: i64, in_use: bool) -> Option<String> {
    let r = node.reported.as_ref()?;
    if r.key_epoch == Some(epoch) {
        r.public_key.clone()
    } else if r.next_key_epoch == Some(epoch) {
        r.next_public_key.clone()
    } else if in_use && r.key_epoch.unwrap_or(0) < epoch {
        r.public_key.clone()
    } else {
        None
    }
}

/// Whether a node can switch to generation `n`: it uses it already, or its standby device
/// holds every peer's key of it.
fn prepared(node: &NodeInput, n: i64) -> bool {
    node.reported
        .as_ref()
        .is_some_and(|r| r.key_epoch.unwrap_or(0) >= n || r.prepared_key_epoch.unwrap_or(0) >= n)
}

/// Whether a node realizes the policy, and why not.
fn node_state(policy: &PolicyInput, node: &NodeInput, epoch: i64) -> EncryptionNodeState {
    let state = |ready, reason: &str, message: Option<String>| EncryptionNodeState {
        name: node.name.clone(),
        ready,
        reason: reason.into(),
        message,
    };
    if node.address.is_none() {
        return state(
            false,
            "NoAddress",
            Some("the node has no InternalIP".into()),
        );
    }
    let Some(r) = &node.reported else {
        return state(
            false,
            "NotReported",
            Some("its agent reported nothing yet".into()),
        );
    };
    if policy.spec.mode == IPSEC {
        if r.ipsec_supported != Some(true) {
            let why = r
                .ipsec_unsupported_reason
                .clone()
                .unwrap_or_else(|| "the kernel cannot do ESP".into());
            return state(false, "Unsupported", Some(why));
        }
    } else if r.public_key.is_none() {
        return state(false, "NoKey", Some("no public key published yet".into()));
    }
    if r.key_epoch.unwrap_or(0) < epoch {
        return state(
            false,
            "KeyOutdated",
            Some(format!(
                "key generation {} of {epoch}",
                r.key_epoch.unwrap_or(0)
            )),
        );
    }
    if !r.ready {
        return state(false, "NotRealized", r.message.clone());
    }
    state(true, "Ready", None)
}

/// Everything the concern writes, for the time `now` (seconds since the epoch).
pub fn plan(policies: &[PolicyInput], nodes: &[NodeInput], now: i64) -> Plan {
    let mut out = Plan::default();
    let mut order: Vec<&PolicyInput> = policies.iter().collect();
    order.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    // node → the policy that has it (the first valid one in `order` that selects it).
    let mut owner: BTreeMap<&str, &str> = BTreeMap::new();
    let mut invalid: BTreeMap<&str, String> = BTreeMap::new();
    let mut selected: BTreeMap<&str, Vec<&NodeInput>> = BTreeMap::new();
    let mut lost: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
    for p in &order {
        let selector = match validate(&p.spec) {
            Ok(s) => s,
            Err(e) => {
                invalid.insert(&p.name, e);
                continue;
            }
        };
        for n in nodes.iter().filter(|n| selector.matches(&n.labels)) {
            match owner.get(n.name.as_str()) {
                Some(first) => lost.entry(&p.name).or_default().push((&n.name, first)),
                None => {
                    owner.insert(&n.name, &p.name);
                    selected.entry(&p.name).or_default().push(n);
                }
            }
        }
    }
    // The nodes no policy selects but that run an agent encrypt to the nodes of the oldest
    // valid policy that asks for it (`unselectedNodes: Encrypt`), and those to them.
    let mut associates: BTreeMap<&str, Vec<&NodeInput>> = BTreeMap::new();
    if let Some(p) = order.iter().find(|p| {
        !invalid.contains_key(p.name.as_str())
            && p.spec.unselected_nodes != UNSELECTED_CLEAR
            && selected.contains_key(p.name.as_str())
    }) {
        let unowned: Vec<&NodeInput> = nodes
            .iter()
            .filter(|n| !owner.contains_key(n.name.as_str()) && n.reported.is_some())
            .collect();
        for n in &unowned {
            owner.insert(&n.name, &p.name);
        }
        associates.insert(&p.name, unowned);
    }
    // A node of an invalid policy keeps what it has: it is neither written nor cleared,
    // unless a valid policy has it now.
    if invalid.is_empty() {
        for n in nodes
            .iter()
            .filter(|n| !owner.contains_key(n.name.as_str()))
        {
            out.nodes.insert(n.name.clone(), None);
        }
    }
    for p in &order {
        if let Some(message) = invalid.get(p.name.as_str()) {
            if p.spec.mode == IPSEC {
                out.keep_keys_of.push(p.name.clone());
            }
            out.policies.insert(
                p.name.clone(),
                PolicyOutcome {
                    generation: p.generation,
                    valid: DesiredCondition::new(VALID, false, "InvalidSpec", message.clone()),
                    ready: None,
                    encrypted_nodes: 0,
                    nodes: Vec::new(),
                    key_epoch: p.key_epoch.unwrap_or(1),
                    next_key_epoch: p.next_key_epoch,
                    last_rotation: p.last_rotation,
                    served_request: p.served_request.clone(),
                    next_rotation_in: None,
                    rotation: None,
                    rotation_stalls_in: None,
                },
            );
            continue;
        }
        let members = selected.get(p.name.as_str()).cloned().unwrap_or_default();
        let associated = associates.get(p.name.as_str()).cloned().unwrap_or_default();
        // Everyone that encrypts with this policy's keys: its nodes and its associates.
        let everyone: Vec<&NodeInput> = members.iter().chain(&associated).copied().collect();
        let wg = p.spec.mode == WIREGUARD;
        let addressed = || everyone.iter().filter(|m| takes_part(m, wg));
        let rot = rotation(
            p,
            now,
            |n| addressed().all(|m| prepared(m, n)),
            |a| {
                addressed().all(|m| {
                    m.reported
                        .as_ref()
                        .is_some_and(|r| r.key_epoch.unwrap_or(0) >= a)
                })
            },
        );
        let epoch = rot.active;
        if !wg {
            // The key in use, the one being prepared, and the previous one while a node
            // still uses it (an agent that restarts then can install it again).
            let behind = addressed().any(|m| {
                m.reported
                    .as_ref()
                    .is_some_and(|r| r.key_epoch.unwrap_or(0) < epoch)
            });
            let first = if behind && epoch > 1 {
                epoch - 1
            } else {
                epoch
            };
            let settings = p.spec.ipsec.clone().unwrap_or_default();
            for e in first..=rot.next.unwrap_or(epoch) {
                out.key_secrets.push(KeySecret {
                    policy: p.name.clone(),
                    epoch: e,
                    name: key_secret_name(&p.name, e),
                    algorithm: Some(settings.algorithm.clone())
                        .filter(|a| !a.is_empty())
                        .unwrap_or_else(|| DEFAULT_IPSEC_ALGORITHM.into()),
                    key_bits: if settings.key_bits == 0 {
                        128
                    } else {
                        settings.key_bits
                    },
                });
            }
        }
        let (key_rotation, rotation_stalls_in) = match rot.next {
            Some(n) => {
                let waiting: Vec<&str> = addressed()
                    .filter(|m| !prepared(m, n))
                    .map(|m| m.name.as_str())
                    .collect();
                let (condition, stalls_in) =
                    rotation_condition(n, &waiting, now - rot.last.unwrap_or(now));
                (Some(condition), stalls_in)
            }
            None => (
                Some(DesiredCondition::new(
                    KEY_ROTATION,
                    true,
                    "Idle",
                    format!("generation {epoch} in use; no rotation under way"),
                )),
                None,
            ),
        };
        let wireguard = p.spec.wireguard.clone().unwrap_or_default();
        let listen_port = if p.spec.wireguard.is_some() {
            wireguard.listen_port
        } else {
            DEFAULT_LISTEN_PORT
        };
        for n in &everyone {
            // An associate's peers are the selected nodes only: two unselected nodes talk
            // in clear.
            let is_member = members.iter().any(|m| m.name == n.name);
            let mut peers: Vec<EncryptionPeer> = (if is_member { &everyone } else { &members })
                .iter()
                .filter(|m| m.name != n.name)
                .filter_map(|m| {
                    Some(EncryptionPeer {
                        node: m.name.clone(),
                        address: m.address?.to_string(),
                        allowed_ips: allowed_ips(m),
                        public_key: wg.then(|| key_of(m, epoch, true)).flatten(),
                        next_public_key: wg.then(|| key_of(m, rot.next?, false)).flatten(),
                    })
                })
                .collect();
            peers.sort();
            out.nodes.insert(
                n.name.clone(),
                Some(NodeEncryption {
                    mode: p.spec.mode.clone(),
                    policy: Some(p.name.clone()),
                    wireguard_public_key: wg.then(|| key_of(n, epoch, true)).flatten(),
                    spi: (!wg).then(|| spi_of(epoch)),
                    key_secret: (!wg).then(|| key_secret_name(&p.name, epoch)),
                    next_spi: rot.next.filter(|_| !wg).map(spi_of),
                    next_key_secret: rot
                        .next
                        .filter(|_| !wg)
                        .map(|e| key_secret_name(&p.name, e)),
                    key_epoch: Some(epoch),
                    next_key_epoch: rot.next,
                    listen_port: wg.then_some(listen_port),
                    persistent_keepalive_seconds: wg
                        .then_some(wireguard.persistent_keepalive_seconds),
                    peers,
                }),
            );
        }
        let states: Vec<EncryptionNodeState> =
            everyone.iter().map(|n| node_state(p, n, epoch)).collect();
        let encrypted = states.iter().filter(|s| s.ready).count() as i64;
        let ready = ready_condition(&p.spec.mode, &states, lost.get(p.name.as_str()));
        out.policies.insert(
            p.name.clone(),
            PolicyOutcome {
                generation: p.generation,
                valid: DesiredCondition::new(VALID, true, "Valid", String::new()),
                ready: Some(ready),
                encrypted_nodes: encrypted,
                nodes: states,
                key_epoch: epoch,
                next_key_epoch: rot.next,
                last_rotation: rot.last,
                served_request: rot.served,
                next_rotation_in: rot.next_in,
                rotation: key_rotation,
                rotation_stalls_in,
            },
        );
    }
    out
}

/// `KeyRotation` while generation `next` is being prepared, `elapsed` seconds after the
/// rotation started, with the nodes that have not prepared it (`waiting`); and the seconds
/// until it counts as stalled. The message changes only when the waiting nodes do.
fn rotation_condition(
    next: i64,
    waiting: &[&str],
    elapsed: i64,
) -> (DesiredCondition, Option<i64>) {
    let who = if waiting.is_empty() {
        "every node has prepared it".to_string()
    } else {
        format!("waiting for {} to prepare it", waiting.join(", "))
    };
    if elapsed >= ROTATION_STALL_SECONDS {
        (
            DesiredCondition::new(
                KEY_ROTATION,
                false,
                "Stalled",
                format!(
                    "rotation to generation {next} under way for more than {ROTATION_STALL_SECONDS} s; {who} (its agent may be down); traffic keeps the current keys"
                ),
            ),
            None,
        )
    } else {
        (
            DesiredCondition::new(
                KEY_ROTATION,
                true,
                "InProgress",
                format!("rotating to generation {next}; {who}"),
            ),
            Some(ROTATION_STALL_SECONDS - elapsed.max(0)),
        )
    }
}

/// `Ready`: every selected node encrypts; otherwise the first reason that applies, with
/// the nodes it applies to (`Unsupported` first: it never resolves by waiting).
fn ready_condition(
    mode: &str,
    states: &[EncryptionNodeState],
    lost: Option<&Vec<(&str, &str)>>,
) -> DesiredCondition {
    let not_ready: Vec<&EncryptionNodeState> = states.iter().filter(|s| !s.ready).collect();
    let unsupported: Vec<String> = not_ready
        .iter()
        .filter(|s| s.reason == "Unsupported")
        .map(|s| {
            format!(
                "{}: {}",
                s.name,
                s.message.as_deref().unwrap_or("unsupported")
            )
        })
        .collect();
    if !unsupported.is_empty() {
        return DesiredCondition::new(
            READY,
            false,
            "Unsupported",
            format!("{mode} cannot be used on {}", unsupported.join("; ")),
        );
    }
    if let Some(first) = not_ready.first() {
        let names: Vec<&str> = not_ready.iter().map(|s| s.name.as_str()).collect();
        return DesiredCondition::new(
            READY,
            false,
            "NodesNotReady",
            format!(
                "{} of {} nodes not encrypting ({}); {}: {}",
                not_ready.len(),
                states.len(),
                names.join(", "),
                first.name,
                first.message.as_deref().unwrap_or(&first.reason)
            ),
        );
    }
    if let Some(lost) = lost.filter(|l| !l.is_empty()) {
        let taken: Vec<String> = lost
            .iter()
            .map(|(node, by)| format!("{node} (by {by})"))
            .collect();
        return DesiredCondition::new(
            READY,
            false,
            "NodesTaken",
            format!(
                "selected nodes belong to older policies: {}",
                taken.join(", ")
            ),
        );
    }
    if states.is_empty() {
        return DesiredCondition::new(READY, false, "NoNodes", "the policy selects no node");
    }
    DesiredCondition::new(
        READY,
        true,
        "Encrypted",
        format!("{} nodes encrypt their pod traffic", states.len()),
    )
}
