//! Configuration: typed settings with compiled-in defaults, a YAML file, then environment
//! variables (`TENDRIL_…`) and command-line flags on top (flag > env > file > default).
//!
//! Every struct denies unknown fields, so a misspelt or misplaced key is an error naming
//! the key, where it is, and the file. `config/operator.yaml` and `config/agent.yaml`
//! spell out every setting with its default; a test checks they equal the defaults here.
//! `--print-config` prints the effective configuration and exits.
//!
//! Each binary owns its settings type (`tendril_controllers::config::OperatorConfig`,
//! `tendril_datapath::config::AgentConfig`); this module holds what loading them shares.

pub use crate::logging::{LogFormat, LoggingConfig};
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

/// Checks that the committed file at `path`, parsed without defaults, spells out exactly the
/// compiled-in defaults of `T` (every setting, each with its default value). Both binaries
/// test their `config/*.yaml` with it.
pub fn check_file_is_defaults<T>(path: &Path) -> Result<(), String>
where
    T: Serialize + DeserializeOwned + Default + PartialEq + std::fmt::Debug,
{
    let name = path.display();
    let parsed: T = load_file(path).map_err(|e| e.to_string())?;
    if parsed != T::default() {
        return Err(format!(
            "{name} differs from the compiled-in defaults:\n{parsed:#?}\nvs\n{:#?}",
            T::default()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let raw: serde_json::Value = serde_saphyr::from_str(&text).map_err(|e| e.to_string())?;
    let defaults = serde_json::to_value(T::default()).map_err(|e| e.to_string())?;
    if raw != defaults {
        return Err(format!(
            "{name} must list every setting with its default:\n{raw:#}\nvs\n{defaults:#}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields, default)]
    struct Sample {
        tunnel_port: u16,
        http: HttpConfig,
        logging: LoggingConfig,
    }

    impl Default for Sample {
        fn default() -> Self {
            Self {
                tunnel_port: 8472,
                http: HttpConfig {
                    bind_address: "0.0.0.0:1".into(),
                },
                logging: LoggingConfig::default(),
            }
        }
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let err = from_yaml::<Sample>("http:\n  bindAdress: x\n", Path::new("/etc/op.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/etc/op.yaml"), "{err}");
        assert!(err.contains("bindAdress"), "{err}");
        assert!(err.contains("http"), "{err}");
        let err = from_yaml::<Sample>("bogus: 1\n", Path::new("a.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("a.yaml") && err.contains("bogus"), "{err}");
    }

    #[test]
    fn mistyped_value_names_key_and_file() {
        let err = from_yaml::<Sample>("tunnelPort: lots\n", Path::new("agent.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("agent.yaml") && err.contains("tunnelPort"),
            "{err}"
        );
    }

    #[test]
    fn partial_file_keeps_other_defaults_and_empty_file_is_defaults() {
        let cfg: Sample = from_yaml("http:\n  bindAddress: 127.0.0.1:1\n", Path::new("x")).unwrap();
        assert_eq!(cfg.http.bind_address, "127.0.0.1:1");
        assert_eq!(cfg.tunnel_port, 8472);
        let empty: Sample = from_yaml("# nothing\n\n", Path::new("x")).unwrap();
        assert_eq!(empty, Sample::default());
    }

    #[test]
    fn yaml_round_trips() {
        let cfg = Sample::default();
        let back: Sample = from_yaml(&to_yaml(&cfg), Path::new("x")).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn a_file_missing_a_default_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.yaml");
        std::fs::write(&path, "tunnelPort: 8472\n").unwrap();
        let err = check_file_is_defaults::<Sample>(&path).unwrap_err();
        assert!(err.contains("every setting"), "{err}");
        std::fs::write(&path, to_yaml(&Sample::default())).unwrap();
        check_file_is_defaults::<Sample>(&path).unwrap();
    }
}
