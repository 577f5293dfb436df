//! Issue 16: the real `hubble` CLI reads Tendril's flows.
//!
//! One dedicated plane, two simulated nodes (real operator, agents, CNI), `tendril-relay`
//! over both agents' Observer APIs, and the `hubble` CLI built from its Go module by
//! hack/hubble/build.sh (cached in ~/.cache/tendril/tools/bin; the test does not build it).
//! Pods: `web` (node 1, TCP echo on 8080) behind a Kubernetes NetworkPolicy that admits TCP
//! 8080 from `app=client` pods of its own namespace only; `client` and `intruder` (node 0)
//! in the same namespace, and `client` in a second namespace. Real traffic: client → web
//! (allowed), intruder → web and other/client → web (denied by the policy), client pings
//! web (ICMP: denied too), web pings the client (allowed: traffic not to web).
//!
//! Checked through the relay with the CLI: `hubble status` is healthy with both nodes
//! connected; `hubble observe -o json` with `--pod`, `--namespace`, `--verdict DROPPED`,
//! `--port`, `--protocol`, `--to-label`/`--from-label`, `--from-identity`, `--ip`,
//! `--traffic-direction`, `--node-name`, `--type`, `--drop-reason-desc`, `--reply` and
//! `--last N` returns exactly the flows that match (each checked field by field, and each
//! filter against flows it must leave out); the denied connections show verdict DROPPED,
//! drop reason POLICY_DENIED, direction INGRESS, both pods named; the admitted one names
//! the policy; `--follow` delivers a new drop; the compact output prints it. Needs root.
//!
//! L4 details and workloads: the connections' flows carry `l4.TCP.flags.SYN`, the denied
//! ping `l4.ICMPv4.type` 8. A pod of a real Deployment `api` (app=client; the
//! controller-manager makes its ReplicaSet and Pod, the simulated kubelet runs it) connects
//! to web the moment it runs: every one of its flows, the very first included, names the
//! pod and its workload, Deployment `api` (the flow waits for the agent to learn the new
//! Endpoint instead of going out unnamed).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::Value;
use tendril_e2e::sim::{SimCluster, SimClusterConfig, SimPod};
use tendril_e2e::traffic::EchoServer;
use tendril_e2e::{ControlPlane, Process, TestEnv, eventually};

const TIMEOUT: Duration = Duration::from_secs(90);
const PORT: u16 = 8080;

fn hubble_bin() -> Result<PathBuf> {
    let path = std::env::var_os("TENDRIL_HUBBLE")
        .map(PathBuf::from)
        .unwrap_or_else(|| tendril_e2e::cache_dir().join("tools/bin/hubble"));
    ensure!(
        path.exists(),
        "{} is missing: build it once with hack/hubble/build.sh (hack/test.sh does)",
        path.display()
    );
    Ok(path)
}

fn labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("app".to_string(), app.to_string())])
}

/// Runs the hubble CLI against `server`; its stdout.
async fn hubble(server: &str, args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new(hubble_bin()?)
        .args(args)
        .args(["--server", server, "--timeout", "10s"])
        .env("HUBBLE_CONFIG", "/dev/null")
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "hubble {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// `hubble observe -o json ARGS`: the flows (other answers such as node status skipped).
async fn observe(server: &str, args: &[&str]) -> Result<Vec<Value>> {
    let mut all = vec!["observe", "-o", "json"];
    all.extend_from_slice(args);
    let out = hubble(server, &all).await?;
    let mut flows = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        if let Some(flow) = v.get("flow") {
            flows.push(flow.clone());
        }
    }
    Ok(flows)
}

fn s<'a>(flow: &'a Value, path: &[&str]) -> &'a str {
    let mut v = flow;
    for key in path {
        v = &v[*key];
    }
    v.as_str().unwrap_or("")
}

fn ports(flow: &Value) -> (u64, u64) {
    let tcp = &flow["l4"]["TCP"];
    (
        tcp["source_port"].as_u64().unwrap_or(0),
        tcp["destination_port"].as_u64().unwrap_or(0),
    )
}

fn describe(flow: &Value) -> String {
    format!(
        "{}/{} -> {}/{} {} {} {:?}",
        s(flow, &["source", "namespace"]),
        s(flow, &["source", "pod_name"]),
        s(flow, &["destination", "namespace"]),
        s(flow, &["destination", "pod_name"]),
        s(flow, &["verdict"]),
        s(flow, &["drop_reason_desc"]),
        ports(flow)
    )
}

/// A TCP connect from `pod` to `ip:PORT`: whether it was accepted within a second.
async fn connect(pod: &SimPod, ip: IpAddr) -> Result<bool> {
    let out = pod
        .exec(&["nc", "-z", "-w", "1", &ip.to_string(), &PORT.to_string()])
        .await?;
    Ok(out.status.success())
}

#[tokio::test]
async fn hubble_cli_observes_and_filters_tendril_flows() -> Result<()> {
    let plane = ControlPlane::dedicated("flows-hubble").await?;
    let env = TestEnv::on(plane.clone()).await?;
    let other = TestEnv::on(plane.clone()).await?;
    let client = env.client();
    let cluster = SimCluster::start(&env, SimClusterConfig::default()).await?;
    let (ns, other_ns) = (env.namespace().to_string(), other.namespace().to_string());
    let (n0, n1) = (cluster.nodes[0].handle(), cluster.nodes[1].handle());
    let web = SimPod::run(&client, n1, &ns, "web", &labels("web")).await?;
    let allowed = SimPod::run(&client, n0, &ns, "client", &labels("client")).await?;
    let intruder = SimPod::run(&client, n0, &ns, "intruder", &labels("intruder")).await?;
    let outsider = SimPod::run(&client, n0, &other_ns, "client", &labels("client")).await?;
    for pod in [&web, &allowed, &intruder, &outsider] {
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
    // Enforced once the intruder is refused while the client still gets through.
    eventually(TIMEOUT, || async {
        ensure!(connect(&allowed, web_ip).await?, "client refused");
        ensure!(
            !connect(&intruder, web_ip).await?,
            "intruder still admitted"
        );
        Ok(())
    })
    .await?;
    for _ in 0..3 {
        ensure!(connect(&allowed, web_ip).await?, "client refused");
        ensure!(!connect(&intruder, web_ip).await?, "intruder admitted");
        ensure!(
            !connect(&outsider, web_ip).await?,
            "other namespace admitted"
        );
    }
    ensure!(
        !allowed.ping(web_ip).await?,
        "ping is not admitted by the policy"
    );
    // Traffic that is not to web (web has no egress policy, the client none at all).
    ensure!(web.ping(allowed.ips[0]).await?, "web pings the client");

    // A brand-new pod of Deployment `api` connects to web the moment it runs, before the
    // agents have learned its Endpoint.
    env.apply_yaml(&format!(
        "apiVersion: apps/v1\nkind: Deployment\n\
         metadata: {{name: api, namespace: {ns}}}\n\
         spec:\n  replicas: 1\n  selector: {{matchLabels: {{app: client, workload: api}}}}\n  \
         template:\n    metadata: {{labels: {{app: client, workload: api}}}}\n    \
         spec:\n      nodeName: {}\n      containers:\n      \
         - {{name: main, image: registry.k8s.io/pause:3.10}}\n",
        cluster.nodes[0].name
    ))
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let api_pod = eventually(TIMEOUT, || async {
        let list = pods
            .list(&ListParams::default().labels("workload=api"))
            .await?;
        list.items
            .into_iter()
            .next()
            .context("the ReplicaSet has not made the pod yet")
    })
    .await?;
    let api = SimPod::start(&client, n0, &api_pod, std::time::Instant::now()).await?;
    eventually(TIMEOUT, || async {
        ensure!(connect(&api, web_ip).await?, "api refused");
        Ok(())
    })
    .await?;
    println!(
        "new pod {}/{} ({}) got through to web",
        api.namespace, api.name, api.ips[0]
    );

    let relay_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let server = format!("127.0.0.1:{relay_port}");
    let mut relay = Process::builder("tendril-relay")
        .arg("--listen")
        .arg(&server);
    for node in &cluster.nodes {
        relay = relay
            .arg("--peer")
            .arg(format!("127.0.0.1:{}", node.observer_port));
    }
    let _relay = relay.env("RUST_LOG", "info").spawn()?;

    // hubble status: healthy, both nodes connected, flows seen.
    let status = eventually(TIMEOUT, || async {
        let out = hubble(&server, &["status"]).await?;
        ensure!(out.contains("Healthcheck (via"), "{out}");
        ensure!(out.contains("Connected Nodes: 2/2"), "{out}");
        Ok(out)
    })
    .await?;
    println!("hubble status:\n{status}");

    // The denied flows reached the relay: wait for them before checking filters.
    let pod_web = format!("{ns}/web");
    let dropped = eventually(TIMEOUT, || async {
        let flows = observe(&server, &["--last", "1000", "--verdict", "DROPPED"]).await?;
        let from = |who: &str, pod: &str| {
            flows.iter().any(|f| {
                s(f, &["source", "namespace"]) == who
                    && s(f, &["source", "pod_name"]) == pod
                    && ports(f).1 == u64::from(PORT)
            })
        };
        ensure!(
            from(&ns, "intruder") && from(&other_ns, "client"),
            "not yet: {flows:?}"
        );
        Ok(flows)
    })
    .await?;
    for f in &dropped {
        ensure!(
            s(f, &["verdict"]) == "DROPPED",
            "--verdict DROPPED gave {}",
            describe(f)
        );
    }
    let denied: Vec<&Value> = dropped
        .iter()
        .filter(|f| s(f, &["source", "pod_name"]) == "intruder")
        .collect();
    for f in &denied {
        ensure!(
            s(f, &["drop_reason_desc"]) == "POLICY_DENIED"
                && s(f, &["traffic_direction"]) == "INGRESS"
                && s(f, &["destination", "pod_name"]) == "web"
                && s(f, &["destination", "namespace"]) == ns
                && s(f, &["node_name"]) == cluster.nodes[1].name
                && s(f, &["IP", "destination"]) == web_ip.to_string()
                && f["source"]["labels"]
                    .as_array()
                    .is_some_and(|l| l.iter().any(|l| l == "k8s:app=intruder")),
            "a denied connection: {f}"
        );
    }
    println!("dropped by the policy: {}", describe(denied[0]));

    // TCP flags and ICMP type: the connections are SYNs, the denied ping an echo request.
    ensure!(
        dropped
            .iter()
            .any(|f| f["l4"]["TCP"]["flags"]["SYN"] == true
                && s(f, &["source", "pod_name"]) == "intruder"),
        "no denied SYN among {:?}",
        dropped
            .iter()
            .map(|f| f["l4"].to_string())
            .collect::<Vec<_>>()
    );
    let pings = observe(&server, &["--last", "1000", "--protocol", "icmp"]).await?;
    let echo = pings
        .iter()
        .find(|f| s(f, &["source", "pod_name"]) == "client" && s(f, &["verdict"]) == "DROPPED")
        .context("the denied ping")?;
    ensure!(
        echo["l4"]["ICMPv4"]["type"] == 8,
        "the denied ping is an echo request: {echo}"
    );
    println!("a denied SYN and the denied echo request: {}", echo["l4"]);

    // The new pod: every flow, the very first included, names it and its Deployment.
    let api_ip = api.ips[0].to_string();
    let api_flows = eventually(TIMEOUT, || async {
        let flows = observe(&server, &["--last", "1000", "--ip", &api_ip]).await?;
        ensure!(
            flows.iter().any(|f| s(f, &["verdict"]) == "FORWARDED"),
            "not yet: {flows:?}"
        );
        Ok(flows)
    })
    .await?;
    for f in &api_flows {
        let side = if s(f, &["IP", "source"]) == api_ip {
            "source"
        } else {
            "destination"
        };
        ensure!(
            s(f, &[side, "pod_name"]) == api.name
                && s(f, &[side, "namespace"]) == ns
                && f[side]["workloads"][0]["name"] == "api"
                && f[side]["workloads"][0]["kind"] == "Deployment",
            "a flow of the new pod without its names: {f}"
        );
    }
    println!(
        "the new pod's first flow ({} of {}): {}",
        s(&api_flows[0], &["time"]),
        api_flows.len(),
        describe(&api_flows[0])
    );
    let flows = observe(
        &server,
        &["--last", "1000", "--pod", &format!("{ns}/{}", api.name)],
    )
    .await?;
    ensure!(
        flows.len() == api_flows.len(),
        "--pod finds the new pod's flows: {} of {}",
        flows.len(),
        api_flows.len()
    );

    // --pod NS/web: every flow has web on one side; allowed and denied ones are there.
    let flows = observe(&server, &["--last", "1000", "--pod", &pod_web]).await?;
    ensure!(
        flows.iter().all(|f| (s(f, &["source", "pod_name"]) == "web"
            && s(f, &["source", "namespace"]) == ns)
            || (s(f, &["destination", "pod_name"]) == "web"
                && s(f, &["destination", "namespace"]) == ns)),
        "--pod {pod_web}: {:?}",
        flows.iter().map(describe).collect::<Vec<_>>()
    );
    ensure!(
        flows.iter().any(|f| s(f, &["verdict"]) == "FORWARDED"
            && s(f, &["source", "pod_name"]) == "client"
            && s(f, &["source", "namespace"]) == ns),
        "--pod {pod_web} lacks the allowed connection: {:?}",
        flows.iter().map(describe).collect::<Vec<_>>()
    );
    ensure!(flows.iter().any(|f| s(f, &["verdict"]) == "DROPPED"));
    // The allowed connection at web's ingress names the policy that admitted it (the
    // newest: the first ones may predate the policy).
    let admitted = flows
        .iter()
        .rev()
        .find(|f| {
            s(f, &["verdict"]) == "FORWARDED"
                && s(f, &["traffic_direction"]) == "INGRESS"
                && s(f, &["source", "pod_name"]) == "client"
                && s(f, &["source", "namespace"]) == ns
        })
        .context("no allowed flow at web's ingress")?;
    ensure!(
        admitted["ingress_allowed_by"][0]["name"] == "web-from-clients"
            && admitted["ingress_allowed_by"][0]["namespace"] == ns.as_str()
            && admitted["policy_match_type"] == 2,
        "ingress_allowed_by: {admitted}"
    );

    // --namespace OTHER: only flows with that namespace on one side.
    let flows = observe(&server, &["--last", "1000", "--namespace", &other_ns]).await?;
    ensure!(!flows.is_empty(), "--namespace {other_ns}: nothing");
    ensure!(
        flows
            .iter()
            .all(|f| s(f, &["source", "namespace"]) == other_ns
                || s(f, &["destination", "namespace"]) == other_ns),
        "--namespace {other_ns}: {:?}",
        flows.iter().map(describe).collect::<Vec<_>>()
    );

    // --port 8080: the TCP flows on that port, never the pings.
    let flows = observe(&server, &["--last", "1000", "--port", "8080"]).await?;
    ensure!(!flows.is_empty(), "--port 8080: nothing");
    ensure!(
        flows
            .iter()
            .all(|f| ports(f).0 == 8080 || ports(f).1 == 8080),
        "--port 8080: {:?}",
        flows.iter().map(describe).collect::<Vec<_>>()
    );
    let icmp = observe(&server, &["--last", "1000", "--protocol", "icmp"]).await?;
    ensure!(!icmp.is_empty(), "the denied ping is a flow too");
    ensure!(
        icmp.iter().all(|f| f["l4"].get("ICMPv4").is_some()),
        "--protocol icmp: {icmp:?}"
    );

    // The other filters of the brief, each through the CLI: every flow matches, some do,
    // and some of all flows do not (else the check would prove nothing).
    let intruder_identity = denied[0]["source"]["identity"]
        .as_u64()
        .context("identity")?;
    let intruder_id = intruder_identity.to_string();
    let intruder_ip = intruder.ips[0].to_string();
    let node1 = cluster.nodes[1].name.clone();
    let has_label = |f: &Value, side: &str, label: &str| {
        f[side]["labels"]
            .as_array()
            .is_some_and(|l| l.iter().any(|l| l == label))
    };
    type Check<'a> = (Vec<&'a str>, Box<dyn Fn(&Value) -> bool + 'a>);
    let checks: Vec<Check> = vec![
        (
            vec!["--to-label", "app=web"],
            Box::new(|f| has_label(f, "destination", "k8s:app=web")),
        ),
        (
            vec!["--from-label", "k8s:app=intruder"],
            Box::new(|f| has_label(f, "source", "k8s:app=intruder")),
        ),
        (
            vec!["--from-identity", &intruder_id],
            Box::new(|f| f["source"]["identity"] == intruder_identity),
        ),
        (
            vec!["--ip", &intruder_ip],
            Box::new(|f| {
                s(f, &["IP", "source"]) == intruder_ip
                    || s(f, &["IP", "destination"]) == intruder_ip
            }),
        ),
        (
            vec!["--traffic-direction", "egress"],
            Box::new(|f| s(f, &["traffic_direction"]) == "EGRESS"),
        ),
        (
            vec!["--node-name", &node1],
            Box::new(|f| s(f, &["node_name"]) == node1),
        ),
        (
            vec!["--type", "policy-verdict"],
            Box::new(|f| f["event_type"]["type"] == 5),
        ),
        (
            vec!["--type", "drop"],
            Box::new(|f| f["event_type"]["type"] == 1 && s(f, &["verdict"]) == "DROPPED"),
        ),
        (
            vec!["--drop-reason-desc", "POLICY_DENIED"],
            Box::new(|f| s(f, &["drop_reason_desc"]) == "POLICY_DENIED"),
        ),
        (
            vec!["--protocol", "tcp"],
            Box::new(|f| f["l4"].get("TCP").is_some()),
        ),
    ];
    let everything = observe(&server, &["--last", "1000"]).await?;
    for (args, matches) in &checks {
        ensure!(
            everything.iter().any(|f| !matches(f)),
            "{args:?}: every flow matches anyway, the check proves nothing"
        );
        let mut all_args = vec!["--last", "1000"];
        all_args.extend(args.iter().copied());
        let flows = observe(&server, &all_args).await?;
        ensure!(!flows.is_empty(), "{args:?}: no flow");
        if let Some(bad) = flows.iter().find(|f| !matches(f)) {
            bail!("{args:?} gave a flow that does not match: {bad}");
        }
    }
    ensure!(
        observe(&server, &["--last", "1000", "--reply"])
            .await?
            .is_empty(),
        "--reply: no flow here is a reply (policy events are first packets)"
    );

    // --last N: exactly N, the newest, in time order.
    let all = observe(&server, &["--last", "1000"]).await?;
    ensure!(all.len() > 3, "only {} flows", all.len());
    let last3 = observe(&server, &["--last", "3"]).await?;
    ensure!(last3.len() == 3, "--last 3 gave {}", last3.len());
    let times: Vec<&str> = all.iter().map(|f| s(f, &["time"])).collect();
    ensure!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "flows of both nodes come in time order"
    );
    ensure!(
        last3.iter().map(|f| s(f, &["uuid"])).collect::<Vec<_>>()
            == all[all.len() - 3..]
                .iter()
                .map(|f| s(f, &["uuid"]))
                .collect::<Vec<_>>(),
        "--last 3 is not the newest three"
    );
    // Both nodes' flows are merged by the relay.
    let nodes: std::collections::BTreeSet<&str> =
        all.iter().map(|f| s(f, &["node_name"])).collect();
    ensure!(nodes.len() == 2, "flows from nodes {nodes:?}");

    // The default (compact) output a person reads: one line per flow, with the verdict.
    let compact = hubble(&server, &["observe", "--last", "4", "--verdict", "DROPPED"]).await?;
    println!("hubble observe --last 4 --verdict DROPPED:\n{compact}");
    ensure!(
        compact.lines().filter(|l| l.contains("DROPPED")).count() == 4,
        "compact output: {compact}"
    );

    // --follow: a new denied connection shows up while the CLI follows.
    let mut follower = tokio::process::Command::new(hubble_bin()?)
        .args([
            "observe",
            "--follow",
            "-o",
            "json",
            "--pod",
            &format!("{ns}/intruder"),
        ])
        .args(["--server", &server])
        .env("HUBBLE_CONFIG", "/dev/null")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
        follower.stdout.take().context("stdout")?,
    ));
    let seen_before: std::collections::BTreeSet<String> =
        all.iter().map(|f| s(f, &["uuid"]).to_string()).collect();
    let followed = tokio::time::timeout(TIMEOUT, async {
        loop {
            tokio::select! {
                line = lines.next_line() => {
                    let line = line?.context("hubble observe --follow ended")?;
                    let v: Value = serde_json::from_str(&line)?;
                    let Some(flow) = v.get("flow") else { continue };
                    // The intruder's connection passes its own egress (FORWARDED on node 0)
                    // and is dropped at web's ingress (node 1): wait for the drop.
                    if !seen_before.contains(s(flow, &["uuid"]))
                        && s(flow, &["verdict"]) == "DROPPED"
                    {
                        return anyhow::Ok(flow.clone());
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    ensure!(!connect(&intruder, web_ip).await?, "intruder admitted");
                }
            }
        }
    })
    .await
    .context("no new flow while following")??;
    ensure!(
        s(&followed, &["source", "pod_name"]) == "intruder"
            && s(&followed, &["verdict"]) == "DROPPED",
        "followed: {followed}"
    );
    drop(follower);

    // The agent itself speaks the same API.
    let direct = format!("127.0.0.1:{}", cluster.nodes[1].observer_port);
    let flows = observe(&direct, &["--last", "5", "--verdict", "DROPPED"]).await?;
    ensure!(
        !flows.is_empty() && flows.len() <= 5,
        "agent: {} flows",
        flows.len()
    );
    if flows
        .iter()
        .any(|f| s(f, &["node_name"]) != cluster.nodes[1].name)
    {
        bail!("the agent of node 1 answered with another node's flows");
    }
    drop(other);
    Ok(())
}

/// The kustomize base deploys the relay in front of the agents' Observer APIs: the agent
/// Service's port is the one config/agent.yaml binds, the relay finds the agents through
/// it, answers gRPC health probes, and has no access to the Kubernetes API at all.
#[tokio::test]
async fn kustomize_base_deploys_the_relay_without_api_access() -> Result<()> {
    let out = tokio::process::Command::new(tendril_e2e::k8s_bin_dir().join("kubectl"))
        .arg("kustomize")
        .arg(tendril_e2e::repo_root().join("deploy/kustomize/base"))
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<Value> = serde_saphyr::from_multiple(std::str::from_utf8(&out.stdout)?)?;
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .with_context(|| format!("no {kind}/{name}"))
    };
    let agent_config: Value = serde_saphyr::from_str(&std::fs::read_to_string(
        tendril_e2e::repo_root().join("config/agent.yaml"),
    )?)?;
    let bind = agent_config["flows"]["observer"]["bindAddress"]
        .as_str()
        .unwrap_or_default();
    let observer_port: u64 = bind.rsplit_once(':').context("bindAddress")?.1.parse()?;
    let svc = find("Service", "tendril-agent-observer")?;
    ensure!(
        svc["spec"]["clusterIP"] == "None",
        "headless: one address per agent"
    );
    ensure!(svc["spec"]["ports"][0]["port"] == observer_port);
    let ds = find("DaemonSet", "tendril-agent")?;
    let agent_ports = &ds["spec"]["template"]["spec"]["containers"][0]["ports"];
    ensure!(
        agent_ports.as_array().is_some_and(|p| p
            .iter()
            .any(|p| p["name"] == "observer" && p["containerPort"] == observer_port)),
        "agent ports: {agent_ports}"
    );
    let relay = find("Deployment", "tendril-relay")?;
    let pod = &relay["spec"]["template"]["spec"];
    ensure!(pod["serviceAccountName"] == "tendril-relay");
    ensure!(pod["automountServiceAccountToken"] == false);
    ensure!(pod["securityContext"]["runAsNonRoot"] == true);
    let c = &pod["containers"][0];
    ensure!(c["command"][0] == "/usr/bin/tendril-relay");
    let args: Vec<&str> = c["args"]
        .as_array()
        .context("args")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        args.contains(
            &format!("--peer-service=tendril-agent-observer.$(POD_NAMESPACE).svc:{observer_port}")
                .as_str()
        ),
        "relay args: {args:?}"
    );
    ensure!(
        c["readinessProbe"]["grpc"]["port"] == 4245
            && c["securityContext"]["readOnlyRootFilesystem"] == true
    );
    ensure!(find("Service", "tendril-relay")?["spec"]["ports"][0]["port"] == 4245);
    ensure!(find("ServiceAccount", "tendril-relay")?["automountServiceAccountToken"] == false);
    for d in docs
        .iter()
        .filter(|d| d["kind"] == "RoleBinding" || d["kind"] == "ClusterRoleBinding")
    {
        ensure!(
            !d["subjects"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["name"] == "tendril-relay")),
            "the relay is bound to a role: {d}"
        );
    }
    Ok(())
}
