//! Tests of `pool`, in a file of their own.
use super::*;
use proptest::prelude::*;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn v4(cidrs: &[&str], mask: u8) -> PoolConfig {
    PoolConfig {
        v4: Some(FamilyConfig {
            cidrs: cidrs.iter().map(|c| net(c)).collect(),
            mask_size: mask,
        }),
        v6: None,
    }
}

fn dual(v4c: &[&str], m4: u8, v6c: &[&str], m6: u8) -> PoolConfig {
    PoolConfig {
        v4: v4(v4c, m4).v4,
        v6: Some(FamilyConfig {
            cidrs: v6c.iter().map(|c| net(c)).collect(),
            mask_size: m6,
        }),
    }
}

#[test]
fn parses_and_checks_a_family() {
    let ok = FamilyConfig::parse(Family::V4, &["10.0.0.0/16".into()], 24).unwrap();
    assert_eq!(ok.capacity(), 256);
    assert!(matches!(
        FamilyConfig::parse(Family::V4, &["10.0.1.0/16".into()], 24),
        Err(ConfigError::NotCanonical { .. })
    ));
    assert!(matches!(
        FamilyConfig::parse(Family::V4, &["fd00::/64".into()], 24),
        Err(ConfigError::WrongFamily { .. })
    ));
    assert!(matches!(
        FamilyConfig::parse(Family::V4, &["10.0.0.0/25".into()], 24),
        Err(ConfigError::CidrSmallerThanBlock { .. })
    ));
    assert!(matches!(
        FamilyConfig::parse(
            Family::V4,
            &["10.0.0.0/16".into(), "10.0.3.0/24".into()],
            24
        ),
        Err(ConfigError::Overlap { .. })
    ));
    assert!(matches!(
        FamilyConfig::parse(Family::V4, &["10.0.0.0/16".into()], 33),
        Err(ConfigError::BadMaskSize { .. })
    ));
    assert!(matches!(
        FamilyConfig::parse(Family::V4, &["nope".into()], 24),
        Err(ConfigError::NotCidr(_))
    ));
}

#[test]
fn allocates_distinct_blocks_first_fit_across_cidrs() {
    let mut pool = Pool::new(v4(&["10.0.0.0/23", "10.9.0.0/24"], 24));
    assert_eq!(pool.allocate("a").unwrap(), vec![net("10.0.0.0/24")]);
    assert_eq!(pool.allocate("b").unwrap(), vec![net("10.0.1.0/24")]);
    assert_eq!(pool.allocate("c").unwrap(), vec![net("10.9.0.0/24")]);
    // Idempotent: asking again returns the same block.
    assert_eq!(pool.allocate("a").unwrap(), vec![net("10.0.0.0/24")]);
    let err = pool.allocate("d").unwrap_err();
    assert_eq!(
        err,
        AllocError::Exhausted {
            family: Family::V4,
            mask_size: 24,
            cidrs: "10.0.0.0/23, 10.9.0.0/24".into()
        }
    );
    assert_eq!(pool.node_cidrs("d"), None);
    assert_eq!(pool.available_nodes(), 0);
    // Freeing a node lets the waiting one in, on the freed block.
    assert_eq!(pool.release("b"), vec![net("10.0.1.0/24")]);
    assert_eq!(pool.allocate("d").unwrap(), vec![net("10.0.1.0/24")]);
}

#[test]
fn dual_stack_is_all_or_nothing() {
    let mut pool = Pool::new(dual(&["10.0.0.0/23"], 24, &["fd00::/63"], 64));
    assert_eq!(
        pool.allocate("a").unwrap(),
        vec![net("10.0.0.0/24"), net("fd00::/64")]
    );
    assert_eq!(
        pool.allocate("b").unwrap(),
        vec![net("10.0.1.0/24"), net("fd00:0:0:1::/64")]
    );
    pool.release("a");
    // Shrink v6 capacity by hand: take the freed v6 block with a restored node.
    assert!(pool.restore("x", &[net("fd00::/64")]).is_empty());
    let err = pool.allocate("c").unwrap_err();
    assert!(matches!(
        err,
        AllocError::Exhausted {
            family: Family::V6,
            ..
        }
    ));
    // The v4 block found for c was not kept.
    assert_eq!(pool.node_cidrs("c"), None);
    assert_eq!(pool.usage()[0].allocated, 1);
}

#[test]
fn ipv6_pools_count_without_overflow() {
    let pool = Pool::new(dual(&["10.0.0.0/8"], 24, &["fd00::/8"], 126));
    let usage = pool.usage();
    assert_eq!(usage[0].available, 65536);
    assert_eq!(usage[1].available, 1u128 << 118);
    assert_eq!(pool.available_nodes(), 65536);
}

#[test]
fn restore_rebuilds_exactly_and_reports_conflicts() {
    let mut pool = Pool::new(v4(&["10.0.0.0/22"], 24));
    assert!(pool.restore("b", &[net("10.0.2.0/24")]).is_empty());
    assert!(pool.restore("a", &[net("10.0.0.0/24")]).is_empty());
    let conflicts = pool.restore("c", &[net("10.0.2.0/24")]);
    assert_eq!(
        conflicts,
        vec![RestoreConflict {
            node: "c".into(),
            cidr: net("10.0.2.0/24"),
            held: net("10.0.2.0/24"),
            holder: "b".into()
        }]
    );
    // Restoring the same node twice is harmless.
    assert!(pool.restore("b", &[net("10.0.2.0/24")]).is_empty());
    assert_eq!(pool.node_cidrs("b"), Some(&[net("10.0.2.0/24")][..]));
    // The gap is filled first, restored blocks are skipped.
    assert_eq!(pool.allocate("c").unwrap(), vec![net("10.0.1.0/24")]);
    assert_eq!(pool.allocate("d").unwrap(), vec![net("10.0.3.0/24")]);
    assert!(pool.allocate("e").is_err());
}

#[test]
fn foreign_blocks_are_kept_and_never_overlapped() {
    // A /23 restored into a /24 pool (e.g. written before a mask change): pinned.
    let mut pool = Pool::new(v4(&["10.0.0.0/22"], 24));
    assert!(pool.restore("old", &[net("10.0.0.0/23")]).is_empty());
    assert_eq!(pool.allocate("a").unwrap(), vec![net("10.0.2.0/24")]);
    assert_eq!(pool.usage()[0].available, 1);
    let reasons = pool.violations(&pool.config().clone());
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(reasons[0].contains("not /24 blocks"), "{reasons:?}");
}

#[test]
fn foreign_blocks_are_skipped_but_not_counted_as_allocations() {
    let mut pool = Pool::new(v4(&["10.0.0.0/22"], 24));
    pool.reserve_foreign("orphan", net("10.0.0.0/24"));
    pool.reserve_foreign("orphan2", net("10.0.1.0/25"));
    assert_eq!(pool.allocate("a").unwrap(), vec![net("10.0.2.0/24")]);
    assert_eq!(pool.allocate("b").unwrap(), vec![net("10.0.3.0/24")]);
    assert!(pool.allocate("c").is_err());
    assert_eq!(pool.allocated_blocks(), 2);
    assert_eq!(pool.available_nodes(), 0);
    assert!(pool.violations(&pool.config().clone()).is_empty());
}

#[test]
fn refuses_removing_a_cidr_under_allocations_and_keeps_the_old_config() {
    let mut pool = Pool::new(v4(&["10.0.0.0/24", "10.1.0.0/24"], 25));
    pool.allocate("a").unwrap();
    pool.allocate("b").unwrap();
    pool.allocate("c").unwrap(); // 10.1.0.0/25
    let refusal = pool
        .apply_config(v4(&["10.0.0.0/24"], 25))
        .unwrap_err()
        .to_string();
    assert!(refusal.contains("10.1.0.0/25 on c"), "{refusal}");
    assert!(refusal.contains("re-address"), "{refusal}");
    // Old config still in effect: the next node gets a block from the kept CIDR.
    assert_eq!(pool.allocate("d").unwrap(), vec![net("10.1.0.128/25")]);
    // Removing a CIDR without allocations is fine; growing is fine.
    pool.release("c");
    pool.release("d");
    pool.apply_config(v4(&["10.0.0.0/24"], 25)).unwrap();
    assert!(pool.allocate("e").is_err());
    pool.apply_config(v4(&["10.0.0.0/24", "10.2.0.0/24"], 25))
        .unwrap();
    assert_eq!(pool.allocate("e").unwrap(), vec![net("10.2.0.0/25")]);
}

#[test]
fn refuses_mask_change_and_family_removal_under_allocations() {
    let mut pool = Pool::new(dual(&["10.0.0.0/16"], 24, &["fd00::/56"], 64));
    pool.allocate("a").unwrap();
    let r = pool
        .apply_config(dual(&["10.0.0.0/16"], 25, &["fd00::/56"], 64))
        .unwrap_err();
    assert_eq!(r.reasons.len(), 1, "{r}");
    assert!(r.reasons[0].contains("maskSize change /24 -> /25"), "{r}");
    let r = pool.apply_config(v4(&["10.0.0.0/16"], 24)).unwrap_err();
    assert!(r.reasons[0].contains("ipv6 removed"), "{r}");
    assert_eq!(
        pool.config(),
        &dual(&["10.0.0.0/16"], 24, &["fd00::/56"], 64)
    );
    // Without allocations the mask may change.
    pool.release("a");
    pool.apply_config(dual(&["10.0.0.0/16"], 25, &["fd00::/56"], 64))
        .unwrap();
    assert_eq!(pool.allocate("a").unwrap()[0], net("10.0.0.0/25"));
}

#[derive(Clone, Debug)]
enum Op {
    Allocate(u8),
    Release(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..24).prop_map(Op::Allocate),
        (0u8..24).prop_map(Op::Release),
    ]
}

proptest! {
    /// No two nodes ever hold overlapping blocks; every block lies in the pool with the
    /// pool's mask; allocated + available == capacity (nothing leaks); exhaustion only
    /// when the pool is really full; a rebuild from the node→CIDR map is identical.
    #[test]
    fn allocations_never_overlap_or_leak(ops in proptest::collection::vec(op(), 1..200)) {
        let config = dual(&["10.0.0.0/28", "10.0.1.0/29"], 30, &["fd00::/124"], 126);
        let mut pool = Pool::new(config.clone());
        let capacity_v4 = 4 + 2;
        let capacity_v6 = 4;
        for op in ops {
            match op {
                Op::Allocate(n) => {
                    let before = pool.allocated_blocks();
                    match pool.allocate(&format!("n{n}")) {
                        Ok(blocks) => prop_assert_eq!(blocks.len(), 2),
                        Err(_) => {
                            prop_assert_eq!(pool.allocated_blocks(), before);
                            prop_assert_eq!(pool.available_nodes(), 0);
                        }
                    }
                }
                Op::Release(n) => { pool.release(&format!("n{n}")); }
            }
            let all: Vec<(String, IpNet)> = pool
                .allocations()
                .flat_map(|(n, cs)| cs.iter().map(move |c| (n.to_string(), *c)))
                .collect();
            for (i, (na, a)) in all.iter().enumerate() {
                prop_assert!(config.all_cidrs().any(|c| c.contains(a)));
                prop_assert_eq!(a.prefix_len(), if Family::of(a) == Family::V4 { 30 } else { 126 });
                for (nb, b) in &all[i + 1..] {
                    prop_assert!(!overlaps(a, b), "{} {} overlaps {} {}", na, a, nb, b);
                }
            }
            let usage = pool.usage();
            prop_assert_eq!(usage[0].allocated + usage[0].available, capacity_v4);
            prop_assert_eq!(usage[1].allocated + usage[1].available, capacity_v6);
            let mut rebuilt = Pool::new(config.clone());
            for (node, cidrs) in pool.allocations() {
                prop_assert!(rebuilt.restore(node, cidrs).is_empty());
            }
            prop_assert_eq!(&rebuilt, &pool);
        }
    }
}
