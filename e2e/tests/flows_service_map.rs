//! Issue 16: the relay's live service map, loaded in a real headless Chromium.
//!
//! One dedicated plane, two simulated nodes (real operator, agents, CNI), `tendril-relay`
//! over both agents with its service map on a port of its own. Pods: `web` (node 1, TCP
//! echo on 8080) behind a NetworkPolicy that admits `app=client` only; `client` and
//! `intruder` on node 0. Real traffic: client → web (forwarded), intruder → web (dropped).
//!
//! Checked: `/api/map` names the three workloads and both edges (forwarded and dropped,
//! with their recent flows); Chromium (`chromium --headless --dump-dom`, Debian's package,
//! installed by hack/install-prereqs.sh) renders the page: an SVG node per workload, a
//! green edge client → web and a red one intruder → web; opened on the dropped edge
//! (`?edge=…`) it lists that edge's flows with their drop reason. A screenshot of the page
//! is kept in the test's log directory. Needs root.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tendril_e2e::sim::{SimCluster, SimClusterConfig, SimPod};
use tendril_e2e::traffic::EchoServer;
use tendril_e2e::{ControlPlane, Process, TestEnv, eventually, free_port};

const TIMEOUT: Duration = Duration::from_secs(90);
const PORT: u16 = 8080;

fn labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("app".to_string(), app.to_string())])
}

async fn connect(pod: &SimPod, ip: IpAddr) -> Result<bool> {
    let out = pod
        .exec(&["nc", "-z", "-w", "1", &ip.to_string(), &PORT.to_string()])
        .await?;
    Ok(out.status.success())
}

/// Runs headless Chromium on `url` with `extra` arguments; its stdout.
async fn chromium(url: &str, extra: &[&str]) -> Result<String> {
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let profile = std::env::temp_dir().join(format!(
        "tendril-chromium-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let out = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--window-size=1200,800",
            // Time enough for the page's first fetch and draw.
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .kill_on_drop(true)
        .output()
        .await
        .context("running chromium (hack/install-prereqs.sh installs it)");
    let _ = std::fs::remove_dir_all(&profile);
    let out = out?;
    ensure!(
        out.status.success(),
        "chromium {extra:?} {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The start tags of `tag` elements in `dom` that carry every one of `attrs`.
fn elements<'a>(dom: &'a str, tag: &str, attrs: &[String]) -> Vec<&'a str> {
    dom.match_indices(&format!("<{tag} "))
        .filter_map(|(i, _)| dom[i..].find('>').map(|end| &dom[i..i + end]))
        .filter(|e| attrs.iter().all(|a| e.contains(a.as_str())))
        .collect()
}

#[tokio::test]
async fn the_service_map_draws_workloads_and_their_flows_in_chromium() -> Result<()> {
    let plane = ControlPlane::dedicated("flows-map").await?;
    let env = TestEnv::on(plane.clone()).await?;
    let client = env.client();
    let cluster = SimCluster::start(&env, SimClusterConfig::default()).await?;
    let ns = env.namespace().to_string();
    let (n0, n1) = (cluster.nodes[0].handle(), cluster.nodes[1].handle());
    let web = SimPod::run(&client, n1, &ns, "web", &labels("web")).await?;
    let allowed = SimPod::run(&client, n0, &ns, "client", &labels("client")).await?;
    let intruder = SimPod::run(&client, n0, &ns, "intruder", &labels("intruder")).await?;
    for pod in [&web, &allowed, &intruder] {
        pod.wait_realized(&client, TIMEOUT).await?;
    }
    let _echo = EchoServer::start(&web.sandbox.netns, PORT)?;
    let web_ip = web.ips[0];
    env.apply_yaml(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{name: web-from-clients, namespace: {ns}}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  policyTypes: [Ingress]\n  \
         ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n    \
         ports: [{{protocol: TCP, port: {PORT}}}]\n"
    ))
    .await?;
    eventually(TIMEOUT, || async {
        ensure!(connect(&allowed, web_ip).await?, "client refused");
        ensure!(
            !connect(&intruder, web_ip).await?,
            "intruder still admitted"
        );
        Ok(())
    })
    .await?;

    let (relay_port, ui_port) = (free_port()?, free_port()?);
    let mut relay = Process::builder("tendril-relay")
        .arg("--listen")
        .arg(format!("127.0.0.1:{relay_port}"))
        .arg("--ui-listen")
        .arg(format!("127.0.0.1:{ui_port}"));
    for node in &cluster.nodes {
        relay = relay
            .arg("--peer")
            .arg(format!("127.0.0.1:{}", node.observer_port));
    }
    let _relay = relay.env("RUST_LOG", "info").spawn()?;

    let (client_id, web_id, intruder_id) = (
        format!("{ns}/client"),
        format!("{ns}/web"),
        format!("{ns}/intruder"),
    );
    // The API first: both edges, with flows.
    let map: Value = eventually(TIMEOUT, || async {
        // Flows of pods the agents know by now (enriched with their workloads).
        connect(&allowed, web_ip).await?;
        connect(&intruder, web_ip).await?;
        let (status, body) = tendril_e2e::http_get(ui_port, "/api/map?seconds=600").await?;
        ensure!(status == 200, "/api/map answered {status}: {body}");
        let map: Value = serde_json::from_str(&body)?;
        let edge =
            |from: &str, verdict: &str| {
                map["edges"].as_array().into_iter().flatten().any(|e| {
                    e["from"] == from && e["to"] == web_id.as_str() && e["verdict"] == verdict
                })
            };
        ensure!(
            edge(&client_id, "forwarded") && edge(&intruder_id, "dropped"),
            "not yet: {map}"
        );
        Ok(map)
    })
    .await?;
    let nodes: Vec<&str> = map["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["id"].as_str())
        .collect();
    for id in [&client_id, &web_id, &intruder_id] {
        ensure!(
            nodes.contains(&id.as_str()),
            "{id} is not on the map: {nodes:?}"
        );
    }
    // The intruder got through until the policy was enforced; since then it is dropped:
    // its newest flow to web is a drop.
    let newest = |from: &str, verdict: &str| {
        map["edges"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["from"] == from && e["to"] == web_id.as_str() && e["verdict"] == verdict)
            .and_then(|e| e["recent"][0]["time"].as_str())
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    };
    if let Some(admitted) = newest(&intruder_id, "forwarded") {
        let denied = newest(&intruder_id, "dropped");
        ensure!(
            denied.is_some_and(|d| d > admitted),
            "the intruder's newest flow to web is not a drop: admitted {admitted}, dropped {denied:?}"
        );
    }
    let dropped = map["edges"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["from"] == intruder_id.as_str() && e["verdict"] == "dropped")
        .context("the dropped edge")?;
    ensure!(
        dropped["recent"][0]["drop_reason"] == "POLICY_DENIED"
            && dropped["recent"][0]["l4"] == format!("TCP {PORT}").as_str(),
        "the dropped edge's flows: {dropped}"
    );

    // The page in a real browser: nodes and coloured edges in its DOM.
    let url = format!("http://127.0.0.1:{ui_port}/?seconds=600");
    let dom = chromium(&url, &["--dump-dom"]).await?;
    std::fs::write(tendril_e2e::test_log_dir().join("service-map.html"), &dom)?;
    for id in [&client_id, &web_id, &intruder_id] {
        ensure!(
            elements(
                &dom,
                "g",
                &[format!("data-id=\"{id}\""), "class=\"node\"".into()]
            )
            .len()
                == 1,
            "no node {id} in the rendered page:\n{dom}"
        );
    }
    let edge = |from: &str, verdict: &str| {
        elements(
            &dom,
            "path",
            &[
                format!("class=\"edge {verdict}"),
                format!("data-from=\"{from}\""),
                format!("data-to=\"{web_id}\""),
            ],
        )
        .len()
    };
    ensure!(
        edge(&client_id, "forwarded") == 1,
        "no green edge client → web:\n{dom}"
    );
    ensure!(
        edge(&intruder_id, "dropped") == 1,
        "no red edge intruder → web:\n{dom}"
    );

    // Opened on the dropped edge: its recent flows, with the drop reason.
    let selected = format!("{intruder_id}|{web_id}|dropped");
    let dom = chromium(
        &format!(
            "{url}&edge={}",
            selected.replace('/', "%2F").replace('|', "%7C")
        ),
        &["--dump-dom"],
    )
    .await?;
    let table = dom
        .split("<table id=\"recent\">")
        .nth(1)
        .with_context(|| format!("no flow list for the selected edge:\n{dom}"))?;
    ensure!(
        table.contains("dropped (POLICY_DENIED)") && table.contains(&format!("{ns}/intruder")),
        "the flow list of the dropped edge:\n{table}"
    );

    // A screenshot for people, kept beside the test's logs.
    let shot = tendril_e2e::test_log_dir().join("service-map.png");
    std::fs::create_dir_all(shot.parent().unwrap_or(Path::new(".")))?;
    chromium(&url, &[&format!("--screenshot={}", shot.display())]).await?;
    let size = std::fs::metadata(&shot)?.len();
    ensure!(size > 10_000, "screenshot of {size} bytes");
    println!("service map screenshot: {} ({size} bytes)", shot.display());
    Ok(())
}
