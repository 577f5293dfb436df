//! The one HTTP port of a binary: `/metrics`, `/healthz`, `/readyz`.

use super::metrics::{Metrics, OPENMETRICS_CONTENT_TYPE};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Readiness of the parts of a binary. Each part registers a check (not ready), marks it
/// ready when it is (e.g. caches synced), and removes it when it stops running (e.g. a
/// controller of a standby operator). The binary is ready when every registered check is.
#[derive(Clone, Debug, Default)]
pub struct Health {
    checks: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl Health {
    pub fn register(&self, name: &str) {
        self.checks
            .lock()
            .expect("health lock")
            .insert(name.to_string(), false);
    }

    pub fn set_ready(&self, name: &str, ready: bool) {
        self.checks
            .lock()
            .expect("health lock")
            .insert(name.to_string(), ready);
    }

    pub fn remove(&self, name: &str) {
        self.checks.lock().expect("health lock").remove(name);
    }

    /// Ready, and a report line per check (`name: ok|waiting`).
    pub fn readiness(&self) -> (bool, String) {
        let checks = self.checks.lock().expect("health lock");
        let ready = checks.values().all(|r| *r);
        let mut report = String::new();
        for (name, ok) in checks.iter() {
            report.push_str(&format!("{name}: {}\n", if *ok { "ok" } else { "waiting" }));
        }
        report.push_str(if ready { "ready\n" } else { "not ready\n" });
        (ready, report)
    }
}

#[derive(Clone)]
struct ServerState {
    metrics: Arc<Metrics>,
    health: Health,
}

async fn metrics(State(s): State<ServerState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
        s.metrics.encode(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<ServerState>) -> impl IntoResponse {
    let (ready, report) = s.health.readiness();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, report)
}

/// The router (exposed for tests).
pub fn router(metrics: Arc<Metrics>, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(self::metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(ServerState { metrics, health })
}

/// Binds the HTTP port; fails early (before any controller starts) if it is taken.
pub async fn bind(addr: &str) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Health,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(metrics, health))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_every_check() {
        let h = Health::default();
        assert!(h.readiness().0, "no checks: ready");
        h.register("controller/nodes");
        h.register("leader");
        assert!(!h.readiness().0);
        h.set_ready("leader", true);
        assert!(!h.readiness().0);
        h.set_ready("controller/nodes", true);
        let (ready, report) = h.readiness();
        assert!(ready, "{report}");
        assert!(report.contains("controller/nodes: ok"));
        h.set_ready("controller/nodes", false);
        h.remove("controller/nodes");
        assert!(h.readiness().0);
    }

    #[tokio::test]
    async fn serves_openmetrics_and_health() {
        let metrics = Arc::new(Metrics::new("t"));
        metrics.controller("nodes");
        let health = Health::default();
        health.register("x");
        let (listener, addr) = bind("127.0.0.1:0").await.unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, metrics, health.clone(), stop.clone()));

        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let m = get("/metrics").await;
        assert!(m.starts_with("HTTP/1.1 200"), "{m}");
        assert!(
            m.to_lowercase()
                .contains(&format!("content-type: {OPENMETRICS_CONTENT_TYPE}")),
            "{m}"
        );
        assert!(
            m.contains("controller_runtime_reconcile_total{controller=\"nodes\""),
            "{m}"
        );
        assert!(m.trim_end().ends_with("# EOF"), "{m}");
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        health.set_ready("x", true);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        stop.cancel();
        server.await.unwrap().unwrap();
    }
}
