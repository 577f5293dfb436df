//! The agent↔plugin protocol on the agent's unix socket (`cniSocket`).
//!
//! One request per connection: the plugin connects, writes one JSON [`Request`] followed
//! by `\n`, and reads one JSON [`Response`] line; then both sides close. Requests are
//! tagged by `op`, responses by `result`:
//!
//! ```text
//! → {"op":"allocate","containerID":"c1","ifname":"eth0","netns":"/var/run/netns/p","podNamespace":"default","podName":"web"}
//! ← {"result":"allocated","ips":[{"address":"10.0.1.2","gateway":"10.0.1.1"}],"mtu":1500}
//! → {"op":"release","containerID":"c1","ifname":"eth0"}
//! ← {"result":"released","ips":["10.0.1.2"]}
//! → {"op":"status"}
//! ← {"result":"status","ready":true,"podCIDRs":["10.0.1.0/24"],"inUse":1,"capacity":253,"hasFree":true,"message":""}
//! ← {"result":"error","kind":"notReady","message":"the node has no pod CIDR yet"}
//! ```
//!
//! The client side is synchronous std I/O so the plugin binary stays small and fast.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Longest request or response line either side accepts.
pub const MAX_MESSAGE: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Request {
    Allocate(AllocateRequest),
    Release(AttachmentRef),
    /// The attachment's recorded addresses (CNI CHECK).
    Check(AttachmentRef),
    Status,
    /// Release every attachment not listed (CNI GC).
    Gc(GcRequest),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocateRequest {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentRef {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GcRequest {
    pub valid_attachments: Vec<AttachmentRef>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "camelCase")]
pub enum Response {
    Allocated(PodAddresses),
    Released { ips: Vec<IpAddr> },
    Checked(PodAddresses),
    Status(AgentStatus),
    Collected { released: Vec<AttachmentRef> },
    Error(ApiError),
}

/// The addresses of one attachment and how the pod reaches the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodAddresses {
    pub ips: Vec<PodIp>,
    /// MTU the agent is configured with (a `mtu` in the network configuration wins).
    pub mtu: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodIp {
    pub address: IpAddr,
    /// The node-side gateway for this family: the first address of the pod CIDR.
    pub gateway: IpAddr,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// The agent has its pod CIDRs and its state loaded and reconciled.
    pub ready: bool,
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Vec<IpNet>,
    pub in_use: u64,
    /// Addresses pods may get in total (saturates at `u64::MAX` for large IPv6 CIDRs).
    pub capacity: u64,
    pub has_free: bool,
    #[serde(default)]
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ErrorKind {
    /// Try again later: no pod CIDR yet, state not loaded.
    NotReady,
    /// The pod CIDR has no free address.
    Exhausted,
    /// The request is malformed (bad container id, interface name, JSON).
    Invalid,
    /// CHECK of an attachment the agent does not know.
    UnknownAttachment,
    /// Anything else, e.g. the state directory failed.
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket is missing or nobody listens: the agent is down.
    #[error("cannot reach the agent at {path}: {source}")]
    Unreachable {
        path: String,
        source: std::io::Error,
    },
    #[error("talking to the agent: {0}")]
    Io(#[from] std::io::Error),
    #[error("the agent answered something unreadable: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Sends one request and waits (up to `timeout` per read or write) for the answer.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let stream = UnixStream::connect(socket).map_err(|source| ClientError::Unreachable {
        path: socket.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let mut reader = BufReader::new(&stream).take(MAX_MESSAGE as u64);
    let mut answer = Vec::new();
    reader.read_until(b'\n', &mut answer)?;
    Ok(serde_json::from_slice(&answer)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_stable() {
        let req = Request::Allocate(AllocateRequest {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: "/var/run/netns/p".into(),
            pod_namespace: Some("default".into()),
            pod_name: Some("web".into()),
        });
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"op":"allocate","containerID":"c1","ifname":"eth0","netns":"/var/run/netns/p","podNamespace":"default","podName":"web"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"op":"status"}"#
        );
        let resp = Response::Allocated(PodAddresses {
            ips: vec![PodIp {
                address: "10.0.1.2".parse().unwrap(),
                gateway: "10.0.1.1".parse().unwrap(),
            }],
            mtu: 1500,
        });
        assert_eq!(
            serde_json::to_string(&resp).unwrap(),
            r#"{"result":"allocated","ips":[{"address":"10.0.1.2","gateway":"10.0.1.1"}],"mtu":1500}"#
        );
        let err: Response =
            serde_json::from_str(r#"{"result":"error","kind":"notReady","message":"x"}"#).unwrap();
        assert_eq!(
            err,
            Response::Error(ApiError {
                kind: ErrorKind::NotReady,
                message: "x".into()
            })
        );
        let gc: Request = serde_json::from_str(
            r#"{"op":"gc","validAttachments":[{"containerID":"a","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert!(matches!(gc, Request::Gc(g) if g.valid_attachments.len() == 1));
    }
}
