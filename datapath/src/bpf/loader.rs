//! Loading the programs, pinning the maps and attaching the tc hooks.
//!
//! Pin layout under a node's directory (default `/sys/fs/bpf/tendril/<node>`):
//!
//! ```text
//! <dir>/ipcache, endpoints, metrics, node_config,
//!       node_config6                                maps, pinned by name
//! <dir>/policy, policy_state, policy_cidrs,
//!       conntrack, conntrack6, events, ipv4_frags,
//!       ipv6_frags                                  policy maps (issues 6, 18)
//! <dir>/lb_services, lb_backends, lb_revnat, lb_affinity, lb_source_ranges,
//!       lb_maglev, lb_netns, lb_sock_revnat, lb_nat,
//!       lb_config                                   services maps (issue 12)
//! <dir>/lb6_services, lb6_backends, lb6_revnat,
//!       lb6_sock_revnat, lb6_source_ranges, lb6_nat IPv6 services maps (issue 18)
//! <dir>/links/socklb-<hook>                         socket-LB cgroup links (connect4, connect6, …)
//! <dir>/links/<hook>:<ifname>                       TCX links (e.g. from-container:lxc1a2b)
//! ```
//!
//! (bpffs refuses names with a dot; interface names cannot contain `:`.)
//!
//! Maps and links outlive the agent: the programs stay attached and keep
//! forwarding while it is down, and a restarted agent reopens the same maps.
//! Attaching again swaps the program in without a gap (the new link goes
//! first in the TCX chain before the old one is released).

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, include_bytes_aligned,
    maps::{MapInfo, ProgramArray},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType,
        links::{FdLink, LinkOrder, PinnedLink},
        tc::TcAttachOptions,
    },
};

use super::maps;

mod expected_maps;
use expected_maps::expected_maps;

/// `bpf/bpf_lxc.c`: `from_container`, `to_container`.
pub static BPF_LXC: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf_lxc.o"));
/// `bpf/bpf_overlay.c`: `from_overlay`, `to_overlay`.
pub static BPF_OVERLAY: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf_overlay.o"));
/// `bpf/bpf_host.c`: `from_netdev`.
pub static BPF_HOST: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf_host.o"));

/// `bpf/bpf_sock.c`: the socket-LB cgroup hooks.
pub static BPF_SOCK: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf_sock.o"));

/// Where bpffs is normally mounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const LINKS_DIR: &str = "links";

/// The pin directory of a node: `<bpffs_root>/tendril/<node>`.
pub fn node_pin_dir(bpffs_root: &Path, node: &str) -> PathBuf {
    bpffs_root.join("tendril").join(node)
}

/// An attach point of a program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    /// tc ingress of a pod's host-side veth: what the pod sends.
    FromContainer,
    /// tc egress of a pod's host-side veth: what the host stack routes into the pod.
    ToContainer,
    /// tc ingress of the collect-metadata VXLAN device.
    FromOverlay,
    /// tc egress of the VXLAN device: tunnel key for the node's own traffic.
    ToOverlay,
    /// tc ingress of the node's uplink (native routing).
    FromNetdev,
}

impl Hook {
    pub const ALL: [Self; 5] = [
        Self::FromContainer,
        Self::ToContainer,
        Self::FromOverlay,
        Self::ToOverlay,
        Self::FromNetdev,
    ];

    /// The function name of the program in its object.
    pub fn program_name(self) -> &'static str {
        match self {
            Self::FromContainer => "from_container",
            Self::ToContainer => "to_container",
            Self::FromOverlay => "from_overlay",
            Self::ToOverlay => "to_overlay",
            Self::FromNetdev => "from_netdev",
        }
    }

    pub fn attach_type(self) -> TcAttachType {
        match self {
            Self::ToContainer | Self::ToOverlay => TcAttachType::Egress,
            Self::FromContainer | Self::FromOverlay | Self::FromNetdev => TcAttachType::Ingress,
        }
    }

    /// The suffix of its link pins.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FromContainer => "from-container",
            Self::ToContainer => "to-container",
            Self::FromOverlay => "from-overlay",
            Self::ToOverlay => "to-overlay",
            Self::FromNetdev => "from-netdev",
        }
    }

    fn from_str(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|hook| hook.as_str() == s)
    }
}

/// A socket-LB hook of `bpf_sock.c` (cgroup `sock_addr` programs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SockHook {
    Connect4,
    Sendmsg4,
    Recvmsg4,
    Getpeername4,
    Connect6,
    Sendmsg6,
    Recvmsg6,
    Getpeername6,
}

impl SockHook {
    pub const ALL: [Self; 8] = [
        Self::Connect4,
        Self::Sendmsg4,
        Self::Recvmsg4,
        Self::Getpeername4,
        Self::Connect6,
        Self::Sendmsg6,
        Self::Recvmsg6,
        Self::Getpeername6,
    ];

    /// The function name of the program in `bpf_sock.o`.
    pub fn program_name(self) -> &'static str {
        match self {
            Self::Connect4 => "sock_connect4",
            Self::Sendmsg4 => "sock_sendmsg4",
            Self::Recvmsg4 => "sock_recvmsg4",
            Self::Getpeername4 => "sock_getpeername4",
            Self::Connect6 => "sock_connect6",
            Self::Sendmsg6 => "sock_sendmsg6",
            Self::Recvmsg6 => "sock_recvmsg6",
            Self::Getpeername6 => "sock_getpeername6",
        }
    }

    /// Its link pin under `links/` (no `:`, so [`pinned_links`] never takes it for a tc
    /// link).
    fn pin_name(self) -> &'static str {
        match self {
            Self::Connect4 => "socklb-connect4",
            Self::Sendmsg4 => "socklb-sendmsg4",
            Self::Recvmsg4 => "socklb-recvmsg4",
            Self::Getpeername4 => "socklb-getpeername4",
            Self::Connect6 => "socklb-connect6",
            Self::Sendmsg6 => "socklb-sendmsg6",
            Self::Recvmsg6 => "socklb-recvmsg6",
            Self::Getpeername6 => "socklb-getpeername6",
        }
    }
}

/// Map capacities; the defaults are those compiled into the objects. A
/// pinned map with another shape is refused ([`LoadError::IncompatiblePin`]).
/// Also the `bpfMapSizes` section of config/agent.yaml.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MapSizes {
    pub ipcache: u32,
    pub endpoints: u32,
    pub metrics: u32,
    /// Entries of the `policy` LPM trie (all local endpoints together).
    pub policy: u32,
    /// Endpoints with a policy.
    pub policy_state: u32,
    /// Distinct policy CIDR prefixes on the node.
    pub policy_cidrs: u32,
    /// Tracked connections per family, `conntrack` and `conntrack6` (LRU: the least
    /// recently used is evicted when full).
    pub conntrack: u32,
    /// Bytes of the `events` ring buffer: a power of two and a multiple of the page size.
    #[serde(rename = "eventsBytes")]
    pub events: u32,
    /// Service entries: per frontend and scope, one for the service plus one per backend.
    /// This and the next sizes apply to each family's map (`lb_services`, `lb6_services`).
    pub lb_services: u32,
    /// Distinct backends (address, port, protocol) of all services.
    pub lb_backends: u32,
    /// Frontends (reverse translation).
    pub lb_revnat: u32,
    /// Client-IP affinity records (LRU).
    pub lb_affinity: u32,
    /// loadBalancerSourceRanges prefixes of all services (each family's map).
    pub lb_source_ranges: u32,
    /// Maglev table slots of all Maglev services (table size × scopes each).
    pub lb_maglev: u32,
    /// Network namespaces (the node's and its pods') whose sockets are translated.
    pub lb_netns: u32,
    /// Translated sockets remembered for recvmsg/getpeername (LRU).
    pub lb_sock_revnat: u32,
    /// Connections translated by the tc service path, two entries each (LRU), per family
    /// (`lb_nat`, `lb6_nat`).
    pub lb_nat: u32,
    /// Egress gateway entries: (local or gatewayed source pod × destination/excluded prefix).
    pub egress_policy: u32,
    /// Connections SNATed by this node as an egress gateway, two entries each (a full table
    /// refuses new connections; idle ones are removed by the agent).
    pub egress_nat: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            ipcache: maps::IPCACHE_MAX_ENTRIES,
            endpoints: maps::ENDPOINTS_MAX_ENTRIES,
            metrics: maps::METRICS_MAX_ENTRIES,
            policy: maps::POLICY_MAX_ENTRIES,
            policy_state: maps::POLICY_STATE_MAX_ENTRIES,
            policy_cidrs: maps::POLICY_CIDRS_MAX_ENTRIES,
            conntrack: maps::CONNTRACK_MAX_ENTRIES,
            events: maps::EVENTS_RING_BYTES,
            lb_services: maps::LB_SERVICES_MAX_ENTRIES,
            lb_backends: maps::LB_BACKENDS_MAX_ENTRIES,
            lb_revnat: maps::LB_REVNAT_MAX_ENTRIES,
            lb_affinity: maps::LB_AFFINITY_MAX_ENTRIES,
            lb_source_ranges: maps::LB_SOURCE_RANGES_MAX_ENTRIES,
            lb_maglev: maps::LB_MAGLEV_MAX_ENTRIES,
            lb_netns: maps::LB_NETNS_MAX_ENTRIES,
            lb_sock_revnat: maps::LB_SOCK_REVNAT_MAX_ENTRIES,
            lb_nat: maps::LB_NAT_MAX_ENTRIES,
            egress_policy: maps::EGRESS_POLICY_MAX_ENTRIES,
            egress_nat: maps::EGRESS_NAT_MAX_ENTRIES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path} is not on a bpffs mount and cannot be mounted: {source}")]
    Bpffs { path: PathBuf, source: io::Error },
    #[error("creating pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error(
        "pinned map {path} has another shape ({found}) than this build expects ({expected}); \
         remove it to recreate (this interrupts traffic)"
    )]
    IncompatiblePin {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("reading pinned map {path}: {source}")]
    PinInfo {
        path: PathBuf,
        source: aya::maps::MapError,
    },
    #[error("loading object {object}: {source}")]
    Object {
        object: &'static str,
        source: Box<aya::EbpfError>,
    },
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("tail call {program} into {map}: {source}")]
    TailCall {
        program: &'static str,
        map: &'static str,
        source: Box<aya::maps::MapError>,
    },
}

/// Programs reached by tail call, not attached: (prog array, index, program). bpf_lxc.c's
/// IPv6 paths run in programs of their own (a fresh stack); the prog array is pinned, so
/// the attached hooks keep reaching them while the agent is down.
const TAIL_CALLS: [(&str, u32, &str); 2] = [
    ("ipv6_calls", 0, "from_container_ipv6"),
    ("ipv6_calls", 1, "to_container_ipv6"),
];

/// Loads the classifier `program` of `ebpf`; `None` when the object has no such program.
fn load_classifier<'a>(
    ebpf: &'a mut Ebpf,
    program: &'static str,
) -> Result<Option<&'a mut SchedClassifier>, LoadError> {
    let Some(found) = ebpf.program_mut(program) else {
        return Ok(None);
    };
    let error = |source| LoadError::Program {
        program,
        source: Box::new(source),
    };
    let classifier: &mut SchedClassifier = found.try_into().map_err(error)?;
    load_retrying(|| classifier.load()).map_err(error)?;
    Ok(Some(classifier))
}

/// Runs `load` again when the verifier was interrupted: it gives up with EAGAIN when a
/// signal is pending for the loading thread (a child process ending, say), which libbpf
/// retries too. Larger programs take the verifier longer, so a busy machine sees it.
fn load_retrying(
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> Result<(), aya::programs::ProgramError> {
    const TRIES: usize = 5;
    let mut tries = 1;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && tries < TRIES =>
            {
                tries += 1;
                tracing::debug!(tries, "the verifier was interrupted; loading again");
            }
            other => return other,
        }
    }
}

/// Loads the tail-called programs of `ebpf` and puts them into their prog arrays.
fn load_tail_calls(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    for (map, index, program) in TAIL_CALLS {
        let Some(classifier) = load_classifier(ebpf, program)? else {
            continue;
        };
        let fd = classifier
            .fd()
            .and_then(|fd| fd.try_clone().map_err(Into::into))
            .map_err(|source| LoadError::Program {
                program,
                source: Box::new(source),
            })?;
        let tail_call = |source| LoadError::TailCall {
            program,
            map,
            source: Box::new(source),
        };
        let data = ebpf
            .map_mut(map)
            .ok_or_else(|| tail_call(aya::maps::MapError::InvalidName { name: map.into() }))?;
        ProgramArray::try_from(data)
            .and_then(|mut array| array.set(index, &fd, 0))
            .map_err(tail_call)?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("opening cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error(
        "attaching {hook:?} to cgroup {path}: {source} ({})",
        error_chain(source)
    )]
    AttachCgroup {
        hook: SockHook,
        path: PathBuf,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("link of {hook:?} is not a bpf_link: {source}")]
    NotFdLink {
        hook: SockHook,
        source: aya::programs::links::LinkError,
    },
    #[error("attaching {hook:?} to {ifname}: {source}")]
    Attach {
        hook: Hook,
        ifname: String,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("link of {hook:?} on {ifname} is not a TCX link: {source}")]
    NotTcx {
        hook: Hook,
        ifname: String,
        source: aya::programs::links::LinkError,
    },
    #[error("opening pinned link {path}: {source}")]
    OpenPin {
        path: PathBuf,
        source: aya::programs::links::LinkError,
    },
    #[error("pinning link {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("replacing link pin {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// The loaded programs of one node; maps live in its pin directory.
pub struct Programs {
    dir: PathBuf,
    lxc: Ebpf,
    overlay: Ebpf,
    host: Ebpf,
    sock: Ebpf,
}

impl std::fmt::Debug for Programs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Programs")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Programs {
    /// Loads every program. Maps are created and pinned in `dir`, or reused
    /// if already pinned there (after a restart).
    pub fn load(dir: &Path, sizes: &MapSizes) -> Result<Self, LoadError> {
        ensure_bpffs(dir)?;
        for path in [dir.to_path_buf(), dir.join(LINKS_DIR)] {
            std::fs::create_dir_all(&path).map_err(|source| LoadError::PinDir { path, source })?;
        }
        check_pinned_maps(dir, sizes)?;
        let load = |object: &'static str, bytes: &[u8]| -> Result<Ebpf, LoadError> {
            let mut ebpf = EbpfLoader::new()
                .default_map_pin_directory(dir)
                .map_max_entries(maps::IPCACHE, sizes.ipcache)
                .map_max_entries(maps::ENDPOINTS, sizes.endpoints)
                .map_max_entries(maps::METRICS, sizes.metrics)
                .map_max_entries(maps::POLICY, sizes.policy)
                .map_max_entries(maps::POLICY_STATE, sizes.policy_state)
                .map_max_entries(maps::POLICY_CIDRS, sizes.policy_cidrs)
                .map_max_entries(maps::CONNTRACK, sizes.conntrack)
                .map_max_entries(maps::CONNTRACK6, sizes.conntrack)
                .map_max_entries(maps::EVENTS, sizes.events)
                .map_max_entries(maps::LB_SERVICES, sizes.lb_services)
                .map_max_entries(maps::LB_BACKENDS, sizes.lb_backends)
                .map_max_entries(maps::LB_REVNAT, sizes.lb_revnat)
                .map_max_entries(maps::LB_AFFINITY, sizes.lb_affinity)
                .map_max_entries(maps::LB_SOURCE_RANGES, sizes.lb_source_ranges)
                .map_max_entries(maps::LB_MAGLEV, sizes.lb_maglev)
                .map_max_entries(maps::LB_NETNS, sizes.lb_netns)
                .map_max_entries(maps::LB_SOCK_REVNAT, sizes.lb_sock_revnat)
                .map_max_entries(maps::LB_NAT, sizes.lb_nat)
                .map_max_entries(maps::LB6_SERVICES, sizes.lb_services)
                .map_max_entries(maps::LB6_BACKENDS, sizes.lb_backends)
                .map_max_entries(maps::LB6_REVNAT, sizes.lb_revnat)
                .map_max_entries(maps::LB6_SOCK_REVNAT, sizes.lb_sock_revnat)
                .map_max_entries(maps::LB6_SOURCE_RANGES, sizes.lb_source_ranges)
                .map_max_entries(maps::LB6_NAT, sizes.lb_nat)
                .map_max_entries(maps::EGRESS_POLICY, sizes.egress_policy)
                .map_max_entries(maps::EGRESS_NAT, sizes.egress_nat)
                .load(bytes)
                .map_err(|source| LoadError::Object {
                    object,
                    source: Box::new(source),
                })?;
            for hook in SockHook::ALL {
                let program = hook.program_name();
                if ebpf.program(program).is_none() {
                    continue;
                }
                let sock: &mut CgroupSockAddr = ebpf
                    .program_mut(program)
                    .expect("program listed above")
                    .try_into()
                    .map_err(|source| LoadError::Program {
                        program,
                        source: Box::new(source),
                    })?;
                load_retrying(|| sock.load()).map_err(|source| LoadError::Program {
                    program,
                    source: Box::new(source),
                })?;
            }
            for hook in Hook::ALL {
                load_classifier(&mut ebpf, hook.program_name())?;
            }
            load_tail_calls(&mut ebpf)?;
            Ok(ebpf)
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            lxc: load("bpf_lxc.o", BPF_LXC)?,
            overlay: load("bpf_overlay.o", BPF_OVERLAY)?,
            host: load("bpf_host.o", BPF_HOST)?,
            sock: load("bpf_sock.o", BPF_SOCK)?,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.dir
    }

    /// The loaded program of a hook, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn classifier(&self, hook: Hook) -> &SchedClassifier {
        let ebpf = match hook {
            Hook::FromContainer | Hook::ToContainer => &self.lxc,
            Hook::FromOverlay | Hook::ToOverlay => &self.overlay,
            Hook::FromNetdev => &self.host,
        };
        ebpf.program(hook.program_name())
            .and_then(|program| <&SchedClassifier>::try_from(program).ok())
            .expect("every hook's program is loaded by Programs::load")
    }

    fn classifier_mut(&mut self, hook: Hook) -> &mut SchedClassifier {
        let ebpf = match hook {
            Hook::FromContainer | Hook::ToContainer => &mut self.lxc,
            Hook::FromOverlay | Hook::ToOverlay => &mut self.overlay,
            Hook::FromNetdev => &mut self.host,
        };
        ebpf.program_mut(hook.program_name())
            .and_then(|program| <&mut SchedClassifier>::try_from(program).ok())
            .expect("every hook's program is loaded by Programs::load")
    }

    /// Attaches `hook` to `ifname` (in the calling thread's network
    /// namespace) as a pinned TCX link that stays attached after this process
    /// exits. An existing link of the same hook and interface is replaced
    /// without a gap: the new program goes first in the chain, then the old
    /// link is released.
    pub fn attach(&mut self, hook: Hook, ifname: &str) -> Result<(), AttachError> {
        let pin = link_pin_path(&self.dir, hook, ifname);
        let old = match pin.exists() {
            true => Some(
                PinnedLink::from_pin(&pin).map_err(|source| AttachError::OpenPin {
                    path: pin.clone(),
                    source,
                })?,
            ),
            false => None,
        };
        let program = self.classifier_mut(hook);
        let attach_err = |source| AttachError::Attach {
            hook,
            ifname: ifname.to_string(),
            source: Box::new(source),
        };
        let link_id = program
            .attach_with_options(
                ifname,
                hook.attach_type(),
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .map_err(attach_err)?;
        let link = program.take_link(link_id).map_err(attach_err)?;
        let link = FdLink::try_from(link).map_err(|source| AttachError::NotTcx {
            hook,
            ifname: ifname.to_string(),
            source,
        })?;
        // Pin beside the old pin, then rename over it: at every instant one
        // pinned link holds the hook.
        let mut staging = pin.clone().into_os_string();
        staging.push(":new");
        let staging = PathBuf::from(staging);
        let _ = std::fs::remove_file(&staging);
        let pinned = link.pin(&staging).map_err(|source| AttachError::Pin {
            path: staging.clone(),
            source,
        })?;
        std::fs::rename(&staging, &pin).map_err(|source| AttachError::Io {
            path: pin.clone(),
            source,
        })?;
        // Closing our fds: the new link lives on through its pin; the old one,
        // whose pin was replaced, is released and detaches.
        drop(pinned);
        drop(old);
        Ok(())
    }
}

impl Programs {
    /// Attaches the socket-LB hooks to the cgroup v2 directory `cgroup` as pinned links that
    /// stay attached after this process exits (every process in the subtree is then
    /// translated; the programs themselves skip sockets of other nodes' network
    /// namespaces). An existing link of a hook is replaced without a gap, as in
    /// [`Self::attach`]: both run for an instant, and the second finds the first's backend
    /// address, which is no frontend.
    pub fn attach_socket_lb(&mut self, cgroup: &Path) -> Result<(), AttachError> {
        let file = std::fs::File::open(cgroup).map_err(|source| AttachError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        for hook in SockHook::ALL {
            let pin = self.dir.join(LINKS_DIR).join(hook.pin_name());
            let old = match pin.exists() {
                true => {
                    Some(
                        PinnedLink::from_pin(&pin).map_err(|source| AttachError::OpenPin {
                            path: pin.clone(),
                            source,
                        })?,
                    )
                }
                false => None,
            };
            let program: &mut CgroupSockAddr = self
                .sock
                .program_mut(hook.program_name())
                .and_then(|p| p.try_into().ok())
                .expect("every socket hook's program is loaded by Programs::load");
            let attach_err = |source| AttachError::AttachCgroup {
                hook,
                path: cgroup.to_path_buf(),
                source: Box::new(source),
            };
            // A bpf_link on a cgroup always allows several programs; the flags must be 0
            // (the Single mode), BPF_F_ALLOW_MULTI is refused with EINVAL.
            let link_id = program
                .attach(&file, CgroupAttachMode::Single)
                .map_err(attach_err)?;
            let link = program.take_link(link_id).map_err(attach_err)?;
            let link =
                FdLink::try_from(link).map_err(|source| AttachError::NotFdLink { hook, source })?;
            let staging = self
                .dir
                .join(LINKS_DIR)
                .join(format!("{}:new", hook.pin_name()));
            let _ = std::fs::remove_file(&staging);
            let pinned = link.pin(&staging).map_err(|source| AttachError::Pin {
                path: staging.clone(),
                source,
            })?;
            std::fs::rename(&staging, &pin).map_err(|source| AttachError::Io {
                path: pin.clone(),
                source,
            })?;
            drop(pinned);
            drop(old);
        }
        Ok(())
    }

    /// The loaded program of a socket hook.
    pub fn sock_program(&self, hook: SockHook) -> &CgroupSockAddr {
        self.sock
            .program(hook.program_name())
            .and_then(|program| <&CgroupSockAddr>::try_from(program).ok())
            .expect("every socket hook's program is loaded by Programs::load")
    }
}

/// Detaches the socket-LB hooks of a node (removes their link pins). Returns how many were
/// attached.
pub fn detach_socket_lb(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for hook in SockHook::ALL {
        match std::fs::remove_file(dir.join(LINKS_DIR).join(hook.pin_name())) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// The sources below an error (aya's syscall errors keep the errno there).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut source = error.source();
    while let Some(e) = source {
        out.push(e.to_string());
        source = e.source();
    }
    out.join(": ")
}

fn link_pin_path(dir: &Path, hook: Hook, ifname: &str) -> PathBuf {
    dir.join(LINKS_DIR)
        .join(format!("{}:{ifname}", hook.as_str()))
}

/// Detaches `hook` from `ifname` by removing its link pin. Returns whether
/// a link was pinned.
pub fn detach(dir: &Path, hook: Hook, ifname: &str) -> io::Result<bool> {
    match std::fs::remove_file(link_pin_path(dir, hook, ifname)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Every pinned link of a node: (interface name, hook).
pub fn pinned_links(dir: &Path) -> io::Result<Vec<(String, Hook)>> {
    let mut links = Vec::new();
    let entries = match std::fs::read_dir(dir.join(LINKS_DIR)) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(links),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let name = entry?.file_name();
        let Some((hook, ifname)) = name.to_str().and_then(|n| n.split_once(':')) else {
            continue;
        };
        if let Some(hook) = Hook::from_str(hook) {
            links.push((ifname.to_string(), hook));
        }
    }
    links.sort();
    Ok(links)
}

/// Removes the link pins `keep` rejects (interfaces that are gone: their
/// TCX links are already defunct, the pins only hold the memory). Returns
/// what was removed.
pub fn prune_links(
    dir: &Path,
    keep: impl Fn(&str, Hook) -> bool,
) -> io::Result<Vec<(String, Hook)>> {
    let mut removed = Vec::new();
    for (ifname, hook) in pinned_links(dir)? {
        if !keep(&ifname, hook) && detach(dir, hook, &ifname)? {
            removed.push((ifname, hook));
        }
    }
    Ok(removed)
}

/// Makes sure `dir` can live on bpffs: if no existing ancestor is on bpffs
/// and `dir` is under [`BPFFS_ROOT`], mounts bpffs there.
///
/// Beware `ip netns exec`: it remounts `/sys` in a private mount namespace,
/// so a process started that way sees no `/sys/fs/bpf` and would mount a
/// fresh, empty bpffs instance that dies with it (pins lost on restart).
/// Simulated nodes should enter their netns with `setns` only, or pin under a
/// bpffs mounted outside `/sys` (see [`mount_bpffs`]) before the exec.
pub fn ensure_bpffs(dir: &Path) -> Result<(), LoadError> {
    let err = |source| LoadError::Bpffs {
        path: dir.to_path_buf(),
        source,
    };
    let mut existing = dir;
    while !existing.exists() {
        existing = existing.parent().unwrap_or(Path::new("/"));
    }
    if is_bpffs(existing).map_err(err)? {
        return Ok(());
    }
    let root = Path::new(BPFFS_ROOT);
    if !dir.starts_with(root) || is_bpffs(root).map_err(err)? {
        return Err(err(io::Error::other("not on bpffs")));
    }
    mount_bpffs(root).map_err(err)
}

/// Mounts a bpffs instance at `at` (created if missing) unless one is there.
pub fn mount_bpffs(at: &Path) -> io::Result<()> {
    std::fs::create_dir_all(at)?;
    if is_bpffs(at)? {
        return Ok(());
    }
    let target = CString::new(at.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `path` is on a bpffs mount.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: valid path and a buffer of the right type.
    if unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs succeeded and filled the buffer.
    let stat = unsafe { stat.assume_init() };
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's type differs between targets"
    )]
    Ok(stat.f_type as i64 == BPF_FS_MAGIC)
}

fn check_pinned_maps(dir: &Path, sizes: &MapSizes) -> Result<(), LoadError> {
    for (name, map_type, key_size, value_size, max_entries) in expected_maps(sizes) {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|source| LoadError::PinInfo {
            path: path.clone(),
            source,
        })?;
        let found_type = info.map_type().map_err(|source| LoadError::PinInfo {
            path: path.clone(),
            source,
        })?;
        let expected = format!("{map_type:?} key {key_size} value {value_size} max {max_entries}");
        let found = format!(
            "{found_type:?} key {} value {} max {}",
            info.key_size(),
            info.value_size(),
            info.max_entries()
        );
        if expected != found {
            return Err(LoadError::IncompatiblePin {
                path,
                expected,
                found,
            });
        }
    }
    Ok(())
}
