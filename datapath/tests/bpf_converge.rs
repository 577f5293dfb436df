//! Convergence on real pinned maps: desired state lands in the maps, a
//! change applies only its difference, stale entries go only when pruning is
//! allowed, a full map is a typed error, and pins survive the loader (an
//! agent restart reopens the same maps). Needs root.

mod bpf_support;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use bpf_support::*;
use ipnet::IpNet;
use tendril_datapath::bpf::{
    Dataplane, LoadError, MapSizes, MapWriteError, Programs,
    maps::{EndpointInfo, EndpointKey, IpcacheValue, NodeConfig},
};

fn ep(i: u8) -> (IpAddr, EndpointInfo) {
    (
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)),
        EndpointInfo {
            ifindex: 100 + u32::from(i),
            identity: 256 + u32::from(i),
            endpoint_id: u16::from(i),
            flags: 0,
            mac: [2, 0, 0, 0, 0, i],
            node_mac: [2, 0, 0, 0, 1, i],
        },
    )
}

#[test]
fn endpoints_converge_by_diff_and_prune_only_when_asked() {
    let mut node = Node::load("conv", &MapSizes::default());
    let dp = &mut node.dataplane;
    let desired: BTreeMap<_, _> = (1..=5).map(ep).collect();

    let report = dp.endpoints.converge(&desired, false).unwrap();
    assert_eq!(
        (
            report.added,
            report.updated,
            report.deleted,
            report.unchanged
        ),
        (5, 0, 0, 0)
    );
    assert_eq!(dp.endpoints.by_ip().unwrap(), desired);

    // Same desired state: nothing to do.
    let report = dp.endpoints.converge(&desired, true).unwrap();
    assert_eq!(
        (
            report.added,
            report.updated,
            report.deleted,
            report.unchanged
        ),
        (0, 0, 0, 5)
    );

    // One changed, one gone, one new; without prune the stale one stays.
    let mut next = desired.clone();
    next.get_mut(&ep(2).0).unwrap().identity = 999;
    next.remove(&ep(3).0);
    next.extend([ep(6)]);
    let report = dp.endpoints.converge(&next, false).unwrap();
    assert_eq!(
        (
            report.added,
            report.updated,
            report.deleted,
            report.stale_kept,
            report.unchanged
        ),
        (1, 1, 0, 1, 3)
    );
    let held = dp.endpoints.by_ip().unwrap();
    assert_eq!(held.len(), 6);
    assert_eq!(
        held[&ep(3).0],
        ep(3).1,
        "stale entry kept until the caller's view is complete"
    );
    assert_eq!(held[&ep(2).0].identity, 999);

    let report = dp.endpoints.converge(&next, true).unwrap();
    assert_eq!(
        (
            report.added,
            report.updated,
            report.deleted,
            report.unchanged
        ),
        (0, 0, 1, 5)
    );
    assert_eq!(dp.endpoints.by_ip().unwrap(), next);
    assert_eq!(dp.pressure().unwrap()[0].entries, 5);
}

#[test]
fn ipcache_converges_prefixes() {
    let mut node = Node::load("conv", &MapSizes::default());
    let dp = &mut node.dataplane;
    let net = |s: &str| -> IpNet { s.parse().unwrap() };
    let mut desired = BTreeMap::from([
        (
            net("10.0.2.0/24"),
            IpcacheValue::new(300, Some(Ipv4Addr::new(192, 168, 0, 2))),
        ),
        (
            net("10.0.3.7/32"),
            IpcacheValue::new(301, Some(Ipv4Addr::new(192, 168, 0, 3))),
        ),
        (net("192.168.0.1/32"), IpcacheValue::local_node(1)),
        (net("fd00:1::/64"), IpcacheValue::new(302, None)),
    ]);
    let report = dp.ipcache.converge(&desired, true).unwrap();
    assert_eq!(report.added, 4);
    assert_eq!(dp.ipcache.by_prefix().unwrap(), desired);

    desired.remove(&net("10.0.3.7/32"));
    desired.insert(
        net("10.0.2.0/24"),
        IpcacheValue::new(300, Some(Ipv4Addr::new(192, 168, 0, 9))),
    );
    let report = dp.ipcache.converge(&desired, true).unwrap();
    assert_eq!(
        (
            report.added,
            report.updated,
            report.deleted,
            report.unchanged
        ),
        (0, 1, 1, 2)
    );
    assert_eq!(dp.ipcache.by_prefix().unwrap(), desired);
    assert_eq!(
        dp.ipcache.by_prefix().unwrap()[&net("10.0.2.0/24")].tunnel_endpoint(),
        Some(Ipv4Addr::new(192, 168, 0, 9))
    );
}

#[test]
fn a_full_map_is_a_typed_error_and_the_rest_still_converges() {
    let sizes = MapSizes {
        endpoints: 4,
        ipcache: 3,
        ..MapSizes::default()
    };
    let mut node = Node::load("full", &sizes);
    let dp = &mut node.dataplane;
    let desired: BTreeMap<_, _> = (1..=6).map(ep).collect();
    let report = dp.endpoints.converge(&desired, true).unwrap();
    assert_eq!(report.added, 4);
    assert_eq!(report.failed.len(), 2);
    assert!(report.map_full());
    assert!(!report.is_converged());
    for failure in &report.failed {
        assert!(
            matches!(
                failure.error,
                MapWriteError::Full {
                    map: "endpoints",
                    max_entries: 4
                }
            ),
            "{failure:?}"
        );
    }
    assert_eq!(dp.pressure().unwrap()[0].entries, 4);
    assert_eq!(dp.pressure().unwrap()[0].ratio(), 1.0);

    // Pruning frees slots before adding: a new desired set of the same size fits.
    let next: BTreeMap<_, _> = (3..=6).map(ep).collect();
    let report = dp.endpoints.converge(&next, true).unwrap();
    assert!(report.is_converged(), "{report:?}");
    assert_eq!(dp.endpoints.by_ip().unwrap(), next);

    let prefixes: BTreeMap<IpNet, _> = (1..=4)
        .map(|i| {
            (
                format!("10.{i}.0.0/16").parse().unwrap(),
                IpcacheValue::new(300 + i, None),
            )
        })
        .collect();
    let report = dp.ipcache.converge(&prefixes, true).unwrap();
    assert_eq!(report.added, 3);
    assert!(matches!(
        report.failed[0].error,
        MapWriteError::Full { map: "ipcache", .. }
    ));
}

#[test]
fn a_change_behind_the_agents_back_is_repaired_once_it_reads_the_map_again() {
    let mut node = Node::load("behind", &MapSizes::default());
    let desired: BTreeMap<_, _> = (1..=3).map(ep).collect();
    let mut prefixes = BTreeMap::new();
    prefixes.insert(
        "10.1.0.0/16".parse::<IpNet>().unwrap(),
        IpcacheValue::new(300, None),
    );
    node.dataplane.endpoints.converge(&desired, true).unwrap();
    node.dataplane.ipcache.converge(&prefixes, true).unwrap();

    // Someone else (bpftool, a stray process) edits the pinned maps.
    let mut other = Dataplane::open(&node.dir.0).unwrap();
    assert!(other.endpoints.delete(&EndpointKey::new(ep(2).0)).unwrap());
    other.ipcache.converge(&BTreeMap::new(), true).unwrap();

    // Between resyncs the agent diffs against what it wrote: no read, no repair.
    let report = node.dataplane.endpoints.converge(&desired, true).unwrap();
    assert_eq!((report.unchanged, report.added), (3, 0));

    // The resync reads the kernel again and puts both right.
    node.dataplane.forget_known();
    let report = node.dataplane.endpoints.converge(&desired, true).unwrap();
    assert_eq!((report.unchanged, report.added), (2, 1));
    assert_eq!(node.dataplane.endpoints.by_ip().unwrap(), desired);
    let report = node.dataplane.ipcache.converge(&prefixes, true).unwrap();
    assert_eq!(report.added, 1);
    assert_eq!(node.dataplane.ipcache.by_prefix().unwrap(), prefixes);
}

#[test]
fn pinned_maps_survive_the_loader_and_are_reopened() {
    let dir = PinDir::new("reopen");
    let desired: BTreeMap<_, _> = (1..=3).map(ep).collect();
    let config = NodeConfig {
        tunnel_ifindex: 7,
        node_ipv4: [192, 168, 0, 1],
        flags: 1,
        pad: 0,
    };
    {
        let _programs = Programs::load(&dir.0, &MapSizes::default()).unwrap();
        let mut dp = Dataplane::open(&dir.0).unwrap();
        dp.endpoints.converge(&desired, true).unwrap();
        assert!(dp.node_config.set(&config).unwrap());
    }
    // A new process would do exactly this: load again, reopen, find the state.
    let _programs = Programs::load(&dir.0, &MapSizes::default()).unwrap();
    let mut dp = Dataplane::open(&dir.0).unwrap();
    assert_eq!(dp.endpoints.by_ip().unwrap(), desired);
    assert_eq!(dp.node_config.get().unwrap(), config);
    assert!(
        !dp.node_config.set(&config).unwrap(),
        "unchanged config is not rewritten"
    );
    let report = dp.endpoints.converge(&desired, true).unwrap();
    assert_eq!(report.unchanged, 3);

    // A build expecting another shape refuses the pins instead of misreading them.
    let err = Programs::load(
        &dir.0,
        &MapSizes {
            endpoints: 16,
            ..MapSizes::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, LoadError::IncompatiblePin { .. }), "{err}");
}
