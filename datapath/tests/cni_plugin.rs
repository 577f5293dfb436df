//! The real `tendril-cni` binary against a real `tendril-agent` process (standalone mode,
//! `--pod-cidr`), called as a container runtime calls it: `CNI_*` environment, network
//! configuration on stdin, from inside a simulated node (a network namespace this test
//! creates) for a simulated pod (another namespace). Needs root.

use serde_json::{Value, json};
use std::collections::HashSet;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tendril_datapath::cni::api::{self, AgentStatus, AttachmentRef, Request, Response};
use tendril_datapath::cni::link::host_veth_name;

const AGENT: &str = env!("CARGO_BIN_EXE_tendril-agent");
const PLUGIN: &str = env!("CARGO_BIN_EXE_tendril-cni");
const WAIT: Duration = Duration::from_secs(60);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted on drop (with every interface in it).
struct Netns {
    name: String,
}

impl Netns {
    fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        ok(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        ns
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    fn exec(&self, args: &[&str]) -> Output {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args))
    }

    fn links(&self) -> String {
        ok(Command::new("ip").args(["-n", &self.name, "-o", "link", "show"]))
    }

    fn tendril_links(&self) -> Vec<String> {
        self.links()
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with("tdr"))
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A `tendril-agent` process in standalone mode inside a node namespace; killed on drop.
struct Agent {
    child: Option<Child>,
    node: String,
    state: PathBuf,
    cidrs: Vec<String>,
}

impl Agent {
    fn start(node: &Netns, state: &Path, cidrs: &[&str]) -> Self {
        let mut agent = Self {
            child: None,
            node: node.name.clone(),
            state: state.to_path_buf(),
            cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
        };
        agent.spawn();
        agent
    }

    fn socket(&self) -> PathBuf {
        self.state.join("cni.sock")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.join("agent.log"))
            .unwrap();
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.node,
            AGENT,
            "--node-name",
            "test-node",
        ])
        .arg("--state-dir")
        .arg(&self.state)
        .arg("--cni-socket")
        .arg(self.socket())
        .args(["--metrics-bind", "127.0.0.1:0", "--mtu", "1400"]);
        for cidr in &self.cidrs {
            cmd.args(["--pod-cidr", cidr]);
        }
        let child = cmd
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_ready();
    }

    fn call(&self, request: &Request) -> Result<Response, api::ClientError> {
        api::call(&self.socket(), request, Duration::from_secs(10))
    }

    fn status(&self) -> AgentStatus {
        match self.call(&Request::Status).unwrap() {
            Response::Status(status) => status,
            other => panic!("status: {other:?}"),
        }
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if let Ok(Response::Status(status)) = self.call(&Request::Status)
                && status.ready
            {
                return;
            }
            let log = || std::fs::read_to_string(self.state.join("agent.log")).unwrap_or_default();
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none(),
                "agent exited ({exited:?}); log:\n{}",
                log()
            );
            assert!(
                start.elapsed() < WAIT,
                "agent not ready in time; log:\n{}",
                log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

fn conf(agent: &Agent, version: &str) -> Value {
    json!({"cniVersion": version, "name": "tendril", "type": "tendril-cni", "agentSocket": agent.socket()})
}

/// Runs the plugin in `node` like a runtime: returns (exit code, stdout JSON or Null).
fn cni(
    node: &Netns,
    command: &str,
    container: &str,
    netns: &str,
    ifname: &str,
    conf: &Value,
) -> (i32, Value) {
    cni_raw(
        node,
        command,
        container,
        netns,
        ifname,
        conf.to_string().as_bytes(),
    )
}

fn cni_raw(
    node: &Netns,
    command: &str,
    container: &str,
    netns: &str,
    ifname: &str,
    stdin: &[u8],
) -> (i32, Value) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &node.name, PLUGIN])
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", ifname)
        .env(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=pod",
        )
        .env("CNI_PATH", Path::new(PLUGIN).parent().unwrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("plugin printed non-JSON ({e}): {stdout}"))
    };
    (out.status.code().unwrap_or(-1), json)
}

fn result_ip(result: &Value, index: usize) -> IpAddr {
    let address = result["ips"][index]["address"].as_str().unwrap();
    address.split('/').next().unwrap().parse().unwrap()
}

fn pod_addresses(pod: &Netns) -> String {
    ok(Command::new("ip").args(["-n", &pod.name, "addr", "show"]))
}

/// Reachability: any of three echo requests answered (a single request lost while the
/// machine is loaded failed `dual_stack_pod_reaches_both_gateways` once in a full run).
fn ping(from: &Netns, to: IpAddr) -> bool {
    from.exec(&["ping", "-c", "3", "-i", "0.2", "-W", "5", &to.to_string()])
        .status
        .success()
}

#[test]
fn add_check_del_and_del_again() {
    let node = Netns::new("tcnn");
    let pod = Netns::new("tcnp");
    let state = tempfile::tempdir().unwrap();
    let agent = Agent::start(&node, state.path(), &["10.42.1.0/24"]);
    let conf = conf(&agent, "1.1.0");

    let (code, result) = cni(&node, "ADD", "ctr-a", &pod.path(), "eth0", &conf);
    assert_eq!(code, 0, "{result}");
    assert_eq!(result["cniVersion"], "1.1.0");
    let host = host_veth_name("ctr-a", "eth0");
    assert_eq!(result["interfaces"][0]["name"], host.as_str());
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    assert_eq!(result["interfaces"][1]["sandbox"], pod.path().as_str());
    assert_eq!(result["interfaces"][1]["mtu"], 1400);
    assert_eq!(result["ips"][0]["address"], "10.42.1.2/32");
    assert_eq!(result["ips"][0]["gateway"], "10.42.1.1");
    assert_eq!(result["ips"][0]["interface"], 1);
    assert_eq!(
        result["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "10.42.1.1"}])
    );
    let pod_mac = result["interfaces"][1]["mac"].as_str().unwrap();
    assert_eq!(pod_mac.len(), 17);

    // The kernel holds what the result says.
    let addrs = pod_addresses(&pod);
    assert!(addrs.contains("inet 10.42.1.2/32"), "{addrs}");
    assert!(addrs.contains("mtu 1400"), "{addrs}");
    let routes = ok(Command::new("ip").args(["-n", &pod.name, "route", "show"]));
    assert!(
        routes.contains("default via 10.42.1.1 dev eth0"),
        "{routes}"
    );
    let host_route = ok(Command::new("ip").args(["-n", &node.name, "route", "show", "10.42.1.2"]));
    assert!(host_route.contains(&format!("dev {host}")), "{host_route}");

    // Real packets both ways: pod → gateway (on the node) and node → pod.
    assert!(
        ping(&pod, "10.42.1.1".parse().unwrap()),
        "pod cannot reach its gateway"
    );
    assert!(
        ping(&node, "10.42.1.2".parse().unwrap()),
        "node cannot reach the pod"
    );
    assert_eq!(agent.status().in_use, 1);

    // A repeated ADD (a runtime retrying) rewires the attachment with the same address.
    let (code, again) = cni(&node, "ADD", "ctr-a", &pod.path(), "eth0", &conf);
    assert_eq!(code, 0, "{again}");
    assert_eq!(again["ips"], result["ips"]);
    assert!(
        ping(&pod, "10.42.1.1".parse().unwrap()),
        "pod lost its gateway after a repeated ADD"
    );
    assert_eq!(agent.status().in_use, 1);

    let mut check_conf = conf.clone();
    check_conf["prevResult"] = again.clone();
    let (code, out) = cni(&node, "CHECK", "ctr-a", &pod.path(), "eth0", &check_conf);
    assert_eq!((code, &out), (0, &Value::Null));

    // CHECK notices a removed address.
    ok(Command::new("ip").args([
        "-n",
        &pod.name,
        "addr",
        "del",
        "10.42.1.2/32",
        "dev",
        "eth0",
    ]));
    let (code, out) = cni(&node, "CHECK", "ctr-a", &pod.path(), "eth0", &check_conf);
    assert_eq!((code, out["code"].as_u64()), (1, Some(101)), "{out}");
    assert!(
        out["details"].as_str().unwrap().contains("10.42.1.2"),
        "{out}"
    );

    let (code, out) = cni(&node, "DEL", "ctr-a", &pod.path(), "eth0", &check_conf);
    assert_eq!((code, &out), (0, &Value::Null));
    assert!(!node.links().contains(&host), "host veth still there");
    assert!(!pod.links().contains("eth0"), "pod interface still there");
    assert_eq!(agent.status().in_use, 0);
    let (code, out) = cni(&node, "DEL", "ctr-a", &pod.path(), "eth0", &conf);
    assert_eq!((code, &out), (0, &Value::Null), "second DEL must succeed");

    // CHECK of an attachment the agent does not know: unknown container.
    let (_, out) = cni(&node, "CHECK", "ctr-a", &pod.path(), "eth0", &check_conf);
    assert_eq!(out["code"], 3, "{out}");
}

#[test]
fn del_frees_the_address_when_the_netns_is_gone() {
    let node = Netns::new("tcnn");
    let state = tempfile::tempdir().unwrap();
    let agent = Agent::start(&node, state.path(), &["10.42.2.0/24"]);
    let conf = conf(&agent, "1.0.0");
    let pod = Netns::new("tcnp");
    let path = pod.path();
    let (code, result) = cni(&node, "ADD", "ctr-gone", &path, "eth0", &conf);
    assert_eq!(code, 0, "{result}");
    assert_eq!(agent.status().in_use, 1);
    drop(pod);
    let (code, out) = cni(&node, "DEL", "ctr-gone", &path, "eth0", &conf);
    assert_eq!((code, &out), (0, &Value::Null));
    // Without CNI_NETNS at all, as the spec allows for DEL.
    let (code, _) = cni(&node, "DEL", "ctr-gone", "", "eth0", &conf);
    assert_eq!(code, 0);
    assert_eq!(agent.status().in_use, 0);
    assert!(
        node.tendril_links().is_empty(),
        "{:?}",
        node.tendril_links()
    );
}

#[test]
fn malformed_input_leaves_nothing_behind() {
    let node = Netns::new("tcnn");
    let pod = Netns::new("tcnp");
    let state = tempfile::tempdir().unwrap();
    let agent = Agent::start(&node, state.path(), &["10.42.3.0/24"]);

    let (code, out) = cni_raw(
        &node,
        "ADD",
        "c1",
        &pod.path(),
        "eth0",
        b"{\"cniVersion\": \"1.0.0\", \"name\":",
    );
    assert_eq!((code, out["code"].as_u64()), (1, Some(6)), "{out}");
    assert!(!out["msg"].as_str().unwrap().is_empty());
    let (_, out) = cni(
        &node,
        "ADD",
        "c1",
        &pod.path(),
        "eth0",
        &json!({"cniVersion": "1.0.0", "type": "tendril-cni"}),
    );
    assert_eq!(out["code"], 7, "{out}");
    let (_, out) = cni(
        &node,
        "ADD",
        "c1",
        &pod.path(),
        "eth0",
        &json!({"cniVersion": "0.1.0", "name": "n", "type": "t"}),
    );
    assert_eq!(out["code"], 1, "{out}");
    let (_, out) = cni(
        &node,
        "ADD",
        "bad/id",
        &pod.path(),
        "eth0",
        &conf(&agent, "1.0.0"),
    );
    assert_eq!(out["code"], 4, "{out}");
    let (_, out) = cni(
        &node,
        "ADD",
        "c1",
        "/var/run/netns/does-not-exist",
        "eth0",
        &conf(&agent, "1.0.0"),
    );
    assert_eq!(out["code"], 4, "{out}");

    // Setup fails after allocation (the pod already has an eth0): rolled back.
    ok(Command::new("ip").args(["-n", &pod.name, "link", "add", "eth0", "type", "bridge"]));
    let (code, out) = cni(
        &node,
        "ADD",
        "c1",
        &pod.path(),
        "eth0",
        &conf(&agent, "1.0.0"),
    );
    assert_eq!(code, 1);
    assert_eq!(out["code"], 4, "{out}");
    assert!(out["details"].as_str().unwrap().contains("eth0"), "{out}");

    // A host interface of the same name that belongs to another attachment (a hash
    // collision) is never touched: ADD fails, DEL succeeds, the interface stays.
    let foreign = host_veth_name("intruder", "eth0");
    ok(Command::new("ip").args([
        "-n", &node.name, "link", "add", &foreign, "type", "veth", "peer", "name", "fpeer",
    ]));
    ok(Command::new("ip").args([
        "-n",
        &node.name,
        "link",
        "set",
        &foreign,
        "alias",
        "tendril:someone-else/eth0",
    ]));
    let fresh = Netns::new("tcnp");
    let (code, out) = cni(
        &node,
        "ADD",
        "intruder",
        &fresh.path(),
        "eth0",
        &conf(&agent, "1.0.0"),
    );
    assert_eq!((code, out["code"].as_u64()), (1, Some(5)), "{out}");
    assert!(
        out["details"].as_str().unwrap().contains("someone-else"),
        "{out}"
    );
    assert_eq!(
        cni(
            &node,
            "DEL",
            "intruder",
            &fresh.path(),
            "eth0",
            &conf(&agent, "1.0.0")
        )
        .0,
        0
    );
    assert_eq!(node.tendril_links(), vec![foreign.clone()]);
    ok(Command::new("ip").args(["-n", &node.name, "link", "del", &foreign]));

    assert_eq!(agent.status().in_use, 0, "an address leaked");
    assert!(
        node.tendril_links().is_empty(),
        "interfaces leaked: {:?}",
        node.tendril_links()
    );
    let records = std::fs::read_dir(state.path().join("ipam"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".json")
        });
    assert_eq!(records.count(), 0, "an allocation record leaked");
}

#[test]
fn agent_unreachable_means_try_again_later() {
    let node = Netns::new("tcnn");
    let pod = Netns::new("tcnp");
    let state = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(&node, state.path(), &["10.42.4.0/24"]);
    let conf = conf(&agent, "1.1.0");
    let (code, _) = cni(&node, "STATUS", "", "", "", &conf);
    assert_eq!(code, 0, "STATUS of a ready agent");
    let status = agent.terminate();
    assert!(
        status.success(),
        "SIGTERM must stop the agent cleanly: {status:?}"
    );
    assert!(
        !agent.socket().exists(),
        "the socket is removed on shutdown"
    );

    let (code, out) = cni(&node, "ADD", "c1", &pod.path(), "eth0", &conf);
    assert_eq!((code, out["code"].as_u64()), (1, Some(11)), "{out}");
    assert!(node.tendril_links().is_empty());
    assert!(!pod.links().contains("eth0"));
    let (_, out) = cni(&node, "STATUS", "", "", "", &conf);
    assert_eq!(out["code"], 50, "{out}");
    let (_, out) = cni(&node, "DEL", "c1", &pod.path(), "eth0", &conf);
    assert_eq!(out["code"], 11, "{out}");

    let (code, out) = cni(
        &node,
        "VERSION",
        "",
        "",
        "",
        &json!({"cniVersion": "1.1.0"}),
    );
    assert_eq!(code, 0);
    assert_eq!(
        out["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
}

#[test]
fn gc_releases_attachments_the_runtime_no_longer_has() {
    let node = Netns::new("tcnn");
    let (keep, stale) = (Netns::new("tcnp"), Netns::new("tcnp"));
    let state = tempfile::tempdir().unwrap();
    let agent = Agent::start(&node, state.path(), &["10.42.5.0/24"]);
    let conf = conf(&agent, "1.1.0");
    assert_eq!(cni(&node, "ADD", "keep", &keep.path(), "eth0", &conf).0, 0);
    assert_eq!(
        cni(&node, "ADD", "stale", &stale.path(), "eth0", &conf).0,
        0
    );
    assert_eq!(agent.status().in_use, 2);

    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    let (code, out) = cni(&node, "GC", "", "", "", &gc);
    assert_eq!((code, &out), (0, &Value::Null));
    assert_eq!(agent.status().in_use, 1);
    assert_eq!(node.tendril_links(), vec![host_veth_name("keep", "eth0")]);
    assert!(!stale.links().contains("eth0"));
    assert!(
        ping(&keep, "10.42.5.1".parse().unwrap()),
        "the valid attachment still works"
    );
}

#[test]
fn dual_stack_pod_reaches_both_gateways() {
    let node = Netns::new("tcnn");
    let pod = Netns::new("tcnp");
    let state = tempfile::tempdir().unwrap();
    let agent = Agent::start(&node, state.path(), &["10.42.6.0/24", "fd00:42:6::/112"]);
    let (code, result) = cni(
        &node,
        "ADD",
        "ds",
        &pod.path(),
        "eth0",
        &conf(&agent, "0.4.0"),
    );
    assert_eq!(code, 0, "{result}");
    assert_eq!(result["ips"][0]["version"], "4");
    assert_eq!(result["ips"][1]["version"], "6");
    assert_eq!(result["ips"][1]["address"], "fd00:42:6::2/128");
    assert_eq!(
        result["routes"][1],
        json!({"dst": "::/0", "gw": "fd00:42:6::1"})
    );
    assert!(ping(&pod, "10.42.6.1".parse().unwrap()));
    assert!(
        ping(&pod, "fd00:42:6::1".parse().unwrap()),
        "IPv6 gateway unreachable"
    );
    assert!(
        ping(&node, "fd00:42:6::2".parse().unwrap()),
        "node cannot reach the pod over IPv6"
    );
    assert_eq!(
        cni(
            &node,
            "DEL",
            "ds",
            &pod.path(),
            "eth0",
            &conf(&agent, "0.4.0")
        )
        .0,
        0
    );
    assert_eq!(agent.status().in_use, 0);
}

#[test]
fn fifty_concurrent_adds_get_distinct_addresses_and_leave_nothing() {
    const PODS: usize = 50;
    let node = Netns::new("tcnn");
    let pods: Vec<Netns> = (0..PODS).map(|_| Netns::new("tcnp")).collect();
    let state = tempfile::tempdir().unwrap();
    let agent = Agent::start(&node, state.path(), &["10.42.7.0/24"]);
    let conf = conf(&agent, "1.1.0");
    let mut latencies = Vec::new();
    let results: Vec<(i32, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let (node, conf) = (&node, &conf);
                s.spawn(move || {
                    let start = Instant::now();
                    let out = cni(node, "ADD", &format!("c{i}"), &pod.path(), "eth0", conf);
                    (out, start.elapsed())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    })
    .into_iter()
    .map(|(out, took)| {
        latencies.push(took);
        out
    })
    .collect();
    latencies.sort();
    println!(
        "{PODS} concurrent ADDs: p50 {:?}, p99 {:?}, max {:?} (process spawn + agent call + netlink)",
        latencies[PODS / 2],
        latencies[PODS * 99 / 100],
        latencies[PODS - 1]
    );
    let mut ips = HashSet::new();
    for (code, result) in &results {
        assert_eq!(*code, 0, "{result}");
        assert!(
            ips.insert(result_ip(result, 0)),
            "address handed out twice: {result}"
        );
    }
    assert_eq!(ips.len(), PODS);
    assert_eq!(agent.status().in_use, PODS as u64);
    assert_eq!(node.tendril_links().len(), PODS);
    for (i, pod) in pods.iter().enumerate().step_by(7) {
        assert!(
            ping(pod, "10.42.7.1".parse().unwrap()),
            "pod {i} cannot reach its gateway"
        );
    }
    std::thread::scope(|s| {
        for (i, pod) in pods.iter().enumerate() {
            let (node, conf) = (&node, &conf);
            s.spawn(move || {
                assert_eq!(
                    cni(node, "DEL", &format!("c{i}"), &pod.path(), "eth0", conf).0,
                    0
                )
            });
        }
    });
    assert_eq!(agent.status().in_use, 0);
    assert!(node.tendril_links().is_empty());
}

#[test]
fn agent_killed_mid_churn_never_double_allocates() {
    const PODS: usize = 40;
    let node = Netns::new("tcnn");
    let pods: Vec<Netns> = (0..PODS).map(|_| Netns::new("tcnp")).collect();
    let state = tempfile::tempdir().unwrap();
    let agent = Mutex::new(Agent::start(&node, state.path(), &["10.42.8.0/24"]));
    let conf = conf(&agent.lock().unwrap(), "1.1.0");
    let done = AtomicUsize::new(0);
    let retries = AtomicUsize::new(0);
    let next = AtomicUsize::new(0);

    let results: Vec<(usize, Value)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..6)
            .map(|_| {
                let (node, conf, pods, done, retries, next) =
                    (&node, &conf, &pods, &done, &retries, &next);
                s.spawn(move || {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= PODS {
                            return mine;
                        }
                        let start = Instant::now();
                        loop {
                            let (code, out) = cni(
                                node,
                                "ADD",
                                &format!("churn{i}"),
                                &pods[i].path(),
                                "eth0",
                                conf,
                            );
                            if code == 0 {
                                mine.push((i, out));
                                done.fetch_add(1, Ordering::SeqCst);
                                break;
                            }
                            // Only "try again later" is expected while the agent is down.
                            assert_eq!(out["code"], 11, "pod {i}: {out}");
                            retries.fetch_add(1, Ordering::SeqCst);
                            assert!(start.elapsed() < WAIT, "pod {i} never got an address");
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                })
            })
            .collect();
        // Kill the agent (SIGKILL, no chance to clean up) once some pods are up, restart it.
        while done.load(Ordering::SeqCst) < PODS / 3 {
            std::thread::sleep(Duration::from_millis(5));
        }
        {
            let mut agent = agent.lock().unwrap();
            agent.kill();
            agent.spawn();
        }
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let agent = agent.into_inner().unwrap();
    assert_eq!(results.len(), PODS);
    let mut owners = std::collections::HashMap::new();
    for (i, result) in &results {
        let ip = result_ip(result, 0);
        assert!(
            owners.insert(ip, *i).is_none(),
            "{ip} handed to pods {} and {i}",
            owners[&ip]
        );
        // The agent's record and the kernel agree with the result.
        let recorded = agent.call(&Request::Check(AttachmentRef {
            container_id: format!("churn{i}"),
            ifname: "eth0".into(),
        }));
        match recorded.unwrap() {
            Response::Checked(addresses) => assert_eq!(addresses.ips[0].address, ip),
            other => panic!("{other:?}"),
        }
        assert!(pod_addresses(&pods[*i]).contains(&format!("inet {ip}/32")));
    }
    assert_eq!(agent.status().in_use, PODS as u64);
    println!(
        "churn: {PODS} pods, {} retries while the agent restarted",
        retries.load(Ordering::SeqCst)
    );
    for (i, pod) in pods.iter().enumerate() {
        assert_eq!(
            cni(
                &node,
                "DEL",
                &format!("churn{i}"),
                &pod.path(),
                "eth0",
                &conf
            )
            .0,
            0
        );
    }
    assert_eq!(agent.status().in_use, 0, "addresses leaked");
    assert!(node.tendril_links().is_empty());
}

#[test]
fn cnitool_add_check_del() {
    // hack/install-prereqs.sh installs the pinned cnitool into $TENDRIL_TOOLS.
    let tools = std::env::var_os("TENDRIL_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/tendril/tools/bin")
        });
    let cnitool = tools.join("cnitool");
    assert!(
        cnitool.exists(),
        "{} is missing: run hack/install-prereqs.sh (it installs the pinned cnitool)",
        cnitool.display()
    );
    let node = Netns::new("tcnn");
    let pod = Netns::new("tcnp");
    let state = tempfile::tempdir().unwrap();
    let agent = Agent::start(&node, state.path(), &["10.42.9.0/24"]);
    let dirs = tempfile::tempdir().unwrap();
    let (bin, netconf) = (dirs.path().join("bin"), dirs.path().join("net.d"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&netconf).unwrap();
    std::os::unix::fs::symlink(PLUGIN, bin.join("tendril-cni")).unwrap();
    let network = unique("tendril-");
    let conflist = json!({
        "cniVersion": "1.1.0",
        "name": network,
        "plugins": [{"type": "tendril-cni", "agentSocket": agent.socket()}]
    });
    std::fs::write(netconf.join("10-tendril.conflist"), conflist.to_string()).unwrap();
    let tool = |verb: &str| {
        run(Command::new("ip")
            .args(["netns", "exec", &node.name])
            .arg(&cnitool)
            .args([verb, &network, &pod.path()])
            .env("CNI_PATH", &bin)
            .env("NETCONFPATH", &netconf)
            .env("CNI_IFNAME", "eth0"))
    };
    let add = tool("add");
    assert!(
        add.status.success(),
        "cnitool add: {}{}",
        String::from_utf8_lossy(&add.stdout),
        String::from_utf8_lossy(&add.stderr)
    );
    let result: Value = serde_json::from_slice(&add.stdout).unwrap();
    assert_eq!(result["cniVersion"], "1.1.0");
    assert_eq!(result["ips"][0]["address"], "10.42.9.2/32");
    assert!(ping(&pod, "10.42.9.1".parse().unwrap()));
    let check = tool("check");
    assert!(
        check.status.success(),
        "cnitool check: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let del = tool("del");
    assert!(
        del.status.success(),
        "cnitool del: {}",
        String::from_utf8_lossy(&del.stderr)
    );
    assert_eq!(agent.status().in_use, 0);
    assert!(node.tendril_links().is_empty());
    assert!(!pod.links().contains("eth0"));

    // STATUS through libcni, then GC: cnitool passes no valid attachment, so everything goes.
    let status = tool("status");
    assert!(
        status.status.success(),
        "cnitool status: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let add = tool("add");
    assert!(
        add.status.success(),
        "cnitool add: {}",
        String::from_utf8_lossy(&add.stderr)
    );
    assert_eq!(agent.status().in_use, 1);
    let gc = tool("gc");
    assert!(
        gc.status.success(),
        "cnitool gc: {}",
        String::from_utf8_lossy(&gc.stderr)
    );
    assert_eq!(agent.status().in_use, 0);
    assert!(node.tendril_links().is_empty());
    assert!(!pod.links().contains("eth0"));
}
