//! The real 1.36 apiserver accepts every Tendril CRD manifest (structural schemas, CEL rules
//! within the cost budget), accepts the example object of every kind, and refuses bad objects
//! with the message a user sees.
//!
//! Objects that need not persist are sent as server-side dry runs (full validation,
//! defaulting and strict field checking, nothing stored), so the operators other tests run on
//! the shared plane never see them. Only the immutability checks create real objects, whose
//! selectors match nothing.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::wait::conditions;
use serde_json::{Value, json};
use tendril_crds::v1alpha1::*;
use tendril_e2e::{FIELD_MANAGER, TestEnv, repo_root, wait_for};

const TIMEOUT: Duration = Duration::from_secs(60);

/// The example of every kind, as committed under `crds/examples/`.
const EXAMPLES: [&str; 14] = [
    include_str!("../../crds/examples/podippool.yaml"),
    include_str!("../../crds/examples/loadbalancerippool.yaml"),
    include_str!("../../crds/examples/networkpolicy.yaml"),
    include_str!("../../crds/examples/clusternetworkpolicy.yaml"),
    include_str!("../../crds/examples/bgppeeringpolicy.yaml"),
    include_str!("../../crds/examples/egressgatewaypolicy.yaml"),
    include_str!("../../crds/examples/encryptionpolicy.yaml"),
    include_str!("../../crds/examples/nodenetwork.yaml"),
    include_str!("../../crds/examples/endpoint.yaml"),
    include_str!("../../crds/examples/identity.yaml"),
    include_str!("../../crds/examples/resolvedpolicy.yaml"),
    include_str!("../../crds/examples/lbservice.yaml"),
    include_str!("../../crds/examples/bgpnodeconfig.yaml"),
    include_str!("../../crds/examples/egressroute.yaml"),
];

/// The API resource of a kind and whether it is namespaced.
fn resource(kind: &str) -> (ApiResource, bool) {
    match kind {
        "PodIPPool" => (ApiResource::erase::<PodIPPool>(&()), false),
        "LoadBalancerIPPool" => (ApiResource::erase::<LoadBalancerIPPool>(&()), false),
        "NetworkPolicy" => (ApiResource::erase::<NetworkPolicy>(&()), true),
        "ClusterNetworkPolicy" => (ApiResource::erase::<ClusterNetworkPolicy>(&()), false),
        "BGPPeeringPolicy" => (ApiResource::erase::<BGPPeeringPolicy>(&()), false),
        "EgressGatewayPolicy" => (ApiResource::erase::<EgressGatewayPolicy>(&()), false),
        "EncryptionPolicy" => (ApiResource::erase::<EncryptionPolicy>(&()), false),
        "NodeNetwork" => (ApiResource::erase::<NodeNetwork>(&()), false),
        "Endpoint" => (ApiResource::erase::<Endpoint>(&()), true),
        "Identity" => (ApiResource::erase::<Identity>(&()), false),
        "ResolvedPolicy" => (ApiResource::erase::<ResolvedPolicy>(&()), false),
        "LBService" => (ApiResource::erase::<LBService>(&()), true),
        "BGPNodeConfig" => (ApiResource::erase::<BGPNodeConfig>(&()), false),
        "EgressRoute" => (ApiResource::erase::<EgressRoute>(&()), false),
        other => panic!("no example kind {other}"),
    }
}

/// The example of `kind` as JSON, renamed to `name` (Identity and ResolvedPolicy keep theirs:
/// it must equal the id).
fn example(kind: &str, name: &str) -> Value {
    let mut value = EXAMPLES
        .iter()
        .map(|y| serde_saphyr::from_str::<Value>(y).expect("examples parse"))
        .find(|v| v["kind"] == kind)
        .unwrap_or_else(|| panic!("no example of {kind}"));
    if !matches!(kind, "Identity" | "ResolvedPolicy") {
        value["metadata"]["name"] = json!(name);
    }
    value
}

/// Sets the value at a JSON pointer, creating missing objects on the way.
fn set(value: &mut Value, pointer: &str, new: Value) {
    let mut cur = value;
    for token in pointer.trim_start_matches('/').split('/') {
        cur = match cur {
            Value::Array(items) => &mut items[token.parse::<usize>().expect("array index")],
            other => {
                if !other.is_object() {
                    *other = json!({});
                }
                other
                    .as_object_mut()
                    .expect("object")
                    .entry(token)
                    .or_insert(Value::Null)
            }
        };
    }
    *cur = new;
}

fn remove(value: &mut Value, pointer: &str) {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer with a parent");
    value
        .pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .expect("parent object")
        .remove(key);
}

/// Server-side applies `obj` (strict field validation; a dry run unless `persist`).
async fn apply(env: &TestEnv, obj: &Value, persist: bool) -> kube::Result<DynamicObject> {
    let kind = obj["kind"].as_str().expect("kind");
    let name = obj["metadata"]["name"].as_str().expect("name");
    let (ar, namespaced) = resource(kind);
    let mut obj = obj.clone();
    let api: Api<DynamicObject> = if namespaced {
        set(&mut obj, "/metadata/namespace", json!(env.namespace()));
        Api::namespaced_with(env.client(), env.namespace(), &ar)
    } else {
        Api::all_with(env.client(), &ar)
    };
    let mut params = PatchParams::apply(FIELD_MANAGER)
        .force()
        .validation_strict();
    if !persist {
        params = params.dry_run();
    }
    api.patch(name, &params, &Patch::Apply(&obj)).await
}

/// Expects the apiserver to refuse `obj` as invalid with every `expected` fragment in the
/// message; returns a description of the mismatch otherwise.
async fn expect_refused(
    env: &TestEnv,
    case: &str,
    obj: &Value,
    expected: &[&str],
) -> Option<String> {
    match apply(env, obj, false).await {
        Ok(_) => Some(format!(
            "{case}: accepted, expected refusal with {expected:?}"
        )),
        Err(kube::Error::Api(status)) => {
            let missing: Vec<&&str> = expected
                .iter()
                .filter(|e| !status.message.contains(**e))
                .collect();
            if status.code != 422 || !missing.is_empty() {
                Some(format!(
                    "{case}: refused with {} {:?}, missing {missing:?}",
                    status.code, status.message
                ))
            } else {
                None
            }
        }
        Err(e) => Some(format!("{case}: request failed: {e}")),
    }
}

#[tokio::test]
async fn every_manifest_is_established_and_in_the_tendril_category() -> Result<()> {
    let env = TestEnv::new().await?;
    // What a user runs: kustomize over crds/ renders every manifest.
    let crds_dir = repo_root().join("crds");
    let out = env
        .plane()
        .kubectl([
            "apply",
            "--server-side",
            "--force-conflicts",
            "-k",
            crds_dir.to_str().context("crds path")?,
        ])
        .await?;
    let applied = out.lines().filter(|l| l.contains(".tendril.dev")).count();
    assert_eq!(applied, 14, "kubectl apply -k crds/ output:\n{out}");

    let api: Api<CustomResourceDefinition> = env.cluster_api();
    let mut names = Vec::new();
    for crd in tendril_crds::all_crds() {
        let name = crd.metadata.name.clone().context("CRD name")?;
        let served = wait_for(&api, &name, conditions::is_crd_established(), TIMEOUT)
            .await?
            .context("established CRD")?;
        // The served definition is the generated one (no drift between types and cluster).
        assert_eq!(served.spec.names.short_names, crd.spec.names.short_names);
        assert_eq!(
            served.spec.versions[0].schema, crd.spec.versions[0].schema,
            "{name}"
        );
        names.push(name);
    }
    assert_eq!(names.len(), 14);

    let listed = env
        .plane()
        .kubectl(["api-resources", "--categories=tendril", "-o", "name"])
        .await?;
    for name in &names {
        assert!(
            listed.lines().any(|l| l == name),
            "{name} missing from:\n{listed}"
        );
    }
    // `kubectl get tendril` resolves every kind through the category.
    env.plane().kubectl(["get", "tendril", "-A"]).await?;
    Ok(())
}

#[tokio::test]
async fn the_example_of_every_kind_is_accepted_and_defaulted() -> Result<()> {
    let env = TestEnv::new().await?;
    let name = env.unique_name("ex");
    let mut kinds = Vec::new();
    for yaml in EXAMPLES {
        let doc: Value = serde_saphyr::from_str(yaml)?;
        let kind = doc["kind"].as_str().context("kind")?.to_string();
        let obj = example(&kind, &name);
        let stored = apply(&env, &obj, false)
            .await
            .with_context(|| format!("the {kind} example must be accepted"))?;
        assert_eq!(
            stored.types.as_ref().map(|t| t.kind.as_str()),
            Some(kind.as_str())
        );
        kinds.push(kind);
    }
    assert_eq!(kinds.len(), 14);

    // Schema defaults are applied by the apiserver and read back by the typed API.
    let stored = apply(&env, &example("BGPPeeringPolicy", &name), false).await?;
    let policy: BGPPeeringPolicy = serde_json::from_value(serde_json::to_value(&stored)?)?;
    let neighbor = &policy.spec.virtual_routers[0].neighbors[0];
    assert_eq!(
        (
            neighbor.peer_port,
            neighbor.ebgp_multihop_ttl,
            neighbor.connect_retry_time_seconds
        ),
        (179, 1, 120)
    );
    let stored = apply(&env, &example("NetworkPolicy", &name), false).await?;
    let policy: NetworkPolicy = serde_json::from_value(serde_json::to_value(&stored)?)?;
    assert_eq!(policy.spec.ingress[0].to_ports[0].ports[1].protocol, "ANY");
    Ok(())
}

/// One refusal case: the example of `kind`, changed by `edit`, must be refused with a
/// message holding every fragment of `expected`.
struct Case {
    name: &'static str,
    kind: &'static str,
    edit: fn(&mut Value),
    expected: &'static [&'static str],
}

fn cases() -> Vec<Case> {
    vec![
        // PodIPPool
        Case {
            name: "pool: bad CIDR",
            kind: "PodIPPool",
            edit: |v| set(v, "/spec/ipv4/cidrs", json!(["10.244.0.0/33"])),
            expected: &["spec.ipv4.cidrs", "every entry of cidrs must be a CIDR"],
        },
        Case {
            name: "pool: IPv6 CIDR under ipv4",
            kind: "PodIPPool",
            edit: |v| set(v, "/spec/ipv4/cidrs", json!(["fd00:1::/64"])),
            expected: &["ipv4.cidrs must hold IPv4 CIDRs only"],
        },
        Case {
            name: "pool: host bits set",
            kind: "PodIPPool",
            edit: |v| set(v, "/spec/ipv4/cidrs", json!(["10.244.1.0/16"])),
            expected: &["canonical form"],
        },
        Case {
            name: "pool: overlapping CIDRs",
            kind: "PodIPPool",
            edit: |v| {
                set(
                    v,
                    "/spec/ipv4/cidrs",
                    json!(["10.0.0.0/8", "10.244.0.0/16"]),
                )
            },
            expected: &["CIDRs of one pool must not repeat or overlap"],
        },
        Case {
            name: "pool: duplicate IPv6 CIDRs",
            kind: "PodIPPool",
            edit: |v| {
                set(
                    v,
                    "/spec/ipv6/cidrs",
                    json!(["fd00:10:244::/56", "fd00:10:244::/56"]),
                )
            },
            expected: &["must not repeat or overlap"],
        },
        Case {
            name: "pool: IPv4 mask size out of range",
            kind: "PodIPPool",
            edit: |v| set(v, "/spec/ipv4/maskSize", json!(31)),
            expected: &["spec.ipv4.maskSize", "less than or equal to 30"],
        },
        Case {
            name: "pool: IPv6 mask size out of range",
            kind: "PodIPPool",
            edit: |v| set(v, "/spec/ipv6/maskSize", json!(32)),
            expected: &["spec.ipv6.maskSize", "greater than or equal to 48"],
        },
        Case {
            name: "pool: node CIDR larger than the pool",
            kind: "PodIPPool",
            edit: |v| set(v, "/spec/ipv4/maskSize", json!(12)),
            expected: &["maskSize must be at least the prefix length of every CIDR"],
        },
        Case {
            name: "pool: no family",
            kind: "PodIPPool",
            edit: |v| set(v, "/spec", json!({})),
            expected: &["a pool needs at least one of ipv4 or ipv6"],
        },
        // LoadBalancerIPPool
        Case {
            name: "lb pool: cidr and range in one block",
            kind: "LoadBalancerIPPool",
            edit: |v| set(v, "/spec/blocks/0/start", json!("198.51.100.1")),
            expected: &["either a cidr or a start/stop range"],
        },
        Case {
            name: "lb pool: start without stop",
            kind: "LoadBalancerIPPool",
            edit: |v| remove(v, "/spec/blocks/1/stop"),
            expected: &["a range block needs both start and stop"],
        },
        Case {
            name: "lb pool: mixed families",
            kind: "LoadBalancerIPPool",
            edit: |v| set(v, "/spec/blocks/1/stop", json!("2001:db8::20")),
            expected: &["start and stop must be of the same IP family"],
        },
        Case {
            name: "lb pool: bad CIDR",
            kind: "LoadBalancerIPPool",
            edit: |v| set(v, "/spec/blocks/0/cidr", json!("198.51.100.0/40")),
            expected: &["cidr must be a CIDR"],
        },
        Case {
            name: "lb pool: overlapping blocks",
            kind: "LoadBalancerIPPool",
            edit: |v| set(v, "/spec/blocks/1", json!({"cidr": "198.51.100.128/25"})),
            expected: &["CIDR blocks of one pool must not repeat or overlap"],
        },
        // NetworkPolicy
        Case {
            name: "policy: both selectors",
            kind: "NetworkPolicy",
            edit: |v| set(v, "/spec/nodeSelector", json!({})),
            expected: &["set exactly one of endpointSelector (pods) or nodeSelector (hosts)"],
        },
        Case {
            name: "policy: unknown entity",
            kind: "NetworkPolicy",
            edit: |v| set(v, "/spec/ingressDeny/0/fromEntities", json!(["internet"])),
            expected: &["fromEntities entries must be one of host, remote-node, world"],
        },
        Case {
            name: "policy: unknown protocol",
            kind: "NetworkPolicy",
            edit: |v| {
                set(
                    v,
                    "/spec/ingress/0/toPorts/0/ports/0/protocol",
                    json!("ICMP"),
                )
            },
            expected: &[
                "Unsupported value: \"ICMP\"",
                "\"TCP\", \"UDP\", \"SCTP\", \"ANY\"",
            ],
        },
        Case {
            name: "policy: port out of range",
            kind: "NetworkPolicy",
            edit: |v| set(v, "/spec/ingress/0/toPorts/0/ports/0/port", json!("70000")),
            expected: &["port must be a number from 1 to 65535 or a port name"],
        },
        Case {
            name: "policy: endPort below port",
            kind: "NetworkPolicy",
            edit: |v| set(v, "/spec/egress/0/toPorts/0/ports/0/endPort", json!(5000)),
            expected: &["endPort needs a numeric port and must be at least port"],
        },
        Case {
            name: "policy: except outside its cidr",
            kind: "NetworkPolicy",
            edit: |v| {
                set(
                    v,
                    "/spec/ingress/1/fromCIDRSet/0/except",
                    json!(["192.168.0.0/16"]),
                )
            },
            expected: &["every except entry must lie inside cidr"],
        },
        // ClusterNetworkPolicy
        Case {
            name: "cluster policy: no selector",
            kind: "ClusterNetworkPolicy",
            edit: |v| remove(v, "/spec/nodeSelector"),
            expected: &["set exactly one of endpointSelector"],
        },
        Case {
            name: "cluster policy: bad fromCIDR",
            kind: "ClusterNetworkPolicy",
            edit: |v| set(v, "/spec/ingress/0/fromCIDR", json!(["192.0.2.300/24"])),
            expected: &["every fromCIDR entry must be a CIDR"],
        },
        // BGPPeeringPolicy
        Case {
            name: "bgp: local ASN above 4294967295",
            kind: "BGPPeeringPolicy",
            edit: |v| {
                set(
                    v,
                    "/spec/virtualRouters/0/localASN",
                    json!(4_294_967_296_i64),
                )
            },
            expected: &["localASN", "less than or equal to 4294967295"],
        },
        Case {
            name: "bgp: peer ASN 0",
            kind: "BGPPeeringPolicy",
            edit: |v| set(v, "/spec/virtualRouters/0/neighbors/0/peerASN", json!(0)),
            expected: &["peerASN", "greater than or equal to 1"],
        },
        Case {
            name: "bgp: keepalive not below hold time",
            kind: "BGPPeeringPolicy",
            edit: |v| {
                set(
                    v,
                    "/spec/virtualRouters/0/neighbors/0/keepAliveTimeSeconds",
                    json!(9),
                )
            },
            expected: &[
                "holdTimeSeconds must be 0 (no keepalives) or at least 3 × keepAliveTimeSeconds",
            ],
        },
        Case {
            name: "bgp: default hold time against a long keepalive",
            kind: "BGPPeeringPolicy",
            edit: |v| {
                remove(v, "/spec/virtualRouters/0/neighbors/0/holdTimeSeconds");
                set(
                    v,
                    "/spec/virtualRouters/0/neighbors/0/keepAliveTimeSeconds",
                    json!(120),
                );
            },
            expected: &[
                "holdTimeSeconds must be 0 (no keepalives) or at least 3 × keepAliveTimeSeconds",
            ],
        },
        Case {
            name: "bgp: peer address is a subnet",
            kind: "BGPPeeringPolicy",
            edit: |v| {
                set(
                    v,
                    "/spec/virtualRouters/0/neighbors/0/peerAddress",
                    json!("192.0.2.0/24"),
                )
            },
            expected: &["peerAddress must be an IP address or a /32 (/128) CIDR"],
        },
        Case {
            name: "bgp: hold time 2",
            kind: "BGPPeeringPolicy",
            edit: |v| {
                set(
                    v,
                    "/spec/virtualRouters/0/neighbors/0/holdTimeSeconds",
                    json!(2),
                )
            },
            expected: &["holdTimeSeconds must be 0 or at least 3"],
        },
        Case {
            name: "bgp: standard community value above 65535",
            kind: "BGPPeeringPolicy",
            edit: |v| {
                set(
                    v,
                    "/spec/virtualRouters/0/advertisements/0/communities/standard",
                    json!(["65000:70000"]),
                )
            },
            expected: &["standard communities are written ASN:value, both 0-65535"],
        },
        Case {
            name: "bgp: large community with two parts",
            kind: "BGPPeeringPolicy",
            edit: |v| {
                set(
                    v,
                    "/spec/virtualRouters/0/advertisements/0/communities/large",
                    json!(["65000:1"]),
                )
            },
            expected: &["large communities are written ASN:value:value"],
        },
        Case {
            name: "bgp: Service advertisement without addresses",
            kind: "BGPPeeringPolicy",
            edit: |v| remove(v, "/spec/virtualRouters/0/advertisements/0/addresses"),
            expected: &["a Service advertisement needs addresses"],
        },
        Case {
            name: "bgp: Service advertisement without selector",
            kind: "BGPPeeringPolicy",
            edit: |v| remove(v, "/spec/virtualRouters/0/advertisements/0/selector"),
            expected: &["a Service advertisement needs a selector ({} selects every Service)"],
        },
        Case {
            name: "bgp: PodCIDR advertisement with a selector",
            kind: "BGPPeeringPolicy",
            edit: |v| {
                set(
                    v,
                    "/spec/virtualRouters/0/advertisements/1/selector",
                    json!({}),
                )
            },
            expected: &["a PodCIDR advertisement takes no addresses or selector"],
        },
        // EgressGatewayPolicy
        Case {
            name: "egress: interface and egressIP",
            kind: "EgressGatewayPolicy",
            edit: |v| set(v, "/spec/egressGateway/interface", json!("eth1")),
            expected: &["set at most one of interface or egressIP"],
        },
        Case {
            name: "egress: bad destination",
            kind: "EgressGatewayPolicy",
            edit: |v| set(v, "/spec/destinationCIDRs", json!(["0.0.0.0"])),
            expected: &["every destinationCIDRs entry must be a CIDR"],
        },
        Case {
            name: "egress: empty selector",
            kind: "EgressGatewayPolicy",
            edit: |v| set(v, "/spec/selectors/0", json!({})),
            expected: &["a selector needs podSelector or namespaceSelector"],
        },
        // EncryptionPolicy
        Case {
            name: "encryption: ipsec settings with WireGuard",
            kind: "EncryptionPolicy",
            edit: |v| set(v, "/spec/ipsec", json!({"algorithm": "rfc4106(gcm(aes))"})),
            expected: &["ipsec settings need mode IPsec"],
        },
        Case {
            name: "encryption: wireguard settings with IPsec",
            kind: "EncryptionPolicy",
            edit: |v| set(v, "/spec/mode", json!("IPsec")),
            expected: &["wireguard settings need mode WireGuard"],
        },
        Case {
            name: "encryption: unknown mode",
            kind: "EncryptionPolicy",
            edit: |v| set(v, "/spec/mode", json!("OpenVPN")),
            expected: &["Unsupported value: \"OpenVPN\"", "\"IPsec\", \"WireGuard\""],
        },
        Case {
            name: "encryption: rotation under a minute",
            kind: "EncryptionPolicy",
            edit: |v| set(v, "/spec/keyRotationIntervalSeconds", json!(30)),
            expected: &["keyRotationIntervalSeconds", "greater than or equal to 60"],
        },
        Case {
            name: "encryption: unknown IPsec algorithm",
            kind: "EncryptionPolicy",
            edit: |v| {
                set(v, "/spec/mode", json!("IPsec"));
                remove(v, "/spec/wireguard");
                set(v, "/spec/ipsec/algorithm", json!("des"));
            },
            expected: &["Unsupported value: \"des\"", "rfc4106(gcm(aes))"],
        },
        // NodeNetwork
        Case {
            name: "node network: bad pod CIDR",
            kind: "NodeNetwork",
            edit: |v| set(v, "/spec/podCIDRs", json!(["10.244.1.0"])),
            expected: &["every pod CIDR must be a CIDR"],
        },
        Case {
            name: "node network: SPI out of range",
            kind: "NodeNetwork",
            edit: |v| set(v, "/spec/encryption/spi", json!(16)),
            expected: &["less than or equal to 15"],
        },
        // Endpoint
        Case {
            name: "endpoint: bad IP",
            kind: "Endpoint",
            edit: |v| set(v, "/spec/ips", json!(["10.244.1.700"])),
            expected: &["every entry of ips must be an IP address"],
        },
        Case {
            name: "endpoint: unknown port protocol",
            kind: "Endpoint",
            edit: |v| set(v, "/spec/namedPorts/0/protocol", json!("ICMP")),
            expected: &["Unsupported value: \"ICMP\""],
        },
        Case {
            name: "endpoint: identity out of range",
            kind: "Endpoint",
            edit: |v| set(v, "/spec/identity", json!(70000)),
            expected: &["spec.identity", "less than or equal to 65535"],
        },
        // Identity
        Case {
            name: "identity: name is not the id",
            kind: "Identity",
            edit: |v| set(v, "/spec/id", json!(301)),
            expected: &["the name of an Identity must be its id in decimal"],
        },
        Case {
            name: "identity: id in the gap between reserved and cluster ids",
            kind: "Identity",
            edit: |v| {
                set(v, "/metadata/name", json!("100"));
                set(v, "/spec/id", json!(100));
            },
            expected: &["reserved identity (1-8) or a cluster identity (256-65535)"],
        },
        // ResolvedPolicy
        Case {
            name: "resolved policy: unknown verdict",
            kind: "ResolvedPolicy",
            edit: |v| set(v, "/spec/ingress/0/verdict", json!("Maybe")),
            expected: &["Unsupported value: \"Maybe\"", "\"Allow\", \"Deny\""],
        },
        Case {
            name: "resolved policy: name is not the identity",
            kind: "ResolvedPolicy",
            edit: |v| set(v, "/spec/identity", json!(301)),
            expected: &["the name of a ResolvedPolicy must be its subject identity"],
        },
        Case {
            name: "resolved policy: ports not in the PROTOCOL:items form",
            kind: "ResolvedPolicy",
            edit: |v| set(v, "/spec/ingress/0/portSet", json!("80,443")),
            expected: &["spec.ingress[0].portSet", "should match"],
        },
        // LBService
        Case {
            name: "lb service: unknown frontend type",
            kind: "LBService",
            edit: |v| set(v, "/spec/frontends/0/type", json!("Ingress")),
            expected: &["Unsupported value: \"Ingress\""],
        },
        Case {
            name: "lb service: ClusterIP frontend without address",
            kind: "LBService",
            edit: |v| remove(v, "/spec/frontends/0/address"),
            expected: &["only NodePort frontends may omit address"],
        },
        Case {
            name: "lb service: bad backend address",
            kind: "LBService",
            edit: |v| set(v, "/spec/backends/0/address", json!("pod-a")),
            expected: &["backend address must be an IP address"],
        },
        Case {
            name: "lb service: unknown backend state",
            kind: "LBService",
            edit: |v| set(v, "/spec/backends/0/state", json!("draining")),
            expected: &[
                "Unsupported value: \"draining\"",
                "\"active\", \"terminating\"",
            ],
        },
        Case {
            name: "lb service: frontend port out of range",
            kind: "LBService",
            edit: |v| set(v, "/spec/frontends/0/port", json!(0)),
            expected: &["greater than or equal to 1"],
        },
        // BGPNodeConfig
        Case {
            name: "bgp node config: IPv6 router id",
            kind: "BGPNodeConfig",
            edit: |v| set(v, "/spec/routers/0/routerID", json!("fd00::2")),
            expected: &["routerID must be an IPv4 address"],
        },
        Case {
            name: "bgp node config: ASN 0",
            kind: "BGPNodeConfig",
            edit: |v| set(v, "/spec/routers/0/localASN", json!(0)),
            expected: &["greater than or equal to 1"],
        },
        Case {
            name: "bgp node config: bad prefix",
            kind: "BGPNodeConfig",
            edit: |v| {
                set(
                    v,
                    "/spec/routers/0/advertisements/0/prefix",
                    json!("10.244.1.0/99"),
                )
            },
            expected: &["prefix must be a CIDR"],
        },
        Case {
            name: "bgp node config: bad community",
            kind: "BGPNodeConfig",
            edit: |v| {
                set(
                    v,
                    "/spec/routers/0/advertisements/1/communities",
                    json!(["no-export"]),
                )
            },
            expected: &["communities[0]", "should match"],
        },
        // EgressRoute
        Case {
            name: "egress route: bad source IP",
            kind: "EgressRoute",
            edit: |v| set(v, "/spec/sourceIPs/0", json!("10.244.1.0/24")),
            expected: &["every sourceIPs entry must be an IP address"],
        },
        Case {
            name: "egress route: bad egress IP",
            kind: "EgressRoute",
            edit: |v| set(v, "/spec/egressIP", json!("192.0.2")),
            expected: &["egressIP must be an IP address"],
        },
    ]
}

#[tokio::test]
async fn invalid_objects_are_refused_with_a_clear_message() -> Result<()> {
    let env = TestEnv::new().await?;
    let name = env.unique_name("bad");
    let cases = cases();
    let kinds: std::collections::BTreeSet<&str> = cases.iter().map(|c| c.kind).collect();
    assert_eq!(kinds.len(), 14, "a refusal case for every kind: {kinds:?}");
    let mut failures = Vec::new();
    for case in &cases {
        let mut obj = example(case.kind, &name);
        (case.edit)(&mut obj);
        if let Some(failure) = expect_refused(&env, case.name, &obj, case.expected).await {
            failures.push(failure);
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} cases failed:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
    }
    Ok(())
}

#[tokio::test]
async fn immutable_fields_cannot_change() -> Result<()> {
    let env = TestEnv::new().await?;

    // A pool's mask sizes: a real pool that selects no node, so no IPAM acts on it.
    let name = env.unique_name("pool");
    let mut pool = example("PodIPPool", &name);
    set(
        &mut pool,
        "/spec/nodeSelector",
        json!({"matchLabels": {"tendril.dev/e2e-no-node": "true"}}),
    );
    env.delete_on_drop::<PodIPPool>(&name);
    apply(&env, &pool, true)
        .await
        .context("creating the pool")?;
    let mut failures = Vec::new();
    let mut changed = pool.clone();
    set(&mut changed, "/spec/ipv4/maskSize", json!(25));
    failures.extend(
        expect_refused(
            &env,
            "pool: IPv4 maskSize changed",
            &changed,
            &[
                "spec.ipv4.maskSize",
                "maskSize is immutable: changing it would re-address running pods",
            ],
        )
        .await,
    );
    let mut changed = pool.clone();
    set(&mut changed, "/spec/ipv6/maskSize", json!(80));
    failures.extend(
        expect_refused(
            &env,
            "pool: IPv6 maskSize changed",
            &changed,
            &["maskSize is immutable"],
        )
        .await,
    );
    // Adding a CIDR is an ordinary change.
    let mut grown = pool.clone();
    set(
        &mut grown,
        "/spec/ipv4/cidrs",
        json!(["10.244.0.0/16", "10.245.0.0/16"]),
    );
    apply(&env, &grown, false)
        .await
        .context("adding a CIDR to a pool")?;

    // An identity's labels and id. The id is far above what allocators hand out in tests.
    let id = 50_000 + (std::process::id() % 15_000) as i64;
    let mut identity = example("Identity", "");
    set(&mut identity, "/metadata/name", json!(id.to_string()));
    set(&mut identity, "/spec/id", json!(id));
    env.delete_on_drop::<Identity>(&id.to_string());
    apply(&env, &identity, true)
        .await
        .context("creating the identity")?;
    let mut changed = identity.clone();
    set(&mut changed, "/spec/securityLabels/k8s:app", json!("db"));
    failures.extend(
        expect_refused(
            &env,
            "identity: labels changed",
            &changed,
            &["spec.securityLabels is immutable"],
        )
        .await,
    );
    let mut changed = identity.clone();
    set(&mut changed, "/spec/id", json!(id + 1));
    failures.extend(
        expect_refused(
            &env,
            "identity: id changed",
            &changed,
            &["spec.id is immutable"],
        )
        .await,
    );
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    Ok(())
}
