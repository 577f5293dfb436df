//! `tendril-agent`'s settings (config/agent.yaml) and flags, loaded with the runtime's config
//! plumbing. A new setting: a field (with its default in `Default`), documented in
//! config/agent.yaml, and, if it needs one, a flag in `AgentArgs` applied in `resolve`.

use crate::agent::driver::LoopTiming;
use crate::bpf::MapSizes;
use clap::Parser;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;
use tendril_runtime::backoff::Backoff;
use tendril_runtime::config::{CommonArgs, ConfigError, HttpConfig, LoggingConfig};

/// How pod traffic crosses nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RoutingMode {
    /// VXLAN between nodes; the source identity travels in the VNI.
    #[default]
    Overlay,
    /// Routes to other nodes' pod CIDRs via their node addresses.
    Native,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The Node this agent serves; usually set with --node-name / TENDRIL_NODE_NAME.
    pub node_name: String,
    /// Runtime state (allocations, sockets).
    pub state_dir: PathBuf,
    /// Unix socket the CNI plugin talks to.
    pub cni_socket: PathBuf,
    /// bpffs directory where this node's maps are pinned.
    pub bpffs_root: PathBuf,
    pub routing_mode: RoutingMode,
    /// UDP port of the VXLAN overlay.
    pub tunnel_port: u16,
    /// MTU of pod interfaces.
    pub mtu: u32,
    pub http: HttpConfig,
    pub logging: LoggingConfig,
    /// Retry curve of failed reconciles.
    pub backoff: Backoff,
    /// Name of the collect-metadata VXLAN device (overlay mode).
    pub tunnel_device: String,
    /// The datapath converges at least this often even without a change (seconds).
    pub datapath_resync_seconds: u64,
    /// Passes start at least this far apart (milliseconds): the first change after a quiet
    /// time is converged at once, the changes arriving within the window in one next pass.
    pub datapath_debounce_millis: u64,
    /// Capacities of the BPF maps; a pinned map of another size is refused at start.
    pub bpf_map_sizes: MapSizes,
    /// Network policy enforcement (`policy`).
    pub policy: PolicyEnforcementConfig,
    /// Services: the kube-proxy replacement (`services`).
    pub services: ServicesConfig,
    /// BGP: the node's gobgpd (`bgp`).
    pub bgp: BgpConfig,
    /// Hubble-compatible flows and the Observer API (`flows`).
    pub flows: crate::flows::FlowsConfig,
    /// Transparent encryption: WireGuard device, steering (`encryption`).
    pub encryption: crate::encryption::EncryptionAgentConfig,
}

/// The node's BGP speaker (`bgp`): gobgpd, driven by the agent from the node's
/// `BGPNodeConfig`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct BgpConfig {
    /// Watch the node's BGPNodeConfig and run gobgpd when it has a router.
    pub enabled: bool,
    /// The gobgpd binary (a path, or a name looked up in PATH).
    pub gobgpd_path: PathBuf,
    /// gobgpd's gRPC API socket (unix); empty: `{stateDir}/bgp/gobgpd.sock`.
    pub api_socket: PathBuf,
    /// gobgpd's BGP listen port in the node's namespace; -1: it only connects to its peers.
    pub listen_port: i32,
    /// Session state and prefix counts are read into the status this often (seconds).
    pub status_interval_seconds: u64,
    /// First delay before gobgpd is restarted after it exits (milliseconds); doubles up to
    /// `restartMaxMillis` while it keeps exiting.
    pub restart_min_millis: u64,
    pub restart_max_millis: u64,
    /// The namespace of the Secrets that neighbors' `authSecretRef`s name (key `password`):
    /// the only namespace whose Secrets the agent reads.
    pub secrets_namespace: String,
}

impl Default for BgpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            gobgpd_path: PathBuf::from("gobgpd"),
            api_socket: PathBuf::new(),
            listen_port: -1,
            status_interval_seconds: 5,
            restart_min_millis: 500,
            restart_max_millis: 30_000,
            secrets_namespace: "tendril-bgp-secrets".into(),
        }
    }
}

/// Backend selection for new connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LbAlgorithm {
    /// Uniformly at random over the backends taking new connections.
    #[default]
    Random,
    /// Maglev consistent hashing: a backend set change moves as few flows as possible.
    Maglev,
}

/// Services on the node (`services`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ServicesConfig {
    /// Program the LBServices into the datapath at all.
    pub enabled: bool,
    /// Default backend selection of a service whose LBService names none.
    pub algorithm: LbAlgorithm,
    /// Maglev lookup table size M: a prime; ~100 × the largest backend count keeps
    /// reassignment on a backend change within ~1%.
    pub maglev_table_size: u32,
    /// Seed of the flow hash; the same on every agent so every node picks alike.
    pub hash_seed: u32,
    /// `NodeNetwork.status.realizedServicesRevision` alone is rewritten at most this often
    /// (milliseconds): the first revision after a quiet time is reported at once, the
    /// revisions of a sustained burst of Service changes once per interval.
    pub report_interval_millis: u64,
    /// Socket-level load balancing (`services.socketLB`).
    #[serde(rename = "socketLB")]
    pub socket_lb: SocketLbConfig,
}

/// Socket-level load balancing (`services.socketLB`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct SocketLbConfig {
    /// Translate service connections at connect() for the node's and its pods' processes.
    pub enabled: bool,
    /// The cgroup v2 directory the hooks attach to (every process below it is covered);
    /// empty: the root of the cgroup2 mount, found in /proc/self/mounts.
    pub cgroup_path: PathBuf,
}

impl Default for ServicesConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            algorithm: LbAlgorithm::Random,
            maglev_table_size: 16381,
            hash_seed: 0x7e4d_1e5d,
            report_interval_millis: 2000,
            socket_lb: SocketLbConfig::default(),
        }
    }
}

impl Default for SocketLbConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            cgroup_path: PathBuf::new(),
        }
    }
}

/// Network policy enforcement on the node (`policy`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PolicyEnforcementConfig {
    /// Count and report would-be policy drops (verdict `audit`) and let the packets pass.
    pub audit_mode: bool,
    /// Judge IPv6 by policy as IPv4 is; false: IPv6 to and from policy-selected endpoints
    /// is dropped (fail closed), endpoints without policy keep theirs.
    pub ipv6: bool,
    /// Expired conntrack entries are removed this often (seconds).
    pub conntrack_gc_seconds: u64,
    /// Policy verdict and drop events from the datapath.
    pub events: PolicyEventsConfig,
    /// Which allow verdicts the datapath reports (drops always are).
    pub allow_events: AllowEventsConfig,
}

/// Which allow verdicts of new connections reach the events ring (`policy.allowEvents`),
/// like Hubble's monitor aggregation. Drops and audit verdicts are always reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AllowEventsConfig {
    pub mode: AllowEventsMode,
    /// `aggregate`: at most one allow verdict per flow this often (seconds).
    pub interval_seconds: u64,
}

/// `policy.allowEvents.mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AllowEventsMode {
    /// The first connection of a flow (endpoint, direction, peer identity, protocol,
    /// destination port), then at most one per interval.
    Aggregate,
    /// Every new connection (the ring buffer on every new connection's path).
    All,
    /// None: only drops and audit verdicts.
    DropsOnly,
}

impl AllowEventsConfig {
    /// `policy_config.event_mode` and `event_interval_ns`.
    pub fn datapath(&self) -> (u32, u64) {
        use crate::bpf::maps::{POLICY_EVENTS_AGGREGATE, POLICY_EVENTS_ALL, POLICY_EVENTS_DROPS};
        let mode = match self.mode {
            AllowEventsMode::Aggregate => POLICY_EVENTS_AGGREGATE,
            AllowEventsMode::All => POLICY_EVENTS_ALL,
            AllowEventsMode::DropsOnly => POLICY_EVENTS_DROPS,
        };
        (mode, self.interval_seconds.saturating_mul(1_000_000_000))
    }
}

impl Default for AllowEventsConfig {
    fn default() -> Self {
        Self {
            mode: AllowEventsMode::Aggregate,
            interval_seconds: 5,
        }
    }
}

/// What the agent keeps of the datapath's events (`policy.events`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PolicyEventsConfig {
    /// Recent flows kept in memory and served at `GET /flows` (0: none kept).
    pub recent_flows: usize,
    /// Denied flows logged at info level, at most this many per second (0: none).
    pub denied_log_per_second: u32,
}

impl Default for PolicyEnforcementConfig {
    fn default() -> Self {
        Self {
            audit_mode: false,
            ipv6: true,
            conntrack_gc_seconds: 30,
            events: PolicyEventsConfig::default(),
            allow_events: AllowEventsConfig::default(),
        }
    }
}

impl Default for PolicyEventsConfig {
    fn default() -> Self {
        Self {
            recent_flows: 4096,
            denied_log_per_second: 10,
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            node_name: String::new(),
            state_dir: PathBuf::from("/var/run/tendril"),
            cni_socket: PathBuf::from("/var/run/tendril/cni.sock"),
            bpffs_root: PathBuf::from("/sys/fs/bpf/tendril"),
            routing_mode: RoutingMode::Overlay,
            tunnel_port: 8472,
            mtu: 1450,
            http: HttpConfig {
                bind_address: "0.0.0.0:9962".to_string(),
            },
            logging: LoggingConfig::default(),
            backoff: Backoff::default(),
            tunnel_device: "tendril_vxlan".to_string(),
            datapath_resync_seconds: 30,
            datapath_debounce_millis: 10,
            bpf_map_sizes: MapSizes::default(),
            policy: PolicyEnforcementConfig::default(),
            services: ServicesConfig::default(),
            bgp: BgpConfig::default(),
            flows: crate::flows::FlowsConfig::default(),
            encryption: crate::encryption::EncryptionAgentConfig::default(),
        }
    }
}

impl AgentConfig {
    /// gobgpd's API socket: `bgp.apiSocket`, or `{stateDir}/bgp/gobgpd.sock`.
    pub fn bgp_api_socket(&self) -> PathBuf {
        if self.bgp.api_socket.as_os_str().is_empty() {
            crate::bgp::daemon::socket_path(&self.state_dir)
        } else {
            self.bgp.api_socket.clone()
        }
    }

    /// When the node pass runs: `datapathResyncSeconds`, `datapathDebounceMillis`, and the
    /// `backoff` curve after a failed pass.
    pub fn pass_timing(&self) -> LoopTiming {
        LoopTiming {
            resync: Duration::from_secs(self.datapath_resync_seconds),
            debounce: Duration::from_millis(self.datapath_debounce_millis),
            backoff: self.backoff.clone(),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.backoff.validate().map_err(ConfigError::Invalid)?;
        self.encryption.validate().map_err(ConfigError::Invalid)?;
        if self.node_name.is_empty() {
            return Err(ConfigError::Invalid(
                "nodeName is required (--node-name or TENDRIL_NODE_NAME)".into(),
            ));
        }
        if self.tunnel_port == 0 {
            return Err(ConfigError::Invalid("tunnelPort must be > 0".into()));
        }
        if !(576..=9000).contains(&self.mtu) {
            return Err(ConfigError::Invalid("mtu must be within 576..9000".into()));
        }
        if self.tunnel_device.is_empty() || self.tunnel_device.len() > 15 {
            return Err(ConfigError::Invalid(
                "tunnelDevice must be 1 to 15 characters (an interface name)".into(),
            ));
        }
        if self.datapath_resync_seconds == 0 {
            return Err(ConfigError::Invalid(
                "datapathResyncSeconds must be > 0".into(),
            ));
        }
        let sizes = &self.bpf_map_sizes;
        let all = [
            sizes.lb_services,
            sizes.lb_backends,
            sizes.lb_revnat,
            sizes.lb_affinity,
            sizes.lb_source_ranges,
            sizes.lb_maglev,
            sizes.lb_netns,
            sizes.lb_sock_revnat,
            sizes.lb_nat,
            sizes.ipcache,
            sizes.endpoints,
            sizes.metrics,
            sizes.policy,
            sizes.policy_state,
            sizes.policy_cidrs,
            sizes.conntrack,
            sizes.events,
        ];
        if all.contains(&0) {
            return Err(ConfigError::Invalid(
                "bpfMapSizes: every size must be > 0".into(),
            ));
        }
        if !sizes.events.is_power_of_two() || sizes.events < 4096 {
            return Err(ConfigError::Invalid(
                "bpfMapSizes.eventsBytes must be a power of two of at least 4096".into(),
            ));
        }
        crate::services::maglev::check_table_size(self.services.maglev_table_size)
            .map_err(|e| ConfigError::Invalid(format!("services.maglevTableSize: {e}")))?;
        if self.bgp.status_interval_seconds == 0 {
            return Err(ConfigError::Invalid(
                "bgp.statusIntervalSeconds must be > 0".into(),
            ));
        }
        if self.bgp.restart_min_millis == 0
            || self.bgp.restart_max_millis < self.bgp.restart_min_millis
        {
            return Err(ConfigError::Invalid(
                "bgp: restartMinMillis must be > 0 and restartMaxMillis >= restartMinMillis".into(),
            ));
        }
        if self.bgp.secrets_namespace.is_empty() {
            return Err(ConfigError::Invalid(
                "bgp.secretsNamespace must name a namespace".into(),
            ));
        }
        if !(-1..=65535).contains(&self.bgp.listen_port) || self.bgp.listen_port == 0 {
            return Err(ConfigError::Invalid(
                "bgp.listenPort must be -1 (do not listen) or a port 1..65535".into(),
            ));
        }
        self.flows.validate().map_err(ConfigError::Invalid)?;
        if self.policy.conntrack_gc_seconds == 0 {
            return Err(ConfigError::Invalid(
                "policy.conntrackGcSeconds must be > 0".into(),
            ));
        }
        Ok(())
    }
}

/// Command line of `tendril-agent` (flatten it into a larger parser if needed).
#[derive(Clone, Debug, Parser)]
#[command(
    name = "tendril-agent",
    version,
    about = "Tendril's node datapath reconciler"
)]
pub struct AgentArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// The Node this agent serves (nodeName).
    #[arg(long, env = "TENDRIL_NODE_NAME")]
    pub node_name: Option<String>,
    /// stateDir.
    #[arg(long, env = "TENDRIL_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// cniSocket.
    #[arg(long, env = "TENDRIL_CNI_SOCKET")]
    pub cni_socket: Option<PathBuf>,
    /// bpffsRoot.
    #[arg(long, env = "TENDRIL_BPFFS_ROOT")]
    pub bpffs_root: Option<PathBuf>,
    /// routingMode.
    #[arg(long, env = "TENDRIL_ROUTING_MODE", value_enum)]
    pub routing_mode: Option<RoutingMode>,
    /// tunnelPort.
    #[arg(long, env = "TENDRIL_TUNNEL_PORT")]
    pub tunnel_port: Option<u16>,
    /// mtu.
    #[arg(long, env = "TENDRIL_MTU")]
    pub mtu: Option<u32>,
    /// Policy audit mode (policy.auditMode): would-be drops are counted and reported, the
    /// packets pass. `--policy-audit-mode` alone means true.
    #[arg(
        long,
        env = "TENDRIL_POLICY_AUDIT_MODE",
        num_args = 0..=1,
        default_missing_value = "true",
        value_name = "BOOL"
    )]
    pub policy_audit_mode: Option<bool>,
    /// policy.ipv6: judge IPv6 by policy (false: fail closed for policy-selected endpoints).
    #[arg(long, env = "TENDRIL_POLICY_IPV6", value_name = "BOOL")]
    pub policy_ipv6: Option<bool>,
    /// services.socketLB.cgroupPath: the cgroup v2 directory the socket-LB hooks attach to.
    #[arg(long, env = "TENDRIL_SOCKET_LB_CGROUP_PATH")]
    pub socket_lb_cgroup_path: Option<PathBuf>,
    /// flows.observer.bindAddress: host:port of the Observer gRPC API (empty: off).
    #[arg(long, env = "TENDRIL_OBSERVER_BIND")]
    pub observer_bind: Option<String>,
    /// encryption.interface: name of the WireGuard interface.
    #[arg(long, env = "TENDRIL_WIREGUARD_INTERFACE")]
    pub wireguard_interface: Option<String>,
    /// encryption.wireguardImplementation.
    #[arg(long, env = "TENDRIL_WIREGUARD_IMPLEMENTATION", value_enum)]
    pub wireguard_implementation: Option<crate::encryption::WireGuardImplementation>,
}

impl AgentArgs {
    /// The effective configuration without validation (for `--print-config`).
    pub fn merged(&self) -> Result<AgentConfig, ConfigError> {
        let mut cfg: AgentConfig = self
            .common
            .load(|c: &mut AgentConfig| (&mut c.http, &mut c.logging))?;
        if let Some(v) = &self.node_name {
            cfg.node_name = v.clone();
        }
        if let Some(v) = &self.state_dir {
            cfg.state_dir = v.clone();
        }
        if let Some(v) = &self.cni_socket {
            cfg.cni_socket = v.clone();
        }
        if let Some(v) = &self.bpffs_root {
            cfg.bpffs_root = v.clone();
        }
        if let Some(v) = self.routing_mode {
            cfg.routing_mode = v;
        }
        if let Some(v) = self.tunnel_port {
            cfg.tunnel_port = v;
        }
        if let Some(v) = self.mtu {
            cfg.mtu = v;
        }
        if let Some(v) = self.policy_audit_mode {
            cfg.policy.audit_mode = v;
        }
        if let Some(v) = self.policy_ipv6 {
            cfg.policy.ipv6 = v;
        }
        if let Some(v) = &self.socket_lb_cgroup_path {
            cfg.services.socket_lb.cgroup_path = v.clone();
        }
        if let Some(v) = &self.observer_bind {
            cfg.flows.observer.bind_address = v.clone();
        }
        if let Some(v) = &self.wireguard_interface {
            cfg.encryption.interface = v.clone();
        }
        if let Some(v) = self.wireguard_implementation {
            cfg.encryption.wireguard_implementation = v;
        }
        Ok(cfg)
    }

    /// The effective, validated configuration: defaults, the file, then env and flags.
    pub fn resolve(&self) -> Result<AgentConfig, ConfigError> {
        let cfg = self.merged()?;
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use tendril_runtime::config::{check_file_is_defaults, from_yaml, to_yaml};

    #[test]
    fn committed_agent_yaml_equals_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/agent.yaml");
        check_file_is_defaults::<AgentConfig>(&path).unwrap();
    }

    #[test]
    fn mistyped_values_name_the_key_and_file() {
        let err = from_yaml::<AgentConfig>("tunnelPort: lots\n", Path::new("agent.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("agent.yaml") && err.contains("tunnelPort"),
            "{err}"
        );
        let err =
            from_yaml::<AgentConfig>("routingMode: carrier-pigeon\n", Path::new("agent.yaml"))
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("routingMode") && err.contains("carrier-pigeon"),
            "{err}"
        );
        let empty: AgentConfig = from_yaml("# nothing\n\n", Path::new("x")).unwrap();
        assert_eq!(empty, AgentConfig::default());
        let back: AgentConfig = from_yaml(&to_yaml(&empty), Path::new("x")).unwrap();
        assert_eq!(back, empty);
    }

    #[test]
    fn a_bad_backoff_is_refused_like_the_operators() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, b"nodeName: n1\nbackoff:\n  baseMillis: 0\n").unwrap();
        let path = f.path().to_str().unwrap().to_string();
        let args = AgentArgs::try_parse_from(["tendril-agent", "--config", &path]).unwrap();
        let err = args.resolve().unwrap_err().to_string();
        assert!(err.contains("baseMillis"), "{err}");
    }

    #[test]
    fn flags_override_defaults_and_node_name_is_required() {
        let args = AgentArgs::try_parse_from(["tendril-agent"]).unwrap();
        assert!(args.resolve().unwrap_err().to_string().contains("nodeName"));
        let args = AgentArgs::try_parse_from([
            "tendril-agent",
            "--node-name",
            "n1",
            "--routing-mode",
            "native",
            "--bpffs-root",
            "/sys/fs/bpf/t1",
        ])
        .unwrap();
        let cfg = args.resolve().unwrap();
        assert_eq!(cfg.node_name, "n1");
        assert_eq!(cfg.routing_mode, RoutingMode::Native);
        assert_eq!(cfg.bpffs_root, PathBuf::from("/sys/fs/bpf/t1"));
        assert_eq!(cfg.tunnel_port, 8472);
        assert!(!cfg.policy.audit_mode);
    }

    #[test]
    fn the_backoff_section_sets_the_pass_retry_curve() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(
            &mut f,
            b"nodeName: n1\nbackoff:\n  baseMillis: 40\n  maxMillis: 900\n  jitter: 0\n",
        )
        .unwrap();
        let path = f.path().to_str().unwrap().to_string();
        let cfg = AgentArgs::try_parse_from(["tendril-agent", "--config", &path])
            .unwrap()
            .resolve()
            .unwrap();
        let timing = cfg.pass_timing();
        assert_eq!(timing.backoff.base_millis, 40);
        assert_eq!(timing.backoff.max_millis, 900);
        use crate::agent::driver::PassOutcome::Failed;
        let waits: Vec<u128> = (1..=6)
            .map(|n| timing.wait_after(Failed, n).as_millis())
            .collect();
        assert_eq!(waits, [40, 80, 160, 320, 640, 900]);
    }

    #[test]
    fn audit_mode_flag_alone_or_with_a_value() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["tendril-agent", "--node-name", "n1"];
            argv.extend_from_slice(extra);
            AgentArgs::try_parse_from(argv).unwrap().resolve().unwrap()
        };
        assert!(parse(&["--policy-audit-mode"]).policy.audit_mode);
        assert!(parse(&["--policy-audit-mode=true"]).policy.audit_mode);
        assert!(!parse(&["--policy-audit-mode=false"]).policy.audit_mode);
        let mut bad = AgentConfig {
            node_name: "n1".into(),
            ..Default::default()
        };
        bad.bpf_map_sizes.events = 5000;
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("eventsBytes")
        );
    }

    #[test]
    fn maglev_table_size_must_be_prime() {
        use crate::services::maglev::is_prime;
        assert!(is_prime(16381) && is_prime(65521) && is_prime(2));
        assert!(!is_prime(16384) && !is_prime(1) && !is_prime(0) && !is_prime(16383));
        let mut cfg = AgentConfig {
            node_name: "n1".into(),
            ..AgentConfig::default()
        };
        cfg.validate().unwrap();
        cfg.services.maglev_table_size = 16384;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("maglevTableSize") && err.contains("16384"),
            "{err}"
        );
        let parsed: AgentConfig = from_yaml(
            "services:\n  algorithm: Maglev\n  socketLB:\n    cgroupPath: /sys/fs/cgroup/x\n",
            Path::new("agent.yaml"),
        )
        .unwrap();
        assert_eq!(parsed.services.algorithm, LbAlgorithm::Maglev);
        assert_eq!(
            parsed.services.socket_lb.cgroup_path,
            PathBuf::from("/sys/fs/cgroup/x")
        );
    }
}
