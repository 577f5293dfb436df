//! The cluster-pool CIDR allocator: pure values, no Kubernetes client.
//!
//! A [`Pool`] holds, per IP family, a list of CIDRs and the fixed mask size of the block
//! each node gets. It hands every node at most one block per family, never hands a block
//! (or anything overlapping it) that another node holds, and is rebuilt after a restart
//! from the allocations recorded in `NodeNetwork`s ([`Pool::restore`]), so the node→CIDR
//! map comes back exactly.
//!
//! Allocation is first-fit in the order the CIDRs are listed, lowest block first: a node
//! deleted and re-created gets the lowest free block, the pool fills densely, and the
//! outcome of a sequence of operations is deterministic (easy to test and to reason about).
//!
//! Changes of the pool's configuration that would re-address running pods — a CIDR removed
//! or shrunk while blocks in it are allocated, a mask-size change, a family removed while it
//! has allocations — are refused ([`Pool::apply_config`]): the pool keeps its previous
//! effective configuration and reports why.

use ipnet::IpNet;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

/// An IP family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }

    /// Address width in bits.
    pub fn bits(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    /// The label value used in metrics: `ipv4` or `ipv6`.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One family of a pool: the CIDRs node blocks are carved from, and the block size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyConfig {
    pub cidrs: Vec<IpNet>,
    /// Prefix length of each node's block.
    pub mask_size: u8,
}

/// The effective configuration of a pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolConfig {
    pub v4: Option<FamilyConfig>,
    pub v6: Option<FamilyConfig>,
}

/// Why a configuration cannot be used at all (the apiserver's CEL rules refuse most of these;
/// the allocator checks again so it never works from a malformed pool).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{0:?} is not a CIDR")]
    NotCidr(String),
    #[error("{cidr} is not an {family} CIDR")]
    WrongFamily { cidr: IpNet, family: Family },
    #[error("{cidr} has host bits set; write {canonical}")]
    NotCanonical { cidr: IpNet, canonical: IpNet },
    #[error(
        "{family} maskSize {mask_size} is out of range (at least the CIDR prefix length, at most {max})"
    )]
    BadMaskSize {
        family: Family,
        mask_size: i64,
        max: u8,
    },
    #[error("{family} CIDR {cidr} is larger than a node block: maskSize {mask_size} < /{}", cidr.prefix_len())]
    CidrSmallerThanBlock {
        family: Family,
        cidr: IpNet,
        mask_size: u8,
    },
    #[error("CIDRs {a} and {b} overlap")]
    Overlap { a: IpNet, b: IpNet },
    #[error("the pool has no CIDRs")]
    Empty,
}

impl FamilyConfig {
    /// Parses and checks one family of a pool spec.
    pub fn parse(family: Family, cidrs: &[String], mask_size: i64) -> Result<Self, ConfigError> {
        let max = family.bits();
        let mask =
            u8::try_from(mask_size)
                .ok()
                .filter(|m| *m <= max)
                .ok_or(ConfigError::BadMaskSize {
                    family,
                    mask_size,
                    max,
                })?;
        let mut nets = Vec::with_capacity(cidrs.len());
        for text in cidrs {
            let net: IpNet = text
                .trim()
                .parse()
                .map_err(|_| ConfigError::NotCidr(text.clone()))?;
            if Family::of(&net) != family {
                return Err(ConfigError::WrongFamily { cidr: net, family });
            }
            if net.trunc() != net {
                return Err(ConfigError::NotCanonical {
                    cidr: net,
                    canonical: net.trunc(),
                });
            }
            if net.prefix_len() > mask {
                return Err(ConfigError::CidrSmallerThanBlock {
                    family,
                    cidr: net,
                    mask_size: mask,
                });
            }
            nets.push(net);
        }
        if nets.is_empty() {
            return Err(ConfigError::Empty);
        }
        check_disjoint(&nets)?;
        Ok(FamilyConfig {
            cidrs: nets,
            mask_size: mask,
        })
    }

    /// How many node blocks the family holds in total (saturating).
    pub fn capacity(&self) -> u128 {
        self.cidrs
            .iter()
            .map(|c| blocks_in(c, self.mask_size))
            .fold(0u128, u128::saturating_add)
    }
}

impl PoolConfig {
    pub fn family(&self, family: Family) -> Option<&FamilyConfig> {
        match family {
            Family::V4 => self.v4.as_ref(),
            Family::V6 => self.v6.as_ref(),
        }
    }

    pub fn families(&self) -> impl Iterator<Item = (Family, &FamilyConfig)> {
        [(Family::V4, &self.v4), (Family::V6, &self.v6)]
            .into_iter()
            .filter_map(|(f, c)| c.as_ref().map(|c| (f, c)))
    }

    /// Every CIDR of the pool, all families.
    pub fn all_cidrs(&self) -> impl Iterator<Item = &IpNet> {
        self.families().flat_map(|(_, c)| c.cidrs.iter())
    }

    /// Parses a `PodIPPool` spec.
    pub fn from_spec(spec: &tendril_crds::v1alpha1::PodIPPoolSpec) -> Result<Self, ConfigError> {
        let v4 = spec
            .ipv4
            .as_ref()
            .map(|f| FamilyConfig::parse(Family::V4, &f.cidrs, f.mask_size.into()))
            .transpose()?;
        let v6 = spec
            .ipv6
            .as_ref()
            .map(|f| FamilyConfig::parse(Family::V6, &f.cidrs, f.mask_size.into()))
            .transpose()?;
        if v4.is_none() && v6.is_none() {
            return Err(ConfigError::Empty);
        }
        Ok(PoolConfig { v4, v6 })
    }
}

fn check_disjoint(nets: &[IpNet]) -> Result<(), ConfigError> {
    for (i, a) in nets.iter().enumerate() {
        for b in &nets[i + 1..] {
            if overlaps(a, b) {
                return Err(ConfigError::Overlap { a: *a, b: *b });
            }
        }
    }
    Ok(())
}

/// Whether two CIDRs share at least one address.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn blocks_in(cidr: &IpNet, mask: u8) -> u128 {
    let shift = u32::from(mask.saturating_sub(cidr.prefix_len()));
    1u128.checked_shl(shift).unwrap_or(u128::MAX)
}

fn to_int(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_int(family: Family, value: u128, prefix: u8) -> IpNet {
    let addr = match family {
        Family::V4 => IpAddr::V4((value as u32).into()),
        Family::V6 => IpAddr::V6(value.into()),
    };
    IpNet::new(addr, prefix).expect("prefix within family width")
}

/// `[first, last]` address of a CIDR as integers.
fn span(net: &IpNet) -> (u128, u128) {
    (to_int(net.network()), to_int(net.broadcast()))
}

/// Why the pool could not give a node a block.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("pool exhausted: no free /{mask_size} {family} block left in {cidrs}")]
    Exhausted {
        family: Family,
        mask_size: u8,
        cidrs: String,
    },
}

/// Two nodes claim overlapping blocks in their `NodeNetwork`s (found while restoring).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("node {node} claims {cidr}, which overlaps {held} held by node {holder}")]
pub struct RestoreConflict {
    pub node: String,
    pub cidr: IpNet,
    pub held: IpNet,
    pub holder: String,
}

/// Why a configuration change was refused; the pool keeps its previous configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// One sentence per problem, in a stable order.
    pub reasons: Vec<String>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reasons.join("; "))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Block {
    /// Last address of the block.
    last: u128,
    net: IpNet,
    node: String,
}

/// The blocks allocated in one family, keyed by their first address. Blocks never overlap,
/// so sorted by first address they are also sorted by last address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Blocks(BTreeMap<u128, Block>);

impl Blocks {
    /// The block overlapping `[first, last]`, if any.
    fn overlapping(&self, first: u128, last: u128) -> Option<&Block> {
        self.0
            .range(..=last)
            .next_back()
            .map(|(_, b)| b)
            .filter(|b| b.last >= first)
    }

    fn insert(&mut self, net: IpNet, node: &str) {
        let (first, last) = span(&net);
        self.0.insert(
            first,
            Block {
                last,
                net,
                node: node.to_string(),
            },
        );
    }

    fn remove(&mut self, net: &IpNet) {
        self.0.remove(&span(net).0);
    }

    fn in_cidr<'a>(&'a self, cidr: &IpNet) -> impl Iterator<Item = &'a Block> + 'a {
        let (first, last) = span(cidr);
        self.0.range(first..=last).map(|(_, b)| b)
    }

    /// First free block of `mask` bits inside `cidr`, skipping allocations.
    fn first_free(&self, other: &Blocks, family: Family, cidr: &IpNet, mask: u8) -> Option<IpNet> {
        let (first, last) = span(cidr);
        let step_bits = u32::from(family.bits() - mask);
        let step = 1u128.checked_shl(step_bits).unwrap_or(0);
        let mut candidate = first;
        loop {
            let candidate_last = candidate.checked_add(step.wrapping_sub(1))?;
            if candidate_last > last {
                return None;
            }
            let in_the_way = self
                .overlapping(candidate, candidate_last)
                .or_else(|| other.overlapping(candidate, candidate_last));
            match in_the_way {
                None => return Some(from_int(family, candidate, mask)),
                Some(block) => {
                    // Jump to the first aligned block after the one in the way.
                    let next = block.last.checked_add(1)?;
                    candidate = align_up(next, first, step)?;
                }
            }
        }
    }
}

fn align_up(value: u128, base: u128, step: u128) -> Option<u128> {
    if step == 0 {
        return None;
    }
    let offset = value - base;
    let rem = offset % step;
    if rem == 0 {
        Some(value)
    } else {
        value.checked_add(step - rem)
    }
}

/// Blocks per family and per node, with counts for status and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyUsage {
    pub family: Family,
    pub allocated: u128,
    pub available: u128,
}

/// One pool: its effective configuration and who holds which block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    config: PoolConfig,
    v4: Blocks,
    v6: Blocks,
    /// Blocks held by nodes of no existing pool (their pool was deleted): never handed
    /// out, but not this pool's allocations either.
    foreign_v4: Blocks,
    foreign_v6: Blocks,
    /// node → its blocks (at most one per family).
    nodes: BTreeMap<String, Vec<IpNet>>,
}

impl Pool {
    pub fn new(config: PoolConfig) -> Self {
        Pool {
            config,
            v4: Blocks::default(),
            v6: Blocks::default(),
            foreign_v4: Blocks::default(),
            foreign_v6: Blocks::default(),
            nodes: BTreeMap::new(),
        }
    }

    /// The configuration the pool allocates from (the last one accepted).
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    fn blocks(&self, family: Family) -> &Blocks {
        match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }

    fn blocks_mut(&mut self, family: Family) -> &mut Blocks {
        match family {
            Family::V4 => &mut self.v4,
            Family::V6 => &mut self.v6,
        }
    }

    fn foreign(&self, family: Family) -> &Blocks {
        match family {
            Family::V4 => &self.foreign_v4,
            Family::V6 => &self.foreign_v6,
        }
    }

    /// Keeps `cidr`, held by `node` outside of any existing pool (its pool was deleted),
    /// out of this pool's hands. Ignored when it overlaps what is already recorded.
    pub fn reserve_foreign(&mut self, node: &str, cidr: IpNet) {
        let cidr = cidr.trunc();
        let family = Family::of(&cidr);
        let (first, last) = span(&cidr);
        if self.blocks(family).overlapping(first, last).is_some()
            || self.foreign(family).overlapping(first, last).is_some()
        {
            return;
        }
        match family {
            Family::V4 => self.foreign_v4.insert(cidr, node),
            Family::V6 => self.foreign_v6.insert(cidr, node),
        }
    }

    /// The blocks a node holds, v4 before v6.
    pub fn node_cidrs(&self, node: &str) -> Option<&[IpNet]> {
        self.nodes.get(node).map(Vec::as_slice)
    }

    /// Every node holding blocks, with its blocks.
    pub fn allocations(&self) -> impl Iterator<Item = (&str, &[IpNet])> {
        self.nodes.iter().map(|(n, c)| (n.as_str(), c.as_slice()))
    }

    /// Records blocks a node already holds (from its `NodeNetwork`), exactly as they are.
    ///
    /// A block that lies outside the configured CIDRs or has another mask size is still
    /// recorded — its pods are running — so nothing overlapping it is ever handed out, and
    /// [`Pool::violations`] reports it. A block overlapping another node's is not recorded
    /// and is returned as a conflict.
    pub fn restore(&mut self, node: &str, cidrs: &[IpNet]) -> Vec<RestoreConflict> {
        let mut conflicts = Vec::new();
        for cidr in cidrs {
            let cidr = cidr.trunc();
            let family = Family::of(&cidr);
            let (first, last) = span(&cidr);
            if let Some(block) = self.blocks(family).overlapping(first, last) {
                if block.node != node {
                    conflicts.push(RestoreConflict {
                        node: node.to_string(),
                        cidr,
                        held: block.net,
                        holder: block.node.clone(),
                    });
                }
                continue;
            }
            let held = self.nodes.entry(node.to_string()).or_default();
            if held.iter().any(|c| Family::of(c) == family) {
                // At most one block per family; a second one is not ours to record.
                continue;
            }
            held.push(cidr);
            held.sort_by_key(Family::of);
            self.blocks_mut(family).insert(cidr, node);
        }
        conflicts
    }

    /// Gives `node` one block per configured family, or returns the blocks it already holds.
    /// All or nothing: when one family is exhausted, nothing new is kept.
    pub fn allocate(&mut self, node: &str) -> Result<Vec<IpNet>, AllocError> {
        let held: Vec<IpNet> = self.nodes.get(node).cloned().unwrap_or_default();
        let mut new = Vec::new();
        for (family, cfg) in self.config.families() {
            if held.iter().any(|c| Family::of(c) == family) {
                continue;
            }
            let blocks = self.blocks(family);
            let foreign = self.foreign(family);
            let found = cfg
                .cidrs
                .iter()
                .find_map(|cidr| blocks.first_free(foreign, family, cidr, cfg.mask_size));
            match found {
                Some(block) => new.push(block),
                None => {
                    return Err(AllocError::Exhausted {
                        family,
                        mask_size: cfg.mask_size,
                        cidrs: cfg
                            .cidrs
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                }
            }
        }
        for block in &new {
            self.blocks_mut(Family::of(block)).insert(*block, node);
        }
        let entry = self.nodes.entry(node.to_string()).or_default();
        entry.extend(new);
        entry.sort_by_key(Family::of);
        let out = entry.clone();
        if out.is_empty() {
            self.nodes.remove(node);
        }
        Ok(out)
    }

    /// Frees every block of `node` (the node is gone). Returns what was freed.
    pub fn release(&mut self, node: &str) -> Vec<IpNet> {
        let freed = self.nodes.remove(node).unwrap_or_default();
        for block in &freed {
            self.blocks_mut(Family::of(block)).remove(block);
        }
        freed
    }

    /// Allocated and available node blocks per configured family.
    pub fn usage(&self) -> Vec<FamilyUsage> {
        self.config
            .families()
            .map(|(family, cfg)| {
                let blocks = self.blocks(family);
                let allocated = blocks.0.len() as u128;
                let used_in_pool: u128 = cfg
                    .cidrs
                    .iter()
                    .map(|c| {
                        blocks
                            .in_cidr(c)
                            .chain(self.foreign(family).in_cidr(c))
                            .map(|b| blocks_covered(b, cfg.mask_size))
                            .fold(0u128, u128::saturating_add)
                    })
                    .fold(0u128, u128::saturating_add);
                FamilyUsage {
                    family,
                    allocated,
                    available: cfg.capacity().saturating_sub(used_in_pool),
                }
            })
            .collect()
    }

    /// Nodes that can still get a full set of blocks: the minimum over families.
    pub fn available_nodes(&self) -> u128 {
        self.usage().iter().map(|u| u.available).min().unwrap_or(0)
    }

    /// Blocks handed out, all families together.
    pub fn allocated_blocks(&self) -> u128 {
        (self.v4.0.len() + self.v6.0.len()) as u128
    }

    /// What in the current allocations `config` would re-address; empty when it is safe.
    pub fn violations(&self, config: &PoolConfig) -> Vec<String> {
        let mut reasons = Vec::new();
        for family in [Family::V4, Family::V6] {
            let blocks = self.blocks(family);
            if blocks.0.is_empty() {
                continue;
            }
            let Some(cfg) = config.family(family) else {
                reasons.push(format!(
                    "{family} removed from the pool while {} node(s) hold {family} CIDRs ({})",
                    blocks.0.len(),
                    sample(blocks.0.values())
                ));
                continue;
            };
            let old_mask = self.config.family(family).map(|c| c.mask_size);
            if old_mask.is_some_and(|m| m != cfg.mask_size) {
                reasons.push(format!(
                    "{family} maskSize change /{} -> /{} would re-address pods on {} node(s)",
                    old_mask.unwrap_or_default(),
                    cfg.mask_size,
                    blocks.0.len()
                ));
            }
            let outside: Vec<&Block> = blocks
                .0
                .values()
                .filter(|b| !cfg.cidrs.iter().any(|c| c.contains(&b.net)))
                .collect();
            if !outside.is_empty() {
                reasons.push(format!(
                    "{} allocated {family} CIDR(s) would fall outside the pool's CIDRs ({}): \
                     removing or shrinking a CIDR under its allocations would re-address running pods",
                    outside.len(),
                    sample(outside.into_iter())
                ));
            }
            let off_mask: Vec<&Block> = blocks
                .0
                .values()
                .filter(|b| b.net.prefix_len() != cfg.mask_size)
                .collect();
            if old_mask.is_none_or(|m| m == cfg.mask_size) && !off_mask.is_empty() {
                reasons.push(format!(
                    "{} allocated {family} CIDR(s) are not /{} blocks ({})",
                    off_mask.len(),
                    cfg.mask_size,
                    sample(off_mask.into_iter())
                ));
            }
        }
        reasons
    }

    /// Moves the pool to `config` unless that would re-address running pods.
    ///
    /// On refusal the previous configuration stays in effect (new nodes keep getting blocks
    /// from it). When `config` already is the effective one (e.g. a pool rebuilt at start
    /// from a spec that allocations no longer fit), it stays, and the refusal reports why.
    pub fn apply_config(&mut self, config: PoolConfig) -> Result<(), Refusal> {
        let reasons = self.violations(&config);
        if reasons.is_empty() {
            self.config = config;
            Ok(())
        } else {
            Err(Refusal { reasons })
        }
    }
}

fn blocks_covered(block: &Block, mask: u8) -> u128 {
    let prefix = block.net.prefix_len();
    if prefix <= mask {
        1u128
            .checked_shl(u32::from(mask - prefix))
            .unwrap_or(u128::MAX)
    } else {
        1
    }
}

fn sample<'a>(blocks: impl Iterator<Item = &'a Block>) -> String {
    const SHOWN: usize = 3;
    let all: Vec<&Block> = blocks.collect();
    let mut out: Vec<String> = all
        .iter()
        .take(SHOWN)
        .map(|b| format!("{} on {}", b.net, b.node))
        .collect();
    if all.len() > SHOWN {
        out.push(format!("and {} more", all.len() - SHOWN));
    }
    out.join(", ")
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
