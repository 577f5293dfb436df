//! `policy` (per endpoint: peer identity, direction, protocol, port → verdict; LPM trie),
//! `policy_state` (per endpoint: default-deny flags and revision) and `policy_cidrs` (prefix
//! → node-local CIDR identity; LPM trie). The three are written together and only in the
//! order of [`super::policy_steps`], so they are private to [`PolicyMaps`].

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::Path,
};

use aya::{
    Pod,
    maps::{Array, HashMap, LpmTrie, Map, MapData},
};
use ipnet::IpNet;

use super::{
    layout::{
        self, IpcacheKey, PolicyCidrValue, PolicyConfig, PolicyKey, PolicyPrefix, PolicyValue,
    },
    pinned::open_pin,
    pinned::{DataplaneError, MapKey, MapPressure, PinnedMap, show_key},
    policy_order::{PolicyStep, interim_state_writes, policy_steps, policy_write_order},
    report::{Diff, Failure, MapWriteError, Op, Report, diff},
};
use crate::bpf::policy::{PolicyEntry, PolicyState, Verdict};

impl MapKey for PolicyKey {
    type Backend<V: Pod> = LpmTrie<MapData, PolicyPrefix, V>;
    type Desired = Self;

    fn from_desired(key: Self) -> Self {
        key
    }
}

/// The entry it stands for (a key this build would not write as stored).
impl fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        show_key(
            f,
            PolicyEntry::from_key(self).map(|e| format!("{e:?}")),
            self,
        )
    }
}

/// An endpoint id, the key of `policy_state`.
impl MapKey for u16 {
    type Backend<V: Pod> = HashMap<MapData, u16, V>;
    type Desired = Self;

    fn from_desired(id: u16) -> Self {
        id
    }
}

/// A key of the policy report: an entry of `policy` or the state of an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PolicyItem {
    Entry(PolicyKey),
    State(u16),
}

impl fmt::Display for PolicyItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Entry(key) => key.fmt(f),
            Self::State(id) => write!(f, "policy_state[{id}]"),
        }
    }
}

/// `policy`, `policy_state`, `policy_cidrs` and `policy_config`.
pub struct PolicyMaps {
    entries: PinnedMap<PolicyKey, PolicyValue>,
    states: PinnedMap<u16, PolicyState>,
    cidrs: PinnedMap<IpcacheKey, PolicyCidrValue>,
    /// `policy_config`: the epoch (bumped after revisions change, so the programs compare
    /// an established connection's revision only then) and the event settings.
    config: Array<MapData, PolicyConfig>,
    /// A revision changed and the epoch was not bumped yet (its write failed): retried by
    /// every convergence until it succeeds.
    epoch_pending: bool,
    /// What `policy` holds after the last convergence that wrote everything and pruned
    /// (nothing else writes it): the next convergence diffs against this instead of reading
    /// the map back, so a change costs its delta, not a read of every entry. Forgotten on
    /// any failure and by [`Self::forget_known`] (the agent's periodic resync).
    known_entries: Option<BTreeMap<PolicyKey, PolicyValue>>,
}

impl std::fmt::Debug for PolicyMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyMaps")
            .field("entries", &self.entries)
            .field("states", &self.states)
            .field("cidrs", &self.cidrs)
            .field("epoch_pending", &self.epoch_pending)
            .field(
                "known_entries",
                &self.known_entries.as_ref().map(BTreeMap::len),
            )
            .finish_non_exhaustive()
    }
}

/// A policy convergence, read and diffed, not yet applied.
struct EntriesPlan {
    desired: BTreeMap<PolicyKey, PolicyValue>,
    writes: Vec<(PolicyKey, Op)>,
    deletes: Vec<PolicyKey>,
    /// The states wanted, and those held before the convergence.
    states: BTreeMap<u16, PolicyState>,
    current_states: BTreeMap<u16, PolicyState>,
    stale_states: Vec<u16>,
    /// Endpoints some entry of which failed to write: their revision stays.
    incomplete: BTreeSet<u16>,
    /// Some prefix failed to write: no revision changes.
    cidrs_incomplete: bool,
    /// Endpoints whose interim state was written (and counted).
    interim_written: BTreeSet<u16>,
    /// Some endpoint's revision changed (or its state went): the epoch must move.
    revisions_changed: bool,
    prune: bool,
    report: Report<PolicyItem>,
}

struct CidrPlan {
    desired: BTreeMap<IpcacheKey, PolicyCidrValue>,
    diff: Diff<IpcacheKey>,
    report: Report<IpcacheKey>,
}

impl PolicyMaps {
    pub fn open(dir: &Path) -> Result<Self, DataplaneError> {
        Ok(Self {
            entries: PinnedMap::open(dir, layout::POLICY)?,
            states: PinnedMap::open(dir, layout::POLICY_STATE)?,
            cidrs: PinnedMap::open(dir, layout::POLICY_CIDRS)?,
            config: {
                let (data, _) = open_pin(dir, layout::POLICY_CONFIG)?;
                Array::try_from(Map::Array(data)).map_err(|source| DataplaneError::Open {
                    path: dir.join(layout::POLICY_CONFIG),
                    source,
                })?
            },
            // A restarted agent does not know whether its predecessor bumped the epoch
            // after its last revision change: bump once.
            epoch_pending: true,
            known_entries: None,
        })
    }

    /// The next convergence reads `policy` back instead of trusting what it last wrote.
    pub fn forget_known(&mut self) {
        self.known_entries = None;
        self.cidrs.forget_known();
    }

    /// The `policy_config` entry.
    pub fn config(&self) -> Result<PolicyConfig, DataplaneError> {
        self.config
            .get(&0, 0)
            .map_err(|source| DataplaneError::Read {
                map: layout::POLICY_CONFIG,
                source,
            })
    }

    /// Sets which allow verdicts are reported (`POLICY_EVENTS_*`) and the aggregation
    /// interval, keeping the epoch. Returns whether it was written.
    pub fn set_event_settings(
        &mut self,
        mode: u32,
        interval_ns: u64,
    ) -> Result<bool, DataplaneError> {
        let held = self.config()?;
        let wanted = PolicyConfig {
            event_mode: mode,
            event_interval_ns: interval_ns,
            ..held
        };
        if held == wanted {
            return Ok(false);
        }
        self.write_config(&wanted)?;
        Ok(true)
    }

    fn write_config(&mut self, config: &PolicyConfig) -> Result<(), DataplaneError> {
        self.config
            .set(0, config, 0)
            .map_err(|e| MapWriteError::new(layout::POLICY_CONFIG, Op::Update, 1, e).into())
    }

    /// Moves the epoch if a revision changed since it last moved: only after it do the
    /// programs compare established connections' revisions again.
    fn bump_epoch(&mut self) -> Result<(), DataplaneError> {
        if !self.epoch_pending {
            return Ok(());
        }
        let mut config = self.config()?;
        config.epoch = config.epoch.wrapping_add(1);
        self.write_config(&config)?;
        self.epoch_pending = false;
        Ok(())
    }

    /// Fill levels of `policy`, `policy_state`, `policy_cidrs`.
    pub fn pressure(&self) -> [MapPressure; 3] {
        [
            self.entries.pressure(),
            self.states.pressure(),
            self.cidrs.pressure(),
        ]
    }

    /// What the policy map holds. Keys this build would not write are left out.
    pub fn entries(&self) -> Result<BTreeMap<PolicyEntry, Verdict>, DataplaneError> {
        Ok(self
            .entries
            .read()?
            .iter()
            .filter_map(|(k, v)| Some((PolicyEntry::from_key(k)?, Verdict::from_value(v)?)))
            .collect())
    }

    /// What the policy_state map holds, by endpoint id.
    pub fn states(&self) -> Result<BTreeMap<u16, PolicyState>, DataplaneError> {
        self.states.read()
    }

    /// The node-local CIDR identities in use (prefix → identity), so a restarted agent keeps
    /// them stable.
    pub fn cidrs(&self) -> Result<BTreeMap<IpNet, u32>, DataplaneError> {
        Ok(self
            .cidrs
            .read()?
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_net()?, v.identity)))
            .collect())
    }

    /// Converges the policy of every local endpoint (`policy` and `policy_state`; `policy_cidrs`
    /// untouched). The order is that of [`Self::converge_with_cidrs`].
    pub fn converge(
        &mut self,
        entries: &BTreeMap<PolicyEntry, Verdict>,
        states: &BTreeMap<u16, PolicyState>,
        prune: bool,
    ) -> Result<Report<PolicyItem>, DataplaneError> {
        let (_, policy) = self.converge_ordered(None, entries, states, prune, None)?;
        Ok(policy)
    }

    /// Converges `policy`, `policy_cidrs` and `policy_state` in the one order that keeps a
    /// packet judged by the old policy, the new one or (a new connection, briefly) their
    /// union, and re-judges established connections only against the complete new policy:
    /// 1. upsert new and changed entries, denies first (each LPM entry is replaced
    ///    atomically; entries of a new CIDR id are inert, no prefix maps to it yet);
    /// 2. upsert new and changed prefixes (an address moving to a new, longer prefix finds
    ///    that prefix's entries already there);
    /// 3. interim states: the new default-deny flags under the OLD revision, so no
    ///    established connection is re-judged while stale entries are still in. An endpoint
    ///    without a state gets revision 0 — the revision conntrack stamps while an endpoint
    ///    has no state, so its connections (if any) are not re-judged yet either;
    /// 4. delete stale entries, denies last (only if `prune`);
    /// 5. delete stale prefixes (only if `prune`): a removed deny's prefix goes only after
    ///    the deny itself;
    /// 6. final states: the revisions change and conntrack re-judges established
    ///    connections against exactly the new entries;
    /// 7. delete the states of endpoints absent from `states` (only if `prune`).
    ///
    /// Without `prune`, 4, 5 and 7 are skipped and what they would delete is reported as
    /// `stale_kept`; then 6 skips the endpoints with stale entries kept (all of them while a
    /// stale prefix is kept): their revision changes in the next pruning call. `entries` are
    /// stored as given: run [`crate::bpf::policy::propagate_denies`] first. Failures (e.g. a
    /// full map) are reported per entry and the later steps still run (stale deletions free
    /// room for the next pass), except that the revision of an endpoint is not bumped (6)
    /// while one of its entries failed to write, nor any revision while a prefix failed to
    /// write: its established connections would be re-judged against an incomplete policy.
    /// Returns the reports of (`policy_cidrs`, `policy` + `policy_state`).
    pub fn converge_with_cidrs(
        &mut self,
        cidrs: &BTreeMap<IpNet, u32>,
        entries: &BTreeMap<PolicyEntry, Verdict>,
        states: &BTreeMap<u16, PolicyState>,
        prune: bool,
    ) -> Result<(Report<IpcacheKey>, Report<PolicyItem>), DataplaneError> {
        self.converge_ordered(Some(cidrs), entries, states, prune, None)
    }

    /// [`Self::converge_with_cidrs`] (pruning) where the caller knows that only the
    /// entries of the endpoints in `changed` may differ from what the last complete
    /// convergence wrote: only those are diffed (a change of one identity's policy costs
    /// its endpoints' entries, not every entry of the node). The order of the writes is
    /// the same. Without a last complete convergence (first call, after a failure or
    /// [`Self::forget_known`]) it diffs everything, like `converge_with_cidrs`.
    pub fn converge_changed(
        &mut self,
        cidrs: &BTreeMap<IpNet, u32>,
        entries: &BTreeMap<PolicyEntry, Verdict>,
        states: &BTreeMap<u16, PolicyState>,
        changed: &BTreeSet<u16>,
    ) -> Result<(Report<IpcacheKey>, Report<PolicyItem>), DataplaneError> {
        self.converge_ordered(Some(cidrs), entries, states, true, Some(changed))
    }

    /// Converges `policy_cidrs` (prefix → node-local CIDR identity). Additions and changes
    /// first, then (only if `prune`) deletions. See [`Self::converge_with_cidrs`] for
    /// changing prefixes and policy together.
    pub fn converge_cidrs(
        &mut self,
        cidrs: &BTreeMap<IpNet, u32>,
        prune: bool,
    ) -> Result<Report<IpcacheKey>, DataplaneError> {
        let mut plan = self.plan_cidrs(cidrs)?;
        self.cidrs
            .upsert(&mut plan.report, &plan.diff, &plan.desired, |k| k);
        if prune {
            self.cidrs
                .delete_all(&mut plan.report, &plan.diff.stale, |k| k);
        } else {
            plan.report.stale_kept = plan.diff.stale.len();
        }
        Ok(plan.report)
    }

    fn converge_ordered(
        &mut self,
        cidrs: Option<&BTreeMap<IpNet, u32>>,
        entries: &BTreeMap<PolicyEntry, Verdict>,
        states: &BTreeMap<u16, PolicyState>,
        prune: bool,
        changed: Option<&BTreeSet<u16>>,
    ) -> Result<(Report<IpcacheKey>, Report<PolicyItem>), DataplaneError> {
        // Only a pruning convergence over a known map may be scoped.
        let changed = changed.filter(|_| prune && self.known_entries.is_some());
        let mut policy = self.plan_entries(entries, states, prune, changed)?;
        let mut cidr = cidrs.map(|c| self.plan_cidrs(c)).transpose()?;
        for step in policy_steps(prune) {
            self.apply_step(step, &mut policy, cidr.as_mut());
        }
        // After every revision write (step 6, 7): a connection stamped with the new epoch
        // was compared with the new revision.
        self.epoch_pending |= policy.revisions_changed;
        let complete = prune
            && policy.report.failed.is_empty()
            && cidr.as_ref().is_none_or(|c| c.report.failed.is_empty());
        let desired = std::mem::take(&mut policy.desired);
        self.known_entries = match (complete, changed, self.known_entries.take()) {
            (false, _, _) => None,
            // Scoped: the other endpoints' entries are as they were.
            (true, Some(changed), Some(mut known)) => {
                known.retain(|k, _| !changed.contains(&k.endpoint_id));
                known.extend(desired);
                Some(known)
            }
            (true, _, _) => Some(desired),
        };
        self.bump_epoch()?;
        let cidr_report = cidr.map(|c| c.report).unwrap_or_default();
        Ok((cidr_report, policy.report))
    }

    fn apply_step(
        &mut self,
        step: PolicyStep,
        plan: &mut EntriesPlan,
        cidr: Option<&mut CidrPlan>,
    ) {
        match step {
            PolicyStep::UpsertEntries => {
                for (key, op) in &plan.writes {
                    let written = self.entries.put(key, &plan.desired[key], *op);
                    if !plan.report.record(PolicyItem::Entry(*key), *op, written) {
                        plan.incomplete.insert(key.endpoint_id);
                    }
                }
            }
            PolicyStep::UpsertCidrs => {
                if let Some(cidr) = cidr {
                    self.cidrs
                        .upsert(&mut cidr.report, &cidr.diff, &cidr.desired, |k| k);
                    if !cidr.report.failed.is_empty() {
                        plan.cidrs_incomplete = true;
                    }
                }
            }
            PolicyStep::InterimStates => {
                for (id, op, state) in interim_state_writes(&plan.current_states, &plan.states) {
                    let written = self.states.put(&id, &state, op);
                    if plan.report.record(PolicyItem::State(id), op, written) {
                        plan.interim_written.insert(id);
                    }
                }
            }
            PolicyStep::DeleteEntries => {
                self.entries
                    .delete_all(&mut plan.report, &plan.deletes, PolicyItem::Entry);
            }
            PolicyStep::DeleteCidrs => {
                if let Some(cidr) = cidr {
                    self.cidrs
                        .delete_all(&mut cidr.report, &cidr.diff.stale, |k| k);
                }
            }
            PolicyStep::FinalStates => self.final_states(plan, cidr.as_deref()),
            PolicyStep::DeleteStates => {
                plan.revisions_changed |= !plan.stale_states.is_empty();
                self.states
                    .delete_all(&mut plan.report, &plan.stale_states, PolicyItem::State);
            }
            PolicyStep::KeepStale => {
                plan.report.stale_kept = plan.deletes.len() + plan.stale_states.len();
                if let Some(cidr) = cidr {
                    cidr.report.stale_kept = cidr.diff.stale.len();
                }
            }
        }
    }

    /// Step 6: the wanted states, revisions included, of the endpoints whose policy is
    /// complete in the maps.
    fn final_states(&mut self, plan: &mut EntriesPlan, cidr: Option<&CidrPlan>) {
        // Kept stale entries (no `prune`) would take part in the re-judging: the revision
        // of an endpoint that has any, or of every endpoint while a stale prefix is kept
        // (it shadows the prefixes containing it), waits for a pruning pass.
        if !plan.prune && cidr.is_some_and(|c| !c.diff.stale.is_empty()) {
            return;
        }
        let stale_eps: BTreeSet<u16> = if plan.prune {
            BTreeSet::new()
        } else {
            plan.deletes.iter().map(|k| k.endpoint_id).collect()
        };
        let current = self.states.read().unwrap_or_default();
        let writes: Vec<(u16, Op, PolicyState)> = plan
            .states
            .iter()
            .filter(|(id, _)| {
                !plan.cidrs_incomplete && !plan.incomplete.contains(id) && !stale_eps.contains(id)
            })
            .filter_map(|(id, state)| match current.get(id) {
                Some(held) if held == state => None,
                Some(_) => Some((*id, Op::Update, *state)),
                None => Some((*id, Op::Add, *state)),
            })
            .collect();
        // Revision 0 is what conntrack stamps while an endpoint has no state.
        plan.revisions_changed |= writes.iter().any(|(id, _, state)| {
            current.get(id).map_or(0, |held| held.revision) != state.revision
        });
        // An endpoint whose interim state was written is counted once: first the others,
        // then those, whose failures alone are reported.
        let (again, first): (Vec<_>, Vec<_>) = writes
            .into_iter()
            .partition(|(id, _, _)| plan.interim_written.contains(id));
        for (id, op, state) in first {
            let written = self.states.put(&id, &state, op);
            plan.report.record(PolicyItem::State(id), op, written);
        }
        for (id, op, state) in again {
            if let Err(error) = self.states.put(&id, &state, op) {
                let key = PolicyItem::State(id);
                plan.report.failed.push(Failure { op, error, key });
            }
        }
    }

    fn plan_entries(
        &self,
        entries: &BTreeMap<PolicyEntry, Verdict>,
        states: &BTreeMap<u16, PolicyState>,
        prune: bool,
        changed: Option<&BTreeSet<u16>>,
    ) -> Result<EntriesPlan, DataplaneError> {
        let in_scope = |endpoint_id: u16| changed.is_none_or(|c| c.contains(&endpoint_id));
        let desired: BTreeMap<PolicyKey, PolicyValue> = entries
            .iter()
            .filter(|(entry, _)| in_scope(entry.endpoint_id))
            .map(|(entry, verdict)| (entry.to_key(), verdict.to_value(entry)))
            .collect();
        let read;
        let scoped;
        // Entries of endpoints out of scope, unchanged by definition (for the report).
        let mut untouched = 0;
        let current = match (&self.known_entries, changed) {
            (Some(known), Some(_)) => {
                scoped = known
                    .iter()
                    .filter(|(k, _)| in_scope(k.endpoint_id))
                    .map(|(k, v)| (*k, *v))
                    .collect::<BTreeMap<_, _>>();
                untouched = known.len() - scoped.len();
                &scoped
            }
            (Some(known), None) => known,
            (None, _) => {
                read = self.entries.read()?;
                &read
            }
        };
        let entries_diff = diff(current, &desired);
        let (writes, deletes) = policy_write_order(&entries_diff, current, &desired);
        let current_states = self.states.read()?;
        let states_diff = diff(&current_states, states);
        Ok(EntriesPlan {
            report: Report::unchanged(untouched + entries_diff.unchanged + states_diff.unchanged),
            desired,
            writes,
            deletes,
            states: states.clone(),
            current_states,
            stale_states: states_diff.stale,
            revisions_changed: false,
            incomplete: BTreeSet::new(),
            cidrs_incomplete: false,
            interim_written: BTreeSet::new(),
            prune,
        })
    }

    fn plan_cidrs(&mut self, cidrs: &BTreeMap<IpNet, u32>) -> Result<CidrPlan, DataplaneError> {
        let desired: BTreeMap<IpNet, PolicyCidrValue> = cidrs
            .iter()
            .map(|(net, identity)| {
                let value = PolicyCidrValue {
                    identity: *identity,
                    pad: 0,
                };
                (*net, value)
            })
            .collect();
        let (desired, diff) = self.cidrs.diff(&desired)?;
        Ok(CidrPlan {
            report: Report::unchanged(diff.unchanged),
            desired,
            diff,
        })
    }
}
