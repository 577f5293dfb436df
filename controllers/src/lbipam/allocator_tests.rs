//! Tests of `allocator`, in a file of their own.
use super::*;
use proptest::prelude::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn key(ns: &str, name: &str) -> ServiceKey {
    (ns.to_string(), name.to_string())
}

fn range(a: &str, b: &str) -> Range {
    Range::new(ip(a), ip(b)).unwrap()
}

fn pool(name: &str, created: i64, ranges: Vec<Range>) -> Pool {
    Pool {
        name: name.into(),
        created: Some(created),
        ranges,
        problems: Vec::new(),
        selector: PoolSelector::All,
        disabled: false,
    }
}

fn svc(ns: &str, name: &str, created: i64) -> ServiceRequest {
    let mut labels = Labels::new();
    labels.insert(NAMESPACE_LABEL.into(), ns.into());
    labels.insert(NAME_LABEL.into(), name.into());
    ServiceRequest {
        key: key(ns, name),
        created: Some(created),
        labels,
        families: vec![Family::V4],
        require_all_families: true,
        requested: Vec::new(),
        sharing: None,
        ports: [("TCP".to_string(), 80)].into(),
    }
}

fn shared(mut s: ServiceRequest, k: &str, port: i32) -> ServiceRequest {
    s.sharing = Some(Sharing {
        key: k.into(),
        local_selector: None,
        cross_namespace: BTreeSet::new(),
    });
    s.ports = [("TCP".to_string(), port)].into();
    s
}

fn letting_in(mut s: ServiceRequest, namespaces: &[&str]) -> ServiceRequest {
    if let Some(sh) = &mut s.sharing {
        sh.cross_namespace = namespaces.iter().map(|n| n.to_string()).collect();
    }
    s
}

fn ips_of(out: &Outcome, ns: &str, name: &str) -> Vec<IpAddr> {
    out.services[&key(ns, name)].ips.clone()
}

#[test]
fn cidr_ranges_leave_out_network_and_broadcast_unless_asked() {
    let net: IpNet = "198.51.100.0/30".parse().unwrap();
    assert_eq!(
        Range::of_cidr(net, false),
        range("198.51.100.1", "198.51.100.2")
    );
    assert_eq!(
        Range::of_cidr(net, true),
        range("198.51.100.0", "198.51.100.3")
    );
    // /31 and /32 have no network and broadcast address to spare.
    let p2p: IpNet = "198.51.100.4/31".parse().unwrap();
    assert_eq!(Range::of_cidr(p2p, false).size(), 2);
    let v6: IpNet = "2001:db8::/126".parse().unwrap();
    assert_eq!(
        Range::of_cidr(v6, false),
        range("2001:db8::1", "2001:db8::2")
    );
    assert!(Range::new(ip("10.0.0.9"), ip("10.0.0.1")).is_none());
    assert!(Range::new(ip("10.0.0.1"), ip("::1")).is_none());
}

#[test]
fn services_get_the_lowest_free_address_and_keep_it() {
    let pools = [pool("blue", 1, vec![range("10.0.0.1", "10.0.0.3")])];
    let mut a = Allocator::new();
    let out = a.plan(&pools, &[svc("ns", "a", 1), svc("ns", "b", 2)]);
    assert_eq!(ips_of(&out, "ns", "a"), [ip("10.0.0.1")]);
    assert_eq!(ips_of(&out, "ns", "b"), [ip("10.0.0.2")]);
    assert_eq!(out.pools["blue"].used, 2);
    assert_eq!(out.pools["blue"].available(), 1);
    // a goes: b keeps its address, a newcomer takes the lowest free one.
    let out = a.plan(&pools, &[svc("ns", "b", 2), svc("ns", "c", 3)]);
    assert_eq!(out.released, [(key("ns", "a"), ip("10.0.0.1"))]);
    assert_eq!(ips_of(&out, "ns", "b"), [ip("10.0.0.2")]);
    assert_eq!(ips_of(&out, "ns", "c"), [ip("10.0.0.1")]);
}

#[test]
fn exhaustion_is_a_problem_and_the_waiting_service_gets_the_next_free_address() {
    let pools = [pool("tiny", 1, vec![range("10.0.0.1", "10.0.0.1")])];
    let mut a = Allocator::new();
    let out = a.plan(&pools, &[svc("ns", "a", 1), svc("ns", "b", 2)]);
    assert_eq!(ips_of(&out, "ns", "a"), [ip("10.0.0.1")]);
    assert_eq!(
        out.services[&key("ns", "b")].problems,
        [Problem::Exhausted {
            family: Family::V4,
            pools: vec!["tiny".into()]
        }]
    );
    assert_eq!(out.pools["tiny"].waiting, 1);
    let out = a.plan(&pools, &[svc("ns", "b", 2)]);
    assert_eq!(ips_of(&out, "ns", "b"), [ip("10.0.0.1")]);
    assert!(out.services[&key("ns", "b")].satisfied());
}

#[test]
fn requested_addresses_are_honoured_or_reported() {
    let pools = [pool("blue", 1, vec![range("10.0.0.1", "10.0.0.9")])];
    let mut want = svc("ns", "a", 1);
    want.requested = vec![ip("10.0.0.7")];
    let mut thief = svc("ns", "b", 2);
    thief.requested = vec![ip("10.0.0.7")];
    let mut outside = svc("ns", "c", 3);
    outside.requested = vec![ip("192.0.2.1")];
    let mut a = Allocator::new();
    let out = a.plan(&pools, &[want.clone(), thief.clone(), outside.clone()]);
    assert_eq!(ips_of(&out, "ns", "a"), [ip("10.0.0.7")]);
    assert_eq!(
        out.services[&key("ns", "b")].problems,
        [Problem::Taken {
            ip: ip("10.0.0.7"),
            holder: key("ns", "a"),
            why: "no sharing key"
        }]
    );
    assert!(ips_of(&out, "ns", "b").is_empty());
    assert_eq!(
        out.services[&key("ns", "c")].problems,
        [Problem::NotInPool {
            ip: ip("192.0.2.1")
        }]
    );
    // The older holder keeps it even when the newcomer is listed first.
    let out = a.plan(&pools, &[thief, want.clone()]);
    assert_eq!(ips_of(&out, "ns", "a"), [ip("10.0.0.7")]);
    // A changed request moves the address; the old one is released.
    want.requested = vec![ip("10.0.0.8")];
    let out = a.plan(&pools, &[want]);
    assert_eq!(ips_of(&out, "ns", "a"), [ip("10.0.0.8")]);
    assert!(out.released.contains(&(key("ns", "a"), ip("10.0.0.7"))));
}

#[test]
fn a_sharing_key_shares_an_address_between_disjoint_ports_only() {
    let pools = [pool("blue", 1, vec![range("10.0.0.1", "10.0.0.9")])];
    let web = shared(svc("ns", "web", 1), "k", 80);
    let dns = shared(svc("ns", "dns", 2), "k", 53);
    let clash = shared(svc("ns", "clash", 3), "k", 80);
    let other_ns = shared(svc("other", "x", 4), "k", 8080);
    let mut a = Allocator::new();
    let out = a.plan(&pools, &[web.clone(), dns.clone(), clash.clone(), other_ns]);
    assert_eq!(ips_of(&out, "ns", "web"), [ip("10.0.0.1")]);
    assert_eq!(ips_of(&out, "ns", "dns"), [ip("10.0.0.1")]);
    // Port 80 collides with web's: another address, then shared by nobody else.
    assert_eq!(ips_of(&out, "ns", "clash"), [ip("10.0.0.2")]);
    assert_eq!(ips_of(&out, "other", "x"), [ip("10.0.0.3")]);
    assert_eq!(out.pools["blue"].used, 3);
    // dns changes its port to 80: it collides with the older web and moves.
    let dns80 = shared(svc("ns", "dns", 2), "k", 80);
    let out = a.plan(&pools, &[web.clone(), dns80, clash]);
    assert_eq!(ips_of(&out, "ns", "web"), [ip("10.0.0.1")]);
    assert_eq!(ips_of(&out, "ns", "clash"), [ip("10.0.0.2")]);
    assert_eq!(ips_of(&out, "ns", "dns"), [ip("10.0.0.3")]);
    // Across namespaces only when both let the other in.
    let mut x = Allocator::new();
    let here = letting_in(shared(svc("ns", "here", 1), "k", 80), &["other"]);
    let there = letting_in(shared(svc("other", "there", 2), "k", 53), &["*"]);
    let nosy = shared(svc("third", "nosy", 3), "k", 443);
    let out = x.plan(&pools, &[here.clone(), there, nosy.clone()]);
    assert_eq!(ips_of(&out, "ns", "here"), [ip("10.0.0.1")]);
    assert_eq!(ips_of(&out, "other", "there"), [ip("10.0.0.1")]);
    assert_eq!(ips_of(&out, "third", "nosy"), [ip("10.0.0.2")]);
    let mut nosy = letting_in(nosy, &["*"]);
    nosy.requested = vec![ip("10.0.0.1")];
    let out = x.plan(&pools, &[here, nosy]);
    assert_eq!(
        out.services[&key("third", "nosy")].problems,
        [Problem::Taken {
            ip: ip("10.0.0.1"),
            holder: key("ns", "here"),
            why: "another namespace, not let in by both"
        }]
    );

    // Without a key, a requested shared address is refused.
    let mut plain = svc("ns", "plain", 5);
    plain.requested = vec![ip("10.0.0.1")];
    plain.ports = [("UDP".to_string(), 9)].into();
    let out = a.plan(&pools, &[web, plain]);
    assert!(matches!(
        out.services[&key("ns", "plain")].problems[..],
        [Problem::Taken { .. }]
    ));
}

#[test]
fn dual_stack_takes_one_address_per_family() {
    let pools = [
        pool("v4", 1, vec![range("10.0.0.1", "10.0.0.9")]),
        pool("v6", 2, vec![range("2001:db8::1", "2001:db8::9")]),
    ];
    let mut s = svc("ns", "a", 1);
    s.families = vec![Family::V6, Family::V4];
    let mut a = Allocator::new();
    let out = a.plan(&pools, std::slice::from_ref(&s));
    assert_eq!(ips_of(&out, "ns", "a"), [ip("10.0.0.1"), ip("2001:db8::1")]);
    // PreferDualStack without an IPv6 pool is satisfied with IPv4; RequireDualStack is not.
    let mut a = Allocator::new();
    s.require_all_families = false;
    let out = a.plan(&pools[..1], std::slice::from_ref(&s));
    assert!(out.services[&s.key].satisfied());
    let mut a = Allocator::new();
    s.require_all_families = true;
    let out = a.plan(&pools[..1], std::slice::from_ref(&s));
    assert_eq!(
        out.services[&s.key].problems,
        [Problem::NoPool { family: Family::V6 }]
    );
}

#[test]
fn disabled_and_conflicting_pools_keep_but_do_not_give() {
    let mut blue = pool("blue", 1, vec![range("10.0.0.1", "10.0.0.2")]);
    let red = pool("red", 2, vec![range("10.0.0.2", "10.0.0.5")]);
    let mut a = Allocator::new();
    let out = a.plan(&[blue.clone(), red.clone()], &[svc("ns", "a", 1)]);
    assert_eq!(
        out.pools["red"].conflict.as_deref(),
        Some("block 10.0.0.2-10.0.0.5 overlaps block 10.0.0.1-10.0.0.2 of the older pool blue")
    );
    assert_eq!(out.pools["blue"].conflict, None);
    assert_eq!(ips_of(&out, "ns", "a"), [ip("10.0.0.1")]);
    blue.disabled = true;
    let out = a.plan(
        &[blue.clone(), red],
        &[svc("ns", "a", 1), svc("ns", "b", 2)],
    );
    assert_eq!(ips_of(&out, "ns", "a"), [ip("10.0.0.1")], "kept");
    assert_eq!(
        out.services[&key("ns", "b")].problems,
        [Problem::NoPool { family: Family::V4 }]
    );
    // The pool gone: its addresses are released.
    let out = a.plan(&[], &[svc("ns", "a", 1)]);
    assert!(ips_of(&out, "ns", "a").is_empty());
    assert_eq!(out.released, [(key("ns", "a"), ip("10.0.0.1"))]);
}

#[test]
fn selectors_decide_who_draws_from_a_pool() {
    let selector: Selector = [("color".to_string(), "red".to_string())]
        .into_iter()
        .collect::<Selector>();
    let mut red = pool("red", 1, vec![range("10.0.0.1", "10.0.0.9")]);
    red.selector = PoolSelector::Matching(selector);
    let mut by_ns = pool("tenant", 2, vec![range("10.1.0.1", "10.1.0.9")]);
    by_ns.selector = PoolSelector::Matching(
        [(NAMESPACE_LABEL.to_string(), "tenant".to_string())]
            .into_iter()
            .collect::<Selector>(),
    );
    let mut r = svc("ns", "r", 1);
    r.labels.insert("color".into(), "red".into());
    let mut a = Allocator::new();
    let out = a.plan(
        &[red.clone(), by_ns.clone()],
        &[r.clone(), svc("ns", "plain", 2), svc("tenant", "t", 3)],
    );
    assert_eq!(ips_of(&out, "ns", "r"), [ip("10.0.0.1")]);
    assert!(ips_of(&out, "ns", "plain").is_empty());
    assert_eq!(ips_of(&out, "tenant", "t"), [ip("10.1.0.1")]);
    // The label goes: the address is released.
    r.labels.remove("color");
    let out = a.plan(&[red, by_ns], &[r]);
    assert!(ips_of(&out, "ns", "r").is_empty());
}

#[test]
fn a_rebuild_from_status_restores_every_address_even_out_of_order() {
    let pools = [pool("blue", 1, vec![range("10.0.0.1", "10.0.0.9")])];
    let services = [svc("ns", "a", 1), svc("ns", "b", 2), svc("ns", "c", 3)];
    let mut a = Allocator::new();
    a.plan(&pools, &services[..1]);
    a.plan(&pools, &services);
    let before = a.assignment().clone();
    // Released addresses below the others must not pull anyone down after a restart.
    let out = a.plan(&pools, &services[1..]);
    let mut b = Allocator::new();
    for (k, ips) in a.assignment().iter().rev() {
        b.restore(k, ips.iter().copied());
    }
    let again = b.plan(&pools, &services[1..]);
    assert_eq!(again.services, out.services);
    assert_eq!(b.assignment(), a.assignment());
    assert_ne!(&before, a.assignment());
    // Two Services claiming one address in their status: the older keeps it.
    let mut c = Allocator::new();
    c.restore(&key("ns", "c"), [ip("10.0.0.5")]);
    c.restore(&key("ns", "b"), [ip("10.0.0.5")]);
    let out = c.plan(&pools, &services[1..]);
    assert_eq!(ips_of(&out, "ns", "b"), [ip("10.0.0.5")]);
    assert_eq!(ips_of(&out, "ns", "c"), [ip("10.0.0.1")]);
}

/// Prints what a plan costs at scale (a figure, not an assertion): 10,000 Services in one
/// /16, first allocated from nothing, then a steady-state pass that changes nothing.
/// `hack/bench.sh lbipam` runs it (release build).
#[test]
#[ignore]
fn lbipam_plan_cost() {
    let pools = [pool(
        "big",
        1,
        vec![Range::of_cidr("10.100.0.0/16".parse().unwrap(), false)],
    )];
    let services: Vec<ServiceRequest> = (0..10_000)
        .map(|i| svc(&format!("ns{}", i % 50), &format!("s{i}"), i))
        .collect();
    let mut a = Allocator::new();
    let t = std::time::Instant::now();
    let out = a.plan(&pools, &services);
    let first = t.elapsed();
    assert_eq!(out.assigned.len(), 10_000);
    let t = std::time::Instant::now();
    let out = a.plan(&pools, &services);
    let steady = t.elapsed();
    assert!(out.assigned.is_empty());
    println!("10,000 services: first plan {first:?}, steady-state plan {steady:?}");
}

// ---- property test: random worlds, an independent check of every invariant ----

#[derive(Clone, Debug)]
enum Op {
    /// Creates or changes service `n`.
    Service {
        n: usize,
        ns: usize,
        color: bool,
        families: usize,
        require_all: bool,
        requested: Vec<u8>,
        key: Option<u8>,
        cross: bool,
        ports: Vec<u8>,
    },
    DeleteService(usize),
    /// Creates or changes pool `n`.
    Pool {
        n: usize,
        blocks: Vec<(u8, u8)>,
        v6: bool,
        only_red: bool,
        disabled: bool,
    },
    DeletePool(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (
            0..10usize,
            0..2usize,
            any::<bool>(),
            0..3usize,
            any::<bool>(),
            proptest::collection::vec(0..24u8, 0..2),
            proptest::option::of(0..2u8),
            any::<bool>(),
            proptest::collection::vec(0..3u8, 1..3),
        )
            .prop_map(
                |(n, ns, color, families, require_all, requested, key, cross, ports)| {
                    Op::Service {
                        n,
                        ns,
                        color,
                        families,
                        require_all,
                        requested,
                        key,
                        cross,
                        ports,
                    }
                }
            ),
        2 => (0..10usize).prop_map(Op::DeleteService),
        2 => (
            0..3usize,
            proptest::collection::vec((0..24u8, 0..6u8), 1..3),
            any::<bool>(),
            any::<bool>(),
            proptest::bool::weighted(0.2),
        )
            .prop_map(|(n, blocks, v6, only_red, disabled)| Op::Pool {
                n,
                blocks,
                v6,
                only_red,
                disabled,
            }),
        1 => (0..3usize).prop_map(Op::DeletePool),
    ]
}

/// Address `i` of the small test space of a family.
fn addr(v6: bool, i: u8) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(i)))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, i))
    }
}

fn apply(
    op: &Op,
    pools: &mut BTreeMap<usize, Pool>,
    services: &mut BTreeMap<usize, ServiceRequest>,
) {
    match op {
        Op::Service {
            n,
            ns,
            color,
            families,
            require_all,
            requested,
            key,
            cross,
            ports,
        } => {
            let created = services.get(n).and_then(|s| s.created).unwrap_or(*n as i64);
            let mut s = svc(&format!("ns{ns}"), &format!("s{n}"), created);
            if *color {
                s.labels.insert("color".into(), "red".into());
            }
            s.families = match families {
                0 => vec![Family::V4],
                1 => vec![Family::V6],
                _ => vec![Family::V4, Family::V6],
            };
            s.require_all_families = *require_all;
            s.requested = requested.iter().map(|i| addr(i % 2 == 1, *i)).collect();
            s.sharing = key.map(|k| Sharing {
                key: format!("k{k}"),
                local_selector: None,
                cross_namespace: match cross {
                    true => ["*".to_string()].into(),
                    false => BTreeSet::new(),
                },
            });
            s.ports = ports
                .iter()
                .map(|p| ("TCP".to_string(), i32::from(*p)))
                .collect();
            services.insert(*n, s);
        }
        Op::DeleteService(n) => {
            services.remove(n);
        }
        Op::Pool {
            n,
            blocks,
            v6,
            only_red,
            disabled,
        } => {
            let created = pools.get(n).and_then(|p| p.created).unwrap_or(*n as i64);
            let mut p = pool(&format!("p{n}"), created, Vec::new());
            let mut ranges: Vec<Range> = Vec::new();
            for (start, len) in blocks {
                let r = range_of(*v6, *start, start.saturating_add(*len).min(24));
                // Blocks of one pool never overlap (the pool's parser refuses that).
                if !ranges.iter().any(|o| o.overlaps(&r)) {
                    ranges.push(r);
                }
            }
            p.ranges = ranges;
            if *only_red {
                p.selector = PoolSelector::Matching(
                    [("color".to_string(), "red".to_string())]
                        .into_iter()
                        .collect::<Selector>(),
                );
            }
            p.disabled = *disabled;
            pools.insert(*n, p);
        }
        Op::DeletePool(n) => {
            pools.remove(n);
        }
    }
}

fn range_of(v6: bool, a: u8, b: u8) -> Range {
    Range::new(addr(v6, a), addr(v6, b)).unwrap()
}

/// Whether two services may hold one address, written out here apart from the
/// allocator's own rule: the same key, the same traffic policy, disjoint ports, and one
/// namespace or both letting any other in (the only cross-namespace setting generated).
fn may_share(a: &ServiceRequest, b: &ServiceRequest) -> bool {
    match (&a.sharing, &b.sharing) {
        (Some(x), Some(y)) => {
            x.key == y.key
                && x.local_selector == y.local_selector
                && a.ports.iter().all(|p| !b.ports.contains(p))
                && (a.key.0 == b.key.0
                    || (x.cross_namespace.contains("*") && y.cross_namespace.contains("*")))
        }
        _ => false,
    }
}

/// The invariants, checked from the outcome and the world alone.
fn check(
    out: &Outcome,
    alloc: &Allocator,
    pools: &[Pool],
    services: &[ServiceRequest],
) -> Result<(), TestCaseError> {
    let by_key: BTreeMap<&ServiceKey, &ServiceRequest> =
        services.iter().map(|s| (&s.key, s)).collect();
    // The outcome is the allocator's memory, for exactly the services of the world.
    prop_assert_eq!(out.services.len(), services.len());
    let mut holders: BTreeMap<IpAddr, Vec<&ServiceKey>> = BTreeMap::new();
    for (k, o) in &out.services {
        let held: Vec<IpAddr> = alloc
            .assignment()
            .get(k)
            .into_iter()
            .flatten()
            .copied()
            .collect();
        let mut sorted = o.ips.clone();
        sorted.sort();
        prop_assert_eq!(&sorted, &held);
        for ip in &o.ips {
            holders.entry(*ip).or_default().push(k);
        }
    }
    prop_assert!(
        alloc.assignment().keys().all(|k| by_key.contains_key(k)),
        "a gone service holds an address"
    );
    for (ip, hs) in &holders {
        // Never one address to two services that cannot share it.
        for (i, a) in hs.iter().enumerate() {
            for b in &hs[i + 1..] {
                prop_assert!(
                    may_share(by_key[a], by_key[b]),
                    "{} held by {:?} and {:?}",
                    ip,
                    a,
                    b
                );
            }
        }
        // Every address lies in a pool that selects each holder.
        for h in hs {
            let s = by_key[h];
            prop_assert!(
                pools
                    .iter()
                    .any(|p| p.contains(*ip) && p.selects(&s.labels)),
                "{} of {:?} is in no pool selecting it",
                ip,
                h
            );
        }
    }
    for s in services {
        let o = &out.services[&s.key];
        if s.requested.is_empty() {
            // One address per wanted family, nothing else.
            for f in [Family::V4, Family::V6] {
                let n = o.ips.iter().filter(|ip| family_of(**ip) == f).count();
                prop_assert!(
                    n <= usize::from(s.families.contains(&f)),
                    "{:?}: {} {} addresses",
                    s.key,
                    n,
                    f
                );
            }
        } else {
            prop_assert!(o.ips.iter().all(|ip| s.requested.contains(ip)));
        }
        for p in &o.problems {
            if let Problem::Exhausted {
                family,
                pools: names,
            } = p
            {
                // Exhausted only when every address of those pools' blocks is taken.
                for name in names {
                    let pool = pools.iter().find(|x| &x.name == name).unwrap();
                    for r in pool.ranges.iter().filter(|r| r.family() == *family) {
                        for n in to_num(r.first)..=to_num(r.last) {
                            let a = from_num(*family, n);
                            prop_assert!(
                                holders.contains_key(&a),
                                "{} free in exhausted {}",
                                a,
                                name
                            );
                        }
                    }
                }
            }
        }
    }
    // Counts: used + available == size for pools whose blocks nobody else overlaps.
    for p in pools {
        let po = &out.pools[&p.name];
        let used = holders.keys().filter(|ip| p.contains(**ip)).count() as u128;
        prop_assert_eq!(po.used, used);
        prop_assert_eq!(po.used + po.available(), po.size);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]
    /// Under random creates, changes and deletes of services and pools: no address is held
    /// by two services that cannot share it, every address lies in a pool that selects its
    /// holder, exhaustion only when full, counts add up; creating or deleting a service
    /// moves no other service's address; planning twice changes nothing;
    /// and a new allocator rebuilt from the services' addresses (their status) plans to
    /// the same assignment.
    #[test]
    fn no_double_allocation_and_rebuild_reproduces(ops in proptest::collection::vec(op(), 1..60)) {
        let mut pools = BTreeMap::new();
        let mut services = BTreeMap::new();
        let mut alloc = Allocator::new();
        for op in &ops {
            // Creating or deleting one service never moves another's addresses.
            let bystanders_keep = match op {
                Op::DeleteService(_) => true,
                Op::Service { n, .. } => !services.contains_key(n),
                _ => false,
            };
            let touched = match op {
                Op::DeleteService(n) | Op::Service { n, .. } => Some(format!("s{n}")),
                _ => None,
            };
            let before = alloc.assignment().clone();
            apply(op, &mut pools, &mut services);
            let p: Vec<Pool> = pools.values().cloned().collect();
            let s: Vec<ServiceRequest> = services.values().cloned().collect();
            let out = alloc.plan(&p, &s);
            check(&out, &alloc, &p, &s)?;
            if bystanders_keep {
                for (k, ips) in &before {
                    if Some(&k.1) == touched.as_ref() {
                        continue;
                    }
                    let now = alloc.assignment().get(k).cloned().unwrap_or_default();
                    prop_assert!(ips.is_subset(&now), "{:?} had {:?}, now {:?}", k, ips, now);
                }
            }

            let again = alloc.clone().plan(&p, &s);
            prop_assert_eq!(&again.services, &out.services, "a second plan changed something");
            prop_assert!(again.assigned.is_empty() && again.released.is_empty());

            let mut rebuilt = Allocator::new();
            for (k, o) in out.services.iter().rev() {
                rebuilt.restore(k, o.ips.iter().copied());
            }
            let restored = rebuilt.plan(&p, &s);
            prop_assert_eq!(&restored.services, &out.services, "the rebuild differs");
            prop_assert_eq!(rebuilt.assignment(), alloc.assignment());
        }
    }
}
