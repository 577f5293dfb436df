//! Services conformance (issue 12, "How it is proven"): the matrix of
//! [`tendril_e2e::services::matrix`] — every frontend kind × traffic policies × session
//! affinity × client location, TCP and UDP, plus a service without endpoints and hairpin —
//! run with real packets against kube-proxy (nftables mode) on plain routed nodes, and
//! against Tendril's simulated cluster with no kube-proxy. The two must agree: the test
//! prints both columns and every difference, and fails on any but the few deliberate ones
//! ([`matrix::Deliberate`]: Tendril keeps the client's address where kube-proxy
//! masquerades, and refuses at connect where kube-proxy drops or answers EPERM), which it
//! lists with their reason.
//!
//! Before comparing, the reference itself is checked against kube-proxy's documented
//! behaviour (so a broken harness cannot make both sides agree on nonsense).
//! `kube_proxy_reference` runs only that half (`--ignored`; it needs no Tendril services
//! datapath). `TENDRIL_SVC_PROXY_MODE=iptables` runs the reference in iptables mode.
//! Needs root.

use anyhow::{Result, bail, ensure};
use tendril_e2e::services::World;
use tendril_e2e::services::kube_proxy::{KubeProxyWorld, ProxyMode};
use tendril_e2e::services::matrix::{
    self, CaseKey, Frontend, NO_ENDPOINTS, Outcome, Results, service_cases,
};
use tendril_e2e::services::tendril::TendrilWorld;
use tendril_e2e::{ControlPlane, TestEnv};

fn mode() -> ProxyMode {
    match std::env::var("TENDRIL_SVC_PROXY_MODE").as_deref() {
        Ok("iptables") => ProxyMode::Iptables,
        _ => ProxyMode::Nftables,
    }
}

/// Runs the matrix against kube-proxy on a plane of its own and checks the documented
/// behaviour; returns the world's name and results.
async fn reference() -> Result<(String, Results)> {
    let plane = ControlPlane::dedicated("svc-kube-proxy").await?;
    let env = TestEnv::on(plane).await?;
    let mut world = KubeProxyWorld::conformance(&env, mode()).await?;
    let results = matrix::run(&world).await;
    world.check_running()?;
    let results = results?;
    let name = world.name();
    println!("{}", matrix::table(&[&name], &[&results]));
    matrix::check_complete(&results)?;
    let violations = documented_behaviour(&results);
    if !violations.is_empty() {
        bail!(
            "the kube-proxy reference contradicts kube-proxy's documented behaviour:\n{}\n\n{}",
            violations.join("\n"),
            world.log_tails(20)
        );
    }
    Ok((name, results))
}

fn key(service: &str, frontend: Frontend, spot: &str, udp: bool) -> CaseKey {
    CaseKey {
        service: service.into(),
        frontend,
        spot: spot.into(),
        udp,
    }
}

/// What kube-proxy's documentation says, checked case by case; returns the violations.
fn documented_behaviour(r: &Results) -> Vec<String> {
    let mut bad = Vec::new();
    let mut affinity = Vec::new();
    let mut expect = |k: CaseKey, what: &str, ok: &dyn Fn(&Outcome) -> bool| match r.get(&k) {
        Some(o) if ok(o) => {}
        Some(o) => bad.push(format!("{k}: expected {what}, saw {o}")),
        None => bad.push(format!("{k}: not run")),
    };
    let set = |names: &[&str]| names.iter().map(|s| s.to_string()).collect();
    for udp in [false, true] {
        for c in service_cases() {
            let name = c.name.as_str();
            // externalTrafficPolicy: Local: a node without local endpoints drops external
            // traffic to NodePorts and LB IPs (the health check steers load balancers away).
            if c.etp_local && c.placement == matrix::Placement::Node0 {
                for f in [
                    Frontend::NodePort,
                    Frontend::LoadBalancer,
                    Frontend::ExternalIp,
                ] {
                    expect(
                        key(name, f, "ext@n1", udp),
                        "no answer",
                        &Outcome::is_timeout,
                    );
                }
            }
            // externalTrafficPolicy: Local preserves the client's address and uses only
            // the local endpoints; Cluster masquerades and uses all of them.
            if !c.affinity && c.placement == matrix::Placement::Spread {
                let (backends, source): (std::collections::BTreeSet<String>, &str) = if c.etp_local
                {
                    (set(&["b0", "b1"]), "client")
                } else {
                    (set(&["b0", "b1", "b2"]), "n0")
                };
                expect(
                    key(name, Frontend::LoadBalancer, "ext@n0", udp),
                    &format!("{backends:?} seeing {source}"),
                    &|o| {
                        o.all_answered()
                            && o.backends == backends
                            && o.sources.contains(source)
                            && o.sources.len() == 1
                    },
                );
            }
            // internalTrafficPolicy: Local: only node-local endpoints; none → dropped.
            if c.itp_local && c.placement == matrix::Placement::Node0 {
                expect(
                    key(name, Frontend::ClusterIp, "pod@n1", udp),
                    "no answer",
                    &Outcome::is_timeout,
                );
            }
            if !c.affinity {
                let want: std::collections::BTreeSet<String> = match (c.itp_local, c.placement) {
                    (true, _) => set(&["b0", "b1"]),
                    (false, matrix::Placement::Spread) => set(&["b0", "b1", "b2"]),
                    (false, matrix::Placement::Node0) => set(&["b0", "b1"]),
                };
                expect(
                    key(name, Frontend::ClusterIp, "pod@n0", udp),
                    &format!("{want:?} seeing the client"),
                    &|o| o.all_answered() && o.backends == want && o.sources == set(&["client"]),
                );
            }
        }
        // sessionAffinity: ClientIP: every connection of one client to one backend.
        for (k, o) in r
            .iter()
            .filter(|(k, _)| k.service.ends_with("-aff") && k.udp == udp)
        {
            if !o.backends.is_empty() && o.backends.len() != 1 {
                affinity.push(format!("{k}: ClientIP affinity, yet answered by {o}"));
            }
        }
        // No endpoints: rejected, not dropped.
        expect(
            key(NO_ENDPOINTS, Frontend::ClusterIp, "pod@n0", udp),
            "rejected",
            &Outcome::is_rejected,
        );
        expect(
            key(NO_ENDPOINTS, Frontend::NodePort, "ext@n0", udp),
            "rejected",
            &Outcome::is_rejected,
        );
        // Hairpin: a backend reaches itself through its own service.
        expect(
            key(
                &service_cases()[0].name,
                Frontend::ClusterIp,
                "hairpin(b0)",
                udp,
            ),
            "b0 among the answers",
            &|o| o.all_answered() && o.backends.contains("b0"),
        );
    }
    bad.extend(affinity);
    bad
}

/// The reference alone: proves the harness against kube-proxy's documented behaviour.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the kube-proxy half of tendril_agrees_with_kube_proxy, for checking the harness"]
async fn kube_proxy_reference() -> Result<()> {
    reference().await.map(|_| ())
}

/// Tendril against the reference, case by case.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tendril_agrees_with_kube_proxy() -> Result<()> {
    let (ref_name, expected) = reference().await?;
    let plane = ControlPlane::dedicated("svc-tendril").await?;
    let env = TestEnv::on(plane).await?;
    let world = TendrilWorld::conformance(&env).await?;
    let actual = matrix::run(&world).await?;
    let diagnostics = lossy_diagnostics(&world).await;
    println!(
        "{}",
        matrix::table(&[&ref_name, &world.name()], &[&expected, &actual])
    );
    println!("{diagnostics}");
    let comparison = matrix::compare(&ref_name, &expected, &world.name(), &actual);
    for (deliberate, cases) in &comparison.deliberate {
        println!(
            "deliberate difference in {} cases: {}\n  {}",
            cases.len(),
            deliberate.reason(),
            cases.join("\n  ")
        );
    }
    let disagreements = comparison.disagreements;
    ensure!(
        disagreements.is_empty(),
        "{} of {} cases disagree:\n{}\n\n{diagnostics}",
        disagreements.len(),
        expected.len(),
        disagreements.join("\n")
    );
    Ok(())
}

/// Where packets went missing, for a disagreement that is a lost attempt: each agent's
/// non-zero datapath drop counters and the kernel's TCP/UDP trouble counters in every
/// backend and outside client (TIME_WAIT collisions, PAWS rejects, listen overflows,
/// retransmitted SYNs).
async fn lossy_diagnostics(world: &TendrilWorld) -> String {
    let mut out = vec!["datapath drops and NAT port findings:".to_string()];
    for node in &world.cluster.nodes {
        match tendril_e2e::fetch_metrics(node.metrics_port).await {
            Ok(m) => {
                out.extend(
                    m.matching("tendril_datapath_drops_total", &[])
                        .filter(|s| s.value > 0.0)
                        .map(|s| format!("  {} {:?} {}", node.name, s.labels, s.value)),
                );
                // Ports the NAT had to find: clashes of kept client addresses, reused SNAT.
                out.extend(
                    m.matching("tendril_datapath_packets_total", &[])
                        .filter(|s| {
                            s.value > 0.0
                                && s.labels.values().any(|v| {
                                    v == "service_client_port_remapped"
                                        || v == "service_snat_port_reused"
                                })
                        })
                        .map(|s| format!("  {} {:?} {}", node.name, s.labels, s.value)),
                );
            }
            Err(e) => out.push(format!("  {}: metrics unavailable: {e:#}", node.name)),
        }
        // Which packets, from the flow log: the first few of each drop reason.
        if let Ok((200, body)) = tendril_e2e::http_get(node.metrics_port, "/flows").await {
            let flows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
            let mut shown: std::collections::BTreeMap<String, usize> = Default::default();
            for f in flows.iter().filter(|f| f["kind"] == "drop") {
                let reason = f["reason"].as_str().unwrap_or("").to_string();
                let n = shown.entry(reason.clone()).or_default();
                *n += 1;
                if *n <= 5 {
                    out.push(format!(
                        "    {reason} {} {} {} → {}",
                        f["direction"], f["protocol"], f["source"], f["destination"]
                    ));
                }
            }
        }
    }
    out.push("kernel counters (nstat):".into());
    let spots = matrix::BACKENDS
        .iter()
        .map(|(b, _, _)| (b.to_string(), world.pod_spot(b).netns))
        .chain((0..2).map(|i| (format!("x{i}"), world.external_spot(i).netns)))
        .chain(
            world
                .cluster
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| (format!("n{i}"), n.netns.clone())),
        );
    for (name, netns) in spots {
        match tendril_e2e::services::netns_exec(&netns, &["nstat", "-asz"]).await {
            Ok(text) => {
                let trouble: Vec<&str> = text
                    .lines()
                    .filter(|l| {
                        [
                            "TimeWait",
                            "PAWS",
                            "ListenOverflows",
                            "ListenDrops",
                            "SynRetrans",
                            "Resets",
                            "RcvbufErrors",
                            "NoPorts",
                            "InErrs",
                        ]
                        .iter()
                        .any(|k| l.contains(k))
                    })
                    .filter(|l| l.split_whitespace().nth(1).is_some_and(|v| v != "0"))
                    .collect();
                out.push(format!("  {name}: {}", trouble.join("; ")));
            }
            Err(e) => out.push(format!("  {name}: nstat failed: {e:#}")),
        }
    }
    out.join("\n")
}
