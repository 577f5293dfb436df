//! The CNI socket: one JSON request line in, one JSON response line out (see
//! [`crate::cni::api`]).

use super::Agent;
use crate::cni::api::{ApiError, ErrorKind, MAX_MESSAGE, Request, Response};
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// Binds the socket, replacing a stale one left by a previous agent (the state directory
/// lock guarantees no other agent is alive), readable only by root.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves until `shutdown`; requests in flight finish first.
pub async fn serve(listener: UnixListener, agent: Arc<Agent>, shutdown: CancellationToken) {
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let agent = agent.clone();
                    tracker.spawn(async move {
                        if let Err(e) = connection(stream, agent).await {
                            tracing::debug!(error = %e, "CNI connection failed");
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "accepting a CNI connection failed"),
            },
        }
    }
    tracker.close();
    tracker.wait().await;
}

async fn connection(stream: UnixStream, agent: Arc<Agent>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read).take(MAX_MESSAGE as u64);
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).await?;
    let response = match serde_json::from_slice::<Request>(&line) {
        Ok(request) => {
            tracing::debug!(?request, "CNI request");
            // The allocator fsyncs: keep it off the async workers.
            tokio::task::spawn_blocking(move || agent.handle(request))
                .await
                .unwrap_or_else(|e| {
                    Response::Error(ApiError {
                        kind: ErrorKind::Internal,
                        message: format!("request handler failed: {e}"),
                    })
                })
        }
        Err(e) => Response::Error(ApiError {
            kind: ErrorKind::Invalid,
            message: format!("malformed request: {e}"),
        }),
    };
    let mut out = serde_json::to_vec(&response).map_err(io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::metrics::AgentMetrics;
    use crate::cni::api::{self, AllocateRequest};
    use crate::ipam::Ipam;
    use std::io::{BufRead, Write};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_requests_and_refuses_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let (ipam, _) = Ipam::open(&dir.path().join("ipam")).unwrap();
        let agent = Arc::new(Agent::new(ipam, 1500, AgentMetrics::default()));
        let socket = dir.path().join("sub/cni.sock");
        let listener = bind(&socket).unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, agent.clone(), stop.clone()));

        let path = socket.clone();
        let call = move |request: Request| {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                api::call(&path, &request, Duration::from_secs(10)).unwrap()
            })
        };
        let allocate = Request::Allocate(AllocateRequest {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: "/proc/self/ns/net".into(),
            pod_namespace: None,
            pod_name: None,
        });
        // Not ready: no pod CIDR yet.
        let answer = call(allocate.clone()).await.unwrap();
        assert!(
            matches!(
                answer,
                Response::Error(ApiError {
                    kind: ErrorKind::NotReady,
                    ..
                })
            ),
            "{answer:?}"
        );
        agent
            .set_pod_cidrs(&["10.5.0.0/24".parse().unwrap()])
            .unwrap();
        agent.set_ready(true);
        match call(allocate).await.unwrap() {
            Response::Allocated(a) => {
                assert_eq!(a.ips[0].address.to_string(), "10.5.0.2");
                assert_eq!(a.ips[0].gateway.to_string(), "10.5.0.1");
                assert_eq!(a.mtu, 1500);
            }
            other => panic!("{other:?}"),
        }

        let path = socket.clone();
        let garbage = tokio::task::spawn_blocking(move || {
            let mut stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
            stream.write_all(b"{\"op\":\"frobnicate\"}\n").unwrap();
            let mut line = String::new();
            std::io::BufReader::new(stream)
                .read_line(&mut line)
                .unwrap();
            serde_json::from_str::<Response>(&line).unwrap()
        })
        .await
        .unwrap();
        assert!(
            matches!(
                garbage,
                Response::Error(ApiError {
                    kind: ErrorKind::Invalid,
                    ..
                })
            ),
            "{garbage:?}"
        );

        // A second bind replaces a stale socket but refuses to clobber other files.
        stop.cancel();
        server.await.unwrap();
        let not_a_socket = dir.path().join("file");
        std::fs::write(&not_a_socket, b"x").unwrap();
        assert!(bind(&not_a_socket).is_err());
        assert!(bind(&socket).is_ok());
    }
}
