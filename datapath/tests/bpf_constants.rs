//! Every C constant the Rust side relies on has the same value on both sides: the
//! `#define`s of `bpf/lib/*.h` (identities, map sizes, flags, verdicts, event codes) and the
//! values of `enum metric_reason`. Like `bpf_map_layout.rs` does for structs, the values are
//! read from BTF: a scratch C file includes the headers exactly as the programs do and
//! copies each macro into an enumerator, clang compiles it with `-g`, and bpftool dumps the
//! enum. A constant renamed or removed on the C side fails the compile, a changed value
//! fails the comparison.

mod bpf_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use tendril_crds::facts::{LOCAL_IDENTITY_FLAG, Reserved};
use tendril_datapath::bpf::maps::*;
use tendril_datapath::bpf::policy::{
    EventKind, EventVerdict, POLICY_F_DEFAULT_DENY_EGRESS, POLICY_F_DEFAULT_DENY_INGRESS,
    POLICY_F_HAS_DENY_EGRESS, POLICY_F_HAS_DENY_INGRESS, POLICY_F_SELECTED, POLICY_VALUE_F_L4,
    PROTO_SCTP, PolicyMatch,
};

/// (C macro, the value Rust uses for it).
fn expected() -> Vec<(&'static str, u64)> {
    let mut out: Vec<(&'static str, u64)> = vec![
        ("FAMILY_IPV4", FAMILY_IPV4.into()),
        ("LB_SCOPE_EXTERNAL", LB_SCOPE_EXTERNAL.into()),
        ("LB_SCOPE_INTERNAL", LB_SCOPE_INTERNAL.into()),
        ("SVC_F_NODEPORT", SVC_F_NODEPORT.into()),
        ("SVC_F_EXTERNAL", SVC_F_EXTERNAL.into()),
        ("SVC_F_TWO_SCOPES", SVC_F_TWO_SCOPES.into()),
        ("SVC_F_AFFINITY", SVC_F_AFFINITY.into()),
        ("SVC_F_SOURCE_RANGES", SVC_F_SOURCE_RANGES.into()),
        ("SVC_F_MAGLEV", SVC_F_MAGLEV.into()),
        ("SVC_F_LOCAL_ONLY", SVC_F_LOCAL_ONLY.into()),
        ("SVC_F_DROP_EMPTY", SVC_F_DROP_EMPTY.into()),
        ("BE_F_LOCAL", BE_F_LOCAL.into()),
        ("NETNS_NODE", NETNS_NODE.into()),
        ("LB_NAT_FORWARD", LB_NAT_FORWARD.into()),
        ("LB_NAT_REPLY", LB_NAT_REPLY.into()),
        ("LB_NAT_F_SNAT", LB_NAT_F_SNAT.into()),
        ("LB_NAT_F_NORTH_SOUTH", LB_NAT_F_NORTH_SOUTH.into()),
        ("LB_NAT_F_HAIRPIN", LB_NAT_F_HAIRPIN.into()),
        ("LB_NAT_F_CLOSING", LB_NAT_F_CLOSING.into()),
        ("LB_NAT_IDLE_CLOSED_S", LB_NAT_IDLE_CLOSED_S.into()),
        ("LB_NAT_IDLE_TCP_S", LB_NAT_IDLE_TCP_S.into()),
        ("LB_NAT_IDLE_UDP_S", LB_NAT_IDLE_UDP_S.into()),
        ("LB_NAT_MAX_ENTRIES", LB_NAT_MAX_ENTRIES.into()),
        ("AFFINITY_BY_ADDR6", AFFINITY_BY_ADDR6.into()),
        (
            "EGRESS_POLICY_MAX_ENTRIES",
            EGRESS_POLICY_MAX_ENTRIES.into(),
        ),
        (
            "EGRESS_EXEMPT_MAX_ENTRIES",
            EGRESS_EXEMPT_MAX_ENTRIES.into(),
        ),
        ("EGRESS_NAT_MAX_ENTRIES", EGRESS_NAT_MAX_ENTRIES.into()),
        ("EGRESS_STATIC_PREFIX", EGRESS_STATIC_PREFIX.into()),
        ("EGRESS_F_EXCLUDED", EGRESS_F_EXCLUDED.into()),
        ("EGRESS_SNAT_PORT_MIN", EGRESS_SNAT_PORT_MIN.into()),
        ("EGRESS_SNAT_PORT_RANGE", EGRESS_SNAT_PORT_RANGE.into()),
        ("NETNS_POD", NETNS_POD.into()),
        (
            "LB_SRC_RANGE_STATIC_PREFIX",
            LB_SRC_RANGE_STATIC_PREFIX.into(),
        ),
        ("LB_SERVICES_MAX_ENTRIES", LB_SERVICES_MAX_ENTRIES.into()),
        ("LB_BACKENDS_MAX_ENTRIES", LB_BACKENDS_MAX_ENTRIES.into()),
        ("LB_REVNAT_MAX_ENTRIES", LB_REVNAT_MAX_ENTRIES.into()),
        ("LB_AFFINITY_MAX_ENTRIES", LB_AFFINITY_MAX_ENTRIES.into()),
        (
            "LB_SOURCE_RANGES_MAX_ENTRIES",
            LB_SOURCE_RANGES_MAX_ENTRIES.into(),
        ),
        ("LB_MAGLEV_MAX_ENTRIES", LB_MAGLEV_MAX_ENTRIES.into()),
        ("LB_NETNS_MAX_ENTRIES", LB_NETNS_MAX_ENTRIES.into()),
        (
            "LB_SOCK_REVNAT_MAX_ENTRIES",
            LB_SOCK_REVNAT_MAX_ENTRIES.into(),
        ),
        ("FAMILY_IPV6", FAMILY_IPV6.into()),
        ("IDENTITY_UNKNOWN", 0),
        ("IDENTITY_MAX_VNI", IDENTITY_MAX_VNI.into()),
        ("IDENTITY_LOCAL_FLAG", LOCAL_IDENTITY_FLAG.into()),
        ("DIR_INGRESS", Direction::Ingress as u64),
        ("DIR_EGRESS", Direction::Egress as u64),
        ("IPPROTO_SCTP", PROTO_SCTP.into()),
        ("IPCACHE_STATIC_PREFIX", IPCACHE_STATIC_PREFIX.into()),
        ("IPCACHE_F_LOCAL_NODE", IPCACHE_F_LOCAL_NODE.into()),
        ("NODE_F_TUNNEL", NODE_F_TUNNEL.into()),
        ("NODE_F_POLICY_AUDIT", NODE_F_POLICY_AUDIT.into()),
        ("NODE_F_IPV6_POLICY", NODE_F_IPV6_POLICY.into()),
        ("POLICY_STATIC_PREFIX", POLICY_STATIC_PREFIX.into()),
        ("POLICY_VERDICT_ALLOW", POLICY_VERDICT_ALLOW.into()),
        ("POLICY_VERDICT_DENY", POLICY_VERDICT_DENY.into()),
        (
            "POLICY_F_DEFAULT_DENY_INGRESS",
            POLICY_F_DEFAULT_DENY_INGRESS.into(),
        ),
        (
            "POLICY_F_DEFAULT_DENY_EGRESS",
            POLICY_F_DEFAULT_DENY_EGRESS.into(),
        ),
        ("POLICY_F_SELECTED", POLICY_F_SELECTED.into()),
        (
            "POLICY_F_HAS_DENY_INGRESS",
            POLICY_F_HAS_DENY_INGRESS.into(),
        ),
        ("POLICY_F_HAS_DENY_EGRESS", POLICY_F_HAS_DENY_EGRESS.into()),
        ("POLICY_VALUE_F_L4", POLICY_VALUE_F_L4.into()),
        ("CT_F_SEEN_REPLY", CT_F_SEEN_REPLY.into()),
        ("CT_F_CLOSING", CT_F_CLOSING.into()),
        ("CT_F_AUDIT", CT_F_AUDIT.into()),
        ("CT_F_FIN_FORWARD", CT_F_FIN_FORWARD.into()),
        ("CT_F_FIN_REPLY", CT_F_FIN_REPLY.into()),
        ("EVENT_DROP", EventKind::Drop as u64),
        ("EVENT_POLICY_VERDICT", EventKind::PolicyVerdict as u64),
        ("EVENT_VERDICT_ALLOW", EventVerdict::Allow as u64),
        ("EVENT_VERDICT_DENY", EventVerdict::Deny as u64),
        ("EVENT_VERDICT_AUDIT", EventVerdict::Audit as u64),
        ("EVENT_MATCH_NONE", PolicyMatch::None as u64),
        ("EVENT_MATCH_L3", PolicyMatch::L3 as u64),
        ("EVENT_MATCH_L4", PolicyMatch::L4 as u64),
        ("EVENT_MATCH_DEFAULT", PolicyMatch::Default as u64),
        ("EVENT_MATCH_CONNTRACK", PolicyMatch::Conntrack as u64),
        ("IPCACHE_MAX_ENTRIES", IPCACHE_MAX_ENTRIES.into()),
        ("ENDPOINTS_MAX_ENTRIES", ENDPOINTS_MAX_ENTRIES.into()),
        ("METRICS_MAX_ENTRIES", METRICS_MAX_ENTRIES.into()),
        ("POLICY_MAX_ENTRIES", POLICY_MAX_ENTRIES.into()),
        ("POLICY_STATE_MAX_ENTRIES", POLICY_STATE_MAX_ENTRIES.into()),
        ("POLICY_CIDRS_MAX_ENTRIES", POLICY_CIDRS_MAX_ENTRIES.into()),
        ("CONNTRACK_MAX_ENTRIES", CONNTRACK_MAX_ENTRIES.into()),
        ("EVENTS_RING_BYTES", EVENTS_RING_BYTES.into()),
        ("IPV4_FRAGS_MAX_ENTRIES", IPV4_FRAGS_MAX_ENTRIES.into()),
        ("IPV6_FRAGS_MAX_ENTRIES", IPV6_FRAGS_MAX_ENTRIES.into()),
        ("POLICY_FLOWS_MAX_ENTRIES", POLICY_FLOWS_MAX_ENTRIES.into()),
        ("POLICY_EVENTS_AGGREGATE", POLICY_EVENTS_AGGREGATE.into()),
        ("POLICY_EVENTS_ALL", POLICY_EVENTS_ALL.into()),
        ("POLICY_EVENTS_DROPS", POLICY_EVENTS_DROPS.into()),
    ];
    for r in Reserved::ALL {
        let name = match r {
            Reserved::Host => "IDENTITY_HOST",
            Reserved::World => "IDENTITY_WORLD",
            Reserved::Unmanaged => "IDENTITY_UNMANAGED",
            Reserved::Health => "IDENTITY_HEALTH",
            Reserved::Init => "IDENTITY_INIT",
            Reserved::RemoteNode => "IDENTITY_REMOTE_NODE",
            Reserved::KubeApiserver => "IDENTITY_KUBE_APISERVER",
            Reserved::Ingress => "IDENTITY_INGRESS",
        };
        out.push((name, r.id32().into()));
    }
    out
}

/// Every enumerator of every named enum in the BTF of `object`: enum → (name → value).
fn btf_enums(object: &Path) -> BTreeMap<String, BTreeMap<String, u64>> {
    bpf_support::btf_types(object)
        .iter()
        .filter(|t| (t["kind"] == "ENUM" || t["kind"] == "ENUM64") && t["name"].is_string())
        .map(|t| {
            let values = t["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| {
                    let value = v["val"]
                        .as_u64()
                        .or_else(|| v["val"].as_i64().map(|x| x as u64))
                        .unwrap();
                    (v["name"].as_str().unwrap().to_string(), value)
                })
                .collect();
            (t["name"].as_str().unwrap().to_string(), values)
        })
        .collect()
}

/// Compiles `source` against `bpf/lib` with the flags of build.rs (less `-Werror`-only
/// concerns) into a BPF object with BTF.
fn compile(source: &str, dir: &Path) -> std::path::PathBuf {
    let c = dir.join("constants.c");
    let object = dir.join("constants.o");
    std::fs::write(&c, source).unwrap();
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("bpf");
    let (multiarch, bpf_arch) = if cfg!(target_arch = "aarch64") {
        ("aarch64", "arm64")
    } else {
        ("x86_64", "x86")
    };
    let out = Command::new(std::env::var("CLANG").unwrap_or_else(|_| "clang".into()))
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-D__TARGET_ARCH_{bpf_arch}"))
        .arg("-I")
        .arg(&lib)
        .arg("-I")
        .arg(lib.join("lib"))
        .arg("-I")
        .arg(format!("/usr/include/{multiarch}-linux-gnu"))
        .arg("-c")
        .arg(&c)
        .arg("-o")
        .arg(&object)
        .output()
        .expect("clang (installed by hack/install-prereqs.sh)");
    assert!(
        out.status.success(),
        "clang failed on the constants file (a constant the Rust side uses is missing in C?):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    object
}

#[test]
fn c_constants_equal_the_rust_values() {
    let expected = expected();
    let mut source = String::from(
        "#include \"lib/common.h\"\n#include \"lib/maps.h\"\n#include \"lib/metrics.h\"\n\
         #include \"lib/policy.h\"\n#include \"lib/conntrack.h\"\n#include \"lib/lb.h\"\n#include \"lib/lb_nat.h\"\n#include \"lib/lb6_nat.h\"\n#include \"lib/egress.h\"\n\n\
         enum tendril_constants {\n",
    );
    for (name, _) in &expected {
        source.push_str(&format!("\tK_{name} = (unsigned long long)({name}),\n"));
    }
    source.push_str("};\n\n/* Referenced, so the enum is in the BTF. */\n");
    source.push_str("enum tendril_constants tendril_constants_anchor;\n");
    source.push_str("enum metric_reason tendril_reasons_anchor;\n");
    let dir = tempfile::tempdir().unwrap();
    let enums = btf_enums(&compile(&source, dir.path()));

    let constants = enums
        .get("tendril_constants")
        .expect("enum tendril_constants in the BTF");
    let mismatches: Vec<String> = expected
        .iter()
        .filter_map(|(name, rust)| {
            let c = constants.get(&format!("K_{name}")).copied();
            (c != Some(*rust)).then(|| format!("{name}: C {c:?}, Rust {rust}"))
        })
        .collect();
    assert!(
        mismatches.is_empty(),
        "C and Rust disagree:\n{}",
        mismatches.join("\n")
    );

    // enum metric_reason ↔ MetricReason, both ways: every C reason has a Rust twin.
    let reasons = enums
        .get("metric_reason")
        .expect("enum metric_reason in the BTF");
    let rust: BTreeMap<u64, MetricReason> =
        MetricReason::ALL.iter().map(|r| (*r as u64, *r)).collect();
    assert_eq!(
        reasons.len(),
        rust.len(),
        "C has {} reasons, Rust {}: {reasons:?}",
        reasons.len(),
        rust.len()
    );
    for (name, value) in reasons {
        let r = rust
            .get(value)
            .unwrap_or_else(|| panic!("C reason {name} = {value} has no MetricReason"));
        assert_eq!(
            MetricReason::from_raw(*value as u8),
            Some(*r),
            "{name} = {value} decodes to another reason"
        );
    }
}
