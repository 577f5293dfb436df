//! `tendril-operator`'s settings (config/operator.yaml) and flags.
//!
//! Concerns that need settings add a section here (a struct with
//! `#[serde(rename_all = "camelCase", deny_unknown_fields, default)]`) and document it,
//! with its defaults, in config/operator.yaml.

use clap::Parser;
use serde::{Deserialize, Serialize};
use tendril_runtime::backoff::Backoff;
use tendril_runtime::config::{CommonArgs, ConfigError, HttpConfig, LoggingConfig};
use tendril_runtime::leader::LeaderElectionConfig;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct OperatorConfig {
    pub logging: LoggingConfig,
    pub http: HttpConfig,
    pub leader_election: LeaderElectionConfig,
    /// Retry curve of failed reconciles.
    pub backoff: Backoff,
    /// Node -> NodeNetwork (concern `nodes`).
    pub nodes: crate::nodes::NodesConfig,
    /// Pod CIDR pools (concern `ipam`).
    pub ipam: crate::ipam::IpamConfig,
    /// Security identities and the label filter (concerns `identities`, `endpoints`).
    pub identities: crate::identities::IdentitiesConfig,
    /// Network policy resolution (concern `policy`).
    pub policy: crate::policy::PolicyConfig,
    /// Services → LBServices, the kube-proxy replacement's desired state (concern `services`).
    pub services: crate::services::ServicesConfig,
    /// BGPPeeringPolicy → BGPNodeConfig per node (concern `bgp`).
    pub bgp: crate::bgp::BgpConfig,
    /// EgressGatewayPolicy -> EgressRoute per policy (concern `egress`).
    pub egress: crate::egress::EgressConfig,
    /// EncryptionPolicy -> NodeNetwork.spec.encryption per node (concern `encryption`).
    pub encryption: crate::encryption::EncryptionConfig,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            logging: LoggingConfig::default(),
            http: HttpConfig {
                bind_address: "0.0.0.0:9963".to_string(),
            },
            leader_election: LeaderElectionConfig::default(),
            backoff: Backoff::default(),
            nodes: Default::default(),
            ipam: Default::default(),
            identities: Default::default(),
            policy: Default::default(),
            services: Default::default(),
            bgp: Default::default(),
            egress: Default::default(),
            encryption: Default::default(),
        }
    }
}

impl OperatorConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.leader_election
            .validate()
            .map_err(ConfigError::Invalid)?;
        self.backoff.validate().map_err(ConfigError::Invalid)?;
        self.identities.validate().map_err(ConfigError::Invalid)?;
        self.services.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }
}

/// Command line of `tendril-operator`. Each flag can also be set by the environment
/// variable shown in `--help`; a flag beats its variable, which beats the file.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "tendril-operator",
    version,
    about = "Tendril's cluster-wide reconcilers"
)]
pub struct OperatorArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Run controllers only while holding the Lease (leaderElection.enabled).
    #[arg(long, env = "TENDRIL_LEADER_ELECT", num_args = 0..=1, default_missing_value = "true")]
    pub leader_elect: Option<bool>,
    /// Lease name (leaderElection.leaseName).
    #[arg(long, env = "TENDRIL_LEASE_NAME")]
    pub lease_name: Option<String>,
    /// Lease namespace, which must exist (leaderElection.leaseNamespace).
    #[arg(long, env = "TENDRIL_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Lease duration in seconds (leaderElection.leaseDurationSeconds).
    #[arg(long, env = "TENDRIL_LEASE_DURATION_SECONDS")]
    pub lease_duration_seconds: Option<u64>,
    /// Renew this many seconds before expiry (leaderElection.renewGraceSeconds).
    #[arg(long, env = "TENDRIL_RENEW_GRACE_SECONDS")]
    pub renew_grace_seconds: Option<u64>,
    /// Leader election identity (default: hostname_pid).
    #[arg(long, env = "TENDRIL_LEADER_IDENTITY")]
    pub leader_identity: Option<String>,
}

impl OperatorArgs {
    /// The effective configuration: defaults, then the file, then env and flags.
    pub fn resolve(&self) -> Result<OperatorConfig, ConfigError> {
        let mut cfg: OperatorConfig = self
            .common
            .load(|c: &mut OperatorConfig| (&mut c.http, &mut c.logging))?;
        let le = &mut cfg.leader_election;
        if let Some(v) = self.leader_elect {
            le.enabled = v;
        }
        if let Some(v) = &self.lease_name {
            le.lease_name = v.clone();
        }
        if let Some(v) = &self.lease_namespace {
            le.lease_namespace = v.clone();
        }
        if let Some(v) = self.lease_duration_seconds {
            le.lease_duration_seconds = v;
        }
        if let Some(v) = self.renew_grace_seconds {
            le.renew_grace_seconds = v;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use tendril_runtime::config::{LogFormat, check_file_is_defaults, from_yaml, to_yaml};

    #[test]
    fn committed_operator_yaml_equals_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/operator.yaml");
        check_file_is_defaults::<OperatorConfig>(&path).unwrap();
    }

    #[test]
    fn unknown_key_names_key_section_and_file() {
        let err = from_yaml::<OperatorConfig>(
            "leaderElection:\n  leaseNmae: x\n",
            std::path::Path::new("/etc/op.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("/etc/op.yaml"), "{err}");
        assert!(err.contains("leaseNmae"), "{err}");
        assert!(err.contains("leaderElection"), "{err}");
    }

    #[test]
    fn yaml_round_trips() {
        let cfg = OperatorConfig::default();
        let back: OperatorConfig = from_yaml(&to_yaml(&cfg), std::path::Path::new("x")).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn flags_override_the_file() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "http:\n  bindAddress: 10.0.0.1:1\nleaderElection:\n  leaseName: from-file\n  enabled: true").unwrap();
        let path = f.path().to_str().unwrap().to_string();
        let args = OperatorArgs::try_parse_from([
            "tendril-operator",
            "--config",
            &path,
            "--metrics-bind",
            "127.0.0.1:0",
            "--leader-elect=false",
            "--log-format",
            "json",
        ])
        .unwrap();
        let cfg = args.resolve().unwrap();
        assert_eq!(cfg.http.bind_address, "127.0.0.1:0");
        assert_eq!(cfg.leader_election.lease_name, "from-file");
        assert!(!cfg.leader_election.enabled);
        assert_eq!(cfg.logging.format, LogFormat::Json);

        let bare = OperatorArgs::try_parse_from(["tendril-operator", "--leader-elect"]).unwrap();
        assert_eq!(bare.leader_elect, Some(true));
    }

    #[test]
    fn invalid_lease_timing_is_refused() {
        let args = OperatorArgs::try_parse_from([
            "tendril-operator",
            "--lease-duration-seconds",
            "5",
            "--renew-grace-seconds",
            "5",
        ])
        .unwrap();
        let err = args.resolve().unwrap_err().to_string();
        assert!(err.contains("renewGraceSeconds"), "{err}");
    }
}
