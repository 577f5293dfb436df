//! One pool's decisions on plain values: pools, `NodeNetwork`s and node labels in, writes
//! and conditions out.

use super::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use pretty_assertions::assert_eq;
use serde_json::json;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn sel(k: &str, v: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels(&[(k, v)])),
        ..Default::default()
    }
}

#[test]
fn explicit_selector_beats_default_beats_other_catch_alls() {
    let gpu = sel("gpu", "true");
    let pools = [("aaa", None), ("default", None), ("gpu", Some(&gpu))];
    assert_eq!(
        select_pool(&labels(&[("gpu", "true")]), pools, "default").as_deref(),
        Some("gpu")
    );
    assert_eq!(
        select_pool(&labels(&[]), pools, "default").as_deref(),
        Some("default")
    );
    assert_eq!(
        select_pool(&labels(&[]), [("aaa", None), ("bbb", None)], "default").as_deref(),
        Some("aaa")
    );
    assert_eq!(
        select_pool(&labels(&[]), [("gpu", Some(&gpu))], "default"),
        None
    );
}

/// A pool of IPv4 `cidrs` with /`mask` blocks, created at second `created`.
fn pool(name: &str, cidrs: &[&str], mask: i64, created: i64) -> Arc<PodIPPool> {
    let mut p: PodIPPool = serde_json::from_value(json!({
        "apiVersion": "tendril.dev/v1alpha1", "kind": "PodIPPool",
        "metadata": {"name": name, "generation": 1},
        "spec": {"ipv4": {"cidrs": cidrs, "maskSize": mask}},
    }))
    .unwrap();
    p.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
    Arc::new(p)
}

/// A node's `NodeNetwork`, holding `cidrs` of `pool` (none: not allocated yet).
fn network(node: &str, pool: Option<&str>, cidrs: &[&str]) -> Arc<NodeNetwork> {
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "tendril.dev/v1alpha1", "kind": "NodeNetwork",
            "metadata": {"name": node, "uid": format!("uid-{node}")},
            "spec": {"podCIDRs": cidrs, "podIPPool": pool},
        }))
        .unwrap(),
    )
}

struct World {
    pools: Vec<Arc<PodIPPool>>,
    networks: Vec<Arc<NodeNetwork>>,
    nodes: BTreeMap<String, Labels>,
}

impl World {
    fn new(pools: Vec<Arc<PodIPPool>>, networks: Vec<Arc<NodeNetwork>>) -> Self {
        let nodes = networks
            .iter()
            .map(|n| (n.name_any(), Labels::new()))
            .collect();
        Self {
            pools,
            networks,
            nodes,
        }
    }

    fn plan(&self, state: &mut Pools, pool: &str) -> Outcome {
        let obj = self.pools.iter().find(|p| p.name_any() == pool).unwrap();
        let input = Inputs {
            pools: &self.pools,
            networks: &self.networks,
            node_labels: &self.nodes,
            default_pool: "default",
        };
        plan(state, obj, &input)
    }
}

fn write(node: &str, cidr: &str) -> Write {
    Write {
        node: node.into(),
        uid: Some(format!("uid-{node}")),
        cidrs: vec![cidr.parse().unwrap()],
    }
}

#[test]
fn a_restart_restores_the_allocations_and_hands_out_the_next_free_block() {
    let world = World::new(
        vec![pool("default", &["10.0.0.0/24"], 26, 1)],
        vec![
            network("a", Some("default"), &["10.0.0.0/26"]),
            network("b", None, &[]),
        ],
    );
    let mut state = Pools::new();
    let out = world.plan(&mut state, "default");
    assert_eq!(out.restored, Some(1));
    assert_eq!(out.writes, vec![write("b", "10.0.0.64/26")]);
    assert!(out.usable && out.valid.status, "{:?}", out.valid);
    assert_eq!((out.allocated, out.available, out.waiting), (2, 2, 0));
    let [valid, ready, exhausted] = conditions(&out);
    assert_eq!(valid.reason, "Accepted");
    assert_eq!((ready.status, ready.reason.as_str()), (true, "Allocated"));
    assert_eq!(
        (exhausted.status, exhausted.reason.as_str()),
        (false, "SpaceLeft")
    );
    // The memory is kept: the next reconcile restores nothing and writes nothing new.
    let again = world.plan(&mut state, "default");
    assert_eq!(again.restored, None);
    assert_eq!(
        again.writes,
        vec![write("b", "10.0.0.64/26")],
        "b's NodeNetwork still lacks it"
    );
}

#[test]
fn an_exhausted_pool_makes_nodes_wait_once_and_frees_blocks_of_gone_nodes() {
    let pools = vec![pool("default", &["10.0.0.0/25"], 26, 1)];
    let mut world = World::new(
        pools.clone(),
        vec![
            network("a", Some("default"), &["10.0.0.0/26"]),
            network("b", Some("default"), &["10.0.0.64/26"]),
            network("c", None, &[]),
        ],
    );
    let mut state = Pools::new();
    let out = world.plan(&mut state, "default");
    assert!(out.writes.is_empty());
    assert_eq!(out.newly_waiting.len(), 1);
    assert_eq!(out.newly_waiting[0].0, "c");
    assert_eq!(out.waiting, 1);
    let [_, ready, exhausted] = conditions(&out);
    assert_eq!((ready.status, ready.reason.as_str()), (false, "Exhausted"));
    assert_eq!(
        (exhausted.status, exhausted.reason.as_str()),
        (true, "NodesWaiting")
    );
    // Still waiting: not newly.
    assert!(world.plan(&mut state, "default").newly_waiting.is_empty());
    // Node a goes away: its block is freed and c gets it in the same reconcile.
    world.networks.remove(0);
    let out = world.plan(&mut state, "default");
    assert_eq!(
        out.freed,
        vec![("a".to_string(), vec!["10.0.0.0/26".parse().unwrap()])]
    );
    assert_eq!(out.writes, vec![write("c", "10.0.0.0/26")]);
    assert_eq!(out.waiting, 0);
}

#[test]
fn a_pool_overlapping_an_older_one_is_refused_and_allocates_nothing() {
    let world = World::new(
        vec![
            pool("default", &["10.0.0.0/24"], 26, 1),
            pool("young", &["10.0.0.0/16"], 26, 2),
        ],
        vec![network("a", None, &[])],
    );
    let mut state = Pools::new();
    let out = world.plan(&mut state, "young");
    assert!(!out.usable);
    assert!(!out.valid.status);
    assert_eq!(out.valid.reason, "InvalidSpec");
    assert!(
        out.valid.message.contains("older pool default"),
        "{}",
        out.valid.message
    );
    assert!(out.writes.is_empty());
    let [_, ready, _] = conditions(&out);
    assert_eq!((ready.status, ready.reason.as_str()), (false, "Invalid"));
    assert!(!state.contains_key("young"));
}

#[test]
fn nodes_follow_their_labels_to_a_pool_until_they_hold_cidrs() {
    let mut world = World::new(
        vec![pool("default", &["10.0.0.0/24"], 26, 1), {
            let mut p = PodIPPool::clone(&pool("gpu", &["10.1.0.0/24"], 26, 2));
            p.spec.node_selector = Some(sel("gpu", "true"));
            Arc::new(p)
        }],
        vec![network("a", None, &[]), network("b", None, &[])],
    );
    world.nodes.insert("a".into(), labels(&[("gpu", "true")]));
    // A NodeNetwork whose Node is not known yet waits for it.
    world.nodes.remove("b");
    let mut state = Pools::new();
    assert!(world.plan(&mut state, "default").writes.is_empty());
    assert_eq!(
        world.plan(&mut state, "gpu").writes,
        vec![write("a", "10.1.0.0/26")]
    );
}
