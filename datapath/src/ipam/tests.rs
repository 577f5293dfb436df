use super::*;
use proptest::prelude::*;
use std::collections::HashSet;

fn att(id: &str) -> Attachment {
    Attachment::new(id, "eth0").unwrap()
}

fn cidrs(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|c| c.parse().unwrap()).collect()
}

fn open(dir: &Path, pools: &[&str]) -> Ipam {
    let (mut ipam, _) = Ipam::open(dir).unwrap();
    ipam.set_pools(&cidrs(pools)).unwrap();
    ipam
}

fn pod(ns: &str, name: &str) -> Owner {
    Owner {
        pod_namespace: Some(ns.into()),
        pod_name: Some(name.into()),
        netns: None,
    }
}

#[test]
fn allocation_is_idempotent_per_attachment() {
    let dir = tempfile::tempdir().unwrap();
    let mut ipam = open(dir.path(), &["10.1.0.0/24"]);
    let a = ipam.allocate(&att("c1"), Owner::default(), 10).unwrap();
    let again = ipam.allocate(&att("c1"), Owner::default(), 20).unwrap();
    assert_eq!(a, again);
    assert_eq!(a.ips, vec!["10.1.0.2".parse::<IpAddr>().unwrap()]);
    let other = ipam
        .allocate(
            &Attachment::new("c1", "net1").unwrap(),
            Owner::default(),
            20,
        )
        .unwrap();
    assert_ne!(
        other.ips, a.ips,
        "another interface of the same container is another attachment"
    );
    assert_eq!(ipam.in_use(), 2);
}

#[test]
fn dual_stack_gives_one_address_per_family() {
    let dir = tempfile::tempdir().unwrap();
    let mut ipam = open(dir.path(), &["fd00:1::/120", "10.1.0.0/24"]);
    let a = ipam.allocate(&att("c1"), Owner::default(), 1).unwrap();
    assert_eq!(
        a.ips,
        vec![
            "10.1.0.2".parse::<IpAddr>().unwrap(),
            "fd00:1::2".parse().unwrap()
        ]
    );
    assert_eq!(
        ipam.pools()[0].gateway(),
        "10.1.0.1".parse::<IpAddr>().unwrap()
    );
}

#[test]
fn exhaustion_is_an_error_and_release_frees() {
    let dir = tempfile::tempdir().unwrap();
    let mut ipam = open(dir.path(), &["10.1.0.0/29"]);
    let got: Vec<_> = (0..5)
        .map(|i| {
            ipam.allocate(&att(&format!("c{i}")), Owner::default(), 1)
                .unwrap()
                .ips[0]
        })
        .collect();
    assert_eq!(got.iter().collect::<HashSet<_>>().len(), 5);
    assert!(!ipam.has_free());
    assert!(matches!(
        ipam.allocate(&att("c9"), Owner::default(), 1),
        Err(IpamError::Exhausted(_))
    ));
    let freed = ipam.release(&att("c3")).unwrap().unwrap();
    assert_eq!(
        ipam.release(&att("c3")).unwrap(),
        None,
        "release is idempotent"
    );
    let next = ipam.allocate(&att("c9"), Owner::default(), 2).unwrap();
    assert_eq!(next.ips, freed.ips);
}

#[test]
fn released_address_is_not_reused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut ipam = open(dir.path(), &["10.1.0.0/24"]);
    let a = ipam.allocate(&att("a"), Owner::default(), 1).unwrap();
    ipam.release(&att("a")).unwrap();
    let b = ipam.allocate(&att("b"), Owner::default(), 1).unwrap();
    assert_ne!(a.ips, b.ips);
}

#[test]
fn allocations_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let before: Vec<Allocation> = {
        let mut ipam = open(dir.path(), &["10.1.0.0/24"]);
        (0..10)
            .map(|i| {
                ipam.allocate(&att(&format!("c{i}")), pod("ns", &format!("p{i}")), i)
                    .unwrap()
            })
            .collect()
    };
    let mut ipam = open(dir.path(), &["10.1.0.0/24"]);
    assert_eq!(ipam.in_use(), 10);
    for a in &before {
        assert_eq!(ipam.get(&a.attachment()), Some(a));
    }
    let fresh = ipam.allocate(&att("new"), Owner::default(), 100).unwrap();
    assert!(before.iter().all(|a| a.ips != fresh.ips));
    // The search continues after the newest allocation rather than refilling from the start.
    assert_eq!(fresh.ips[0], "10.1.0.12".parse::<IpAddr>().unwrap());
}

#[test]
fn second_agent_cannot_open_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path(), &["10.1.0.0/24"]);
    assert!(Ipam::open(dir.path()).is_err());
}

#[test]
fn load_removes_temporaries_and_sets_corrupt_files_aside() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".x@eth0.json.tmp"), b"{").unwrap();
    std::fs::write(dir.path().join("y@eth0.json"), b"not json").unwrap();
    let (ipam, report) = Ipam::open(dir.path()).unwrap();
    assert_eq!(report.removed_tmp, 1);
    assert_eq!(report.corrupt.len(), 1);
    assert!(dir.path().join("y@eth0.corrupt").exists());
    assert_eq!(ipam.allocations().count(), 0);
}

#[test]
fn invalid_attachments_are_refused() {
    assert!(Attachment::new("", "eth0").is_err());
    assert!(Attachment::new("../etc", "eth0").is_err());
    assert!(Attachment::new("abc", "eth0/x").is_err());
    assert!(Attachment::new("abc", "averyveryverylongname").is_err());
    assert!(Attachment::new("abc", "..").is_err());
    assert!(Attachment::new("a-b_c.d", "eth0").is_ok());
}

#[test]
fn gc_keeps_valid_and_young_attachments() {
    let dir = tempfile::tempdir().unwrap();
    let mut ipam = open(dir.path(), &["10.1.0.0/24"]);
    ipam.allocate(&att("keep"), Owner::default(), 0).unwrap();
    ipam.allocate(&att("stale"), Owner::default(), 0).unwrap();
    ipam.allocate(&att("young"), Owner::default(), 95).unwrap();
    let valid: HashSet<_> = [att("keep")].into();
    let released = ipam.gc(&valid, 100, 10).unwrap();
    assert_eq!(
        released
            .iter()
            .map(|a| a.container_id.as_str())
            .collect::<Vec<_>>(),
        vec!["stale"]
    );
    assert!(ipam.get(&att("young")).is_some());
}

#[test]
fn reconcile_restores_live_and_releases_leaks_after_grace() {
    let dir = tempfile::tempdir().unwrap();
    let mut ipam = open(dir.path(), &["10.1.0.0/24"]);
    let live = ipam.allocate(&att("live"), pod("ns", "web"), 0).unwrap();
    let leaked = ipam.allocate(&att("gone"), pod("ns", "old"), 0).unwrap();
    let in_flight = ipam.allocate(&att("adding"), pod("ns", "new"), 95).unwrap();
    let unknown: IpAddr = "10.1.0.200".parse().unwrap();
    let endpoints = LiveEndpoints {
        endpoints: vec![
            ("ns".into(), "web".into(), live.ips.clone()),
            ("other".into(), "lost".into(), vec![unknown]),
            (
                "other".into(),
                "elsewhere".into(),
                vec!["192.168.9.9".parse().unwrap()],
            ),
        ],
    };
    let report = ipam
        .reconcile(&endpoints, 100, 30, true, |_| false)
        .unwrap();
    assert_eq!(report.restored, vec![unknown]);
    assert_eq!(report.released, vec![leaked.clone()]);
    assert!(ipam.get(&att("live")).is_some());
    assert!(
        ipam.get(&att("adding")).is_some(),
        "an ADD in flight is inside the grace window"
    );
    assert_eq!(
        ipam.owner_of(unknown).unwrap().container_id,
        "endpoint-other-lost"
    );
    assert!(ipam.owner_of(leaked.ips[0]).is_none());
    let _ = in_flight;

    // The restored record is durable and goes once its Endpoint is gone.
    drop(ipam);
    let mut ipam = open(dir.path(), &["10.1.0.0/24"]);
    assert!(ipam.owner_of(unknown).is_some());
    // A pod whose sandbox still exists keeps its address even without an Endpoint.
    let report = ipam
        .reconcile(&LiveEndpoints::default(), 200, 30, false, |a| {
            a.container_id == "adding"
        })
        .unwrap();
    assert_eq!(report.released.len(), 2);
    assert!(ipam.get(&att("adding")).is_some());
    let report = ipam
        .reconcile(&LiveEndpoints::default(), 200, 30, false, |_| false)
        .unwrap();
    assert_eq!(report.released.len(), 1);
    assert_eq!(ipam.in_use(), 0);
}

#[test]
fn only_the_first_reconcile_restores() {
    let dir = tempfile::tempdir().unwrap();
    let mut ipam = open(dir.path(), &["10.1.0.0/24"]);
    let a = ipam.allocate(&att("a"), pod("ns", "web"), 0).unwrap();
    // DEL came, the Endpoint is still in the cache for a moment.
    ipam.release(&att("a")).unwrap();
    let live = LiveEndpoints {
        endpoints: vec![("ns".into(), "web".into(), a.ips.clone())],
    };
    let report = ipam.reconcile(&live, 10, 30, false, |_| false).unwrap();
    assert!(report.restored.is_empty());
    assert!(
        ipam.owner_of(a.ips[0]).is_none(),
        "a steady-state pass must not pin a released address"
    );
    let report = ipam.reconcile(&live, 10, 30, true, |_| false).unwrap();
    assert_eq!(report.restored, a.ips);
}

#[derive(Clone, Debug)]
enum Op {
    Allocate(u8),
    Release(u8),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..40).prop_map(Op::Allocate),
        3 => (0u8..40).prop_map(Op::Release),
        1 => Just(Op::Restart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the sequence of allocations, releases and restarts: no address is ever held
    /// by two attachments, every address is a pod address of the pool, an attachment keeps
    /// its address until released, and the state on disk equals the state in memory.
    #[test]
    fn never_double_allocates(ops in proptest::collection::vec(op(), 1..120)) {
        let dir = tempfile::tempdir().unwrap();
        let pool: Pool = Pool::new("10.9.0.0/27".parse().unwrap()).unwrap();
        let mut ipam = open(dir.path(), &["10.9.0.0/27"]);
        let mut model: BTreeMap<String, IpAddr> = BTreeMap::new();
        for (now, op) in ops.into_iter().enumerate() {
            match op {
                Op::Allocate(n) => {
                    let id = format!("c{n}");
                    match ipam.allocate(&att(&id), Owner::default(), now as u64) {
                        Ok(a) => {
                            prop_assert_eq!(a.ips.len(), 1);
                            if let Some(previous) = model.get(&id) {
                                prop_assert_eq!(*previous, a.ips[0]);
                            }
                            prop_assert!(pool.offset_of(a.ips[0]).is_some());
                            model.insert(id, a.ips[0]);
                        }
                        Err(IpamError::Exhausted(_)) => prop_assert_eq!(model.len() as u128, pool.capacity()),
                        Err(e) => return Err(TestCaseError::fail(e.to_string())),
                    }
                }
                Op::Release(n) => {
                    let id = format!("c{n}");
                    let released = ipam.release(&att(&id)).unwrap();
                    prop_assert_eq!(released.map(|a| a.ips[0]), model.remove(&id));
                }
                Op::Restart => {
                    drop(ipam);
                    ipam = open(dir.path(), &["10.9.0.0/27"]);
                }
            }
            let distinct: HashSet<IpAddr> = model.values().copied().collect();
            prop_assert_eq!(distinct.len(), model.len());
            prop_assert_eq!(ipam.in_use(), model.len());
        }
        drop(ipam);
        let reloaded = open(dir.path(), &["10.9.0.0/27"]);
        let on_disk: BTreeMap<String, IpAddr> = reloaded.allocations().map(|a| (a.container_id.clone(), a.ips[0])).collect();
        prop_assert_eq!(on_disk, model);
    }
}
