//! Issue 16: `tendrilctl` against a live simulated cluster (the real operator, two nodes with
//! real agents, two pods): `status` (agents Realized, map pressure from the agents' metrics,
//! operator readiness), its exit code turning 1 when a node has no agent realizing it,
//! `endpoint list|get`, `identity list|get`, `-o json|yaml`, `observe` from an agent's
//! Observer API with filters, `bpf` dumps of a node's pinned maps, and exit code 2 for bad
//! usage or an unreachable server.
//! `policy trace` is proven on the whole policy truth table (tests/policy_truth_table.rs).
//! Needs root; build the binaries first (`cargo build --workspace --bins`).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use tendril_e2e::sim::{SimCluster, SimClusterConfig, SimPod};
use tendril_e2e::{ControlPlane, TestEnv, eventually, target_bin_dir};
use tokio::io::AsyncBufReadExt;

const TIMEOUT: Duration = Duration::from_secs(90);

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn tendrilctl(env: &TestEnv, args: &[&str]) -> Result<Run> {
    let out = tokio::process::Command::new(target_bin_dir().join("tendrilctl"))
        .arg("--kubeconfig")
        .arg(env.kubeconfig())
        .args(args)
        .output()
        .await
        .context("running tendrilctl (build it: cargo build --workspace --bins)")?;
    Ok(Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

fn json_of(run: &Run) -> Result<Value> {
    serde_json::from_str(&run.stdout)
        .with_context(|| format!("not JSON (exit {}): {}{}", run.code, run.stdout, run.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tendrilctl_shows_the_cluster() -> Result<()> {
    let plane = ControlPlane::dedicated("tendrilctl").await?;
    let env = TestEnv::on(plane.clone()).await?;
    let client = env.client();
    let cluster = SimCluster::start(&env, SimClusterConfig::default()).await?;
    let (n0, n1) = (&cluster.nodes[0], &cluster.nodes[1]);
    let ns = env.namespace().to_string();
    let label = |v: &str| BTreeMap::from([("app".to_string(), v.to_string())]);
    let web = SimPod::run(&client, n0.handle(), &ns, "web", &label("web")).await?;
    let db = SimPod::run(&client, n1.handle(), &ns, "db", &label("db")).await?;
    for pod in [&web, &db] {
        pod.wait_realized(&client, TIMEOUT).await?;
    }

    // status: both agents Realized, their map pressure read, the operator ready (/readyz:
    // the simulated operator runs without leader election).
    let mut status_args: Vec<String> = vec![
        "status".into(),
        "-o".into(),
        "json".into(),
        "--operator-health".into(),
        format!("127.0.0.1:{}", cluster.operator_port),
    ];
    for n in &cluster.nodes {
        status_args.push("--agent-metrics".into());
        status_args.push(format!("{}=127.0.0.1:{}", n.name, n.metrics_port));
    }
    let args: Vec<&str> = status_args.iter().map(String::as_str).collect();
    let status = eventually(TIMEOUT, || async {
        let run = tendrilctl(&env, &args).await?;
        let v = json_of(&run)?;
        ensure!(run.code == 0, "status exit {}: {}", run.code, v["problems"]);
        Ok(v)
    })
    .await?;
    println!("status: {}", serde_json::to_string(&status)?);
    assert_eq!(status["operator"]["ready"], true);
    let agents = status["agents"].as_array().context("agents")?;
    assert_eq!(agents.len(), 2);
    for a in agents {
        assert_eq!(a["realized"], "True", "{a}");
        assert!(a["realizedRevision"].is_i64(), "{a}");
        assert!(a["agentVersion"].is_string(), "{a}");
        let maps = a["mapPressure"].as_object().context("map pressure read")?;
        assert!(maps.contains_key("policy"), "{maps:?}");
    }
    let table = tendrilctl(&env, &["status", "--agent-metrics-port", "0"]).await?;
    println!("{}", table.stdout);
    assert!(table.stdout.contains(&n0.name) && table.stdout.contains("REALIZED"));

    // A Node no agent realizes: status finds the problem and exits 1.
    let ghost = env.unique_name("ghost");
    env.delete_on_drop::<Node>(&ghost);
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": ghost}}),
            )?,
        )
        .await?;
    let problem = eventually(TIMEOUT, || async {
        let run = tendrilctl(&env, &args).await?;
        let v = json_of(&run)?;
        let problems = v["problems"].to_string();
        ensure!(
            run.code == 1 && problems.contains(&ghost),
            "exit {}: {problems}",
            run.code
        );
        Ok(problems)
    })
    .await?;
    println!("with a node without agent: {problem}");

    // endpoint list | get, identity list | get.
    let run = tendrilctl(&env, &["endpoint", "list", "-n", &ns, "-o", "json"]).await?;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let eps = json_of(&run)?;
    let names: Vec<&str> = eps
        .as_array()
        .context("a list")?
        .iter()
        .filter_map(|e| e["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.contains(&"web") && names.contains(&"db"));
    let run = tendrilctl(
        &env,
        &["endpoint", "get", &format!("{ns}/web"), "-o", "yaml"],
    )
    .await?;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("identity:"), "{}", run.stdout);
    let web_ep = json_of(&tendrilctl(&env, &["ep", "get", "web", "-n", &ns, "-o", "json"]).await?)?;
    let id = web_ep["spec"]["identity"]
        .as_i64()
        .context("web's identity")?;
    let run = tendrilctl(&env, &["identity", "get", &id.to_string(), "-o", "json"]).await?;
    let identity = json_of(&run)?;
    assert_eq!(
        identity["spec"]["securityLabels"]["k8s:app"], "web",
        "{identity}"
    );
    let run = tendrilctl(&env, &["identity", "list"]).await?;
    assert!(
        run.code == 0 && run.stdout.contains(&id.to_string()),
        "{}",
        run.stdout
    );
    let run = tendrilctl(&env, &["endpoint", "get", &format!("{ns}/nope")]).await?;
    assert_eq!(run.code, 2, "a missing endpoint: {}", run.stderr);

    // policy trace with no policy selecting the pods: allowed both ways, exit 0.
    let run = tendrilctl(
        &env,
        &[
            "policy",
            "trace",
            "--from",
            &format!("{ns}/web"),
            "--to",
            &format!("{ns}/db"),
            "--port",
            "80/TCP",
        ],
    )
    .await?;
    println!("{}", run.stdout);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("ALLOWED") && !run.stdout.contains("DENIED"));

    // A Kubernetes NetworkPolicy lets web reach db on TCP 81 only: the trace names the
    // rule and the policy for 81, the default deny for 80, and exits 1 on a denial.
    let np: k8s_openapi::api::networking::v1::NetworkPolicy = serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "db-from-web", "namespace": ns},
        "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                              "ports": [{"port": 81, "protocol": "TCP"}]}]},
    }))?;
    Api::<k8s_openapi::api::networking::v1::NetworkPolicy>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &np)
        .await?;
    let (from, to) = (format!("{ns}/web"), format!("{ns}/db"));
    let denied = eventually(TIMEOUT, || async {
        let run = tendrilctl(
            &env,
            &[
                "policy", "trace", "--from", &from, "--to", &to, "--port", "80/TCP",
            ],
        )
        .await?;
        ensure!(
            run.code == 1,
            "exit {}: {}{}",
            run.code,
            run.stdout,
            run.stderr
        );
        Ok(run.stdout)
    })
    .await?;
    println!("{denied}");
    assert!(
        denied.contains("DENIED") && denied.contains("ingress is in default deny"),
        "{denied}"
    );
    let run = tendrilctl(
        &env,
        &[
            "policy", "trace", "--from", &from, "--to", &to, "--port", "81/TCP",
        ],
    )
    .await?;
    println!("{}", run.stdout);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .contains(&format!("]: allow peers [{id}] ports [81/TCP]"))
            && run
                .stdout
                .contains(&format!("KubernetesNetworkPolicy {ns}/db-from-web")),
        "{}",
        run.stdout
    );
    let json = json_of(
        &tendrilctl(
            &env,
            &[
                "policy", "trace", "--from", &from, "--to", &to, "--port", "81/TCP", "-o", "json",
            ],
        )
        .await?,
    )?;
    assert_eq!(
        json[0]["ingress"]["rules"][0]["rule"]["peers"],
        json!([id]),
        "{json}"
    );
    assert_eq!(json[0]["ingress"]["entry"]["on"], "peerIdentity", "{json}");

    // observe: a ping from web to db is a flow on web's node; filters narrow.
    let db_ip = db.ips[0];
    let observer = format!("127.0.0.1:{}", n0.observer_port);
    let flows = eventually(TIMEOUT, || async {
        web.ping(db_ip).await?;
        let run = tendrilctl(
            &env,
            &[
                "observe",
                "--server",
                &observer,
                "--pod",
                &format!("{ns}/web"),
                "--last",
                "50",
                "-o",
                "json",
            ],
        )
        .await?;
        ensure!(run.code == 0, "observe exit {}: {}", run.code, run.stderr);
        let flows: Vec<Value> = run
            .stdout
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        let to_db: Vec<Value> = flows
            .into_iter()
            .filter(|f| f["flow"]["IP"]["destination"] == db_ip.to_string())
            .collect();
        if to_db.is_empty() {
            bail!("no flow to {db_ip} yet")
        }
        Ok(to_db)
    })
    .await?;
    println!("observed: {}", flows[0]);
    assert_eq!(flows[0]["flow"]["verdict"], "FORWARDED");
    assert_eq!(flows[0]["flow"]["source"]["pod_name"], "web");
    let run = tendrilctl(
        &env,
        &[
            "observe",
            "--server",
            &observer,
            "--verdict",
            "DROPPED",
            "--last",
            "50",
            "-o",
            "json",
        ],
    )
    .await?;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        !run.stdout.contains(&db_ip.to_string()),
        "no policy, nothing dropped: {}",
        run.stdout
    );
    let run = tendrilctl(&env, &["observe", "--server", &observer, "--last", "5"]).await?;
    assert!(run.code == 0 && run.stdout.contains("->"), "{}", run.stdout);

    // bpf: node 0's pinned maps through the agent's typed readers.
    let root = n0.bpffs_root.to_string_lossy().into_owned();
    let bpf = |map: &'static str| {
        let (root, node) = (root.clone(), n0.name.clone());
        let env = &env;
        async move {
            let run = tendrilctl(
                env,
                &[
                    "bpf",
                    map,
                    "--bpffs-root",
                    &root,
                    "--node",
                    &node,
                    "-o",
                    "json",
                ],
            )
            .await?;
            ensure!(
                run.code == 0,
                "bpf {map}: exit {}: {}",
                run.code,
                run.stderr
            );
            json_of(&run)
        }
    };
    let web_ip = web.ips[0].to_string();
    let endpoints = bpf("endpoints").await?;
    let row = endpoints
        .as_array()
        .context("rows")?
        .iter()
        .find(|r| r["ip"] == web_ip.as_str())
        .with_context(|| format!("web's {web_ip} in {endpoints}"))?;
    assert_eq!(row["identity"], id, "{row}");
    let ipcache = bpf("ipcache").await?;
    assert!(
        ipcache.to_string().contains(&format!("{db_ip}/32")),
        "{ipcache}"
    );
    let states = bpf("policy-state").await?;
    assert!(!states.as_array().context("rows")?.is_empty(), "{states}");
    for map in [
        "policy",
        "policy-cidrs",
        "conntrack",
        "metrics",
        "lb-services",
        "lb-backends",
        "egress-policy",
    ] {
        bpf(map).await?;
    }
    let run = tendrilctl(
        &env,
        &[
            "bpf",
            "endpoints",
            "--bpffs-root",
            &root,
            "--node",
            &n0.name,
        ],
    )
    .await?;
    assert!(
        run.code == 0 && run.stdout.contains(&web_ip),
        "{}",
        run.stdout
    );
    let run = tendrilctl(&env, &["bpf", "endpoints", "--bpffs-root", "/nonexistent"]).await?;
    assert_eq!(run.code, 2);

    // --follow: a new ping shows up while following.
    let mut follow = tokio::process::Command::new(target_bin_dir().join("tendrilctl"))
        .args([
            "observe",
            "--server",
            &observer,
            "--follow",
            "--pod",
            &format!("{ns}/web"),
            "-o",
            "json",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(follow.stdout.take().context("stdout")?).lines();
    let followed = tokio::time::timeout(TIMEOUT, async {
        loop {
            web.ping(db_ip).await?;
            // Allow verdicts are reported once per flow and interval: ping until one arrives.
            if let Ok(Some(line)) =
                tokio::time::timeout(Duration::from_secs(2), lines.next_line()).await?
            {
                return anyhow::Ok(line);
            }
        }
    })
    .await
    .context("no flow while following")??;
    follow.kill().await?;
    let flow: Value = serde_json::from_str(&followed)?;
    assert_eq!(flow["flow"]["source"]["pod_name"], "web", "{flow}");

    // As a kubectl plugin: `kubectl-tendril` on PATH.
    let plugin_dir = std::env::temp_dir().join(env.unique_name("kubectl-plugin"));
    std::fs::create_dir_all(&plugin_dir)?;
    std::os::unix::fs::symlink(
        target_bin_dir().join("tendrilctl"),
        plugin_dir.join("kubectl-tendril"),
    )?;
    let path = format!(
        "{}:{}",
        plugin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = tokio::process::Command::new(tendril_e2e::k8s_bin_dir().join("kubectl"))
        .args(["tendril", "identity", "get", &id.to_string(), "-o", "json"])
        .env("PATH", path)
        .env("KUBECONFIG", env.kubeconfig())
        .output()
        .await;
    let _ = std::fs::remove_dir_all(&plugin_dir);
    let out = out?;
    assert!(
        out.status.success(),
        "kubectl tendril: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let via_kubectl: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(via_kubectl["spec"]["id"], id);

    // Usage and connection errors: exit 2.
    let run = tendrilctl(&env, &["policy", "trace", "--from", "x/a"]).await?;
    assert_eq!(run.code, 2);
    let run = tendrilctl(
        &env,
        &[
            "policy", "trace", "--from", "a/b", "--to", "c/d", "--port", "80/GRE",
        ],
    )
    .await?;
    assert_eq!(run.code, 2, "{}", run.stderr);
    let run = tendrilctl(&env, &["observe", "--server", "127.0.0.1:1"]).await?;
    assert_eq!(run.code, 2, "{}", run.stderr);
    let run = tendrilctl(&env, &["completion", "bash"]).await?;
    assert!(run.code == 0 && run.stdout.contains("tendrilctl"));
    Ok(())
}
