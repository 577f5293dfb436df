//! The services maps (`bpf/lib/lb.h`): `lb_services`, `lb_backends`, `lb_revnat`, their IPv6
//! twins `lb6_services`, `lb6_backends`, `lb6_revnat`, and `lb_source_ranges`,
//! `lb6_source_ranges`, `lb_maglev` (written together, in one order: [`LbMaps::converge`]),
//! `lb_netns` (the network namespaces whose sockets the socket LB translates) and
//! `lb_config`. `lb_affinity`, `lb_sock_revnat`, `lb6_sock_revnat`, `lb_nat` and `lb6_nat` are
//! LRU maps the programs fill; the agent only reads them.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use aya::{
    Pod,
    maps::{Array, HashMap, LpmTrie, Map, MapData},
};

use super::{
    layout::{
        self, Lb4Backend, Lb4Key, Lb4NatEntry, Lb4NatKey, Lb4ReverseNat, Lb4SrcRangeKey,
        Lb4SrcRangePrefix, Lb6Backend, Lb6Key, Lb6NatEntry, Lb6NatKey, Lb6ReverseNat,
        Lb6SockRevnatKey, Lb6SockRevnatValue, Lb6SrcRangeKey, Lb6SrcRangePrefix, LbAffinityKey,
        LbAffinityValue, LbConfig, LbMaglevKey, LbServiceValue, LbSockRevnatKey, LbSockRevnatValue,
    },
    pinned::{DataplaneError, MapKey, MapPressure, PinnedMap, open_pin},
    report::{Diff, MapWriteError, Op, Report},
};

impl MapKey for Lb4Key {
    type Backend<V: Pod> = HashMap<MapData, Self, V>;
    type Desired = Self;

    fn from_desired(key: Self) -> Self {
        key
    }
}

impl fmt::Display for Lb4Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "service {}:{}/{} scope {} slot {}",
            Ipv4Addr::from(self.address),
            u16::from_be_bytes(self.dport),
            self.proto,
            self.scope,
            self.backend_slot
        )
    }
}

/// A backend id, the key of `lb_backends` (and a Maglev table's value).
impl MapKey for u32 {
    type Backend<V: Pod> = HashMap<MapData, u32, V>;
    type Desired = Self;

    fn from_desired(id: u32) -> Self {
        id
    }
}

/// A netns cookie, the key of `lb_netns`.
impl MapKey for u64 {
    type Backend<V: Pod> = HashMap<MapData, u64, V>;
    type Desired = Self;

    fn from_desired(cookie: u64) -> Self {
        cookie
    }
}

impl MapKey for Lb4SrcRangeKey {
    type Backend<V: Pod> = LpmTrie<MapData, Lb4SrcRangePrefix, V>;
    type Desired = Self;

    fn from_desired(key: Self) -> Self {
        key
    }
}

impl fmt::Display for Lb4SrcRangeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "source range {}/{} of rev-nat {}",
            Ipv4Addr::from(self.address),
            self.prefixlen
                .saturating_sub(layout::LB_SRC_RANGE_STATIC_PREFIX),
            self.rev_nat_index
        )
    }
}

impl MapKey for Lb6SrcRangeKey {
    type Backend<V: Pod> = LpmTrie<MapData, Lb6SrcRangePrefix, V>;
    type Desired = Self;

    fn from_desired(key: Self) -> Self {
        key
    }
}

impl fmt::Display for Lb6SrcRangeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "source range {}/{} of rev-nat {}",
            Ipv6Addr::from(self.address),
            self.prefixlen
                .saturating_sub(layout::LB_SRC_RANGE_STATIC_PREFIX),
            self.rev_nat_index
        )
    }
}

impl MapKey for LbMaglevKey {
    type Backend<V: Pod> = HashMap<MapData, Self, V>;
    type Desired = Self;

    fn from_desired(key: Self) -> Self {
        key
    }
}

impl fmt::Display for LbMaglevKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "maglev rev-nat {} scope {} slot {}",
            self.rev_nat_index, self.scope, self.slot
        )
    }
}

impl MapKey for LbAffinityKey {
    type Backend<V: Pod> = HashMap<MapData, Self, V>;
    type Desired = Self;

    fn from_desired(key: Self) -> Self {
        key
    }
}

impl fmt::Display for LbAffinityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "affinity client {:#x} kind {} rev-nat {}",
            self.client, self.kind, self.rev_nat_index
        )
    }
}

impl MapKey for Lb4NatKey {
    type Backend<V: Pod> = HashMap<MapData, Self, V>;
    type Desired = Self;

    fn from_desired(key: Self) -> Self {
        key
    }
}

impl fmt::Display for Lb4NatKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "nat {} {}:{} -> {}:{} proto {}",
            self.dir,
            Ipv4Addr::from(self.saddr),
            u16::from_be_bytes(self.sport),
            Ipv4Addr::from(self.daddr),
            u16::from_be_bytes(self.dport),
            self.proto
        )
    }
}

impl MapKey for Lb6NatKey {
    type Backend<V: Pod> = HashMap<MapData, Self, V>;
    type Desired = Self;

    fn from_desired(key: Self) -> Self {
        key
    }
}

impl fmt::Display for Lb6NatKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "nat {} [{}]:{} -> [{}]:{} proto {}",
            self.dir,
            Ipv6Addr::from(self.saddr),
            u16::from_be_bytes(self.sport),
            Ipv6Addr::from(self.daddr),
            u16::from_be_bytes(self.dport),
            self.proto
        )
    }
}

impl MapKey for Lb6Key {
    type Backend<V: Pod> = HashMap<MapData, Self, V>;
    type Desired = Self;

    fn from_desired(key: Self) -> Self {
        key
    }
}

impl fmt::Display for Lb6Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "service [{}]:{}/{} scope {} slot {}",
            Ipv6Addr::from(self.address),
            u16::from_be_bytes(self.dport),
            self.proto,
            self.scope,
            self.backend_slot
        )
    }
}

impl MapKey for Lb6SockRevnatKey {
    type Backend<V: Pod> = HashMap<MapData, Self, V>;
    type Desired = Self;

    fn from_desired(key: Self) -> Self {
        key
    }
}

impl fmt::Display for Lb6SockRevnatKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "socket {} backend [{}]:{}",
            self.cookie,
            Ipv6Addr::from(self.address),
            u16::from_be_bytes(self.port)
        )
    }
}

/// A key of a services map (`lb_services`, `lb6_services`): a frontend, scope and slot.
trait SlotKey: MapKey<Desired = Self> + Copy {
    fn slot(&self) -> u16;
    /// The key of slot 0, the service entry itself.
    fn service(self) -> Self;
}

impl SlotKey for Lb4Key {
    fn slot(&self) -> u16 {
        self.backend_slot
    }

    fn service(self) -> Self {
        Self {
            backend_slot: 0,
            ..self
        }
    }
}

impl SlotKey for Lb6Key {
    fn slot(&self) -> u16 {
        self.backend_slot
    }

    fn service(self) -> Self {
        Self {
            backend_slot: 0,
            ..self
        }
    }
}

impl MapKey for LbSockRevnatKey {
    type Backend<V: Pod> = HashMap<MapData, Self, V>;
    type Desired = Self;

    fn from_desired(key: Self) -> Self {
        key
    }
}

impl fmt::Display for LbSockRevnatKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "socket {} backend {}:{}",
            self.cookie,
            Ipv4Addr::from(self.address),
            u16::from_be_bytes(self.port)
        )
    }
}

/// A key of the services report: an entry of one of the maps [`LbMaps`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LbItem {
    Service(Lb4Key),
    Service6(Lb6Key),
    Backend(u32),
    Backend6(u32),
    RevNat(u16),
    RevNat6(u16),
    SourceRange(Lb4SrcRangeKey),
    SourceRange6(Lb6SrcRangeKey),
    Maglev(LbMaglevKey),
    Netns(u64),
}

impl fmt::Display for LbItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Service(key) => key.fmt(f),
            Self::Service6(key) => key.fmt(f),
            Self::Backend(id) => write!(f, "backend {id}"),
            Self::Backend6(id) => write!(f, "IPv6 backend {id}"),
            Self::RevNat(index) => write!(f, "rev-nat {index}"),
            Self::RevNat6(index) => write!(f, "IPv6 rev-nat {index}"),
            Self::SourceRange(key) => key.fmt(f),
            Self::SourceRange6(key) => key.fmt(f),
            Self::Maglev(key) => key.fmt(f),
            Self::Netns(cookie) => write!(f, "netns cookie {cookie}"),
        }
    }
}

/// What the services maps should hold (computed by the agent's services step). Backend ids
/// and rev-nat indexes are one numbering across both families, so `maglev` (keyed by
/// rev-nat index) serves both.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LbState {
    /// Slot 0 (the service) and slots 1..=count (its backend ids) of every IPv4 frontend ×
    /// scope.
    pub services: BTreeMap<Lb4Key, LbServiceValue>,
    pub backends: BTreeMap<u32, Lb4Backend>,
    pub revnat: BTreeMap<u16, Lb4ReverseNat>,
    /// The same for IPv6 frontends and backends.
    pub services6: BTreeMap<Lb6Key, LbServiceValue>,
    pub backends6: BTreeMap<u32, Lb6Backend>,
    pub revnat6: BTreeMap<u16, Lb6ReverseNat>,
    pub source_ranges: BTreeMap<Lb4SrcRangeKey, u8>,
    /// The source ranges of IPv6 frontends (IPv6 prefixes only).
    pub source_ranges6: BTreeMap<Lb6SrcRangeKey, u8>,
    pub maglev: BTreeMap<LbMaglevKey, u32>,
}

/// The services maps the agent writes, and the LRU maps the programs fill.
pub struct LbMaps {
    services: PinnedMap<Lb4Key, LbServiceValue>,
    backends: PinnedMap<u32, Lb4Backend>,
    revnat: PinnedMap<u16, Lb4ReverseNat>,
    services6: PinnedMap<Lb6Key, LbServiceValue>,
    backends6: PinnedMap<u32, Lb6Backend>,
    revnat6: PinnedMap<u16, Lb6ReverseNat>,
    source_ranges: PinnedMap<Lb4SrcRangeKey, u8>,
    source_ranges6: PinnedMap<Lb6SrcRangeKey, u8>,
    maglev: PinnedMap<LbMaglevKey, u32>,
    netns: PinnedMap<u64, u8>,
    affinity: PinnedMap<LbAffinityKey, LbAffinityValue>,
    sock_revnat: PinnedMap<LbSockRevnatKey, LbSockRevnatValue>,
    sock_revnat6: PinnedMap<Lb6SockRevnatKey, Lb6SockRevnatValue>,
    nat: PinnedMap<Lb4NatKey, Lb4NatEntry>,
    nat6: PinnedMap<Lb6NatKey, Lb6NatEntry>,
    config: Array<MapData, LbConfig>,
}

impl fmt::Debug for LbMaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LbMaps").finish_non_exhaustive()
    }
}

/// The ids the services maps hold, by map.
pub struct HeldIds<'a> {
    pub backends: &'a BTreeMap<u32, Lb4Backend>,
    pub backends6: &'a BTreeMap<u32, Lb6Backend>,
    pub revnat: &'a BTreeMap<u16, Lb4ReverseNat>,
    pub revnat6: &'a BTreeMap<u16, Lb6ReverseNat>,
}

/// Writes the backend slots of `diff` before the service entries that count them; a service
/// some of whose slots could not be written keeps its previous entry (or none), never a
/// count that points at missing slots.
fn write_services<K: SlotKey>(
    map: &mut PinnedMap<K, LbServiceValue>,
    report: &mut Report<LbItem>,
    diff: &Diff<K>,
    desired: &BTreeMap<K, LbServiceValue>,
    item: fn(K) -> LbItem,
) {
    let (slots, masters): (Vec<_>, Vec<_>) = diff.writes().partition(|(key, _)| key.slot() > 0);
    let mut incomplete = BTreeSet::new();
    for (key, op) in slots {
        let result = map.put(&key, &desired[&key], op);
        if !report.record(item(key), op, result) {
            incomplete.insert(key.service());
        }
    }
    for (key, op) in masters {
        if incomplete.contains(&key) {
            continue;
        }
        let result = map.put(&key, &desired[&key], op);
        report.record(item(key), op, result);
    }
}

/// Deletes the stale entries of a services map, each service (slot 0) before its slots.
fn delete_services<K: SlotKey>(
    map: &mut PinnedMap<K, LbServiceValue>,
    report: &mut Report<LbItem>,
    diff: &Diff<K>,
    item: fn(K) -> LbItem,
) {
    let mut stale = diff.stale.clone();
    stale.sort_by_key(|key| key.slot());
    map.delete_all(report, &stale, item);
}

impl LbMaps {
    pub fn open(dir: &Path) -> Result<Self, DataplaneError> {
        let (config, _) = open_pin(dir, layout::LB_CONFIG)?;
        let config =
            Array::try_from(Map::Array(config)).map_err(|source| DataplaneError::Open {
                path: dir.join(layout::LB_CONFIG),
                source,
            })?;
        Ok(Self {
            services: PinnedMap::open(dir, layout::LB_SERVICES)?,
            backends: PinnedMap::open(dir, layout::LB_BACKENDS)?,
            revnat: PinnedMap::open(dir, layout::LB_REVNAT)?,
            services6: PinnedMap::open(dir, layout::LB6_SERVICES)?,
            backends6: PinnedMap::open(dir, layout::LB6_BACKENDS)?,
            revnat6: PinnedMap::open(dir, layout::LB6_REVNAT)?,
            source_ranges: PinnedMap::open(dir, layout::LB_SOURCE_RANGES)?,
            source_ranges6: PinnedMap::open(dir, layout::LB6_SOURCE_RANGES)?,
            maglev: PinnedMap::open(dir, layout::LB_MAGLEV)?,
            netns: PinnedMap::open(dir, layout::LB_NETNS)?,
            affinity: PinnedMap::open(dir, layout::LB_AFFINITY)?,
            sock_revnat: PinnedMap::open(dir, layout::LB_SOCK_REVNAT)?,
            sock_revnat6: PinnedMap::open(dir, layout::LB6_SOCK_REVNAT)?,
            nat: PinnedMap::open(dir, layout::LB_NAT)?,
            nat6: PinnedMap::open(dir, layout::LB6_NAT)?,
            config,
        })
    }

    /// Every converged map reads the kernel again at its next convergence.
    pub fn forget_known(&mut self) {
        self.services.forget_known();
        self.backends.forget_known();
        self.revnat.forget_known();
        self.services6.forget_known();
        self.backends6.forget_known();
        self.revnat6.forget_known();
        self.source_ranges.forget_known();
        self.source_ranges6.forget_known();
        self.maglev.forget_known();
        self.netns.forget_known();
    }

    /// The backends and frontends held, both families (as known since the last read; see
    /// [`PinnedMap::known`]): the ids to keep for the same addresses.
    pub fn held_ids(&mut self) -> Result<HeldIds<'_>, DataplaneError> {
        Ok(HeldIds {
            backends: self.backends.known()?,
            backends6: self.backends6.known()?,
            revnat: self.revnat.known()?,
            revnat6: self.revnat6.known()?,
        })
    }

    /// Fill of the services maps the agent writes. The LRU maps the programs fill
    /// (`lb_affinity`, `lb_sock_revnat`, `lb6_sock_revnat`, `lb_nat`, `lb6_nat`) are left out: full is
    /// normal there (the oldest records go), and counting up to 262,144 keys every few
    /// seconds would hold their locks for long (as for `conntrack`).
    pub fn pressure(&self) -> [MapPressure; 10] {
        [
            self.services.pressure(),
            self.backends.pressure(),
            self.revnat.pressure(),
            self.services6.pressure(),
            self.backends6.pressure(),
            self.revnat6.pressure(),
            self.source_ranges.pressure(),
            self.source_ranges6.pressure(),
            self.maglev.pressure(),
            self.netns.pressure(),
        ]
    }

    /// The backends the map holds: after a restart, the ids established connections (and
    /// affinity entries) refer to, which the agent keeps for the same backends.
    pub fn backends(&self) -> Result<BTreeMap<u32, Lb4Backend>, DataplaneError> {
        self.backends.read()
    }

    /// The IPv6 backends the map holds (ids from the same numbering as IPv4's).
    pub fn backends6(&self) -> Result<BTreeMap<u32, Lb6Backend>, DataplaneError> {
        self.backends6.read()
    }

    /// The rev-nat indexes the map holds, kept for the same frontends across restarts.
    pub fn revnat(&self) -> Result<BTreeMap<u16, Lb4ReverseNat>, DataplaneError> {
        self.revnat.read()
    }

    /// The IPv6 frontends' rev-nat indexes.
    pub fn revnat6(&self) -> Result<BTreeMap<u16, Lb6ReverseNat>, DataplaneError> {
        self.revnat6.read()
    }

    /// Every service entry (for inspection and tests).
    pub fn services(&self) -> Result<BTreeMap<Lb4Key, LbServiceValue>, DataplaneError> {
        self.services.read()
    }

    /// Every IPv6 service entry (for inspection and tests).
    pub fn services6(&self) -> Result<BTreeMap<Lb6Key, LbServiceValue>, DataplaneError> {
        self.services6.read()
    }

    /// The sockets the socket LB translated (for inspection and tests).
    pub fn sock_revnat(
        &self,
    ) -> Result<BTreeMap<LbSockRevnatKey, LbSockRevnatValue>, DataplaneError> {
        self.sock_revnat.read()
    }

    /// The IPv6 sockets the socket LB translated (for inspection and tests).
    pub fn sock_revnat6(
        &self,
    ) -> Result<BTreeMap<Lb6SockRevnatKey, Lb6SockRevnatValue>, DataplaneError> {
        self.sock_revnat6.read()
    }

    /// The tc path's translated connections (for inspection and tests).
    pub fn nat(&self) -> Result<BTreeMap<Lb4NatKey, Lb4NatEntry>, DataplaneError> {
        self.nat.read()
    }

    /// The tc path's translated IPv6 connections (for inspection and tests).
    pub fn nat6(&self) -> Result<BTreeMap<Lb6NatKey, Lb6NatEntry>, DataplaneError> {
        self.nat6.read()
    }

    /// The affinity records (for inspection and tests).
    pub fn affinity(&self) -> Result<BTreeMap<LbAffinityKey, LbAffinityValue>, DataplaneError> {
        self.affinity.read()
    }

    pub fn config(&self) -> Result<LbConfig, DataplaneError> {
        self.config
            .get(&0, 0)
            .map_err(|source| DataplaneError::Read {
                map: layout::LB_CONFIG,
                source,
            })
    }

    /// Writes `lb_config` if it differs. Returns whether it was written.
    pub fn set_config(&mut self, config: &LbConfig) -> Result<bool, DataplaneError> {
        if self.config()? == *config {
            return Ok(false);
        }
        self.config
            .set(0, config, 0)
            .map_err(|e| MapWriteError::new(layout::LB_CONFIG, Op::Update, 1, e))?;
        Ok(true)
    }

    /// Converges `lb_netns` to `cookies` (netns cookie → `NETNS_NODE`/`NETNS_POD`).
    pub fn converge_netns(
        &mut self,
        cookies: &BTreeMap<u64, u8>,
        prune: bool,
    ) -> Result<Report<LbItem>, DataplaneError> {
        Ok(self.netns.converge(cookies, prune)?.map_keys(LbItem::Netns))
    }

    /// Converges the services maps to `desired` in the order that never lets a program
    /// see a service entry whose backends or rev-nat entry are missing, nor a count larger
    /// than the slots written: rev-nat, backends (both families), source ranges and Maglev
    /// tables are added first; then backend slots, then the services themselves (their
    /// counts); then stale entries go in the opposite order (services and slots, Maglev and
    /// source ranges, backends, rev-nat). Stale entries are deleted only with `prune`.
    pub fn converge(
        &mut self,
        desired: &LbState,
        prune: bool,
    ) -> Result<Report<LbItem>, DataplaneError> {
        let mut report = Report::default();
        let (revnat, revnat_diff) = self.revnat.diff(&desired.revnat)?;
        let (revnat6, revnat6_diff) = self.revnat6.diff(&desired.revnat6)?;
        let (backends, backends_diff) = self.backends.diff(&desired.backends)?;
        let (backends6, backends6_diff) = self.backends6.diff(&desired.backends6)?;
        let (ranges, ranges_diff) = self.source_ranges.diff(&desired.source_ranges)?;
        let (ranges6, ranges6_diff) = self.source_ranges6.diff(&desired.source_ranges6)?;
        let (maglev, maglev_diff) = self.maglev.diff(&desired.maglev)?;
        let (services, services_diff) = self.services.diff(&desired.services)?;
        let (services6, services6_diff) = self.services6.diff(&desired.services6)?;
        report.unchanged = revnat_diff.unchanged
            + revnat6_diff.unchanged
            + backends_diff.unchanged
            + backends6_diff.unchanged
            + ranges_diff.unchanged
            + ranges6_diff.unchanged
            + maglev_diff.unchanged
            + services_diff.unchanged
            + services6_diff.unchanged;

        self.revnat
            .upsert(&mut report, &revnat_diff, &revnat, LbItem::RevNat);
        self.revnat6
            .upsert(&mut report, &revnat6_diff, &revnat6, LbItem::RevNat6);
        self.backends
            .upsert(&mut report, &backends_diff, &backends, LbItem::Backend);
        self.backends6
            .upsert(&mut report, &backends6_diff, &backends6, LbItem::Backend6);
        self.source_ranges
            .upsert(&mut report, &ranges_diff, &ranges, LbItem::SourceRange);
        self.source_ranges6
            .upsert(&mut report, &ranges6_diff, &ranges6, LbItem::SourceRange6);
        self.maglev
            .upsert(&mut report, &maglev_diff, &maglev, LbItem::Maglev);
        write_services(
            &mut self.services,
            &mut report,
            &services_diff,
            &services,
            LbItem::Service,
        );
        write_services(
            &mut self.services6,
            &mut report,
            &services6_diff,
            &services6,
            LbItem::Service6,
        );

        if !prune {
            report.stale_kept = services_diff.stale.len()
                + services6_diff.stale.len()
                + maglev_diff.stale.len()
                + ranges_diff.stale.len()
                + ranges6_diff.stale.len()
                + backends_diff.stale.len()
                + backends6_diff.stale.len()
                + revnat_diff.stale.len()
                + revnat6_diff.stale.len();
            return Ok(report);
        }
        delete_services(
            &mut self.services,
            &mut report,
            &services_diff,
            LbItem::Service,
        );
        delete_services(
            &mut self.services6,
            &mut report,
            &services6_diff,
            LbItem::Service6,
        );
        self.maglev
            .delete_all(&mut report, &maglev_diff.stale, LbItem::Maglev);
        self.source_ranges
            .delete_all(&mut report, &ranges_diff.stale, LbItem::SourceRange);
        self.source_ranges6
            .delete_all(&mut report, &ranges6_diff.stale, LbItem::SourceRange6);
        self.backends
            .delete_all(&mut report, &backends_diff.stale, LbItem::Backend);
        self.backends6
            .delete_all(&mut report, &backends6_diff.stale, LbItem::Backend6);
        self.revnat
            .delete_all(&mut report, &revnat_diff.stale, LbItem::RevNat);
        self.revnat6
            .delete_all(&mut report, &revnat6_diff.stale, LbItem::RevNat6);
        Ok(report)
    }
}
