//! Configuration: typed settings with compiled-in defaults, a YAML file, then environment
//! variables (`TENDRIL_…`) and command-line flags on top (flag > env > file > default).
//!
//! Every struct denies unknown fields, so a misspelt or misplaced key is an error naming
//! the key, where it is, and the file. `config/operator.yaml` and `config/agent.yaml`
//! spell out every setting with its default; a test checks they equal the defaults here.
//! `--print-config` prints the effective configuration and exits.

mod agent;
mod operator;

pub use agent::{AgentArgs, AgentConfig, RoutingMode};
pub use operator::{OperatorArgs, OperatorConfig};

pub use super::logging::{LogFormat, LoggingConfig};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The flags every binary has; flattened into [`OperatorArgs`] and [`AgentArgs`].
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CommonArgs {
    /// Configuration file (YAML); without it the compiled-in defaults apply.
    #[arg(long, env = "TENDRIL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Kubeconfig to use (default: KUBECONFIG, ~/.kube/config, then in-cluster).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Address of /metrics, /healthz and /readyz (http.bindAddress).
    #[arg(long, env = "TENDRIL_METRICS_BIND")]
    pub metrics_bind: Option<String>,
    /// Log format (logging.format).
    #[arg(long, env = "TENDRIL_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter (logging.level); RUST_LOG wins over both.
    #[arg(long, env = "TENDRIL_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Print the effective configuration as YAML and exit.
    #[arg(long)]
    pub print_config: bool,
}

impl CommonArgs {
    /// The config file (or the defaults) with the common flags applied over it.
    pub fn load<C: DeserializeOwned + Default>(
        &self,
        sections: impl FnOnce(&mut C) -> (&mut HttpConfig, &mut LoggingConfig),
    ) -> Result<C, ConfigError> {
        let mut cfg: C = load_or_default(self.config.as_deref())?;
        let (http, logging) = sections(&mut cfg);
        if let Some(v) = &self.metrics_bind {
            http.bind_address = v.clone();
        }
        if let Some(v) = self.log_format {
            logging.format = v;
        }
        if let Some(v) = &self.log_level {
            logging.level = v.clone();
        }
        Ok(cfg)
    }
}

/// The HTTP port of a binary (`/metrics`, `/healthz`, `/readyz`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpConfig {
    /// `host:port` to listen on.
    pub bind_address: String,
}

/// Parses `text` (the contents of `origin`) into `T`. An empty document yields the
/// defaults. Errors name the offending key with its path and the file.
pub fn from_yaml<T: DeserializeOwned>(text: &str, origin: &Path) -> Result<T, ConfigError> {
    let parse_error = |message: String| ConfigError::Parse {
        path: origin.to_path_buf(),
        message,
    };
    let value: serde_json::Value = if text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        serde_json::Value::Null
    } else {
        serde_saphyr::from_str(text).map_err(|e| parse_error(e.to_string()))?
    };
    let value = match value {
        serde_json::Value::Null => serde_json::json!({}),
        v => v,
    };
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." {
            parse_error(inner)
        } else {
            parse_error(format!("key `{path}`: {inner}"))
        }
    })
}

/// Reads and parses the configuration file at `path`.
pub fn load_file<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    from_yaml(&text, path)
}

/// The file at `path`, or the compiled-in defaults without one.
pub fn load_or_default<T: DeserializeOwned + Default>(
    path: Option<&Path>,
) -> Result<T, ConfigError> {
    match path {
        Some(p) => load_file(p),
        None => Ok(T::default()),
    }
}

/// The configuration as YAML (what `--print-config` prints).
pub fn to_yaml<T: Serialize>(config: &T) -> String {
    let mut yaml = serde_saphyr::to_string(config).expect("configuration serializes");
    if !yaml.ends_with('\n') {
        yaml.push('\n');
    }
    yaml
}

/// A kube client from `--kubeconfig`, else the usual inference (`KUBECONFIG`,
/// `~/.kube/config`, in-cluster service account).
pub async fn kube_client(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../config")
            .join(name)
    }

    /// The committed file, parsed without defaults, must spell out exactly the defaults.
    fn assert_file_is_defaults<
        T: Serialize + DeserializeOwned + Default + PartialEq + std::fmt::Debug,
    >(
        name: &str,
    ) {
        let path = committed(name);
        let parsed: T = load_file(&path).unwrap();
        assert_eq!(
            parsed,
            T::default(),
            "{name} differs from the compiled-in defaults"
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let raw: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        let defaults = serde_json::to_value(T::default()).unwrap();
        assert_eq!(
            raw, defaults,
            "{name} must list every setting with its default"
        );
    }

    #[test]
    fn committed_operator_yaml_equals_defaults() {
        assert_file_is_defaults::<OperatorConfig>("operator.yaml");
    }

    #[test]
    fn committed_agent_yaml_equals_defaults() {
        assert_file_is_defaults::<AgentConfig>("agent.yaml");
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let err = from_yaml::<OperatorConfig>(
            "leaderElection:\n  leaseNmae: x\n",
            Path::new("/etc/op.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("/etc/op.yaml"), "{err}");
        assert!(err.contains("leaseNmae"), "{err}");
        assert!(err.contains("leaderElection"), "{err}");

        let err = from_yaml::<AgentConfig>("bogus: 1\n", Path::new("a.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("a.yaml") && err.contains("bogus"), "{err}");
    }

    #[test]
    fn mistyped_value_names_key_and_file() {
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
    }

    #[test]
    fn partial_file_keeps_other_defaults_and_empty_file_is_defaults() {
        let cfg: OperatorConfig =
            from_yaml("http:\n  bindAddress: 127.0.0.1:1\n", Path::new("x")).unwrap();
        assert_eq!(cfg.http.bind_address, "127.0.0.1:1");
        assert_eq!(
            cfg.leader_election,
            OperatorConfig::default().leader_election
        );
        let empty: AgentConfig = from_yaml("# nothing\n\n", Path::new("x")).unwrap();
        assert_eq!(empty, AgentConfig::default());
    }

    #[test]
    fn yaml_round_trips() {
        let cfg = AgentConfig::default();
        let back: AgentConfig = from_yaml(&to_yaml(&cfg), Path::new("x")).unwrap();
        assert_eq!(back, cfg);
        let cfg = OperatorConfig::default();
        let back: OperatorConfig = from_yaml(&to_yaml(&cfg), Path::new("x")).unwrap();
        assert_eq!(back, cfg);
    }
}
