//! The plugin's commands: what `tendril-cni` does for each `CNI_COMMAND`.

use crate::cni::api::{
    self, AllocateRequest, AttachmentRef, ErrorKind, GcRequest, PodAddresses, Request, Response,
};
use crate::cni::link::{self, Plan};
use crate::cni::spec::{
    CniResult, Code, Command, Env, Failure, Interface, IpConfig, LATEST, NetConf, Route,
    VersionInfo, version_at_least,
};
use crate::ipam::Attachment;
use ipnet::IpNet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long one agent call may take (per read/write).
const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// What the binary prints and its exit status.
#[derive(Debug, PartialEq)]
pub struct Outcome {
    pub exit_code: i32,
    pub stdout: String,
}

/// Runs one invocation: the environment through `get`, the configuration in `stdin`.
pub fn run(get: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Outcome {
    // The version to answer in, even when the configuration is otherwise invalid.
    let version = serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(|v| v.as_str())
                .map(str::to_string)
        })
        .filter(|v| crate::cni::spec::SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST.to_string());
    match dispatch(get, stdin, &version) {
        Ok(stdout) => Outcome {
            exit_code: 0,
            stdout,
        },
        Err(failure) => Outcome {
            exit_code: 1,
            stdout: serde_json::to_string(&failure.into_error(&version)).expect("errors serialize"),
        },
    }
}

fn dispatch(
    get: impl Fn(&str) -> Option<String>,
    stdin: &[u8],
    version: &str,
) -> Result<String, Failure> {
    let env = Env::parse(get)?;
    if env.command == Command::Version {
        return Ok(serde_json::to_string(&VersionInfo::new(version)).expect("serializes"));
    }
    let conf = NetConf::parse(stdin)?;
    match env.command {
        Command::Add => add(&env, &conf),
        Command::Del => del(&env, &conf).map(|()| String::new()),
        Command::Check => check(&env, &conf).map(|()| String::new()),
        Command::Status => status(&conf).map(|()| String::new()),
        Command::Gc => gc(&conf).map(|()| String::new()),
        Command::Version => unreachable!("handled above"),
    }
}

fn attachment(env: &Env) -> Result<Attachment, Failure> {
    Attachment::new(&env.container_id, &env.ifname)
        .map_err(|e| Failure::new(Code::InvalidEnv, e.to_string()))
}

/// Calls the agent, mapping transport failures to "try again later".
fn call(conf: &NetConf, request: &Request) -> Result<Response, Failure> {
    api::call(Path::new(conf.socket()), request, AGENT_TIMEOUT).map_err(|e| match e {
        api::ClientError::Unreachable { .. } => {
            Failure::new(Code::TryAgainLater, "the tendril agent is not reachable").with_details(e)
        }
        other => Failure::new(Code::TryAgainLater, "talking to the tendril agent failed")
            .with_details(other),
    })
}

fn agent_failure(error: api::ApiError) -> Failure {
    let code = match error.kind {
        ErrorKind::NotReady => Code::TryAgainLater,
        ErrorKind::Exhausted => Code::PoolExhausted,
        ErrorKind::Invalid => Code::InvalidEnv,
        ErrorKind::UnknownAttachment => Code::UnknownContainer,
        ErrorKind::Internal => Code::AgentError,
    };
    Failure::new(
        code,
        format!("the tendril agent refused: {}", error.message),
    )
}

fn unexpected(response: Response) -> Failure {
    match response {
        Response::Error(error) => agent_failure(error),
        other => Failure::new(Code::AgentError, "unexpected answer from the tendril agent")
            .with_details(format!("{other:?}")),
    }
}

fn release(conf: &NetConf, attachment: &Attachment) -> Result<(), Failure> {
    let request = Request::Release(AttachmentRef {
        container_id: attachment.container_id.clone(),
        ifname: attachment.ifname.clone(),
    });
    match call(conf, &request)? {
        Response::Released { .. } => Ok(()),
        other => Err(unexpected(other)),
    }
}

fn plan(env: &Env, addresses: &PodAddresses, mtu: u32) -> Plan {
    Plan {
        netns: PathBuf::from(&env.netns),
        ifname: env.ifname.clone(),
        host_name: link::host_veth_name(&env.container_id, &env.ifname),
        owner: link::owner_tag(&env.container_id, &env.ifname),
        ips: addresses.ips.clone(),
        mtu,
    }
}

fn add(env: &Env, conf: &NetConf) -> Result<String, Failure> {
    let attachment = attachment(env)?;
    if !Path::new(&env.netns).exists() {
        return Err(Failure::new(
            Code::InvalidEnv,
            format!("CNI_NETNS {} does not exist", env.netns),
        ));
    }
    let request = Request::Allocate(AllocateRequest {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        netns: env.netns.clone(),
        pod_namespace: env.pod_namespace(),
        pod_name: env.pod_name(),
    });
    let addresses = match call(conf, &request)? {
        Response::Allocated(addresses) => addresses,
        other => return Err(unexpected(other)),
    };
    let mtu = conf.mtu.unwrap_or(addresses.mtu);
    let plan = plan(env, &addresses, mtu);
    // From here on, any failure gives the address back: link::setup already removed what
    // it created.
    let wired = match link::setup(&plan) {
        Ok(wired) => wired,
        Err(err) => {
            let code = if matches!(err, link::LinkError::Exists(_)) {
                Code::InvalidEnv
            } else {
                Code::Io
            };
            let failure =
                Failure::new(code, "failed to set up the pod interface").with_details(&err);
            if let Err(release_failure) = release(conf, &attachment) {
                return Err(failure.with_details(format!(
                    "{err}; releasing the address also failed: {release_failure}"
                )));
            }
            return Err(failure);
        }
    };
    let result = CniResult {
        cni_version: conf.cni_version.clone(),
        interfaces: vec![
            Interface {
                name: wired.host.name.clone(),
                mac: wired.host.mac_string(),
                mtu: Some(mtu),
                sandbox: String::new(),
            },
            Interface {
                name: env.ifname.clone(),
                mac: wired.pod.mac_string(),
                mtu: Some(mtu),
                sandbox: env.netns.clone(),
            },
        ],
        ips: addresses
            .ips
            .iter()
            .map(|ip| IpConfig {
                version: None,
                address: IpNet::from(ip.address),
                gateway: Some(ip.gateway),
                interface: Some(1),
            })
            .collect(),
        routes: addresses
            .ips
            .iter()
            .map(|ip| Route {
                dst: match ip.gateway {
                    IpAddr::V4(_) => "0.0.0.0/0".parse().expect("valid"),
                    IpAddr::V6(_) => "::/0".parse().expect("valid"),
                },
                gw: Some(ip.gateway),
            })
            .collect(),
        dns: conf.dns.clone().unwrap_or_default(),
    };
    Ok(serde_json::to_string(&result.for_version(&conf.cni_version)).expect("results serialize"))
}

fn del(env: &Env, conf: &NetConf) -> Result<(), Failure> {
    let attachment = attachment(env)?;
    // The host end goes whether or not the pod's netns still exists; its routes go with it.
    let teardown = link::teardown(
        &link::host_veth_name(&env.container_id, &env.ifname),
        &link::owner_tag(&env.container_id, &env.ifname),
    );
    release(conf, &attachment)?;
    teardown
        .map(|_| ())
        .map_err(|e| Failure::new(Code::Io, "failed to remove the pod interface").with_details(e))
}

fn check(env: &Env, conf: &NetConf) -> Result<(), Failure> {
    if !version_at_least(&conf.cni_version, "0.4.0") {
        return Err(Failure::new(
            Code::IncompatibleVersion,
            format!("CHECK is not defined for cniVersion {}", conf.cni_version),
        ));
    }
    let prev = conf
        .prev()?
        .ok_or_else(|| Failure::new(Code::InvalidConfig, "CHECK needs prevResult"))?;
    let attachment = attachment(env)?;
    let request = Request::Check(AttachmentRef {
        container_id: attachment.container_id,
        ifname: attachment.ifname,
    });
    let addresses = match call(conf, &request)? {
        Response::Checked(addresses) => addresses,
        other => return Err(unexpected(other)),
    };
    let mut recorded: Vec<IpAddr> = addresses.ips.iter().map(|ip| ip.address).collect();
    let mut previous: Vec<IpAddr> = prev.ips.iter().map(|ip| ip.address.addr()).collect();
    recorded.sort();
    previous.sort();
    if recorded != previous {
        return Err(Failure::new(
            Code::CheckFailed,
            "the pod's addresses differ from the agent's record",
        )
        .with_details(format!(
            "prevResult has {previous:?}, the agent has {recorded:?}"
        )));
    }
    let mtu = prev
        .interfaces
        .iter()
        .find_map(|i| i.mtu)
        .unwrap_or(addresses.mtu);
    let problems = link::check(&plan(env, &addresses, mtu)).map_err(|e| {
        Failure::new(Code::Io, "CHECK failed to read the interfaces").with_details(e)
    })?;
    if !problems.is_empty() {
        return Err(Failure::new(
            Code::CheckFailed,
            "the pod's interface differs from prevResult",
        )
        .with_details(problems.join("; ")));
    }
    Ok(())
}

fn status(conf: &NetConf) -> Result<(), Failure> {
    let status = match api::call(Path::new(conf.socket()), &Request::Status, AGENT_TIMEOUT) {
        Ok(Response::Status(status)) => status,
        Ok(other) => {
            return Err(Failure {
                code: Code::NotAvailable,
                ..unexpected(other)
            });
        }
        Err(e) => {
            return Err(
                Failure::new(Code::NotAvailable, "the tendril agent is not reachable")
                    .with_details(e),
            );
        }
    };
    if !status.ready {
        return Err(
            Failure::new(Code::NotAvailable, "the tendril agent is not ready")
                .with_details(status.message),
        );
    }
    if !status.has_free {
        return Err(Failure::new(
            Code::NotAvailable,
            "the node's pod CIDR has no free address",
        )
        .with_details(format!(
            "{} of {} addresses in use",
            status.in_use, status.capacity
        )));
    }
    Ok(())
}

fn gc(conf: &NetConf) -> Result<(), Failure> {
    let valid = conf
        .valid_attachments
        .iter()
        .flatten()
        .map(|a| AttachmentRef {
            container_id: a.container_id.clone(),
            ifname: a.ifname.clone(),
        })
        .collect();
    let released = match call(
        conf,
        &Request::Gc(GcRequest {
            valid_attachments: valid,
        }),
    )? {
        Response::Collected { released } => released,
        other => return Err(unexpected(other)),
    };
    let mut failures = Vec::new();
    for attachment in released {
        let (id, ifname) = (&attachment.container_id, &attachment.ifname);
        if let Err(e) = link::teardown(
            &link::host_veth_name(id, ifname),
            &link::owner_tag(id, ifname),
        ) {
            failures.push(format!(
                "{}/{}: {e}",
                attachment.container_id, attachment.ifname
            ));
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(Failure::new(
            Code::Io,
            "GC released addresses but failed to remove some interfaces",
        )
        .with_details(failures.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn invoke(vars: &[(&str, &str)], stdin: &str) -> (i32, serde_json::Value) {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let out = run(|n| map.get(n).cloned(), stdin.as_bytes());
        let json = if out.stdout.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&out.stdout).unwrap()
        };
        (out.exit_code, json)
    }

    #[test]
    fn version_lists_what_we_speak() {
        let (code, out) = invoke(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.0.0"}"#);
        assert_eq!(code, 0);
        assert_eq!(out["cniVersion"], "1.0.0");
        assert_eq!(
            out["supportedVersions"],
            serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        let (_, out) = invoke(&[("CNI_COMMAND", "VERSION")], "");
        assert_eq!(out["cniVersion"], LATEST);
    }

    #[test]
    fn errors_are_json_with_spec_codes() {
        let add = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_NETNS", "/proc/self/ns/net"),
            ("CNI_IFNAME", "eth0"),
        ];
        let (code, out) = invoke(&add, "{garbage");
        assert_eq!((code, out["code"].as_u64()), (1, Some(6)));
        let (_, out) = invoke(&add, r#"{"cniVersion":"1.0.0","type":"tendril-cni"}"#);
        assert_eq!(out["code"], 7);
        assert_eq!(out["cniVersion"], "1.0.0");
        let (_, out) = invoke(&add, r#"{"cniVersion":"9.9.9","name":"n","type":"t"}"#);
        assert_eq!(out["code"], 1);
        let (_, out) = invoke(
            &[("CNI_COMMAND", "ADD")],
            r#"{"cniVersion":"1.0.0","name":"n","type":"t"}"#,
        );
        assert_eq!(out["code"], 4);
        let missing_agent = r#"{"cniVersion":"1.1.0","name":"n","type":"t","agentSocket":"/nonexistent/tendril.sock"}"#;
        let (code, out) = invoke(&add, missing_agent);
        assert_eq!((code, out["code"].as_u64()), (1, Some(11)));
        assert!(out["msg"].as_str().unwrap().contains("not reachable"));
        let (_, out) = invoke(&[("CNI_COMMAND", "STATUS")], missing_agent);
        assert_eq!(out["code"], 50);
        let check = [
            ("CNI_COMMAND", "CHECK"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_NETNS", "/proc/self/ns/net"),
            ("CNI_IFNAME", "eth0"),
        ];
        let (_, out) = invoke(&check, r#"{"cniVersion":"0.3.1","name":"n","type":"t"}"#);
        assert_eq!(out["code"], 1);
        let (_, out) = invoke(&check, r#"{"cniVersion":"1.0.0","name":"n","type":"t"}"#);
        assert_eq!(out["code"], 7);
        let bad_id = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "../x"),
            ("CNI_IFNAME", "eth0"),
        ];
        let (_, out) = invoke(&bad_id, r#"{"cniVersion":"1.0.0","name":"n","type":"t"}"#);
        assert_eq!(out["code"], 4);
    }
}
