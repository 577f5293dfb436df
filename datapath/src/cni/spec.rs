//! The CNI specification's data: network configuration, environment, results and errors
//! (https://www.cni.dev/docs/spec/, versions 0.3.0 to 1.1.0).

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

/// Versions whose configuration we accept and whose result format we write. 0.3.x and
/// 0.4.0 results differ from 1.x only by the `version` field of each IP.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The version we answer in when the request does not say (VERSION, decode failures).
pub const LATEST: &str = "1.1.0";

/// Default agent socket, matching `cniSocket` in `config/agent.yaml`.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/tendril/cni.sock";

/// A CNI error code (spec section "Error").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnv = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    /// STATUS: the plugin cannot serve ADDs now.
    NotAvailable = 50,
    /// STATUS: not available, and existing pods may have limited connectivity.
    LimitedConnectivity = 51,
    // Plugin-specific codes start at 100.
    /// The node's pod CIDR has no free address.
    PoolExhausted = 100,
    /// CHECK found the attachment differs from the previous result.
    CheckFailed = 101,
    /// The agent refused the request for another reason.
    AgentError = 102,
}

/// The error a plugin prints on stdout (and exits non-zero).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniError {
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

/// An error on its way out, before the version to report it in is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl Failure {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl fmt::Display) -> Self {
        self.details = details.to_string();
        self
    }

    pub fn into_error(self, cni_version: &str) -> CniError {
        CniError {
            cni_version: cni_version.to_string(),
            code: self.code as u32,
            msg: self.msg,
            details: self.details,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code as u32)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for Failure {}

/// `CNI_COMMAND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Version,
    Gc,
}

impl std::str::FromStr for Command {
    type Err = Failure;
    fn from_str(s: &str) -> Result<Self, Failure> {
        Ok(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "STATUS" => Self::Status,
            "VERSION" => Self::Version,
            "GC" => Self::Gc,
            other => {
                return Err(Failure::new(
                    Code::InvalidEnv,
                    format!("unknown CNI_COMMAND {other:?}"),
                ));
            }
        })
    }
}

/// The `CNI_*` environment of one invocation, validated for its command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, …).
    pub args: BTreeMap<String, String>,
}

impl Env {
    /// Reads the environment through `get` (so tests need not mutate the process's).
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<Self, Failure> {
        let command: Command = get("CNI_COMMAND")
            .ok_or_else(|| Failure::new(Code::InvalidEnv, "CNI_COMMAND is not set"))?
            .parse()?;
        let value = |name: &str, required: bool| -> Result<String, Failure> {
            match get(name).filter(|v| !v.is_empty()) {
                Some(v) => Ok(v),
                None if required => Err(Failure::new(
                    Code::InvalidEnv,
                    format!("{name} is required for {command:?}"),
                )),
                None => Ok(String::new()),
            }
        };
        let (id, netns, ifname) = match command {
            Command::Add | Command::Check => (true, true, true),
            Command::Del => (true, false, true),
            Command::Status | Command::Version | Command::Gc => (false, false, false),
        };
        let container_id = value("CNI_CONTAINERID", id)?;
        let netns = value("CNI_NETNS", netns)?;
        let ifname = value("CNI_IFNAME", ifname)?;
        let args = parse_args(&get("CNI_ARGS").unwrap_or_default())?;
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            args,
        })
    }

    pub fn pod_namespace(&self) -> Option<String> {
        self.args.get("K8S_POD_NAMESPACE").cloned()
    }

    pub fn pod_name(&self) -> Option<String> {
        self.args.get("K8S_POD_NAME").cloned()
    }
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
pub fn parse_args(raw: &str) -> Result<BTreeMap<String, String>, Failure> {
    raw.split(';')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(Failure::new(
                Code::InvalidEnv,
                format!("CNI_ARGS entry {pair:?} is not KEY=VALUE"),
            )),
        })
        .collect()
}

/// The network configuration on stdin (one plugin of a list, as the runtime passes it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, rename = "type")]
    pub plugin_type: String,
    /// MTU of both veth ends; when absent the agent's configured MTU applies.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Path of the agent's socket; defaults to [`DEFAULT_AGENT_SOCKET`].
    #[serde(default)]
    pub agent_socket: Option<String>,
    #[serde(default)]
    pub dns: Option<Dns>,
    #[serde(default)]
    pub prev_result: Option<serde_json::Value>,
    /// GC: the attachments the runtime still uses.
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl NetConf {
    /// Decodes and validates stdin. Fails with code 6 if it is not a configuration, 1 if
    /// its version is not one we speak, 7 if a required field is missing or invalid.
    pub fn parse(stdin: &[u8]) -> Result<Self, Failure> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            Failure::new(Code::Decode, "failed to decode the network configuration").with_details(e)
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(Failure::new(
                Code::IncompatibleVersion,
                format!("cniVersion {:?} is not supported", conf.cni_version),
            )
            .with_details(format!(
                "supported versions: {}",
                SUPPORTED_VERSIONS.join(", ")
            )));
        }
        if conf.name.is_empty() {
            return Err(Failure::new(
                Code::InvalidConfig,
                "the network configuration has no name",
            ));
        }
        if conf.plugin_type.is_empty() {
            return Err(Failure::new(
                Code::InvalidConfig,
                "the network configuration has no type",
            ));
        }
        if let Some(mtu) = conf.mtu
            && !(576..=65535).contains(&mtu)
        {
            return Err(Failure::new(
                Code::InvalidConfig,
                format!("mtu {mtu} is outside 576..=65535"),
            ));
        }
        Ok(conf)
    }

    pub fn socket(&self) -> &str {
        self.agent_socket.as_deref().unwrap_or(DEFAULT_AGENT_SOCKET)
    }

    /// The previous result (DEL, CHECK), if the runtime passed one.
    pub fn prev(&self) -> Result<Option<CniResult>, Failure> {
        self.prev_result
            .clone()
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| Failure::new(Code::Decode, "failed to decode prevResult").with_details(e))
    }
}

/// Compares dotted versions numerically.
pub fn version_at_least(version: &str, min: &str) -> bool {
    let parse = |v: &str| {
        v.split('.')
            .map(|p| p.parse::<u32>().unwrap_or(0))
            .collect::<Vec<_>>()
    };
    parse(version) >= parse(min)
}

/// A successful ADD's result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

impl CniResult {
    /// Shapes the result for `version`: 0.x results name the family of each IP; `mtu` on
    /// interfaces exists from 1.1.0.
    pub fn for_version(mut self, version: &str) -> Self {
        self.cni_version = version.to_string();
        let pre_1 = !version_at_least(version, "1.0.0");
        for ip in &mut self.ips {
            ip.version = pre_1.then(|| {
                if ip.address.addr().is_ipv4() {
                    "4"
                } else {
                    "6"
                }
                .to_string()
            });
        }
        if !version_at_least(version, "1.1.0") {
            for interface in &mut self.interfaces {
                interface.mtu = None;
            }
        }
        self
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The netns path, for interfaces inside the container.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpConfig {
    /// `"4"` or `"6"`, only in 0.x results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// The answer to VERSION.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    pub cni_version: String,
    pub supported_versions: Vec<String>,
}

impl VersionInfo {
    pub fn new(cni_version: &str) -> Self {
        Self {
            cni_version: cni_version.to_string(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> Result<Env, Failure> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::parse(|name| map.get(name).cloned())
    }

    #[test]
    fn add_needs_container_netns_and_ifname() {
        let ok = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web",
            ),
        ])
        .unwrap();
        assert_eq!(ok.pod_namespace().as_deref(), Some("default"));
        assert_eq!(ok.pod_name().as_deref(), Some("web"));
        let missing = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap_err();
        assert_eq!(missing.code, Code::InvalidEnv);
        assert!(missing.msg.contains("CNI_NETNS"));
        // DEL may come after the netns is gone.
        assert!(
            env(&[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", "abc"),
                ("CNI_IFNAME", "eth0")
            ])
            .is_ok()
        );
        assert!(env(&[("CNI_COMMAND", "VERSION")]).is_ok());
        assert_eq!(
            env(&[("CNI_COMMAND", "FROB")]).unwrap_err().code,
            Code::InvalidEnv
        );
        assert_eq!(env(&[]).unwrap_err().code, Code::InvalidEnv);
        let bad_args = env(&[("CNI_COMMAND", "STATUS"), ("CNI_ARGS", "novalue")]).unwrap_err();
        assert_eq!(bad_args.code, Code::InvalidEnv);
    }

    #[test]
    fn netconf_validation_codes() {
        let ok = NetConf::parse(br#"{"cniVersion":"1.1.0","name":"tendril","type":"tendril-cni","mtu":1450,"unknown":1}"#).unwrap();
        assert_eq!(ok.mtu, Some(1450));
        assert_eq!(ok.socket(), DEFAULT_AGENT_SOCKET);
        assert_eq!(NetConf::parse(b"{not json").unwrap_err().code, Code::Decode);
        assert_eq!(
            NetConf::parse(br#"{"name":"x","type":"y"}"#)
                .unwrap_err()
                .code,
            Code::Decode
        );
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"0.2.0","name":"x","type":"y"}"#)
                .unwrap_err()
                .code,
            Code::IncompatibleVersion
        );
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"1.0.0","type":"y"}"#)
                .unwrap_err()
                .code,
            Code::InvalidConfig
        );
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"x","type":"y","mtu":10}"#)
                .unwrap_err()
                .code,
            Code::InvalidConfig
        );
        let gc = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"x","type":"y","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(gc.valid_attachments.unwrap()[0].container_id, "a");
    }

    fn sample() -> CniResult {
        CniResult {
            cni_version: String::new(),
            interfaces: vec![
                Interface {
                    name: "tdr0123456789a".into(),
                    mac: "aa:bb:cc:dd:ee:ff".into(),
                    mtu: Some(1500),
                    sandbox: String::new(),
                },
                Interface {
                    name: "eth0".into(),
                    mac: "11:22:33:44:55:66".into(),
                    mtu: Some(1500),
                    sandbox: "/var/run/netns/p".into(),
                },
            ],
            ips: vec![IpConfig {
                version: None,
                address: "10.0.1.2/32".parse().unwrap(),
                gateway: Some("10.0.1.1".parse().unwrap()),
                interface: Some(1),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("10.0.1.1".parse().unwrap()),
            }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn result_shape_per_version() {
        let v11 = serde_json::to_value(sample().for_version("1.1.0")).unwrap();
        assert_eq!(
            v11,
            serde_json::json!({
                "cniVersion": "1.1.0",
                "interfaces": [
                    {"name": "tdr0123456789a", "mac": "aa:bb:cc:dd:ee:ff", "mtu": 1500},
                    {"name": "eth0", "mac": "11:22:33:44:55:66", "mtu": 1500, "sandbox": "/var/run/netns/p"}
                ],
                "ips": [{"address": "10.0.1.2/32", "gateway": "10.0.1.1", "interface": 1}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.1.1"}],
                "dns": {}
            })
        );
        let v04 = serde_json::to_value(sample().for_version("0.4.0")).unwrap();
        assert_eq!(v04["ips"][0]["version"], "4");
        assert!(v04["interfaces"][0].get("mtu").is_none());
        // A result round-trips as prevResult.
        let back: CniResult = serde_json::from_value(v11).unwrap();
        assert_eq!(back, sample().for_version("1.1.0"));
    }

    #[test]
    fn errors_serialize_as_the_spec_says() {
        let e = Failure::new(Code::TryAgainLater, "agent unreachable")
            .with_details("connect: no such file")
            .into_error("1.0.0");
        assert_eq!(
            serde_json::to_value(e).unwrap(),
            serde_json::json!({"cniVersion": "1.0.0", "code": 11, "msg": "agent unreachable", "details": "connect: no such file"})
        );
        assert!(version_at_least("1.1.0", "0.4.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
    }
}
